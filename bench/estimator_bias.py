"""
How far the fitted alpha is from the true one when the covariance is estimated from n samples of
width d, and the probe size that keeps the bias under 0.02.

1. Gaussian samples of known power-law covariances, lambda_i = i^-alpha, at the widths of the
   profiles (d12-d48) and of the toy: the mean-centred sample covariance, its eigenvalues and the
   head and tail fits exactly as the trainer makes them (spectra.fit_power_law, the default
   windows), at n/d = 1, 2, 4, ... Bias = fitted - true alpha (the sample eigenvalues of a short
   sample spread out: the tail flattens, the head steepens).
2. Real activations (--ckpt): a trained checkpoint's probe points measured as the trainer does on
   the first k val sequences, k doubling up to the whole val split, against the value on all of
   them. Tokens of one sequence are correlated, so k sequences are worth fewer than k x seq_len
   independent samples: the ratio of the tokens needed here to the samples needed in (1) is that
   loss, the factor spectra.PROBE_TOKEN_FACTOR carries.

It prints, per width, the smallest n/d with |bias| < 0.02 at every alpha (head and tail), the
probe tokens that means with the token factor, and whether the default spectra_tokens reaches it.

    python bench/estimator_bias.py [--widths 128,768,1024,1280,1600] [--alphas 0.6,0.8,1.0]
                                   [--max_ratio 128] [--ckpt runs/toy/ckpt/step_*.pt] [--seed 0]
"""

import argparse
import math
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import spectra  # noqa: E402
from data.shards import find_shards, load_prefix  # noqa: E402
from rundir import Checkpoint, load_model  # noqa: E402

BOUND = 0.02
WINDOWS = dict(head=spectra.DEFAULTS.head, tail=spectra.DEFAULTS.tail)


def fitted(values, rank):
    return {w: spectra.fit_power_law(values, window, rank)["alpha"] for w, window in WINDOWS.items()}


def gaussian_bias(width, alphas, ratios, seed, chunk=4096):
    """{(ratio, alpha): {head, tail}: fitted - true}: one Gaussian sample grown chunk by chunk; its
    Gram matrix Z^T Z serves every alpha (the sample of covariance L is Z L^(1/2), L diagonal)."""
    g = torch.Generator().manual_seed(seed)
    gram = torch.zeros(width, width, dtype=torch.float64)
    total = torch.zeros(width, dtype=torch.float64)
    n, out = 0, {}
    for ratio in ratios:
        while n < ratio * width:
            z = torch.randn(min(chunk, ratio * width - n), width, generator=g, dtype=torch.float64)
            gram += z.T @ z
            total += z.sum(0)
            n += len(z)
        centred = (gram - torch.outer(total, total) / n) / (n - 1)
        for alpha in alphas:
            scale = torch.arange(1, width + 1, dtype=torch.float64) ** (-alpha / 2)
            values = torch.linalg.eigvalsh(scale[:, None] * centred * scale[None, :]).flip(0).numpy()
            fit = fitted(values, min(width, n - 1))
            out[ratio, alpha] = {w: fit[w] - alpha for w in WINDOWS}
    return out


def needed_ratio(bias, ratios, alphas, window):
    """The smallest n/d from which every larger one keeps |bias| < BOUND at every alpha (None: none)."""
    ok = [all(abs(bias[r, a][window]) < BOUND for a in alphas) for r in ratios]
    for i, r in enumerate(ratios):
        if all(ok[i:]):
            return r
    return None


def real_drift(ckpt_path, seed):
    """[(tokens, {point: {head, tail}})] on the first k val sequences, k doubling, and the width."""
    ckpt = Checkpoint.load(ckpt_path, mmap=True)
    model = load_model(ckpt_path)
    settings = spectra.SpectraSettings.from_config({"seq_len": model.cfg.seq_len, **ckpt.config})
    T = settings.seq_len
    files = find_shards(ckpt.config["val_files"])
    n_tokens = sum((os.path.getsize(f) - 1024) // 2 for f in files) - 1
    tokens = torch.from_numpy(load_prefix(files, n_tokens // T * T, model.cfg.vocab_size))
    points = settings.point_names(model.cfg.n_layer)
    rows, k = [], 2
    while True:
        k = min(k, len(tokens) // T)
        stats = spectra.activation_stats(model, tokens[:k * T], settings, points)
        fits = {}
        for p, (h0, h1) in stats.items():
            values = spectra.eigenvalues(spectra.merge_stats(h0, h1))
            fits[p] = fitted(values, min(len(values), k * T - 1))
        rows.append((k * T, fits))
        if k * T >= len(tokens) - T:
            return rows, model.cfg.n_embd, points
        k *= 2


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", default="128,768,1024,1280,1600")
    p.add_argument("--alphas", default="0.6,0.8,1.0")
    p.add_argument("--max_ratio", type=int, default=128)
    p.add_argument("--ckpt", default="", help="a trained checkpoint for part 2 (its val_files must exist)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    alphas = [float(a) for a in args.alphas.split(",")]
    ratios = [2 ** i for i in range(int(math.log2(args.max_ratio)) + 1)]

    print(f"1. Gaussian samples, lambda_i = i^-alpha: fitted - true alpha (head {WINDOWS['head']}, tail "
          f"{WINDOWS['tail']})")
    print(f"{'width':>6} {'n/d':>5} " + " ".join(f"{'a=' + str(a) + ' head':>11} {'tail':>7}" for a in alphas))
    needed = {}
    for d in widths:
        bias = gaussian_bias(d, alphas, ratios, args.seed)
        for r in ratios:
            print(f"{d:6d} {r:5d} " + " ".join(f"{bias[r, a]['head']:+11.3f} {bias[r, a]['tail']:+7.3f}"
                                               for a in alphas))
        needed[d] = {w: needed_ratio(bias, ratios, alphas, w) for w in WINDOWS}

    factor = spectra.PROBE_TOKEN_FACTOR
    if args.ckpt:
        rows, width, points = real_drift(args.ckpt, args.seed)
        full = rows[-1][1]
        print(f"\n2. real activations of {args.ckpt} (width {width}): alpha on the first n tokens minus alpha on all "
              f"{rows[-1][0]:,}")
        print(f"{'tokens':>8} {'n/d':>7} " + " ".join(f"{p + ' head':>20} {'tail':>6}" for p in points))
        for n, fits in rows[:-1]:
            print(f"{n:8d} {n / width:7.1f} " + " ".join(
                f"{fits[p]['head'] - full[p]['head']:+20.3f} {fits[p]['tail'] - full[p]['tail']:+6.3f}"
                for p in points))
        gauss = needed.get(width) or {w: needed_ratio(gaussian_bias(width, alphas, ratios, args.seed), ratios, alphas,
                                                      w) for w in WINDOWS}
        for w in WINDOWS:
            real = next((n for i, (n, _) in enumerate(rows[:-1]) if all(
                abs(f[p][w] - full[p][w]) < BOUND for _, f in rows[i:-1] for p in points)), None)
            if real and gauss[w]:
                print(f"{w}: the drift stays under {BOUND} from {real:,} tokens (n/d = {real / width:.1f}); "
                      f"Gaussian samples need n/d = {gauss[w]}: {real / (gauss[w] * width):.2f} tokens per "
                      f"independent sample (spectra.PROBE_TOKEN_FACTOR = {factor})")
            else:
                print(f"{w}: the drift does not settle under {BOUND} within this val split")

    print(f"\nprobe tokens for |bias| < {BOUND} at every alpha in {alphas}: n/d x width x {factor} (tokens per "
          f"independent sample)")
    for d in widths:
        need = {w: r and int(r * d * factor) for w, r in needed[d].items()}
        default = spectra.DEFAULTS.act_tokens
        print(f"  width {d:5d}: head n/d {needed[d]['head']}, tail n/d {needed[d]['tail']} -> "
              f"{max(v or math.inf for v in need.values()):,.0f} tokens; spectra.min_probe_tokens "
              f"{spectra.min_probe_tokens(d):,}; the default {default:,} "
              f"{'suffices' if default >= max(v or math.inf for v in need.values()) else 'falls short'}")


if __name__ == "__main__":
    main()
