"""analyze.py stages on synthetic ladders whose verdicts are known by construction: a stage that
only makes tokens cheaper, one that changes the learning, one seed, a stage measured otherwise."""
import csv
import functools
import json
import math
import os
import pathlib
import tempfile

import numpy as np
import pytest

import analyze
import spectra
from test_analyze import MATS, POINTS, curve, hand_tokens_to_target, make_records, trainer_config, write_run

TIERS = (8, 16)
SEEDS = (0, 1, 2)
TARGET = 5.0
GRID = list(range(0, 16385, 1024))
# per stage: tokens to TARGET at batch 8 (batch 16 needs 1.25x), training throughput, spectrum exponent
BASE = dict(tokens=6000.0, tps=1000.0, alpha=1.0)
FASTER = dict(tokens=6000.0, tps=2000.0, alpha=1.0)   # execution-side: same learning, tokens twice as cheap
LEARNS = dict(tokens=3600.0, tps=2000.0, alpha=1.4)   # learning-side: 0.6x the tokens, the head moved
NOISE = {0: -0.02, 1: 0.0, 2: 0.025}                  # seed-to-seed variation of tokens, throughput, alpha


def power_law(alpha, n=64):
    return np.arange(1, n + 1, dtype=float) ** -alpha


@functools.lru_cache
def tier_config(bs):
    """config.json of a tiny trainer run at batch bs (as JSON text: each run edits its own copy)."""
    return json.dumps(trainer_config(pathlib.Path(tempfile.gettempdir()), "run", batch_size=bs, device_batch_size=bs))


def write_stage_run(root, stage, spec, bs, seed, alpha_drift=0.0, name=None):
    """A run of `stage` at batch bs: its loss reaches TARGET at spec's tokens (seed-perturbed), its
    throughput is spec's, its saved spectra follow spec's alpha (seed-perturbed, drifting with tokens)."""
    noise = NOISE[seed]
    t_target = spec["tokens"] * (1.25 if bs == 16 else 1.0) * (1 + noise)
    records = make_records(bs * 64, GRID, curve(t_target), {})
    for r in records:
        if "tokens_per_s" in r:
            r["tokens_per_s"] = spec["tps"] * (1 - noise)
    config = json.loads(tier_config(bs))
    config["config"].update(stage=stage, seed=seed, run_name=f"{stage}_bs{bs}_s{seed}")
    path = write_run(root / stage, name or f"bs{bs}_seed{seed}", records, config)
    for t in GRID:
        values = power_law(spec["alpha"] + 0.02 * noise + alpha_drift * t / 1e4)
        spectra.save_spectra(spectra.spectra_path(path, "act", t),
                             {p: dict(values=values, limit=63, n=512, width=64) for p in POINTS},
                             dict(step=0, tokens=t, probe_tokens=512, seq_len=32))
    return path


def make_ladder(root, stages, seeds=SEEDS):
    for stage, spec in stages.items():
        for bs in TIERS:
            for seed in seeds:
                write_stage_run(root, stage, spec, bs, seed)
    return str(root)


def hand_ratio(root, a, b):
    """exp(mean over tiers of the difference of mean log tokens to TARGET), from the metrics files."""
    def mean_log(stage, bs):
        return np.mean([math.log(hand_tokens_to_target(analyze.load_run(os.path.join(root, stage, f"bs{bs}_seed{s}"))
                                                       .records, TARGET)) for s in SEEDS])
    return math.exp(np.mean([mean_log(b, bs) - mean_log(a, bs) for bs in TIERS]))


def run_stages(root, capsys, *extra):
    out = os.path.join(str(root), "report")
    analyze.main(["stages", str(root), "--out", out, *extra])
    text = capsys.readouterr().out
    with open(os.path.join(out, "stages.csv")) as f:
        rows = {r["stage"]: r for r in csv.DictReader(f)}
    return rows, text, out


def test_a_stage_that_only_speeds_up_is_execution_side_and_one_that_learns_is_learning_side(tmp_path, capsys):
    root = make_ladder(tmp_path, {"03_base": BASE, "04_faster": FASTER, "05_learns": LEARNS})
    rows, text, out = run_stages(tmp_path, capsys, "--loss", str(TARGET))
    faster, learns = rows["04_faster"], rows["05_learns"]
    assert faster["verdict"] == "execution-side" and learns["verdict"] == "learning-side"
    # tokens: identical curves -> ratio 1; about 0.6 by construction, exactly the hand computation
    assert float(faster["token_ratio"]) == 1.0
    assert float(learns["token_ratio"]) == pytest.approx(hand_ratio(root, "04_faster", "05_learns"), rel=1e-9)
    assert float(learns["token_ratio"]) == pytest.approx(0.6, rel=0.02)
    assert float(faster["time_ratio"]) == pytest.approx(0.5, rel=2e-3)  # half the seconds per token
    assert float(learns["per_token_ratio"]) == pytest.approx(1.0, abs=1e-3)
    assert faster["head_moved"] == "0/4" and learns["head_moved"] == "4/4"
    # the seed spread: the pooled sd of log tokens over seeds, by hand
    logs = [math.log(1 + n) for n in NOISE.values()]
    sd = math.sqrt(sum((v - np.mean(logs)) ** 2 for v in logs) / 2)
    assert float(learns["token_spread"]) == pytest.approx(math.exp(sd), rel=1e-3)
    assert "rule: at matched val_loss" in text and "learning-side: tokens to target lower" in text
    assert os.path.exists(os.path.join(out, "stages.png")) and os.path.exists(os.path.join(out, "stages_layers.csv"))


def test_matched_loss_and_the_spectra_there_are_interpolated_between_evaluations(tmp_path):
    path = write_stage_run(tmp_path, "03_base", BASE, 8, 2, alpha_drift=0.5)
    run = analyze.load_run(path)
    sr = analyze.stage_run(run, "03_base", TARGET, MATS)
    t = hand_tokens_to_target(run.records, TARGET)
    assert sr.tokens == pytest.approx(t, rel=1e-12) and sr.seconds == pytest.approx(t / (1000 * 0.975))
    t0, t1 = max(g for g in GRID if g <= t), min(g for g in GRID if g >= t)
    w = (t - t0) / (t1 - t0)
    p0, p1 = (power_law(1.0 + 0.02 * 0.025 + 0.5 * x / 1e4) for x in (t0, t1))
    hand = (1 - w) * p0 / p0.sum() + w * p1 / p1.sum()
    np.testing.assert_allclose(sr.spectra["L01.mlp_resid"], hand, rtol=1e-12)


def hand_js(u, v):
    p, q = u / u.sum(), v / v.sum()
    m = (p + q) / 2
    return 0.5 * (p * np.log2(p / m)).sum() + 0.5 * (q * np.log2(q / m)).sum()


def test_the_noise_floor_is_the_largest_divergence_between_seeds_of_one_stage_and_tier(tmp_path):
    runs = [analyze.stage_run(analyze.load_run(write_stage_run(tmp_path, "03_base", BASE, bs, s)), "03_base",
                              TARGET, []) for bs in TIERS for s in SEEDS]
    by_hand = max(hand_js(a.spectra["final"], b.spectra["final"]) for a in runs for b in runs
                  if a.tier == b.tier and a.seed < b.seed)
    assert analyze.js_floor(runs, "final") == pytest.approx(by_hand, rel=1e-9) and by_hand > 0
    assert math.isnan(analyze.js_floor(runs[:1], "final"))  # one seed: no floor


def test_one_seed_withholds_the_verdict_and_the_rest_of_the_report_is_made(tmp_path, capsys):
    make_ladder(tmp_path, {"03_base": BASE, "04_learns": LEARNS}, seeds=(0,))
    rows, text, _ = run_stages(tmp_path, capsys, "--loss", str(TARGET))
    assert rows["04_learns"]["verdict"] == "withheld" and "no seed spread" in rows["04_learns"]["reason"]
    assert float(rows["04_learns"]["token_ratio"]) == pytest.approx(0.6, rel=0.02)
    assert "03_base has one seed per tier" in text


def test_a_gap_in_the_ladder_runs_that_miss_the_loss_and_runs_without_a_stage_are_named(tmp_path, capsys):
    make_ladder(tmp_path, {"03_base": BASE, "06_learns": LEARNS})
    slow = dict(BASE, tokens=30000.0)  # never reaches TARGET within GRID
    write_stage_run(tmp_path, "06_learns", slow, 8, 1, name="slow")
    rows, text, _ = run_stages(tmp_path, capsys, "--loss", str(TARGET))
    assert "06_learns is compared with 03_base: stages 04-05 are not in these runs" in text
    assert rows["06_learns"]["verdict"] == "both"  # fewer tokens, the head moved, and twice the throughput
    assert "06_learns: slow never reached val_loss 5; left out" in text
    nostage = trainer_config(tmp_path, "nostage", batch_size=8, device_batch_size=8)
    write_run(tmp_path / "other", "nostage", make_records(512, GRID, curve(5000.0), {}), nostage)
    rows, text, _ = run_stages(tmp_path, capsys, "--loss", str(TARGET))
    assert "nostage: no stage recorded (config key `stage`); left out" in text
    with pytest.raises(SystemExit) as e:
        analyze.main(["stages", str(tmp_path / "03_base"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "a ladder needs runs of two stages or more" in capsys.readouterr().err


def test_stages_measured_on_different_probe_sets_compare_tokens_but_not_spectra(tmp_path, capsys):
    make_ladder(tmp_path, {"03_base": BASE})
    for bs in TIERS:
        for seed in SEEDS:
            path = write_stage_run(tmp_path, "04_learns", LEARNS, bs, seed)
            with open(os.path.join(path, "config.json")) as f:
                config = json.load(f)
            config["config"]["spectra_tokens"] = 1024
            with open(os.path.join(path, "config.json"), "w") as f:
                json.dump(config, f)
    rows, text, _ = run_stages(tmp_path, capsys, "--loss", str(TARGET))
    assert "measured differently (probe set: spectra_tokens" in text
    assert rows["04_learns"]["verdict"] == "withheld" and rows["04_learns"]["js"] == ""
    assert float(rows["04_learns"]["token_ratio"]) == pytest.approx(hand_ratio(tmp_path, "03_base", "04_learns"))


# ----------------------------------------------------------------------------------------------
# forecast validation across stages

A_VALUES = [0.5, 0.6, 0.7, 0.8]  # early alpha of a stage's four batch tiers: tokens to target grow with it


def make_forecast_ladder(root, order):
    """Three stages of four tiers each; the predictor KEY of the run with t_target(a) is
    A_VALUES[order[i]] (order = identity: a planted monotone relation). Every other predictor is
    the same in every run."""
    from test_analyze import KEY, t_target
    for k, stage in enumerate(("03_a", "04_b", "05_c")):
        for i, a in enumerate(A_VALUES):
            bs = (4, 8, 16, 32)[i]
            t = t_target(a) * (1 + 0.3 * k)  # stages differ in speed, not in how the tiers rank
            records = make_records(bs * 32, list(range(0, 16385, 512)), curve(t), {KEY: A_VALUES[order[i]]})
            config = json.loads(tier_config(8))
            config["config"].update(stage=stage, batch_size=bs, run_name=f"{stage}_bs{bs}")
            write_run(root / stage, f"bs{bs}", records, config)


def test_forecast_validation_recovers_a_planted_monotone_relation(tmp_path, capsys):
    from test_analyze import KEY
    make_forecast_ladder(tmp_path, [0, 1, 2, 3])
    analyze.main(["forecast", str(tmp_path), "--target-loss", str(TARGET), "--at-tokens", "1024",
                  "--out", str(tmp_path / "f")])
    text = capsys.readouterr().out
    runs = analyze.load_runs([str(tmp_path)])
    best = analyze.validate_predictors(runs, TARGET, 1024)[0]
    assert best.predictor == KEY and best.spearman == {"03_a": 1.0, "04_b": 1.0, "05_c": 1.0}
    assert best.mean_spearman == 1.0 and best.spearman_sd == 0.0
    # leave one stage out, by hand: the line through the other stages' (a, ratio) points
    ratios = analyze.token_ratios(runs, TARGET)
    xs = {r.name: analyze.value_at(r.records, KEY, 1024) for r in runs}
    errors, constant = [], []
    for stage in ("03_a", "04_b", "05_c"):
        rest = [r.name for r in runs if analyze.setting(r.record, "stage") != stage]
        slope, intercept = np.polyfit([xs[n] for n in rest], [ratios[n][1] for n in rest], 1)
        mine = [r.name for r in runs if analyze.setting(r.record, "stage") == stage]
        errors += [abs(slope * xs[n] + intercept - ratios[n][1]) for n in mine]
        constant += [abs(np.mean([ratios[n][1] for n in rest]) - ratios[n][1]) for n in mine]
    assert best.loso_error == pytest.approx(np.mean(errors), rel=1e-9)
    assert best.constant_error == pytest.approx(np.mean(constant), rel=1e-9) and best.better_than_constant
    assert f"beats a constant: {KEY} forecasts a stage it was not fitted on" in text
    assert os.path.exists(tmp_path / "f" / "calibration.png") and os.path.exists(tmp_path / "f" / "validation.csv")


def test_forecast_validation_says_plainly_when_nothing_beats_a_constant(tmp_path, capsys):
    make_forecast_ladder(tmp_path, [2, 0, 3, 1])  # the predictor shuffled against the token ratio
    analyze.main(["forecast", str(tmp_path), "--target-loss", str(TARGET), "--at-tokens", "1024",
                  "--out", str(tmp_path / "f")])
    text = capsys.readouterr().out
    assert "NO PREDICTOR FORECASTS BETTER THAN A CONSTANT" in text
    from test_analyze import KEY
    rows = analyze.validate_predictors(analyze.load_runs([str(tmp_path)]), TARGET, 1024)
    assert not any(v.better_than_constant for v in rows)
    shuffled = next(v for v in rows if v.predictor == KEY)
    assert shuffled.loso_error > shuffled.constant_error
    assert shuffled.mean_spearman == 0.0  # ranks 2 0 3 1 against 0 1 2 3


def test_runs_from_wandb_get_the_table_as_a_wandb_table_and_no_head_verdict(tmp_path, capsys, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from test_analyze import FakeApi, FakeWandbRun
    make_ladder(tmp_path / "local", {"03_base": BASE, "04_faster": FASTER, "05_learns": LEARNS})
    local = analyze.load_runs([str(tmp_path / "local")])
    api = FakeApi([FakeWandbRun(r, wrap=False) for r in local])
    logged = []
    monkeypatch.setattr(wandb.Run, "log", lambda run, data, *a, **k: logged.append(data))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    analyze.main(["stages", "--wandb", "me/ladder/g1", "--loss", str(TARGET), "--out", str(tmp_path / "r")], api=api)
    text = capsys.readouterr().out
    (table,) = [d["stages"] for d in logged]
    rows = {row[0]: dict(zip(table.columns, row)) for row in table.data}
    assert list(table.columns) == list(analyze.STAGE_COLUMNS) and set(rows) == {"04_faster", "05_learns"}
    assert rows["04_faster"]["verdict"] == "execution-side"  # tokens and time need no spectra
    assert rows["05_learns"]["verdict"] == "withheld" and "no saved activation spectra" in rows["05_learns"]["reason"]
    assert "W&B table 'stages' in me/ladder/g1" in text
