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
    assert s["noise_sigma"] == 0.002828


def test_json_stays_valid_when_a_run_or_the_evidence_is_not_a_number(tmp_path):
    rows = [dict(ROWS[0], val_bpb_runs="1.0,nan,1.004"), dict(ROWS[2], evidence="diff=nan p=0.01 sigma=inf")]
    s = summary(tmp_path, rows)
    json.dumps(s, allow_nan=False)  # raises on a nan or an inf
    assert s["history"][0]["runs"] == [1.0, 1.004]
    assert s["history"][1]["evidence"] == {"diff": None, "p": 0.01, "sigma": None}


def test_noise_comes_from_the_latest_evidence_else_the_baseline_runs(tmp_path):
    s = summary(tmp_path, ROWS)
    assert s["noise"] == {"sigma": 0.0041, "df": 9, "from": "pooled over repeated runs"}  # row 2's, not row 1's
    earlier = summary(tmp_path, ROWS[:2])
    assert earlier["noise"] == {"sigma": 0.0028, "df": 1, "from": "pooled over repeated runs"}
    no_evidence = [{k: v for k, v in r.items() if k != "evidence"} for r in ROWS]
    from_baseline = summary(tmp_path, no_evidence)
    assert from_baseline["noise"] == {"sigma": 0.002828, "df": 1, "from": "2 baseline runs"}
    text = report.format_report(from_baseline, "results.tsv")
    assert "pooled" not in text and "noise sigma       0.002828  from 2 baseline runs" in text
    one_run = [dict(r, val_bpb_runs="1.0") if r["n"] == "0" else r for r in no_evidence]
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
    assert "noise sigma       unknown: no version has run twice yet" in text and "(df 0" not in text
