"""bench/toy_study.py --quick: the toy's stages from the ladder's files, swept and trained to target
in the layout analyze.py reads."""
import csv
import json
import os

import pytest

import analyze
import train_gpt
from conftest import load_bench, read_metrics, run_command


def load_study():
    return load_bench("toy_study")


def test_toy_stages_add_the_ladders_changes_in_order():
    study = load_study()
    base, muon, window = (study.stage_flags(s, 64) for s in ("baseline", "muon", "window"))
    assert base["optimizer"] == "adamw" and base["pos"] == "learned" and base["tied"] is True
    assert not study.TOY_KEEPS & set(base)  # the toy keeps its size, data and cadences
    assert muon["optimizer"] == "muon" and muon["pos"] == "rotary" and muon["qk_norm"] is True  # rope's, kept
    assert window["window"] == 16 and window["unet_skips"] is True and "doc_mask" not in window
    assert base["window"] == 0 and muon["window"] == 0  # full attention until the window stage
    with pytest.raises(ValueError, match="unknown stage 'fp8'"):
        study.stage_flags("fp8", 64)


def test_the_quick_study_trains_each_stage_and_tier_to_its_target(tmp_path, capsys):
    study = load_study()
    out = str(tmp_path / "study")
    r = run_command(study.main, ["--quick", "--out", out], capsys)
    assert r.returncode == 0, r.stderr
    for stage in ("baseline", "muon"):
        cfg = train_gpt.load_config([os.path.join(out, "configs", f"{stage}.py")])
        assert cfg.optimizer == ("adamw" if stage == "baseline" else "muon") and cfg.seq_len == 64
        assert cfg.stage == study.STAGES[stage]  # the ladder file's name: analyze.py stages groups by it
        for bs in (8, 16):
            chosen = train_gpt.load_config([os.path.join(out, stage, f"best_bs{bs}.py")])
            assert chosen.batch_size == bs and chosen.optimizer == cfg.optimizer
            run = os.path.join(out, stage, "target", f"bs{bs}_seed0")
            evals = [x for x in read_metrics(run) if "val_loss" in x]
            assert evals[-1]["val_loss"] <= study.QUICK["target"] < evals[-2]["val_loss"]  # stopped at the target
    # analyze reads the study's runs
    r = run_command(analyze.main, ["compare", os.path.join(out, "muon", "target"), "--out", str(tmp_path / "cmp")],
                    capsys)
    assert r.returncode == 0, r.stderr
    assert json.load(open(os.path.join(out, "muon", "sweep.json")))["batch_sizes"] == [8, 16]
    # the stage report reads the study: one seed, so its numbers come without a verdict
    report = str(tmp_path / "stages")
    r = run_command(analyze.main, ["stages", os.path.join(out, "baseline", "target"),
                                   os.path.join(out, "muon", "target"), "--out", report], capsys)
    assert r.returncode == 0, r.stderr
    assert "03_baseline has one seed per tier" in r.stdout and "05_muon is compared with 03_baseline" in r.stdout
    with open(os.path.join(report, "stages.csv")) as f:
        (row,) = list(csv.DictReader(f))
    assert row["stage"] == "05_muon" and row["verdict"] == "withheld" and float(row["token_ratio"]) > 0
