"""The modded-NanoGPT ladder (configs/stages/): attention masks, the history's flags, the stage files."""
import glob
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import spectra
import train_gpt
from conftest import REPO, read_metrics, tiny_args
from model import (GPT, AttnMask, FP8Matmul, apply_rotary, fp8_grad_scale, fp8_matmul, make_config,
                   masked_sdpa, rotary_frequencies, rotary_tables, value_embed_tables, window_now)
from rundir import Checkpoint, load_model
from train_gpt import ConfigError, build_optimizers, load_config, read_config_file, train

STAGES = sorted(glob.glob(os.path.join(REPO, "configs", "stages", "*.py")))
V = 64
EOT = 0


def tiny(**kw):
    """A small modded model whose document marker is token 0, every weight random (zero-initialised
    projections would hide what the masks do)."""
    kw = {**dict(n_layer=2, n_head=2, n_embd=32, seq_len=64, vocab_size=V, eot_token=EOT), **kw}
    torch.manual_seed(0)
    model = GPT(make_config("modded", "d12", **kw))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def tokens_without_eot(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, V, shape, generator=g)


# ---- masks ------------------------------------------------------------------------------------


def test_document_mask_isolates_each_document():
    """Changing every token of one document leaves every output of the next one unchanged; without
    the mask the same change moves them."""
    idx = tokens_without_eot((1, 64))
    idx[0, 0], idx[0, 20], idx[0, 41] = EOT, EOT, EOT  # documents [0, 20), [20, 41), [41, 64)
    changed = idx.clone()
    changed[0, 1:20] = tokens_without_eot((19,), seed=2)  # the first document, all but its marker
    for doc_mask in (True, False):
        model = tiny(doc_mask=doc_mask)
        with torch.no_grad():
            a, _ = model(idx)
            b, _ = model(changed)
        same = torch.equal(a[0, 20:], b[0, 20:])
        assert same == doc_mask, doc_mask


@pytest.mark.parametrize("block", [0, 8])
def test_sliding_window_sees_exactly_its_window(block):
    """The attention output at t does not depend on keys before the window and does on every key in it:
    t - w + 1 .. t at token granularity; with blocks, the key blocks i - w/b + 1 .. i of query block i."""
    torch.manual_seed(0)
    B, H, T, D, w = 1, 2, 64, 8, 16
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    mask = AttnMask(None, w, block)
    out = masked_sdpa(q, k, v, mask, None, 0.0, chunk=24)  # chunks that do not align with windows or blocks
    t = 45
    first = (t // block - w // block + 1) * block if block else t - w + 1
    for j in range(T):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, j] += 1.0
        v2[:, :, j] += 1.0
        moved = not torch.equal(masked_sdpa(q, k2, v2, mask, None, 0.0, chunk=24)[:, :, t], out[:, :, t])
        assert moved == (first <= j <= t), j


def test_masked_attention_equals_a_softmax_written_out():
    """Chunked SDPA under document + block-window masks equals softmax(q k^T / sqrt(D) + mask) v with
    the mask written elementwise here."""
    torch.manual_seed(0)
    B, H, T, D, w, blk = 2, 2, 48, 8, 16, 8
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    docs = torch.tensor([[0] * 10 + [1] * 30 + [2] * 8, [0] * 48])
    allowed = torch.zeros(B, 1, T, T, dtype=torch.bool)
    for b in range(B):
        for i in range(T):
            for j in range(T):
                allowed[b, 0, i, j] = j <= i and docs[b, i] == docs[b, j] and i // blk - j // blk < w // blk
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    expected = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    got = masked_sdpa(q, k, v, AttnMask(docs, w, blk), None, 0.0, chunk=20)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_memory_of_masked_attention_grows_with_the_window_not_the_sequence(monkeypatch):
    """No mask SDPA sees is wider than a chunk plus the window: linear in T at a fixed window."""
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append(tuple(attn_mask.shape))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    q = torch.randn(1, 1, 4096, 4)
    masked_sdpa(q, q, q, AttnMask(torch.zeros(1, 4096, dtype=torch.long), 256, 128), None, 0.0, chunk=256)
    assert len(seen) == 4096 // 256 and max(s[-1] for s in seen) <= 256 + 256 and max(s[-2] for s in seen) == 256


def test_a_packed_65536_token_sequence_trains_with_its_document_mask():
    """One sequence of 65,536 tokens (the windowed stages' device step) with rotary, value embeddings
    and a 1,024-token window runs forward and backward, and the last document's logits do not move
    when every earlier document changes. Memory: the spy test above."""
    model = tiny(n_layer=1, seq_len=65536, doc_mask=True, window=1024, ve_layers="all", rope_frac=0.5)
    idx = tokens_without_eot((1, 65536))
    idx[0, [0, 7000, 30000, 61000]] = EOT
    logits, loss = model(idx, torch.roll(idx, -1, 1))
    loss.backward()
    assert torch.isfinite(loss) and model.wte.weight.grad is not None
    other = idx.clone()
    other[0, 1:61000] = tokens_without_eot((60999,), seed=3)
    other[0, [7000, 30000]] = EOT
    with torch.no_grad():
        moved, _ = model(other)
    assert torch.equal(moved[:, 61000:], logits[:, 61000:].detach())
    assert not torch.equal(moved[:, 60000:61000], logits[:, 60000:61000].detach())


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("flags", [dict(doc_mask=True), dict(doc_mask=True, window=24),
                                   dict(window=32, window_block=8, window_start=8, short_windows=True, doc_mask=True)],
                         ids=str)
def test_flex_attention_and_the_explicit_mask_agree(flags):
    """FlexAttention's block masks (built from the same mask_allows) give the outputs of the explicit
    mask: on CPU through eager FlexAttention, forward only (it has no CPU backward in torch 2.13);
    gradients too where CUDA runs it (bench/gpu_checks.sh on a GPU)."""
    idx = tokens_without_eot((2, 64))
    idx[0, [0, 13, 40]] = EOT
    idx[1, [0, 50]] = EOT
    sdpa_model, flex_model = tiny(**flags, attention="sdpa"), tiny(**flags, attention="flex")
    for m in (sdpa_model, flex_model):
        m.set_progress(0.6)
    with torch.no_grad():
        a, _ = sdpa_model(idx)
        b, _ = flex_model(idx)
    # the same masked softmax summed in another order: fp32 rounding of a few logits of size ~10
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-4)
    if torch.cuda.is_available():
        for m in (sdpa_model, flex_model):
            m.cuda().train()
            m.zero_grad()
            m(idx.cuda(), idx.cuda())[1].backward()
        for (n, p), q in zip(sdpa_model.named_parameters(), flex_model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-4, msg=n)


def test_the_window_grows_as_record_13_and_alternates_as_record_20():
    cfg = make_config("modded", "d12", seq_len=2048, window=1792, window_start=64)
    for p in (0.0, 0.3, 0.77, 1.0):
        assert window_now(cfg, p) == 64 * ((64 + 1728 * p) // 64)  # record #13's expression
    blocks = make_config("modded", "d12", seq_len=2048, window=1792, window_start=128, window_block=128,
                         short_windows=True)
    with torch.device("meta"):
        model = GPT(blocks)
    model.set_progress(1.0)
    assert model.windows == (1792, 896, 896, 896, 1792, 896, 896, 1792, 896, 896, 896, 1792)
    model.set_progress(0.5)
    assert model.windows[0] == 128 * math.floor((128 + 1664 * 0.5) / 128)
    assert model.windows[1] == 128 * (model.windows[0] // 2 // 128)  # half, in whole blocks


# ---- the history's flags against forwards written out ----------------------------------------------


def hand_forward(model, idx):
    """The logits of a modded model with rotary, QK-norm, relu^2, the value residual, x0 lambdas and
    a softcap (no value embeddings, no U-net skips), written out from its weights."""
    cfg, sd = model.cfg, model.state_dict()
    B, T = idx.shape
    H, D = cfg.n_head, cfg.n_embd // cfg.n_head
    cos, sin = rotary_tables(T, D, cfg.rope_base, cfg.rope_frac)
    x = x0 = sd["wte.weight"][idx]
    v_first = None
    for i in range(cfg.n_layer):
        b = f"blocks.{i}"
        lam = sd[f"{b}.x0_lambdas"]
        x = lam[0] * x + lam[1] * x0
        h = F.rms_norm(x, (cfg.n_embd,))
        q, k, v = (h @ sd[f"{b}.attn.c_{n}.weight"].T for n in "qkv")
        q, k, v = (t.view(B, T, H, D) for t in (q, k, v))
        if i == 0:
            v_first = v
        else:
            lv = sd[f"{b}.attn.v_lambda"]
            v = (1 - lv) * v + lv * v_first
        q, k = F.rms_norm(q, (D,)), F.rms_norm(k, (D,))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        s = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)) / math.sqrt(D)
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        a = (s.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2).reshape(B, T, cfg.n_embd)
        x = x + a @ sd[f"{b}.attn.c_proj.weight"].T
        h = F.rms_norm(x, (cfg.n_embd,))
        x = x + F.relu(h @ sd[f"{b}.mlp.c_fc.weight"].T).square() @ sd[f"{b}.mlp.c_proj.weight"].T
    logits = F.rms_norm(x, (cfg.n_embd,)) @ sd["lm_head.weight"].T
    return cfg.softcap * torch.tanh(logits / cfg.softcap)


def test_value_residual_x0_lambdas_and_truncated_rotary_against_a_forward_written_out():
    model = tiny(n_layer=3, value_residual=True, x0_lambdas=True, value_embeds=False, unet_skips=False,
                 rope_frac=0.5, rope_base=1024.0, softcap=30.0)
    idx = tokens_without_eot((2, 32))
    with torch.no_grad():
        got, _ = model(idx)
    torch.testing.assert_close(got, hand_forward(model, idx), rtol=1e-5, atol=1e-5)
    assert model.blocks[0].attn.v_lambda is None and model.blocks[2].attn.v_lambda is not None


def test_truncated_rotary_is_record_17s_frequencies():
    """head_dim 128: 32 frequencies (1/1024)^linspace(0, 1, 32), then 32 zeros; a zero-frequency pair is
    never rotated."""
    f = rotary_frequencies(128, 1024.0, 0.5)
    expected = torch.cat([(1 / 1024) ** torch.linspace(0, 1, 32), torch.zeros(32)])
    torch.testing.assert_close(f, expected)
    cos, sin = rotary_tables(40, 128, 1024.0, 0.5)
    x = torch.randn(1, 40, 1, 128)
    y = apply_rotary(x, cos, sin)
    unrotated = torch.cat([torch.arange(32, 64), torch.arange(96, 128)])
    assert torch.equal(y[..., unrotated], x[..., unrotated]) and not torch.equal(y[..., :32], x[..., :32])


def test_value_embedding_layers_scale_with_depth():
    def tables(n_layer, ve_layers):
        return value_embed_tables(make_config("modded", "d12", n_layer=n_layer, ve_layers=ve_layers))
    assert tables(12, "3") == [0, 1, 2] + [None] * 6 + [0, 1, 2]
    assert tables(12, "depth") == tables(12, "3")
    assert tables(36, "depth") == list(range(9)) + [None] * 18 + list(range(9))  # round(36/4) = 9
    assert tables(48, "depth") == list(range(12)) + [None] * 24 + list(range(12))
    assert tables(8, "depth") == [0, 1, 2, None, None, 0, 1, 2]  # at least 3
    assert tables(4, "depth") == [0, 1, 0, 1]  # at most L/2
    assert tables(5, "all") == [0, 1, 2, 3, 4]


def round_fp8(x, mantissa_bits, min_exponent):
    """Round to the nearest float with `mantissa_bits` explicit bits and normal exponents >= min_exponent
    (below: subnormal steps of 2^(min_exponent - mantissa_bits)), ties to even: e4m3fn has (3, -6),
    e5m2 (2, -14). Written out with numpy, independently of torch's casts."""
    x = np.asarray(x, dtype=np.float64)
    e = np.floor(np.log2(np.maximum(np.abs(x), 1e-300)))
    step = 2.0 ** (np.maximum(e, min_exponent) - mantissa_bits)
    return np.round(x / step) * step  # np.round: half to even


def test_fp8_head_emulation_is_the_rounding_written_out():
    torch.manual_seed(0)
    x, w = torch.randn(16, 32) * 2, torch.randn(24, 32) * 0.05  # x * 2 and w * 32 stay below e4m3's 448
    x.requires_grad_(True)
    w.requires_grad_(True)
    n = 1024  # tokens the loss averages over: the gradient's scale
    out = fp8_matmul(x, w, n)
    xq = round_fp8(x.detach().numpy() * 2.0, 3, -6)
    wq = round_fp8(w.detach().numpy() * 32.0, 3, -6)
    expected = torch.from_numpy(xq).float() @ torch.from_numpy(wq).float().T / 64.0
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected.to(torch.bfloat16))
    grad = torch.randn(16, 24) / n
    out.backward(grad.to(torch.bfloat16))
    gs = fp8_grad_scale(n)
    assert gs == 2.0 ** 23  # 2^13 headroom times 2^10 tokens; record #19's 2^29 at its 65,536
    gq = torch.from_numpy(round_fp8(grad.to(torch.bfloat16).double().numpy() * gs, 2, -14)).float()
    torch.testing.assert_close(x.grad, (gq @ torch.from_numpy(wq).float() / (gs * 32.0)).to(torch.bfloat16).float(),
                               rtol=0, atol=0)
    torch.testing.assert_close(w.grad, gq.T @ torch.from_numpy(xq).float() / (gs * 2.0), rtol=1e-6, atol=0)


def test_fp8_head_trains_and_measures_through_the_same_roundings():
    """The model's logits go through FP8Matmul, and the per-example head gradient of the spectra is
    the autograd gradient of each sequence's mean loss through that same head."""
    model = tiny(fp8_head=True, softcap=15.0)
    idx = tokens_without_eot((2, 32))
    h = model.features(idx).detach()
    logits, _ = model(idx)
    torch.testing.assert_close(logits, 15 * torch.tanh(fp8_matmul(h, model.lm_head.weight).float() / 15))
    targets = torch.roll(idx, -1, 1)
    got = model.sequence_loss_grad(h, targets)
    hr = h.clone().requires_grad_(True)
    z = 15 * torch.tanh(FP8Matmul.apply(hr.reshape(-1, 32), model.lm_head.weight, fp8_grad_scale(32)).float() / 15)
    loss = F.cross_entropy(z, targets.reshape(-1), reduction="none").view(2, 32).mean(1).sum()
    (expected,) = torch.autograd.grad(loss, hr)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)


def test_fp8_where_it_cannot_be_emulated_is_a_clear_error(monkeypatch):
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(ValueError, match=r"fp8_head=True needs float8 dtypes.*set fp8_head=False"):
        make_config("modded", "d12", fp8_head=True)


# ---- the trainer's side -------------------------------------------------------------------------


def test_multipliers_reach_the_optimizers_parameter_groups(tmp_path):
    cfg = load_config(tiny_args(tmp_path, lr_mults="lm_head.weight=27.5,blocks.*.attn.c_q.weight=0.5",
                                wd_mults="blocks.1.*=2", weight_decay=0.1))
    model = GPT(train_gpt.model_config(cfg))
    opts = build_optimizers(model, cfg, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    where = {names[id(p)]: g for o in opts for g in o.param_groups for p in g["params"]}
    f = train_gpt.lr_factor(cfg)
    assert where["lm_head.weight"]["lr"] == pytest.approx(cfg.head_lr * f * 27.5)
    assert where["blocks.0.attn.c_q.weight"]["lr"] == pytest.approx(cfg.muon_lr * f * 0.5)
    assert where["blocks.1.attn.c_q.weight"]["weight_decay"] == pytest.approx(0.2)
    assert where["blocks.0.attn.c_k.weight"]["lr"] == pytest.approx(cfg.muon_lr * f)
    assert where["blocks.0.attn.c_k.weight"]["weight_decay"] == pytest.approx(0.1)
    assert where["wte.weight"]["lr"] == pytest.approx(cfg.embed_lr * f)
    with pytest.raises(ConfigError, match=r"lr_mults: 'head.weight' matches no parameter"):
        load_config(tiny_args(tmp_path, lr_mults="head.weight=2"))
    with pytest.raises(ConfigError, match=r"wd_mults='x': 'x' is not NAME_GLOB=NUMBER"):
        load_config(tiny_args(tmp_path, wd_mults="x"))


@pytest.mark.parametrize("args,match", [
    (dict(window=64), r"window=64 must be in \[0, seq_len=32\]"),
    (dict(window=16, window_block=12), r"window_block=12 must divide seq_len=32, e.g. window_block=128"),
    (dict(window=16, window_start=4, window_block=8), r"window_start=4 is not a whole number of window_block=8"),
    (dict(window_start=8), r"window_start=8 must be in \[0, window=0\]"),
    (dict(ve_layers="some"), r"ve_layers='some' must be 'all', 'depth' or a count"),
])
def test_bad_history_flags_fail_before_anything_is_written(tmp_path, args, match):
    with pytest.raises(ConfigError, match=match):
        load_config(tiny_args(tmp_path, **args))
    assert not os.listdir(tmp_path)


def test_each_stage_differs_from_the_one_before_by_the_keys_its_header_names():
    assert [os.path.basename(p)[:2] for p in STAGES] == [f"{i:02d}" for i in range(3, 20)]
    for before, after in zip(STAGES, STAGES[1:]):
        with open(after) as f:
            header = next(line for line in f if line.startswith("# changes:"))
        named = {k.strip() for k in header.removeprefix("# changes:").split(",")}
        a, b = read_config_file(before), read_config_file(after)
        assert set(a) == set(b), after  # every file holds every key: each reads alone
        changed = {k for k in b if a[k] != b[k]}
        assert changed == named, (os.path.basename(after), changed ^ named)


def test_a_stage_file_names_its_runs_stage(tmp_path):
    assert load_config([STAGES[2]]).stage == "05_muon"  # configs/stages/05_muon.py
    assert load_config([STAGES[2], "--stage=mine"]).stage == "mine"
    other = tmp_path / "05_muon.py"  # the same file outside a stages/ folder: no stage unless it sets one
    other.write_text(open(STAGES[2]).read())
    assert load_config([str(other)]).stage == ""


def tiny_stage(path, **extra):
    """A stage's config at a tiny size: every window key divided by 8 keeps the blocks whole."""
    values = read_config_file(path)
    small = dict(n_layer=4, n_head=2, n_embd=32, vocab_size=V, eot_token=EOT, seq_len=min(values["seq_len"], 256))
    for key in ("window", "window_start", "window_block"):
        small[key] = values[key] // 8
    model_keys = {k: v for k, v in values.items() if k in train_gpt.MODEL_KEYS}
    return make_config(values["preset"], values["profile"], **{**model_keys, **small, **extra})


@pytest.mark.parametrize("path", STAGES, ids=os.path.basename)
def test_every_stage_builds_and_runs_forward_and_backward_at_a_tiny_size(path):
    cfg = tiny_stage(path)
    torch.manual_seed(0)
    model = GPT(cfg)
    model.set_progress(0.5)
    idx = tokens_without_eot((2, cfg.seq_len))
    idx[:, ::50] = EOT
    _, loss = model(idx, torch.roll(idx, -1, 1))
    loss.backward()
    assert torch.isfinite(loss)
    assert not [n for n, p in model.named_parameters() if p.grad is None]


def test_a_stage_read_with_a_profile_or_length_that_cannot_hold_it_names_the_key(tmp_path):
    stage = os.path.join(REPO, "configs", "stages", "17_long_short_windows.py")
    with pytest.raises(ConfigError, match=r"window=1792 must be in \[0, seq_len=1024\]"):
        load_config([stage, "--seq_len=1024", f"--out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"window_block=128 must divide seq_len=65000"):
        load_config([stage, "--seq_len=65000", f"--out_dir={tmp_path}"])
    # the stages whose flags depend on depth, at the deepest profile (test_config resolves every
    # stage at d12 through stages.yaml); each gets a W&B group W&B accepts
    for path in [p for p in STAGES if os.path.basename(p)[:2] in ("09", "12", "13", "17", "19")]:
        cfg = load_config([path, "--profile=d48", f"--out_dir={tmp_path}"])
        group, _, tags = train_gpt.run_labels(cfg, train_gpt.model_config(cfg))
        assert len(group) <= 128 and all(len(t) <= 64 for t in tags), group
    assert group == "modded-d48-19_sub_lr-muon"  # too many changed flags to spell out: the stage names it
    assert not os.listdir(tmp_path)


# ---- spectra measure what the stage trains ----------------------------------------------------------


def test_spectra_at_a_step_use_that_steps_window(tmp_path):
    """Activation spectra of a model with a growing window at progress p equal those of the same
    weights under a fixed window of the size written out for p, and differ from another step's."""
    flags = dict(n_layer=2, seq_len=64, doc_mask=True, window=48, window_start=16, window_block=8)
    model = tiny(**flags)
    fixed = tiny(**{**flags, "window_start": 0, "window": 8 * math.floor((16 + 32 * 0.4) / 8)})
    fixed.load_state_dict(model.state_dict())
    settings = spectra.SpectraSettings(seq_len=64, act_tokens=512, act_batch_size=4)
    points = ["L00.attn", "L01.mlp_resid", "final"]
    idx = tokens_without_eot((512,))
    idx[::37] = EOT
    model.set_progress(0.4)
    at_step = spectra.measure_activations(model, idx, settings, points)
    by_hand = spectra.measure_activations(fixed, idx, settings, points)
    for p in points:
        np.testing.assert_array_equal(at_step[p]["values"], by_hand[p]["values"])
    model.set_progress(1.0)
    later = spectra.measure_activations(model, idx, settings, points)
    assert not np.array_equal(later["L01.mlp_resid"]["values"], at_step["L01.mlp_resid"]["values"])


def test_a_stage_trains_on_cpu_and_its_checkpoint_is_measured_with_its_own_masks(tmp_path):
    """Stage 19 (every flag of the ladder) at a tiny size trains with activation and gradient spectra;
    its checkpoint carries the progress, so the model rebuilt from it has the window of its step."""
    stage = os.path.join(REPO, "configs", "stages", "19_sub_lr.py")
    args = tiny_args(tmp_path, n_layer=4, seq_len=64, window=32, window_start=8, window_block=8, eot_token=198,
                     grad_spectra_every=1, grad_spectra_precision="fp32", max_steps=6, eval_every_tokens=768,
                     profile="d12", train_tokens=0, target_val_loss=0, ckpt_every_tokens=0, batch_size=4,
                     device_batch_size=4, lr_ref_batch_size=4, grad_samples=8, spectra_tokens=512,
                     train_files="data/shakespeare/shakespeare_train_*.bin",
                     val_files="data/shakespeare/shakespeare_val_*.bin")
    cfg = load_config([stage] + args[1:])
    assert cfg.model["fp8_head"] and cfg.model["short_windows"] and cfg.lr_mults == "lm_head.weight=27.5"
    run_dir = train(cfg)
    ckpt_path, = train_gpt.checkpoints(run_dir)
    ckpt = Checkpoint.load(ckpt_path)
    assert ckpt.progress == 1.0
    model = load_model(ckpt_path)
    assert model.windows == (32, 16, 16, 32) and model.progress == 1.0
    rows = read_metrics(run_dir)
    assert any("grad/alpha_tail/L00.attn.c_proj" in r or "grad/sigma_max/L00.attn.c_proj" in r for r in rows)


def test_the_stages_sweep_names_every_stage_once_and_the_trainer_reads_config_as_the_file(tmp_path):
    """configs/sweeps/stages.yaml names each stage file once (test_config resolves every run of it);
    W&B's ${args} put --config=PATH anywhere among the other --key=value."""
    import yaml  # W&B's own dependency, which reads these files
    with open(os.path.join(REPO, "configs", "sweeps", "stages.yaml")) as f:
        paths = yaml.safe_load(f)["parameters"]["config"]["values"]
    assert sorted(os.path.join(REPO, p) for p in paths) == STAGES
    cfg = load_config([f"--out_dir={tmp_path}", "--wandb_mode=online", f"--config={STAGES[2]}"])
    assert cfg.config_file == STAGES[2] and cfg.optimizer == "muon" and cfg.model["tied"] is True
