"""
The GPT family of spectral-nanogpt: GPT-2 and the modded-NanoGPT interventions in one class.

Every architecture intervention is a GPTConfig flag, never a copied model, so an
ablation is one `--key=value` away. Two presets name the ends of the history:

    gpt2    learned positions, LayerNorm with bias, GELU (tanh form), tied embedding/head:
            Hugging Face GPT2LMHeadModel exactly, so `from_pretrained` loads its weights
    modded  rotary, parameter-free RMSNorm, relu^2, QK-norm, untied head,
            zero-initialised output projections, logit softcap, value
            embeddings, U-net skip connections

and four size profiles (d12/d24/d36/d48) fix depth, heads and width.

Probe points. Spectral measurement needs the activations at fixed places in
every block, under the same names whatever the flags. Each place is an
`nn.Identity` "tap"; a forward hook on a tap sees the activation without the
model knowing it is being measured. `GPT.probe_points()` maps the names of
DESIGN.md (embed, L03.ln1, ..., L03.mlp_resid, final) to the taps, and
`GPT.linears()` maps `L03.attn.c_proj`-style names to the nn.Linear layers used
for per-example gradients.

Pretrained GPT-2. `from_pretrained("gpt2")` (or a local directory in the Hugging
Face format: config.json + model.safetensors) returns the gpt2 preset holding
OpenAI's weights, read with `safetensors` alone: no `transformers` at run time.
"""

import functools
import json
import math
import os
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

BLOCK_POINTS = ("ln1", "attn", "attn_resid", "ln2", "fc", "act", "proj", "mlp_resid")
BLOCK_LINEARS = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def relu2(h):
    """relu(h)^2, modded-NanoGPT's MLP activation."""
    return F.relu(h).square()


def gelu_tanh(h):
    """GELU in the tanh form 0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3))): what GPT-2 was trained with
    (Hugging Face's "gelu_new"). It differs from the exact erf GELU by up to 5e-4 (near |h| = 2), which
    pretrained GPT-2's logits would show, so the gpt2 preset uses this one."""
    return F.gelu(h, approximate="tanh")


ACTIVATIONS = {"relu2": relu2, "gelu": F.gelu, "gelu_tanh": gelu_tanh}
ATTENTION_IMPLS = ("auto", "sdpa", "flex")


@dataclass
class GPTConfig:
    vocab_size: int = 50304      # GPT-2's 50257 padded up to a multiple of 128 for fast matmuls
    n_layer: int = 12            # transformer blocks (the profile sets it)
    n_head: int = 6              # attention heads per block (the profile sets it)
    n_embd: int = 768            # residual-stream width (the profile sets it)
    seq_len: int = 1024          # longest sequence: size of the learned position table / rotary cache
    pos: str = "rotary"          # "learned" | "rotary"
    norm: str = "rms"            # "rms" (parameter-free) | "layer" (LayerNorm with weight, bias if `bias`)
    act: str = "relu2"           # "relu2" | "gelu" (exact, erf) | "gelu_tanh" (tanh approximation, GPT-2's)
    qk_norm: bool = True         # RMS-normalise queries and keys per head before attention
    tied: bool = False           # share the token embedding with the output head
    zero_init_proj: bool = True  # zero-init attn/MLP output projections (and an untied head)
    softcap: float = 15.0        # logits <- c * tanh(logits / c); 0 disables
    value_embeds: bool = True    # modded-style value embeddings mixed into v of the first/last 3 layers
    unet_skips: bool = True      # first-half block outputs added (learned weights) into the second half
    attn_scale: float = 0.0      # softmax scale; 0 means 1/sqrt(head_dim)
    bias: bool = False           # biases in Linear layers (and LayerNorm)
    dropout: float = 0.0         # dropout on embeddings, attention weights and sublayer outputs (training)
    rope_base: float = 10000.0   # rotary frequency base
    # the rest of the modded-NanoGPT history (configs/stages/; record numbers are modded-nanogpt's)
    ve_layers: str = "3"         # value-embedding layers: k -> first and last k; "depth" -> k = round(L/4) in [3, L/2];
                                 # "all" -> every layer its own table (record #14)
    value_residual: bool = False  # the first layer's values mixed into every layer's, learned weights (record #9)
    x0_lambdas: bool = False     # the embedding output mixed into every block's input, learned weights (record #9)
    rope_frac: float = 1.0       # < 1: rotary on this share of the frequency pairs, the rest unrotated (record #17)
    doc_mask: bool = False       # no attention across documents (each starts at an eot_token) (record #12)
    eot_token: int = 50256       # the token that opens a document (GPT-2's <|endoftext|>)
    window: int = 0              # sliding attention window in tokens (at the end of training); 0: none (record #12)
    window_start: int = 0        # > 0: the window grows linearly from this to `window` over training (record #13)
    window_block: int = 0        # > 0: windows counted in blocks of this many tokens, e.g. 128 (record #16)
    short_windows: bool = False  # alternate long and short (half) windows across layers (record #20)
    fp8_head: bool = False       # the head's matmul in FP8 while training (emulated where not native) (record #19)
    attention: str = "auto"      # auto (flex on CUDA when masked, else sdpa) | sdpa | flex: how, not what

    def __post_init__(self):
        choices = {"pos": ("learned", "rotary"), "norm": ("rms", "layer"), "act": tuple(ACTIVATIONS)}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"model config: {key}={getattr(self, key)!r} is not one of {allowed}")
        for key in ("vocab_size", "n_layer", "n_head", "n_embd", "seq_len"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model config: {key}={getattr(self, key)} must be positive")
        if self.rope_base <= 0:
            raise ValueError(f"model config: rope_base={self.rope_base} must be positive (modded uses 10000)")
        if self.n_embd % self.n_head:
            raise ValueError(f"model config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.pos == "rotary" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"model config: rotary needs an even head dim, got n_embd/n_head = "
                             f"{self.n_embd}/{self.n_head} = {self.n_embd // self.n_head}")
        if self.softcap < 0 or self.attn_scale < 0 or not 0 <= self.dropout < 1:
            raise ValueError("model config: softcap and attn_scale must be >= 0 and dropout in [0, 1)")
        self.check_history_flags()

    def check_history_flags(self):
        """The ladder's flags (configs/stages/): each error names the key and a value that works."""
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"model config: attention={self.attention!r} is not one of {ATTENTION_IMPLS}")
        if self.ve_layers not in ("all", "depth") and not (self.ve_layers.isdigit() and int(self.ve_layers) > 0):
            raise ValueError(f"model config: ve_layers={self.ve_layers!r} must be 'all', 'depth' or a count of "
                             f"layers at each end (at most n_layer/2 are used), e.g. ve_layers=3")
        if not 0 < self.rope_frac <= 1:
            raise ValueError(f"model config: rope_frac={self.rope_frac} must be in (0, 1], e.g. 0.5 (1: full rotary)")
        if self.window < 0 or self.window > self.seq_len:
            raise ValueError(f"model config: window={self.window} must be in [0, seq_len={self.seq_len}] "
                             f"(0: no window), e.g. window={min(1024, self.seq_len)}")
        if self.window_start < 0 or self.window_start > self.window or (self.window_start and not self.window):
            raise ValueError(f"model config: window_start={self.window_start} must be in [0, window={self.window}] "
                             f"and needs a window (0: a fixed window)")
        if self.window_block < 0 or (self.window_block and self.seq_len % self.window_block):
            raise ValueError(f"model config: window_block={self.window_block} must divide seq_len={self.seq_len}, "
                             f"e.g. window_block=128 (0: token granularity)")
        for key in ("window", "window_start"):
            if self.window_block and getattr(self, key) % self.window_block:
                raise ValueError(f"model config: {key}={getattr(self, key)} is not a whole number of "
                                 f"window_block={self.window_block}-token blocks, e.g. {key}="
                                 f"{max(1, getattr(self, key) // self.window_block) * self.window_block}")
        if self.window_block and not self.window:
            raise ValueError(f"model config: window_block={self.window_block} needs a window (window > 0)")
        if self.short_windows and self.window < 2 * max(1, self.window_block):
            raise ValueError(f"model config: short_windows=True needs a window of at least two blocks to halve, "
                             f"got window={self.window}; e.g. window={max(2, 2 * self.window_block)}")
        if self.doc_mask and not 0 <= self.eot_token < self.vocab_size:
            raise ValueError(f"model config: eot_token={self.eot_token} is not a token of vocab_size={self.vocab_size}")
        if self.fp8_head and not hasattr(torch, "float8_e4m3fn"):
            raise ValueError(f"model config: fp8_head=True needs float8 dtypes, which torch {torch.__version__} "
                             f"lacks (torch >= 2.1 has them); set fp8_head=False")


PRESETS = {
    "gpt2": dict(pos="learned", norm="layer", act="gelu_tanh", qk_norm=False, tied=True, zero_init_proj=False,
                 softcap=0.0, value_embeds=False, unet_skips=False, bias=True),
    "modded": dict(pos="rotary", norm="rms", act="relu2", qk_norm=True, tied=False, zero_init_proj=True,
                   softcap=15.0, value_embeds=True, unet_skips=True, bias=False),
}
PROFILES = {
    "d12": dict(n_layer=12, n_head=6, n_embd=768),
    "d24": dict(n_layer=24, n_head=16, n_embd=1024),
    "d36": dict(n_layer=36, n_head=20, n_embd=1280),
    "d48": dict(n_layer=48, n_head=25, n_embd=1600),
}
ARCH_FLAGS = tuple(PRESETS["modded"])  # the intervention flags both presets set


def make_config(preset="modded", profile="d12", **overrides):
    """GPTConfig from a preset, a size profile and explicit overrides (which win)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; known: {sorted(PRESETS)}")
    if profile not in PROFILES:
        raise ValueError(f"unknown model profile {profile!r}; known: {sorted(PROFILES)}")
    unknown = set(overrides) - {f.name for f in fields(GPTConfig)}
    if unknown:
        raise ValueError(f"unknown model config keys {sorted(unknown)}")
    return GPTConfig(**{**PRESETS[preset], **PROFILES[profile], **overrides})


def layer_key(layer, n_layer):
    """'L03' for layer 3 of a 12-layer model: zero-padded to the model depth (at least two digits)."""
    return f"L{layer:0{max(2, len(str(n_layer - 1)))}d}"


def probe_point_names(n_layer):
    """['embed', 'L00.ln1', ..., 'L11.mlp_resid', 'final']: the probe points of a model, in forward order."""
    blocks = [f"{layer_key(i, n_layer)}.{name}" for i in range(n_layer) for name in BLOCK_POINTS]
    return ["embed", *blocks, "final"]


def probe_point_width(name, n_embd):
    """Width of a probe point's activations: 4d for the MLP hidden points, d elsewhere."""
    return 4 * n_embd if name.endswith((".fc", ".act")) else n_embd


class Norm(nn.Module):
    def __init__(self, dim, kind, bias):
        super().__init__()
        self.kind = kind
        if kind == "layer":
            self.weight = nn.Parameter(torch.ones(dim))
            self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x):
        if self.kind == "rms":
            return F.rms_norm(x, (x.size(-1),))
        return F.layer_norm(x, (x.size(-1),), self.weight, self.bias, 1e-5)


def rotary_frequencies(head_dim, base, frac=1.0):
    """One angular frequency per pair of channels: base^(-2i/head_dim), i < head_dim/2. With frac < 1
    (truncated rotary, record #17): n = round(frac * head_dim/2) pairs rotate, at frequencies from 1 down
    to 1/base spaced geometrically (base^-(j/(n-1))), and the other pairs get frequency 0: unrotated, a
    position-free channel for content. Record #17 uses frac 1/2 with base 1024."""
    pairs = head_dim // 2
    if frac >= 1:
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    n = max(1, round(frac * pairs))
    rotated = (1.0 / base) ** torch.linspace(0, 1, n, dtype=torch.float32)
    return torch.cat([rotated, torch.zeros(pairs - n)])


def rotary_tables(seq_len, head_dim, base, frac=1.0):
    """cos, sin of shape (seq_len, 1, head_dim/2): one rotation frequency per pair of channels."""
    inv_freq = rotary_frequencies(head_dim, base, frac)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos()[:, None, :], angles.sin()[:, None, :]


def apply_rotary(x, cos, sin):
    """Rotate channel pairs (i, i + D/2) of x (B, T, H, D) by position-dependent angles."""
    T = x.size(1)
    cos, sin = cos[:T].to(x.dtype), sin[:T].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


# ---- attention masks: one definition, two executions -------------------------------------------
#
# Which keys a query may see is one rule, `mask_allows`: causal, within its document, within the
# window. It is evaluated on broadcast index tensors for an explicit mask (SDPA, the reference and the
# CPU path) and on FlexAttention's index tensors for its block masks (CUDA), so the two cannot drift.


def window_now(cfg, progress):
    """The long window at training progress p in [0, 1]: `window`, or with window_start the linear ramp
    window_start + (window - window_start) p, rounded down to a whole unit (window_block tokens, else
    64), as record #13's 64 * ((64 + 1728 p) // 64). Departs from the records in two ways, both to keep
    one rule: #16-#18 round block windows to the nearest block, and the study ramps over a fixed number
    of steps where the records (and this) ramp over the whole run."""
    if not cfg.window_start:
        return cfg.window
    unit = cfg.window_block or 64
    w = cfg.window_start + (cfg.window - cfg.window_start) * min(max(progress, 0.0), 1.0)
    return int(max(unit, unit * math.floor(w / unit + 1e-9)))  # 1e-9: p = 1 lands on `window` exactly


def layer_windows(cfg, window):
    """Every layer's window given the long one: all long, or with short_windows (record #20) half of it
    (whole blocks) except where a layer's distance to the nearer end of the stack is a multiple of 4.
    At 12 layers that is L S S S L S S L S S S L: record #20's encoder motif L S S S L S, mirrored."""
    if not cfg.short_windows:
        return [window] * cfg.n_layer
    unit = cfg.window_block or 1
    short = max(unit, window // 2 // unit * unit)
    return [window if min(i, cfg.n_layer - 1 - i) % 4 == 0 else short for i in range(cfg.n_layer)]


def value_embed_tables(cfg):
    """[table index or None] per layer. ve_layers=k (records #15-#17 with k = 3): table i feeds layer i
    and layer L-k+i, none in the middle; "depth": the same with k = round(L/4) in [3, L/2], the study's
    rule for deeper models; "all" (record #14): every layer its own table. Departs from #14 in the
    mixing (v <- l0 v + l1 ve, l = (0.5, 0.5), where #14 has one l: (1 - l) v + l ve, equal at
    initialisation) and from #17 in leaving middle layers' v unscaled (theirs is l0 v: a learned gain
    of a learned projection)."""
    L = cfg.n_layer
    if not cfg.value_embeds:
        return [None] * L
    if cfg.ve_layers == "all":
        return list(range(L))
    k = min(max(3, round(L / 4)), L // 2) if cfg.ve_layers == "depth" else int(cfg.ve_layers)
    k = min(k, L // 2)
    return [i if i < k else i - (L - k) if i >= L - k else None for i in range(L)]


def document_ids(idx, eot_token):
    """(B, T) index of the document each position belongs to: a new one starts at every eot_token."""
    return (idx == eot_token).cumsum(dim=1)


def mask_allows(q, k, docs_q, docs_k, window, block):
    """May query position q attend to key position k? Causal; within one document (docs_* None: no
    document mask); within the window (0: none), counted in tokens, or with block > 0 in whole blocks:
    query block i sees key blocks i - window/block + 1 .. i (record #16's block-granular window)."""
    allowed = k <= q
    if docs_q is not None:
        allowed = allowed & (docs_q == docs_k)
    if window:
        allowed = allowed & ((q // block - k // block < window // block) if block else (q - k < window))
    return allowed


@dataclass
class AttnMask:
    """What one layer's attention may see in one forward (docs shared by every layer)."""
    docs: torch.Tensor = None   # (B, T) document ids, or None: no document mask
    window: int = 0             # tokens (0: the whole causal prefix)
    block: int = 0              # window granularity (0: tokens)
    flex: object = None         # the same rule as a FlexAttention BlockMask, when attention runs through flex

    def first_key(self, q0):
        """The first key any query from q0 on may see under the window (a bound, for chunking)."""
        if not self.window:
            return 0
        if self.block:
            return max(0, (q0 // self.block - self.window // self.block + 1) * self.block)
        return max(0, q0 - self.window + 1)


def masked_sdpa(q, k, v, mask, scale, dropout_p, chunk=512):
    """Attention of q, k, v (B, H, T, D) under `mask` through SDPA with explicit boolean masks, one
    chunk of queries at a time against only the keys its window and documents let it reach: memory
    and work grow as T * (chunk + window), not T^2. No mask at all is plain causal SDPA. (On CPU the
    masked kernel cannot skip the masked half of each chunk's diagonal block, as the causal one does:
    bench/attention_masks.py measures what that costs.)"""
    if mask is None or (mask.docs is None and not mask.window):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, scale=scale)
    T, out = q.size(2), []
    starts = range(0, T, chunk)
    if mask.docs is not None:  # keys before the document of a chunk's first query are masked for all of it
        doc_starts = torch.searchsorted(mask.docs, mask.docs[:, ::chunk].contiguous()).amin(0).tolist()
    for i, q0 in enumerate(starts):
        q1, k0 = min(T, q0 + chunk), mask.first_key(q0)
        if mask.docs is not None:
            k0 = max(k0, doc_starts[i])
        qi = torch.arange(q0, q1, device=q.device)[:, None]
        ki = torch.arange(k0, q1, device=q.device)[None, :]
        docs_q = docs_k = None
        if mask.docs is not None:  # (B, 1, chunk, 1) against (B, 1, 1, keys): one mask per sequence
            docs_q, docs_k = mask.docs[:, None, q0:q1, None], mask.docs[:, None, None, k0:q1]
        allowed = mask_allows(qi, ki, docs_q, docs_k, mask.window, mask.block)
        out.append(F.scaled_dot_product_attention(q[:, :, q0:q1], k[:, :, k0:q1], v[:, :, k0:q1], attn_mask=allowed,
                                                  dropout_p=dropout_p, scale=scale))
    return torch.cat(out, dim=2)


def flex_block_mask(mask, B, T, device):
    """`mask` as a FlexAttention BlockMask over 128-token blocks: fully masked blocks are skipped, so
    work grows with the window; the rule inside partial blocks is mask_allows itself."""
    from torch.nn.attention.flex_attention import create_block_mask
    docs, window, block = mask.docs, mask.window, mask.block

    def mask_mod(b, h, q, k):
        return mask_allows(q, k, docs[b, q] if docs is not None else None, docs[b, k] if docs is not None else None,
                           window, block)
    return create_block_mask(mask_mod, B if docs is not None else None, None, T, T, device=device)


@functools.cache
def flex_attention_for(device_type):
    """FlexAttention: compiled once per process on CUDA; elsewhere eager, which materialises the scores
    and has no backward on CPU (torch 2.13): a reference for tests, not a CPU path."""
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else flex_attention


class Attention(nn.Module):
    def __init__(self, cfg, has_value_embed, layer):
        super().__init__()
        d = cfg.n_embd
        self.n_head, self.head_dim = cfg.n_head, d // cfg.n_head
        # Separate q/k/v projections so each is its own named Linear for per-example gradients.
        self.c_q = nn.Linear(d, d, bias=cfg.bias)
        self.c_k = nn.Linear(d, d, bias=cfg.bias)
        self.c_v = nn.Linear(d, d, bias=cfg.bias)
        self.c_proj = nn.Linear(d, d, bias=cfg.bias)
        self.qk_norm, self.dropout = cfg.qk_norm, cfg.dropout
        self.scale = cfg.attn_scale or None  # None lets SDPA use 1/sqrt(head_dim)
        # modded-nanogpt mixes v with a per-token value embedding: v <- l0 * v + l1 * ve
        self.ve_lambdas = nn.Parameter(torch.tensor([0.5, 0.5])) if has_value_embed else None
        # value residual (record #9): v <- (1 - l) v + l v_first, v_first the first layer's values
        self.v_lambda = nn.Parameter(torch.tensor(0.5)) if cfg.value_residual and layer > 0 else None

    def forward(self, x, ve, rotary, mask=None, v_first=None):
        """Attention output (B, T, C), and this layer's values (B, T, H, D) for the value residual."""
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_head, self.head_dim)
        if self.qk_norm:
            q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if self.v_lambda is not None:
            v = (1 - self.v_lambda) * v + self.v_lambda * v_first
        if ve is not None:
            v = self.ve_lambdas[0] * v + self.ve_lambdas[1] * ve.view_as(v)
        q, k, v_ = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        dropout_p = self.dropout if self.training else 0.0
        if mask is not None and mask.flex is not None:
            y = flex_attention_for(q.device.type)(q, k, v_, block_mask=mask.flex, scale=self.scale)
        else:
            y = masked_sdpa(q, k, v_, mask, self.scale, dropout_p)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C)), v


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.act = cfg.act

    def forward(self, x, taps):
        h = taps["fc"](self.c_fc(x))
        h = taps["act"](ACTIVATIONS[self.act](h))
        return taps["proj"](self.c_proj(h))


class Block(nn.Module):
    def __init__(self, cfg, has_value_embed, layer):
        super().__init__()
        self.ln_1 = Norm(cfg.n_embd, cfg.norm, cfg.bias)
        self.attn = Attention(cfg, has_value_embed, layer)
        self.ln_2 = Norm(cfg.n_embd, cfg.norm, cfg.bias)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.taps = nn.ModuleDict({name: nn.Identity() for name in BLOCK_POINTS})
        # x0 lambdas (record #9): the block's input is l0 x + l1 x0, x0 the embedding output
        self.x0_lambdas = nn.Parameter(torch.tensor([1.0, 0.0])) if cfg.x0_lambdas else None

    def forward(self, x, ve, rotary, mask=None, x0=None, v_first=None):
        """The block's output, and its attention's values (for the value residual)."""
        t = self.taps
        if self.x0_lambdas is not None:
            x = self.x0_lambdas[0] * x + self.x0_lambdas[1] * x0
        a, v = self.attn(t["ln1"](self.ln_1(x)), ve, rotary, mask, v_first)
        x = t["attn_resid"](x + self.drop(t["attn"](a)))
        m = self.mlp(t["ln2"](self.ln_2(x)), t)
        return t["mlp_resid"](x + self.drop(m)), v


def head_grad_rows(rows, W, targets, softcap):
    """The gradient of sum_r CE(softcap(rows W^T)_r, targets_r) with respect to a chunk of rows:
    ((softmax(s) - onehot) * ds/dz) W, z = rows W^T, s = c tanh(z / c) (s = z without a softcap),
    in W's dtype; the softcap and softmax in fp32. In place on its own buffers, as few passes over
    the (rows, vocab) logits as eager PyTorch allows."""
    z = (rows @ W.T).float()
    if softcap:
        t = z.div_(softcap).tanh_()
        p = torch.softmax(t * softcap, dim=-1)
    else:
        p = torch.softmax(z, dim=-1)
    p[torch.arange(len(p), device=p.device), targets] -= 1.0
    if softcap:
        p = torch.ops.aten.tanh_backward(p, t)  # p * (1 - t^2): the softcap's derivative, one pass
    return p.to(W.dtype) @ W


# ---- FP8 head (record #19) ---------------------------------------------------------------------

FP8_X_SCALE, FP8_W_SCALE = 2.0, 32.0  # record #19: inputs and weights scaled up before the e4m3 cast
FP8_GRAD_HEADROOM = 2 ** 13  # |dL/dlogit| <= 1/N for a mean over N tokens: scaled to <= 2^13 < e5m2's max 57344


def fp8_grad_scale(n_tokens):
    """The scale of the head's output gradient before its e5m2 cast, for a loss averaged over n_tokens.
    Record #19 fixes 2^29 for its 65,536-token micro-batch, 2^13 * 65,536; this keeps the same headroom
    at any size (a power of two, so the scaling itself is exact), where a fixed 2^29 overflows to inf
    below about 9,400 tokens."""
    return float(FP8_GRAD_HEADROOM * 2 ** math.floor(math.log2(max(1, n_tokens))))


def fp8_native(x):
    """Can this device run FP8 matmuls (torch._scaled_mm: CUDA compute capability 8.9 and up)?"""
    return x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 9)


class FP8Matmul(torch.autograd.Function):
    """x (N, d) @ w (V, d)^T with both operands rounded to float8_e4m3fn (after scaling by FP8_X_SCALE,
    FP8_W_SCALE) and the output gradient to float8_e5m2 (after grad_scale), as record #19's head:
    natively through torch._scaled_mm (bf16 output, fp32 weight gradient) where the GPU has FP8
    matmuls; elsewhere the same roundings by casting to the float8 dtypes and back, the products in
    fp32 (exact for these few-bit operands up to the order of the sums) and the outputs rounded to
    the same dtypes, so CPU spectra see the numerics the GPU trains with."""

    @staticmethod
    def forward(ctx, x, w, grad_scale):
        x8 = (x * FP8_X_SCALE).to(torch.float8_e4m3fn)
        w8 = (w * FP8_W_SCALE).to(torch.float8_e4m3fn)
        ctx.save_for_backward(x8, w8)
        ctx.grad_scale, ctx.dtypes = grad_scale, (x.dtype, w.dtype)
        if fp8_native(x):
            one = x.new_ones((), dtype=torch.float32)
            return torch._scaled_mm(x8, w8.t(), out_dtype=torch.bfloat16, scale_a=one / FP8_X_SCALE,
                                    scale_b=one / FP8_W_SCALE, use_fast_accum=True)
        return (x8.float() @ w8.float().t()).div_(FP8_X_SCALE * FP8_W_SCALE).to(torch.bfloat16)

    @staticmethod
    def backward(ctx, grad):
        x8, w8 = ctx.saved_tensors
        gs = ctx.grad_scale
        g8 = (grad * gs).to(torch.float8_e5m2)
        if fp8_native(grad):
            one = grad.new_ones((), dtype=torch.float32)
            grad_x = torch._scaled_mm(g8, w8.t().contiguous().t(), out_dtype=torch.bfloat16, scale_a=one / gs,
                                      scale_b=one / FP8_W_SCALE, use_fast_accum=False)
            grad_w = torch._scaled_mm(x8.t().contiguous(), g8.t().contiguous().t(), out_dtype=torch.float32,
                                      scale_a=one / FP8_X_SCALE, scale_b=one / gs, use_fast_accum=False).t()
        else:
            grad_x = (g8.float() @ w8.float()).div_(gs * FP8_W_SCALE).to(torch.bfloat16)
            grad_w = (g8.float().t() @ x8.float()).div_(gs * FP8_X_SCALE)
        return grad_x.to(ctx.dtypes[0]), grad_w.to(ctx.dtypes[1]), None


def fp8_matmul(x, w, n_tokens=None):
    """x (..., d) @ w^T through FP8Matmul; n_tokens: how many tokens the loss averages over (default:
    all of x's rows), which sets the gradient's scale."""
    rows = x.reshape(-1, x.size(-1))
    out = FP8Matmul.apply(rows, w, fp8_grad_scale(n_tokens or len(rows)))
    return out.view(*x.shape[:-1], w.size(0))


def fp8_head_grad_rows(rows, W, targets, softcap, n_tokens):
    """head_grad_rows through the FP8 head's own forward and backward (FP8Matmul), for a loss that
    averages over n_tokens: the gradient of sum_r CE(softcap(fp8(rows W^T))_r, targets_r) / n_tokens."""
    with torch.enable_grad():
        r = rows.detach().requires_grad_()
        z = fp8_matmul(r, W, n_tokens).float()
        if softcap:
            z = softcap * torch.tanh(z / softcap)
        (grad,) = torch.autograd.grad(F.cross_entropy(z, targets, reduction="sum") / n_tokens, r)
    return grad


@functools.cache
def compiled_head_grad_rows():
    """head_grad_rows through torch.compile, made once per process (compilation is lazy: at the first
    call, and again for a new chunk shape)."""
    return torch.compile(head_grad_rows)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        L, d = cfg.n_layer, cfg.n_embd
        self.wte = nn.Embedding(cfg.vocab_size, d)
        self.wpe = nn.Embedding(cfg.seq_len, d) if cfg.pos == "learned" else None
        self.ve_index = value_embed_tables(cfg)  # layer -> its value-embedding table, or None
        n_ve = 1 + max((i for i in self.ve_index if i is not None), default=-1)
        self.value_embeds = nn.ModuleList([nn.Embedding(cfg.vocab_size, d) for _ in range(n_ve)])
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg, self.ve_index[i] is not None, i) for i in range(L)])
        # U-net: outputs of the first L//2 blocks are added, weighted, into the inputs of the last L//2.
        self.skip_weights = nn.Parameter(torch.ones(L // 2)) if cfg.unet_skips else None
        self.ln_f = Norm(d, cfg.norm, cfg.bias)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        if cfg.tied:
            self.lm_head.weight = self.wte.weight
        self.taps = nn.ModuleDict({"embed": nn.Identity(), "final": nn.Identity()})
        if cfg.pos == "rotary":
            cos, sin = rotary_tables(cfg.seq_len, d // cfg.n_head, cfg.rope_base, cfg.rope_frac)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        # Training progress in [0, 1], which a growing window depends on: set by the trainer before each
        # step and evaluation, and saved in checkpoints, so a checkpoint is measured with its own masks.
        self.set_progress(0.0)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        cfg = self.cfg
        # GPT-2 scales residual output projections by 1/sqrt(2L); modded zero-initialises them.
        proj_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.zeros_(p) if cfg.zero_init_proj else nn.init.normal_(p, 0.0, proj_std)
            elif name == "lm_head.weight" and cfg.zero_init_proj and not cfg.tied:
                nn.init.zeros_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight":
                nn.init.ones_(p)
            elif name.endswith("ve_lambdas") or name.endswith("v_lambda"):
                p.fill_(0.5)
            elif name.endswith("x0_lambdas"):
                p.copy_(torch.tensor([1.0, 0.0]))
            elif name == "skip_weights":
                nn.init.ones_(p)
            else:  # embeddings and the remaining Linear weights
                nn.init.normal_(p, 0.0, 0.02)

    def features(self, idx):
        """The final hidden states (B, T, d), the input to the head; every probe point fires on the way."""
        B, T = idx.shape
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence length {T} exceeds the model's seq_len={self.cfg.seq_len}")
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device))
        x = x0 = self.taps["embed"](self.drop(x))
        rotary = (self.rope_cos, self.rope_sin) if self.cfg.pos == "rotary" else None
        masks = self.attention_masks(idx)
        ves = [table(idx) for table in self.value_embeds]
        n_skip = len(self.skip_weights) if self.skip_weights is not None else 0
        skips, v_first = [], None
        for i, block in enumerate(self.blocks):
            if i >= len(self.blocks) - n_skip:
                x = x + self.skip_weights[i - (len(self.blocks) - n_skip)] * skips.pop()
            ve = ves[self.ve_index[i]] if self.ve_index[i] is not None else None
            x, v = block(x, ve, rotary, masks[i], x0, v_first)
            v_first = v if i == 0 else v_first
            if i < n_skip:
                skips.append(x)
        return self.taps["final"](self.ln_f(x))

    def set_progress(self, progress):
        """Training progress (step / total steps) for the masks of the coming forwards. The windows are
        resolved here, once, to plain ints: a compiled forward then recompiles only when a window
        changes (at most (window - window_start) / unit + 1 times over a run), not at every step."""
        self.progress = float(progress)
        self.windows = tuple(layer_windows(self.cfg, window_now(self.cfg, self.progress)))

    def attention_masks(self, idx):
        """Every layer's AttnMask for a forward over idx (B, T) at the current progress (None: plain causal)."""
        cfg = self.cfg
        if not cfg.doc_mask and not cfg.window:
            return [None] * cfg.n_layer
        B, T = idx.shape
        docs = document_ids(idx, cfg.eot_token) if cfg.doc_mask else None
        windows = self.windows
        flex = cfg.attention == "flex" or (cfg.attention == "auto" and idx.device.type == "cuda")
        made = {}  # one mask (and one BlockMask) per distinct window
        for w in windows:
            if w not in made:
                made[w] = AttnMask(docs, 0 if w >= T else w, cfg.window_block)  # >= T: no window at all
                if flex:
                    made[w].flex = flex_block_mask(made[w], B, T, idx.device)
        return [made[w] for w in windows]

    def head_logits(self, h):
        """The fp32 logits of final hidden states h (..., d): the head, then the softcap."""
        if self.cfg.fp8_head:  # record #19 (in training; the study's stage 16 in evaluation too, as here)
            logits = fp8_matmul(h, self.lm_head.weight).float()
        else:
            logits = self.lm_head(h).float()
        if self.cfg.softcap:
            logits = self.cfg.softcap * torch.tanh(logits / self.cfg.softcap)
        return logits

    def forward(self, idx, targets=None):
        """Logits (B, T, vocab) and, with targets, the mean cross-entropy (targets == -1 ignored)."""
        logits = self.head_logits(self.features(idx))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def sequence_loss_grad(self, h, targets, chunk_elements=None, dtype=torch.float32, compiled=False):
        """d/dh of sum_b mean_t CE(head(h)[b, t], targets[b, t]) for final hidden states h (B, T, d):
        every sequence's own mean loss, the gradient per-example measurement needs at the head.

        Written out rather than left to autograd because the head dominates that measurement: with
        s = c tanh(z / c) and z = h W^T, the gradient is ((softmax(s) - onehot) * (1 - tanh^2)) W / T,
        a handful of passes over one chunk of rows at a time (head_grad_rows), where autograd's
        log-softmax, NLL and tanh backwards each sweep (and zero-fill) the whole (B T, vocab) buffer:
        half the time on CPU. `dtype` is that of the two products with W (bf16 for a fast approximate
        measurement); the softcap, softmax and result are fp32. compiled=True runs head_grad_rows
        through torch.compile, which fuses its elementwise passes over the (rows, vocab) logits into
        one or two kernels between the two products (bandwidth-bound on a GPU: about 70 bytes per
        logit eager); the same arithmetic, up to the order of the softmax's sums."""
        B, T, d = h.shape
        W = self.lm_head.weight.to(dtype)
        rows, flat_targets = h.reshape(B * T, d).to(dtype), targets.reshape(B * T)
        if chunk_elements is None:  # CPU: chunks of a few hundred rows, the fastest on a 32 MB L3 (smaller
            chunk_elements = 2 ** 23 if h.device.type == "cpu" else 2 ** 28  # ones re-read W too often)
        # whole multiples of 8 rows: some BLAS kernels for a few odd rows round differently with the
        # thread count, and DDP workers must get the same numbers as one process
        step = max(8, chunk_elements // W.size(0) // 8 * 8)
        out = torch.empty(B * T, d, dtype=torch.float32, device=h.device)
        if self.cfg.fp8_head:  # the head trains in FP8: its per-example gradients go through the same roundings
            for i in range(0, B * T, step):
                out[i:i + step] = fp8_head_grad_rows(rows[i:i + step], self.lm_head.weight, flat_targets[i:i + step],
                                                     self.cfg.softcap, T)
            return out.view(B, T, d).to(h.dtype)
        grad_rows = compiled_head_grad_rows() if compiled else head_grad_rows
        for i in range(0, B * T, step):
            out[i:i + step] = grad_rows(rows[i:i + step], W, flat_targets[i:i + step], self.cfg.softcap)
        return out.div_(T).view(B, T, d).to(h.dtype)

    # ---- names for measurement -------------------------------------------------------------

    def probe_points(self):
        """{'embed': tap, 'L00.ln1': tap, ..., 'final': tap}: the DESIGN.md probe points, in forward order."""
        taps = [self.taps["embed"], *(block.taps[name] for block in self.blocks for name in BLOCK_POINTS),
                self.taps["final"]]
        return dict(zip(probe_point_names(self.cfg.n_layer), taps))

    def linears(self):
        """{'L00.attn.c_q': nn.Linear, ...}: the Linear layers addressed for per-example gradients."""
        out = {}
        for i, block in enumerate(self.blocks):
            key = layer_key(i, self.cfg.n_layer)
            out.update({f"{key}.{name}": block.get_submodule(name) for name in BLOCK_LINEARS})
        return out

    # ---- accounting ------------------------------------------------------------------------

    def param_counts(self):
        """Parameter counts by part (tied weights counted once)."""
        blocks = sum(p.numel() for p in self.blocks.parameters())
        embed = self.wte.weight.numel() + (self.wpe.weight.numel() if self.wpe is not None else 0)
        value_embeds = sum(p.numel() for p in self.value_embeds.parameters())
        head = 0 if self.cfg.tied else self.lm_head.weight.numel()
        total = sum(p.numel() for p in self.parameters())  # .parameters() yields a tied tensor once
        return dict(total=total, blocks=blocks, embed=embed, value_embeds=value_embeds, head=head,
                    other=total - blocks - embed - value_embeds - head)

    def flops_per_token(self):
        """Training FLOPs per token (forward + backward = 3x forward): 6 per weight of every matmul
        (blocks and head; embedding lookups are free) plus causal attention, 6 * L * T * d
        (QK^T and AV, each 2 * T * d per token forward, halved by the causal mask, times 3). Under a
        sliding window w a query sees about w - w^2 / 2T keys instead of T/2 (each layer's final window;
        document masks, which depend on the data, are not counted)."""
        cfg, T = self.cfg, self.cfg.seq_len
        matmul_weights = 12 * cfg.n_layer * cfg.n_embd ** 2 + cfg.n_embd * cfg.vocab_size
        keys = sum(T / 2 if not w or w >= T else w - w * w / (2 * T) for w in layer_windows(cfg, cfg.window))
        return 6 * matmul_weights + round(12 * cfg.n_embd * keys)


# ---- pretrained GPT-2 weights ----------------------------------------------------------------

PRETRAINED = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
              "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}
PRETRAINED_FILES = ("config.json", "model.safetensors")  # the Hugging Face checkpoint format

# Options of Hugging Face's GPT2Config that change what the network computes, with the only value
# the gpt2 preset implements (absent keys take these defaults, as in transformers).
HF_FIXED = {"layer_norm_epsilon": 1e-5, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "tie_word_embeddings": True, "add_cross_attention": False}
HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                  "gelu": "gelu"}  # the first three are one formula, written three ways
# Tensors a checkpoint may hold that carry no weights of ours: the causal-mask buffers of old
# transformers versions, and the output head, which GPT-2 ties to wte.
HF_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "lm_head.weight")


class PretrainedError(ValueError):
    """A pretrained checkpoint that cannot be found, fetched or loaded onto the gpt2 preset."""


def _local_copy_hint(repo_id):
    return (f"Point at a local copy instead: a directory holding {' and '.join(PRETRAINED_FILES)}, made on a "
            f"machine with internet by `hf download {repo_id} {' '.join(PRETRAINED_FILES)} --local-dir DIR` "
            f"(`huggingface-cli download ...` with huggingface_hub < 1.0), then pass DIR; or set "
            f"HF_HUB_OFFLINE=1 with a Hugging Face cache that already holds {repo_id}.")


def _fetch(name_or_dir, filename, cache_dir=None):
    """Path of one checkpoint file: from a local directory as is, else from the hub for a known name."""
    if os.path.isdir(name_or_dir):
        path = os.path.join(name_or_dir, filename)
        if not os.path.isfile(path):
            raise PretrainedError(f"{name_or_dir} is not a GPT-2 checkpoint in the Hugging Face format: it lacks "
                                  f"{filename} (needs {' and '.join(PRETRAINED_FILES)})")
        return path
    if name_or_dir not in PRETRAINED:
        raise PretrainedError(f"unknown pretrained model {name_or_dir!r}: known names are {sorted(PRETRAINED)}; "
                              f"a local directory holding {' and '.join(PRETRAINED_FILES)} (the Hugging Face "
                              f"format) also works")
    repo_id = PRETRAINED[name_or_dir]
    import huggingface_hub  # only when downloading; called through the module so tests can fake it
    try:
        return huggingface_hub.hf_hub_download(repo_id=repo_id, filename=filename, cache_dir=cache_dir)
    except Exception as e:  # offline, not cached, auth, HTTP errors: all end the same way for the user
        raise PretrainedError(f"could not fetch {filename} of {repo_id} from the Hugging Face hub "
                              f"({type(e).__name__}: {e}). {_local_copy_hint(repo_id)}") from e


def pretrained_files(name_or_dir, cache_dir=None):
    """(config_path, weights_path) of a pretrained GPT-2: `name_or_dir` is a directory holding
    config.json and model.safetensors (used as is), or a name in PRETRAINED, fetched from the
    Hugging Face hub into `cache_dir` (the hub's default cache when None)."""
    return tuple(_fetch(name_or_dir, filename, cache_dir) for filename in PRETRAINED_FILES)


def _checkpoint_shape(config_path):
    """GPTConfig keys a checkpoint's config.json fixes (seq_len = its n_positions), after checking that
    every option changing the function is one the gpt2 preset implements."""
    with open(config_path) as f:
        hf = json.load(f)
    if hf.get("model_type", "gpt2") != "gpt2":
        raise PretrainedError(f"{config_path}: model_type={hf['model_type']!r}, not a GPT-2 checkpoint")
    missing = [k for k in ("n_layer", "n_head", "n_embd", "vocab_size") if k not in hf]
    if missing or not (hf.get("n_positions") or hf.get("n_ctx")):
        raise PretrainedError(f"{config_path}: lacks {missing or ['n_positions']}, not a GPT-2 config")
    for key, value in HF_FIXED.items():
        if hf.get(key, value) != value:
            raise PretrainedError(f"{config_path}: {key}={hf[key]!r}; the gpt2 preset implements only {value!r}")
    act = hf.get("activation_function", "gelu_new")
    if act not in HF_ACTIVATIONS:
        raise PretrainedError(f"{config_path}: activation_function={act!r} is not one of {sorted(HF_ACTIVATIONS)}")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise PretrainedError(f"{config_path}: n_inner={hf['n_inner']}; the gpt2 preset's MLP is 4 * n_embd wide")
    return dict(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"], vocab_size=hf["vocab_size"],
                seq_len=hf.get("n_positions") or hf["n_ctx"], act=HF_ACTIVATIONS[act])


def _pretrained_config(shape, overrides):
    """The gpt2 preset with the checkpoint's `shape`, then `overrides`."""
    fixed = [f"{k}={overrides[k]} (the checkpoint has {shape[k]})"
             for k in ("n_layer", "n_head", "n_embd", "vocab_size") if k in overrides and overrides[k] != shape[k]]
    if fixed:  # the weights fix these: a model of another shape could never load them
        raise PretrainedError(f"a pretrained GPT-2's shape is fixed by its weights: cannot set {', '.join(fixed)}")
    n_positions, seq_len = shape["seq_len"], overrides.get("seq_len", shape["seq_len"])
    if not 0 < seq_len <= n_positions:
        # learned positions: there is no row for a position the checkpoint never had
        raise PretrainedError(f"seq_len={seq_len} must be in [1, {n_positions}], the checkpoint's n_positions")
    return make_config("gpt2", "d12", **{**shape, **overrides})


def pretrained_config(name_or_dir, cache_dir=None, **overrides):
    """GPTConfig of a pretrained GPT-2: the gpt2 preset with the checkpoint's n_layer, n_head, n_embd,
    vocab_size and n_positions (as seq_len); `overrides` win, e.g. dropout=0.1 or seq_len=256
    (at most n_positions). Fetches config.json only."""
    return _pretrained_config(_checkpoint_shape(_fetch(name_or_dir, "config.json", cache_dir)), overrides)


def _hf_plan(n_layer):
    """[(checkpoint name, kind, our names)]: where every tensor of a GPT-2 checkpoint goes, in order.
    Kinds: "copy" as is; "conv1d" a weight of HF's Conv1D, stored (in, out), so transposed; "qkv_weight"
    and "qkv_bias" the fused c_attn, split along its output into our c_q, c_k, c_v; "positions" wpe,
    of which the first seq_len rows are kept."""
    def norm(hf, ours):
        return [(f"{hf}.weight", "copy", [f"{ours}.weight"]), (f"{hf}.bias", "copy", [f"{ours}.bias"])]

    def linear(hf, ours):
        return [(f"{hf}.weight", "conv1d", [f"{ours}.weight"]), (f"{hf}.bias", "copy", [f"{ours}.bias"])]
    plan = [("wte.weight", "copy", ["wte.weight"]), ("wpe.weight", "positions", ["wpe.weight"])]
    for i in range(n_layer):
        h, b = f"h.{i}", f"blocks.{i}"
        plan += norm(f"{h}.ln_1", f"{b}.ln_1")
        plan += [(f"{h}.attn.c_attn.weight", "qkv_weight", [f"{b}.attn.c_{n}.weight" for n in "qkv"]),
                 (f"{h}.attn.c_attn.bias", "qkv_bias", [f"{b}.attn.c_{n}.bias" for n in "qkv"])]
        plan += linear(f"{h}.attn.c_proj", f"{b}.attn.c_proj") + norm(f"{h}.ln_2", f"{b}.ln_2")
        plan += linear(f"{h}.mlp.c_fc", f"{b}.mlp.c_fc") + linear(f"{h}.mlp.c_proj", f"{b}.mlp.c_proj")
    return plan + norm("ln_f", "ln_f")


def _hf_shape(kind, ours, n_positions):
    """The shape the checkpoint must hold for a tensor of `kind` whose first target has shape `ours`."""
    if kind == "conv1d":
        return (ours[1], ours[0])
    if kind == "qkv_weight":
        return (ours[1], 3 * ours[0])
    if kind == "qkv_bias":
        return (3 * ours[0],)
    if kind == "positions":
        return (n_positions, ours[1])
    return tuple(ours)


def _to_ours(kind, t, seq_len):
    """The checkpoint tensor `t` in our layout: one tensor per target name."""
    if kind == "conv1d":
        return [t.t()]
    if kind == "qkv_weight":
        return list(t.t().chunk(3, dim=0))  # rows of an nn.Linear weight are its outputs: q, then k, then v
    if kind == "qkv_bias":
        return list(t.chunk(3))
    if kind == "positions":
        return [t[:seq_len]]
    return [t]


def from_pretrained(name_or_dir, cache_dir=None, **overrides):
    """A GPT (gpt2 preset, eval mode, fp32, CPU) holding pretrained GPT-2 weights: `name_or_dir` is a
    name in PRETRAINED (fetched from the hub) or a local directory with config.json and
    model.safetensors. `overrides` go to the config (see pretrained_config). Every tensor is checked
    by name and shape before anything is copied; a mismatch raises PretrainedError."""
    from safetensors import safe_open  # the checkpoint format's own reader; the only extra dependency
    config_path, weights_path = pretrained_files(name_or_dir, cache_dir)
    shape = _checkpoint_shape(config_path)
    cfg, n_positions = _pretrained_config(shape, overrides), shape["seq_len"]
    # Built on the meta device: random initialisation of weights about to be overwritten would cost
    # more than the load itself (26 s for gpt2-xl on 2 cores).
    with torch.device("meta"):
        model = GPT(cfg)
    ours = dict(model.named_parameters())  # a tied lm_head.weight is wte.weight, listed once
    plan = _hf_plan(cfg.n_layer)
    try:
        f = safe_open(weights_path, framework="pt", device="cpu")
    except Exception as e:
        raise PretrainedError(f"cannot read {weights_path} as safetensors ({type(e).__name__}: {e})") from e
    with f:
        # checkpoints saved from GPT2LMHeadModel prefix every name with "transformer.", GPT2Model's do not
        stored = {k.removeprefix("transformer."): k for k in f.keys()}
        for hf_name, kind, names in plan:  # every check before any copy: a bad file leaves nothing half-loaded
            if hf_name not in stored:
                raise PretrainedError(f"{weights_path} lacks tensor {hf_name} (for our {', '.join(names)})")
            if any(name not in ours for name in names):
                raise PretrainedError(f"the model has no {', '.join(names)} to load {hf_name} into: "
                                      f"the overrides {overrides} changed the gpt2 architecture")
            expected, got = _hf_shape(kind, ours[names[0]].shape, n_positions), f.get_slice(stored[hf_name]).get_shape()
            if tuple(got) != expected:
                raise PretrainedError(f"{weights_path}: tensor {hf_name} (our {', '.join(names)}) has shape "
                                      f"{tuple(got)}, the gpt2 preset shaped by {config_path} expects {expected}")
        planned = {hf_name for hf_name, _, _ in plan}
        extra = sorted(k for k in stored if k not in planned and not k.endswith(HF_IGNORED_SUFFIXES))
        filled = {name for _, _, names in plan for name in names}
        unfilled = [name for name in ours if name not in filled]
        if extra or unfilled:
            raise PretrainedError(f"{weights_path} does not fit the gpt2 preset: tensors with no place in it "
                                  f"{extra[:5]}, model tensors it does not fill {unfilled[:5]}")
        model.to_empty(device="cpu")  # storage for every parameter; every one is overwritten below
        if cfg.tied:
            model.lm_head.weight = model.wte.weight  # to_empty gives each module its own tensor: tie again
        params = dict(model.named_parameters())
        with torch.no_grad():
            for hf_name, kind, names in plan:
                for name, t in zip(names, _to_ours(kind, f.get_tensor(stored[hf_name]), cfg.seq_len)):
                    params[name].copy_(t)  # copy_ also casts fp16/bf16 checkpoints to fp32
    return model.float().eval()
