"""The keep rule (autoresearch/decide.py) as pure functions, on synthetic runs with fixed random seeds:
how often identical code is kept, that a real gain is, what speed drift does, and the numbers it reports.
The end-to-end path (the loop running the best and the candidate) is in test_agent_loop.py."""
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from autoresearch.decide import (Noise, Obs, next_step, outcome_line, parse_evidence, format_evidence,  # noqa: E402
                                 pooled_noise, run_until_decided, speed_band, t_cdf, t_quantile, version_runs)

SIGMA = 0.01
FLOOR = 0.0005


def runs_of(rng, mean, speed=1e5, n=1):
    return [Obs(mean + rng.gauss(0, SIGMA), speed * (1 + rng.gauss(0, 0.01))) for _ in range(n)]


def keep_rate(effect, experiments, seed):
    """Experiments of a candidate `effect` sigmas from the best, each against a best with 3 runs; returns
    (fraction kept, mean runs per experiment)."""
    rng = random.Random(seed)
    kept, cost = 0, []
    for _ in range(experiments):
        best_runs = runs_of(rng, 1.0, n=3)
        step, cand, fresh = run_until_decided(
            best_runs, [], lambda kind: runs_of(rng, 1.0 + effect * SIGMA if kind == "candidate" else 1.0)[0], FLOOR)
        kept += step.action == "keep"
        cost.append(len(cand) + len(fresh))
    return kept / experiments, statistics.fmean(cost)


def nights_keep_rate(effect, experiments, seed, night=60):
    """As keep_rate, but as a night goes: each candidate `effect` sigmas from the current best, which after a
    keep is the candidate that just won its own confirmation (its runs selected as lucky), and every version's
    runs feed the noise. Nights of `night` experiments, each from a 3-run baseline."""
    rng = random.Random(seed)
    kept, cost = 0, []
    for start in range(0, experiments, night):
        mean, best_runs, others = 1.0, runs_of(rng, 1.0, n=3), []
        for _ in range(min(night, experiments - start)):
            cand_mean = mean + effect * SIGMA
            step, cand, fresh = run_until_decided(
                best_runs, others, lambda kind: runs_of(rng, cand_mean if kind == "candidate" else mean)[0], FLOOR)
            cost.append(len(cand) + len(fresh))
            if step.action == "keep":
                kept += 1
                others.append(best_runs + fresh)
                mean, best_runs = cand_mean, cand
            else:
                others.append(cand)
                best_runs = best_runs + fresh
    return kept / experiments, statistics.fmean(cost)


# -----------------------------------------------------------------------------
# Rates


def test_identical_code_is_kept_less_than_5_percent_of_the_time():
    rate, cost = keep_rate(0.0, 400, seed=1)
    assert rate < 0.05, rate
    # a best of 3 runs only (a night's start, its worst case): the screen lets ~40% of identical code through
    # to a pair or more, the price of keeping 2-sigma gains 80% of the time (bench/bench_decide.py)
    assert cost < 2.8, cost


def test_a_real_improvement_of_2_sigma_is_kept_80_percent_of_the_time_though_each_best_won_its_own_test():
    rate, cost = nights_keep_rate(-2.0, 600, seed=1)
    assert rate >= 0.8, (rate, cost)


def test_a_real_improvement_of_3_sigma_is_kept():
    rate, _ = keep_rate(-3.0, 200, seed=2)
    assert rate >= 0.8, rate


def test_a_change_for_the_worse_costs_one_run_and_is_never_kept():
    rate, cost = keep_rate(3.0, 200, seed=3)
    assert rate == 0 and cost < 1.1, (rate, cost)


# -----------------------------------------------------------------------------
# The steps


def test_one_run_is_never_a_keep_however_good():
    best = [Obs(1.0, 1e5), Obs(1.01, 1e5), Obs(0.99, 1e5)]
    step = next_step(best, [Obs(0.5, 1e5)], [], Noise(SIGMA, 2))
    assert step.action == "best" and "confirming with pairs" in step.note


def test_a_first_run_that_is_not_better_is_discarded_at_once():
    best = [Obs(1.0, 1e5), Obs(1.01, 1e5), Obs(0.99, 1e5)]
    step = next_step(best, [Obs(1.0, 1e5)], [], Noise(SIGMA, 2))
    assert step.action == "discard" and step.note.startswith("not better on its first run")
    assert step.evidence["cand_runs"] == 1 and step.evidence["pairs"] == 0


def test_pairs_alternate_best_first_then_candidate_first():
    best = [Obs(1.0, 1e5)] * 3
    cand, fresh, order = [Obs(0.7, 1e5)], [], []
    noise = Noise(0.2, 5)  # too noisy to decide early: every pair is run
    for _ in range(6):
        step = next_step(best, cand, fresh, noise)
        if step.action not in ("best", "candidate"):
            break
        order.append(step.action[0])
        (cand if step.action == "candidate" else fresh).append(Obs(0.9 if step.action == "candidate" else 1.0, 1e5))
    assert "".join(order).startswith("bccbbc"), order


def test_a_first_run_at_another_speed_runs_the_best_once_before_it_is_judged():
    best = [Obs(1.3, 5e4)] * 3                      # the best was measured on a loaded machine
    first = Obs(1.0, 1e5)                            # the load has gone: fast, and a much lower val_bpb
    step = next_step(best, [first], [], Noise(SIGMA, 2))
    assert step.action == "best" and "+100% of the best's tokens/s" in step.note
    # the best, run now, is just as fast and as good: the first run is judged against it, not the old mean
    step = next_step(best, [first], [Obs(1.0, 1e5)], Noise(SIGMA, 2))
    assert step.action == "discard" and "1 pair(s) at another machine speed" in step.note
    assert step.evidence["diff"] == 0.0


def test_a_pair_split_by_a_change_of_machine_speed_is_not_counted():
    best = [Obs(1.0, 1e5)] * 3
    noise = Noise(SIGMA, 4)
    # code 20% slower than the best; the second pair's best run was slowed by a load that came and went
    cand = [Obs(0.98, 8e4), Obs(0.98, 8e4), Obs(0.98, 8e4)]
    steady = next_step(best, cand, [Obs(1.0, 1e5), Obs(1.0, 1e5), Obs(1.0, 1e5)], noise)
    split = next_step(best, cand, [Obs(1.0, 1e5), Obs(1.0, 1e5), Obs(1.2, 5e4)], noise)
    assert steady.evidence["diff"] == -0.02
    assert split.evidence["diff"] == -0.02          # counted, the split pair would say -0.22 (load, not code)
    assert split.evidence["p"] > steady.evidence["p"]  # and the evidence is one pair short


def test_one_pair_whose_best_run_was_slowed_cannot_vouch_for_itself():
    # the night's case in bench_decide: identical code, its first run a little better by chance; then the
    # pair's best run was slowed by a load (and scored far worse) while the candidate's was not. Its speed
    # ratio says "code 64% faster", and a ratio taken from the pair itself matched the pair: kept at p~0
    best = [Obs(1.0, 1e5), Obs(1.002, 1e5), Obs(0.998, 1e5)]
    cand = [Obs(0.99, 1e5), Obs(1.007, 1.01e5)]
    step = next_step(best, cand, [Obs(1.495, 6.16e4)], Noise(SIGMA, 8))
    assert step.action != "keep", step.note
    assert step.evidence["diff"] > -0.01  # the slowed pair is not counted: its -0.49 was the load


def test_a_slowed_probe_vouches_for_run_1_only_once_a_pair_shows_the_same_speed_ratio():
    # code 15% slower and worse; run 1 at full speed; then a load came, slowing the probe (the best's run just
    # after run 1) by about as much: "run 1 against the best run just now" compared an unloaded run with a
    # loaded one. The next pair, both loaded, shows the code's true ratio (0.85), not run 1's (1.12)
    best = [Obs(1.0, 1e5)] * 3
    cand = [Obs(1.03, 8.3e4), Obs(1.31, 6.6e4)]
    step = next_step(best, cand, [Obs(1.28, 7.44e4), Obs(1.28, 7.75e4)], Noise(SIGMA, 8))
    assert step.action != "keep", step.note
    assert step.evidence["diff"] > 0  # only what goes against the change is left
    # the same runs with the pair at run 1's ratio: the slowed probe and run 1 ran on the same machine
    agreed = next_step(best, [Obs(1.03, 8.3e4), Obs(1.03, 8.6e4)], [Obs(1.28, 7.44e4), Obs(1.28, 7.75e4)],
                       Noise(SIGMA, 8))
    assert agreed.evidence["diff"] < -0.2


def test_a_quiet_reading_never_vouches_for_a_change_of_speed():
    # the harness sees other CPU work, not a GPU shared with another job or a throttled clock: run 1 at another
    # speed on a machine it saw as quiet still needs the best run now to tell the machine from the code
    best = [Obs(1.0, 1e5, load=0.0), Obs(1.01, 1e5, load=0.02), Obs(0.99, 1e5, load=0.01)]
    step = next_step(best, [Obs(0.8, 1.3e5, load=0.01)], [], Noise(SIGMA, 2))
    assert step.action == "best" and "+30% of the best's tokens/s" in step.note, step.note
    # run 1 quiet and slower, the probe slowed by a load that came meanwhile: they ran on different machines,
    # and "run 1 against the best run just now" would credit the change with the load's damage to the probe
    step = next_step(best, [Obs(1.03, 8.5e4, load=0.0)], [Obs(1.6, 5e4, load=0.55)], Noise(SIGMA, 8))
    assert step.action == "discard" and step.note.startswith("not judged"), step.note
    # the other way round, nothing compares with run 1 either: the note says it was not judged, and why
    step = next_step(best, [Obs(1.3, 5e4, load=0.5)], [Obs(1.0, 1e5, load=0.0)], Noise(SIGMA, 8))
    assert step.action == "discard" and step.note.startswith(
        "not judged: no run of the best ran on a machine like run 1's (50,000 tokens/s, 50% of its cores taken by "
        "other work; the best just now: 100,000 tokens/s, 0% of"), step.note
    # a best measured only on a busy machine: run 1 is judged beside a run of the best made now
    busy_best = [Obs(1.3, 5e4, load=0.5)] * 3
    step = next_step(busy_best, [Obs(1.0, 1e5, load=0.0)], [], Noise(SIGMA, 2))
    assert step.action == "best" and "every run of the best so far ran on a busy machine" in step.note
    step = next_step(busy_best, [Obs(1.0, 1e5, load=0.0)], [Obs(1.05, 1e5, load=0.01)], Noise(SIGMA, 2))
    assert step.evidence["diff"] == -0.05, step.note


def test_a_first_run_on_a_busy_machine_is_judged_beside_the_best_on_the_same_busy_machine():
    best = [Obs(1.0, 1e5, load=0.0)] * 3
    # a light load: the speed looks usual, but the harness saw a third of the cores taken
    first = Obs(1.02, 9.5e4, load=0.33)
    step = next_step(best, [first], [], Noise(SIGMA, 2))
    assert step.action == "best" and "other work took 33% of its cores" in step.note, step.note
    # the best, run now under the same load, scores worse still: the first run was better than it, not worse
    step = next_step(best, [first], [Obs(1.05, 9.4e4, load=0.35)], Noise(SIGMA, 2))
    assert step.action == "best" and step.evidence["diff"] == -0.03, step.note  # looked better: pairs follow


def test_a_pair_on_a_busy_machine_counts_for_the_candidate_only_at_the_codes_own_speed_ratio():
    best = [Obs(1.0, 1e5, load=0.0)] * 3
    # run 1 quiet: the code runs at the best's speed. Then a load came for the pair, and the harness saw as
    # much of it in both runs; but the candidate's run lost less speed (12% faster than its pair): a share of
    # cores is not a slowdown, and that pair's -0.05 would be partly the load's
    cand = [Obs(0.97, 1e5, load=0.0), Obs(1.25, 5.6e4, load=0.52)]
    step = next_step(best, cand, [Obs(1.3, 5e4, load=0.5)], Noise(SIGMA, 8))
    assert step.evidence["diff"] == -0.03, step.note  # run 1 only
    # at the code's own ratio the same pair counts
    cand = [Obs(0.97, 1e5, load=0.0), Obs(1.25, 5.1e4, load=0.52)]
    step = next_step(best, cand, [Obs(1.3, 5e4, load=0.5)], Noise(SIGMA, 8))
    assert step.evidence["diff"] < -0.035, step.note


def test_a_candidate_that_loads_the_machine_itself_gains_nothing():
    # train.py can make the machine look busy (work it leaves behind counts as other work), never quiet
    best = [Obs(1.0, 1e5, load=0.0)] * 3
    first = Obs(1.04, 1e5, load=0.5)                  # "busy", at full speed, and worse
    step = next_step(best, [first], [Obs(1.0, 1e5, load=0.0)], Noise(SIGMA, 2))
    assert step.action == "discard" and step.note.startswith("not judged"), step.note  # discarded all the same
    # in a pair, a bad run it calls busy still counts against it, beside a best run on a quiet machine
    cand = [Obs(0.97, 1e5, load=0.0), Obs(1.04, 1e5, load=0.5)]
    step = next_step(best, cand, [Obs(1.0, 1e5, load=0.0)], Noise(SIGMA, 8))
    assert step.evidence["diff"] > -0.015, step.note
    # and a bad run it calls busy stays in the noise (the best's busy runs leave it: the harness ran them)
    cand = [Obs(0.97, load=0.0), Obs(0.98, load=0.0), Obs(1.3, load=0.6)]
    noise = pooled_noise([[Obs(1.0, load=0.0), Obs(1.002, load=0.0), Obs(1.4, load=0.6)]], 1e-6, as_is=[cand])
    assert noise.df == 1 + 2 and noise.sigma > 0.1
    # beside a run of the best the harness saw as busy, the load was real: the busy run stands alone
    noise = pooled_noise([[Obs(1.0, load=0.0), Obs(1.002, load=0.0)]], 1e-6, as_is=[cand],
                         beside=[Obs(1.35, load=0.62)])
    assert noise.df == 1 + 1 and noise.sigma < 0.02


def test_a_machine_that_keeps_changing_speed_judges_nothing():
    best = [Obs(1.0, 1e5)] * 3
    # each pair's two runs at a different machine speed: nothing in them can be compared
    cand = [Obs(0.9, 1e5), Obs(0.9, 5e4), Obs(0.9, 1e5), Obs(0.9, 4e4), Obs(0.9, 1e5)]
    fresh = [Obs(1.0, 1e5), Obs(1.0, 5e4), Obs(1.0, 1e5), Obs(1.0, 1e5)]
    step = next_step(best, cand, fresh, Noise(SIGMA, 4))
    assert step.action == "discard" and step.note.startswith("not judged: the machine changed speed"), step.note
    # the agent's line says it was not judged, once, and gives no delta to read as a verdict on the change
    line = outcome_line("discard", 0.9, f"discard: {step.note} (seeds 1,2)", "x.log", 1.0, step.evidence, 1.0)
    assert line.startswith("discard not judged: the machine changed speed") and "delta" not in line, line


# -----------------------------------------------------------------------------
# Noise, speed and the numbers in the ledger


def test_noise_leaves_out_runs_at_another_speed_but_not_the_candidates_own():
    a = [Obs(1.0, 1e5), Obs(1.02, 1e5), Obs(1.5, 4e4)]   # the third ran under load
    b = [Obs(0.9, 1e5), Obs(0.92, 1e5)]
    noise = pooled_noise([a, b], floor=1e-6)
    assert noise.df == 2 and abs(noise.sigma - statistics.stdev([1.0, 1.02])) < 1e-9
    # the candidate prints its own speed: a bad run it calls slow stays in the noise
    assert pooled_noise([b], floor=1e-6, as_is=[a]).df == 3
    assert pooled_noise([[Obs(1.0)]], floor=0.0005) == Noise(0.0005, 0)  # one run: the floor, and df 0


def test_the_usual_speed_is_the_largest_cluster_even_when_load_hit_most_runs():
    usual, tol = speed_band([Obs(1, s) for s in (5e4, 5.1e4, 4.9e4, 1e5, 1.01e5)])
    assert 4.8e4 < usual < 5.2e4 and tol == 0.10
    usual, _ = speed_band([Obs(1, s) for s in (5e4, 1e5, 1.01e5)])
    assert 9.9e4 < usual < 1.02e5


def test_the_best_runs_include_its_reruns_during_later_experiments():
    rows = [{"train_py": "aaa", "val_bpb_runs": "1.0,1.02", "tokens_per_s": "100,100", "seeds": "42,43",
             "note": "baseline"},
            {"train_py": "bbb", "val_bpb_runs": "1.1", "tokens_per_s": "100", "seeds": "44", "note": "discard",
             "best_train_py": "aaa", "best_val_bpb_runs": "0.98", "best_tokens_per_s": "100", "best_seeds": "45"},
            {"train_py": "ccc", "val_bpb_runs": "0.5", "seeds": "46", "note": "rejected: wrote prepare.py"}]
    runs = version_runs(rows)
    assert [r.val for r in runs["aaa"]] == [1.0, 1.02, 0.98] and [r.seed for r in runs["aaa"]] == [42, 43, 45]
    assert "ccc" not in runs


def test_the_ledger_s_other_cores_become_each_run_s_share_of_its_cores():
    row = {"train_py": "aaa", "val_bpb_runs": "1.0,1.02", "tokens_per_s": "100,100", "seeds": "42,43",
           "other_cores": "0.10,1.00", "note": "baseline"}
    assert [r.load for r in version_runs([row], cores=2)["aaa"]] == [0.05, 0.5]
    assert [r.load for r in version_runs([row])["aaa"]] == [None, None]  # cores unknown
    # a run whose other work was not measured: which value is whose cannot be told, so none is used
    assert [r.load for r in version_runs([dict(row, other_cores="1.00")], cores=2)["aaa"]] == [None, None]


def test_evidence_round_trips_through_its_ledger_text():
    ev = {"cand_runs": 3, "best_runs": 6, "diff": -0.0123, "lo": -0.02, "hi": -0.0046, "p": 0.0031,
          "sigma": 0.004, "df": 9, "pairs": 2}
    assert parse_evidence(format_evidence(ev)) == ev


def test_student_t_matches_tables():
    assert abs(t_cdf(2.0, 10) - 0.96331) < 1e-4
    assert abs(t_quantile(0.975, 2) - 4.3027) < 1e-3
    assert abs(t_quantile(0.975, 1000) - 1.9623) < 1e-3
    assert t_cdf(0.0, 5) == 0.5


def test_a_candidate_cannot_drop_a_bad_run_by_printing_a_false_speed():
    best = [Obs(1.0, 1e5)] * 3
    noise = Noise(SIGMA, 6)
    honest = [Obs(0.97, 1e5)] * 3
    fresh = [Obs(1.0, 1e5)] * 3
    # its fourth run went badly, and its train.py claims it ran at half speed, so that the pair looks split
    claimed = next_step(best, honest + [Obs(1.06, 5e4)], fresh, noise)
    without = next_step(best, honest, fresh[:2], noise)
    assert claimed.evidence["diff"] > without.evidence["diff"] + 0.005, (claimed.evidence, without.evidence)


def test_a_train_py_that_ignores_the_seed_is_rejected_not_counted_twice():
    best = [Obs(1.0, 1e5), Obs(1.01, 1e5), Obs(0.99, 1e5)]      # the best's runs differ: it uses the seed
    step = next_step(best, [Obs(0.97, 1e5), Obs(0.97, 1e5)], [Obs(1.005, 1e5)], Noise(SIGMA, 2))
    assert step.action == "discard" and step.note.startswith("rejected") and "AUTORESEARCH_SEED" in step.note


def test_min_delta_is_part_of_the_test_not_only_of_the_screen():
    best = [Obs(1.0, 1e5), Obs(1.01, 1e5), Obs(0.99, 1e5)]
    cand, fresh = [Obs(0.985, 1e5), Obs(0.986, 1e5)], [Obs(1.0, 1e5)]
    assert next_step(best, cand, fresh, Noise(0.002, 20)).action == "keep"
    assert next_step(best, cand, fresh, Noise(0.002, 20), min_delta=0.02).action != "keep"


def test_the_outcome_line_says_when_the_judged_difference_turns_the_plain_one_around():
    # seen in the demo: the mean of all the best's runs (a slow first one included) made the candidate look
    # better; against the best's run at its speed it was worse, and was discarded
    judged = dict(cand_runs=1, best_runs=2, diff=0.003561, p=0.97293)
    line = outcome_line("discard", 0.420547, "discard: not better", "l.log", 0.429246, judged, 0.429246)
    assert "delta=-0.0087 (1 run(s) vs 2 of the best, judged +0.0036 against the best's comparable runs, " \
           "p=0.9729)" in line, line
    plain = outcome_line("discard", 0.44, "discard: not better", "l.log", 0.43, dict(judged, diff=0.01), 0.43)
    assert "delta=+0.0100 (1 run(s) vs 2 of the best, p=0.9729)" in plain, plain
