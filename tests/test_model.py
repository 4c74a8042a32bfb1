import math

import pytest
import torch
import torch.nn.functional as F

from model import (ARCH_FLAGS, BLOCK_LINEARS, BLOCK_POINTS, GPT, PRESETS, PROFILES, GPTConfig, apply_rotary,
                   make_config, rotary_tables)

V, T = 97, 16


def tiny(preset="modded", **kw):
    kw = {**dict(n_layer=4, n_head=2, n_embd=32, seq_len=T, vocab_size=V), **kw}
    return make_config(preset, "d12", **kw)


def flag_variants():
    """Every intervention flag flipped from each preset, plus the attention scale and dropout."""
    out = []
    for preset in PRESETS:
        for flag in ARCH_FLAGS:
            value = PRESETS[preset][flag]
            flipped = {"pos": {"learned": "rotary", "rotary": "learned"}, "norm": {"rms": "layer", "layer": "rms"},
                       "act": {"gelu_tanh": "relu2", "gelu": "relu2", "relu2": "gelu"}}.get(flag, {}).get(value)
            if flipped is None:
                flipped = (0.0 if value else 30.0) if flag == "softcap" else (not value)
            out.append((preset, {flag: flipped}))
        out += [(preset, {"attn_scale": 0.12}), (preset, {"dropout": 0.1})]
    return out + [("gpt2", {"act": "gelu"})]  # the exact GELU, kept next to GPT-2's tanh form


@pytest.mark.parametrize("preset,overrides", flag_variants(), ids=lambda v: str(v))
def test_every_flag_runs_forward_and_backward(preset, overrides):
    torch.manual_seed(0)
    model = GPT(tiny(preset, **overrides))
    idx = torch.randint(0, V, (3, T))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, T, V)
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    # the probe points and Linear names do not depend on the flags
    reference = GPT(tiny())
    assert list(model.probe_points()) == list(reference.probe_points())
    assert list(model.linears()) == list(reference.linears())


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_causal(preset):
    """Logits at position t depend on tokens 0..t only."""
    torch.manual_seed(0)
    model = GPT(tiny(preset)).eval()
    with torch.no_grad():  # random weights everywhere: zero-initialised projections would hide leaks
        for p in model.parameters():
            p.normal_(0, 0.2)
    a = torch.randint(0, V, (2, T))
    b = a.clone()
    b[:, 9:] = torch.randint(0, V, (2, T - 9))
    with torch.no_grad():
        la, _ = model(a)
        lb, _ = model(b)
    assert torch.equal(la[:, :9], lb[:, :9])
    assert not torch.allclose(la[:, 9:], lb[:, 9:])


def test_attention_matches_naive_softmax():
    """The SDPA path equals an explicit masked softmax(q k^T * scale) v, with QK-norm and rotary off."""
    torch.manual_seed(0)
    cfg = tiny("gpt2", attn_scale=0.3, bias=False)
    attn = GPT(cfg).blocks[0].attn
    x = torch.randn(2, T, cfg.n_embd)
    H, D = cfg.n_head, cfg.n_embd // cfg.n_head
    q, k, v = (lin(x).view(2, T, H, D).transpose(1, 2) for lin in (attn.c_q, attn.c_k, attn.c_v))
    scores = (q @ k.transpose(-1, -2)) * 0.3
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    expected = attn.c_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, T, cfg.n_embd))
    torch.testing.assert_close(attn(x, None, None)[0], expected, rtol=1e-5, atol=1e-6)


def test_probe_points_capture_every_activation_with_the_right_width():
    cfg = tiny()
    model = GPT(cfg).eval()
    seen = {}
    hooks = [tap.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.shape))
             for name, tap in model.probe_points().items()]
    model(torch.randint(0, V, (2, T)))
    for h in hooks:
        h.remove()
    expected = ["embed"] + [f"L{i:02d}.{p}" for i in range(cfg.n_layer) for p in BLOCK_POINTS] + ["final"]
    assert list(seen) == expected  # each fired once, in forward order
    for name, shape in seen.items():
        width = 4 * cfg.n_embd if name.endswith((".fc", ".act")) else cfg.n_embd
        assert shape == (2, T, width), name


@pytest.mark.parametrize("act", [None, "gelu"])
def test_probe_point_values_are_what_their_names_say(act):
    """Residual bookkeeping: attn_resid = block input + attn; mlp_resid = attn_resid + proj; act = f(fc):
    GPT-2's tanh-form GELU in the gpt2 preset, the exact (erf) one with act="gelu"."""
    torch.manual_seed(0)
    model = GPT(tiny("gpt2", **({"act": act} if act else {}))).eval()
    acts = {}
    for name, tap in model.probe_points().items():
        tap.register_forward_hook(lambda m, i, o, name=name: acts.__setitem__(name, o))
    model(torch.randint(0, V, (2, T)))
    torch.testing.assert_close(acts["L01.attn_resid"], acts["L00.mlp_resid"] + acts["L01.attn"])
    torch.testing.assert_close(acts["L01.mlp_resid"], acts["L01.attn_resid"] + acts["L01.proj"])
    assert torch.equal(acts["L01.act"], F.gelu(acts["L01.fc"], approximate="none" if act else "tanh"))
    torch.testing.assert_close(acts["L00.ln1"], model.blocks[0].ln_1(acts["embed"]))


def test_linears_are_the_named_layers():
    cfg = tiny()
    model = GPT(cfg)
    lin = model.linears()
    assert len(lin) == cfg.n_layer * len(BLOCK_LINEARS)
    assert lin["L02.attn.c_proj"] is model.blocks[2].attn.c_proj
    assert lin["L03.mlp.c_fc"].weight.shape == (4 * cfg.n_embd, cfg.n_embd)
    assert GPT(tiny(n_layer=12)).linears().keys() >= {"L11.attn.c_q", "L00.mlp.c_proj"}


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_profiles_have_the_stated_shape_and_size(profile):
    L, H, d = {"d12": (12, 6, 768), "d24": (24, 16, 1024), "d36": (36, 20, 1280), "d48": (48, 25, 1600)}[profile]
    for preset in PRESETS:
        with torch.device("meta"):
            model = GPT(make_config(preset, profile))
        cfg = model.cfg
        assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size) == (L, H, d, 50304)
        counts = model.param_counts()
        V = 50304
        if preset == "gpt2":  # biases, two LayerNorms per block, learned positions, tied head
            blocks = L * (12 * d * d + 13 * d)
            expected = blocks + V * d + 1024 * d + 2 * d
        else:  # bias-free; 2 value-embedding mixing weights in 6 layers; 3 value embeddings; untied head
            blocks = L * 12 * d * d + 2 * 6
            expected = blocks + V * d + 3 * V * d + V * d + L // 2
        assert counts["blocks"] == blocks
        assert counts["total"] == expected


def test_initialisation_follows_the_preset():
    modded, gpt2 = GPT(tiny("modded")), GPT(tiny("gpt2"))
    assert all(torch.count_nonzero(b.attn.c_proj.weight) == 0 for b in modded.blocks)
    assert torch.count_nonzero(modded.lm_head.weight) == 0
    assert gpt2.lm_head.weight is gpt2.wte.weight
    std = gpt2.blocks[0].mlp.c_proj.weight.std().item()
    assert math.isclose(std, 0.02 / math.sqrt(2 * 4), rel_tol=0.1)


def test_softcap_bounds_the_logits():
    torch.manual_seed(0)
    model = GPT(tiny("gpt2", softcap=2.0))
    with torch.no_grad():
        model.lm_head.weight.mul_(1000)  # would give logits in the hundreds
        logits, _ = model(torch.randint(0, V, (2, T)))
    assert logits.abs().max() <= 2.0
    assert logits.abs().max() > 1.9


@pytest.mark.parametrize("preset,softcap", [("modded", 15.0), ("modded", 2.0), ("gpt2", 0.0)])
def test_sequence_loss_grad_is_the_gradient_of_each_sequences_mean_loss(preset, softcap):
    torch.manual_seed(0)
    model = GPT(tiny(preset, softcap=softcap)).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)  # logits of a few units: the softcap's tanh is not linear
    h = torch.randn(3, T, model.cfg.n_embd, requires_grad=True)
    targets = torch.randint(0, V, (3, T))
    logits = model.lm_head(h)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    per_sequence = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(3, T).mean(1)
    want, = torch.autograd.grad(per_sequence.sum(), h, retain_graph=True)
    for chunk in (None, 8 * V, 1):  # whole, 8-row chunks, and the smallest chunk (8 rows) from a too-small budget
        got = model.sequence_loss_grad(h.detach(), targets, chunk)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # compiled (grad_spectra_compile): the same arithmetic, its softmax sums perhaps in another order
    torch.testing.assert_close(model.sequence_loss_grad(h.detach(), targets, 8 * V, compiled=True), want,
                               rtol=1e-5, atol=1e-7)
    # the head's products in bf16 (grad_spectra_precision='bf16'): fp32 result, to bf16's resolution
    fast = model.sequence_loss_grad(h.detach(), targets, dtype=torch.bfloat16)
    error = ((fast - want).norm() / want.norm()).item()
    assert fast.dtype == torch.float32 and 1e-5 < error < 2e-2, error
    # sequence 1's own loss only reaches sequence 1's rows
    only, = torch.autograd.grad(per_sequence[1], h)
    assert only[0].abs().max() == 0 and torch.allclose(only[1], want[1])


def test_value_embeddings_reach_the_layers_modded_uses():
    model = GPT(tiny(n_layer=8))
    assert model.ve_index == [0, 1, 2, None, None, 0, 1, 2]
    assert [b.attn.ve_lambdas is not None for b in model.blocks] == [i != 3 and i != 4 for i in range(8)]


def test_unet_skips_pair_layers_last_in_first_out():
    """Block i of the second half receives the output of block L-1-i, weighted by its skip weight."""
    model = GPT(tiny(n_layer=6)).eval()
    with torch.no_grad():
        model.skip_weights.copy_(torch.tensor([0.3, 0.5, 0.7]))
    inputs, outputs = {}, {}
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0]))
        block.register_forward_hook(lambda m, args, out, i=i: outputs.__setitem__(i, out[0]))  # (x, v)
    model(torch.randint(0, V, (2, T)))
    for i, w in zip((3, 4, 5), (0.3, 0.5, 0.7)):
        torch.testing.assert_close(inputs[i], outputs[i - 1] + w * outputs[5 - i])
    torch.testing.assert_close(inputs[1], outputs[0])  # the first half is a plain stack


def test_rotary_scores_depend_on_relative_position_only():
    torch.manual_seed(0)
    cos, sin = rotary_tables(16, 8, 10000.0)
    q, k = torch.randn(8), torch.randn(8)
    x = torch.zeros(2, 16, 1, 8)
    x[0, :] = q
    x[1, :] = k
    rq, rk = apply_rotary(x, cos, sin)[:, :, 0]
    scores = rq @ rk.T  # scores[m, n] = <R_m q, R_n k>
    for shift in (0, 3, -5):
        diagonal = torch.diagonal(scores, offset=-shift)
        torch.testing.assert_close(diagonal, diagonal[0].expand_as(diagonal))
    torch.testing.assert_close(rq.norm(dim=-1), q.norm().expand(16))
    assert not torch.allclose(scores[5, 0], scores[5, 4])


def test_bad_model_config_names_the_key():
    with pytest.raises(ValueError, match="pos='alibi'"):
        GPTConfig(pos="alibi")
    with pytest.raises(ValueError, match="n_embd=100 is not divisible by n_head=3"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="unknown model preset 'gpt3'.*gpt2.*modded"):
        make_config("gpt3")
    with pytest.raises(ValueError, match="sequence length 40 exceeds"):
        GPT(tiny())(torch.zeros(1, 40, dtype=torch.long))
