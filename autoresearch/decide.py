"""
The keep rule, as pure functions of runs. One run is not evidence: a change is screened on its first run
(not better than the best's mean: discarded at once), then confirmed by pairs of runs, the best and the
candidate alternating (B C, C B, B C, C B) so that a slow stretch of the machine hits both, and kept only
when a one-sided test on all of its evidence says p < KEEP_P (KEEP_P_FEW_DF while sigma rests on few runs).
Speed is part of every run: a run whose throughput is off from its code's usual speed was taken on a
different machine and is never compared with runs that were not. Where the harness measures the machine's
load (the share of the run's cores other work took, Obs.load), that is evidence of a changed machine, never
of an unchanged one: a busy run counts for the change only beside a run of the best on a machine as busy.
The noise (sigma) is pooled over every version's repeated runs, so it keeps improving all night.

The constants were set with bench/bench_decide.py (numbers in its docstring: identical code kept < 5% of the
time, quiet or under switching load; a 2-sigma improvement 79-83% on a quiet machine, ~58-65% under load with
the load measured, ~46-54% without, where the target is 80%); rerun it after changing them.
"""
import math
import statistics
from dataclasses import dataclass, field

from autoresearch.ledger import NOT_JUDGED, REJECTED, not_judged, unmeasured

SIGMA_FLOOR = 0.0005       # relative to the best's val_bpb: a sigma from few runs can come out near 0
SPEED_TOL = 0.10           # runs within 10% of their code's usual tokens/s ran on the same machine
SCREEN_Z = 0.25            # the first run must be this many standard errors better than the best's mean
KEEP_P = 0.04             # one-sided p of the whole evidence (the screen's selection included in the rate)
KEEP_P_FEW_DF = 0.01       # ... while the noise rests on fewer than TRUSTED_DF degrees of freedom (the night's
TRUSTED_DF = 10            # start): a sigma from a few runs is often too small, and four looks add up
GIVE_UP_Z = -0.7          # after a pair, an estimate this weak (in standard errors) stops the confirmation
MAX_PAIRS = 4
NOTHING_COMPARABLE = "nothing at a comparable speed"
MAX_SPEED_RETRIES = 2      # pairs thrown away because the machine changed speed between their two runs
BUSY_LOAD = 0.15           # a run during which other work took this share of its cores ran on a busy machine
LOAD_TOL = 0.10            # two busy runs whose shares differ by at most this ran on the same (busy) machine


@dataclass(frozen=True)
class Obs:
    """One finished run, as the rule sees it."""
    val: float
    speed: float = None    # training tokens per second (None: not reported)
    seed: int = None
    load: float = None     # share of the run's cores other work took, by the harness's clock (None: unknown)


@dataclass(frozen=True)
class Noise:
    sigma: float
    df: int                # degrees of freedom of the estimate: 0 = unknown, the floor stands in


@dataclass
class Step:
    """What to do next: run "candidate" or "best" once more, or decide "keep" / "discard"."""
    action: str
    note: str
    evidence: dict = field(default_factory=dict)


# -----------------------------------------------------------------------------
# Noise and speed


def pooled_noise(groups, floor, as_is=(), beside=()):
    """Run-to-run sigma pooled over groups of runs of identical code, never below floor; runs off their
    group's usual speed are left out (a loaded stretch is not noise of the code), except in the as_is groups:
    the candidate's speed is its own train.py's word, and must not take its bad runs out of the noise. A
    candidate run the harness saw busy stands alone only beside a run of the best (beside: the best's runs of
    this experiment) that it saw as busy: train.py can make the machine look busy (work it leaves behind
    counts as other work), not the best's runs."""
    steady = [[r for r in runs if not busy(r) and not speed_off(r.speed, speed_band(runs))] for runs in groups]

    def alone(r):
        return busy(r) and any(busy(b) and same_machine(r, b) for b in beside)

    as_is = [part for runs in as_is
             for part in [[r for r in runs if not alone(r)]] + [[r] for r in runs if alone(r)]]
    ss, df = 0.0, 0
    for runs in steady + as_is:
        vals = [r.val for r in runs]
        if len(vals) > 1:
            mean = statistics.fmean(vals)
            ss += sum((v - mean) ** 2 for v in vals)
            df += len(vals) - 1
    sigma = math.sqrt(ss / df) if df else 0.0
    return Noise(max(sigma, floor), df)


def speed_band(runs):
    """(usual tokens/s, tolerance as a fraction) of these runs of one code. Usual is the mean of the largest
    cluster of speeds within SPEED_TOL of each other: a loaded stretch, whether it hit a few of the runs or
    most of them, moves neither the usual speed nor the tolerance."""
    speeds = sorted(r.speed for r in ([r for r in runs if not busy(r)] or runs) if r.speed)
    if not speeds:
        return None, SPEED_TOL
    clusters = [[t for t in speeds if s <= t <= s * (1 + SPEED_TOL)] for s in speeds]
    biggest = max(clusters, key=lambda c: (len(c), c[0]))
    return statistics.fmean(biggest), SPEED_TOL


def busy(run):
    """The harness saw other work take a share of the run's cores (its own measurement, not train.py's word)."""
    return run.load is not None and run.load >= BUSY_LOAD


def same_machine(a, b):
    """Both runs' loads were measured, and the machine was as busy (or as quiet) for one as for the other."""
    return a.load is not None and b.load is not None and (
        abs(a.load - b.load) <= LOAD_TOL if busy(a) or busy(b) else True)


def speed_off(speed, band):
    usual, tol = band
    return bool(speed and usual) and abs(speed / usual - 1) > tol


def copies(runs):
    """True when two runs gave exactly the same val_bpb: with different seeds, the seed was not used."""
    return len({r.val for r in runs}) < len(runs)


def speed_ratio(speed, band):
    return speed / band[0] if speed and band[0] else 1.0


# -----------------------------------------------------------------------------
# The sequential rule


def next_step(best_runs, cand, fresh, noise, min_delta=0.0):
    """best_runs: the best's runs before this experiment; cand: the candidate's runs so far; fresh: the best's
    runs made during this experiment (all without crashes). Returns the next Step."""
    if not cand:
        return Step("candidate", "first run")
    band = speed_band(best_runs)
    # run 1 off the usual speed, or on a machine the harness saw busy (even at the usual speed): the best runs
    # now, on the machine as it is
    all_busy = bool(best_runs) and all(busy(r) for r in best_runs)
    probed = busy(cand[0]) or speed_off(cand[0].speed, band) or all_busy
    if probed and not fresh:
        if busy(cand[0]):
            return Step("best", f"run 1 ran while other work took {100 * cand[0].load:.0f}% of its cores: the "
                                f"best runs once now, on the machine as it is")
        if all_busy:
            return Step("best", "every run of the best so far ran on a busy machine: the best runs once now, "
                                "on the machine as it is")
        pct = 100 * (speed_ratio(cand[0].speed, band) - 1)
        return Step("best", f"run 1 trained at {pct:+.0f}% of the best's tokens/s: the best runs once now, "
                            f"to tell a changed machine from a change in the code's speed")
    probe, paired = (fresh[0], fresh[1:]) if probed else (None, fresh)
    est, var, basis, mismatched = estimate(best_runs, cand, probe, paired, band, noise.sigma)
    if mismatched > MAX_SPEED_RETRIES:
        return Step("discard", f"{NOT_JUDGED}: the machine changed speed within {mismatched} pairs; submit it "
                               f"again when the machine is steady")
    ev = evidence(len(cand), len(best_runs) + len(fresh), est, var, noise, len(cand) - 1, min_delta)
    z = (est + min_delta) / math.sqrt(var)
    if len(cand) > 1 and copies(cand) and not copies(best_runs + fresh):
        return Step("discard", f"{REJECTED}: its runs gave the same val_bpb under different seeds: train.py "
                               f"ignores AUTORESEARCH_SEED, and one run repeated is not evidence", ev)
    what = (f"mean difference {est:+.6f} (95% interval {ev['lo']:+.6f} to {ev['hi']:+.6f}), p={ev['p']:.4f}, "
            f"from {basis}")
    if len(cand) == 1 and not paired:
        if basis == NOTHING_COMPARABLE:
            now = f"; the best just now: {machine(fresh[0])}" if fresh else ""
            return Step("discard", f"{NOT_JUDGED}: no run of the best ran on a machine like run 1's "
                                   f"({machine(cand[0])}{now}); submit it again when the machine is steady", ev)
        if z > -SCREEN_Z:
            return Step("discard", f"not better on its first run: {what} (z {z:+.2f}, needs < {-SCREEN_Z})", ev)
        return Step(pair_order(0)[0], f"looked better on its first run ({what}): confirming with pairs", ev)
    pending = pair_in_progress(cand, paired)
    if pending:
        return Step(pending, f"confirming: pair {len(paired)} half done", ev)
    bar = KEEP_P if noise.df >= TRUSTED_DF else KEEP_P_FEW_DF
    if ev["p"] < bar and noise.df >= 1:
        return Step("keep", f"{what} < {bar}", ev)
    if z > GIVE_UP_Z or len(cand) - 1 - mismatched >= MAX_PAIRS:
        return Step("discard", f"not confirmed: {what} (keep needs p < {bar})", ev)
    return Step(pair_order(len(cand) - 1)[0], f"confirming: {what}", ev)


def estimate(best_runs, cand, probe, paired, band, sigma):
    """(candidate - best, its variance, what it rests on, pairs thrown away), from runs taken at the same
    machine speed. rho, the candidate code's speed over the best's, comes from the adjacent pairs whose best run
    kept its usual speed (else run 1 and the probe, or the best's usual speed). When the code kept the best's
    speed, every candidate run at the usual speed is compared with every such run of the best (the efficient
    case on a steady machine), and runs off it only within their pair; when the code's own speed changed, run 1
    against the best at the same machine speed, and the pairs whose speed ratio is the usual one."""
    pairs = list(zip(paired, cand[1:]))
    # only a pair whose best run kept the best's usual speed shows the code's own speed: in one whose best run
    # was slowed, the ratio is the machine's change, and a ratio taken from it would vouch for that very pair
    ratios = [c.speed / b.speed for b, c in pairs
              if c.speed and b.speed and not busy(b) and not busy(c) and not speed_off(b.speed, band)]
    # the harness's load is evidence of a changed machine, never of an unchanged one (a GPU shared with another
    # job, a throttled CPU, a busy hypervisor are invisible to it): a busy run 1 shows the code's speed only
    # beside a probe the harness saw as busy, and a probe it saw on another machine than run 1 shows nothing
    apart = probe is not None and cand[0].load is not None and probe.load is not None \
        and not same_machine(probe, cand[0])
    busy_alone = busy(cand[0]) and (probe is None or apart)
    if ratios:
        rho = statistics.median(ratios)
    elif busy_alone:
        rho = 1.0
    elif probe is not None and probe.speed and cand[0].speed and not apart:
        rho = cand[0].speed / probe.speed
    else:
        rho = speed_ratio(cand[0].speed, band)
    tol = band[1]
    probe_off = probe is not None and (busy(probe) or speed_off(probe.speed, band))
    # rho from run 1 and a probe that the machine slowed holds only once a pair shows the same ratio: run 1 may
    # have run at full speed, the code slower by as much as the load. Doubt counts against the change: after
    # the screen, a comparison that favours the candidate needs a rho that holds, and the candidate's speed is
    # its own train.py's word, so a pair it could push off the ratio (to drop a bad run) is left out only when
    # it favours the candidate.
    def at_rho(b, c):
        return abs(c.speed / b.speed / rho - 1) <= tol

    run1_holds = not probe_off or (busy(probe) and not apart)
    verified = bool(ratios) or run1_holds or not pairs or any(
        c.speed and b.speed and at_rho(b, c) for b, c in pairs)
    # a pair that favours the candidate counts at the code's own speed ratio, and only when that ratio holds or
    # the harness saw both runs equally busy: a share of cores is not a slowdown, the ratio shows it
    matched = [(b, c) for b, c in pairs if not (c.speed and b.speed) or c.val >= b.val
               or (at_rho(b, c) and (verified or (busy(b) and same_machine(b, c))))]
    # a probe the harness saw on another machine than run 1 compares with it in neither direction: a busy run 1
    # beside a quiet probe is worse by the load, whatever the code (and a discard stays a discard)
    probe_counts = probe is not None and not apart and (verified or cand[0].val >= probe.val)

    def usual(r):
        return not busy(r) and not speed_off(r.speed, band)

    parts, basis = [], []
    if abs(rho - 1) <= tol:
        same = [r for r in cand if usual(r)]
        ref = [r for r in best_runs + list(paired) if usual(r)]
        if same and ref:
            parts.append((statistics.fmean(r.val for r in same) - statistics.fmean(r.val for r in ref),
                          sigma ** 2 * (1 / len(same) + 1 / len(ref))))
            basis.append(f"{len(same)} run(s) against {len(ref)} of the best at the usual speed")
        # a candidate run off the usual speed counts only against its own pair's best run
        off = ([(probe, cand[0])] if probe_counts else []) + [(b, c) for b, c in matched if not usual(c)]
        if off:
            basis.append(f"{len(off)} pair(s) at another machine speed")
    else:
        basis.append(f"code at {100 * (rho - 1):+.0f}% of the best's speed")
        if probe_off:
            if probe_counts:
                parts.append((cand[0].val - probe.val, 2 * sigma ** 2))
                basis.append("run 1 against the best run just now")
        else:
            ref = [r for r in best_runs + ([probe] if probe else []) if usual(r)] or best_runs
            parts.append((cand[0].val - statistics.fmean(r.val for r in ref), sigma ** 2 * (1 + 1 / len(ref))))
            basis.append(f"run 1 against the best's mean of {len(ref)} run(s)")
        off = matched
        if off:
            basis.append(f"{len(off)} pair(s)")
    parts += [(c.val - b.val, 2 * sigma ** 2) for b, c in off]
    if not parts:  # run 1 off the usual speed, and the best's probe at the usual one: nothing to compare
        return 0.0, 2 * sigma ** 2, NOTHING_COMPARABLE, len(pairs) - len(matched)
    weight = sum(1 / v for _, v in parts)
    return sum(d / v for d, v in parts) / weight, 1 / weight, ", ".join(basis), len(pairs) - len(matched)


def machine(run):
    """How the machine was for a run, in words for a note."""
    load = f"{100 * run.load:.0f}% of its cores taken by other work" if run.load is not None else "load unknown"
    return f"{run.speed:,.0f} tokens/s, {load}" if run.speed else load


def pair_order(k):
    """Pair k runs best then candidate when k is even, else candidate then best (ABBA cancels a trend)."""
    return ("best", "candidate") if k % 2 == 0 else ("candidate", "best")


def pair_in_progress(cand, fresh):
    """The run that completes the pair under way, if one is half done."""
    if len(fresh) > len(cand) - 1:
        return "candidate"
    if len(fresh) < len(cand) - 1:
        return "best"
    return None


def run_until_decided(best_runs, others, run, floor, min_delta=0.0, cand=(), fresh=(), more=lambda: True):
    """Drive next_step: run(kind) trains "candidate" or "best" once and returns its Obs, or None for a crash.
    others: the runs of every other version, grouped (for the noise). Goes on from cand and fresh (runs made
    earlier); stops undecided, the next run's Step in hand, once more() says no. Returns (Step, cand, fresh);
    a crash is Step("crash") on the first run and a discard after it (the loop adds the crash's reason)."""
    cand, fresh = list(cand), list(fresh)
    while True:
        noise = pooled_noise(list(others) + [list(best_runs) + fresh], floor, as_is=[cand], beside=fresh)
        step = next_step(list(best_runs), cand, fresh, noise, min_delta)
        if step.action in ("keep", "discard") or (cand and not more()):
            return step, cand, fresh
        obs = run(step.action)
        if obs is None:
            first = step.action == "candidate" and not cand
            return Step("crash" if first else "discard", f"the {step.action}'s run crashed"), cand, fresh
        (cand if step.action == "candidate" else fresh).append(obs)


# -----------------------------------------------------------------------------
# Runs in the ledger


def row_runs(row, prefix="", cores=None):
    """The Obs of a row's candidate runs (prefix "best_": of the best's re-runs it made); with cores (how many
    the runs' other_cores were counted over), the share of them other work took."""
    def column(name, kind):
        return [kind(v) for v in (row.get(prefix + name) or "").split(",") if v]
    vals, speeds, seeds = column("val_bpb_runs", float), column("tokens_per_s", float), column("seeds", int)
    other = column("other_cores", float)
    if len(seeds) > len(vals):  # a crashed run has a seed but no value: which seeds go with the values
        seeds = seeds[:len(vals)]
    loads = [o / cores for o in other] if cores and len(other) == len(vals) else [None] * len(vals)
    return [Obs(v, speeds[i] if i < len(speeds) else None, seeds[i] if i < len(seeds) else None, loads[i])
            for i, v in enumerate(vals)]


def version_runs(rows, cores=None):
    """{train.py blob hash: [Obs]}: every trusted run of each version, its re-runs as the best included."""
    runs = {}
    for row in rows:
        if unmeasured(row.get("note", "")):
            continue
        if row.get("train_py"):
            runs.setdefault(row["train_py"], []).extend(row_runs(row, cores=cores))
        if row.get("best_train_py"):
            runs.setdefault(row["best_train_py"], []).extend(row_runs(row, "best_", cores))
    return runs


# -----------------------------------------------------------------------------
# Numbers for the ledger and the report


def evidence(n_cand, n_best, est, var, noise, pairs, min_delta=0.0):
    """The numbers behind a decision: runs of each, mean difference (candidate - best; negative is better),
    its 95% interval, the one-sided p that the candidate is not better, the noise it was judged with, and
    how many speed-matched pairs (0: the first run alone). With min_delta, p is that of "not better by
    more than min_delta"."""
    se = math.sqrt(var)
    df = max(noise.df, 1)
    half = t_quantile(0.975, df) * se
    return {"cand_runs": n_cand, "best_runs": n_best, "diff": round(est, 6), "lo": round(est - half, 6),
            "hi": round(est + half, 6), "p": round(t_cdf((est + min_delta) / se, df), 5),
            "sigma": round(noise.sigma, 6),
            "df": noise.df, "pairs": pairs}


def format_evidence(ev):
    return " ".join(f"{k}={v}" for k, v in ev.items())


def parse_evidence(text):
    out = {}
    for part in (text or "").split():
        key, _, value = part.partition("=")
        try:
            out[key] = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            out[key] = value
    return out


def t_cdf(t, df):
    """Student's t distribution function, via the regularized incomplete beta function."""
    x = df / (df + t * t)
    tail = 0.5 * incomplete_beta(df / 2, 0.5, x)
    return tail if t < 0 else 1 - tail


def t_quantile(q, df):
    lo, hi = -1e3, 1e3
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


def incomplete_beta(a, b, x):
    """I_x(a, b) by its continued fraction (modified Lentz), on the side where it converges fast."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    if x > (a + 1) / (a + b + 2):
        return 1 - incomplete_beta(b, a, 1 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -((a + m) * (a + b + m) * x) / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1 + num * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1 - c * d) < 1e-12:
            break
    return front * (f - 1)


def outcome_line(status, val, note, log, previous_best, evidence, best):
    """The one line an agent (or a human watching `run`) acts on: a crash or a rejection says why,
    anything else how val_bpb compares with the best before and after, on how many runs, with what p."""
    if status == "crash":
        return f"{status} {note.removeprefix('crash: ')} log={log}"
    if not_judged(note):  # its delta would read as a verdict on the change: the line says there is none
        return f"{status} {note.removeprefix(f'{status}: ')} log={log}"
    if unmeasured(note) == REJECTED or not evidence:
        return f"{status} {note} log={log}"
    delta = val - previous_best
    # the decision compares like with like (runs at the same speed, on a machine as busy): say so where that
    # turns the plain difference of the means around
    judged = (f", judged {evidence['diff']:+.4f} against the best's comparable runs"
              if isinstance(evidence.get("diff"), (int, float)) and evidence["diff"] * delta < 0 else "")
    return (f"{status} val_bpb={val:.6f} delta={delta:+.4f} ({evidence['cand_runs']} run(s) vs "
            f"{evidence['best_runs']} of the best{judged}, p={evidence['p']:.4f}) best={best:.6f} log={log}")
