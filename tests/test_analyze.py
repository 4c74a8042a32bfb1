"""analyze.py: loading runs, the compare and forecast commands, and the forecasting core, on run
directories written here in exactly the trainer's format (config.json built from train_gpt's own
Config, metrics.jsonl lines as MetricsLog writes them) and on two real tiny runs."""

import csv
import json
import math
import os
import warnings
from dataclasses import asdict

import numpy as np
import pytest

import analyze
import rundir
import spectra
import train_gpt
from conftest import tiny_args

POINTS = ["embed", "L00.mlp_resid", "L01.mlp_resid", "final"]  # the trainer's default points for 2 layers
MATS = ["L00.attn.c_proj", "L01.attn.c_proj"]                    # its default gradient matrices
KEY = "act/alpha_tail/L01.mlp_resid"                             # the predictor the synthetic sweep is built on
DRIFT = 1e-5                                                     # every spectral value moves by DRIFT per token
ZIG = [0.3, -0.3, 0.2, -0.2, 0.0, 0.1, -0.1]                     # non-monotone in run order: no ranking power
TARGET = 5.0


def trainer_config(tmp_path, name, **overrides):
    """config.json as train_gpt.train writes it, for the tiny settings of conftest plus overrides."""
    cfg = train_gpt.load_config(tiny_args(tmp_path, run_name=name, **overrides))
    gcfg = train_gpt.model_config(cfg)
    derived = dict(world_size=1, grad_accum=1, tokens_per_step=cfg.batch_size * cfg.seq_len)
    return json.loads(json.dumps(dict(config=asdict(cfg), model=asdict(gcfg), derived=derived,
                                      git={"commit": None, "dirty": None}, versions={}, device="cpu",
                                      wandb_id="0000")))


def spectral(family, points, t, base):
    """Every scalar the trainer logs for one family at tokens t: predictor stats from `base`
    ({key: value at 0 tokens}, default 0.5) plus DRIFT * t; gradient tail fits are null (8 samples
    give no rank 30), as in a real tiny run."""
    out = {}
    for p in points:
        for stat in spectra.STATS:
            key = f"{family}/{stat}/{p}"
            if family == "grad" and "tail" in stat:
                out[key] = None
            elif stat == "valid_rank":
                out[key] = 63
            else:
                out[key] = base.get(key, 0.5) + DRIFT * t
    if family == "grad":
        out.update({f"grad/noise_scale/{m}": 3.0 for m in points})
    return out


def make_records(tokens_per_step, eval_tokens, loss, base):
    """metrics.jsonl records: a train line and an eval line per evaluation (train_loss deliberately
    below val_loss, so using it by mistake shows); gradient and weight spectra at every other one."""
    records = []
    for k, t in enumerate(eval_tokens):
        step = t // tokens_per_step
        if step:
            records.append(dict(step=step, tokens=t, train_loss=loss(t) - 1.0, lr=0.01, tokens_per_s=1e3,
                                elapsed_s=float(step)))
        rec = dict(step=step, tokens=t, val_loss=loss(t), **spectral("act", POINTS, t, base))
        if k % 2 == 0:
            rec.update(spectral("grad", MATS, t, base))
            rec.update(spectral("weight", MATS, t, {}))
        rec["elapsed_s"] = float(step)
        records.append(rec)
    return records


def write_run(root, name, records, config):
    path = root / name
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def curve(t_target):
    """A val_loss curve that reaches TARGET at t_target tokens, decreasing and curved."""
    return lambda t: 4.0 + (t_target + 1000.0) / (t + 1000.0)


def sweep_base(i, a):
    """Spectral values of run i: the chosen predictor `a`; every other predictor zig-zags over runs."""
    z = ZIG[i]
    base = {KEY: a, "act/alpha_tail/L00.mlp_resid": 1.0 + z, "act/alpha_tail/embed": 2.0 - z,
            "act/alpha_tail/final": 1.5 + z}
    for p in POINTS:
        base[f"act/alpha_head/{p}"] = 1.0 + 0.5 * z
        base[f"act/rankme/{p}"] = 10.0 - 3 * z
    for m in MATS:
        base[f"grad/alpha_head/{m}"] = 0.7 + z
        base[f"grad/rankme/{m}"] = 5.0 + 3 * z
    return base


REACHED = [0.5, 0.6, 0.7, 0.8, 0.9]  # early alpha of the runs that reach TARGET ...
PENDING = [0.65, 0.85]                # ... and of two that have not yet
GRID = list(range(0, 8193, 1024))


def t_target(a):
    return 3000.0 * math.exp(2 * (a - 0.5))  # more tokens for a larger early alpha, not linearly


def make_sweep(tmp_path):
    """Seven runs of one family (batch sizes 4..32), the last two stopped before reaching TARGET."""
    paths = []
    for i, a in enumerate(REACHED + PENDING):
        bs = (4, 8, 16, 32)[i % 4]
        grid = GRID if a in REACHED else [t for t in GRID if t < t_target(a) - 500]
        records = make_records(bs * 32, grid, curve(t_target(a)), sweep_base(i, a))
        paths.append(write_run(tmp_path / "sweep", f"run{i}_bs{bs}", records,
                               trainer_config(tmp_path, f"run{i}", batch_size=bs, device_batch_size=bs)))
    return paths


def hand_tokens_to_target(records, target):
    evals = [(r["tokens"], r["val_loss"]) for r in records if "val_loss" in r]
    for (t0, l0), (t1, l1) in zip(evals, evals[1:]):
        if l1 <= target < l0:
            return float(np.interp(target, [l1, l0], [t1, t0]))
    return None


def hand_loo(x, y):
    x, y = np.asarray(x), np.asarray(y)
    preds = [np.polyval(np.polyfit(np.delete(x, i), np.delete(y, i), 1), x[i]) for i in range(len(x))]
    return np.array(preds), float(np.mean(np.abs(np.array(preds) - y)))


# ----------------------------------------------------------------------------------------------
# the forecasting core


def test_spearman_with_ties_against_a_hand_computation():
    x = [3.0, 1.0, 2.0, 2.0, 5.0, 5.0, 5.0]
    y = [1.0, 4.0, 4.0, 2.0, 0.5, 3.0, 0.5]
    rx = [4, 1, 2.5, 2.5, 6, 6, 6]            # average ranks written out by hand
    ry = [3, 6.5, 6.5, 4, 1.5, 5, 1.5]
    assert analyze.average_ranks(x) == rx and analyze.average_ranks(y) == ry
    assert analyze.spearman(x, y) == pytest.approx(np.corrcoef(rx, ry)[0, 1], abs=1e-12)
    assert analyze.spearman([1, 2, 2, 3], [10, 20, 20, 30]) == pytest.approx(1.0)
    assert analyze.spearman([1, 2, 3], [9, 4, 1]) == pytest.approx(-1.0)
    assert math.isnan(analyze.spearman([1, 1, 1], [1, 2, 3]))


def test_fit_line_and_leave_one_out_match_numpy_polyfit():
    rng = np.random.default_rng(0)
    x, y = list(rng.normal(size=6)), list(rng.normal(size=6))
    assert analyze.fit_line(x, y) == pytest.approx(tuple(np.polyfit(x, y, 1)), abs=1e-12)
    preds, mae = hand_loo(x, y)
    assert analyze.loo_predictions(x, y) == pytest.approx(list(preds), abs=1e-12)
    assert analyze.loo_error(x, y) == pytest.approx(mae, abs=1e-12)
    assert math.isnan(analyze.loo_error(x[:2], y[:2]))


def test_ranking_prefers_the_larger_absolute_spearman_then_the_lower_loo_error():
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    decaying = analyze.predictor_row("decaying", list("abcde"), x, [100.0, 10.0, 1.0, 0.1, 0.01], 5)  # rho -1
    swapped = analyze.predictor_row("swapped", list("abcde"), [1.0, 2.0, 4.0, 3.0, 5.0], x, 5)        # rho 0.9
    straight = analyze.predictor_row("straight", list("abcde"), x, [2.0, 4.1, 5.9, 8.0, 10.0], 5)   # rho 1
    few = analyze.predictor_row("few", list("ab"), x[:2], x[:2], 5)                                # not in all runs
    assert decaying.spearman == pytest.approx(-1) and swapped.spearman == pytest.approx(0.9)
    assert decaying.loo_error > swapped.loo_error > straight.loo_error
    assert not few.eligible
    order = sorted([few, swapped, decaying, straight], key=analyze.ranking_key)
    assert [r.predictor for r in order] == ["straight", "decaying", "swapped", "few"]


def test_tokens_to_target_interpolates_between_the_bracketing_evaluations():
    evals = [(0, 10.0), (1000, 8.0), (2000, 6.0), (3000, 6.5), (4000, 5.5)]
    records = []
    for t, loss in evals:
        records.append(dict(step=t // 100, tokens=t, train_loss=3.0))  # train losses never count
        records.append(dict(step=t // 100, tokens=t, val_loss=loss))
    assert analyze.tokens_to_target(records, 7.0) == pytest.approx(1000 + 1000 * (8.0 - 7.0) / (8.0 - 6.0))
    assert analyze.tokens_to_target(records, 6.0) == pytest.approx(2000.0)   # an evaluation exactly at target
    assert analyze.tokens_to_target(records, 5.8) == pytest.approx(3000 + 1000 * (6.5 - 5.8) / (6.5 - 5.5))
    assert analyze.tokens_to_target(records, 10.5) == 0.0
    assert analyze.tokens_to_target(records, 5.0) is None


def test_values_at_tokens_interpolate_and_are_missing_beyond_the_last_evaluation():
    records = [dict(tokens=0, val_loss=9.0, **{KEY: None}), dict(tokens=100, val_loss=8.0, **{KEY: 1.0}),
               dict(tokens=300, val_loss=6.0, **{KEY: 2.0}), dict(tokens=300, train_loss=1.0)]
    assert analyze.value_at(records, KEY, 150) == pytest.approx(1.25)
    assert analyze.value_at(records, KEY, 300) == 2.0
    assert analyze.value_at(records, KEY, 50) is None      # null at 0 tokens: nothing to interpolate from
    assert analyze.value_at(records, KEY, 301) is None     # not measured yet


def test_predictor_values_layer_means_and_act_minus_grad_gaps():
    base = {"act/alpha_tail/L00.mlp_resid": 1.0, KEY: 2.0, "grad/alpha_head/L00.attn.c_proj": 0.3,
            "grad/alpha_head/L01.attn.c_proj": 0.9, "act/alpha_head/L00.mlp_resid": 0.8,
            "act/alpha_head/L01.mlp_resid": 1.1}
    records = make_records(128, [0, 1024, 2048], curve(3000), base)
    v = analyze.predictor_values(records, 512)
    d = DRIFT * 512
    assert v[KEY] == pytest.approx(2.0 + d)
    assert v["act/alpha_tail/mean.mlp_resid"] == pytest.approx(1.5 + d)
    # default points: the gap of a layer pairs grad L.attn.c_proj with act L.mlp_resid
    assert v["gap/alpha_head/L00.attn.c_proj"] == pytest.approx(0.8 - 0.3)
    assert v["gap/alpha_head/mean.attn.c_proj"] == pytest.approx((0.5 + 0.2) / 2)
    assert "grad/alpha_tail/L00.attn.c_proj" not in v and "gap/alpha_tail/L00.attn.c_proj" not in v  # null tails
    assert v["loss/val_loss"] == pytest.approx((curve(3000)(0) + curve(3000)(1024)) / 2)
    assert analyze.predictor_values(records, 4096) == {}


def test_token_ratio_is_relative_to_the_best_run_of_the_same_family(tmp_path):
    runs = []
    for name, seed, t in (("a", 1, 2000.0), ("b", 1, 3000.0), ("c", 2, 4000.0), ("d", 2, 5000.0), ("e", 2, 9e9)):
        records = make_records(128, GRID, curve(t), {})
        runs.append(analyze.Run(name, trainer_config(tmp_path, name, seed=seed), records))
    ratios = analyze.token_ratios(runs, TARGET)
    tokens = {r.name: hand_tokens_to_target(r.records, TARGET) for r in runs}
    assert ratios["a"] == (tokens["a"], 1.0) and ratios["c"] == (tokens["c"], 1.0)
    assert ratios["b"][1] == pytest.approx(tokens["b"] / tokens["a"])
    assert ratios["d"][1] == pytest.approx(tokens["d"] / tokens["c"])
    assert ratios["e"] == (None, None)


# ----------------------------------------------------------------------------------------------
# forecast


def test_forecast_recovers_the_ranking_and_the_leave_one_out_predictions(tmp_path, capsys):
    paths = make_sweep(tmp_path)
    runs = analyze.load_runs(paths)
    at = 2500  # between the evaluations at 2048 and 3072
    rows = analyze.rank_predictors(runs, TARGET, at)
    best = rows[0]
    assert best.predictor == KEY and best.eligible and best.n == len(REACHED)
    assert best.spearman == pytest.approx(1.0)
    x = [a + DRIFT * at for a in REACHED]
    tokens = [hand_tokens_to_target(r.records, TARGET) for r in runs[:len(REACHED)]]
    y = [t / min(tokens) for t in tokens]
    assert best.x == pytest.approx(x, abs=1e-12) and best.y == pytest.approx(y, abs=1e-12)
    preds, mae = hand_loo(x, y)
    assert best.loo_error == pytest.approx(mae, abs=1e-12) and mae > 1e-3  # curved: the line is not exact
    assert rows[1].spearman < 1 - 1e-9 or rows[1].loo_error > mae  # the runner-up is worse
    baseline = next(r for r in rows if r.predictor == analyze.BASELINE)
    assert not baseline.eligible

    # the command: table, CSV, scatter; pending runs marked and forecast from the reached ones
    out = tmp_path / "out"
    analyze.main(["forecast", str(tmp_path / "sweep"), "--target-loss", "5", "--at-tokens", "2.5k", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "NOT YET" in printed and f"best predictor: {KEY}" in printed
    with pytest.warns(analyze.AnalysisWarning, match=r"--at-tokens 1,000,000,000 is past every run's last"):
        assert analyze.forecast_command(runs, 5.0, 1e9, str(tmp_path / "late"))[2] is None
    with open(out / "forecast.csv") as f:
        table = {row["run"]: row for row in csv.DictReader(f)}
    assert set(table) == {r.name for r in runs}
    slope, intercept = np.polyfit(x, y, 1)
    for run, a in zip(runs, REACHED + PENDING):
        row = table[run.name]
        assert row["predictor"] == KEY and float(row["loo_error"]) == pytest.approx(mae)
        if a in PENDING:
            assert row["reached"] == "False" and row["tokens_to_target"] == ""
            expected = slope * (a + DRIFT * at) + intercept
            assert float(row["forecast_ratio"]) == pytest.approx(expected, rel=1e-9)
            assert float(row["forecast_tokens"]) == pytest.approx(expected * min(tokens), rel=1e-9)
            assert analyze.forecast_ratio(runs[:len(REACHED)], TARGET, run.records, at) == \
                (pytest.approx(expected, rel=1e-9), KEY)
        else:
            i = REACHED.index(a)
            assert float(row["token_ratio"]) == pytest.approx(y[i])
            assert float(row["forecast_ratio"]) == pytest.approx(preds[i], rel=1e-9)
    assert (out / "forecast.png").stat().st_size > 1000
    with open(out / "predictors.csv") as f:
        assert next(csv.DictReader(f))["predictor"] == KEY
    # a run that has not reached at_tokens yet gets no forecast
    assert analyze.forecast_ratio(runs, TARGET, runs[0].records[:3], at) == (None, None)


def test_mixed_probe_sets_are_an_error_unless_allowed(tmp_path, capsys):
    base = dict(batch_size=4, device_batch_size=4)
    a = write_run(tmp_path, "a", make_records(128, GRID, curve(3000), {}), trainer_config(tmp_path, "a", **base))
    b = write_run(tmp_path, "b", make_records(128, GRID, curve(4000), {}),
                  trainer_config(tmp_path, "b", spectra_tokens=1024, spectra_tail="10,100", **base))
    c = write_run(tmp_path, "c", make_records(128, GRID, curve(5000), {}), trainer_config(tmp_path, "c", **base))
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit) as e:
        analyze.main(["compare", a, b, c, "--out", out])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "spectra_tokens = 512 in a, c; 1024 in b" in err and "spectra_tail" in err and "--allow-mixed" in err
    assert "spectra_head" not in err and not os.path.exists(out)
    analyze.main(["compare", a, b, c, "--out", out, "--allow-mixed"])
    captured = capsys.readouterr()
    assert "warning: the runs were not measured alike" in captured.err and "spectra_tokens" in captured.err
    assert os.path.exists(os.path.join(out, "alpha_layer.png"))
    d = write_run(tmp_path, "d", make_records(128, GRID, curve(5000), {}),
                  trainer_config(tmp_path, "d", n_embd=128, **base))
    with pytest.raises(analyze.MixedRunsError, match=r"model profile: n_embd = 64 in a; 128 in d"):
        analyze.check_comparable(analyze.load_runs([a, d]))
    # gradient spectra from bf16 passes are approximate: not mixed silently with exact ones; a run
    # from before the setting existed measured in fp32
    e = write_run(tmp_path, "e", make_records(128, GRID, curve(5000), {}),
                  trainer_config(tmp_path, "e", grad_spectra_precision="bf16", **base))
    with pytest.raises(analyze.MixedRunsError, match=r"gradient precision: grad_spectra_precision = 'fp32' in a; "
                                                     r"'bf16' in e"):
        analyze.check_comparable(analyze.load_runs([a, e]))
    old_cfg = trainer_config(tmp_path, "old", **base)
    del old_cfg["config"]["grad_spectra_precision"]
    old = write_run(tmp_path, "old", make_records(128, GRID, curve(5000), {}), old_cfg)
    analyze.check_comparable(analyze.load_runs([a, old]))
    # raw residual spectra are not RMS-normalised ones; a run from before the setting normalised
    raw = write_run(tmp_path, "raw", make_records(128, GRID, curve(5000), {}),
                    trainer_config(tmp_path, "raw", spectra_act_norm="none", **base))
    with pytest.raises(analyze.MixedRunsError, match=r"probe set: spectra_act_norm = 'rms' in a; 'none' in raw"):
        analyze.check_comparable(analyze.load_runs([a, raw]))
    del old_cfg["config"]["spectra_act_norm"]
    older = write_run(tmp_path, "older", make_records(128, GRID, curve(5000), {}), old_cfg)
    analyze.check_comparable(analyze.load_runs([a, older]))


def test_truncated_and_empty_metrics_and_paths_that_are_not_runs(tmp_path, capsys):
    cfg = trainer_config(tmp_path, "x")
    records = make_records(128, GRID[:4], curve(3000), {})
    path = write_run(tmp_path, "crashed", records, cfg)
    metrics = os.path.join(path, "metrics.jsonl")
    with open(metrics, "a") as f:
        f.write(json.dumps(records[0])[:40])  # the crash cut the last line mid-JSON
    n_lines = len(records) + 1
    with pytest.warns(analyze.AnalysisWarning, match=f"metrics.jsonl: line {n_lines} is cut short"):
        run = analyze.load_run(path)
    assert run.truncated and run.records == records
    empty = write_run(tmp_path, "empty", [], cfg)
    with pytest.warns(analyze.AnalysisWarning, match="is empty"):
        assert analyze.load_run(empty).records == []
    with pytest.raises(analyze.AnalysisError, match="nowhere: no such run directory"):
        analyze.load_run(str(tmp_path / "nowhere"))
    (tmp_path / "lonely").mkdir()
    (tmp_path / "lonely" / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        analyze.main(["forecast", str(tmp_path / "lonely"), "--target-loss", "5", "--at-tokens", "0",
                      "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "lonely is not a run directory" in capsys.readouterr().err
    listed = write_run(tmp_path, "listed", records, [cfg])
    with pytest.raises(analyze.AnalysisError, match=r"listed.config.json: expected a JSON object .* found a list"):
        analyze.load_run(listed)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as e:
        analyze.main(["compare", path, "--out", str(tmp_path / "a_file")])
    assert e.value.code == 2 and "a_file is a file; give a directory" in capsys.readouterr().err
    # the command uses the complete lines of the crashed run, says so, and leaves the empty one out
    analyze.main(["compare", path, empty, write_run(tmp_path, "ok", records, cfg), "--out", str(tmp_path / "o")])
    captured = capsys.readouterr()
    assert f"{metrics}: line {n_lines}" in captured.err and "empty: no evaluation" in captured.err
    assert "crashed" in captured.out


def test_a_folder_of_runs_expands_and_names_stay_unique(tmp_path):
    cfg, records = trainer_config(tmp_path, "x"), make_records(128, GRID[:3], curve(3000), {})
    for sweep in ("s1", "s2"):
        for name in ("a", "b"):
            write_run(tmp_path / sweep, name, records, cfg)
    (tmp_path / "s1" / "notes").mkdir()  # not a run: ignored inside a folder of runs
    runs = analyze.load_runs([str(tmp_path / "s1"), str(tmp_path / "s2" / "a")])
    assert [r.name for r in runs] == ["a@s1", "b", "a@s2"] and runs[1].path == str(tmp_path / "s1" / "b")
    with pytest.raises(analyze.AnalysisError, match="notes is not a run directory .* holds none"):
        analyze.load_runs([str(tmp_path / "s1" / "notes")])


# ----------------------------------------------------------------------------------------------
# W&B


class FakeWandbRun:
    def __init__(self, run, wrap):
        self.name, self.id = run.name, "id-" + run.name
        config = rundir.as_dict(run.record)  # what the trainer sends to wandb.init
        self.config = {k: {"value": v, "desc": None} for k, v in config.items()} if wrap else config
        self.rows = [dict(r, _step=i, _runtime=1.0, _timestamp=1.7e9) for i, r in enumerate(run.records)]

    def scan_history(self):
        return iter(self.rows)


class FakeApi:
    def __init__(self, runs=(), error=None):
        self.wandb_runs, self.error, self.calls = list(runs), error, []

    def runs(self, path, filters=None):
        self.calls.append((path, filters))
        if self.error:
            raise self.error
        return self.wandb_runs


def test_wandb_loader_gives_the_same_runs_as_the_directories(tmp_path, capsys):
    local = analyze.load_runs(make_sweep(tmp_path))
    api = FakeApi([FakeWandbRun(r, wrap=i % 2 == 1) for i, r in enumerate(local)])
    remote = analyze.load_wandb_runs("me/spectral-nanogpt/sweep1", api)
    assert api.calls == [("me/spectral-nanogpt", {"group": "sweep1"})]
    for a, b in zip(local, remote):
        assert (b.name, b.record, b.records, b.truncated) == (a.name, a.record, a.records, False)
    assert [r.predictor for r in analyze.rank_predictors(remote, TARGET, 2500)][:3] == \
        [r.predictor for r in analyze.rank_predictors(local, TARGET, 2500)][:3]
    analyze.main(["forecast", "--wandb", "me/spectral-nanogpt", "--target-loss", "5", "--at-tokens", "2500",
                  "--out", str(tmp_path / "o")], api=api)
    assert api.calls[-1] == ("me/spectral-nanogpt", None) and f"best predictor: {KEY}" in capsys.readouterr().out

    down = FakeApi(error=ConnectionError("api.wandb.ai unreachable"))
    with pytest.raises(analyze.WandbError, match="'me/proj' cannot be reached.*unreachable"):
        analyze.load_wandb_runs("me/proj", down)
    with pytest.raises(SystemExit) as e:
        analyze.main(["compare", "--wandb", "me/proj", "--out", str(tmp_path / "o")], api=down)
    assert e.value.code == 2 and "cannot be reached" in capsys.readouterr().err
    analyze.main(["compare", str(tmp_path / "sweep"), "--wandb", "me/proj", "--out", str(tmp_path / "o")], api=down)
    captured = capsys.readouterr()
    assert "cannot be reached" in captured.err and "going on with the 7 local run(s)" in captured.err
    assert "run0_bs4" in captured.out
    with pytest.raises(analyze.AnalysisError, match="ENTITY/PROJECT"):
        analyze.parse_wandb_path("just-a-project")


# ----------------------------------------------------------------------------------------------
# compare


def save_power_law_spectra(run_dir, tokens, alpha):
    values = np.arange(1, 65, dtype=float) ** -alpha
    spectra.save_spectra(spectra.spectra_path(run_dir, "act", tokens),
                         {p: dict(values=values, limit=63, n=512, width=64) for p in POINTS},
                         dict(step=0, tokens=tokens, probe_tokens=512, seq_len=32))


def test_compare_end_to_end_on_synthetic_runs(tmp_path, capsys):
    # three batch sizes whose evaluations fall on different tokens (first step past each 1024)
    layouts = {"bs4": (128, GRID, 3000.0, 0.6), "bs12": (384, [0, 1152, 2304, 3072, 4224, 5376, 6144, 7296, 8448],
                                                       3500.0, 0.8), "bs8": (256, GRID[:7], 4000.0, 0.7)}
    paths = []
    for name, (tps, grid, t, a) in layouts.items():
        base = {f"act/alpha_tail/{p}": a + 0.1 * k for k, p in enumerate(POINTS)}
        path = write_run(tmp_path / "runs", name, make_records(tps, grid, curve(t), base),
                         trainer_config(tmp_path, name, batch_size=tps // 32, device_batch_size=tps // 32))
        for tokens in grid:
            save_power_law_spectra(path, tokens, a)
        paths.append(path)
    out = tmp_path / "out"
    analyze.main(["compare", *paths, "--out", str(out), "--layer", "1"])
    printed = capsys.readouterr().out
    for f in ("alpha_layer.png", "alpha_tokens.png", "loss_tokens.png", "spectra_act_L01.png"):
        assert (out / f).stat().st_size > 1000, f
    assert "matched tokens 6,144" in printed  # the largest evaluation all three runs have

    runs = analyze.load_runs(paths)
    by_name = {run.name: run for run in runs}
    result = analyze.compare_command(runs, str(out), layer=1)
    loss = max(curve(t)(grid[-1]) for _, grid, t, _ in layouts.values())  # highest final val_loss: bs8's
    assert result["tokens"] == 6144 and result["loss"] == pytest.approx(loss)
    assert result["points"] == POINTS
    assert [row[0] for row in result["rows"]["loss"]] == ["bs4", "bs8", "bs12"]  # by their numbers
    for row in result["rows"]["loss"]:
        tps, grid, t, a = layouts[row[0]]
        crossing = hand_tokens_to_target(by_name[row[0]].records, loss) if row[0] != "bs8" else grid[-1]
        assert row[1] == pytest.approx(crossing)
        # alphas at the crossing: interpolated in tokens between the evaluations around it
        assert row[3:] == pytest.approx([a + 0.1 * k + DRIFT * crossing for k in range(len(POINTS))])
        assert analyze.fmt(row[4]) in printed
    for row in result["rows"]["tokens"]:
        tps, grid, t, a = layouts[row[0]]
        assert row[1] == 6144 and row[2] == pytest.approx(curve(t)(6144))
    with open(out / "compare.csv") as f:
        assert len(list(csv.DictReader(f))) == 6
    # --tokens: every run at those tokens, its loss and alphas interpolated between the evaluations
    # around them (bs4 and bs8 at 2048 and 3072, bs12 at 2304 and 3072)
    at = analyze.compare_command(runs, str(out), tokens=2200)["rows"]["tokens"]
    for row in at:
        tps, grid, t, a = layouts[row[0]]
        t0 = max(g for g in grid if g <= 2200)
        t1 = min(g for g in grid if g >= 2200)
        w = (2200 - t0) / (t1 - t0)
        assert row[1] == 2200 and row[2] == pytest.approx((1 - w) * curve(t)(t0) + w * curve(t)(t1))
        assert row[3] == pytest.approx(a + DRIFT * 2200)
    with pytest.warns(analyze.AnalysisWarning, match="--tokens 1,000,000,000 is past every run's last evaluation"):
        beyond = analyze.compare_command(runs, str(out), tokens=10 ** 9)["rows"]["tokens"]
    assert [r[1] for r in beyond] == [layouts[r[0]][1][-1] for r in beyond]  # each run's last evaluation
    with pytest.warns(analyze.AnalysisWarning, match=r"every grad/alpha_tail value is null .* try --stat alpha_head"):
        analyze.compare_command(runs, str(out), family="grad")  # 8 samples: no tail fits
    # gradient stable ranks of runs from before and after they were defined from sigma^2
    runs[0].record.metric_version = spectra.METRIC_VERSION
    with pytest.warns(analyze.AnalysisWarning, match=r"grad/stable_rank was defined differently before metric "
                                                     r"version 2"):
        analyze.compare_command(runs, str(out), family="grad", stat="stable_rank")
    for run in runs[1:]:  # version 2: the same stable ranks, another noise estimate
        run.record.metric_version = 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", analyze.AnalysisWarning)
        analyze.compare_command(runs, str(out), family="grad", stat="stable_rank")
    assert not [w for w in caught if "defined differently" in str(w.message)]
    with pytest.warns(analyze.AnalysisWarning, match=r"act/alpha_tail_noise was defined differently before metric "
                                                     r"version 3"):
        analyze.compare_command(runs, str(out), stat="alpha_tail_noise")
    # any logged statistic, not only the forecast's predictors
    pr = analyze.compare_command(runs, str(out), stat="pr")
    assert pr["points"] == POINTS and pr["rows"]["tokens"][0][3] == pytest.approx(0.5 + DRIFT * 6144)


def alpha_records(evaluations):
    """metrics.jsonl records of a run evaluated at {tokens: (val_loss, alpha)}: act alpha_tail of
    every point = alpha (+ 0.1 per point), other act stats constant."""
    records = []
    for t, (loss, alpha) in sorted(evaluations.items()):
        rec = dict(step=t // 128, tokens=t, val_loss=loss, **spectral("act", POINTS, 0, {}))
        rec.update({f"act/alpha_tail/{p}": alpha + 0.1 * k for k, p in enumerate(POINTS)})
        records.append(rec)
    return records


def test_matched_tokens_on_different_grids_is_the_most_every_run_reached_with_values_interpolated(tmp_path, capsys):
    # alphas that are not linear in tokens, so the wrong bracketing evaluations would show
    a = {0: (9.0, 1.0), 10_000: (7.0, 0.9), 20_000: (6.0, 0.7), 30_000: (5.5, 0.2)}
    b = {0: (9.0, 1.1), 12_000: (6.8, 0.8), 25_000: (5.9, 0.6)}
    runs = [analyze.Run(name, trainer_config(tmp_path, name), alpha_records(evals)) for name, evals in
            (("A", a), ("B", b))]
    assert analyze.matched_tokens(runs, "act", "alpha_tail") == 25_000  # B's last; the only shared one is 0
    with pytest.warns(analyze.AnalysisWarning, match="no saved act spectra"):  # runs without files: no overlay
        result = analyze.compare_command(runs, str(tmp_path / "out"))
    rows = {row[0]: row for row in result["rows"]["tokens"]}
    # by hand: 25k is halfway from A's evaluation at 20k to its one at 30k
    assert rows["A"][1] == 25_000 and rows["A"][2] == pytest.approx((6.0 + 5.5) / 2)
    assert rows["A"][3:] == pytest.approx([(0.7 + 0.2) / 2 + 0.1 * k for k in range(len(POINTS))])
    assert rows["B"][1] == 25_000 and rows["B"][2] == 5.9 and rows["B"][3:] == pytest.approx(
        [0.6 + 0.1 * k for k in range(len(POINTS))])
    assert "matched tokens 25,000 (interpolated" in capsys.readouterr().out
    panel = result["figures"]["alpha_layer.png"]["at 25,000 tokens"]
    assert panel["A"][1] == pytest.approx(rows["A"][3:])
    # a run evaluated at 0 tokens only: the runs are compared at initialisation, and it is said
    c = analyze.Run("C", trainer_config(tmp_path, "C"), alpha_records({0: (9.0, 1.2)}))
    assert analyze.matched_tokens(runs + [c], "act", "alpha_tail") == 0
    assert "note: matched tokens 0, the runs at initialisation: C measured act/alpha_tail at 0 tokens only" in \
        capsys.readouterr().out
    assert analyze.matched_tokens(runs, "act", "alpha_tail") == 25_000 and "note" not in capsys.readouterr().out


def test_compare_finds_run_folders_at_any_depth_but_not_inside_runs(tmp_path, capsys):
    cfg, records = trainer_config(tmp_path, "x"), make_records(128, GRID[:3], curve(3000), {})
    root = tmp_path / "runs"
    expected = [write_run(root / "demo_sweep", name, records, cfg) for name in ("bs16", "bs4", "bs8")]
    expected.append(write_run(root / "other" / "deeper", "solo", records, cfg))
    (root / "notes").mkdir()                                                    # not a run, holds none
    write_run(root / "demo_sweep" / "bs4" / "ckpt", "inner", records, cfg)     # inside a run: never searched
    os.symlink("bs8", root / "demo_sweep" / "bs_latest")                       # a link to a run found already
    found = analyze.run_dirs(str(root))
    assert [f for f in found if not f.endswith("bs_latest")] == [expected[1], expected[2], expected[0], expected[3]]
    assert [r.path for r in analyze.load_runs([str(root)])] == [expected[1], expected[2], expected[0], expected[3]]
    analyze.main(["compare", str(root), "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert all(name in printed for name in ("bs4", "bs8", "bs16", "solo")) and "inner" not in printed
    assert "bs_latest" not in printed  # the run behind the link is read once, under its own name
    with pytest.raises(analyze.AnalysisError, match="notes is not a run directory .* holds none"):
        analyze.run_dirs(str(root / "notes"))


def test_runs_are_drawn_in_numeric_order_each_in_one_colour_in_every_figure_of_both_commands(tmp_path, monkeypatch):
    alphas = {4: 0.5, 8: 0.6, 16: 0.7, 32: 0.85}  # bs32 does not reach TARGET within its grid
    for i, (bs, a) in enumerate(alphas.items()):
        grid = GRID if bs < 32 else [t for t in GRID if t < t_target(a) - 500]
        path = write_run(tmp_path / "sweep", f"bs{bs}", make_records(bs * 32, grid, curve(t_target(a)),
                                                                      sweep_base(i, a)),
                         trainer_config(tmp_path, f"bs{bs}", batch_size=bs, device_batch_size=bs))
        for tokens in grid:
            save_power_law_spectra(path, tokens, a)
    order = ["bs4", "bs8", "bs16", "bs32"]
    text_order = sorted(analyze.load_runs([str(tmp_path / "sweep")]), key=lambda r: r.name)
    assert [r.name for r in text_order] == ["bs16", "bs32", "bs4", "bs8"]

    def colours(result):
        """{run: colour} of every figure, checking each run has one colour in all of them."""
        figures = result["figures"]
        found = {}
        for file, drawn in figures.items():
            for panel in drawn.values():
                for label, s in panel.items():
                    run = label.split(" ")[0]
                    if run in order:
                        found.setdefault(run, set()).add(s.color)
        assert set(figures) == {"alpha_layer.png", "alpha_tokens.png", "loss_tokens.png", "spectra_act_L01.png"}
        assert all(len(c) == 1 for c in found.values()), found
        return {run: c.pop() for run, c in found.items()}

    result = analyze.compare_command(text_order, str(tmp_path / "out"), layer=1)
    for panel in result["figures"]["alpha_tokens.png"].values():
        assert list(panel) == order
    assert list(result["figures"]["alpha_layer.png"]["at val_loss %.4g" % result["loss"]]) == order
    assert [label.split(" ")[0] for label in result["figures"]["spectra_act_L01.png"]
            [f"at {result['tokens']:,.0f} tokens"]] == order
    assert [row[0] for row in result["rows"]["tokens"]] == order
    fixed = colours(result)
    assert len(set(fixed.values())) == 4
    again = analyze.compare_command(list(reversed(text_order)), str(tmp_path / "again"), layer=1)
    assert colours(again) == fixed
    # the forecast command draws each run in the colour compare gave it; its title names the target
    # loss and the tokens the predictors were read at
    drawn, plot_forecast = [], analyze.plot_forecast
    monkeypatch.setattr(analyze, "plot_forecast", lambda *a, **k: drawn.append(plot_forecast(*a, **k)) or drawn[-1])
    analyze.forecast_command(text_order, TARGET, 2500, str(tmp_path / "forecast"))
    (panel,) = drawn[0].values()
    assert {run: panel[run].color for run in order[:3]} == {run: fixed[run] for run in order[:3]}
    assert panel["bs32 (forecast)"].color == fixed["bs32"]
    assert "val_loss <= 5" in panel.title and "2.5k tokens" in panel.title and "--at-tokens 2,500" in panel.title


def test_compare_and_forecast_on_real_tiny_runs(tmp_path, capsys):
    """Two real runs of the trainer at different batch sizes: the format analyze.py reads cannot drift."""
    dirs = [train_gpt.train(train_gpt.load_config(tiny_args(tmp_path / "runs", run_name=f"bs{bs}", batch_size=bs,
                                                            device_batch_size=bs, max_steps=steps)))
            for bs, steps in ((4, 8), (8, 4))]
    capsys.readouterr()
    runs = analyze.load_runs(dirs)
    assert not analyze.differing_settings(runs)  # same probe set, windows and profile, found in the real config
    out = tmp_path / "out"
    analyze.main(["compare", str(tmp_path / "runs"), "--out", str(out), "--layer", "1"])
    printed = capsys.readouterr().out
    assert "bs4" in printed and "bs8" in printed and "matched tokens 1,024" in printed
    assert (out / "spectra_act_L01.png").exists() and (out / "alpha_layer.png").exists()
    last = [r for r in runs[0].records if r.get("tokens") == 1024 and "val_loss" in r][0]
    assert analyze.fmt(last["act/alpha_tail/L01.mlp_resid"]) in printed
    values = analyze.predictor_values(runs[0].records, 1024)
    assert {"act/alpha_tail/mean.mlp_resid", "grad/alpha_head/L01.attn.c_proj", "gap/alpha_head/L01.attn.c_proj",
            "gap/rankme/mean.attn.c_proj"} <= set(values)
    assert values["gap/alpha_head/L01.attn.c_proj"] == pytest.approx(
        last["act/alpha_head/L01.mlp_resid"] - last["grad/alpha_head/L01.attn.c_proj"])
    final = max(analyze.final_loss(r.records) for r in runs)
    analyze.main(["forecast", *dirs, "--target-loss", str(final), "--at-tokens", "512", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "no forecast" in printed  # two runs cannot rank predictors; the table is still there
    with open(out / "forecast.csv") as f:
        assert [row["reached"] for row in csv.DictReader(f)] == ["True", "True"]


def test_the_trainers_in_run_forecast_equals_the_offline_forecast(tmp_path, capsys):
    """A real run with forecast_reference = the synthetic sweep logs, at each evaluation, what
    analyze.forecast_ratio says offline from the same records."""
    make_sweep(tmp_path)
    run_dir = train_gpt.train(train_gpt.load_config(tiny_args(tmp_path / "runs", run_name="own", max_steps=12,
                                                              forecast_reference=str(tmp_path / "sweep"),
                                                              forecast_target_loss=TARGET)))
    assert "forecast:" in capsys.readouterr().out
    reference, records = analyze.load_runs([str(tmp_path / "sweep")]), analyze.load_run(run_dir).records
    evals = [r for r in records if "val_loss" in r]
    assert len(evals) == 4 and all("forecast/token_ratio" in r for r in evals)
    for r in evals:
        so_far = [e for e in evals if e["step"] <= r["step"]]
        ratio, predictor = analyze.forecast_ratio(reference, TARGET, so_far, r["tokens"])
        assert r["forecast/token_ratio"] == pytest.approx(ratio, rel=1e-12) and r["forecast/predictor"] == predictor


def test_a_forecast_reference_that_cannot_forecast_is_a_config_error_before_anything_is_written(tmp_path):
    make_sweep(tmp_path)
    out = tmp_path / "runs"
    for overrides, message in [(dict(forecast_reference=str(tmp_path / "nowhere")), "no such run directory"),
                               (dict(forecast_reference=str(tmp_path / "sweep"), spectra_tokens=1024),
                                "spectra_tokens"),
                               (dict(forecast_reference=str(tmp_path / "sweep"), forecast_target_loss=1.0),
                                "0 of its 7 runs reach val_loss 1")]:
        with pytest.raises(train_gpt.ConfigError, match=message) as e:
            train_gpt.train(train_gpt.load_config(tiny_args(out, **overrides)))
        assert not out.exists() and "--allow-mixed" not in str(e.value)  # not a trainer option
