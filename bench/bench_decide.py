"""
The keep rule (autoresearch/decide.py) over simulated nights, with the machine's load switching on and off:
how often a comment-only change (identical code) is kept, how often a real improvement of 2 sigma is, and
what the rule costs in runs per experiment (the candidate's and the best's re-runs). The same functions
decide here and in the loop (decide.run_until_decided).

    uv run bench/bench_decide.py                        # smoke and cpu, 1500 experiments of each kind
    uv run bench/bench_decide.py --profile smoke --experiments 300 --quiet-machine

Each profile's numbers: sigma = run-to-run noise of val_bpb on a quiet machine, measured with
bench/bench_train.py --repeats on tinystories-sample, 2 cores (smoke: 6 runs, sigma 0.022, steps 131-159;
cpu: 3 runs, sigma 0.0010, tokens/s spread 1.4%). Under load a run loses up to load_speed of its tokens/s
and gains up to load_val of val_bpb (smoke measured once: 18 steps quiet, 6 under load, val_bpb 0.76 ->
1.33; cpu measured with one busy-looping process beside it: -63% tokens/s, val_bpb 0.950 -> 1.031).

Measured 2026-11-26, 1000 experiments per line (kept %, runs per experiment); in brackets the rule before
(3 pairs, p < 0.025, screen at 0.7 standard errors, a pair whose best run was slowed able to vouch for
itself), same seeds:
                               quiet machine                    load switching on and off
                               smoke           cpu              smoke           cpu
    identical code             1.9%  1.84      1.0%  1.42       1.8%  2.16      2.5%  1.97
                              (1.2%  1.54)    (0.7%  1.29)     (3.3%  1.92)    (2.9%  1.83)
    2 sigma better            74.2%  3.53     75.0%  3.36      45.3%  3.91     51.3%  3.51
                             (65.0%  3.26)   (63.9%  3.09)    (46.9%  3.45)   (45.3%  3.25)
    3 sigma better            95.3%  3.24     96.8%  3.12      67.4%  3.82     69.0%  3.56
    worse by 2 sigma           0.0%  1.09      0.0%  1.00       0.7%  1.44      0.0%  1.32
    slower (-15%), worse 3 sd  0.0%  1.87      0.0%  2.00       1.3%  1.83      1.1%  1.77
                                                               (1.8%  1.78)    (1.8%  1.62)
    night's mix (runs)               1.96            1.80             2.22            2.13
      better kept in the mix   70.7%           71.7%            45.9%           44.3%
The 2-sigma target (80% kept) is not met, nor 1.6 runs per experiment under load:
- A quiet machine loses most of the rest at the first-run screen, against a best whose few runs were
  themselves selected as lucky (the 2-sigma line chains keeps: each new best is a winner's curse).
- Under load, run 1 off the usual speed costs a probe run of the best (about half the runs of this model's
  nights are loaded, so identical code costs >= 1.5 runs before any confirmation), and a comparison that
  favours the candidate counts only once the code's own speed ratio is shown by a pair: with 15% switches
  per run, a slow stretch often ends the confirmation first. The load model is harsh: each switch moves
  val_bpb by up to 85 sigma (cpu), detectable only through the speed the candidate reports itself; a load
  measured by the harness (foreign CPU time or GPU utilisation during the run) would tell the machine's
  state without the candidate's word.
"""
import argparse
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from autoresearch.decide import SIGMA_FLOOR, Obs, run_until_decided  # noqa: E402

PROFILES = {
    "smoke": dict(val=1.47, sigma=0.022, load_val=0.57, load_speed=0.67, speed_jitter=0.05),
    "cpu": dict(val=0.95, sigma=0.001, load_val=0.085, load_speed=0.67, speed_jitter=0.015),
}
SWITCH = 0.15            # chance per run that the load goes on (or off): stretches of ~7 runs
NIGHT = 60               # experiments per simulated night (each night starts with a 3-run baseline)
BASELINE_RUNS = 3


class Machine:
    """Runs of a version (its true mean val_bpb and speed) on a machine whose load comes and goes."""

    def __init__(self, rng, p, quiet):
        self.rng, self.p, self.quiet, self.loaded, self.weight = rng, p, quiet, False, 0.0

    def run(self, version):
        mean, speed = version
        if not self.quiet and self.rng.random() < SWITCH:  # another job starts (with its own weight) or ends
            self.loaded = not self.loaded
            self.weight = self.rng.uniform(0.3, 1.0)
        load = self.weight if self.loaded else 0.0
        val = mean + self.rng.gauss(0, self.p["sigma"]) + self.p["load_val"] * load
        tps = 1e5 * speed * (1 - self.p["load_speed"] * load) * (1 + self.rng.gauss(0, self.p["speed_jitter"]))
        return Obs(val, tps)


def night(rng, p, effects, quiet):
    """One night: a baseline, then one experiment per effect (in sigmas, against the current best; a tuple
    (effect, speed) for code that also changes speed). Returns [(effect, kept, runs)]."""
    machine = Machine(rng, p, quiet)
    best = (p["val"], 1.0)
    best_runs = [machine.run(best) for _ in range(BASELINE_RUNS)]
    others, out = [], []
    for effect in effects:
        effect, speed = effect if isinstance(effect, tuple) else (effect, 1.0)
        cand = (best[0] + effect * p["sigma"], speed)
        step, c, f = run_until_decided(best_runs, others, lambda kind: machine.run(cand if kind == "candidate"
                                                                                    else best),
                                       SIGMA_FLOOR * best[0])
        out.append((effect, step.action == "keep", len(c) + len(f)))
        if step.action == "keep":
            others.append(best_runs + f)
            best, best_runs = cand, c
        else:
            others.append(c)
            best_runs = best_runs + f
    return out


def scenario(rng, p, make_effect, experiments, quiet):
    results = []
    while len(results) < experiments:
        results += night(rng, p, [make_effect(rng) for _ in range(NIGHT)], quiet)
    return results[:experiments]


def summary(results):
    keeps = sum(k for _, k, _ in results)
    runs = [r for _, _, r in results]
    line = (f"kept {100 * keeps / len(results):5.1f}%  runs/experiment {statistics.fmean(runs):.2f} "
            f"(max {max(runs)})")
    kinds = {"identical": [k for e, k, _ in results if e == 0], "better": [k for e, k, _ in results if e < 0]}
    if all(kinds.values()) and len({e for e, _, _ in results}) > 2:  # a mix: how each kind fared in it
        line += "".join(f"; {name} kept {100 * statistics.fmean(ks):.1f}%" for name, ks in kinds.items())
    return line


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), action="append")
    parser.add_argument("--experiments", type=int, default=1500, help="per scenario (default 1500)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet-machine", action="store_true", help="no load at all")
    args = parser.parse_args()
    for name in args.profile or sorted(PROFILES):
        p = PROFILES[name]
        print(f"profile {name}: sigma {p['sigma']}, load up to +{p['load_val']} val_bpb and "
              f"-{100 * p['load_speed']:.0f}% tokens/s, switching with p={SWITCH} per run"
              + (" (quiet machine)" if args.quiet_machine else ""))
        scenarios = [
            ("comment-only change (identical code)", lambda r: 0.0),
            ("real improvement of 2 sigma", lambda r: -2.0),
            ("real improvement of 3 sigma", lambda r: -3.0),
            ("worse by 2 sigma", lambda r: 2.0),
            ("slower code (-15% tokens/s), worse by 3 sigma", lambda r: (3.0, 0.85)),
            ("a night's mix: 40% identical, 40% worse by 1-6 sigma, 20% better by 2 sigma",
             lambda r: r.choice([0.0, 0.0, r.uniform(1, 6), r.uniform(1, 6), -2.0])),
        ]
        for i, (title, make) in enumerate(scenarios):
            rng = random.Random(args.seed * 1000 + i)
            print(f"  {title:<78} {summary(scenario(rng, p, make, args.experiments, args.quiet_machine))}")


if __name__ == "__main__":
    main()
