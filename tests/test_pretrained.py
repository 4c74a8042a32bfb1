"""Pretrained GPT-2 loading (model.from_pretrained) against tiny checkpoints in the Hugging Face format.

The checkpoints are written here with the real tensor names and layouts of GPT-2 (Conv1D weights
stored (in, out), the fused c_attn, the attn.bias mask buffer, a tied lm_head), and the loaded model is
compared with a reference forward pass written from those tensors alone."""
import json
import math

import huggingface_hub
from huggingface_hub.errors import LocalEntryNotFoundError
import pytest
import torch
from safetensors.torch import save_file

import model as model_lib
from model import PRETRAINED, GPT, PretrainedError, from_pretrained, pretrained_config, pretrained_files

N_LAYER, N_HEAD, N_EMBD, VOCAB, N_POS = 2, 2, 16, 50, 12


def hf_tensors(seed=0, prefix="", std=0.3):
    """Random weights of a tiny GPT-2, named and laid out as a Hugging Face checkpoint holds them."""
    g = torch.Generator().manual_seed(seed)
    d = N_EMBD

    def rand(*shape):
        return torch.randn(*shape, generator=g) * std
    t = {"wte.weight": rand(VOCAB, d), "wpe.weight": rand(N_POS, d)}
    for i in range(N_LAYER):
        h = f"h.{i}."
        t.update({h + "ln_1.weight": 1 + rand(d), h + "ln_1.bias": rand(d),
                  h + "attn.c_attn.weight": rand(d, 3 * d), h + "attn.c_attn.bias": rand(3 * d),
                  h + "attn.c_proj.weight": rand(d, d), h + "attn.c_proj.bias": rand(d),
                  h + "ln_2.weight": 1 + rand(d), h + "ln_2.bias": rand(d),
                  h + "mlp.c_fc.weight": rand(d, 4 * d), h + "mlp.c_fc.bias": rand(4 * d),
                  h + "mlp.c_proj.weight": rand(4 * d, d), h + "mlp.c_proj.bias": rand(d),
                  # the causal-mask buffers older transformers versions saved with the weights
                  h + "attn.bias": torch.tril(torch.ones(N_POS, N_POS)).view(1, 1, N_POS, N_POS),
                  h + "attn.masked_bias": torch.tensor(-1e4)})
    t.update({"ln_f.weight": 1 + rand(d), "ln_f.bias": rand(d)})
    t = {prefix + k: v for k, v in t.items()}
    t["lm_head.weight"] = t[prefix + "wte.weight"].clone()  # tied; saved as its own tensor by some exporters
    return t


def hf_config(**changes):
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "activation_function": "gelu_new",
            "n_layer": N_LAYER, "n_head": N_HEAD, "n_embd": N_EMBD, "vocab_size": VOCAB, "n_positions": N_POS,
            "n_ctx": N_POS, "layer_norm_epsilon": 1e-5, "n_inner": None, "resid_pdrop": 0.1, "embd_pdrop": 0.1,
            "attn_pdrop": 0.1, "scale_attn_weights": True, "tie_word_embeddings": True, **changes}


def write_checkpoint(directory, tensors, config=None):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config or hf_config()))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    return directory


def reference_logits(tensors, idx):
    """GPT-2's forward pass written out from the checkpoint's tensors, in float64."""
    sd = {k.removeprefix("transformer."): v.double() for k, v in tensors.items()}
    B, T = idx.shape
    D = N_EMBD // N_HEAD

    def layer_norm(x, name):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) * sd[name + ".weight"] + sd[name + ".bias"]

    def conv1d(x, name):  # Conv1D: weight (in, out)
        return x @ sd[name + ".weight"] + sd[name + ".bias"]

    def gelu_new(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    def heads(x):
        return x.view(B, T, N_HEAD, D).transpose(1, 2)
    x = sd["wte.weight"][idx] + sd["wpe.weight"][:T]
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    for i in range(N_LAYER):
        h = f"h.{i}"
        q, k, v = conv1d(layer_norm(x, h + ".ln_1"), h + ".attn.c_attn").split(N_EMBD, dim=-1)
        q, k, v = heads(q), heads(k), heads(v)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(future, float("-inf"))
        y = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(B, T, N_EMBD)
        x = x + conv1d(y, h + ".attn.c_proj")
        x = x + conv1d(gelu_new(conv1d(layer_norm(x, h + ".ln_2"), h + ".mlp.c_fc")), h + ".mlp.c_proj")
    return layer_norm(x, "ln_f") @ sd["wte.weight"].T


def tokens(T=N_POS, seed=1):
    return torch.randint(0, VOCAB, (3, T), generator=torch.Generator().manual_seed(seed))


def logits_of(model, idx):
    with torch.no_grad():
        return model(idx)[0].double()


@pytest.mark.parametrize("prefix,dtype", [("", torch.float32), ("transformer.", torch.float32),
                                          ("", torch.float16)], ids=["plain", "prefixed", "fp16"])
def test_loaded_model_equals_a_reference_forward_of_the_checkpoint(tmp_path, prefix, dtype):
    tensors = {k: v.to(dtype) for k, v in hf_tensors(prefix=prefix).items()}
    model = from_pretrained(str(write_checkpoint(tmp_path / "ckpt", tensors)))
    cfg = model.cfg
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size, cfg.seq_len) == (N_LAYER, N_HEAD, N_EMBD, VOCAB, N_POS)
    assert (cfg.pos, cfg.norm, cfg.act, cfg.tied, cfg.bias, cfg.softcap) == ("learned", "layer", "gelu_tanh",
                                                                             True, True, 0.0)
    assert not model.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    assert model.lm_head.weight is model.wte.weight  # still tied: fine-tuning updates one tensor
    idx = tokens()
    expected = reference_logits(tensors, idx)
    torch.testing.assert_close(logits_of(model, idx), expected, atol=1e-5, rtol=1e-5)
    # the check can tell the GELUs apart: the exact (erf) one is off by far more than the tolerance
    erf_model = from_pretrained(str(tmp_path / "ckpt"), act="gelu")
    assert (logits_of(erf_model, idx) - expected).abs().max() > 1e-4


def test_weights_land_in_the_separate_q_k_v_projections(tmp_path):
    tensors = hf_tensors()
    model = from_pretrained(str(write_checkpoint(tmp_path, tensors)))
    w, b = tensors["h.1.attn.c_attn.weight"], tensors["h.1.attn.c_attn.bias"]
    attn = model.blocks[1].attn
    for j, lin in enumerate((attn.c_q, attn.c_k, attn.c_v)):
        torch.testing.assert_close(lin.weight, w[:, j * N_EMBD:(j + 1) * N_EMBD].T, rtol=0, atol=0)
        torch.testing.assert_close(lin.bias, b[j * N_EMBD:(j + 1) * N_EMBD], rtol=0, atol=0)
    torch.testing.assert_close(model.blocks[0].mlp.c_fc.weight, tensors["h.0.mlp.c_fc.weight"].T, rtol=0, atol=0)


def test_known_name_is_fetched_from_the_hub(tmp_path, monkeypatch):
    tensors = hf_tensors()
    local = write_checkpoint(tmp_path / "snapshot", tensors)
    asked = []

    def fake_download(repo_id, filename, cache_dir=None, **kw):
        asked.append((repo_id, filename, cache_dir))
        return str(local / filename)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    model = from_pretrained("gpt2", cache_dir=str(tmp_path / "cache"))
    assert asked == [("openai-community/gpt2", "config.json", str(tmp_path / "cache")),
                     ("openai-community/gpt2", "model.safetensors", str(tmp_path / "cache"))]
    idx = tokens()
    torch.testing.assert_close(logits_of(model, idx), reference_logits(tensors, idx), atol=1e-5, rtol=1e-5)
    assert pretrained_files("gpt2-xl") == (str(local / "config.json"), str(local / "model.safetensors"))
    asked.clear()
    assert pretrained_config("gpt2-medium").n_embd == N_EMBD
    assert asked == [("openai-community/gpt2-medium", "config.json", None)]  # the config alone, not the weights


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(PretrainedError, match=r"unknown pretrained model 'gpt3': known names are "
                                              r"\['gpt2', 'gpt2-large', 'gpt2-medium', 'gpt2-xl'\]; "
                                              r"a local directory holding config.json and model.safetensors"):
        from_pretrained("gpt3")
    assert sorted(PRETRAINED) == ["gpt2", "gpt2-large", "gpt2-medium", "gpt2-xl"]


def test_directory_without_the_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf_config()))
    with pytest.raises(PretrainedError, match=r"not a GPT-2 checkpoint in the Hugging Face format: it lacks "
                                              r"model.safetensors"):
        pretrained_files(str(tmp_path))


@pytest.mark.parametrize("failing", ["config.json", "model.safetensors"])
def test_hub_failure_names_the_file_and_the_local_fix(tmp_path, monkeypatch, failing):
    local = write_checkpoint(tmp_path, hf_tensors())

    def offline(repo_id, filename, **kw):
        if filename == failing:
            raise LocalEntryNotFoundError("cannot reach the hub and the file is not cached")
        return str(local / filename)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(PretrainedError, match=rf"(?s)could not fetch {failing} of openai-community/gpt2-medium "
                                              r"from the Hugging Face hub \(LocalEntryNotFoundError: .*"
                                              r"a directory holding config.json and model.safetensors.*"
                                              r"download openai-community/gpt2-medium .*--local-dir DIR.*"
                                              r"HF_HUB_OFFLINE=1"):
        from_pretrained("gpt2-medium")


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
    tensors = hf_tensors()
    tensors["h.1.mlp.c_fc.weight"] = torch.zeros(N_EMBD, 4 * N_EMBD - 4)
    with pytest.raises(PretrainedError, match=r"tensor h\.1\.mlp\.c_fc\.weight \(our blocks\.1\.mlp\.c_fc\.weight\) "
                                              r"has shape \(16, 60\), the gpt2 preset .* expects \(16, 64\)"):
        from_pretrained(str(write_checkpoint(tmp_path, tensors)))
    tensors = hf_tensors()
    tensors["h.0.attn.c_attn.bias"] = torch.zeros(3 * N_EMBD + 1)
    with pytest.raises(PretrainedError, match=r"tensor h\.0\.attn\.c_attn\.bias \(our blocks\.0\.attn\.c_q\.bias, "
                                              r"blocks\.0\.attn\.c_k\.bias, blocks\.0\.attn\.c_v\.bias\) "
                                              r"has shape \(49,\), .* expects \(48,\)"):
        from_pretrained(str(write_checkpoint(tmp_path, tensors)))


def test_missing_tensor_is_named(tmp_path):
    tensors = hf_tensors(prefix="transformer.")
    del tensors["transformer.h.1.ln_2.bias"]
    with pytest.raises(PretrainedError, match=r"lacks tensor h\.1\.ln_2\.bias \(for our blocks\.1\.ln_2\.bias\)"):
        from_pretrained(str(write_checkpoint(tmp_path, tensors)))


def test_unexpected_tensors_and_unsupported_configs_are_refused(tmp_path):
    tensors = hf_tensors()
    tensors["h.2.ln_1.weight"] = torch.ones(N_EMBD)  # a third layer the config does not declare
    with pytest.raises(PretrainedError, match=r"tensors with no place in it \['h\.2\.ln_1\.weight'\]"):
        from_pretrained(str(write_checkpoint(tmp_path / "a", tensors)))
    for change, message in [({"activation_function": "relu"}, "activation_function='relu'"),
                            ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon=1e-06"),
                            ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
                            ({"n_inner": 5}, "n_inner=5"), ({"model_type": "llama"}, "model_type='llama'")]:
        write_checkpoint(tmp_path / "b", hf_tensors(), hf_config(**change))
        with pytest.raises(PretrainedError, match=message):
            pretrained_config(str(tmp_path / "b"))
    # an override that adds parameters a GPT-2 checkpoint cannot fill
    with pytest.raises(PretrainedError, match=r"model tensors it does not fill \['skip_weights'\]"):
        from_pretrained(str(tmp_path / "a"), unet_skips=True)


def test_seq_len_override_keeps_the_first_positions(tmp_path):
    tensors = hf_tensors()
    path = str(write_checkpoint(tmp_path, tensors))
    model = from_pretrained(path, seq_len=8)
    assert model.cfg.seq_len == 8 and model.wpe.weight.shape == (8, N_EMBD)
    torch.testing.assert_close(model.wpe.weight, tensors["wpe.weight"][:8], rtol=0, atol=0)
    idx = tokens(T=8)
    torch.testing.assert_close(logits_of(model, idx), reference_logits(tensors, idx), atol=1e-5, rtol=1e-5)
    with pytest.raises(PretrainedError, match=r"seq_len=13 must be in \[1, 12\], the checkpoint's n_positions"):
        from_pretrained(path, seq_len=13)


def test_shape_overrides_that_cannot_load_are_refused(tmp_path):
    path = str(write_checkpoint(tmp_path, hf_tensors()))
    assert pretrained_config(path, n_layer=N_LAYER, n_embd=N_EMBD).n_layer == N_LAYER  # agreeing is fine
    with pytest.raises(PretrainedError, match=r"fixed by its weights: cannot set n_embd=128 \(the checkpoint has 16\), "
                                              r"vocab_size=50304 \(the checkpoint has 50\)"):
        pretrained_config(path, n_embd=128, vocab_size=50304)


def test_dropout_override_applies_in_training_only(tmp_path):
    tensors = hf_tensors()
    model = from_pretrained(str(write_checkpoint(tmp_path, tensors)), dropout=0.1)
    assert model.cfg.dropout == 0.1 and model.drop.p == 0.1 and model.blocks[0].drop.p == 0.1
    idx = tokens()
    torch.testing.assert_close(logits_of(model, idx), reference_logits(tensors, idx), atol=1e-5, rtol=1e-5)
    model.train()
    assert not torch.equal(logits_of(model, idx), logits_of(model, idx))
    model(idx, idx)[1].backward()  # ready to fine-tune: every parameter trainable
    assert all(p.requires_grad and p.grad is not None for p in model.parameters())


def test_pretrained_config_is_the_gpt2_preset_shaped_by_the_checkpoint(tmp_path):
    config = hf_config(activation_function="gelu")
    del config["n_positions"]
    write_checkpoint(tmp_path, hf_tensors(), config)
    cfg = pretrained_config(str(tmp_path), dropout=0.2)  # n_ctx stands in for a missing n_positions
    assert cfg == model_lib.make_config("gpt2", "d12", n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD,
                                        vocab_size=VOCAB, seq_len=N_POS, act="gelu", dropout=0.2)


def test_matches_transformers_when_installed(tmp_path):
    transformers = pytest.importorskip("transformers")
    tensors = hf_tensors()
    path = write_checkpoint(tmp_path, tensors)
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(path)).eval()
    idx = tokens()
    with torch.no_grad():
        expected = hf(idx).logits.double()
    torch.testing.assert_close(logits_of(from_pretrained(str(path)), idx), expected, atol=1e-5, rtol=1e-5)
    assert isinstance(from_pretrained(str(path)), GPT)
