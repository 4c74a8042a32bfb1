"""
Time spent in spectral evaluation as a fraction of training time, at a config's own cadence; and
whether reporting an evaluation costs the same however many came before.

    python bench/spectra_overhead.py configs/cpu_demo.py [--steps=40] [--key=value ...]
    python bench/spectra_overhead.py configs/d12_bs512.py --steps=60      # one GPU
    python bench/spectra_overhead.py configs/cpu_demo.py --report_evals=200

Runs the real trainer for --steps optimizer steps with a spectral evaluation every --steps/4
steps, and times, inside that run, (a) training throughput (the trainer's own tokens/s, which
excludes evaluations) and (b) every spectral evaluation: the measurement (one forward pass,
covariances, eigenvalues) plus its logging (fits, npz, plots, table). Then, for the config's full
budget and cadence (eval_every_tokens, spectra_every), it prints

    spectral share = n_spectral_evals x median spectral eval time / (total tokens / tokens per s)

Both times come from the same run on the same device, so the figure is a ratio, not a timing.
Goals (issue 3): <= 10% for cpu_demo on CPU, <= 2% for d12 on one GPU.

--report_evals=N: the config's model measures its spectra once, then measure.report (fits,
references, npz, figures and table, as the trainer reports an evaluation; gradient and weight
spectra at every grad_spectra_every-th) runs for N evaluations in a row into one run directory.
It prints the mean reporting time per evaluation over the first and the last tenth, each against
a baseline measured beside it: the same evaluation reported into an empty directory with no
history. The growth of that ratio is about 1 when the work per evaluation does not grow with the
evaluations before it (the machine's own drift cancels). The first evaluation (imports,
matplotlib's first figure) is left out of the first tenth; each tenth holds as many evaluations
with gradient spectra as the other.
"""

import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import measure  # noqa: E402
import spectra  # noqa: E402
import train_gpt  # noqa: E402
from data.shards import find_shards, load_prefix  # noqa: E402
from train_throughput import bench_config  # noqa: E402


def spectral_evals_at_cadence(cfg, n_steps, tokens_per_step):
    """{"act": n, "grad": m}: how many evaluations of a full run measure each family of spectra, by
    the trainer's own rule (weight spectra go with the gradient ones)."""
    if cfg.eval_every_tokens < 0:
        return {"act": 0, "grad": 0}
    evals = [0] + [s for s in range(1, n_steps + 1) if s == n_steps or
                   train_gpt.crossed_multiple(cfg.eval_every_tokens, s * tokens_per_step, tokens_per_step)]
    kinds = [train_gpt.spectral_eval(cfg, s, n_steps, tokens_per_step) for s in evals]
    return {family: sum(family in k for k in kinds) for family in ("act", "grad")}


def timed(fn, times, device, key):
    """fn wrapped to add its wall time (after the device has finished earlier work) to times[key(args)]."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def wrapper(*args, **kwargs):
        sync()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        sync()
        times.setdefault(key(args), []).append(time.perf_counter() - t0)
        return out
    return wrapper


def per_eval(times, parts):
    """Seconds per evaluation of a family: the median over evaluations (the first, which imports
    and warms up, left out when there are enough) of the sum of its parts."""
    totals = [sum(ts) for ts in zip(*(times[p] for p in parts))]
    return statistics.median(totals[1:] if len(totals) > 2 else totals), totals


def report_scaling(cfg, n_evals):
    """Reporting time per evaluation over n_evals evaluations of one run directory: (first tenth,
    last tenth) means in seconds."""
    gcfg, settings = train_gpt.model_config(cfg), train_gpt.spectral_settings(cfg)
    torch.manual_seed(cfg.seed)
    model = train_gpt.GPT(gcfg).eval()
    with torch.no_grad():  # trained-looking weights: no zero-initialised projection, so every spectrum is fitted
        for name, p in model.named_parameters():
            if p.dim() == 2 and not p.any():
                p.normal_(0, 0.02)
    points, names = settings.point_names(gcfg.n_layer), settings.matrix_names(model.linears(), gcfg.n_layer)
    probe = torch.from_numpy(load_prefix(find_shards(cfg.val_files), max(settings.probe_tokens("act"),
                                                                         settings.probe_tokens("grad")),
                                         gcfg.vocab_size))
    measured = {"act": spectra.measure_activations(model, probe, settings, points),
                "grad": spectra.measure_gradients(model, probe, settings, names),
                "weight": spectra.measure_weights(model, names, settings)}
    every = cfg.grad_spectra_every or n_evals + 1
    if n_evals < 21:
        sys.exit("--report_evals: at least 21 evaluations (a first one left out, then two tenths)")
    tenth = max(1, n_evals // 10)
    timed = set(range(1, 1 + tenth)) | set(range(n_evals - tenth, n_evals))
    notes = measure.Notes(say=lambda note: None)

    def report(run_dir, history, k):
        """Seconds to report evaluation k (its families) into run_dir with its history."""
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # the console tables
            for family in ["act"] + (["grad", "weight"] if k % every == 0 else []):
                measure.report(family, measured[family], settings, run_dir, k, k * cfg.eval_every_tokens,
                               gcfg.n_layer, history, notes, figures=cfg.spectra_plots)
        return time.perf_counter() - t0
    run, fresh = [], []  # seconds of evaluation k in the long run, and of the same evaluation as a run's first
    with tempfile.TemporaryDirectory() as run_dir:
        history = spectra.SpectraHistory(settings)
        for k in range(n_evals):
            run.append(report(run_dir, history, k))
            if k in timed:  # the baseline, measured beside it: the same work with nothing before it
                with tempfile.TemporaryDirectory() as empty:
                    fresh.append(report(empty, spectra.SpectraHistory(settings), k))
    return (statistics.mean(run[1:1 + tenth]), statistics.mean(fresh[:tenth]),
            statistics.mean(run[-tenth:]), statistics.mean(fresh[-tenth:]))


def main(argv):
    report_evals = next((int(a.split("=", 1)[1]) for a in argv if a.startswith("--report_evals=")), 0)
    if report_evals:
        cfg, _ = bench_config([a for a in argv if not a.startswith("--report_evals=")], steps=0)
        first, first_fresh, last, last_fresh = report_scaling(cfg, report_evals)
        print(f"== {cfg.config_file}: measure.report over {report_evals} evaluations of one run directory "
              f"(figures {'on' if cfg.spectra_plots else 'off'}), each timed evaluation also reported into an "
              "empty directory (the baseline)")
        print(f"first tenth, per evaluation   {first:.3f} s  (baseline {first_fresh:.3f} s: ratio "
              f"{first / first_fresh:.2f})")
        print(f"last tenth, per evaluation    {last:.3f} s  (baseline {last_fresh:.3f} s: ratio "
              f"{last / last_fresh:.2f})")
        print(f"growth of the ratio           {(last / last_fresh) / (first / first_fresh):.2f}  (flat: about 1; "
              "the reporting of one evaluation does not depend on how many came before)")
        return
    cfg, steps = bench_config(argv, steps=40)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tokens_per_step = cfg.batch_size * cfg.seq_len
    full_steps = train_gpt.total_steps(cfg)
    n_evals = spectral_evals_at_cadence(cfg, full_steps, tokens_per_step)

    # the measured run: same model, batch and spectral settings; every family at every evaluation,
    # evaluations every steps/4 steps
    cfg.max_steps, cfg.train_tokens = steps, 0
    cfg.log_every = max(1, steps // 8)
    cfg.eval_every_tokens, cfg.spectra_every = max(1, steps // 4) * tokens_per_step, 1
    cfg.grad_spectra_every = 1 if cfg.grad_spectra_every else 0
    cfg.ckpt_every_tokens, cfg.wandb_mode, cfg.run_name = -1, "disabled", "bench"
    cfg.val_tokens = cfg.seq_len * cfg.device_batch_size if cfg.device_batch_size else cfg.seq_len
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu")
    times = {}
    for fn in ("measure_activations", "measure_gradients", "measure_weights"):
        setattr(spectra, fn, timed(getattr(spectra, fn), times, device, key=lambda args, fn=fn: fn))
    measure.report = timed(measure.report, times, device, key=lambda args: f"log_{args[0]}")
    with tempfile.TemporaryDirectory() as tmp:
        cfg.out_dir = tmp
        run_dir = train_gpt.train(cfg)
        if int(os.environ.get("RANK", "0")) != 0:
            return
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    tps = statistics.median(rates[len(rates) // 4:])
    train_s = full_steps * tokens_per_step / tps
    t_act, act_all = per_eval(times, ("measure_activations", "log_act"))
    t_grad, grad_all = per_eval(times, ("measure_gradients", "measure_weights", "log_grad", "log_weight")) \
        if "measure_gradients" in times else (0.0, [])
    share_act, share_grad = n_evals["act"] * t_act / train_s, n_evals["grad"] * t_grad / train_s
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    gcfg, settings = train_gpt.model_config(cfg), train_gpt.spectral_settings(cfg)
    n_points = len(settings.point_names(gcfg.n_layer))
    with torch.device("meta"):
        n_mats = len(settings.matrix_names(train_gpt.GPT(gcfg).linears(), gcfg.n_layer))
    print(f"\n== {cfg.config_file} on {world} x {name}: {n_points} probe points on {cfg.spectra_tokens:,} tokens; "
          f"{n_mats} matrices on {cfg.grad_samples} sequences")
    print(f"training tokens/s                  {tps:,.0f}  (median of {len(rates)} log intervals)")
    print(f"activation spectra per evaluation  {t_act:.3f} s  (measure "
          f"{statistics.median(times['measure_activations']):.3f} s; all: {', '.join(f'{t:.2f}' for t in act_all)})")
    if grad_all:
        print(f"grad + weight spectra per eval     {t_grad:.3f} s  (measure gradients "
              f"{statistics.median(times['measure_gradients']):.3f} s; all: {', '.join(f'{t:.2f}' for t in grad_all)})")
    print(f"full run at the config's cadence   {full_steps} steps, {train_s:,.0f} s of training, "
          f"{n_evals['act']} activation and {n_evals['grad']} gradient spectral evaluations")
    print(f"spectral share of training time    {share_act + share_grad:.4f}  ({100 * (share_act + share_grad):.2f}%: "
          f"activations {100 * share_act:.2f}%, gradients and weights {100 * share_grad:.2f}%)")


if __name__ == "__main__":
    main(sys.argv[1:])
