import importlib.util
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
from conftest import FP32_ORDER_BOUND, REPO, losses, read_metrics, run_command, tiny_args, torchrun_worker, \
    worker_threads
from test_spectra import in_three_orders, probe_tokens, random_model, rel
from model import compiled_head_grad_rows
from train_gpt import ConfigError, load_config, train

S = spectra.SpectraSettings


def windows(tokens, n, T):
    return tokens[: n * T + 1].unfold(0, T + 1, T)[:n]


def per_example_loop(model, tokens, names, T, n):
    """The seed protocol: one backward per example, its weight gradients as the rows of G."""
    weights = {name: model.linears()[name].weight for name in names}
    rows = {name: [] for name in names}
    model.eval()
    for w in windows(tokens, n, T):
        model.zero_grad(set_to_none=True)
        logits, _ = model(w[None, :-1])
        F.cross_entropy(logits[0], w[1:]).backward()
        for name in names:
            rows[name].append(weights[name].grad.double().flatten().clone())
    model.zero_grad(set_to_none=True)
    return {name: torch.stack(r) for name, r in rows.items()}


def singular_values(G):
    return torch.linalg.svdvals(G).numpy()


def test_singular_values_equal_a_batch_size_one_loop():
    model = random_model(n_layer=3)
    tokens, T, n = probe_tokens(13 * 16 + 1), 16, 13
    names = ["L00.attn.c_proj", "L02.attn.c_proj", "L01.mlp.c_fc", "L01.attn.c_q"]
    got = spectra.measure_gradients(model, tokens, S(seq_len=T, grad_samples=n, grad_batch_size=5),
                                    names)  # batches of 5, 5, 3
    assert all(p.grad is None for p in model.parameters())  # no parameter gradient was written
    for name, G in per_example_loop(model, tokens, names, T, n).items():
        expected = singular_values(G)
        k = spectra.numerical_rank(expected, n)
        assert k == n and rel(got[name]["values"][:k], expected[:k]) < 1e-5, name
        assert got[name]["n"] == n and got[name]["width"] == G.shape[1]


def test_effective_ranks_of_gradient_and_weight_spectra_are_those_of_the_matrices():
    # singular values sigma: stable rank, participation ratio and top-10 share are of the mode
    # energies sigma^2 (||X||_F^2 / ||X||_2^2, as for a covariance), RankMe of sigma itself
    model = random_model(n_layer=2)
    tokens, T, n = probe_tokens(24 * 16 + 1), 16, 24
    name = "L01.attn.c_proj"
    G = per_example_loop(model, tokens, [name], T, n)[name]
    W = model.linears()[name].weight.detach().double()
    measured = {"grad": spectra.measure_gradients(model, tokens, S(seq_len=T, grad_samples=n, grad_batch_size=8),
                                                  [name]),
                "weight": spectra.measure_weights(model, [name])}
    for family, X in (("grad", G), ("weight", W)):
        metrics, _ = spectra.summarise(measured[family], family, S(head=(1, 10), tail=(11, 20)))
        energies = torch.linalg.eigvalsh(X @ X.T).flip(0).clamp(min=0).numpy()
        fro2, spec2 = torch.linalg.matrix_norm(X).item() ** 2, torch.linalg.matrix_norm(X, 2).item() ** 2
        assert metrics[f"{family}/stable_rank/{name}"] == pytest.approx(fro2 / spec2, rel=1e-6), family
        assert metrics[f"{family}/pr/{name}"] == pytest.approx(fro2 ** 2 / (energies ** 2).sum(), rel=1e-6), family
        assert metrics[f"{family}/top10/{name}"] == pytest.approx(energies[:10].sum() / fro2, rel=1e-6), family
        sigma = np.sqrt(energies)
        p = sigma / sigma.sum()
        assert metrics[f"{family}/rankme/{name}"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-6), family


def test_singular_values_equal_vmap_of_grad():
    from torch.func import functional_call, grad, vmap
    model = random_model(n_layer=2).eval()
    tokens, T, n = probe_tokens(6 * 16 + 1), 16, 6
    name = "L01.mlp.c_proj"
    key = "blocks.1.mlp.c_proj.weight"
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_of(weight, x, y):
        logits, _ = functional_call(model, {**params, key: weight}, (x[None],))
        return F.cross_entropy(logits[0], y)
    w = windows(tokens, n, T)
    G = vmap(grad(loss_of), in_dims=(None, 0, 0))(params[key], w[:, :-1], w[:, 1:]).flatten(1).double()
    got = spectra.measure_gradients(model, tokens, S(seq_len=T, grad_samples=n, grad_batch_size=4), [name])
    assert rel(got[name]["values"], singular_values(G)) < 1e-5


def test_blocked_token_gram_and_materialised_grams_agree():
    model = random_model(n_layer=2)
    tokens, T, n = probe_tokens(10 * 16 + 1), 16, 10
    names = ["L00.attn.c_proj", "L01.mlp.c_fc"]
    whole = spectra.gradient_grams(model, tokens, S(seq_len=T, grad_samples=n, grad_batch_size=4,
                                                    method="materialise"), names)
    # 10 x 32 x 8 fp32 entries per block of 8 output rows: several column blocks and passes
    blocked = spectra.gradient_grams(model, tokens, S(seq_len=T, grad_samples=n, grad_batch_size=4,
                                                      max_gb=10 * 32 * 8 * 4 / 2**30, method="materialise"), names)
    tg = spectra.gradient_grams(model, tokens, S(seq_len=T, grad_samples=n, grad_batch_size=4, method="token_gram"),
                                names)
    for name in names:  # the materialised G is held in fp32, the token-Gram's A and B exactly
        assert rel(blocked[name], whole[name]) < 1e-12 and rel(tg[name], whole[name]) < 1e-7
        assert torch.allclose(whole[name], whole[name].T)


def precision_settings():
    return (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.is_autocast_enabled("cpu"),
            torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)


def test_reduced_precision_passes_approximate_the_exact_spectra_and_restore_the_settings(tmp_path):
    model = random_model(n_layer=3)
    tokens, T, n = probe_tokens(24 * 16 + 1), 16, 24
    names = ["L00.attn.c_proj", "L02.mlp.c_fc"]
    exact = spectra.measure_gradients(model, tokens, S(seq_len=T, grad_samples=n, grad_batch_size=8), names)
    before = precision_settings()
    bf16 = spectra.measure_gradients(model, tokens, S(seq_len=T, grad_samples=n, grad_batch_size=8,
                                                      precision="bf16"), names)
    tf32 = spectra.measure_gradients(model, tokens, S(seq_len=T, grad_samples=n, grad_batch_size=8,
                                                      precision="tf32"), names)
    assert precision_settings() == before
    for name in names:
        want = exact[name]["values"]
        k = spectra.numerical_rank(want, n)
        assert k == n
        # bf16 really ran (the values moved) and measures the same spectrum to bf16's resolution
        assert 1e-5 < rel(bf16[name]["values"][:k], want[:k]) < 3e-2, name
        for window in ((1, 5), (5, 20)):
            alphas = [spectra.fit_power_law(v, window, k)["alpha"] for v in (bf16[name]["values"], want)]
            assert abs(alphas[0] - alphas[1]) < 0.01, (name, window, alphas)
        assert rel(tf32[name]["values"], want) < 1e-6  # TF32 is CUDA's: CPU products stay fp32
    with pytest.raises(ValueError, match=r"grad_spectra_precision='fp16': valid values are fp32, tf32, bf16"):
        spectra.measure_gradients(model, tokens, S(seq_len=T, grad_samples=n, precision="fp16"), names)
    with pytest.raises(ConfigError, match=r"grad_spectra_precision='fp16': valid values are fp32, tf32, bf16"):
        load_config(tiny_args(tmp_path, grad_spectra_precision="fp16"))


def test_full_fp32_inside_and_the_callers_matmul_settings_after():
    switches = torch.backends.cuda.matmul, torch.backends.mkldnn.matmul
    seen = []
    for set_by_caller in ("legacy", "per-backend"):
        if set_by_caller == "legacy":  # as the trainer on CUDA
            torch.set_float32_matmul_precision("high")
        else:  # torch >= 2.9's own switches; the legacy getter then refuses to answer
            switches[0].fp32_precision, switches[1].fp32_precision = "tf32", "bf16"
        before = tuple(s.fp32_precision for s in switches)
        try:
            with spectra.fp32_matmuls():
                seen.append(tuple(s.fp32_precision for s in switches))
            with spectra.fp32_matmuls(tf32=True):
                seen.append(tuple(s.fp32_precision for s in switches))
            assert tuple(s.fp32_precision for s in switches) == before
        finally:
            switches[0].fp32_precision = switches[1].fp32_precision = "none"
            torch.set_float32_matmul_precision("highest")
    assert seen == [("ieee", "ieee"), ("tf32", "ieee")] * 2  # CPU products stay fp32 under tf32


def test_passes_cover_every_output_row_once_within_the_budget():
    # d48's default five attn.c_proj (1600 x 1600) on 512 sequences: 24.4 GB of G (fp32) under 8 GB a pass
    shapes = {f"L{i:02d}.attn.c_proj": (1600, 1600) for i in (0, 12, 24, 35, 47)}
    assert len(spectra.plan_passes(shapes, 512, 1024, 8.0)) == math.ceil(5 * 512 * 1600 ** 2 * 4 / 2 ** 30 / 8) == 4
    rng = np.random.default_rng(0)
    for _ in range(300):
        n, T = int(rng.integers(2, 40)), int(rng.integers(1, 20))
        shapes = {f"m{k}": tuple(int(v) for v in rng.integers(1, 60, size=2)) for k in range(int(rng.integers(1, 5)))}
        budget = int(rng.integers(1, 4 * n * 60))
        passes = spectra.plan_passes(shapes, n, T, (budget + 0.5) * 4 / 2 ** 30)
        for name, (d_out, d_in) in shapes.items():
            jobs = [rows for p in passes for m, rows in p if m == name]
            if jobs == [None]:  # token-Gram: A and B held whole
                continue
            covered = sorted(i for rows in jobs for i in range(rows.start, rows.stop))
            assert covered == list(range(d_out))
        for p in passes:
            held = sum(spectra.held_entries(shapes[m], n, T, rows) for m, rows in p)
            assert held <= budget or (len(p) == 1 and p[0][1] is not None and p[0][1].stop - p[0][1].start == 1)
        # each pass is full: the row that opens the next one would not have fitted
        dense = [p for p in passes if p[0][1] is not None]
        for p, q in zip(dense, dense[1:]):
            held = sum(spectra.held_entries(shapes[m], n, T, rows) for m, rows in p if rows is not None)
            assert held + n * shapes[q[0][0]][1] > budget


def test_the_token_gram_counts_its_inputs_against_max_gb(tmp_path):
    model = random_model(n_layer=2)
    tokens, T, n = probe_tokens(10 * 2 + 1), 2, 10  # short sequences: auto prefers the token-Gram
    linears = model.linears()
    names = ["L00.attn.c_proj", "L01.mlp.c_fc"]
    shapes = {m: tuple(linears[m].weight.shape) for m in names}
    assert all(spectra.gram_method(n, T, d_in, d_out) == "token_gram" for d_out, d_in in shapes.values())
    ab = {m: n * T * (d_in + d_out) for m, (d_out, d_in) in shapes.items()}  # fp32 entries of A and B
    budget = ab["L00.attn.c_proj"] + n * 8 * shapes["L01.mlp.c_fc"][1]  # room for one A, B and 8 rows of G
    max_gb = (budget + 0.5) * 4 / 2 ** 30
    passes = spectra.plan_passes(shapes, n, T, max_gb)
    # the second does not fit beside the first: materialised in column blocks, and the first rides
    # along with the pass that has room for it rather than costing a sweep of its own
    token = [(m, p) for p, jobs in enumerate(passes) for m, rows in jobs if rows is None]
    assert token == [("L00.attn.c_proj", len(passes) - 1)] and len(passes[-1]) == 2
    for jobs in passes:
        held = sum(n * (r.stop - r.start) * shapes[m][1] if r is not None else ab[m] for m, r in jobs)
        assert held <= budget
    rows = sorted((r.start, r.stop) for jobs in passes for _, r in jobs if r is not None)
    assert rows[0][0] == 0 and rows[-1][1] == shapes["L01.mlp.c_fc"][0]
    assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
    whole = spectra.gradient_grams(model, tokens, S(seq_len=T, grad_samples=n, grad_batch_size=4), names)
    planned = spectra.gradient_grams(model, tokens, S(seq_len=T, grad_samples=n, grad_batch_size=4, max_gb=max_gb),
                                     names)
    # L00 by the token-Gram in both; L01's G materialised (held in fp32) rather than its token-Gram
    assert rel(planned[names[0]], whole[names[0]]) < 1e-12 and rel(planned[names[1]], whole[names[1]]) < 1e-7
    with pytest.raises(ValueError, match=r"method 'token_gram' \(grad_spectra_method, --method\): L01.mlp.c_fc needs "
                                         r"the inputs and output gradients of all 10 examples at once, .* raise "
                                         r"grad_spectra_max_gb \(--max_gb\) to 1.67e-05 or more"):
        spectra.gradient_grams(model, tokens, S(seq_len=T, grad_samples=n, max_gb=max_gb, method="token_gram"), names)
    # the trainer refuses it before anything is written
    with pytest.raises(ConfigError, match=r"method 'token_gram' .*: L0\d.attn.c_proj needs the inputs"):
        load_config(tiny_args(tmp_path, grad_spectra_method="token_gram", grad_samples=512, grad_spectra_max_gb=0.01))


def test_the_trainer_measures_at_its_grad_spectra_precision_and_compiles_on_request(tmp_path):
    runs = {p: train(load_config(tiny_args(tmp_path, run_name=p, max_steps=2, grad_spectra_precision=p)))
            for p in ("fp32", "bf16")}
    compiled_head_grad_rows.cache_clear()
    runs["compiled"] = train(load_config(tiny_args(tmp_path, run_name="compiled", max_steps=2,
                                                   grad_spectra_compile=1)))
    assert compiled_head_grad_rows.cache_info().currsize == 1  # the passes asked for the compiled head
    for other in ("bf16", "compiled"):  # training itself unchanged
        assert losses(read_metrics(runs["fp32"])) == losses(read_metrics(runs[other]))
    (_, fp32), (_, bf16), (_, compiled) = (spectra.spectra_files(runs[p], "grad")[-1] for p in runs)
    (a, meta_a, _), (b, meta_b, _), (c, _, _) = (spectra.load_spectra(f) for f in (fp32, bf16, compiled))
    assert (meta_a["precision"], meta_b["precision"]) == ("fp32", "bf16")
    for name in a:
        assert 1e-5 < rel(b[name], a[name]) < 3e-2, name
        assert rel(c[name], a[name]) < 1e-6, name  # the compiled head: the same sums, up to their order


def test_g_held_in_fp32_keeps_the_ranks_and_fits_of_fp64():
    model = random_model(n_layer=2).eval()
    tokens, T, n = probe_tokens(40 * 16 + 1), 16, 40
    names = ["L00.attn.c_proj", "L01.mlp.c_fc"]
    w = windows(tokens, n, T)
    ab = spectra.per_example_outputs(model, {m: model.linears()[m] for m in names}, w[:, :-1], w[:, 1:])
    for name in names:
        G = spectra.per_example_rows(*ab[name], slice(None))  # fp64
        held = G.float()
        K = spectra.gram_fp64(held)
        assert rel(spectra.gram_fp64(held, chunk_elements=7 * n), K) < 1e-13  # column chunks: the same sum
        order = torch.randperm(n, generator=torch.Generator().manual_seed(1)).tolist()
        assert rel(spectra.gathered_gram(held[order], order, n, 0, 1), K) < 1e-13  # rows out of sample order
        exact, got = spectra.gram_spectrum(G @ G.T), spectra.gram_spectrum(K)
        k = spectra.numerical_rank(exact, n)
        assert spectra.numerical_rank(got, n) == k
        assert 0 < np.abs(got - exact).max() / exact[0] < 1e-7
        for window in ((1, 10), (10, 30)):
            fits = [spectra.fit_power_law(v, window, k)["alpha"] for v in (got, exact)]
            assert abs(fits[0] - fits[1]) < 1e-6


def test_gram_method_follows_the_cost_estimate():
    assert spectra.gram_method(512, 1024, 768, 768) == "materialise"  # long sequences: build G
    assert spectra.gram_method(64, 4, 3072, 768) == "token_gram"  # short sequences, wide matrix
    assert spectra.gram_method(64, 4, 3072, 768, "materialise") == "materialise"


def test_noise_scale_of_linear_regression_equals_its_closed_form():
    rng = np.random.default_rng(0)
    n, d = 200, 5
    X, w = rng.normal(size=(n, d)), rng.normal(size=d)
    y = X @ w + rng.normal(size=n) + 0.5  # residuals with a mean: the mean gradient is not zero
    G = (X @ (0.3 * w) - y)[:, None] * X  # per-example gradients of 0.5 (x.w' - y)^2 at w' = 0.3 w
    mean = G.mean(0)
    closed = np.trace(np.cov(G, rowvar=False)) / (mean @ mean)
    K = torch.from_numpy(G @ G.T)
    assert spectra.noise_scale(K) == pytest.approx(closed, rel=1e-10)


def test_weight_spectra_and_density_exponent():
    model = random_model(n_layer=2)
    got = spectra.measure_weights(model, ["L01.mlp.c_fc"])["L01.mlp.c_fc"]
    W = model.linears()["L01.mlp.c_fc"].weight.detach().double().numpy()
    assert rel(got["values"], np.linalg.svd(W, compute_uv=False)) < 1e-12
    # rank-ordered lambda_i = i^-r has density exponent 1 + 1/r
    for r in (0.5, 1.0, 2.0):
        a, x_min, ks = spectra.density_exponent(np.arange(1, 5001, dtype=np.float64) ** -r)
        assert a == pytest.approx(1 + 1 / r, rel=0.05) and ks < 0.05
    # the logged pair: rank exponent of the singular values and density exponent of their squares
    sigma = np.arange(1, 2001, dtype=np.float64) ** -0.5
    alpha = spectra.fit_power_law(sigma, (1, 2000))["alpha"]
    assert spectra.density_exponent(sigma ** 2)[0] == pytest.approx(1 + 1 / (2 * alpha), rel=0.05)
    pareto = (1 - np.random.default_rng(1).random(20000)) ** (-1 / 2.0)  # density exponent 3
    assert spectra.density_exponent(pareto)[0] == pytest.approx(3.0, abs=0.1)


def student_t_weights(df, rows, cols, seed):
    """A heavy-tailed weight matrix, fp32 as a layer holds it."""
    return torch.from_numpy(np.random.default_rng(seed).standard_t(df, (rows, cols))).float()


def one_sided_fit(lam, floor=1e-5):
    """WeightWatcher's fit written out with Python numbers: each sorted eigenvalue but the largest as
    x_min, a = 1 + m / sum log(x / x_min), D = max over the tail's values x_j (j = 0..m-1) of
    |1 - (x_j / x_min)^(1 - a) - j / m|, the first smallest D."""
    lam = sorted(float(v) for v in lam if v > floor)
    best = (math.nan, math.nan, math.inf)
    for k in range(len(lam) - 1):
        tail = lam[k:]
        s = sum(math.log(x / tail[0]) for x in tail)
        if s <= 0:
            continue
        a = 1 + len(tail) / s
        d = max(abs(1 - (x / tail[0]) ** (1 - a) - j / len(tail)) for j, x in enumerate(tail))
        if d < best[2]:
            best = (a, tail[0], d)
    return best


def test_the_density_exponent_follows_weightwatchers_rule_and_keeps_the_exact_one():
    lam = np.linalg.svd(student_t_weights(3, 120, 200, seed=3).double().numpy(), compute_uv=False) ** 2
    ours = spectra.density_exponent(lam)
    assert ours == pytest.approx(one_sided_fit(lam), rel=1e-9)
    exact = spectra.density_exponent(lam, rule="exact")
    assert exact[1] != ours[1] and abs(exact[0] - ours[0]) > 0.05  # the two rules choose other x_min here
    assert all(math.isnan(v) for v in spectra.density_exponent(np.zeros(10)))  # zero weights: nothing to fit


@pytest.mark.skipif(importlib.util.find_spec("weightwatcher") is None,
                    reason="weightwatcher is a test-only dependency (requirements-test.txt)")
def test_the_density_exponent_equals_the_weightwatcher_package(tmp_path):
    """WeightWatcher's own alpha, xmin and D of nn.Linear layers, computed in a process of its own (its import
    changes the warning filters and logging of the process that imports it)."""
    shapes = [(3, 100, 300), (2, 300, 300), (3, 300, 300), (4, 300, 300), (None, 64, 128), (3, 16, 16)]
    weights = [torch.randn(r, c, generator=torch.Generator().manual_seed(0)) if df is None
               else student_t_weights(df, r, c, seed=k) for k, (df, r, c) in enumerate(shapes)]
    torch.save(weights, tmp_path / "weights.pt")
    script = f"""
import json, warnings, torch, weightwatcher as ww
rows = []
for W in torch.load({str(tmp_path / "weights.pt")!r}):
    layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    layer.weight.data.copy_(W)
    d = ww.WeightWatcher(model=torch.nn.Sequential(layer)).analyze()
    rows.append([float(d["alpha"].iloc[0]), float(d["xmin"].iloc[0]), float(d["D"].iloc[0])])
print("RESULT" + json.dumps(rows))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # on CUDA it rounds weights to fp16 first
    assert r.returncode == 0, r.stderr[-2000:]
    theirs = json.loads(r.stdout.split("RESULT")[-1])
    for W, (alpha, xmin, d) in zip(weights, theirs):
        layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
        layer.weight.data.copy_(W)
        lam = torch.linalg.svdvals(layer.weight.detach().double()).numpy() ** 2
        a, x_min, ks = spectra.density_exponent(lam)
        assert (a, x_min, ks) == pytest.approx((alpha, xmin, d), rel=1e-6), W.shape


def test_non_finite_gradients_give_nan_metrics_and_a_warning():
    model = random_model(n_layer=2)
    with torch.no_grad():
        model.blocks[1].mlp.c_fc.weight[0, 0] = float("nan")
    got = spectra.measure_gradients(model, probe_tokens(4 * 16 + 1), S(seq_len=16, grad_samples=4,
                                                                       grad_batch_size=2), ["L01.attn.c_proj"])
    metrics, notes = spectra.summarise(got, "grad", S(head=(1, 10), tail=(30, 150)), where="at step 3")
    assert math.isnan(metrics["grad/alpha_head/L01.attn.c_proj"])
    assert any("L01.attn.c_proj at step 3: non-finite" in n for n in notes)


def test_few_samples_clip_the_windows_with_a_warning():
    model = random_model(n_layer=2)
    got = spectra.measure_gradients(model, probe_tokens(12 * 16 + 1), S(seq_len=16, grad_samples=12,
                                                                        grad_batch_size=4), ["L00.attn.c_proj"])
    metrics, notes = spectra.summarise(got, "grad", S(head=(1, 10), tail=(5, 150)))
    assert any("tail window [5, 150] clipped to the 12 valid ranks" in n for n in notes)
    assert math.isfinite(metrics["grad/alpha_tail/L00.attn.c_proj"])
    assert metrics["grad/valid_rank/L00.attn.c_proj"] == 12


def test_a_probe_too_short_for_the_samples_is_an_error():
    model = random_model(n_layer=2)
    with pytest.raises(ValueError, match=r"64 tokens hold 3 windows of 16 \+ 1 tokens: .* n_samples=4 need 65 tokens"):
        spectra.measure_gradients(model, probe_tokens(64), S(seq_len=16, grad_samples=4), ["L00.attn.c_proj"])
    with pytest.raises(ValueError, match=r"n_samples >= 2"):
        spectra.measure_gradients(model, probe_tokens(17), S(seq_len=16, grad_samples=1), ["L00.attn.c_proj"])
    assert math.isnan(spectra.noise_scale(torch.ones(1, 1, dtype=torch.float64)))  # no spread from one example


def test_matrix_and_layer_selection_and_errors():
    names = random_model(n_layer=12, n_embd=16).linears()
    assert spectra.default_layers(12) == [0, 3, 6, 8, 11] and spectra.default_layers(2) == [0, 1]
    assert spectra.select_linears(names, 12) == [f"L{i:02d}.attn.c_proj" for i in (0, 3, 6, 8, 11)]
    assert spectra.select_linears(names, 12, "mlp.c_proj,attn.c_v", "all")[:2] == ["L00.mlp.c_proj", "L00.attn.c_v"]
    with pytest.raises(ValueError, match=r"'attn.proj' is not a matrix of a block; valid names are attn.c_q, "):
        spectra.select_linears(names, 12, "attn.proj")
    with pytest.raises(ValueError, match=r"layers run from 0 to 11"):
        spectra.select_linears(names, 12, "attn.c_proj", "3,12")
    with pytest.raises(ConfigError, match=r"'mlp.fc' is not a matrix of a block"):
        load_config(tiny_args("/tmp", grad_matrices="mlp.fc"))


def test_gradient_spectra_leave_the_training_trajectory_unchanged(tmp_path):
    args = tiny_args(tmp_path, max_steps=6, eval_every_tokens=256, dropout=0.1, grad_matrices="attn.c_proj,mlp.c_fc",
                     grad_spectra_every=1)
    on_dir = train(load_config(args + ["--run_name=on"]))
    off_dir = train(load_config(args + ["--run_name=off", "--grad_spectra_every=0"]))
    on, off = read_metrics(on_dir), read_metrics(off_dir)
    assert losses(on) == losses(off) and any("grad/alpha_head/L01.mlp.c_fc" in r for r in on)
    assert not any("grad/alpha_head/L01.mlp.c_fc" in r for r in off)
    a, b = (torch.load(train_gpt.checkpoints(d)[-1], weights_only=True) for d in (on_dir, off_dir))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for sa, sb in zip(a["optimizers"], b["optimizers"]):
        for pa, pb in zip(sa["state"].values(), sb["state"].values()):
            assert all(torch.equal(pa[k], pb[k]) for k in pa if torch.is_tensor(pa[k]))
    assert all(torch.equal(x, y) for x, y in zip(a["rng"][0].values(), b["rng"][0].values()) if x is not None)
    assert a["data"] == b["data"]
    files = dict(spectra.spectra_files(on_dir, "grad"))
    assert sorted(files) == [0, 256, 512, 768]
    sv, meta, limits = spectra.load_spectra(files[768])
    assert set(sv) == {"L00.attn.c_proj", "L00.mlp.c_fc", "L01.attn.c_proj", "L01.mlp.c_fc"}
    assert limits["L00.mlp.c_fc"] == 8  # 8 samples
    assert spectra.spectra_files(on_dir, "weight")[-1][0] == 768


DDP_WORKER = """
import sys, numpy as np, torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
import spectra
from test_spectra import probe_tokens, random_model
S = spectra.SpectraSettings
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
model = random_model("modded", n_layer=2)
names = ["L00.attn.c_proj", "L01.mlp.c_fc"]
tokens, seven = probe_tokens(7 * 16 + 1), S(seq_len=16, grad_samples=7, grad_batch_size=2)
got = spectra.measure_gradients(model, tokens, seven, names, rank, world)
tg = spectra.measure_gradients(model, tokens, seven.override(method="token_gram"), names, rank, world)
bf = spectra.measure_gradients(model, tokens, seven.override(precision="bf16"), names, rank, world)
# a budget for 3 rows of 32 of this rank's 4 samples: several passes, each rank's share planned
small = spectra.measure_gradients(model, tokens, seven.override(max_gb=4 * 3 * 32 * 4 / 2 ** 30, method="materialise"),
                                  names, rank, world)
# G's rows spread over the ranks out of order, gathered 3 columns at a time
G = torch.randn(7, 10, generator=torch.Generator().manual_seed(0))
index = [5, 1, 3] if rank == 0 else [6, 0, 4, 2]
K = spectra.gathered_gram(G[index].float(), index, 7, rank, world, chunk_elements=3 * 7)
# 3 examples in one batch of 4: rank 1 has no batch at all
lone = spectra.measure_gradients(model, probe_tokens(3 * 16 + 1), S(seq_len=16, grad_samples=3, grad_batch_size=4),
                                 names, rank, world)
if rank == 0:
    np.savez({out!r}, **{{n: got[n]["values"] for n in names}}, **{{"tg" + n: tg[n]["values"] for n in names}},
             **{{"lone" + n: lone[n]["values"] for n in names}}, **{{"bf" + n: bf[n]["values"] for n in names}},
             **{{"small" + n: small[n]["values"] for n in names}},
             gram=(K - G.float().double() @ G.float().double().T).abs().max().numpy())
import train_gpt
train_gpt.close_process_group()
"""


def test_two_processes_give_the_same_singular_values_as_one(tmp_path):
    ddp = torchrun_worker(tmp_path, DDP_WORKER)
    names = ["L00.attn.c_proj", "L01.mlp.c_fc"]
    model = random_model("modded", n_layer=2)
    seven, three = S(seq_len=16, grad_samples=7, grad_batch_size=2), S(seq_len=16, grad_samples=3, grad_batch_size=4)
    with worker_threads():  # the workers' arithmetic: fp32 products may round differently with more threads
        one = spectra.measure_gradients(model, probe_tokens(7 * 16 + 1), seven, names)
        lone = spectra.measure_gradients(model, probe_tokens(3 * 16 + 1), three, names)
        bf = spectra.measure_gradients(model, probe_tokens(7 * 16 + 1), seven.override(precision="bf16"), names)
    for name in names:  # 4 batches (2, 2, 2, 1): rank 0 takes batches 0 and 2, rank 1 batches 1 and 3
        assert rel(ddp[name], one[name]["values"]) < 1e-10 and rel(ddp["tg" + name], one[name]["values"]) < 1e-7
        assert rel(ddp["lone" + name], lone[name]["values"]) < 1e-10
        # approximate passes are still the same numbers in one process and two
        assert rel(ddp["bf" + name], bf[name]["values"]) < 1e-10 and rel(bf[name]["values"], one[name]["values"]) > 1e-6
        # several passes, planned for each rank's share (4 of 7 samples), gathered in column chunks
        assert rel(ddp["small" + name], one[name]["values"]) < 1e-10
    assert float(ddp["gram"]) < 1e-12  # rows out of order on both ranks, 3 columns per gather


def test_the_thread_count_moves_singular_values_by_fp32_rounding_only(monkeypatch):
    """What 1 and N processes at different thread counts may differ by (conftest.FP32_ORDER_BOUND).
    7-token windows, one per batch: 7-row products with the head, which MKL rounds differently with 1
    and 2 threads on AVX2 (11 fp32 epsilons of sigma_1 measured); and every Linear's sum split in two
    halves, another summation order that certainly differs."""
    names = ["L00.attn.c_proj", "L01.mlp.c_fc"]
    model = random_model("modded", n_layer=2, seq_len=7)
    tokens, settings = probe_tokens(12 * 7 + 1), S(seq_len=7, grad_samples=12, grad_batch_size=1)
    one, two, split = in_three_orders(monkeypatch, lambda: spectra.measure_gradients(model, tokens, settings, names))
    for name in names:
        assert rel(two[name]["values"], one[name]["values"]) < FP32_ORDER_BOUND, name
        assert 0 < rel(split[name]["values"], one[name]["values"]) < FP32_ORDER_BOUND, name


def test_checkpoint_command_measures_the_same_gradient_spectra_as_the_trainer(tmp_path, capsys):
    run_dir = train(load_config(tiny_args(tmp_path, max_steps=3, eval_every_tokens=0, ckpt_every_tokens=0)))
    ckpt, = train_gpt.checkpoints(run_dir)
    r = subprocess.run([sys.executable, "measure.py", "grad", "--ckpt", ckpt, "--no_plots"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "grad spectra:" in r.stdout and "weight spectra:" in r.stdout and "L01.attn.c_proj" in r.stdout
    for family in ("grad", "weight"):
        (tokens, mine), = [(t, f) for t, f in spectra.spectra_files(run_dir, family) if t > 0]
        (t2, theirs), = spectra.spectra_files(os.path.join(run_dir, "measured"), family)
        a, b = spectra.load_spectra(mine)[0], spectra.load_spectra(theirs)[0]
        assert t2 == tokens == 3 * 4 * 32 and list(a) == list(b) == ["L00.attn.c_proj", "L01.attn.c_proj"]
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
    r = run_command(measure.main, ["grad", "--ckpt", ckpt, "--matrices", "attn.proj"], capsys)
    assert r.returncode == 2 and "'attn.proj' is not a matrix of a block; valid names are" in r.stderr
    r = run_command(measure.main, ["grad", "--ckpt", ckpt, "--method", "token_gram", "--max_gb", "1e-6"], capsys)
    assert r.returncode == 2 and "raise grad_spectra_max_gb (--max_gb) to" in r.stderr
    out = str(tmp_path / "bf16")
    r = run_command(measure.main, ["grad", "--ckpt", ckpt, "--no_plots", "--precision", "bf16", "--out", out],
                    capsys)
    assert r.returncode == 0, r.stderr[-3000:]
    (_, bf16), = spectra.spectra_files(out, "grad")
    assert spectra.load_spectra(bf16)[1]["precision"] == "bf16"


def test_activation_spectra_read_their_own_probe_slice_when_gradients_need_more(tmp_path):
    run_dir = train(load_config(tiny_args(tmp_path, max_steps=2, eval_every_tokens=0, spectra_tokens=128,
                                          grad_samples=8, grad_spectra_every=1)))  # 128 act tokens, 256 for grads
    (_, act_file), (_, grad_file) = (spectra.spectra_files(run_dir, f)[0] for f in ("act", "grad"))
    with np.load(act_file) as z:
        assert z["embed@n"][0] == 128 and z["meta.probe_tokens"] == 128
    with np.load(grad_file) as z:
        assert z["L00.attn.c_proj@n"][0] == 8 and z["meta.probe_tokens"] == 256
