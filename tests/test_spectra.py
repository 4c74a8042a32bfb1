import dataclasses
import glob
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import measure
import spectra
import train_gpt
from conftest import (FP32_ORDER_BOUND, REPO, crash_in_step, losses, read_metrics, run_command, threads, tiny_args,
                      torchrun_worker, worker_threads)
from data.shards import find_shards, load_prefix
from model import GPT, make_config
from train_gpt import ConfigError, load_config, train

S = spectra.SpectraSettings

VAL = "data/shakespeare/shakespeare_val_*.bin"


def probe_tokens(n):
    return torch.from_numpy(load_prefix(find_shards(VAL), n, 50304))[:n]


def random_model(preset="modded", seed=0, **overrides):
    """A small model with every weight random (zero-initialised projections would make points trivial)."""
    torch.manual_seed(seed)
    cfg = make_config(preset, "d12", **{**dict(n_layer=3, n_head=2, n_embd=32, seq_len=16), **overrides})
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def split_sum_linear(self, x):
    """nn.Linear.forward with its sum over inputs in two halves: the order of a BLAS that splits the
    reduction over threads (monkeypatched onto nn.Linear by the fp32-order tests)."""
    k = x.size(-1) // 2
    y = F.linear(x[..., :k], self.weight[:, :k]) + F.linear(x[..., k:], self.weight[:, k:])
    return y if self.bias is None else y + self.bias


def in_three_orders(monkeypatch, measure):
    """measure() at 1 thread, at 2 threads, and at 1 thread with every Linear's sum split in two halves."""
    with threads(1):
        one = measure()
    with threads(2):
        two = measure()
    with monkeypatch.context() as m, threads(1):
        m.setattr(torch.nn.Linear, "forward", split_sum_linear)
        split = measure()
    return one, two, split


# ---- covariance accumulator ------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_accumulator_equals_numpy_covariance_in_any_merge_order(offset, monkeypatch):
    monkeypatch.setattr(spectra, "CHUNK_ROWS", 97)  # many chunks, uneven last one
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3000, 24, generator=g) * torch.linspace(3, 0.1, 24) + offset).float()
    expected = np.cov(x.double().numpy(), rowvar=False)
    parts = list(x.split([700, 1, 1299, 1000]))
    stats = [spectra.cov_stats(p) for p in parts]
    orders = ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1])
    merged = []
    for order in orders:
        acc = None
        for i in order:
            acc = spectra.merge_stats(acc, stats[i])
        merged.append(spectra.covariance(acc).numpy())
        assert acc.n == 3000
        assert rel(merged[-1], expected) < 1e-6  # fp32 products of centred chunks
    # pairwise merges as a tree instead of a chain
    tree = spectra.merge_stats(spectra.merge_stats(stats[0], stats[1]), spectra.merge_stats(stats[2], stats[3]))
    for m in merged[1:] + [spectra.covariance(tree).numpy()]:
        assert rel(m, merged[0]) < 1e-12  # merge order only changes fp64 round-off
    assert np.allclose(spectra.merge_stats(None, stats[0]).m2, stats[0].m2)


def test_eigenvalues_are_descending_fp64_of_the_covariance():
    x = torch.randn(500, 10, dtype=torch.float32) * torch.arange(1, 11).float()
    eig = spectra.eigenvalues(spectra.cov_stats(x))
    expected = np.sort(np.linalg.eigvalsh(np.cov(x.double().numpy(), rowvar=False)))[::-1]
    assert eig.dtype == np.float64 and np.all(np.diff(eig) <= 0)
    assert rel(eig, expected) < 1e-6


# ---- fits and metrics ------------------------------------------------------------------------


def test_fit_recovers_an_exact_power_law():
    i = np.arange(1, 301)
    values = 3.7 * i ** -0.83
    for window in ((1, 10), (30, 150), (10, 100)):
        fit = spectra.fit_power_law(values, window)
        assert fit["alpha"] == pytest.approx(0.83, abs=1e-12)
        assert fit["r2"] == pytest.approx(1.0, abs=1e-12) and fit["se"] < 1e-12
        assert math.exp(fit["intercept"]) == pytest.approx(3.7, rel=1e-10) and not fit["clipped"]


def test_fit_matches_least_squares_with_r2_and_standard_error():
    rng = np.random.default_rng(1)
    values = np.sort(rng.lognormal(size=200))[::-1]
    fit = spectra.fit_power_law(values, (5, 80))
    x, y = np.log(np.arange(5, 81)), np.log(values[4:80])
    X = np.stack([x, np.ones_like(x)], 1)
    (slope, intercept), (ssr,), _, _ = np.linalg.lstsq(X, y, rcond=None)
    assert fit["alpha"] == pytest.approx(-slope, rel=1e-10)
    assert fit["r2"] == pytest.approx(1 - ssr / ((y - y.mean()) ** 2).sum(), rel=1e-10)
    # OLS: var(slope) = s^2 [(X^T X)^-1]_00 with s^2 = SSR / (n - 2)
    assert fit["se"] == pytest.approx(math.sqrt(ssr / (len(x) - 2) * np.linalg.inv(X.T @ X)[0, 0]), rel=1e-8)


def test_windows_are_clipped_to_the_valid_rank_and_flagged():
    values = np.arange(50, 0, -1.0)
    fit = spectra.fit_power_law(values, (30, 150), rank=40)
    assert (fit["lo"], fit["hi"], fit["clipped"]) == (30, 40, True)
    assert math.isfinite(fit["alpha"])
    assert math.isnan(spectra.fit_power_law(values, (30, 150), rank=30)["alpha"])  # one rank: no line


def test_split_half_noise_estimates_the_standard_error_of_alpha():
    # the formula: for Gaussian half-sample alphas N(a, 2 s^2), sqrt(pi / 8) |a0 - a1| has mean s
    draws = np.random.default_rng(0).normal(1.0, math.sqrt(2) * 0.05, size=(200_000, 2))
    assert np.mean([spectra.split_half_se(a0, a1) for a0, a1 in draws]) == pytest.approx(0.05, rel=0.01)
    # on covariances of sampled power-law data: the estimate against the spread of the full-sample alpha
    # over 400 independent samples (each term of the ratio has ~4% sampling error)
    rng = np.random.default_rng(1)
    scale = np.arange(1, 65) ** -0.5
    full, estimates = [], []

    def alpha(rows):
        values = np.linalg.eigvalsh(np.cov(rows, rowvar=False))[::-1]
        return spectra.fit_power_law(values, (5, 30))["alpha"]
    for _ in range(400):
        x = rng.standard_normal((1024, 64)) * scale
        full.append(alpha(x))
        estimates.append(spectra.split_half_se(alpha(x[0::2]), alpha(x[1::2])))
    ratio = np.mean(estimates) / np.std(full, ddof=1)
    assert abs(ratio - 1) < 0.12, ratio  # |a0 - a1| / 2, the earlier estimate, reads 20% low: ratio 0.8


def test_a_table_of_all_zero_spectra_says_so_in_one_line():
    zero = dict(values=np.zeros(8), n=8, width=64, limit=8)
    grown = dict(values=np.arange(8, 0, -1.0), n=8, width=64, limit=8)
    settings = S(head=(1, 4), tail=(2, 8))
    metrics, _ = spectra.summarise({"L00.attn.c_proj": zero, "L01.attn.c_proj": zero}, "grad", settings)
    table = spectra.format_table(metrics, "grad", ["L00.attn.c_proj", "L01.attn.c_proj"])
    assert table.count("\n") == 0 and "every spectrum: all zero, no fits" in table and "nan" not in table
    metrics, _ = spectra.summarise({"L00.attn.c_proj": zero, "L01.attn.c_proj": grown}, "grad", settings)
    table = spectra.format_table(metrics, "grad", ["L00.attn.c_proj", "L01.attn.c_proj"]).splitlines()
    assert len(table) == 3 and table[1].lstrip().startswith("L01.attn.c_proj")
    assert table[2].strip().startswith("L00.attn.c_proj: all zero, no fits")


def test_fit_recovers_alpha_from_samples_of_a_power_law_covariance():
    alpha, d, n = 0.8, 256, 40000
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    x = (z * torch.arange(1, d + 1, dtype=torch.float64) ** (-alpha / 2)).float()
    half0, half1 = spectra.cov_stats(x[0::2]), spectra.cov_stats(x[1::2])
    eig = spectra.eigenvalues(spectra.merge_stats(half0, half1))
    m = spectra.spectrum_metrics(eig, d, (1, 10), (10, 100), halves=(spectra.eigenvalues(half0),
                                 spectra.eigenvalues(half1)), half_limits=(d, d))
    assert m["alpha_tail"] == pytest.approx(alpha, abs=0.03)
    assert m["alpha_head"] == pytest.approx(alpha, abs=0.1)
    assert 0 < m["alpha_tail_noise"] < 0.03 and m["r2_tail"] > 0.99


def test_effective_ranks_and_divergence_against_direct_formulas():
    flat = np.ones(20)
    assert spectra.rankme(flat) == pytest.approx(20) and spectra.participation_ratio(flat) == pytest.approx(20)
    assert spectra.stable_rank(flat) == pytest.approx(20) and spectra.top_share(flat) == pytest.approx(0.5)
    v = np.array([4.0, 2.0, 1.0, 1.0])
    p = v / v.sum()
    assert spectra.rankme(v) == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert spectra.participation_ratio(v) == pytest.approx(64 / 22)
    assert spectra.stable_rank(v) == pytest.approx(2.0)
    assert spectra.js_divergence(v, 7 * v) == pytest.approx(0, abs=1e-15)  # shape, not scale
    assert spectra.js_divergence([1.0, 0.0], [0.0, 1.0]) == pytest.approx(1.0)  # disjoint: 1 bit
    q = np.array([1.0, 1.0, 1.0, 1.0, 9.0]) / 4  # truncated to the common length 4, renormalised
    pq, qq = p, np.full(4, 0.25)
    mid = (pq + qq) / 2
    expected = 0.5 * (pq * np.log2(pq / mid)).sum() + 0.5 * (qq * np.log2(qq / mid)).sum()
    assert spectra.js_divergence(v, q) == pytest.approx(expected)


# ---- one-pass measurement --------------------------------------------------------------------


def manual_gpt2_points(model, idx):
    """Every probe point of a gpt2-preset model, computed by hand from its weights."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    cfg, (B, T) = model.cfg, idx.shape
    H, D = cfg.n_head, cfg.n_embd // cfg.n_head

    def ln(x, name):
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * sd[f"{name}.weight"] + sd[f"{name}.bias"]

    def lin(x, name):
        return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]
    x = sd["wte.weight"][idx] + sd["wpe.weight"][:T]
    out = {"embed": x}
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for layer in range(cfg.n_layer):
        k, b = f"L{layer:02d}", f"blocks.{layer}"
        h = out[f"{k}.ln1"] = ln(x, f"{b}.ln_1")
        q, kk, v = (lin(h, f"{b}.attn.c_{n}").view(B, T, H, D).transpose(1, 2) for n in "qkv")
        att = (q @ kk.transpose(-1, -2) / math.sqrt(D)).masked_fill(~mask, float("-inf")).softmax(-1)
        a = out[f"{k}.attn"] = lin((att @ v).transpose(1, 2).reshape(B, T, -1), f"{b}.attn.c_proj")
        x = out[f"{k}.attn_resid"] = x + a
        h = out[f"{k}.ln2"] = ln(x, f"{b}.ln_2")
        f = out[f"{k}.fc"] = lin(h, f"{b}.mlp.c_fc")
        g = out[f"{k}.act"] = 0.5 * f * (1 + torch.tanh(math.sqrt(2 / math.pi) * (f + 0.044715 * f ** 3)))  # tanh GELU
        m = out[f"{k}.proj"] = lin(g, f"{b}.mlp.c_proj")
        x = out[f"{k}.mlp_resid"] = x + m
    out["final"] = ln(x, "ln_f")
    return out


def manual_modded_points(model, idx):
    """Every probe point of a modded-preset model (rotary, RMS norms, QK-norm, relu^2, value
    embeddings, U-net skips), computed by hand from its weights."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    cfg, (B, T) = model.cfg, idx.shape
    L, H, D = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head

    def rms(x):
        return x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + torch.finfo(torch.float64).eps)

    def rotate(x):  # (B, H, T, D): channel pairs (i, i + D/2) rotated by t / base^(2i/D)
        freq = cfg.rope_base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
        angle = torch.arange(T, dtype=torch.float64)[:, None] * freq
        x1, x2 = x[..., :D // 2], x[..., D // 2:]
        return torch.cat([x1 * angle.cos() + x2 * angle.sin(), x2 * angle.cos() - x1 * angle.sin()], -1)
    x = sd["wte.weight"][idx]
    out = {"embed": x}
    n_ve, skips = min(3, L // 2), []
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for layer in range(L):
        k, b = f"L{layer:02d}", f"blocks.{layer}"
        if layer >= L - L // 2:
            x = x + sd["skip_weights"][layer - (L - L // 2)] * skips.pop()
        h = out[f"{k}.ln1"] = rms(x)
        q, kk, v = (h @ sd[f"{b}.attn.c_{n}.weight"].T for n in "qkv")
        q, kk = (rotate(rms(t.view(B, T, H, D)).transpose(1, 2)) for t in (q, kk))
        table = layer if layer < n_ve else layer - (L - n_ve) if layer >= L - n_ve else None
        if table is not None:
            lam = sd[f"{b}.attn.ve_lambdas"]
            v = lam[0] * v + lam[1] * sd[f"value_embeds.{table}.weight"][idx]
        v = v.view(B, T, H, D).transpose(1, 2)
        att = (q @ kk.transpose(-1, -2) / math.sqrt(D)).masked_fill(~mask, float("-inf")).softmax(-1)
        a = out[f"{k}.attn"] = (att @ v).transpose(1, 2).reshape(B, T, -1) @ sd[f"{b}.attn.c_proj.weight"].T
        x = out[f"{k}.attn_resid"] = x + a
        h = out[f"{k}.ln2"] = rms(x)
        f = out[f"{k}.fc"] = h @ sd[f"{b}.mlp.c_fc.weight"].T
        g = out[f"{k}.act"] = torch.relu(f) ** 2
        m = out[f"{k}.proj"] = g @ sd[f"{b}.mlp.c_proj.weight"].T
        x = out[f"{k}.mlp_resid"] = x + m
        if layer < L // 2:
            skips.append(x)
    out["final"] = rms(x)
    return out


@pytest.mark.parametrize("preset", ["gpt2", "modded"])
def test_captured_points_equal_a_manual_forward_pass(preset):
    model = random_model(preset, n_layer=6) if preset == "modded" else random_model(preset, n_layer=2)
    idx = probe_tokens(4 * 16).view(4, 16)
    captured = {}
    with spectra.Probe(model.probe_points(), lambda name, out: captured.__setitem__(name, out.detach().double())):
        model.features(idx)
    manual = (manual_modded_points if preset == "modded" else manual_gpt2_points)(model, idx)
    assert list(captured) == list(manual) == list(model.probe_points())
    assert len(manual) == 2 + model.cfg.n_layer * 8
    for name, value in manual.items():
        assert rel(captured[name], value) < 1e-4, name
    assert all(not m._forward_hooks for m in model.modules())  # detached on exit


def test_one_pass_spectra_equal_an_independent_covariance_of_every_point():
    model = random_model("gpt2", n_layer=2)
    tokens = probe_tokens(10 * 16)  # 10 sequences: batches of 4, 4 and 2
    points = spectra.select_points(2, sublayers=True)
    got = spectra.measure_activations(model, tokens, S(seq_len=16, act_batch_size=4, act_norm="rms"), points)
    manual = manual_gpt2_points(model, tokens.view(10, 16))
    for p in points:
        x = manual[p]
        if spectra.is_residual(p):
            x = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-6)  # the Spectral Lens protocol's eps
        halves = [x[0::2].reshape(-1, x.size(-1)).numpy(), x[1::2].reshape(-1, x.size(-1)).numpy()]
        for key, rows in (("values", np.concatenate(halves)), ("values_half0", halves[0]), ("values_half1", halves[1])):
            expected = np.linalg.eigvalsh(np.cov(rows, rowvar=False))[::-1]
            k = spectra.numerical_rank(expected, len(expected))
            assert rel(got[p][key][:k], expected[:k]) < 1e-5, (p, key)
        assert (got[p]["n"], got[p]["n_half0"], got[p]["n_half1"]) == (160, 80, 80)
        assert got[p]["width"] == (128 if p.endswith((".fc", ".act")) else 32)
    assert model.training  # restored


def test_measurement_does_not_touch_training_state():
    model = random_model(dropout=0.2)
    model.train()
    rng = torch.get_rng_state()
    params = [p.detach().clone() for p in model.parameters()]
    spectra.measure_activations(model, probe_tokens(64), S(seq_len=16, act_batch_size=2), spectra.select_points(3))
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_non_finite_activations_give_nan_metrics_and_a_warning_naming_point_and_step():
    model = random_model()
    with torch.no_grad():
        model.blocks[1].mlp.c_fc.weight[0, 0] = float("inf")
    points = spectra.select_points(3, sublayers=True)
    act = spectra.measure_activations(model, probe_tokens(64), S(seq_len=16, act_batch_size=2), points)
    metrics, notes = spectra.summarise(act, "act", S(head=(1, 10), tail=(30, 150)), where="at step 7")
    assert math.isfinite(metrics["act/alpha_head/L00.mlp_resid"]) and math.isfinite(metrics["act/rankme/L01.ln2"])
    assert math.isnan(metrics["act/alpha_head/L01.fc"]) and math.isnan(metrics["act/rankme/final"])
    assert any("L01.fc at step 7: non-finite" in n for n in notes)


def test_too_few_probe_tokens_warn_and_limit_the_fits():
    model = random_model(n_embd=64, n_head=2)
    act = spectra.measure_activations(model, probe_tokens(48), S(seq_len=16, act_batch_size=2),
                                      ["L01.mlp_resid"])  # 48 tokens < width 64
    metrics, notes = spectra.summarise(act, "act", S(head=(1, 10), tail=(30, 150)))
    assert any("48 probe tokens for width 64" in n and "rank-deficient" in n for n in notes)
    assert metrics["act/valid_rank/L01.mlp_resid"] <= 47
    assert any("tail window [30, 150] clipped" in n for n in notes)
    assert math.isfinite(metrics["act/alpha_tail/L01.mlp_resid"])


def test_point_selection_and_unknown_names():
    assert spectra.select_points(2) == ["embed", "L00.mlp_resid", "L01.mlp_resid", "final"]
    assert len(spectra.select_points(2, sublayers=True)) == 2 + 2 * 8
    assert spectra.select_points(12, "L1*.attn,final") == ["L10.attn", "L11.attn", "final"]
    with pytest.raises(ValueError, match=r"'L00.mlp' matches no probe point; valid names are embed"):
        spectra.select_points(2, "L00.mlp")


DDP_WORKER = """
import os, sys, numpy as np, torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
import spectra
from test_spectra import probe_tokens, random_model
S = spectra.SpectraSettings
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
model = random_model("modded")
points = spectra.select_points(3, sublayers=True)
act = spectra.measure_activations(model, probe_tokens(11 * 16), S(seq_len=16, act_batch_size=2), points, rank, world)
# 3 sequences in one batch of 4: rank 1 has no batch at all
lone = spectra.measure_activations(model, probe_tokens(3 * 16), S(seq_len=16, act_batch_size=4), ["L01.fc"], rank,
                                   world)
if rank == 0:
    act["lone"] = lone["L01.fc"]
    np.savez({out!r}, **{{k + "|" + p: s[k] for p, s in act.items()
                          for k in ("values", "values_half0", "values_half1")}})
import train_gpt
train_gpt.close_process_group()
"""


def test_two_processes_give_the_same_eigenvalues_as_one(tmp_path):
    ddp = torchrun_worker(tmp_path, DDP_WORKER)
    model = random_model("modded")
    with worker_threads():  # the workers' arithmetic: fp32 products may round differently with more threads
        one = spectra.measure_activations(model, probe_tokens(11 * 16), S(seq_len=16, act_batch_size=2),
                                          spectra.select_points(3, sublayers=True))
        one["lone"] = spectra.measure_activations(model, probe_tokens(3 * 16), S(seq_len=16, act_batch_size=4),
                                                  ["L01.fc"])["L01.fc"]
    assert len(ddp.files) == 3 * len(one)
    for p, s in one.items():
        for key in ("values", "values_half0", "values_half1"):
            k = spectra.numerical_rank(s[key], len(s[key]))
            assert k > 0 and rel(ddp[f"{key}|{p}"][:k], s[key][:k]) < 1e-10, (p, key)


def test_the_thread_count_or_summation_order_moves_eigenvalues_by_fp32_rounding_only(monkeypatch):
    """What 1 and N processes at different thread counts (or another BLAS) may differ by: the
    activations change by a few fp32 roundings, so by Weyl's inequality every eigenvalue by at most
    ||dC|| ~ 2 |dX| / |X| lambda_1 (conftest.FP32_ORDER_BOUND). Threads 1 against 2, and every
    Linear's sum split in two halves."""
    model = random_model("modded", n_embd=64)
    points, tokens, settings = spectra.select_points(3, sublayers=True), probe_tokens(24 * 16), S(seq_len=16,
                                                                                                   act_batch_size=4)
    one, two, split = in_three_orders(monkeypatch, lambda: spectra.measure_activations(model, tokens, settings, points))
    assert max(rel(two[p]["values"], one[p]["values"]) for p in points) < FP32_ORDER_BOUND
    assert 0 < max(rel(split[p]["values"], one[p]["values"]) for p in points) < FP32_ORDER_BOUND


# ---- in the trainer and on checkpoints -------------------------------------------------------


def test_spectra_on_and_off_give_identical_losses(tmp_path):
    args = tiny_args(tmp_path, max_steps=8, eval_every_tokens=256, dropout=0.1, spectra_sublayers=1)
    on = read_metrics(train(load_config(args + ["--run_name=on"])))
    off = read_metrics(train(load_config(args + ["--run_name=off", "--spectra_every=0"])))
    assert losses(on) == losses(off) and len(losses(on)) == 9  # bitwise, dropout included
    assert any("act/alpha_tail/L01.act" in r for r in on) and not any("act/alpha_tail/L01.act" in r for r in off)


def test_spectra_every_kth_evaluation_and_the_last(tmp_path):
    run_dir = train(load_config(tiny_args(tmp_path, max_steps=10, eval_every_tokens=128, spectra_every=4)))
    evals = [r for r in read_metrics(run_dir) if "val_loss" in r]
    assert [r["step"] for r in evals] == list(range(11))
    assert [r["step"] for r in evals if "act/alpha_head/embed" in r] == [0, 4, 8, 10]


def test_demo_run_writes_metrics_npz_and_plots(tmp_path, capsys):
    run_dir = train(load_config(tiny_args(tmp_path, max_steps=4, eval_every_tokens=256, spectra_plots=1,
                                          spectra_tail="5,40", zero_init_proj=0)))
    evals = [r for r in read_metrics(run_dir) if "val_loss" in r]
    files = spectra.spectra_files(run_dir, "act")
    assert [t for t, _ in files] == [0, 256, 512]
    eig, meta, limits = spectra.load_spectra(files[-1][1])
    assert meta["tokens"] == 512 and meta["tail"] == [5, 40] and meta["probe_tokens"] == 512
    last = evals[-1]
    for p, values in eig.items():  # the logged scalars are the fits of the saved eigenvalues
        assert limits[p] == 64  # min(width 64, 512 probe tokens - 1)
        fit = spectra.fit_power_law(values, (5, 40), spectra.numerical_rank(values, limits[p]))
        assert last[f"act/alpha_tail/{p}"] == pytest.approx(fit["alpha"], rel=1e-12)
    first_eig, _, _ = spectra.load_spectra(files[0][1])
    assert last["act/js_first/L01.mlp_resid"] == pytest.approx(
        spectra.js_divergence(eig["L01.mlp_resid"], first_eig["L01.mlp_resid"]))
    assert evals[0]["act/js_first/embed"] == 0 and evals[0]["act/js_prev/embed"] is None
    plots = sorted(os.path.basename(f) for f in glob.glob(os.path.join(run_dir, "plots", "*.png")))
    assert "act_alpha_tokens.png" in plots and "act_spectrum_000000000512.png" in plots
    assert "act_alpha_layer_000000000512.png" in plots
    out = capsys.readouterr().out
    assert "alpha_head  alpha_tail" in out and "L01.mlp_resid" in out


def test_resumed_run_has_the_same_spectral_metrics(tmp_path, monkeypatch):
    args = tiny_args(tmp_path, max_steps=8, ckpt_every_tokens=384, eval_every_tokens=256)
    full = read_metrics(train(load_config(args + ["--run_name=full"])))
    crash_in_step(monkeypatch, args + ["--run_name=part"], 6)  # after the checkpoint at step 3, the eval at 4
    part_dir = os.path.join(tmp_path, "part")
    train(load_config(args + ["--run_name=part", "--resume=1"]))
    assert sorted(os.listdir(os.path.join(part_dir, "spectra", "discarded"))) == [
        f"{family}_000000000512.npz" for family in ("act", "grad", "weight")]

    def evals(records):  # js_prev / js_first come from the saved spectra: they must survive the crash too
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in records if "val_loss" in r]
    assert evals(read_metrics(part_dir)) == evals(full) and len(evals(full)) == 5


def test_window_and_point_config_errors():
    with pytest.raises(ConfigError, match=r"spectra_tail=\(100, 10\) is not a rank window"):
        load_config(tiny_args("/tmp", spectra_tail="100,10"))
    with pytest.raises(ConfigError, match=r"spectra_head=\(0, 10\) is not a rank window"):
        load_config(tiny_args("/tmp", spectra_head="(0,10)"))
    with pytest.raises(ConfigError, match=r"spectra_tail='10' is not a pair of integers"):
        load_config(tiny_args("/tmp", spectra_tail="10"))
    with pytest.raises(ConfigError, match=r"'L5.mlp_resid' matches no probe point"):
        load_config(tiny_args("/tmp", spectra_points="L5.mlp_resid"))
    assert load_config(tiny_args("/tmp", spectra_tail="10,100")).spectra_tail == (10, 100)


def test_config_file_windows_must_be_integer_pairs(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("spectra_tail = (10, 100.5)\n")
    with pytest.raises(ConfigError, match=r"c.py: spectra_tail=100.5 is not a valid int"):
        load_config([str(path)])
    path.write_text("spectra_tail = [10, 100]\nspectra_head = (2, 8)\n")
    cfg = load_config([str(path)])
    assert (cfg.spectra_head, cfg.spectra_tail) == ((2, 8), (10, 100))


def test_checkpoint_command_writes_the_same_spectra_as_the_trainer(tmp_path):
    run_dir = train(load_config(tiny_args(tmp_path, max_steps=4, eval_every_tokens=0, ckpt_every_tokens=0,
                                          spectra_tail="5,40")))
    ckpt, = train_gpt.checkpoints(run_dir)
    r = subprocess.run([sys.executable, "measure.py", "act", "--ckpt", ckpt, "--data", VAL], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "L01.mlp_resid" in r.stdout and "alpha_tail" in r.stdout
    out = os.path.join(run_dir, "measured")  # the default: beside ckpt/, never the trainer's own spectra/
    (tokens, path), = spectra.spectra_files(out, "act")
    trained = dict(spectra.spectra_files(run_dir, "act"))
    assert tokens == 4 * 4 * 32 and set(trained) == {0, tokens}
    got, meta, _ = spectra.load_spectra(path)
    mine, _, _ = spectra.load_spectra(trained[tokens])
    assert meta["tail"] == [5, 40] and meta["step"] == 4 and list(got) == list(mine)
    for p in got:
        np.testing.assert_array_equal(got[p], mine[p])
    with open(os.path.join(out, "spectra", f"act_{tokens:012d}.json")) as f:
        scalars = json.load(f)
    last = read_metrics(run_dir)[-1]
    for key in ("act/alpha_tail/L01.mlp_resid", "act/rankme/embed", "act/r2_head/final"):
        assert scalars[key] == last[key]
    assert os.path.exists(os.path.join(out, "plots", "act_alpha_tokens.png"))


def test_checkpoint_command_errors_name_the_problem(tmp_path, capsys):
    r = run_command(measure.main, ["act", "--ckpt", str(tmp_path / "nope.pt")], capsys)
    assert r.returncode == 2 and "nope.pt' not found" in r.stderr
    r = run_command(measure.main, ["act", "--ckpt", "x.pt", "--tail", "5"], capsys)
    assert r.returncode == 2 and "is not a rank window" in r.stderr
    bogus = tmp_path / "bogus.pt"
    torch.save({"weights": torch.zeros(2)}, bogus)
    r = run_command(measure.main, ["act", "--ckpt", str(bogus)], capsys)
    assert r.returncode == 2 and "is not a trainer checkpoint" in r.stderr

    def error_of(*argv):  # in process: measure.main exits 2 with one line on stderr
        with pytest.raises(SystemExit) as e:
            measure.main(list(argv))
        assert e.value.code == 2
        return capsys.readouterr().err
    readme = error_of("act", "--ckpt", f"{REPO}/README.md")
    assert "README.md is not a trainer checkpoint: it is truncated or corrupt, or not a file torch.save wrote" in readme
    assert "weights_only" not in readme  # never torch's advice to load with weights_only=False (it runs code)
    model = random_model()
    good = tmp_path / "good.pt"
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(model.cfg)}, good)
    assert "--seq_len 0: the model takes 1 to 16 tokens" in error_of("act", "--ckpt", str(good), "--seq_len", "0")
    # the command's own flags, not the trainer's keys
    assert "--tokens=10 is less than two sequences of --seq_len=16" in error_of("act", "--ckpt", str(good), "--tokens",
                                                                                  "10")
    assert "--max_gb=0.0 must be positive" in error_of("grad", "--ckpt", str(good), "--max_gb", "0")
    assert "--head=(5, 3) is not a rank window" in error_of("act", "--ckpt", str(good), "--head", "5,3")
    torch.save({"model": model.state_dict(), "model_config": {**dataclasses.asdict(model.cfg), "n_experts": 4}},
               bogus)
    assert "its model does not match this model.py with its config (TypeError" in error_of("grad", "--ckpt", str(bogus))
    good_bytes = good.read_bytes()
    good.write_bytes(good_bytes[:len(good_bytes) // 2])
    assert "good.pt is not a trainer checkpoint: it is truncated or corrupt" in error_of("act", "--ckpt", str(good))
    torch.save({"model": {}, "model_config": {}, "extra": object()}, good)  # not plain data
    assert "good.pt is not a trainer checkpoint: it holds Python objects" in error_of("act", "--ckpt", str(good))


def test_one_settings_object_owns_the_defaults_of_every_record():
    assert spectra.SpectraSettings.from_config(dataclasses.asdict(train_gpt.Config())) == spectra.DEFAULTS
    run = spectra.SpectraSettings.from_config({"spectra_tail": [10, 100], "grad_spectra_precision": "bf16",
                                               "seq_len": 128})
    assert (run.tail, run.precision, run.seq_len, run.head) == ((10, 100), "bf16", 128, spectra.DEFAULTS.head)
    # a record from before a setting existed: its default, or what such runs measured with where the default changed
    old = spectra.SpectraSettings.from_config({})
    assert old.act_norm == "rms" and old.precision == "fp32" and old.density_rule == "exact"
    assert run.override(tail=None, head=(2, 8)).head == (2, 8) and run.override(tail=None).tail == (10, 100)
    with pytest.raises(ValueError, match=r"spectra_tail=\(10, 5\) is not a rank window"):
        run.override(tail=(10, 5)).check()
    with pytest.raises(ValueError, match=r"--tail=\(10, 5\) is not a rank window"):
        run.override(tail=(10, 5)).check(names={"tail": "--tail"})


def test_the_old_command_line_of_spectra_py_says_where_it_went():
    r = subprocess.run([sys.executable, "spectra.py", "act", "--ckpt", "x.pt"], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "python measure.py act|grad --ckpt" in r.stderr and "python conditions.py" in r.stderr


def test_rms_normalisation_applies_to_residual_points_only():
    model = random_model()
    with torch.no_grad():
        model.wte.weight.mul_(0.01)  # small embeddings, where the eps of the RMS norm shows
    tokens = probe_tokens(64)
    points = ["embed", "L00.fc"]
    on = spectra.measure_activations(model, tokens, S(seq_len=16, act_batch_size=2, act_norm="rms"), points)
    off = spectra.measure_activations(model, tokens, S(seq_len=16, act_batch_size=2, act_norm="none"), points)
    assert on["embed"]["rms"] and not on["L00.fc"]["rms"]
    np.testing.assert_array_equal(on["L00.fc"]["values"], off["L00.fc"]["values"])
    captured = {}
    model.eval()
    with spectra.Probe({"x": model.probe_points()["embed"]}, lambda n, o: captured.setdefault(n, o)):
        with torch.no_grad():
            model.features(tokens.view(4, 16))
    x = captured["x"].double()
    # the documented formula x / sqrt(mean(x^2) + 1e-6), written out in fp64
    x_rms = (x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-6)).reshape(-1, 32).numpy()
    expected = np.linalg.eigvalsh(np.cov(x_rms, rowvar=False))[::-1]
    assert rel(on["embed"]["values"], expected) < 1e-5
    # ... which is not torch's default eps (fp32 epsilon): at these activations the spectra differ
    x_default = F.rms_norm(captured["x"], (32,)).reshape(-1, 32).double().numpy()
    assert rel(on["embed"]["values"], np.linalg.eigvalsh(np.cov(x_default, rowvar=False))[::-1]) > 1e-3


@pytest.mark.parametrize("alpha, outlier", [(2.0, 100.0), (3.0, 1.0), (4.0, 1.0)])
def test_steep_and_outlier_spectra_keep_their_accurate_ranks(alpha, outlier):
    d, n = 256, 8192
    g = torch.Generator().manual_seed(0)
    scales = torch.arange(1, d + 1, dtype=torch.float64) ** (-alpha / 2)
    scales[0] *= math.sqrt(outlier)  # one direction `outlier` times stronger in variance
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))  # rotated off the axes
    x = ((torch.randn(n, d, generator=g, dtype=torch.float64) * scales) @ q.T).float()
    eig = spectra.eigenvalues(spectra.cov_stats(x))
    exact = np.linalg.eigvalsh(np.cov(x.double().numpy(), rowvar=False))[::-1]
    rank = spectra.numerical_rank(eig, d)
    assert rank == np.count_nonzero(exact > spectra.FLOOR * exact[0]) or abs(rank - np.count_nonzero(
        exact > spectra.FLOOR * exact[0])) <= 1  # the floor cuts the exact spectrum at the same place
    assert rank >= {2.0: 90, 3.0: 90, 4.0: 28}[alpha]  # down to ~1e-6 of lambda_1 (outlier included)
    assert np.all(np.abs(eig[:rank] / exact[:rank] - 1) < 0.002)  # every kept eigenvalue within 0.2%


@pytest.mark.parametrize("batch_size", [1, 3])
def test_halves_alternate_over_the_whole_probe_set(batch_size):
    model = random_model()
    act = spectra.measure_activations(model, probe_tokens(7 * 16), S(seq_len=16, act_batch_size=batch_size),
                                      ["L00.mlp_resid"])
    s = act["L00.mlp_resid"]
    assert (s["n_half0"], s["n_half1"]) == (4 * 16, 3 * 16)  # sequences 0,2,4,6 and 1,3,5
    metrics, _ = spectra.summarise(act, "act", S(head=(1, 10), tail=(11, 30)))
    assert math.isfinite(metrics["act/alpha_tail_noise/L00.mlp_resid"])


def test_js_first_uses_the_first_evaluation_where_a_point_has_a_spectrum(tmp_path):
    settings = S(seq_len=16, act_tokens=64)
    meta = settings.meta("act")
    zero, grown, later = np.zeros(8), np.arange(8, 0, -1.0), np.arange(8, 0, -1.0) ** 2

    def save(tokens, spectrum, meta=meta):
        s = dict(values=spectrum, values_half0=spectrum, values_half1=spectrum, n=64, n_half0=32, n_half1=32,
                 width=8, limit=8)
        spectra.save_spectra(spectra.spectra_path(str(tmp_path), "act", tokens), {"L00.attn": s}, meta)
    save(0, zero)
    save(100, grown)
    save(150, later)
    prev, first = spectra.SpectraHistory.load(str(tmp_path), settings, 200).references("act")
    np.testing.assert_array_equal(first["L00.attn"], grown)
    np.testing.assert_array_equal(prev["L00.attn"], later)
    prev, first = spectra.SpectraHistory.load(str(tmp_path), settings.override(act_tokens=128), 200).references("act")
    assert prev == {} and first == {}  # another probe set: nothing to compare with
    save(180, grown, {**meta, "probe_tokens": 128})  # measured on another probe set
    history = spectra.SpectraHistory.load(str(tmp_path), settings, 200)
    np.testing.assert_array_equal(history.references("act")[0]["L00.attn"], later)  # the latest on the same probe set
    assert sorted(history.series["act"]["L00.attn"]) == [0, 100, 150, 180]  # the alpha series holds every evaluation
    # evaluations after the one reported (a folder of measured checkpoints) join the series, not the references
    prev, first = spectra.SpectraHistory.load(str(tmp_path), settings, 120).references("act")
    np.testing.assert_array_equal(prev["L00.attn"], grown)


