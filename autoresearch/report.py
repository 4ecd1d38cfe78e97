"""
Reporting a results.tsv (ours, or upstream's five columns): which rows make up a run, the numbers of the
run (baseline, best, improvement, keep rate, noise, each experiment's delta against the best before it),
the text report, and the progress plot. The best is ledger.best_row's, as everywhere else, and its value
the mean of all its runs (best_values), as the loop judges it. A row may carry
the evidence of its decision (decide.parse_evidence) and the runs behind it, the candidate's and the best's
re-runs; older files lack those columns, and an absent or empty one reads as no runs, no evidence.
"""
import math
import statistics
import time
from pathlib import Path

from autoresearch.decide import parse_evidence
from autoresearch.gitrepo import current_branch, git
from autoresearch.layout import BRANCH_PREFIX, RESULTS, LoopError, read_json, to_float
from autoresearch.ledger import best_row, ledger_dir, one_line, read_results, unmeasured


# -----------------------------------------------------------------------------
# Which rows


def default_results_path():
    """The repo's results.tsv (this directory's when not in a git repository)."""
    root = git("rev-parse", "--show-toplevel", check=False)
    return str(Path(root or ".") / RESULTS)


def rows_of_run(path, tag=None, text=None):
    """The rows of one run: those of `tag`, else of the current branch's run, else of the latest one.
    An upstream file has no tag column: all its rows. text: the file's, read already."""
    header, rows = read_results(path, text)
    if "tag" in header:
        chosen = tag
        if chosen is None:  # the current branch's run, else the latest one
            here = current_branch().removeprefix(BRANCH_PREFIX)
            chosen = here if here in {r.get("tag") for r in rows} else (rows[-1]["tag"] if rows else None)
        rows = [r for r in rows if r.get("tag") == chosen]
    if not rows:
        raise LoopError(f"{path} has no rows{' for tag ' + tag if tag else ''} yet")
    return rows


def pending_of(tag):
    """The experiment a `step` left being confirmed (no row yet): its number, description and runs so far,
    or None. Only the repository's own run has one."""
    if not tag or git("rev-parse", "--git-dir", check=False) is None:
        return None
    pending = read_json(ledger_dir() / tag / "pending.json")
    if pending is None:
        return None
    runs = {kind: [f["summary"]["val_bpb"] for k, f in pending["runs"] if k == kind and not f.get("error")]
            for kind in ("candidate", "best")}
    return {"n": pending["n"], "description": pending["description"], "commit": pending["commit"][:7],
            "runs": [float(v) for v in runs["candidate"]], "best_runs": [float(v) for v in runs["best"]]}


# -----------------------------------------------------------------------------
# The numbers

POOLED = "pooled over repeated runs"  # noise["from"] of an estimate taken from a decision's evidence

def floats(text):
    """A comma-separated column (val_bpb_runs, best_val_bpb_runs) as floats; a missing column or a value that
    is no finite number is no run, so that a hand-edited file still reports and the JSON stays valid."""
    vals = (to_float(v) for v in (text or "").split(","))
    return [v for v in vals if v is not None and math.isfinite(v)]


def evidence_of(row):
    """The row's evidence column as a dict ({} when absent); a nan/inf becomes None, which JSON can hold."""
    ev = parse_evidence(row.get("evidence", ""))
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in ev.items()}


def noise_of(rows, base_runs):
    """The run-to-run noise the decisions used: the last row's pooled estimate (it improves all night),
    else the baseline runs' stdev, else None."""
    for r in reversed(rows):
        ev = evidence_of(r)
        if isinstance(ev.get("sigma"), (int, float)):
            df = ev.get("df")
            return {"sigma": float(ev["sigma"]), "df": df if isinstance(df, int) else 0,
                    "from": POOLED}
    if len(base_runs) > 1:
        return {"sigma": round(statistics.stdev(base_runs), 6), "df": len(base_runs) - 1,
                "from": f"{len(base_runs)} baseline runs"}
    return None


def best_values(rows):
    """(before, after, runs): for each row, the best's value before it and after it (None before the first
    keep), and every measured run of each version, keyed by row.version_key. The best's value is the mean of
    all its runs so far, its own and its re-runs while later experiments were judged, as the loop's
    (State.best_val), never the one row's value: a lucky first run is diluted as the night goes."""
    runs, best, before, after = {}, None, [], []

    def value():
        return round(statistics.fmean(runs[best]), 6) if best is not None and runs.get(best) else None

    for i, r in enumerate(rows):
        before.append(value())
        if not unmeasured(r.get("note", "")):
            own = floats(r.get("val_bpb_runs"))
            if not own and r["status"] != "crash" and (to_float(r["val_bpb"]) or 0) > 0:
                own = [to_float(r["val_bpb"])]  # upstream's five columns: the row's value is its one run
            runs.setdefault(version_key(i, r), []).extend(own)
            # the best's re-runs: of the version the row names (a parallel run's rows may be based on an
            # earlier best), else of the best before it
            rerun = r.get("best_train_py") or best
            if rerun is not None:
                runs.setdefault(rerun, []).extend(floats(r.get("best_val_bpb_runs")))
        if r["status"] == "keep":
            best = version_key(i, r)
        after.append(value())
    return before, after, runs


def version_key(i, row):
    """A train.py version: its blob hash (as decide.version_runs), else the row itself (older files)."""
    return row.get("train_py") or f"row {i}"


def per_worker(rows):
    """{worker: experiments, keeps, crashes, experiments per hour} of the rows a `run --workers` recorded, and
    the rate of all of them per worker, or ({}, None). A rate is (rows - 1) over the time from the first row's
    end to the last's, so it needs two rows; it counts the time an agent took, as a night does."""
    def rate(group):
        stamps = sorted(time.mktime(time.strptime(r["timestamp"], "%Y-%m-%dT%H:%M:%S")) for r in group
                        if r.get("timestamp"))
        span = stamps[-1] - stamps[0] if len(stamps) > 1 else 0
        return round(3600 * (len(stamps) - 1) / span, 1) if span > 0 else None

    parallel = [r for r in rows if r.get("worker")]
    workers = {}
    for w in sorted({r["worker"] for r in parallel}, key=int):
        mine = [r for r in parallel if r["worker"] == w]
        workers[w] = {"experiments": len(mine), "keeps": sum(r["status"] == "keep" for r in mine),
                      "crashes": sum(r["status"] == "crash" for r in mine), "per_hour": rate(mine)}
    overall = rate(parallel)
    return workers, round(overall / len(workers), 1) if overall else None


def summarize(rows):
    """Numbers of a results.tsv: the baseline is the first kept row; deltas are against the best's value
    (best_values) before each experiment."""
    base_i = next((i for i, r in enumerate(rows) if r["status"] == "keep"), 0)
    base = rows[base_i]
    before, after, version_runs = best_values(rows)
    history = []
    for i, r in enumerate(rows):
        val = to_float(r["val_bpb"]) or 0.0
        measured = val > 0 and r["status"] != "crash"
        delta = round(val - before[i], 6) if measured and i > base_i and before[i] else None
        history.append({
            "n": int(r["n"]) if r.get("n", "").isdigit() else i, "commit": r["commit"], "status": r["status"],
            "val_bpb": val, "delta": delta, "description": r["description"], "note": r.get("note", ""),
            "runs": floats(r.get("val_bpb_runs")), "best_runs": floats(r.get("best_val_bpb_runs")),
            "evidence": evidence_of(r), "best_after": after[i]})
    best = best_row(rows) or base  # a file without a keep: its first row stands in
    best_i = next(i for i, r in enumerate(rows) if r is best)
    base_runs = version_runs.get(version_key(base_i, base), [])
    best_runs = version_runs.get(version_key(best_i, best), [])
    base_val = round(statistics.fmean(base_runs), 6) if base_runs else to_float(base["val_bpb"]) or 0.0
    best_val = round(statistics.fmean(best_runs), 6) if best_runs else to_float(best["val_bpb"]) or 0.0
    exps = history[base_i + 1:]
    count = {s: sum(e["status"] == s for e in exps) for s in ("keep", "discard", "crash")}
    overhead = [to_float(r.get("loop_s")) for r in rows[base_i + 1:] if to_float(r.get("loop_s")) is not None]
    workers, per_hour = per_worker(rows[base_i + 1:])
    for e, r in zip(history, rows):
        e["worker"] = r.get("worker") or None
    return {
        "tag": base.get("tag"), "experiments": len(exps), "keeps": count["keep"], "discards": count["discard"],
        "crashes": count["crash"], "keep_rate": round(count["keep"] / len(exps), 4) if exps else None,
        "baseline": {"commit": base["commit"], "val_bpb": base_val, "runs": base_runs},
        "best": {"n": history[best_i]["n"], "commit": best["commit"], "sha": best.get("sha", ""), "val_bpb": best_val,
                 "runs": best_runs, "description": best["description"]},
        "improvement": round(base_val - best_val, 6),
        "improvement_percent": round(100 * (base_val - best_val) / base_val, 3) if base_val else None,
        "noise_sigma": round(statistics.stdev(base_runs), 6) if len(base_runs) > 1 else None,  # baseline's runs
        "noise": noise_of(rows, base_runs),
        "kept": [e for e in exps if e["status"] == "keep"],
        "crashed": [e for e in exps if e["status"] == "crash"],
        "loop_overhead_s_mean": round(statistics.fmean(overhead), 3) if overhead else None,
        "workers": workers, "per_hour_per_worker": per_hour,
        "history": history,
    }


# -----------------------------------------------------------------------------
# Text and plot


def evidence_words(ev):
    """A decision's evidence in words; None when it has no test result (an older row, or decided on speed)."""
    if not isinstance(ev.get("p"), (int, float)):
        return None
    num = lambda k: isinstance(ev.get(k), (int, float))  # noqa: E731
    words = []
    if num("cand_runs") and num("best_runs"):
        words.append(f"{ev['cand_runs']} runs vs {ev['best_runs']} of the best")
    if num("diff"):
        interval = f" (95% {ev['lo']:.6f} to {ev['hi']:.6f})" if num("lo") and num("hi") else ""
        words.append(f"mean difference {ev['diff']:.6f}{interval}")
    return ", ".join(words + [f"p={ev['p']:.2g}"])


def mean_of(version):
    n = len(version.get("runs", []))
    return f"  [mean of {n} runs]" if n > 1 else ""


def format_report(s, path, recent=0):
    pct = f" ({s['improvement_percent']:.2f}%)" if s["improvement_percent"] is not None else ""
    rate = f" ({100 * s['keep_rate']:.0f}%)" if s["keep_rate"] is not None else ""
    lines = [f"{path}{' (tag ' + s['tag'] + ')' if s['tag'] else ''}: baseline + {s['experiments']} experiments",
             f"baseline val_bpb {s['baseline']['val_bpb']:.6f}  {s['baseline']['commit']}"
             f"{mean_of(s['baseline'])}",
             f"best val_bpb     {s['best']['val_bpb']:.6f}  {s['best']['commit']}  "
             f"improvement {s['improvement']:.6f}{pct}"
             f"  ({s['best']['description']}){mean_of(s['best'])}",
             f"keeps {s['keeps']}{rate}, discards {s['discards']}, crashes {s['crashes']}"]
    noise = s.get("noise")
    unknown = noise and noise["from"] == POOLED and noise["df"] == 0  # what the decisions had to go on
    if s["noise_sigma"] is not None and not unknown:
        lines.append(f"noise sigma       {s['noise_sigma']:.6f}  from {len(s['baseline']['runs'])} baseline runs")
    if unknown:  # the baseline's runs may differ in speed or load: a spread that is not the code's noise
        spread = (f"; the baseline's {len(s['baseline']['runs'])} runs, all together, spread "
                  f"{s['noise_sigma']:.6f}" if s["noise_sigma"] is not None else "")
        lines.append(f"noise sigma       unknown: no version has two comparable runs yet (same speed, quiet "
                     f"machine; decisions used the floor {noise['sigma']:.6f}){spread}")
    elif noise and noise["from"] == POOLED:  # one from the baseline runs alone is the line above
        lines.append(f"noise sigma       {noise['sigma']:.6f}  (df {noise['df']}, {noise['from']})")
    if s.get("workers"):
        rate = lambda x: f", {x:.1f}/h" if x else ""  # noqa: E731
        lines.append("workers: " + "; ".join(f"w{w} {x['experiments']} experiments ({x['keeps']} kept, "
                                              f"{x['crashes']} crashed{rate(x['per_hour'])})"
                                              for w, x in s["workers"].items())
                     + (f"; {s['per_hour_per_worker']:.1f} experiments per hour per worker"
                        if s["per_hour_per_worker"] else ""))
    if s["loop_overhead_s_mean"] is not None:
        lines.append(f"loop overhead {s['loop_overhead_s_mean']:.2f} s per experiment (mean; excludes training)")
    def entry(e):
        val = f"{e['val_bpb']:.6f}" if e["val_bpb"] else "   -    "
        delta = f"{e['delta']:+.6f}" if e["delta"] is not None else "         "
        return f"  #{e['n']:<4} {e['commit']:<8} {e['status']:<7} {val}  {delta}  {e['description']}"
    def with_evidence(e):
        words = evidence_words(e.get("evidence") or {})
        return [entry(e)] + ([f"      evidence: {words}"] if words else [])
    if s["kept"]:
        lines.append("kept changes (delta vs the best before each):")
        lines += [line for e in s["kept"] for line in with_evidence(e)]
    if s["crashed"]:
        lines += ["crashes:"] + [entry(e) + (f"  [{e['note']}]" if e["note"] else "") for e in s["crashed"]]
    if s.get("pending"):
        p = s["pending"]
        lines.append(f"confirming #{p['n']} {p['commit']} ({p['description']}): runs so far "
                     f"{', '.join(f'{v:.6f}' for v in p['runs']) or '-'}; the best's "
                     f"{', '.join(f'{v:.6f}' for v in p['best_runs']) or '-'}. "
                     f"`uv run agent_loop.py step` goes on with it")
    if recent:
        lines += [f"last {min(recent, len(s['history']))} experiments:"] + [
            entry(e) + (f"  [{one_line(e['note'], 160)}]" if e["note"] and e["status"] != "keep" else "")
            for e in s["history"][-recent:]]
    return "\n".join(lines)


def spread_segments(history):
    """(x, lowest, highest) of each experiment with repeated runs of its own: one run hides how far
    the same code's val_bpb moves, so the plot shows the range the decision saw."""
    return [(x, min(e["runs"]), max(e["runs"])) for x, e in enumerate(history) if len(e.get("runs", [])) > 1]


def plot_runs(ax, hist):
    """Each repeated run as a small mark on its experiment's min-max line, and the best's re-runs made
    during that experiment as hollow marks just left of it (paired with the candidate's)."""
    for x, lo, hi in spread_segments(hist):
        ax.vlines(x, lo, hi, color="0.35", linewidth=0.8, zorder=1)
    many = [(x, v) for x, e in enumerate(hist) if len(e.get("runs", [])) > 1 for v in e["runs"]]
    if many:
        ax.scatter(*zip(*many), s=8, color="0.35", label="each run", zorder=2)
    best = [(x - 0.2, v) for x, e in enumerate(hist) for v in e.get("best_runs", [])]
    if best:
        ax.scatter(*zip(*best), s=14, facecolors="none", edgecolors="#4575b4", linewidth=0.8,
                   label="best's re-runs", zorder=2)


def plot(s, path):
    """Every experiment: discards faint, keeps highlighted and labelled, best-so-far as a step line,
    crashes and rejections as marks at the bottom, the spread of repeated runs and the best's re-runs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    hist = s["history"]
    xs = list(range(len(hist)))
    measured = [(x, e) for x, e in zip(xs, hist) if e["val_bpb"] > 0 and e["status"] != "crash"]
    base, best = s["baseline"]["val_bpb"], s["best"]["val_bpb"]
    # the scale follows the bulk of the results; a diverged run must not squash the progress line. The
    # repeated runs count too: a spread cut off by the axis would hide the noise the decisions weighed
    runs = [v for _, e in measured for v in e.get("runs", []) + e.get("best_runs", []) if v > 0]
    vals = sorted([e["val_bpb"] for _, e in measured] + runs) or [base]
    top = max(vals[int(0.9 * (len(vals) - 1))], base)
    bottom = min([best] + runs)
    pad = 0.08 * max(top - bottom, 0.002)
    low, high = bottom - pad, top + pad
    fig, ax = plt.subplots(figsize=(12, 6))
    plot_runs(ax, hist)
    disc = [(x, e["val_bpb"], e.get("worker")) for x, e in measured if e["status"] != "keep" and e["val_bpb"] <= high]
    for worker in sorted({w for _, _, w in disc}, key=lambda w: int(w or 0)):  # a colour per worker, if several
        mine = [(x, v) for x, v, w in disc if w == worker]
        ax.scatter(*zip(*mine), s=16, alpha=0.45 if worker else 0.35, zorder=2,
                   color=f"C{int(worker) % 10}" if worker else "0.55",
                   label=f"discard (worker w{worker})" if worker else "discard")
    off = [x for x, e in measured if e["status"] != "keep" and e["val_bpb"] > high]
    if off:
        ax.scatter(off, [high - 0.3 * pad] * len(off), marker="^", s=22, color="0.55", alpha=0.5,
                   label="discard (off scale)", zorder=2)
    keeps = [(x, e) for x, e in measured if e["status"] == "keep"]
    ax.scatter([x for x, _ in keeps], [e["val_bpb"] for _, e in keeps], s=50, color="#1a9850",
               edgecolor="black", linewidth=0.5, label="keep", zorder=4)
    for x, e in keeps:
        ax.annotate(one_line(e["description"], 40), (x, e["val_bpb"]), xytext=(4, 6), textcoords="offset points",
                    fontsize=7, rotation=20, color="#1a6630")
    running = [e.get("best_after") or base for e in hist]  # the best's value (mean of its runs) after each
    ax.step(xs, running, where="post", color="#1a9850", linewidth=1.5, label="best so far", zorder=3)
    failed = [x for x, e in zip(xs, hist) if e["status"] == "crash" or e["val_bpb"] <= 0]
    if failed:
        ax.scatter(failed, [low + 0.3 * pad] * len(failed), marker="x", color="#d73027",
                   label="crash / rejected", zorder=4)
    ax.set_ylim(low, high)
    ax.set_xlabel("experiment")
    ax.set_ylabel("val_bpb (lower is better)")
    ax.set_title(f"{s['experiments']} experiments, {s['keeps']} kept: val_bpb {base:.4f} -> {best:.4f}")
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="best", fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)

