"""
Spectral measurement: how the activation covariance eigenvalues of each probe point, and the
singular values of per-example gradients and of weights, decay. Measurement only: what to do with
the numbers (files of a run, figures, W&B) is the callers' business (measure.py, train_gpt.py).

Read top to bottom:

1. Settings: one object owns every choice a measurement makes (probe set, points, matrices, fit
   windows, normalisation, precision, memory budget) and its default, built from the trainer's
   Config, from a run's record (checkpoint or config.json) or from command-line flags.
2. Probe: the one small class that attaches forward hooks to named modules and detaches them.
3. Covariance statistics (n, mean, M2): exact, streaming, mergeable. Each chunk of rows is centred
   on its own mean in fp64, multiplied in fp32 with TF32 off, and added in fp64; chunks, batches
   and DDP ranks combine with Chan's parallel update, so the result does not depend on how the
   data was split (to fp64 round-off).
4. Spectra and fits: eigenvalues in fp64, descending, 1-based ranks; alpha = -slope of the least
   squares line of log lambda_i on log i over a rank window [a, b] (inclusive), with R^2 and the
   slope's standard error; RankMe, participation ratio, stable rank, top-10 share; Jensen-Shannon
   divergence between trace-normalised spectra.
5. Activation spectra: one no-grad forward pass of the model in eval mode over a fixed probe set,
   every requested point captured at once. The probe sequences alternate between two halves with
   their own statistics; the full set is their merge, and the two halves' alphas give a
   sampling-noise estimate without another pass.
6. Per-example gradient spectra: the singular values of G (rows = per-example gradients of a
   weight) from batched forward/backward passes, via the Gram K = G G^T; gradient noise scale.
7. Weight spectra: singular values of the weights, and the density exponent of their squares.
8. Summaries: every scalar of a family of measured spectra, with notes; the console table.
9. Files and history: spectra as .npz (this module owns the format), and what later evaluations
   need of earlier ones (reference spectra, alpha series), kept in memory.

Nothing here knows about optimizers, data loaders, plots or the training loop: the trainer asks
for "the spectra of this model on these tokens" and logs what comes back.
"""

import glob
import math
import os
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from data.shards import atomic_write
from model import BLOCK_LINEARS, BLOCK_POINTS, layer_key, probe_point_names, probe_point_width

CHUNK_ROWS = 4096  # rows per fp32 product: bounds the fp32 rounding of each chunk's M2
# Eigenvalues below FLOOR * lambda_1 are round-off, not signal. Against fp64, the fp32 products of
# centred chunks keep eigenvalues above 8 fp32 epsilons (9.5e-7) of lambda_1 within about 0.1%
# (bench/act_spectra.py: 8e-4 on 98 points of a random 12-layer model; tests/test_spectra.py on
# steep, rotated and outlier spectra); deeper in the tail the relative error grows to 1% and more.
FLOOR = 8 * float(np.finfo(np.float32).eps)
# Residual-stream points are RMS-normalised per token as x / sqrt(mean(x^2) + RMS_EPS) under
# act_norm="rms", the Spectral Lens protocol's F.rms_norm(x, eps=1e-6) (not torch's default eps).
RMS_EPS = 1e-6
FAMILIES = ("act", "grad", "weight")
SINGULAR_FAMILIES = ("grad", "weight")  # spectra of singular values; "act" holds covariance eigenvalues

# ----------------------------------------------------------------------------------------------
# 1. Settings

ACT_NORMS = ("rms", "none")
METHODS = ("auto", "materialise", "token_gram")
# Arithmetic of the forward/backward passes that give A and B. g_i = vec(B_i^T A_i) is formed and
# K = G G^T accumulated in fp64 whatever is chosen. 'fp32' is exact (agrees with a batch-size-1 fp32
# loop to ~1e-6); 'tf32' (TF32 tensor cores, CUDA only: full fp32 on CPU) and 'bf16' (autocast, as
# the trainer's CUDA steps) trade that agreement for speed: bench/grad_spectra.py --precision prints both.
PRECISIONS = ("fp32", "tf32", "bf16")
DENSITY_RULES = ("weightwatcher", "exact")  # x_min choice of the weight density exponent (density_exponent)


@dataclass(frozen=True)
class SpectraSettings:
    """What a spectral measurement measures and how, with the one set of defaults. The trainer's flat
    keys (train_gpt.Config, e.g. --spectra_tail=10,100) are in CONFIG_KEYS. A record from before a
    setting existed was measured with its default here, unless the field says otherwise
    (metadata "before": the default changed since)."""
    seq_len: int = 1024              # tokens per probe sequence (the run's seq_len)
    act_tokens: int = 131_072        # activation probe set: the first this-many val tokens
    act_batch_size: int = 16         # probe sequences per forward pass; a fixed unit, so any GPU count agrees
    points: str = ""                 # "" -> embed, every L{l}.mlp_resid, final; or names/globs "L0*.attn,final"
    sublayers: bool = False          # with points="": every probe point of every block
    head: tuple = (1, 10)            # rank windows [a, b] of the power-law fits;
    tail: tuple = (30, 150)          # (10, 100) is the earlier protocol's tail
    act_norm: str = "rms"            # rms: RMS-normalise residual-stream points per token | none
    grad_samples: int = 512          # per-example gradients: the first this-many val sequences
    matrices: str = "attn.c_proj"    # comma-separated from attn.c_q/c_k/c_v/c_proj, mlp.c_fc/c_proj
    layers: str = ""                 # "" -> 5 evenly spaced layers, first and last included; "all"; "0,5,11"
    grad_batch_size: int = 8         # examples per forward/backward (a fixed unit, like act_batch_size)
    max_gb: float = 8.0              # per-example gradients (fp32) held at once; more goes in column blocks
    method: str = "auto"             # auto | materialise | token_gram (see gram_method)
    precision: str = "fp32"          # fp32 (exact) | tf32 | bf16: faster, approximate passes on a GPU
    compile: bool = False            # torch.compile the head's gradient in those passes (a GPU speedup)
    # weight density exponent: WeightWatcher's x_min rule | exact (records from before the setting: exact)
    density_rule: str = field(default="weightwatcher", metadata={"before": "exact"})

    @classmethod
    def from_config(cls, config):
        """The settings of a trainer config given as a dict (asdict of train_gpt.Config, a checkpoint's
        or config.json's `config`); keys it lacks take the defaults."""
        values = {}
        for f in fields(cls):
            key = CONFIG_KEYS.get(f.name, f.name)
            if key in config and config[key] is not None:
                value = config[key]
                values[f.name] = tuple(value) if isinstance(value, list) else value
            elif "before" in f.metadata:
                values[f.name] = f.metadata["before"]
        return cls(**values)

    def override(self, **flags):
        """A copy with the given settings changed; None leaves a setting as it is (an absent flag)."""
        return replace(self, **{k: v for k, v in flags.items() if v is not None})

    def check(self, act=True, grad=True, names=None):
        """ValueError naming the setting (and its value) of the first one that cannot be measured:
        by its trainer key, or by `names` ({setting: name}, e.g. a command's flags)."""
        def name(setting):
            return (names or {}).get(setting) or CONFIG_KEYS.get(setting, setting)
        for window in ("head", "tail"):
            check_window(name(window), getattr(self, window))
        for setting, allowed in (("act_norm", ACT_NORMS), ("method", METHODS), ("precision", PRECISIONS),
                                 ("density_rule", DENSITY_RULES)):
            if getattr(self, setting) not in allowed:
                raise ValueError(f"{name(setting)}={getattr(self, setting)!r}: valid values are {', '.join(allowed)}"
                                 + (" (fp32 is exact; tf32 and bf16 are faster on a GPU and approximate)"
                                    if setting == "precision" else ""))
        for setting in ("seq_len", "act_batch_size", "grad_batch_size", "max_gb"):
            if not getattr(self, setting) > 0:
                raise ValueError(f"{name(setting)}={getattr(self, setting)} must be positive")
        if act and self.act_tokens < 2 * self.seq_len:
            raise ValueError(f"{name('act_tokens')}={self.act_tokens} is less than two sequences of "
                             f"{name('seq_len')}={self.seq_len} (the probe set is split in two halves for the noise "
                             "estimate)")
        if grad and self.grad_samples < 2:
            raise ValueError(f"{name('grad_samples')}={self.grad_samples}: per-example gradient spectra need at least "
                             "2 examples")

    def point_names(self, n_layer):
        return select_points(n_layer, self.points, self.sublayers)

    def matrix_names(self, linears, n_layer):
        return select_linears(linears, n_layer, self.matrices, self.layers)

    def probe_tokens(self, family):
        """Tokens of the probe slice a family reads: whole sequences of the activation probe set, or
        one sequence per gradient example (+1 for the last target). Weights read none; they are
        measured with the gradients and recorded with their probe set."""
        if family == "act":
            return self.act_tokens // self.seq_len * self.seq_len
        return self.grad_samples * self.seq_len

    def meta(self, family):
        """What a family's spectra were measured with, saved beside them (npz meta.*): the probe set
        (SAME_PROBE) and the fit windows."""
        meta = dict(probe_tokens=self.probe_tokens(family), seq_len=self.seq_len, head=self.head, tail=self.tail,
                    act_norm=self.act_norm)
        if family == "grad":
            meta["precision"] = self.precision
        return meta

    def record(self, n_layer, points, matrices):
        """The settings and the resolved lists (points, layers, matrices) for a run's config.json."""
        return dict(asdict(self), point_names=list(points), layer_indices=layer_indices(n_layer, self.layers),
                    matrix_names=list(matrices))


# trainer key of each setting (train_gpt.Config) where it is not the setting's own name
CONFIG_KEYS = dict(act_tokens="spectra_tokens", act_batch_size="spectra_batch_size", points="spectra_points",
                   sublayers="spectra_sublayers", head="spectra_head", tail="spectra_tail", act_norm="spectra_act_norm",
                   matrices="grad_matrices", layers="grad_layers", max_gb="grad_spectra_max_gb",
                   method="grad_spectra_method", precision="grad_spectra_precision", compile="grad_spectra_compile",
                   density_rule="weight_density_rule")
DEFAULTS = SpectraSettings()


def check_window(name, window):
    """A rank window [a, b] needs 1 <= a < b (two ranks at least for a line)."""
    a, b = window
    if not (isinstance(a, int) and isinstance(b, int)) or a < 1 or b <= a:
        raise ValueError(f"{name}={tuple(window)} is not a rank window: need integers 1 <= a < b, "
                         "e.g. (1, 10) or (10, 100)")


# ----------------------------------------------------------------------------------------------
# 2. Probe


class Probe:
    """Forward hooks on named modules for the length of a `with` block: after each module runs,
    fn(name, output) is called. What to do with the activations is the caller's business; leaving
    the block always removes the hooks, so the model is exactly as before."""

    def __init__(self, modules, fn):
        self.modules, self.fn, self.handles = modules, fn, []

    def __enter__(self):
        for name, module in self.modules.items():
            self.handles.append(module.register_forward_hook(
                lambda _m, _inp, out, name=name: self.fn(name, out)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []


# ----------------------------------------------------------------------------------------------
# 3. Covariance statistics


class Stats(NamedTuple):
    """Sufficient statistics of a set of row vectors: count, mean (fp64) and M2 = sum of outer
    products of the centred rows (fp64). Covariance = M2 / (n - 1)."""
    n: int
    mean: torch.Tensor
    m2: torch.Tensor


def empty_stats(width, device):
    return Stats(0, torch.zeros(width, dtype=torch.float64, device=device),
                 torch.zeros(width, width, dtype=torch.float64, device=device))


@contextmanager
def fp32_matmuls(tf32=False):
    """fp32 matrix products in full fp32 (TF32 off) inside the block, or with tf32=True on CUDA's
    TF32 tensor cores; CPU products stay full fp32 either way. Every setting touched is restored.
    torch >= 2.9 keeps per-backend switches (cuda.matmul and mkldnn.matmul .fp32_precision) that
    the legacy one maps onto, and its legacy getter refuses to answer once a caller has set them
    directly: then only those are used. (cuDNN's TF32 switch concerns convolutions: none here.)"""
    cuda, cpu = torch.backends.cuda.matmul, getattr(torch.backends.mkldnn, "matmul", None)
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # the caller used the per-backend switches
        legacy = None
    switches = (cuda.fp32_precision, cpu.fp32_precision) if cpu is not None else None
    if legacy is not None:
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
    if switches is not None:
        cuda.fp32_precision, cpu.fp32_precision = ("tf32" if tf32 else "ieee"), "ieee"
    try:
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)
        if switches is not None:
            cuda.fp32_precision, cpu.fp32_precision = switches


def merge_stats(a, b):
    """Chan et al.'s parallel update: the statistics of the union of two disjoint sets."""
    if a is None or a.n == 0:
        return b
    if b is None or b.n == 0:
        return a
    n = a.n + b.n
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.n / n)
    m2 = a.m2 + b.m2 + torch.outer(delta, delta) * (a.n * b.n / n)
    return Stats(n, mean, m2)


def cov_stats(rows):
    """Statistics of the rows of an (N, d) tensor. Each chunk is centred on its own fp64 mean before
    the fp32 product, so a large common offset (mean >> spread) does not cancel catastrophically."""
    out = None
    for chunk in rows.split(CHUNK_ROWS):
        x = chunk.double()
        mean = x.mean(0)
        c = (x - mean).float()
        out = merge_stats(out, Stats(len(chunk), mean, (c.T @ c).double()))
    return out


def reduce_stats(s, dst=0):
    """Under torch.distributed: the statistics of every rank's data together, complete on rank dst.
    All ranks learn the global count and mean (one all-reduce of n and n * mean); M2 is Chan's
    update over all ranks at once, M2 = sum_r [M2_r + n_r (mean_r - mean)(mean_r - mean)^T], summed
    onto rank dst only. Reducing statistics, not activations, keeps the traffic at d^2 per point."""
    if not dist.is_initialized():
        return s
    nm = torch.cat([torch.tensor([float(s.n)], dtype=torch.float64, device=s.mean.device), s.mean * s.n])
    dist.all_reduce(nm)
    n = int(round(nm[0].item()))
    mean = nm[1:] / max(n, 1)
    delta = s.mean - mean
    m2 = s.m2.addr_(delta, delta, alpha=s.n)  # in place: a second d x d per point would double the memory
    dist.reduce(m2, dst)
    return Stats(n, mean, m2)


def covariance(s):
    """Unbiased covariance M2 / (n - 1)."""
    return s.m2 / (s.n - 1)


# ----------------------------------------------------------------------------------------------
# 4. Spectra, fits and spectral metrics (numpy, fp64)


def eigenvalues(s):
    """Eigenvalues of the covariance in fp64, descending; NaN when it is undefined or non-finite."""
    width = s.mean.numel()
    if s.n < 2 or not torch.isfinite(s.m2).all():
        return np.full(width, np.nan)
    try:
        return torch.linalg.eigvalsh(covariance(s)).flip(0).cpu().numpy()
    except torch.linalg.LinAlgError:  # did not converge: report NaN metrics rather than stop the run
        return np.full(width, np.nan)


# The probe size that keeps the bias of a fitted alpha under 0.02 (bench/estimator_bias.py): Gaussian
# samples of power-law covariances (alpha 0.6-1.0) at widths 768-1600 need n >= 16 x width in the
# tail window (30-150) and 2-4 x width in the head (1-10). Tokens of a probe sequence are correlated,
# so it takes PROBE_TOKEN_FACTOR of them to be worth one independent sample: 1 is the lower bound
# (independent tokens), which is what the dry run warns below; on the toy task a sequence of 64
# tokens was worth about one sample (factor 64), and text lies between, not yet measured.
PROBE_RATIO = 16
PROBE_TOKEN_FACTOR = 1


def min_probe_tokens(width):
    """Probe tokens for |alpha bias| < 0.02 at this width (the dry run warns below it)."""
    return int(math.ceil(PROBE_RATIO * width * PROBE_TOKEN_FACTOR))


def numerical_rank(values, limit):
    """How many leading values are meaningful: at most `limit` (the rank the sample allows) and
    above the round-off floor FLOOR * lambda_1 of the fp32 products. Values are descending, so these
    ranks are a prefix."""
    if len(values) == 0 or not np.isfinite(values).all() or values[0] <= 0:
        return 0
    return int(min(limit, np.count_nonzero(values > values[0] * FLOOR)))


def fit_power_law(values, window, rank=None):
    """Least squares of log values[i] on log i over ranks [a, b] (1-based, inclusive), clipped to the
    first `rank` values: {alpha (= -slope), r2, se (slope's standard error), intercept (log scale),
    lo, hi (the ranks used), clipped (hi < b)}. NaN where fewer than two ranks remain."""
    a, b = window
    rank = len(values) if rank is None else min(rank, len(values))
    hi = min(b, rank)
    out = dict(alpha=math.nan, r2=math.nan, se=math.nan, intercept=math.nan, lo=a, hi=hi, clipped=hi < b)
    if hi - a + 1 < 2:
        return out
    x, y = np.log(np.arange(a, hi + 1)), np.log(values[a - 1:hi])
    xc, yc = x - x.mean(), y - y.mean()
    sxx = (xc ** 2).sum()
    slope = (xc * yc).sum() / sxx
    ssr = ((yc - slope * xc) ** 2).sum()
    sst = (yc ** 2).sum()
    out.update(alpha=-slope, intercept=y.mean() - slope * x.mean(), r2=1.0 - ssr / sst if sst > 0 else 1.0,
               se=math.sqrt(ssr / (len(x) - 2) / sxx) if len(x) > 2 else math.nan)
    return out


def normalised(values):
    """Non-negative part of a spectrum divided by its sum (a distribution over ranks); None if empty."""
    p = np.clip(np.nan_to_num(values, nan=0.0), 0.0, None)
    total = p.sum()
    return p / total if total > 0 and np.isfinite(values).all() else None


def rankme(values):
    """exp(entropy) of the normalised spectrum: the number of equally strong modes it is worth.
    Of covariance eigenvalues here (DESIGN.md); RankMe's paper normalises singular values instead."""
    p = normalised(values)
    if p is None:
        return math.nan
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def participation_ratio(values):
    """(sum lambda)^2 / sum lambda^2."""
    p = normalised(values)
    return math.nan if p is None else float(1.0 / (p ** 2).sum())


def stable_rank(values):
    """sum lambda / lambda_1 (for a covariance: ||X||_F^2 / ||X||_2^2 of the centred data)."""
    p = normalised(values)
    return math.nan if p is None else float(1.0 / p.max())


def top_share(values, k=10):
    """Share of the trace in the k leading modes."""
    p = normalised(values)
    return math.nan if p is None else float(p[:k].sum())


def js_divergence(u, v):
    """Jensen-Shannon divergence (bits, in [0, 1]) between two spectra, each truncated to their
    common length and trace-normalised: 0 when the shapes agree, whatever the scale."""
    k = min(len(u), len(v))
    p, q = normalised(np.asarray(u)[:k]), normalised(np.asarray(v)[:k])
    if p is None or q is None:
        return math.nan
    m = (p + q) / 2

    def kl(a):
        nz = a > 0
        return (a[nz] * np.log2(a[nz] / m[nz])).sum()
    return float(max(0.0, (kl(p) + kl(q)) / 2))



ENERGY_STATS = ("pr", "stable_rank", "top10", "js_prev", "js_first")  # of sigma^2 for SINGULAR_FAMILIES
# Version of the metric definitions, recorded in each run's config.json (runs without the record
# are 1), and what changed at each version: (version, families, stats) defined differently from it on.
METRIC_VERSION = 3
METRIC_CHANGES = ((2, SINGULAR_FAMILIES, ENERGY_STATS),  # from sigma^2 (1: from sigma itself)
                  (3, FAMILIES, ("alpha_head_noise", "alpha_tail_noise")),  # split_half_se (2: |a0 - a1| / 2)
                  (3, ("weight",), ("alpha_density", "density_xmin", "density_ks")))  # WeightWatcher's x_min rule
STATS = ("alpha_head", "r2_head", "se_head", "alpha_head_noise", "alpha_tail", "r2_tail", "se_tail",
         "alpha_tail_noise", "rankme", "pr", "stable_rank", "top10", "valid_rank", "js_prev", "js_first")


def split_half_se(a0, a1):
    """The standard error of the full-sample alpha, estimated from the alphas of the sample's two
    halves. Each half has half the samples, so twice the variance 2 s^2 of the full-sample alpha;
    for Gaussian errors a0 - a1 ~ N(0, 4 s^2) and E|a0 - a1| = 2 s sqrt(2 / pi), so
    sqrt(pi / 8) |a0 - a1| (0.627 |a0 - a1|) is an unbiased estimate of s. (|a0 - a1| / 2 reads
    sqrt(2 / pi) = 0.80 of s on average, 20% low.)"""
    return math.sqrt(math.pi / 8) * abs(a0 - a1)


def spectrum_metrics(values, limit, head, tail, halves=None, half_limits=None, prev=None, first=None,
                     singular=False):
    """Every scalar of one spectrum, as {stat: value}. `limit` is the largest meaningful rank (for a
    covariance of n samples and width d, min(d, n - 1)); `halves` are the spectra of the two halves of
    the sample, whose alphas give alpha_*_noise, the split-half estimate of the full-sample alpha's
    standard error (split_half_se).
    singular=True: `values` are singular values sigma of a matrix X (gradients, weights). The fits
    and RankMe (whose paper uses singular values) take them as they are; pr, stable_rank, top10 and
    the JS divergences take the mode energies sigma^2, the eigenvalues of X X^T, so that they mean
    for X what they mean for a covariance (stable_rank = ||X||_F^2 / ||X||_2^2, top10 a share of
    ||X||_F^2)."""
    rank = numerical_rank(values, limit)
    out = {}
    for name, window in (("head", head), ("tail", tail)):
        fit = fit_power_law(values, window, rank)
        out[f"alpha_{name}"], out[f"r2_{name}"], out[f"se_{name}"] = fit["alpha"], fit["r2"], fit["se"]
        noise = math.nan
        if halves is not None:
            a0, a1 = (fit_power_law(h, window, numerical_rank(h, lim))["alpha"] for h, lim in zip(halves, half_limits))
            noise = split_half_se(a0, a1)
        out[f"alpha_{name}_noise"] = noise

    def energy(v):
        return np.square(v) if singular else v
    valid = values[:rank]
    out.update(rankme=rankme(valid), pr=participation_ratio(energy(valid)), stable_rank=stable_rank(energy(valid)),
               top10=top_share(energy(valid)), valid_rank=rank,
               js_prev=js_divergence(energy(values), energy(prev)) if prev is not None else math.nan,
               js_first=js_divergence(energy(values), energy(first)) if first is not None else math.nan)
    return out


# ----------------------------------------------------------------------------------------------
# 5. Activation spectra: one forward pass over the probe set, every point at once


def default_points(n_layer, sublayers=False):
    """The embedding, every block output (L{l}.mlp_resid) and `final`; with sublayers, every point."""
    names = probe_point_names(n_layer)
    return names if sublayers else [p for p in names if p in ("embed", "final") or p.endswith(".mlp_resid")]


def select_points(n_layer, spec="", sublayers=False):
    """Probe points from a comma-separated list of names or glob patterns ("L0*.attn,final"), or the
    defaults when spec is empty. Raises ValueError naming an unknown entry and the valid names."""
    if not spec:
        return default_points(n_layer, sublayers)
    names = probe_point_names(n_layer)
    chosen = set()
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        regex = re.compile("^" + re.escape(item).replace(r"\*", ".*").replace(r"\?", ".") + "$")
        hits = [p for p in names if regex.match(p)]
        if not hits:
            raise ValueError(f"spectra_points: {item!r} matches no probe point; valid names are embed, "
                             f"L00.{{{','.join(BLOCK_POINTS)}}} ... {names[-2].split('.')[0]}.*, final")
        chosen.update(hits)
    return [p for p in names if p in chosen]


def stats_memory(points, n_embd):
    """Bytes of device memory the statistics of these points hold during a measurement: two fp64
    M2 matrices (the halves) per point."""
    return sum(2 * 8 * probe_point_width(p, n_embd) ** 2 for p in points)


def is_residual(point):
    """Residual-stream points, RMS-normalised per token under act_norm="rms" (Spectral Lens protocol)."""
    return point == "embed" or point.endswith(".attn_resid") or point.endswith(".mlp_resid")


@torch.no_grad()
def activation_stats(model, tokens, settings, points, rank=0, world=1):
    """{point: (half-0 Stats, half-1 Stats)} of the probe set, complete on rank 0 (None elsewhere).

    tokens: 1-D tensor; its first len // seq_len whole sequences are the probe set. Sequences are
    grouped in fixed batches of settings.act_batch_size and batch b runs on rank b % world; sequences
    with even and odd index in the probe set feed the two halves. Every batch is therefore computed
    identically whatever the number of processes, and only the fp64 merge order differs.
    The model runs in eval mode (no dropout) without gradients and in full fp32, and is restored to
    its previous mode, so training RNG, parameters and .grad are untouched."""
    taps = model.probe_points()
    device = next(model.parameters()).device
    seq_len, batch_size = settings.seq_len, settings.act_batch_size
    n_seq = len(tokens) // seq_len
    seqs = tokens[: n_seq * seq_len].view(n_seq, seq_len)
    stats = {p: [None, None] for p in points}
    first = [0]  # index of the current batch's first sequence in the probe set

    def accumulate(name, x):
        x = x.detach().float()
        if settings.act_norm == "rms" and is_residual(name):
            x = F.rms_norm(x, (x.size(-1),), eps=RMS_EPS)
        for h in (0, 1):
            rows = x[(h - first[0]) % 2::2].reshape(-1, x.size(-1))
            if len(rows):
                stats[name][h] = merge_stats(stats[name][h], cov_stats(rows))

    was_training = model.training
    model.eval()
    try:
        with Probe({p: taps[p] for p in points}, accumulate), fp32_matmuls():
            for b in range(rank, math.ceil(n_seq / batch_size), world):
                first[0] = b * batch_size
                model.features(seqs[b * batch_size:(b + 1) * batch_size].to(device))
    finally:
        model.train(was_training)
    # A rank that saw no batch does not know the widths: agree on them, then reduce.
    widths = torch.tensor([next((s.mean.numel() for s in stats[p] if s is not None), 0) for p in points],
                          device=device)
    if dist.is_initialized():
        dist.all_reduce(widths, op=dist.ReduceOp.MAX)
    out = {}
    for p, w in zip(points, widths.tolist()):
        out[p] = tuple(reduce_stats(s if s is not None else empty_stats(w, device)) for s in stats[p])
    return out if rank == 0 else None


def measure_activations(model, tokens, settings, points, rank=0, world=1):
    """Activation spectra on rank 0 as {point: {values, values_half0, values_half1, n, n_half0, n_half1,
    width, limit, limit_half0, limit_half1, rank_deficient, rms}} (eigenvalues fp64 numpy, descending;
    a limit is the largest meaningful rank, min(width, n - 1): centring costs one); None on other
    ranks. `tokens` is the probe slice (settings.probe_tokens("act") of it are read)."""
    stats = activation_stats(model, tokens[:settings.probe_tokens("act")], settings, points, rank, world)
    if stats is None:
        return None
    out = {}
    for p, (h0, h1) in stats.items():
        full = merge_stats(h0, h1)
        width = full.mean.numel()
        out[p] = dict(values=eigenvalues(full), values_half0=eigenvalues(h0), values_half1=eigenvalues(h1),
                      n=full.n, n_half0=h0.n, n_half1=h1.n, width=width, limit=min(width, full.n - 1),
                      limit_half0=min(width, h0.n - 1), limit_half1=min(width, h1.n - 1),
                      rank_deficient=full.n - 1 < width, rms=settings.act_norm == "rms" and is_residual(p))
    return out


# ----------------------------------------------------------------------------------------------
# 6. Per-example gradient spectra: batched passes, no per-example backward
#
# One example is one sequence, its loss the mean cross-entropy over its tokens. For a Linear
# y = x W^T the gradient of example i is g_i = vec(B_i^T A_i), A_i (T x d_in) the layer's inputs
# and B_i (T x d_out) the loss gradient at its outputs. Sequences in a batch do not interact, so
# one backward of the summed per-sequence losses yields every B_i at once; torch.autograd.grad
# asks only for the outputs of the chosen layers, so no parameter gradient is computed, .grad is
# never written, and nothing below the lowest chosen layer runs backward. The spectrum is that of
# G = [g_1; ...; g_n]: singular values = sqrt(eig(K)), K = G G^T (n x n, fp64). Each g_i is
# formed in fp64 and held in fp32, the precision of the gradients autograd itself would give, at
# half the memory: d12's five default matrices on 512 sequences (5.6 GB) fit one pass under the
# default 8 GB. Rounding G to fp32 moves sigma_k by about 6e-8 sigma_1 / sigma_k relative: ~1e-8
# of sigma_1, up to ~1e-4 relative near the round-off floor; fitted alphas by < 1e-6 (tested).
#
# DDP: probe batch b runs on rank b % world, so every g_i is computed exactly as in one process;
# each rank holds the rows of G of its own batches, and they travel to rank 0 one column chunk at
# a time (gathered_gram), where K accumulates. Exchanging G is simple and exact, and with it
# grad_spectra_max_gb bounds each rank's share, so N GPUs hold N times the rows per pass; splitting
# the matrices between ranks instead would leave every rank running every sample.

def default_layers(n_layer, k=5):
    """k evenly spaced layers, the first and the last included."""
    return sorted({round(i * (n_layer - 1) / (k - 1)) for i in range(k)}) if n_layer > 1 else [0]


def layer_indices(n_layer, layers=""):
    """The layers of a grad_layers setting: '' = 5 evenly spaced, 'all', or '0,5,11'; ValueError otherwise."""
    if layers in ("", None):
        return default_layers(n_layer)
    if layers == "all":
        return list(range(n_layer))
    try:
        idx = sorted({int(v) for v in str(layers).split(",") if v.strip()})
    except ValueError:
        raise ValueError(f"grad_layers={layers!r}: expected '', 'all' or layer numbers like '0,5,11'") from None
    if not idx or idx[0] < 0 or idx[-1] >= n_layer:
        raise ValueError(f"grad_layers={layers!r}: layers run from 0 to {n_layer - 1}")
    return idx


def select_linears(model_names, n_layer, matrices="attn.c_proj", layers=""):
    """Names like 'L05.attn.c_proj' for the chosen matrices ('attn.c_proj,mlp.c_proj') in the chosen
    layers (layer_indices). ValueError names what does not exist."""
    kinds = [m.strip() for m in matrices.split(",") if m.strip()]
    for m in kinds:
        if m not in BLOCK_LINEARS:
            raise ValueError(f"grad_matrices: {m!r} is not a matrix of a block; valid names are "
                             f"{', '.join(BLOCK_LINEARS)}")
    names = [f"{layer_key(i, n_layer)}.{m}" for i in layer_indices(n_layer, layers) for m in kinds]
    missing = [n for n in names if n not in model_names]
    if missing:
        raise ValueError(f"no matrix {missing[0]!r} in this model; valid names look like {sorted(model_names)[:3]}")
    return names


def per_example_outputs(model, linears, idx, targets, precision="fp32", compile=False):
    """{name: (A, B)} for one batch: each Linear's input A (b, T, d_in) and the gradient B (b, T,
    d_out) of every sequence's own mean loss at its output, from one forward and one backward.
    precision='bf16' runs the forward under bf16 autocast (its backward follows in the same dtypes)
    and the head's products in bf16; otherwise fp32, TF32 or not as the caller has set it.
    compile=True compiles the head's gradient (GPT.sequence_loss_grad): a GPU speedup, off by default."""
    captured = {}
    bf16 = precision == "bf16"

    def keep(name, inp, out):
        captured[name] = (inp[0].detach(), out)
    handles = [m.register_forward_hook(lambda _m, inp, out, name=name: keep(name, inp, out))
               for name, m in linears.items()]
    try:
        with torch.enable_grad():
            with torch.autocast(idx.device.type, dtype=torch.bfloat16, enabled=bf16):
                h = model.features(idx)
            # the head's gradient in closed form (GPT.sequence_loss_grad), then autograd from h down to
            # the chosen outputs: the gradient of sum_i loss_i at out_i is the gradient of loss_i alone
            dh = model.sequence_loss_grad(h.detach(), targets, dtype=torch.bfloat16 if bf16 else torch.float32,
                                          compiled=compile)
            outs = [captured[n][1] for n in linears]
            grads = torch.autograd.grad(h, outs, grad_outputs=dh)
    finally:
        for h in handles:
            h.remove()
    return {n: (captured[n][0].double(), g.detach().double()) for n, g in zip(linears, grads)}


def per_example_rows(A, B, rows):
    """Per-example gradients restricted to output units `rows` (a slice): (b, |rows| * d_in)."""
    return torch.einsum("bto,bti->boi", B[:, :, rows], A).flatten(1)


def token_gram(Ai, Bi, Aj, Bj):
    """<g_i, g_j> for every pair of a batch i and a batch j without forming g: the sum over token
    pairs of (A_i A_j^T) * (B_i B_j^T), cheaper than materialising g when T^2 (d_in + d_out) is
    small against d_in d_out."""
    return (torch.einsum("itd,jsd->ijts", Ai, Aj) * torch.einsum("ite,jse->ijts", Bi, Bj)).sum((2, 3))


def gram_method(n, T, d_in, d_out, method="auto"):
    """'token_gram' or 'materialise' by a FLOP estimate: pairs x T^2 (d_in + d_out) against
    n T d_in d_out to build G plus pairs x d_in d_out for K."""
    if method != "auto":
        return method
    pairs = n * (n + 1) / 2
    return "token_gram" if pairs * T * T * (d_in + d_out) < n * T * d_in * d_out + pairs * d_in * d_out \
        else "materialise"


def gathered_ids(index, rank, world, device):
    """(most, ids): the largest share of samples a rank holds (dist.gather needs equal sizes, so
    every share is padded to it) and, on rank 0, the sample index of each row of the padded shares
    as they arrive there, -1 for padding (None on the other ranks)."""
    count = torch.tensor([len(index)], device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    most = max(int(c) for c in counts)
    ids = torch.full((most,), -1, dtype=torch.long, device=device)
    ids[:len(index)] = torch.tensor(index, dtype=torch.long, device=device)
    parts = [torch.empty_like(ids) for _ in range(world)] if rank == 0 else None
    dist.gather(ids, parts, dst=0)
    return most, torch.cat(parts) if rank == 0 else None


def gather_padded(rows, most, rank, world):
    """This rank's rows padded with zero rows to `most`, gathered to rank 0 straight into one
    (world * most, width) buffer there (dist.gather into views of it, no concatenation); None elsewhere."""
    part = rows if len(rows) == most else torch.cat([rows, rows.new_zeros(most - len(rows), rows.size(1))])
    buf = rows.new_empty(world * most, rows.size(1)) if rank == 0 else None
    dist.gather(part.contiguous(), list(buf.split(most)) if rank == 0 else None, dst=0)
    return buf


def in_sample_order(K, ids):
    """A Gram over gathered rows (ids: the sample index of each row, -1 for padding) as the Gram over
    samples 0..n-1: the padding's rows and columns dropped, the rest permuted. Forming K in arrival
    order and permuting it (n x n) costs less memory than reordering the rows themselves."""
    keep = (ids >= 0).nonzero().squeeze(1)
    position = keep[torch.argsort(ids[keep])]
    if torch.equal(position, torch.arange(len(K), device=K.device)):
        return K
    return K[position][:, position]


def gather_rows(rows, index, rank, world):
    """(rows, ids): every rank's rows on rank 0, in the order they arrive with the sample index of
    each (-1 for padding rows, which are zero); (None, None) on the other ranks, which hold just
    their own share. One process: the rows as they are. Callers form K and then in_sample_order."""
    if world == 1:
        return rows, torch.tensor(index, device=rows.device)
    most, ids = gathered_ids(index, rank, world, rows.device)
    return gather_padded(rows, most, rank, world), ids


def gathered_gram(rows, index, n, rank, world, chunk_elements=2 ** 26):
    """G G^T in fp64 and sample order on rank 0 (None elsewhere) for a G whose rows are spread over
    the processes: `rows` this rank's, of samples `index`. Under DDP the rows travel to rank 0 one
    column chunk at a time (gather_padded), so no process holds more of G than its own share and
    one chunk (rank 0: the chunk of every rank, and its fp64 copy); K is formed in the order the
    rows arrive, padding included (zero rows), and then put in sample order (in_sample_order)."""
    if world == 1:
        K, ids = gram_fp64(rows, chunk_elements), torch.tensor(index, device=rows.device)
    else:
        most, ids = gathered_ids(index, rank, world, rows.device)
        K = torch.zeros(world * most, world * most, dtype=torch.float64, device=rows.device) if rank == 0 else None
        step = max(1, chunk_elements // max(1, n))  # the columns gram_fp64 takes at a time
        for c in range(0, rows.size(1), step):  # every rank has the same width, so the same chunks
            block = gather_padded(rows[:, c:c + step], most, rank, world)
            if rank == 0:
                block = block.double()
                K.addmm_(block, block.T)
            del block
    return in_sample_order(K, ids) if rank == 0 else None


@torch.no_grad()
def gradient_grams(model, tokens, settings, names, rank=0, world=1):
    """{name: K} (n x n fp64, on rank 0; None elsewhere): the Gram of the per-example gradients of
    each named Linear over the first settings.grad_samples sequences of `tokens` (windows of seq_len
    + 1). Materialised G is built in column blocks of output units, as many per pass over the probe
    set as settings.max_gb allows, so the whole of G is held only when it fits. The passes run at
    settings.precision (PRECISIONS), the head's gradient compiled if settings.compile. The model is
    used in eval mode and restored; parameters, .grad and RNG are untouched."""
    if settings.precision not in PRECISIONS:
        settings.check(act=False)  # names the setting and its valid values
    seq_len, n_samples, batch_size = settings.seq_len, settings.grad_samples, settings.grad_batch_size
    linears_all = model.linears()
    linears = {n: linears_all[n] for n in names}
    windows = tokens[: n_samples * seq_len + 1].unfold(0, seq_len + 1, seq_len)[:n_samples]
    n = len(windows)
    if n < max(2, n_samples):
        raise ValueError(f"{len(tokens)} tokens hold {n} windows of {seq_len} + 1 tokens: per-example gradient "
                         f"spectra of n_samples={n_samples} need {n_samples * seq_len + 1} tokens and n_samples >= 2")
    batches = [list(range(b, min(b + batch_size, n))) for b in range(0, n, batch_size)]
    mine = [batches[b] for b in range(rank, len(batches), world)]
    share = max(sum(len(batch) for batch in batches[r::world]) for r in range(world))  # the most rows a rank holds
    passes = plan_passes({k: tuple(lin.weight.shape) for k, lin in linears.items()}, n, seq_len, settings.max_gb,
                         settings.method, share)
    was_training = model.training
    model.eval()
    try:
        with fp32_matmuls(tf32=settings.precision == "tf32"):  # 'fp32': A and B in full fp32, like the activations
            grams = run_passes(passes, model, linears, windows, mine, settings, rank, world)
    finally:
        model.train(was_training)
    return grams if rank == 0 else None


def held_entries(shape, n, seq_len, rows):
    """fp32 entries one job of a pass holds for n examples: a column block of G (n |rows| d_in), or,
    for a token-Gram matrix (rows None), its inputs A and output gradients B (n T (d_in + d_out);
    fp32 holds them exactly: they come from fp32 or bf16 passes)."""
    d_out, d_in = shape
    return n * seq_len * (d_in + d_out) if rows is None else n * (rows.stop - rows.start) * d_in


def plan_passes(shapes, n, seq_len, max_gb=8.0, method="auto", share=None):
    """How gradient_grams keeps what one process holds at once within max_gb of fp32 entries: a list
    of passes, each one sweep over the probe set, each a list of jobs (name, rows): a slice of output
    units of a materialised matrix (a column block of G), or None for a token-Gram matrix, whose A
    and B are held whole (held_entries). `shapes`: {name: (d_out, d_in)}. A process holds the rows
    of G of its `share` of the n examples (DDP: its probe batches; default all n), but rank 0 the
    token-Gram A and B of all n. A matrix the cost estimate gives to the token-Gram takes it only
    while the A and B fit beside the others'; under 'auto' one that does not is materialised
    instead, a forced 'token_gram' that does not is a ValueError."""
    share = n if share is None else share
    budget = max(1, int(max_gb * 2 ** 30 / 4))
    dense, token, held = [], [], 0
    for name, (d_out, d_in) in shapes.items():
        if gram_method(n, seq_len, d_in, d_out, method) == "token_gram":
            size = held_entries((d_out, d_in), n, seq_len, None)
            if held + size <= budget:
                token.append((name, None))
                held += size
                continue
            if method == "token_gram":
                need = (held + size) * 4 / 2 ** 30
                raise ValueError(f"method 'token_gram' (grad_spectra_method, --method): {name} needs the inputs and "
                                 f"output gradients of all {n} examples at once, {size * 4 / 2 ** 30:.3g} GB in fp32, "
                                 f"{need:.3g} GB with the token-Gram matrices before it, beyond max_gb={max_gb:g}: "
                                 f"raise grad_spectra_max_gb (--max_gb) to {need:.3g} or more, or use method 'auto' "
                                 "or 'materialise' (column blocks of G)")
        dense.append(name)
    # each pass filled to the budget with whole output rows, a matrix continuing in the next pass
    # where the last one is full: ceil(size of G / budget) passes when a row is small against the
    # budget (d48's five attn.c_proj under 8 GB: 4, where one fp64 block per matrix and pass took
    # 10), more when rows are wide; a single row wider than the budget still goes, alone
    passes, used = [], []
    for name in dense:
        d_out, d_in = shapes[name]
        start = 0
        while start < d_out:
            if not passes or used[-1] + share * d_in > budget:
                passes.append([])
                used.append(0)
            rows = max(1, min(d_out - start, (budget - used[-1]) // max(1, share * d_in)))
            passes[-1].append((name, slice(start, start + rows)))
            used[-1] += held_entries((d_out, d_in), share, seq_len, slice(start, start + rows))
            start += rows
    if token:  # the token-Gram matrices ride along with the emptiest pass if they fit there, else alone
        emptiest = min(range(len(passes)), key=used.__getitem__, default=None)
        if emptiest is not None and used[emptiest] + held <= budget:
            passes[emptiest] += token
        else:
            passes.append(token)
    return passes


def token_gram_matrix(A, B, block):
    """K of the token-Gram matrices from every example's A (n, T, d_in) and B (n, T, d_out), in fp64:
    the upper blocks of `block` x `block` examples at a time (K is symmetric)."""
    n = len(A)
    K = torch.zeros(n, n, dtype=torch.float64, device=A.device)
    for i in range(0, n, block):
        for j in range(i, n, block):
            part = token_gram(*(X[r:r + block].double() for X, r in ((A, i), (B, i), (A, j), (B, j))))
            K[i:i + block, j:j + block], K[j:j + block, i:i + block] = part, part.T
    return K


def gram_fp64(G, chunk_elements=2 ** 26):
    """G G^T in fp64 from an fp32 G, a column chunk (at most chunk_elements, 512 MB) upcast at a time."""
    n = len(G)
    K = torch.zeros(n, n, dtype=torch.float64, device=G.device)
    step = max(1, chunk_elements // max(1, n))
    for c in range(0, G.size(1), step):
        part = G[:, c:c + step].double()
        K.addmm_(part, part.T)
    return K


def run_passes(passes, model, linears, windows, mine, settings, rank, world):
    """The passes planned by plan_passes: {name: K} on rank 0. Each pass sweeps this rank's probe
    batches (`mine`, lists of indices into `windows`) once and writes, batch by batch and in place,
    what each job holds (held_entries): G is held once, not as per-batch pieces plus their
    concatenation."""
    grams = {}
    n, seq_len, device = len(windows), settings.seq_len, next(model.parameters()).device
    n_mine = sum(len(batch) for batch in mine)
    for jobs in passes:
        shapes = [tuple(linears[name].weight.shape) for name, _ in jobs]
        held = [torch.empty(n_mine, held_entries(shape, 1, seq_len, rows), dtype=torch.float32, device=device)
                for shape, (_, rows) in zip(shapes, jobs)]
        index = []
        for batch in mine:
            w = windows[batch].to(device)
            ab = per_example_outputs(model, {name: linears[name] for name, _ in jobs}, w[:, :-1], w[:, 1:],
                                     settings.precision, settings.compile)
            at = slice(len(index), len(index) + len(batch))
            for j, (name, rows) in enumerate(jobs):
                A, B = ab[name]
                if rows is None:  # token-Gram: A and B side by side in one row per example
                    held[j][at, :A[0].numel()] = A.flatten(1)
                    held[j][at, A[0].numel():] = B.flatten(1)
                else:
                    held[j][at] = per_example_rows(A, B, rows)
            index += batch
        for j, ((name, rows), (d_out, d_in)) in enumerate(zip(jobs, shapes)):
            if rows is not None:  # a column block of G: its share of K, the rows gathered chunk by chunk
                K = gathered_gram(held[j], index, n, rank, world)
                if rank == 0:
                    grams[name] = grams.get(name, 0) + K
            else:  # the token-Gram needs every example's A and B on rank 0
                full, ids = gather_rows(held[j], index, rank, world)
                if rank == 0:
                    A = full[:, :seq_len * d_in].unflatten(1, (seq_len, d_in))
                    B = full[:, seq_len * d_in:].unflatten(1, (seq_len, d_out))
                    grams[name] = in_sample_order(token_gram_matrix(A, B, settings.grad_batch_size), ids)
                del full
            held[j] = None
    return grams


def gram_spectrum(K):
    """Singular values of G from K = G G^T: sqrt of its eigenvalues (fp64), descending; NaN if K is not finite."""
    if not torch.isfinite(K).all():
        return np.full(len(K), np.nan)
    try:
        return np.sqrt(np.clip(torch.linalg.eigvalsh(K).flip(0).cpu().numpy(), 0.0, None))
    except torch.linalg.LinAlgError:  # did not converge: NaN metrics rather than a stopped run
        return np.full(len(K), np.nan)


def noise_scale(K):
    """Gradient noise scale B_simple = tr(Sigma) / |mean g|^2 from the Gram alone: |mean g|^2 =
    sum(K) / n^2 and tr(Sigma) = (tr K - n |mean g|^2) / (n - 1), the unbiased per-example covariance.
    |mean g|^2 over n examples overestimates the squared true gradient by tr(Sigma) / n, so the
    value is biased low when it approaches n (McCandlish et al. correct with two batch sizes)."""
    n = len(K)
    if n < 2:
        return math.nan
    mean_sq = K.sum().item() / n ** 2
    trace = (torch.trace(K).item() - n * mean_sq) / (n - 1)
    return trace / mean_sq if mean_sq > 0 else math.nan


def measure_gradients(model, tokens, settings, names, rank=0, world=1):
    """Gradient spectra on rank 0 as {name: {values (singular values), values_half0, values_half1, n,
    ..., width, limit..., noise_scale}} in the form summarise() takes; None on other ranks. The halves
    are the even and odd samples: sub-Grams of the same K, no extra pass."""
    grams = gradient_grams(model, tokens, settings, names, rank, world)
    if grams is None:
        return None
    out, linears = {}, model.linears()
    for name, K in grams.items():
        n, P = len(K), linears[name].weight.numel()
        out[name] = dict(values=gram_spectrum(K), values_half0=gram_spectrum(K[0::2, 0::2]),
                         values_half1=gram_spectrum(K[1::2, 1::2]), n=n, n_half0=(n + 1) // 2, n_half1=n // 2,
                         width=P, limit=min(n, P), limit_half0=min((n + 1) // 2, P), limit_half1=min(n // 2, P),
                         noise_scale=noise_scale(K))
    return out



# ----------------------------------------------------------------------------------------------
# 7. Weight spectra (no data)


# WeightWatcher's fit (weightwatcher 0.7, analyze() defaults: its own WWFit, not the powerlaw package)
WW_FLOOR = 1e-5        # eigenvalues at or below this (absolute) are dropped before the fit
WW_SMALL_N = 20        # fewer eigenvalues: tails of at least WW_MIN_TAIL values, exponent 1 + (m - 1) / sum log
WW_MIN_TAIL = 8


def density_exponent(values, rule="weightwatcher"):
    """Power-law fit of the eigenvalue density p(lambda) ~ lambda^-a of the eigenvalues lambda = sigma^2
    (not normalised): for each candidate x_min, every sorted value but the largest, the maximum-
    likelihood exponent a = 1 + m / sum log(lambda / x_min) over the m values >= x_min, keeping the
    candidate whose fit has the smallest Kolmogorov-Smirnov distance D (Clauset, Shalizi & Newman;
    the first, smallest x_min on a tie). Returns (a, x_min, D); NaNs when nothing can be fitted.

    rule="weightwatcher" (default) gives WeightWatcher's alpha: D = max_j |F(x_j) - j / m| compares
    the model CDF with the empirical one just below each of the m sorted tail values (one side of
    each step), eigenvalues <= WW_FLOOR are dropped, and below WW_SMALL_N eigenvalues only tails of
    at least WW_MIN_TAIL values count, with the bias-corrected exponent 1 + (m - 1) / sum log.
    rule="exact": D is the exact supremum over both sides of every step, all positive eigenvalues
    count. The two pick different x_min on heavy-tailed spectra (exponents up to ~1.4 apart on
    Student-t matrices).
    For a rank-ordered decay lambda_i ~ i^-r the density exponent is a = 1 + 1/r. The weight rank
    fits (weight/alpha_*) are of the singular values sigma_i ~ i^-alpha, so r = 2 alpha and
    alpha_density = 1 + 1/(2 alpha)."""
    ww = rule == "weightwatcher"
    lam = np.sort(np.asarray(values, dtype=np.float64))
    lam = lam[lam > (WW_FLOOR if ww else 0.0)]
    small = ww and len(lam) < WW_SMALL_N
    best = (math.nan, math.nan, math.inf)
    for k in range(len(lam) - 1):  # candidate x_min = lam[k]
        tail = lam[k:]
        m = len(tail)
        if small and m < WW_MIN_TAIL:
            break
        logs = np.log(tail / tail[0]).sum()
        if logs <= (1e-12 if small else 0.0):  # a flat tail has no exponent
            continue
        a = 1 + (m - 1 if small else m) / logs
        model_cdf = 1 - (tail / tail[0]) ** (1 - a)
        below = np.arange(m) / m  # the empirical CDF just below each tail value (just above: + 1/m)
        ks = np.max(np.abs(model_cdf - below))
        if not ww:
            ks = max(ks, np.max(np.abs(model_cdf - below - 1 / m)))
        if ks < best[2]:
            best = (float(a), float(tail[0]), float(ks))
    return best if math.isfinite(best[2]) else (math.nan, math.nan, math.nan)


def measure_weights(model, names, settings=DEFAULTS):
    """{name: {values (singular values, fp64, descending), n, width, limit, density: (a, x_min, ks)}}."""
    out, linears = {}, model.linears()
    for name in names:
        W = linears[name].weight.detach().double()
        sv = torch.linalg.svdvals(W).cpu().numpy()
        out[name] = dict(values=sv, n=len(sv), width=len(sv), limit=len(sv),
                         density=density_exponent(sv ** 2, settings.density_rule))
    return out


# ----------------------------------------------------------------------------------------------
# 8. Summaries: the scalars of measured spectra, notes, the console table


def summarise(measured, family, settings, prev=None, first=None, where=""):
    """({'<family>/<stat>/<point>': value}, [notes]) for one family of measured spectra: the fits and
    effective ranks of every spectrum (STATS), and grad/noise_scale, weight/alpha_density,
    density_xmin and density_ks where measured. prev / first are {point: values} of the previous
    evaluation and of each point's first evaluation with a spectrum (for js_prev / js_first; a point
    without a first is at its first, and js_first is 0). A point with non-finite values gets NaN
    metrics and a note naming it and `where`."""
    metrics, notes, clipped = {}, [], {}
    head, tail = settings.head, settings.tail
    for p, s in measured.items():
        limit = s["limit"]
        if not np.isfinite(s["values"]).all():
            notes.append(f"{family} spectrum of {p} {where}: non-finite values; its metrics are NaN")
            values = dict.fromkeys(STATS, math.nan)
        else:
            if s.get("rank_deficient"):  # a covariance from fewer tokens than its width
                notes.append(f"{family} spectrum of {p}: {s['n']} probe tokens for width {s['width']}: the "
                             f"spectrum is rank-deficient, fits are limited to ranks <= {limit}")
            halves = (s["values_half0"], s["values_half1"]) if "values_half0" in s else None
            half_limits = (s.get("limit_half0"), s.get("limit_half1"))
            values = spectrum_metrics(s["values"], limit, head, tail, halves, half_limits,
                                      (prev or {}).get(p), (first or {}).get(p, s["values"]),
                                      singular=family in SINGULAR_FAMILIES)
            rank = values["valid_rank"]  # 0: an all-zero spectrum, said by format_table
            for name, (a, b) in (("head", head), ("tail", tail)):
                if 0 < rank < b:
                    clipped.setdefault((name, a, b, rank), []).append(p)
        metrics.update({f"{family}/{k}/{p}": v for k, v in values.items()})
    for (name, a, b, rank), points in clipped.items():  # one line for all the points a window is clipped at
        which = f"every {family} spectrum" if len(points) == len(measured) > 1 else \
            f"{family} spectra of {', '.join(points)}" if len(points) > 1 else f"{family} spectrum of {points[0]}"
        notes.append(f"{which}: {name} window [{a}, {b}] clipped to the {rank} valid ranks")
    for p, s in measured.items():  # after every fit, as the keys have always been ordered
        if "noise_scale" in s:
            metrics[f"{family}/noise_scale/{p}"] = s["noise_scale"]
        if "density" in s:  # the exponent of the density of sigma^2, distinct from the rank exponents of sigma
            a, x_min, ks = s["density"]
            metrics.update({f"{family}/alpha_density/{p}": a, f"{family}/density_xmin/{p}": x_min,
                            f"{family}/density_ks/{p}": ks})
    return metrics, notes


# A log-log fit with R^2 below this is not read as a power law: its alpha is the slope of a line
# through something bent, e.g. a weight tail fitted across the rank cliff at the width (R^2 0.55).
# Clean power laws of sampled covariances stay above 0.97 over 10 or more ranks (sampling noise
# bends only the last few), so 0.9 flags a bend, not noise. The table marks such alphas with '?',
# the figures draw their lines dashed.
LOW_R2 = 0.9


def alpha_cell(alpha, r2):
    """alpha under its 10-character header, then '?' when the fit's R^2 < LOW_R2 (else a space)."""
    return f"{alpha:10.3f}{'?' if r2 < LOW_R2 else ' '}"


def format_table(metrics, family, names):
    """A compact console table, one row per point or matrix; an alpha whose fit has R^2 < LOW_R2
    is marked '?' (said once, at the end of the header). Spectra that are all zero (every gradient
    of a zero-initialised head at step 0, say) have no fits: one line names them instead of rows
    of NaN."""
    def get(stat, p):
        v = metrics.get(f"{family}/{stat}/{p}", math.nan)
        return math.nan if v is None else v
    zero = [p for p in names if get("valid_rank", p) == 0]
    rows = [p for p in names if p not in zero]
    lines = []
    if rows:
        width = max(len(p) for p in rows)
        poor = any(get(f"r2_{w}", p) < LOW_R2 for p in rows for w in ("head", "tail"))
        lines.append(f"  {'point':<{width}}  alpha_head  alpha_tail (+-noise)   R2_head  R2_tail  rankme"
                     + (f"   (? R2 < {LOW_R2:g}: not a power law)" if poor else ""))
        for p in rows:
            lines.append(f"  {p:<{width}}  {alpha_cell(get('alpha_head', p), get('r2_head', p))} "
                         f"{alpha_cell(get('alpha_tail', p), get('r2_tail', p))}"
                         f"(+-{get('alpha_tail_noise', p):.3f})  {get('r2_head', p):8.3f} {get('r2_tail', p):8.3f} "
                         f"{get('rankme', p):7.1f}")
    if zero:
        which = "every spectrum" if not rows else ", ".join(zero)
        why = {"weight": "zero-initialised weights, e.g. the modded preset's output projections before their "
                         "first update",
               "grad": "every per-example gradient is zero: a zero-initialised head or projection above, e.g. "
                       "the modded preset at step 0"}.get(family, "zero activations")
        lines.append(f"  {which}: all zero, no fits ({why})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# 9. Files (npz spectra) and the history later evaluations compare against


def spectra_path(run_dir, family, tokens):
    return os.path.join(run_dir, "spectra", f"{family}_{tokens:012d}.npz")


def save_spectra(path, measured, meta):
    """One npz: per point its eigen- or singular values (`<point>`), those of the halves
    (`<point>@half0/1`), `<point>@n` = [n, n_half0, n_half1, width, largest meaningful rank], plus
    `meta.<key>` entries (tokens, step, windows, ...). Written atomically."""
    arrays = {f"meta.{k}": np.asarray(v) for k, v in meta.items()}
    for p, s in measured.items():
        arrays[p] = s["values"]
        if "values_half0" in s:
            arrays[f"{p}@half0"], arrays[f"{p}@half1"] = s["values_half0"], s["values_half1"]
        arrays[f"{p}@n"] = np.asarray([s["n"], s.get("n_half0", 0), s.get("n_half1", 0), s["width"], s["limit"]])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_spectra(path):
    """({point: values}, {meta key: value}, {point: largest meaningful rank}) of a file written by
    save_spectra; the rank limit is min(width, n - 1) of the sample behind the spectrum."""
    with np.load(path) as z:
        meta = {k[5:]: z[k].item() if z[k].ndim == 0 else z[k].tolist() for k in z.files if k.startswith("meta.")}
        values = {k: z[k] for k in z.files if not k.startswith("meta.") and "@" not in k}
        limits = {k: int(z[f"{k}@n"][4]) for k in values if f"{k}@n" in z.files}
    return values, meta, limits


def spectra_files(run_dir, family):
    """[(tokens, path)] of a run's saved spectra, by tokens."""
    files = glob.glob(os.path.join(run_dir, "spectra", f"{family}_*.npz"))
    return sorted((int(os.path.basename(f)[len(family) + 1:-4]), f) for f in files)


SAME_PROBE = ("probe_tokens", "seq_len", "act_norm", "precision")  # meta that must agree for spectra to be compared


def same_probe(family, a, b):
    """Were two spectra of a family measured on the same probe set (SAME_PROBE of their meta; a key
    saved spectra lack had its default)? Weights read no data: always."""
    def get(meta, key):
        return meta.get(key, asdict(DEFAULTS).get(key))
    return family == "weight" or all(get(a, k) == get(b, k) for k in SAME_PROBE)


class SpectraHistory:
    """What the report of an evaluation needs from the earlier ones, held in memory so that every
    evaluation does the same file work however many came before: per family, the spectra of the
    latest evaluation and each point's first non-zero spectrum on this run's probe set (references
    for js_prev and js_first), and every point's alpha_head and alpha_tail against tokens (the
    alpha-against-tokens plot). `load` reads a run's saved spectra once (on resume, or for a
    checkpoint measured into a folder that holds earlier measurements)."""

    def __init__(self, settings):
        self.settings = settings
        self.prev = {f: {} for f in FAMILIES}
        self.first = {f: {} for f in FAMILIES}
        self.series = {f: {} for f in FAMILIES}  # {point: {tokens: (alpha_head, alpha_tail)}}

    def references(self, family):
        """(prev, first) as {point: values}."""
        return self.prev[family], self.first[family]

    def add(self, family, tokens, values, limits, meta, alphas=None, reference=True):
        """Record one evaluation: {point: values} with their rank limits and meta; alphas =
        {point: (alpha_head, alpha_tail)} as reported, or None to fit them here with the settings'
        windows. Spectra on this run's probe set become the references (unless reference=False: a
        later evaluation than the one being reported); all enter the series."""
        for p, v in values.items():
            if alphas is not None:
                ah, at = alphas[p]
            else:
                rank = numerical_rank(v, limits.get(p, len(v)))
                ah, at = (fit_power_law(v, w, rank)["alpha"] for w in (self.settings.head, self.settings.tail))
            self.series[family].setdefault(p, {})[tokens] = (ah, at)
        if reference and same_probe(family, meta, self.settings.meta(family)):
            for p, v in values.items():
                if p not in self.first[family] and numerical_rank(v, len(v)) > 0:
                    self.first[family][p] = v
            self.prev[family] = dict(values)

    @classmethod
    def load(cls, run_dir, settings, tokens):
        """The history of the spectra saved in run_dir for an evaluation at `tokens`: those saved at
        fewer tokens are its references; later ones (a folder of measured checkpoints) join the
        series only; one at `tokens` is about to be replaced."""
        history = cls(settings)
        for family in FAMILIES:
            for saved, path in spectra_files(run_dir, family):
                if saved != tokens:
                    values, meta, limits = load_spectra(path)
                    history.add(family, saved, values, limits, meta, reference=saved < tokens)
        return history


if __name__ == "__main__":  # the command lines that lived here moved to modules above the measurement
    raise SystemExit("spectra.py is the measurement library; measure a checkpoint with python measure.py act|grad "
                     "--ckpt CKPT [...], run the conditions study with python conditions.py --model ... --data ...")
