"""
Per-example gradient spectra: our batched Gram method against the seed protocol's batch-size-1 loop.

    python bench/grad_spectra.py [--samples 64] [--seq_len 128] [--matrices attn.c_proj] [--layers all]
                                 [--batch_size 8] [--max_gb 8] [--blocks 2] [--repeats 3] [--device auto]
                                 [--precision fp32[,tf32,bf16]] [--compile 0[,1]]
    python bench/grad_spectra.py --profile d12 --samples 512 --seq_len 1024      # one GPU
    python bench/grad_spectra.py --profile d12 --samples 512 --seq_len 1024 --layers '' \
        --precision fp32,tf32,bf16 --batch_size 8,32 --compile 0,1 --blocks 0   # variants, one baseline

Both methods measure the singular values of the same G on the same model and probe set: row i of G
is the gradient of one chosen Linear's weight for example i (one sequence of --seq_len tokens, its
loss the mean cross-entropy over its tokens; the first --samples windows of the embedded corpus):

  ours      spectra.measure_gradients: batched forward/backward passes give each layer's inputs A_i
            and output gradients B_i, g_i = vec(B_i^T A_i) formed in fp64 and held in fp32 (or the
            token-Gram), K = G G^T accumulated in fp64 over column blocks of G bounded by --max_gb;
            singular values = sqrt(eig(K))
  baseline  the seed protocol, written here independently: for each example, zero the gradients,
            forward the single sequence, backward its mean loss, copy every chosen weight's .grad
            (fp64) into row i of G; singular values with torch.linalg.svdvals(G)

and prints both times, the speedup (a ratio; timing is never asserted), the largest relative
singular-value difference over the meaningful ranks (spectra.numerical_rank of the baseline's
values) and the largest |difference| / sigma_1. It also prints the memory plan of the Gram
accumulation (the most held at once, column blocks of G and any token-Gram A and B, against
n x P x 4 bytes for G whole in fp32; on CUDA the measured peak too), and runs ours again with a --max_gb
small enough that each matrix needs --blocks column blocks, to show the blocked result equals the
unblocked one. Exits 1 if the relative error exceeds 1e-5: the two methods then disagree on the
spectra.

Lists in --precision, --batch_size and --compile run ours once per combination, each printed against
the one baseline (--compile 1: the head's gradient through torch.compile, GPT.sequence_loss_grad; its
first call, which compiles, is the untimed warm-up). --precision tf32 or bf16 runs our passes in
that arithmetic (spectra.PRECISIONS; the baseline stays full fp32, the seed protocol's), for the
speed a GPU's tensor cores give. Those
spectra are approximate, so instead of the 1e-5 check the bench prints how far the fitted exponents
(alpha over the head and tail windows, as logged) move from the baseline's and exits 1 if any moves
by more than 0.01, a tenth of the smallest differences the studies report between conditions.

Defaults are the CPU tiny config of configs/cpu_demo.py with random weights (every parameter
~ N(0, 0.02), so the zero-initialised projections are not zero). For stable CPU timings, run with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1.
"""

import argparse
import itertools
import math
import os
import sys
import time

# One BLAS thread for numpy, as in bench/act_spectra.py (an explicit OPENBLAS_NUM_THREADS wins).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import measure  # noqa: E402
import spectra  # noqa: E402
from data.shards import ShardError, find_shards, load_prefix  # noqa: E402
from model import GPT, PROFILES, make_config  # noqa: E402

RELATIVE_TOLERANCE = 1e-5  # largest relative singular-value difference accepted as "the same spectra"
ALPHA_TOLERANCE = 0.01     # largest alpha shift accepted from reduced-precision (tf32, bf16) passes
WINDOWS = {"head": (1, 10), "tail": (30, 150)}  # the trainer's default fit windows
TINY = dict(n_layer=4, n_head=4, n_embd=128)  # configs/cpu_demo.py
SPLITS = ("val", "train")  # the probe set comes from the val split, or the train split if val is too short


def random_model(sizes, seq_len, device, seed=0):
    """A modded GPT with every parameter ~ N(0, 0.02), in eval mode on `device`."""
    torch.manual_seed(seed)
    model = GPT(make_config("modded", "d12", seq_len=seq_len, **sizes))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model.to(device).eval()


def probe_tokens(n_samples, seq_len, vocab_size):
    """(1-D int64 tensor of n_samples * seq_len + 1 tokens, split name): the corpus' val split when
    it is long enough, else its train split."""
    n_tokens = n_samples * seq_len
    for split in SPLITS:
        files = find_shards(os.path.join(ROOT, f"data/shakespeare/shakespeare_{split}_*.bin"))
        try:
            return torch.from_numpy(load_prefix(files, n_tokens, vocab_size, key="samples x seq_len")), split
        except ShardError:
            if split == SPLITS[-1]:
                raise
    raise AssertionError("unreachable")


def windows(tokens, n, seq_len):
    """(n, seq_len + 1): windows taken with stride seq_len, as spectra.gradient_grams takes them."""
    return tokens[: n * seq_len + 1].unfold(0, seq_len + 1, seq_len)[:n]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------
# The seed protocol: one backward per example


def baseline_spectra(model, tokens, names, seq_len, n, timing):
    """{name: singular values (fp64 numpy, descending)} from G built one example at a time;
    timing["loop"], timing["svd"] = seconds spent building G and in the SVD."""
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    linears = model.linears()
    weights = {name: linears[name].weight for name in names}
    G = {name: torch.zeros(n, w.numel(), dtype=torch.float64, device=device) for name, w in weights.items()}
    for i, w in enumerate(windows(tokens, n, seq_len).to(device)):
        model.zero_grad(set_to_none=True)
        logits, _ = model(w[None, :-1])
        F.cross_entropy(logits[0], w[1:]).backward()
        for name, weight in weights.items():
            G[name][i] = weight.grad.flatten().double()
    model.zero_grad(set_to_none=True)
    sync(device)
    t1 = time.perf_counter()
    out = {name: torch.linalg.svdvals(g).cpu().numpy() for name, g in G.items()}
    timing.update(loop=t1 - t0, svd=time.perf_counter() - t1)
    del G
    return out


# ----------------------------------------------------------------------------------------------
# The memory plan of spectra.gradient_grams (spectra.plan_passes)


def gram_plan(model, names, n, seq_len, max_gb, method):
    """(materialised names, token-Gram names, passes) as gradient_grams plans them (spectra.plan_passes)."""
    linears = model.linears()
    passes = spectra.plan_passes({m: tuple(linears[m].weight.shape) for m in names}, n, seq_len, max_gb, method)
    token = [name for jobs in passes for name, rows in jobs if rows is None]
    return [m for m in names if m not in token], token, passes


def peak_held_bytes(model, passes, n, seq_len):
    """Bytes held at once in the fullest pass (fp32): its column blocks of G and token-Gram A and B."""
    linears = model.linears()
    return max((sum(spectra.held_entries(tuple(linears[name].weight.shape), n, seq_len, rows) * 4
                    for name, rows in jobs) for jobs in passes), default=0)


def blocking_max_gb(model, names, n, blocks):
    """A max_gb with which the largest chosen matrix needs `blocks` column blocks: budget = n x
    ceil(d_out / blocks) x d_in entries (smaller matrices may then share a pass, or span two)."""
    linears = model.linears()
    entries = max(n * math.ceil(linears[m].weight.shape[0] / blocks) * linears[m].weight.shape[1] for m in names)
    return (entries + 0.5) * 4 / 2 ** 30


def mb(n_bytes):
    return f"{n_bytes / 2 ** 20:,.1f} MB"


# ----------------------------------------------------------------------------------------------
# Timing and comparison


def best_time(fn, repeats, device):
    """(smallest wall time in seconds over `repeats` calls, the last result), the device synchronised."""
    best, out = float("inf"), None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def relative_difference(ours, base, limit):
    """Largest |ours - base| / base over the meaningful ranks of the baseline (numerical_rank, at most
    `limit` = min(n, P)); 0 for an all-zero spectrum, inf if either side is not finite."""
    if not (np.isfinite(ours).all() and np.isfinite(base).all()):
        return float("inf")
    k = spectra.numerical_rank(base, limit)
    if k == 0:
        return 0.0
    return float(np.max(np.abs(ours[:k] - base[:k]) / base[:k]))


def scaled_difference(ours, base):
    """Largest |ours - base| / sigma_1 over all ranks."""
    if not (np.isfinite(ours).all() and np.isfinite(base).all()):
        return float("inf")
    m = min(len(ours), len(base))
    return float(np.max(np.abs(ours[:m] - base[:m])) / base[0]) if base[0] > 0 else 0.0


def alpha_shift(ours, base, limit):
    """{window name: |alpha(ours) - alpha(base)|} over the trainer's default fit windows, both fits
    clipped to the baseline's meaningful ranks, as the logged fits are; NaN where the window lies
    beyond those ranks (neither has a fit), inf where only one side has a finite fit."""
    rank = spectra.numerical_rank(base, limit)
    out = {}
    for window, ranks in WINDOWS.items():
        a, b = (spectra.fit_power_law(v, ranks, rank)["alpha"] for v in (ours, base))
        out[window] = abs(a - b) if math.isfinite(a) and math.isfinite(b) else \
            math.nan if math.isnan(b) and math.isnan(a) else math.inf
    return out


def worst(diffs):
    """(largest value, its key), NaN values ignored; (nan, '-') when all are NaN."""
    finite = {k: v for k, v in diffs.items() if not math.isnan(v)}
    if not finite:
        return math.nan, "-"
    name = max(finite, key=finite.get)
    return finite[name], name


def at_least(low):
    """An argparse type: an integer >= low."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= {low}")
        return value
    return parse


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive number")
    return value


def int_list(text):
    """'8,32' -> [8, 32] (positive integers)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers like 8 or 8,32")
    return values


def flag_list(text):
    """'0,1' -> [0, 1] (each 0 or 1)."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or any(v not in ("0", "1") for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected 0, 1 or 0,1")
    return [int(v) for v in values]


def precision_list(text):
    """'fp32,bf16' -> ['fp32', 'bf16'], each one of spectra.PRECISIONS."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or any(v not in spectra.PRECISIONS for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected one or more of {', '.join(spectra.PRECISIONS)}, "
                                         "comma-separated")
    return values


def resolve_sizes(args):
    """n_layer, n_head, n_embd: the --profile's (modded preset) or the tiny config's, explicit options win."""
    sizes = dict(PROFILES[args.profile]) if args.profile else dict(TINY)
    for key in sizes:
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    return sizes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    ap.add_argument("--profile", choices=sorted(PROFILES), default=None,
                    help="model sizes of a profile (modded preset); default: the cpu_demo tiny config")
    ap.add_argument("--n_layer", type=int, default=None)
    ap.add_argument("--n_head", type=int, default=None)
    ap.add_argument("--n_embd", type=int, default=None)
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--samples", type=at_least(2), default=64, help="examples (sequences), the rows of G")
    ap.add_argument("--matrices", default="attn.c_proj", help="comma-separated block Linears")
    ap.add_argument("--layers", default="all", help="'all', '' (5 evenly spaced) or '0,2,3'")
    ap.add_argument("--batch_size", type=int_list, default=[8],
                    help="sequences per forward/backward of ours; a comma-separated list runs each, against the same "
                         "baseline")
    ap.add_argument("--max_gb", type=positive_float, default=8.0, help="ours: G entries held at once, in GiB")
    ap.add_argument("--method", choices=("auto", "materialise", "token_gram"), default="auto")
    ap.add_argument("--blocks", type=int, default=2,
                    help="column blocks per matrix of the blocked run (one pass over the probe set each; 4 x "
                         "4 matrices take ~70 s on 2 CPU cores, hence 2); 0 skips it")
    ap.add_argument("--repeats", type=at_least(1), default=3,
                    help="timed runs of ours after one warm-up (best is reported)")
    ap.add_argument("--baseline_repeats", type=at_least(1), default=1, help="timed runs of the baseline")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", type=flag_list, default=[0],
                    help="1: ours with the head's gradient compiled (torch.compile; a GPU speedup); '0,1' runs both")
    ap.add_argument("--precision", type=precision_list, default=["fp32"],
                    help="arithmetic of our passes, fp32, tf32 or bf16 (the baseline is always full fp32; tf32 and "
                         "bf16 are approximate); a comma-separated list runs each, against the same baseline")
    args = ap.parse_args(argv)

    device = measure.pick_device(args.device)
    sizes = resolve_sizes(args)
    model = random_model(sizes, args.seq_len, device)
    tokens, split = probe_tokens(args.samples, args.seq_len, model.cfg.vocab_size)
    try:
        names = spectra.select_linears(set(model.linears()), sizes["n_layer"], args.matrices, args.layers)
    except ValueError as e:
        ap.error(str(e))
    n = args.samples
    P = {name: model.linears()[name].weight.numel() for name in names}
    threads = f"{torch.get_num_threads()} torch threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"model: modded, {sizes['n_layer']} layers, width {sizes['n_embd']}, {sizes['n_head']} heads, random "
          f"weights, {device.type}, {threads}, OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}")
    print(f"probe set: {n} sequences x {args.seq_len} tokens ({split} split); {len(names)} matrices "
          f"({args.matrices}, layers {args.layers}), P = {sorted(set(P.values()))} weights each; "
          f"ours: batch {','.join(map(str, args.batch_size))}, max_gb {args.max_gb:g}, method {args.method}, "
          f"precision {','.join(args.precision)}")

    try:  # a forced token-Gram that cannot fit max_gb is refused before anything runs
        dense, token, passes = gram_plan(model, names, n, args.seq_len, args.max_gb, args.method)
    except ValueError as e:
        ap.error(str(e))

    def ours(variant, max_gb=args.max_gb):
        precision, batch_size, compiled = variant
        settings = spectra.SpectraSettings(seq_len=args.seq_len, grad_samples=n, grad_batch_size=batch_size,
                                           max_gb=max_gb, method=args.method, precision=precision,
                                           compile=bool(compiled))
        return spectra.measure_gradients(model, tokens, settings, names)

    runs = []  # ((precision, batch size, compile), best time, spectra, measured peak or None)
    for variant in itertools.product(args.precision, args.batch_size, args.compile):
        ours(variant)  # warm-up: first-call allocations, kernel choice and compilation are not the method
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            held = torch.cuda.memory_allocated(device)
        t, out = best_time(lambda: ours(variant), args.repeats, device)
        runs.append((variant, t, out,
                     torch.cuda.max_memory_allocated(device) - held if device.type == "cuda" else None))

    blocked = None
    first, t_first, first_out, _ = runs[0]
    if args.blocks > 0 and dense:
        small_gb = blocking_max_gb(model, dense, n, args.blocks)
        t_blocked, blocked = best_time(lambda: ours(first, small_gb), 1, device)
        _, _, small_passes = gram_plan(model, names, n, args.seq_len, small_gb, args.method)

    timing = {}
    t_base, base_out = best_time(lambda: baseline_spectra(model, tokens, names, args.seq_len, n, timing),
                                 args.baseline_repeats, device)
    print(f"baseline (one backward per example): {t_base:7.3f} s  (best of {args.baseline_repeats}; last run: loop "
          f"{timing['loop']:.3f} s, SVD {timing['svd']:.3f} s on {device.type})")
    failures = [report(variant, t, out, peak, t_base, base_out, names, n, P, args.repeats)
                for variant, t, out, peak in runs]

    whole = sum(n * P[m] * 4 for m in names)
    note = f"; {len(token)} token-Gram matrices hold A, B instead of G" if token else ""
    print(f"memory: most held at once {mb(peak_held_bytes(model, passes, n, args.seq_len))} "
          f"({len(passes)} pass{'es' * (len(passes) != 1)} over the probe set) vs G whole {mb(whole)} "
          f"(n x P x 4 bytes, all {len(names)} matrices){note}")
    if blocked is not None:
        block_diff = max(float(np.max(np.abs(blocked[m]["values"] - first_out[m]["values"])
                                   / first_out[m]["values"][0])) for m in names)
        block_rel = max(relative_difference(blocked[m]["values"], first_out[m]["values"], min(n, P[m])) for m in names)
        print(f"blocked ({describe(first)}, max_gb {small_gb:.3g}, {args.blocks} column blocks "
              f"per matrix, {len(small_passes)} passes): most held at once "
              f"{mb(peak_held_bytes(model, small_passes, n, args.seq_len))}, time {t_blocked:.3f} s = "
              f"{t_blocked / t_first:.1f}x unblocked; max relative difference to unblocked {block_rel:.2e}, "
              f"max |difference| / sigma_1 {block_diff:.2e}")
    elif args.blocks > 0:
        print("blocked: every chosen matrix uses the token-Gram (no G is materialised), so max_gb does not apply")
    for failure in filter(None, failures):
        print("FAIL: " + failure)
    if any(failures):
        sys.exit(1)


def describe(variant):
    precision, batch_size, compiled = variant
    return f"{precision}, batch {batch_size}" + (", head compiled" if compiled else "")


def report(variant, t, out, peak, t_base, base_out, names, n, P, repeats):
    """Print one run of ours against the baseline; the reason it fails its accuracy check, or None."""
    precision = variant[0]
    rel = {m: relative_difference(out[m]["values"], base_out[m], min(n, P[m])) for m in names}
    scaled = {m: scaled_difference(out[m]["values"], base_out[m]) for m in names}
    ranks = [spectra.numerical_rank(base_out[m], min(n, P[m])) for m in names]
    shifts = {m: alpha_shift(out[m]["values"], base_out[m], min(n, P[m])) for m in names}
    shift = {w: worst({m: s[w] for m, s in shifts.items()}) for w in WINDOWS}
    (rel_max, rel_at), (scaled_max, scaled_at) = worst(rel), worst(scaled)
    exact = precision == "fp32"
    print(f"ours, {describe(variant)} (batched, Gram of G): {t:8.3f} s  (best of {repeats})")
    print(f"  speedup: {t_base / t:.1f}x (goal >= 1.5x on the CPU tiny config; >= 20x for d12 at n=512, T=1024 "
          f"on one GPU)")
    print(f"  max relative singular-value error:  {rel_max:.2e} (at {rel_at}; over the meaningful ranks, "
          f"{min(ranks)}..{max(ranks)} of {n}; " + (f"tolerance {RELATIVE_TOLERANCE:.0e})" if exact
                                                     else f"{precision}: approximate, alphas checked)"))
    print(f"  max |difference| / sigma_1:         {scaled_max:.2e} (at {scaled_at})")
    print("  max |alpha difference|:             " + "; ".join(
        f"{w} {WINDOWS[w]} " + (f"{v:.1e} (at {at})" if not math.isnan(v) else "none (beyond the ranks)")
        for w, (v, at) in shift.items()) +
        ("" if exact else f"; tolerance {ALPHA_TOLERANCE}"))
    if peak is not None:
        print(f"  memory: measured peak above the model {mb(peak)} (torch.cuda.max_memory_allocated)")
    if exact and not rel_max <= RELATIVE_TOLERANCE:
        return f"{describe(variant)}: the two methods disagree on the singular values"
    if not exact and any(v > ALPHA_TOLERANCE for v, _ in shift.values()):  # NaN: no window to fit
        return f"{describe(variant)}: the passes move a fitted alpha by more than {ALPHA_TOLERANCE}"
    return None


if __name__ == "__main__":
    main()
