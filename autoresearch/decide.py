"""
The keep rule: a change is kept only if its val_bpb beats the best kept result by more than the measured
noise. This module computes the margin (from the baseline runs, or --min-delta), the decision with a note
that explains it in numbers, and the one-line outcome an agent acts on. Pure functions of numbers and runs.
"""
import statistics

from autoresearch.ledger import REJECTED, unmeasured

# Keep margin floor, relative to the baseline val_bpb: 0.1% (= 0.001 at the reference profile's ~1.0).
# Relative because the smoke/cpu profiles and other datasets sit at other bpb scales, and because a
# sigma from 2 runs can come out near 0 by chance.
MARGIN_FLOOR = 0.001


def keep_margin(baseline, min_delta=None):
    """(margin, why): --min-delta, else 2 sigma of the baseline row's runs, with a floor."""
    if min_delta is not None:
        return min_delta, f"--min-delta {min_delta}"
    floor = MARGIN_FLOOR * float(baseline["val_bpb"])
    runs = [float(v) for v in baseline.get("val_bpb_runs", "").split(",") if v]
    if len(runs) < 2:
        return floor, f"floor {floor:.4f} = 0.1% of the baseline; 1 baseline run, noise unknown"
    sigma = statistics.stdev(runs)
    if 2 * sigma >= floor:
        return 2 * sigma, f"2 sigma of {len(runs)} baseline runs"
    return floor, f"floor {floor:.4f} = 0.1% of the baseline; 2 sigma = {2 * sigma:.4f}"


def beats(val, best, margin):
    """The keep rule itself (also what makes a run a candidate for --confirm)."""
    return val < best - margin


def decide(runs, best, margin, why):
    """(status, val_bpb, note) of an experiment's runs (a second one under --confirm). The note
    explains the decision in numbers."""
    first = runs[0]
    if first.error:
        return "crash", 0.0, f"crash: {first.error}" + "".join(f" | {t.strip()}" for t in first.tail[:-1])
    threshold = best - margin
    if len(runs) > 1 and runs[1].error:
        return "discard", first.val, (f"discard: seed {first.seed} gave {first.val:.6f}, but the confirm run "
                                      f"(seed {runs[1].seed}) crashed: {runs[1].error}")
    mean = statistics.fmean(r.val for r in runs)
    what = f"mean {mean:.6f} of seeds {','.join(str(r.seed) for r in runs)}" if len(runs) > 1 else f"{mean:.6f}"
    if beats(mean, best, margin):
        return "keep", mean, f"keep: {what} < best {best:.6f} - margin {margin:.4f} = {threshold:.6f} ({why})"
    if len(runs) > 1:
        return "discard", mean, (f"discard: not confirmed: seed {first.seed} gave {first.val:.6f}, but the "
                                 f"{what} is not below {threshold:.6f} "
                                 f"(best {best:.6f} - margin {margin:.4f}; {why})")
    return "discard", mean, (f"discard: {what} is not below best {best:.6f} - margin {margin:.4f} = "
                             f"{threshold:.6f} ({why})")


def outcome_line(status, val, note, log, previous_best, margin, best):
    """The one line an agent (or a human watching `run`) acts on: a crash or a rejection says why,
    anything else how val_bpb compares with the best before and after."""
    if status == "crash":
        return f"{status} {note.removeprefix('crash: ')} log={log}"
    if unmeasured(note) == REJECTED:
        return f"{status} {note} log={log}"
    return (f"{status} val_bpb={val:.6f} delta={val - previous_best:+.4f} (margin {margin:.4f}) "
            f"best={best:.6f} log={log}")
