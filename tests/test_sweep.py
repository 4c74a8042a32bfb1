"""sweep.py: the grid, successive halving against a hand computation, an interrupted sweep resumed,
crashes and divergences, refused folders and bad input, the best configs and train-to-target.
tests/fake_trainer.py stands in for training: its val loss follows a known curve."""
import csv
import json
import math
import os

import numpy as np
import pytest

import sweep
import train_gpt
from conftest import DEMO, REPO, run_command

FAKE = os.path.join(REPO, "tests", "fake_trainer.py")
RUNGS, BUDGET, EVERY = (2000, 6000), 18000, 1000


def fake_curve():
    import importlib.util
    spec = importlib.util.spec_from_file_location("fake_trainer", FAKE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.curve


def run_sweep(out, capsys, monkeypatch, *more, batch_sizes="8", multipliers="0.5,0.707,1,1.414,2", eta=3):
    monkeypatch.setenv("FAKE_LAUNCHES", str(out) + ".launches.jsonl")
    return run_command(sweep.main, ["lr", DEMO, "--batch_sizes", batch_sizes, "--multipliers", multipliers,
                                    "--rungs", ",".join(map(str, RUNGS)), "--budget", str(BUDGET), "--eta", str(eta),
                                    "--out", str(out), "--trainer", FAKE, "--poll_s", "0.01",
                                    f"--eval_every_tokens={EVERY}", "--muon_lr=0.05", *more], capsys)


def launches(out):
    return [json.loads(line) for line in open(str(out) + ".launches.jsonl")]


def states(out):
    rows = list(csv.DictReader(open(os.path.join(out, "sweep.csv"))))
    return {r["trial"]: r["state"] for r in rows}, rows


def hand_halving(factors, rates, eta):
    """Asynchronous successive halving run one trial at a time, by hand: the candidates start in the
    order given, and a promoted trial continues after all of them have started and after the trials
    promoted before it. At rung k a trial goes on iff its loss is <= the (n // eta)-th smallest (at
    least the smallest) of the n losses seen at rung k so far."""
    curve, seen, outcome = fake_curve(), [[] for _ in RUNGS], {}
    queue = [(f, 0) for f in factors]
    while queue:
        f, k = queue.pop(0)
        loss = curve(rates * f, RUNGS[k])
        seen[k].append(loss)
        if loss > sorted(seen[k])[max(len(seen[k]) // eta - 1, 0)]:
            outcome[f] = f"pruned at rung {k}"
        elif k + 1 < len(RUNGS):
            queue.append((f, k + 1))
        else:
            outcome[f] = "finished"
    return outcome


def test_candidates_start_in_a_fixed_shuffled_order():
    grid = sweep.candidate_factors(8, 512, ["sqrt", "linear"], [0.5, 0.707, 1, 1.414, 2])
    order = sweep.start_order(8, grid)
    assert sorted(order) == sorted(grid) and order != grid and order == sweep.start_order(8, grid)


def test_candidates_scale_every_rate_by_sqrt_and_linear_batch_ratios_without_duplicates():
    got = sweep.candidate_factors(128, 512, ["sqrt", "linear"], [0.5, 1, 2])
    assert [(round(f, 12), s, m) for f, s, m in got] == [
        (0.25, "sqrt", 0.5), (0.5, "sqrt", 1), (1.0, "sqrt", 2), (0.125, "linear", 0.5)]  # 0.25, 0.5 once
    assert len(sweep.candidate_factors(512, 512, ["sqrt", "linear"], [0.5, 0.707, 1, 1.414, 2])) == 5


def test_the_power_law_fit_recovers_a_b_c():
    t = np.linspace(1e6, 5e8, 40)
    for a, b, c in ((40.0, 0.3, 3.1), (8.0, 0.15, 2.5), (1e3, 0.6, 3.4)):
        fa, fb, fc = sweep.fit_power_law(t, a * t ** -b + c)
        assert fb == pytest.approx(b, rel=1e-4) and fa == pytest.approx(a, rel=1e-3)
        assert fc == pytest.approx(c, rel=1e-4)
    assert sweep.fit_power_law([1, 2], [3, 2]) is None  # three points at least


def test_promotions_follow_successive_halving_by_hand_and_the_best_config_loads(tmp_path, capsys, monkeypatch):
    out = tmp_path / "sw"
    result = run_sweep(out, capsys, monkeypatch, "--target_val_loss=4.5")  # trials still train to the budget
    assert result.returncode == 0, result.stderr
    got, rows = states(out)
    cfg = train_gpt.load_config([DEMO, "--muon_lr=0.05"])
    grid = sweep.candidate_factors(8, cfg.lr_ref_batch_size, ["sqrt", "linear"], [0.5, 0.707, 1, 1.414, 2])
    factors = [f for f, _, _ in sweep.start_order(8, grid)]
    hand = hand_halving(factors, cfg.muon_lr, eta=3)
    assert got == {sweep.trial_name(8, f): hand[f] for f in factors}
    assert "pruned at rung 0" in got.values() and "finished" in got.values()
    # every rung's loss is the curve's, and the fit extrapolated to the budget is the curve's too (it is a power law)
    curve = fake_curve()
    for r in rows:
        assert float(r["val_loss"]) == pytest.approx(curve(float(r["muon_lr"]), int(r["tokens"])), rel=1e-12)
        if r["fit_at_budget"] not in ("", "None") and int(r["tokens"]) == RUNGS[1]:
            assert float(r["fit_at_budget"]) == pytest.approx(curve(float(r["muon_lr"]), BUDGET), rel=1e-3)
    # a pruned trial's checkpoints are gone (it never continues), its metrics stay
    for name, state in got.items():
        assert os.path.isdir(out / "trials" / name / "ckpt") == (state == "finished")
        assert (out / "trials" / name / "metrics.jsonl").is_file()
    # a promoted trial continued from its own checkpoint, never from scratch
    for name in got:
        starts = [(x["start"], x["resume"]) for x in launches(out) if x["name"] == name]
        assert starts[0] == (0, False) and all(s > 0 and resumed for s, resumed in starts[1:])
    finished = {f: curve(cfg.muon_lr * f, BUDGET) for f in factors if hand[f] == "finished"}
    best = min(finished, key=finished.get)
    chosen = train_gpt.load_config([str(out / "best_bs8.py")])
    assert chosen.batch_size == 8 and chosen.lr_scaling == "none" and chosen.lr_mult == best
    assert chosen.target_val_loss == 4.5  # the config's target, kept for `sweep.py target` (trials ignore it)
    assert train_gpt.lr_factor(chosen) == best and all(getattr(chosen, k) == getattr(cfg, k) for k in sweep.RATE_KEYS)
    assert "import" not in open(out / "best_bs8.py").read()
    assert (out / "sweep.png").is_file()


def test_an_interrupted_sweep_resumes_without_training_anything_twice(tmp_path, capsys, monkeypatch):
    whole = tmp_path / "whole"
    run_sweep(whole, capsys, monkeypatch, batch_sizes="4,8", multipliers="0.5,1,2")
    part = tmp_path / "part"
    real, calls = sweep.Sweep.segment_done, []

    def interrupted(self, *a):
        calls.append(1)
        if len(calls) == 6:  # the segment has ended (its checkpoint written), the driver is stopped before recording it
            raise KeyboardInterrupt
        return real(self, *a)
    monkeypatch.setattr(sweep.Sweep, "segment_done", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(part, capsys, monkeypatch, batch_sizes="4,8", multipliers="0.5,1,2")
    monkeypatch.setattr(sweep.Sweep, "segment_done", real)
    assert not (part / "driver.lock").exists()
    result = run_sweep(part, capsys, monkeypatch, batch_sizes="4,8", multipliers="0.5,1,2")
    assert result.returncode == 0 and "continuing interrupted trial" in result.stdout
    assert states(part)[0] == states(whole)[0]
    assert open(part / "best_bs4.py").read().replace("part", "whole") == open(whole / "best_bs4.py").read()
    trained = {}  # no token range of any trial is trained twice
    for x in launches(part):
        spans = trained.setdefault(x["name"], [])
        assert all(x["stop"] <= a or x["start"] >= b for a, b in spans if x["start"] < x["stop"])
        spans.append((x["start"], x["stop"]))
    n_whole = len(launches(whole))
    assert len(launches(part)) == n_whole + 1  # the interrupted segment relaunched once, with nothing left to train
    # the same command on a finished sweep launches nothing
    run_sweep(part, capsys, monkeypatch, batch_sizes="4,8", multipliers="0.5,1,2")
    assert len(launches(part)) == n_whole + 1


@pytest.mark.parametrize("launcher", ["process", "inline"])
def test_a_crashed_trial_is_recorded_with_its_log_and_a_diverged_one_is_pruned(tmp_path, capsys, monkeypatch, launcher):
    out = tmp_path / "sw"
    ref = train_gpt.load_config([DEMO]).lr_ref_batch_size
    low, middle, high = (sweep.trial_name(8, f) for f, _, _ in sweep.candidate_factors(8, ref, ["sqrt"], [0.5, 1, 2]))
    crash, diverge = high, low
    monkeypatch.setenv("FAKE_CRASH", crash)
    monkeypatch.setenv("FAKE_DIVERGE", diverge)
    result = run_sweep(out, capsys, monkeypatch, "--scalings=sqrt", "--launcher", launcher, multipliers="0.5,1,2")
    assert result.returncode == 0
    assert f"{crash} crashed: see {out / 'logs' / crash}.log" in result.stdout
    assert f"{diverge} diverged (pruned)" in result.stdout
    import optuna
    from optuna.trial import TrialState
    study = sweep.open_studies(json.load(open(out / "sweep.json")))[8]
    by_name = {t.user_attrs["name"]: t for t in study.get_trials()}
    assert by_name[crash].state == TrialState.FAIL and by_name[crash].user_attrs["log"].endswith(f"{crash}.log")
    assert by_name[diverge].state == TrialState.PRUNED and by_name[diverge].user_attrs["status"] == "diverged"
    assert [t.state for t in by_name.values()].count(TrialState.COMPLETE) == 1  # the sweep went on
    assert optuna.__version__


@pytest.mark.parametrize("multipliers, every, named", [("0.5,1", EVERY, "multipliers"), ("1", 500, "extra")])
def test_a_folder_of_another_grid_or_config_is_refused(tmp_path, capsys, monkeypatch, multipliers, every, named):
    out = tmp_path / "sw"
    run_sweep(out, capsys, monkeypatch, multipliers="1")
    result = run_command(sweep.main, ["lr", DEMO, "--batch_sizes", "8", "--multipliers", multipliers, "--rungs",
                                      "2000,6000", "--budget", "18000", "--out", str(out), "--trainer", FAKE,
                                      f"--eval_every_tokens={every}"], capsys)
    assert result.returncode == 2 and "another config or grid" in result.stderr and named in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--multipliers", ""], "--multipliers is empty"),
    (["--rungs", "6000,2000"], "rungs must increase"),
    (["--rungs", "2000,18000"], "below the budget"),
    (["--rungs", "2500"], "eval_every_tokens"),
    (["--gpus_per_trial", "3"], "does not divide over --gpus_per_trial=3"),
    (["--scalings", "cubic"], "choose from sqrt, linear"),
])
def test_bad_input_stops_before_any_trial_starts(tmp_path, capsys, args, message):
    out = tmp_path / "sw"
    base = {"--batch_sizes": "8", "--rungs": "2000,6000", "--budget": "18000", "--out": str(out)}
    base.update(dict(zip(args[::2], args[1::2])))
    result = run_command(sweep.main, ["lr", DEMO, *[x for kv in base.items() for x in kv], "--trainer", FAKE,
                                      f"--eval_every_tokens={EVERY}"], capsys)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not out.exists()


def test_target_trains_each_chosen_config_per_seed_until_the_target(tmp_path, capsys, monkeypatch):
    out = tmp_path / "sw"
    run_sweep(out, capsys, monkeypatch, multipliers="0.5,1", batch_sizes="4,8")
    target = 6.0
    stray = out / "target" / "bs4_seed0"  # a run stopped before its first checkpoint: started afresh
    stray.mkdir(parents=True)
    (stray / "metrics.jsonl").write_text('{"step": 1, "tokens": 64, "val_loss": 9.5}\n')
    result = run_command(sweep.main, ["target", str(out), "--seeds", "2", "--target_val_loss", str(target),
                                      "--trainer", FAKE, "--poll_s", "0.01"], capsys)
    assert result.returncode == 0, result.stderr
    assert '"val_loss": 9.5}' not in (stray / "metrics.jsonl").read_text()
    for bs in (4, 8):
        for seed in (0, 1):
            curve = sweep.val_curve(out / "target" / f"bs{bs}_seed{seed}")
            assert curve[-1][1] <= target and all(loss > target for _, loss in curve[:-1])
    assert result.stdout.count(f"reached {target!r}") == 4
    n = len(launches(out))
    short = run_command(sweep.main, ["target", str(out), "--seeds", "3", "--target_val_loss", "1.0",
                                     "--trainer", FAKE, "--poll_s", "0.01"], capsys)  # below the curves' floor of 3
    assert short.returncode == 0 and short.stdout.count("trained its whole budget without reaching 1.0") == 6
    result = run_command(sweep.main, ["target", str(out), "--seeds", "2", "--target_val_loss", str(target),
                                      "--trainer", FAKE, "--poll_s", "0.01"], capsys)
    assert result.stdout.count("reached 6.0 already") == 4 and len(launches(out)) == n + 6
    assert math.isfinite(target)


def test_the_submitit_path_runs_trials_as_jobs(tmp_path, capsys, monkeypatch):
    """--launcher slurm's code on submitit's local executor (no SLURM here): each segment a job."""
    out = tmp_path / "sw"
    monkeypatch.setenv("FAKE_LAUNCHES", str(out) + ".launches.jsonl")
    result = run_command(sweep.main, ["lr", DEMO, "--batch_sizes", "8", "--multipliers", "1", "--scalings", "sqrt",
                                      "--rungs", "2000", "--budget", "6000", "--out", str(out), "--trainer", FAKE,
                                      "--poll_s", "0.05", "--launcher", "submitit_local",
                                      f"--eval_every_tokens={EVERY}", "--muon_lr=0.05"], capsys)
    assert result.returncode == 0, result.stderr
    assert [(x["start"], x["stop"]) for x in launches(out)] == [(0, 2000), (2000, 6000)]
    assert len(list((out / "submitit").glob("*_result.pkl"))) == 2
    centre = (8 / train_gpt.load_config([DEMO]).lr_ref_batch_size) ** 0.5  # the sqrt centre, multiplier 1
    assert train_gpt.load_config([str(out / "best_bs8.py")]).lr_mult == pytest.approx(centre)
