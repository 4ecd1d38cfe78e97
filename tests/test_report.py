"""Tests of the report (autoresearch/report.py) on results.tsv files written by hand: the evidence of each
decision and the repeated runs behind it, in the text, the JSON and the plot; older files still read."""
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from autoresearch import report  # noqa: E402
from autoresearch.ledger import COLUMNS  # noqa: E402

NEW = ["tokens_per_s", "best_val_bpb_runs", "best_seeds", "best_tokens_per_s", "evidence"]
HEADER = COLUMNS + [c for c in NEW if c not in COLUMNS]

EVIDENCE = "cand_runs=3 best_runs=6 diff=-0.0123 lo=-0.0201 hi=-0.0045 p=0.0031 sigma=0.0041 df=9 pairs=2"
ROWS = [  # baseline, a discard on its first run, a keep after two pairs, a crash
    dict(commit="aaaaaaa", val_bpb="1.000000", status="keep", description="baseline", n="0",
         seeds="1,2", val_bpb_runs="1.000000,1.004000", tokens_per_s="5000,5010"),
    dict(commit="bbbbbbb", val_bpb="1.010000", status="discard", description="wider MLP", n="1",
         seeds="3", val_bpb_runs="1.010000", tokens_per_s="4000",
         evidence="cand_runs=1 best_runs=2 diff=0.008 p=0.9 sigma=0.0028 df=1 pairs=0"),
    dict(commit="ccccccc", val_bpb="0.990000", status="keep", description="higher LR", n="2",
         seeds="4,5,6", val_bpb_runs="0.985000,0.990000,0.995000", tokens_per_s="5000,5001,4999",
         best_val_bpb_runs="1.002000,1.003000", best_seeds="7,8", best_tokens_per_s="5002,5003",
         evidence=EVIDENCE),
    dict(commit="ddddddd", val_bpb="0.000000", status="crash", description="double depth (OOM)", n="3",
         note="crash: out of memory"),
]


def write_tsv(path, rows, header=HEADER):
    lines = ["\t".join(header)] + ["\t".join(r.get(c, "") for c in header) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def summary(tmp_path, rows=ROWS, header=HEADER):
    """summarize() of these rows, written as run "t" and read back as the report reads them."""
    path = write_tsv(tmp_path / "results.tsv", [{**r, "tag": "t"} for r in rows], header)
    return report.summarize(report.rows_of_run(path, "t"))


def test_report_shows_the_evidence_of_each_keep(tmp_path):
    s = summary(tmp_path, ROWS)
    lines = report.format_report(s, "results.tsv").splitlines()
    keep = next(i for i, line in enumerate(lines) if line.startswith("  #2 "))
    assert lines[keep + 1] == ("      evidence: 3 runs vs 6 of the best, mean difference -0.012300 "
                               "(95% -0.020100 to -0.004500), p=0.0031")
    # a discard's evidence is in the JSON, not among the kept changes
    assert sum("evidence:" in line for line in lines) == 1
    assert "noise sigma       0.004100  (df 9, pooled over repeated runs)" in lines


def test_report_json_has_runs_and_evidence_of_each_experiment(tmp_path):
    s = json.loads(json.dumps(summary(tmp_path, ROWS), allow_nan=False))
    by_commit = {e["commit"]: e for e in s["history"]}
    assert by_commit["aaaaaaa"]["runs"] == [1.0, 1.004]
    assert by_commit["ccccccc"]["runs"] == [0.985, 0.99, 0.995]
    assert by_commit["ccccccc"]["best_runs"] == [1.002, 1.003]
    assert by_commit["ccccccc"]["evidence"] == {"cand_runs": 3, "best_runs": 6, "diff": -0.0123, "lo": -0.0201,
                                                "hi": -0.0045, "p": 0.0031, "sigma": 0.0041, "df": 9, "pairs": 2}
    assert by_commit["bbbbbbb"]["evidence"]["pairs"] == 0
    assert by_commit["ddddddd"]["runs"] == [] and by_commit["ddddddd"]["best_runs"] == []
    assert by_commit["ddddddd"]["evidence"] == {}
    assert s["kept"][0]["evidence"]["p"] == 0.0031  # the kept list carries it too
    # every key the report had before is still there
    assert {"n", "commit", "status", "val_bpb", "delta", "description", "note"} <= set(s["history"][0])
    # the baseline's runs: its own 1.0 and 1.004, and its re-runs 1.002 and 1.003 while #2 was judged
    assert s["noise_sigma"] == 0.001708


def test_json_stays_valid_when_a_run_or_the_evidence_is_not_a_number(tmp_path):
    rows = [dict(ROWS[0], val_bpb_runs="1.0,nan,1.004"), dict(ROWS[2], evidence="diff=nan p=0.01 sigma=inf")]
    s = summary(tmp_path, rows)
    json.dumps(s, allow_nan=False)  # raises on a nan or an inf
    assert s["history"][0]["runs"] == [1.0, 1.004]
    assert s["history"][1]["evidence"] == {"diff": None, "p": 0.01, "sigma": None}


def test_the_best_is_worth_the_mean_of_all_its_runs_not_its_lucky_first_one(tmp_path):
    # the demo's case: a baseline of one lucky run (0.340), re-run as the best while two changes were judged
    rows = [dict(commit="aaaaaaa", val_bpb="0.340000", status="keep", description="baseline", n="0",
                 val_bpb_runs="0.340000", train_py="base"),
            dict(commit="bbbbbbb", val_bpb="0.350000", status="discard", description="one", n="1",
                 val_bpb_runs="0.350000,0.352000", best_val_bpb_runs="0.360000,0.356000", train_py="one"),
            dict(commit="ccccccc", val_bpb="0.366000", status="discard", description="two", n="2",
                 val_bpb_runs="0.366000", best_val_bpb_runs="0.352000", train_py="two"),
            dict(commit="ddddddd", val_bpb="0.330000", status="keep", description="three", n="3",
                 val_bpb_runs="0.328000,0.332000", best_val_bpb_runs="0.349000", train_py="three"),
            dict(commit="eeeeeee", val_bpb="0.336000", status="discard", description="four", n="4",
                 val_bpb_runs="0.336000", best_val_bpb_runs="0.338000", train_py="four"),
            dict(commit="fffffff", val_bpb="0.300000", status="discard", description="rejected", n="5",
                 val_bpb_runs="0.300000", best_val_bpb_runs="0.200000", train_py="five",
                 note="rejected: trained on the val rows")]
    s = summary(tmp_path, rows)
    # baseline: (0.340 + 0.360 + 0.356 + 0.352 + 0.349) / 5 = 0.3514; its re-runs during #1, #2 and #3
    assert s["baseline"]["runs"] == [0.34, 0.36, 0.356, 0.352, 0.349] and s["baseline"]["val_bpb"] == 0.3514
    # best: (0.328 + 0.332 + 0.338) / 3 = 0.332667; the rejected row's re-run is no measurement
    assert s["best"]["runs"] == [0.328, 0.332, 0.338] and s["best"]["val_bpb"] == 0.332667
    assert s["improvement"] == round(0.3514 - 0.332667, 6)
    # each delta is against the best's value when the experiment began: 0.340, 0.352, 0.352, then 0.33
    assert [e["delta"] for e in s["history"]] == [None, 0.01, 0.014, -0.022, 0.006, -0.032667]
    assert [e["best_after"] for e in s["history"]] == [0.34, 0.352, 0.352, 0.33, 0.332667, 0.332667]
    text = report.format_report(s, "results.tsv")
    assert "best val_bpb     0.332667  ddddddd" in text and "[mean of 3 runs]" in text


def test_noise_comes_from_the_latest_evidence_else_the_baseline_runs(tmp_path):
    s = summary(tmp_path, ROWS)
    assert s["noise"] == {"sigma": 0.0041, "df": 9, "from": "pooled over repeated runs"}  # row 2's, not row 1's
    earlier = summary(tmp_path, ROWS[:2])
    assert earlier["noise"] == {"sigma": 0.0028, "df": 1, "from": "pooled over repeated runs"}
    no_evidence = [{k: v for k, v in r.items() if k != "evidence"} for r in ROWS]
    from_baseline = summary(tmp_path, no_evidence)
    # the baseline's runs: its own two and its two re-runs while #2 was judged
    assert from_baseline["noise"] == {"sigma": 0.001708, "df": 3, "from": "4 baseline runs"}
    text = report.format_report(from_baseline, "results.tsv")
    assert "pooled" not in text and "noise sigma       0.001708  from 4 baseline runs" in text
    one_run = [dict(r, val_bpb_runs="1.0") if r["n"] == "0" else dict(r, best_val_bpb_runs="") for r in no_evidence]
    assert summary(tmp_path, one_run)["noise"] is None


def test_plot_draws_the_spread_of_repeated_runs(tmp_path):
    s = summary(tmp_path, ROWS)
    # the baseline's two runs and the keep's three; the discard's single run has no spread
    assert report.spread_segments(s["history"]) == [(0, 1.0, 1.004), (2, 0.985, 0.995)]
    out = tmp_path / "progress.png"
    assert report.plot(s, out) is None
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_report_reads_rows_without_the_new_columns(tmp_path):
    old = [c for c in COLUMNS if c not in NEW]
    s = summary(tmp_path, ROWS, header=old)
    assert [e["evidence"] for e in s["history"]] == [{}, {}, {}, {}]
    assert [e["best_runs"] for e in s["history"]] == [[], [], [], []]
    assert s["history"][2]["runs"] == [0.985, 0.99, 0.995]
    assert s["noise"]["from"] == "2 baseline runs"
    assert "evidence:" not in report.format_report(s, "results.tsv")
    report.plot(s, tmp_path / "old.png")
    assert (tmp_path / "old.png").exists()


def test_report_reads_upstreams_five_columns(tmp_path):
    rows = [dict(ROWS[0], val_bpb="0.9979"), dict(ROWS[2], val_bpb="0.9932"), ROWS[3]]
    path = write_tsv(tmp_path / "results.tsv", rows, COLUMNS[:5])
    s = report.summarize(report.rows_of_run(path))
    assert s["keeps"] == 1 and s["noise"] is None and s["history"][1]["runs"] == []
    assert s["improvement"] == 0.0047
    assert "evidence:" not in report.format_report(s, str(path))
    report.plot(s, tmp_path / "upstream.png")
    assert (tmp_path / "upstream.png").read_bytes()[:4] == b"\x89PNG"


def test_noise_with_no_repeated_run_yet_is_reported_as_unknown(tmp_path):
    rows = [dict(r, evidence=r.get("evidence", "").replace("df=9", "df=0").replace("df=1", "df=0")) for r in ROWS]
    text = report.format_report(summary(tmp_path, rows), "results.tsv")
    assert "noise sigma       unknown: no version has two comparable runs yet" in text, text
    assert "(df 0" not in text and "from 4 baseline runs" not in text  # one line, not two that disagree
    assert "floor 0.004100); the baseline's 4 runs, all together, spread 0.001708" in text, text


def test_a_parallel_rows_re_runs_of_an_earlier_best_count_for_that_version_not_the_newer_best(tmp_path):
    # `run --workers`: #2 started from the baseline, then #1's keep was recorded before #2's row; #2's re-runs of
    # the best were of the baseline (best_train_py says so), not of #1
    rows = [dict(commit="aaaaaaa", val_bpb="1.000000", status="keep", description="baseline", n="0",
                 train_py="base", val_bpb_runs="1.000000,1.002000"),
            dict(commit="bbbbbbb", val_bpb="0.950000", status="keep", description="w1's keep", n="1",
                 train_py="one", val_bpb_runs="0.950000,0.952000", best_train_py="base",
                 best_val_bpb_runs="1.001000"),
            dict(commit="ccccccc", val_bpb="1.010000", status="discard", description="w2's", n="2",
                 train_py="two", val_bpb_runs="1.010000", best_train_py="base", best_val_bpb_runs="0.999000")]
    s = summary(tmp_path, rows)
    assert s["best"]["runs"] == [0.95, 0.952] and s["best"]["val_bpb"] == 0.951
    assert s["baseline"]["runs"] == [1.0, 1.002, 1.001, 0.999]
