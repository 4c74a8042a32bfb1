import csv
import json
import math

import numpy as np
import pytest

import conditions
import spectra
import train_gpt
from conftest import REPO, run_command, tiny_args

SMALL = ["--seq_len", "32", "--act_tokens", "2048", "--grad_samples", "16", "--epochs", "0.001", "--batch_size", "8"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    run_dir = train_gpt.train(train_gpt.load_config(tiny_args(tmp_path_factory.mktemp("runs"), max_steps=4,
                                                              ckpt_every_tokens=0)))
    return train_gpt.checkpoints(run_dir)[-1]


def read_summary(path):
    with open(path) as f:
        return {(r["condition"], r["key"]): (float(r["mean"]), float(r["std"]), int(r["seeds"]))
                for r in csv.DictReader(f)}


def tail_alpha(npz, point, tail=(10, 100)):
    eig, _, limits = spectra.load_spectra(npz)
    return spectra.fit_power_law(eig[point], tail, spectra.numerical_rank(eig[point], limits[point]))["alpha"]


def test_conditions_end_to_end_average_what_each_seed_measured(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "study"
    conditions.main(["--model", tiny_ckpt, "--data", "data/shakespeare", "--seeds", "2", "--out", str(out),
                  "--ckpt", tiny_ckpt, *SMALL])
    printed = capsys.readouterr().out
    assert "the val split stands in" in printed and "act/alpha_tail (mean +- std over seeds)" in printed
    summary = read_summary(out / "conditions.csv")
    measured = {c for c, _ in summary}
    extra = "tiny_step_00000004"  # the checkpoint's label: run and step
    assert measured == {"ft_train", "ft_test", "pre_train", "pre_test", "random_train", f"{extra}_train",
                        f"{extra}_test"}
    point = "L01.mlp_resid"
    for cond in ("ft_train", "pre_train", "pre_test", "random_train"):
        per_seed = [tail_alpha(out / "spectra" / f"{cond}_seed{s}_act.npz", point) for s in (0, 1)]
        mean, std, n = summary[(cond, f"act/alpha_tail/{point}")]
        assert n == 2 and mean == pytest.approx(np.mean(per_seed), rel=1e-9)
        assert std == pytest.approx(np.std(per_seed, ddof=1), rel=1e-9, abs=1e-12)
    # the test split is measured from its start for every seed; the train subset moves with the seed
    assert summary[("pre_test", f"act/alpha_tail/{point}")][1] == 0
    assert summary[("pre_train", f"act/alpha_tail/{point}")][1] > 0
    # the extra checkpoint is the starting model itself: its conditions equal pre_*
    assert summary[(f"{extra}_train", f"act/alpha_tail/{point}")] == summary[("pre_train", f"act/alpha_tail/{point}")]
    assert summary[("pre_train", f"act/valid_rank/{point}")][0] == 64  # integer scalars are averaged too
    # fine-tuning changed the weights: same tokens, different spectrum
    ft, pre = (spectra.load_spectra(out / "spectra" / f"{c}_seed0_act.npz")[0][point]
               for c in ("ft_train", "pre_train"))
    assert not np.allclose(ft, pre, rtol=1e-6)
    grad = summary[("pre_train", "grad/alpha_head/L00.attn.c_proj")]
    assert math.isfinite(grad[0]) and grad[2] == 2
    # the trainer's report path: every scalar the trainer logs, the gradient noise scale included
    assert math.isfinite(summary[("pre_train", "grad/noise_scale/L00.attn.c_proj")][0])
    for plot in ("act_alpha_layers.png", "grad_alpha_layers.png", "act_spectrum_L01.mlp_resid.png",
                 "act_sublayers.png"):
        assert (out / "plots" / plot).exists()
    # a rerun into the same folder reuses the finished fine-tuning and measures the same spectrum
    conditions.main(["--model", tiny_ckpt, "--data", "data/shakespeare", "--seeds", "1", "--out", str(out),
                  "--conditions", "ft_train", *SMALL])
    assert "reusing the fine-tuned model" in capsys.readouterr().out
    assert np.array_equal(spectra.load_spectra(out / "spectra" / "ft_train_seed0_act.npz")[0][point], ft)
    # ... but not a fine-tuning of other settings
    with pytest.raises(SystemExit):
        conditions.main(["--model", tiny_ckpt, "--data", "data/shakespeare", "--seeds", "1", "--out",
                      str(out), "--conditions", "ft_train", "--ft_lr", "1e-3", *SMALL])
    assert "holds a fine-tuning of other settings" in capsys.readouterr().err


def test_conditions_bad_input_names_the_problem(tiny_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)

    def run_cli(*args):
        return run_command(conditions.main, args, capsys)
    r = run_cli("--model", tiny_ckpt, "--data", "data/shakespeare", "--conditions", "pre_train,finetuned",
                "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "unknown ['finetuned']" in r.stderr
    r = run_cli("--model", tiny_ckpt, "--data", str(tmp_path), "--seq_len", "32", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "no train shards" in r.stderr and "data/wikitext.py" in r.stderr
    r = run_cli("--model", str(tmp_path / "missing.pt"), "--data", "data/shakespeare", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "not found" in r.stderr
    r = run_cli("--model", tiny_ckpt, "--data", "data/shakespeare", "--seq_len", "64", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "exceeds the 32 positions of tiny_step_00000004" in r.stderr
    r = run_cli("--model", tiny_ckpt, "--data", "data/shakespeare", "--seq_len", "32", "--layer", "2",
                "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "--layer 2: the model has layers 0 to 1" in r.stderr
    r = run_cli("--model", tiny_ckpt, "--data", "data/shakespeare", "--seq_len", "32", "--matrices", "attn.c_x",
                "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "attn.c_x" in r.stderr
    r = run_cli("--model", tiny_ckpt, "--data", "data/shakespeare", "--seq_len", "32", "--ckpt", tiny_ckpt,
                "--ckpt", tiny_ckpt, "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "must be distinct" in r.stderr
    assert not (tmp_path / "o").exists()


def tiny_gpt2_dir(path):
    """A tiny GPT-2 in the Hugging Face format with the real 50,257-token vocabulary (the corpus' tokens)."""
    import torch
    from test_pretrained import hf_config, hf_tensors, write_checkpoint
    tensors = hf_tensors()
    tensors["wte.weight"] = torch.randn(50257, tensors["wte.weight"].shape[1]) * 0.3
    tensors["lm_head.weight"] = tensors["wte.weight"].clone()
    return str(write_checkpoint(path, tensors, hf_config(vocab_size=50257)))


def test_conditions_on_a_hugging_face_model_fine_tune_through_the_trainer(tmp_path, capsys):
    pytest.importorskip("safetensors")
    model_dir, out = tiny_gpt2_dir(tmp_path / "tiny-gpt2"), tmp_path / "study"
    conditions.main(["--model", model_dir, "--data", "data/shakespeare", "--seeds", "2", "--out", str(out),
                  "--seq_len", "8", "--act_tokens", "512", "--grad_samples", "8", "--epochs", "0.0002",
                  "--ft", "log_every=1"])
    summary = read_summary(out / "conditions.csv")
    assert {c for c, _ in summary} == {"ft_train", "ft_test", "pre_train", "pre_test", "random_train"}
    # fine-tuning ran in the trainer (init_from = the directory), with the checkpoint's architecture
    for seed in (0, 1):
        records = [json.loads(line) for line in open(out / "finetune" / f"seed{seed}" / "metrics.jsonl")]
        config = json.load(open(out / "finetune" / f"seed{seed}" / "config.json"))
        assert config["model"]["n_embd"] == 16 and config["model"]["act"] == "gelu_tanh" and records[-1]["step"] >= 2
    ft, pre = (spectra.load_spectra(out / "spectra" / f"{c}_seed1_act.npz")[0]["L01.mlp_resid"]
               for c in ("ft_test", "pre_test"))
    assert not np.allclose(ft, pre, rtol=1e-6)


def test_conditions_without_network_names_the_file_and_the_local_fix(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def offline(**kw):
        raise ConnectionError("huggingface.co unreachable")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(SystemExit) as stop:
        conditions.main(["--model", "gpt2", "--data", "data/shakespeare", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "config.json of openai-community/gpt2" in err and "local" in err
    with pytest.raises(SystemExit):
        conditions.main(["--model", "gpt-5", "--data", "data/shakespeare", "--out", str(tmp_path / "o")])
    assert "known names are ['gpt2', 'gpt2-large', 'gpt2-medium', 'gpt2-xl']" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_random_condition_has_random_output_projections():
    import conditions
    from model import GPT, make_config
    modded = GPT(make_config("modded", "d12", n_layer=2, n_head=2, n_embd=32, seq_len=16))
    assert modded.cfg.zero_init_proj and not modded.blocks[0].attn.c_proj.weight.any()  # the trainer's init
    rand = conditions.random_like(modded, seed=3)
    assert {k: v.shape for k, v in rand.state_dict().items()} == {k: v.shape for k, v in modded.state_dict().items()}
    for name, lin in rand.linears().items():
        assert lin.weight.std() > 0, name
    other = conditions.random_like(modded, seed=4)
    assert not (rand.blocks[0].attn.c_proj.weight == other.blocks[0].attn.c_proj.weight).all()  # per seed
