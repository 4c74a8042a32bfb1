"""
Banded modular-arithmetic sequences: a toy language whose features are known.

Each sequence is a walk on a cyclic group written into a band of the vocabulary:
t_k = o + ((a + d k) mod c) for k = 0 .. seq_len - 1, with a modulus c drawn from a Zipf law over
[c_min, c_max], an offset o (Zipf over [0, vocab_size - c], so the band fits), a step d and a start
a. To predict the next token a model must find c, d and the state (a + d k) mod c in context; the
features that do it are Fourier modes of Z_c, which is what makes the spectra checkable here.
Options (the Spectral Lens toy's): several components mixed with Pareto weights (the token is the
rounded weighted mean), heavy-tailed token noise (Student t), steps that share a factor with c.

Written to --out (deterministic in --seed; each split from its own stream):
    modarith_{train,val,test}_000000.bin   token shards (data/shards.py), seq_len tokens per sequence
    modarith_{train,val,test}_latents.npz  per sequence: c, o, d, a, weights (n x components), count
    modarith_band_000000.bin, _latents.npz the probe band: one component, no noise, c = --band_modulus
    modarith.json                          the options

    python data/modarith.py [--out data/modarith] [--vocab_size 1024] [--seq_len 64] [--seed 0] ...

Train with the same seq_len (configs/toy_modarith.py), so that every window is one sequence.
"""

import argparse
import dataclasses
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.shards import atomic_write, read_header, write_shard  # noqa: E402

SPLITS = ("train", "val", "test", "band")


@dataclasses.dataclass
class ToyOptions:
    vocab_size: int = 1024
    seq_len: int = 64
    c_min: int = 5              # smallest modulus
    c_max: int = 0              # largest modulus (0: vocab_size)
    zipf_c: float = 1.3         # P(c) ~ c^-zipf_c
    zipf_o: float = 1.2         # P(o) ~ (o + 1)^-zipf_o
    min_step_frac: float = 0.125  # d >= max(1, min_step_frac * c): no slow crawls through the band
    noncoprime_prob: float = 0.3  # share of steps that share a factor with c (they visit c / gcd states)
    components: tuple = (1, 1)  # a sequence mixes between this many components (min, max)
    pareto_alpha: float = 0.0   # component weights 1 + Pareto(alpha); 0: equal weights
    noise_std: float = 0.0      # token noise (before rounding), in tokens
    noise_df: float = 0.0       # Student-t degrees of freedom of the noise (> 2; 0: Gaussian)
    band_modulus: int = 17      # the probe band's fixed c
    train_sequences: int = 65536  # 4.2M tokens: more than configs/toy_modarith.py trains on
    val_sequences: int = 2048
    test_sequences: int = 2048
    band_sequences: int = 512
    seed: int = 0


class ToyError(ValueError):
    pass


def check_options(opt):
    """Every option error, naming the option and a valid value, before anything is written."""
    c_max = opt.c_max or opt.vocab_size
    if not 2 <= opt.vocab_size <= 2 ** 16:
        raise ToyError(f"--vocab_size={opt.vocab_size}: tokens are stored as uint16; use 2..65536 (e.g. 1024)")
    if opt.c_min < 2:
        raise ToyError(f"--c_min={opt.c_min}: a modulus below 2 has a single state; use --c_min >= 2 (e.g. 5)")
    if c_max > opt.vocab_size:
        raise ToyError(f"--c_max={c_max}: a band of c tokens needs vocab_size >= c, and --vocab_size="
                       f"{opt.vocab_size}; raise --vocab_size to {c_max} or lower --c_max")
    if opt.c_min > c_max:
        raise ToyError(f"the modulus range [--c_min={opt.c_min}, --c_max={c_max}] is empty"
                       + (f" (vocab_size={opt.vocab_size} is too small for c_min)" if not opt.c_max else "")
                       + f"; use --c_min <= {c_max}")
    if not opt.c_min <= opt.band_modulus <= c_max:
        raise ToyError(f"--band_modulus={opt.band_modulus} is outside [c_min, c_max] = [{opt.c_min}, {c_max}]; "
                       f"use e.g. --band_modulus={max(opt.c_min, min(17, c_max))}")
    lo, hi = opt.components
    if not 1 <= lo <= hi:
        raise ToyError(f"--components={lo},{hi}: give MIN,MAX with 1 <= MIN <= MAX (e.g. 1,1 or 1,3)")
    if not 0 <= opt.min_step_frac < 1 or not 0 <= opt.noncoprime_prob <= 1:
        raise ToyError("--min_step_frac must lie in [0, 1) and --noncoprime_prob in [0, 1]")
    if opt.noise_std < 0 or (opt.noise_df and opt.noise_df <= 2):
        raise ToyError(f"--noise_std={opt.noise_std} / --noise_df={opt.noise_df}: noise_std >= 0, and noise_df > 2 "
                       "(finite variance) or 0 for Gaussian noise")
    if opt.seq_len < 2 or min(opt.train_sequences, opt.val_sequences, opt.band_sequences) < 1:
        raise ToyError("--seq_len must be >= 2, and the train, val and band splits need >= 1 sequence each")


def zipf_choice(rng, values, exponent, shift, size):
    """Draws from values with P(v) ~ (v + shift)^-exponent."""
    p = (values + shift).astype(np.float64) ** -exponent
    return rng.choice(values, size=size, p=p / p.sum())


def draw_steps(rng, c, min_step_frac, noncoprime_prob):
    """A step d in [max(1, min_step_frac c), c) per modulus: coprime to c (the walk visits all c
    states; c - 1 always is), except with probability noncoprime_prob one that shares a factor
    with c (the walk visits c / gcd states), where c has such a step in the range."""
    d = np.zeros_like(c)
    want_shared = rng.random(len(c)) < noncoprime_prob
    for ci in np.unique(c):
        sel = np.flatnonzero(c == ci)
        steps = np.arange(min(max(1, int(min_step_frac * ci)), ci - 1), ci)
        shares = np.gcd(steps, ci) > 1
        coprime, shared = steps[~shares], steps[shares]
        d[sel] = rng.choice(coprime, size=len(sel))
        if len(shared):
            pick = sel[want_shared[sel]]
            d[pick] = rng.choice(shared, size=len(pick))
    return d


def draw_latents(rng, n, opt):
    """Per sequence and component: c, o, d, a and the weight; count = components used (n,)."""
    c_max = opt.c_max or opt.vocab_size
    lo, hi = opt.components
    count = rng.integers(lo, hi + 1, size=n)
    shape = (n, hi)
    c = zipf_choice(rng, np.arange(opt.c_min, c_max + 1), opt.zipf_c, 0, shape)
    o = np.zeros(shape, dtype=np.int64)
    for ci in np.unique(c):  # offsets so that the band [o, o + c) fits the vocabulary
        sel = c == ci
        o[sel] = zipf_choice(rng, np.arange(opt.vocab_size - ci + 1), opt.zipf_o, 1, int(sel.sum()))
    d = draw_steps(rng, c.ravel(), opt.min_step_frac, opt.noncoprime_prob).reshape(shape)
    a = rng.integers(0, c)
    w = 1.0 + rng.pareto(opt.pareto_alpha, size=shape) if opt.pareto_alpha > 0 else np.ones(shape)
    unused = np.arange(hi)[None, :] >= count[:, None]
    c, o, d, a = (np.where(unused, -1, x) for x in (c, o, d, a))
    return dict(c=c, o=o, d=d, a=a, weights=np.where(unused, 0.0, w), count=count)


def tokens_from_latents(lat, seq_len, vocab_size, noise=None):
    """(n, seq_len) tokens: the weighted mean over components of o + ((a + d k) mod c), plus noise,
    rounded and clipped to the vocabulary."""
    k = np.arange(seq_len)
    c = np.maximum(lat["c"], 1)[:, :, None]  # unused components (c = -1) carry weight 0
    t = lat["o"][:, :, None] + (lat["a"][:, :, None] + lat["d"][:, :, None] * k) % c
    w = lat["weights"][:, :, None]
    mean = (w * t).sum(1) / w.sum(1)
    if noise is not None:
        mean = mean + noise
    return np.clip(np.rint(mean), 0, vocab_size - 1).astype(np.int64)


def draw_noise(rng, n, opt):
    if opt.noise_std <= 0:
        return None
    if opt.noise_df:  # Student t scaled to unit variance
        z = rng.standard_t(opt.noise_df, size=(n, opt.seq_len)) * math.sqrt((opt.noise_df - 2) / opt.noise_df)
    else:
        z = rng.standard_normal((n, opt.seq_len))
    return opt.noise_std * z


def generate_split(opt, split):
    """(tokens (n, seq_len), latents dict) of one split; the band is one clean component at c =
    band_modulus. Each split has its own random stream, so sizes of one do not change another."""
    rng = np.random.default_rng([opt.seed, SPLITS.index(split)])
    if split == "band":
        band = dataclasses.replace(opt, c_min=opt.band_modulus, c_max=opt.band_modulus, components=(1, 1),
                                   pareto_alpha=0.0, noise_std=0.0)
        lat = draw_latents(rng, opt.band_sequences, band)
        return tokens_from_latents(lat, opt.seq_len, opt.vocab_size), lat
    n = getattr(opt, f"{split}_sequences")
    lat = draw_latents(rng, n, opt)
    noise = draw_noise(rng, n, opt)
    if noise is not None:
        lat["noise"] = noise.astype(np.float32)
    return tokens_from_latents(lat, opt.seq_len, opt.vocab_size, noise), lat


def shard_path(out, split):
    return os.path.join(out, f"modarith_{split}_000000.bin")


def latents_path(shard):
    """The latents file beside a modarith shard (modarith_val_000000.bin -> modarith_val_latents.npz)."""
    folder, name = os.path.split(shard)
    return os.path.join(folder, name.rsplit("_", 1)[0] + "_latents.npz")


def write_dataset(opt, out):
    check_options(opt)
    os.makedirs(out, exist_ok=True)
    written = []
    for split in SPLITS:
        if getattr(opt, f"{split}_sequences") < 1:
            continue
        tokens, lat = generate_split(opt, split)
        path = shard_path(out, split)
        write_shard(path, tokens.ravel())
        atomic_write(latents_path(path), lambda f: np.savez(f, seq_len=opt.seq_len, **lat))
        written.append(path)
    meta = dict(dataclasses.asdict(opt), c_max=opt.c_max or opt.vocab_size)
    atomic_write(os.path.join(out, "modarith.json"), lambda f: f.write(json.dumps(meta, indent=1).encode()))
    return written


def load_latents(shard):
    """The latents of a modarith shard as a dict of arrays; a clear error when there are none."""
    path = latents_path(shard)
    if not os.path.exists(path):
        raise ToyError(f"{shard} has no latents ({os.path.basename(path)} is missing): feature probes need the "
                       "toy task's data; make it with python data/modarith.py")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "modarith"))
    for f in dataclasses.fields(ToyOptions):
        if f.name == "components":
            p.add_argument("--components", default="1,1", help="MIN,MAX components mixed per sequence")
        else:
            p.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    args = p.parse_args(argv)
    try:
        lo, hi = (int(x) for x in args.components.split(","))
    except ValueError:
        p.error(f"--components={args.components!r}: give MIN,MAX, e.g. 1,3")
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(ToyOptions) if f.name != "components"}
    return args.out, ToyOptions(components=(lo, hi), **fields)


def main(argv=None):
    out, opt = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        written = write_dataset(opt, out)
    except ToyError as e:
        sys.exit(f"error: {e}")
    for path in written:
        print(f"wrote {path} ({read_header(path):,} tokens)")


if __name__ == "__main__":
    main()
