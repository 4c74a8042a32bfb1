"""
What a spectral measurement leaves behind, written one way for the trainer, the checkpoint command
and the conditions study (`report`): the scalar metrics, each note once, the npz spectra, the
figures and the console table. And the command that measures a saved checkpoint:

    python measure.py act --ckpt runs/RUN/ckpt/step_00000157.pt [--data 'VAL_GLOB'] [--tail 10,100] [--out DIR]
    python measure.py grad --ckpt runs/RUN/ckpt/step_00000157.pt [--matrices attn.c_proj,mlp.c_proj] [--layers all]
    python measure.py probe --ckpt runs/RUN/ckpt/step_00000157.pt [--band BAND_SHARD] [--point final]

Settings default to the run's own (its checkpoint records them); outputs go to RUN/measured/ (or
--out), never over the trainer's own files.
"""

import argparse
import json
import math
import os
import sys

import torch

import features
import plots
import spectra
from data.shards import ShardError, WriteError, atomic_write, find_shards, load_prefix
from rundir import Checkpoint, RunFileError, load_model, read_metrics

# ----------------------------------------------------------------------------------------------
# The report of one family of measured spectra


class Notes:
    """Each distinct note said once, on one line ("note: ..."), however many evaluations repeat it."""

    def __init__(self, say=print):
        self.seen, self.say = set(), say

    def __call__(self, notes):
        for note in notes:
            if note not in self.seen:
                self.seen.add(note)
                self.say(f"note: {note}")


def report(family, measured, settings, out_dir, step, tokens, n_layer, history=None, notes=None, where="",
           npz=None, figures=True, table=True, scalars=False, meta=None):
    """The metrics of one family of measured spectra ({'<family>/<stat>/<name>': value}), with js_prev
    and js_first against `history` (a spectra.SpectraHistory, which then records this evaluation);
    notes through `notes` (a Notes); the npz to `npz` (default out_dir/spectra/<family>_<tokens>.npz);
    with figures, out_dir/plots/<family>_*.png; with table, the console table; with scalars, the
    metrics as JSON beside the npz. `meta` adds to what the npz records of the measurement."""
    meta = dict(step=step, tokens=tokens, **settings.meta(family), **(meta or {}))
    notes = notes or Notes()
    prev, first = history.references(family) if history is not None else ({}, {})
    metrics, found = spectra.summarise(measured, family, settings, prev, first, where)
    notes(found)
    npz = npz or spectra.spectra_path(out_dir, family, tokens)
    spectra.save_spectra(npz, measured, meta)
    if history is not None:
        history.add(family, tokens, {p: s["values"] for p, s in measured.items()},
                    {p: s["limit"] for p, s in measured.items()}, meta,
                    {p: (metrics[f"{family}/alpha_head/{p}"], metrics[f"{family}/alpha_tail/{p}"]) for p in measured})
    if figures:
        draw_figures(os.path.join(out_dir, "plots"), family, tokens, measured, metrics, settings, n_layer, history,
                     notes)
    if scalars:
        text = json.dumps({"step": step, "tokens": tokens, **{k: None if isinstance(v, float) and not math.isfinite(v)
                                                              else v for k, v in metrics.items()}}, indent=1)
        atomic_write(npz[:-len(".npz")] + ".json", lambda f: f.write(text.encode()))
    if table:
        print(f"{family} spectra:\n" + spectra.format_table(metrics, family, list(measured)))
    return metrics


def layer_of(point, n_layer):
    """x position of a point or matrix in plots against layer: embed -1, L05.* 5, final n_layer."""
    return -1 if point == "embed" else n_layer if point == "final" else int(point[1:point.index(".")])


def spectrum_picks(names, max_curves=5):
    """The spectra worth a curve: embed, the first, middle and last block outputs (or matrices), final."""
    blocks = [p for p in names if p.endswith(".mlp_resid")] or [p for p in names if p not in ("embed", "final")]
    middle = [blocks[i] for i in sorted({0, len(blocks) // 2, len(blocks) - 1})] if blocks else []
    picks = [p for p in ("embed",) if p in names] + middle + [p for p in ("final",) if p in names]
    return list(dict.fromkeys(picks))[:max_curves]


# Why a spectrum is left out of the figures, said once per run (the figure's title names which)
NOT_DRAWN_WHY = {"all-zero": "zero-initialised weights before their first update, e.g. the modded preset's output "
                             "projections at step 0, give all-zero activations, gradients and weights",
                 "all-NaN": "the measurement gave no finite value",
                 "non-finite": "the measurement gave non-finite values",
                 "rank < 2": "a power law needs two valid ranks"}


def spectrum_curve(point, spectrum, settings):
    """The plots.Curve of one measured spectrum: its meaningful ranks with the fitted head and tail
    (none when it has nothing to draw; plots.spectra then names it instead)."""
    values = spectrum["values"]
    rank = spectra.numerical_rank(values, spectrum["limit"])
    fits = [] if plots.not_drawable(values, rank) else \
        [(name, spectra.fit_power_law(values, window, rank)) for name, window in (("head", settings.head),
                                                                                   ("tail", settings.tail))]
    return plots.Curve(point, values, fits, rank=rank)


def layer_names(points, n_layer):
    """Tick labels of the layer axis for the points that exist: {-1: 'embed', n_layer: 'final'}."""
    return {layer_of(p, n_layer): p for p in ("embed", "final") if p in points}


def draw_figures(plot_dir, family, tokens, measured, metrics, settings, n_layer, history=None, notes=None):
    """The figures of one evaluation: a few spectra with their fitted head and tail, alpha against
    layer, and alpha against tokens over the history so far (this evaluation alone without one).
    Spectra with nothing to draw (all zero, non-finite) are named in the figure's title and said
    once per run through `notes` (a Notes); a figure with nothing left is not written.
    Returns what each drew, {"spectrum" | "alpha_layer" | "alpha_tokens": plots.DrawnFigure}."""
    tag, label = f"{tokens:012d}", f"{family} spectra at {tokens:,} tokens"
    curves = [spectrum_curve(p, measured[p], settings) for p in spectrum_picks(list(measured))]
    reasons = dict.fromkeys(plots.not_drawable(c.values, c.rank) for c in curves)  # in order, each once
    (notes or Notes())([f"{family} spectra that are {why} are not drawn; each figure names those it leaves out "
                        f"({NOT_DRAWN_WHY[why]})" for why in reasons if why])
    ylabel = "eigenvalue" if family == "act" else "singular value"
    drawn = {"spectrum": plots.spectra(os.path.join(plot_dir, f"{family}_spectrum_{tag}.png"), {label: curves}, ylabel)}
    kinds = {}
    for p in measured:
        kinds.setdefault(p.split(".", 1)[-1], []).append(p)
    by_layer = {stat: {kind: ([layer_of(p, n_layer) for p in ps], [metrics.get(f"{family}/{stat}/{p}") for p in ps])
                       for kind, ps in kinds.items()} for stat in ("alpha_head", "alpha_tail")}
    drawn["alpha_layer"] = plots.alpha_by_layer(os.path.join(plot_dir, f"{family}_alpha_layer_{tag}.png"), by_layer,
                                                "alpha", label, xnames=layer_names(measured, n_layer))
    series = history.series[family] if history is not None else \
        {p: {tokens: (metrics[f"{family}/alpha_head/{p}"], metrics[f"{family}/alpha_tail/{p}"])} for p in measured}
    if any(p.endswith(".mlp_resid") for p in series):  # activations: the block outputs, embed and final
        series = {p: s for p, s in series.items() if p.endswith(".mlp_resid") or "." not in p}
    drawn["alpha_tokens"] = plots.alpha_by_tokens(
        os.path.join(plot_dir, f"{family}_alpha_tokens.png"),
        {stat: {p: (sorted(s), [s[t][i] for t in sorted(s)]) for p, s in series.items()}
         for i, stat in enumerate(("alpha_head", "alpha_tail"))}, "alpha")
    return drawn


# ----------------------------------------------------------------------------------------------
# The command line: the same measurement on a saved checkpoint


def parse_window(text):
    """'10,100' or '(10, 100)' -> (10, 100)."""
    parts = [p for p in text.replace("(", " ").replace(")", " ").replace(",", " ").split() if p]
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a rank window 'a,b' (e.g. 10,100)")
    return int(parts[0]), int(parts[1])


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available; use --device cpu")
    return torch.device(name)


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="measure.py", description="The activation spectra (act), or the per-example "
                                 "gradient and weight spectra (grad), of a trainer checkpoint, measured and reported "
                                 "as the trainer does at an evaluation. Every setting defaults to the run's own; "
                                 "outputs go to RUN/measured/ (or --out).")
    sub = ap.add_subparsers(dest="command", required=True)
    act = sub.add_parser("act", help="activation spectra of a checkpoint")
    grad = sub.add_parser("grad", help="per-example gradient and weight spectra of a checkpoint")
    for p in (act, grad):  # every setting defaults to the run's own, from the checkpoint's config
        p.add_argument("--ckpt", required=True, help="trainer checkpoint, runs/RUN/ckpt/step_*.pt")
        p.add_argument("--data", help="val shard file or glob for the probe set (default: the run's val_files)")
        p.add_argument("--out", help="directory for spectra/ and plots/ (default: RUN/measured/ beside RUN/ckpt/; "
                                     "the trainer's own RUN/spectra/ is never written)")
        p.add_argument("--seq_len", type=int, help="probe sequence length (default: the run's seq_len)")
        p.add_argument("--head", type=parse_window, help="head window a,b (default: the run's spectra_head)")
        p.add_argument("--tail", type=parse_window, help="tail window a,b, e.g. 10,100 (default: the run's)")
        p.add_argument("--batch_size", type=int, help="probe sequences per forward pass")
        p.add_argument("--device", default="auto", help="auto | cpu | cuda")
        p.add_argument("--no_plots", action="store_true")
    act.add_argument("--tokens", type=int, help="probe tokens (default: the run's spectra_tokens)")
    act.add_argument("--points", help="comma-separated probe points or globs (default: the run's)")
    act.add_argument("--sublayers", type=int, choices=(0, 1), help="every probe point of every block")
    act.add_argument("--act_norm", choices=spectra.ACT_NORMS, help="RMS-normalise residual-stream points")
    grad.add_argument("--samples", type=int, help="examples (sequences) (default: the run's grad_samples)")
    grad.add_argument("--matrices", help="e.g. attn.c_proj,mlp.c_proj (default: the run's grad_matrices)")
    grad.add_argument("--layers", help="'' (5 evenly spaced), 'all' or '0,5,11' (default: the run's)")
    grad.add_argument("--max_gb", type=float, help="per-example gradients held at once (default: the run's)")
    grad.add_argument("--method", choices=spectra.METHODS)
    grad.add_argument("--precision", choices=spectra.PRECISIONS,
                      help="arithmetic of the passes: fp32 (exact), tf32 or bf16 (GPU speed, approximate) "
                           "(default: the run's grad_spectra_precision)")
    grad.add_argument("--compile", type=int, choices=(0, 1),
                      help="torch.compile the head's gradient, a GPU speedup (default: the run's grad_spectra_compile)")
    grad.add_argument("--density_rule", choices=spectra.DENSITY_RULES,
                      help="x_min rule of weight/alpha_density (default: the run's, else weightwatcher)")
    probe = sub.add_parser("probe", help="feature probes of a toy-task checkpoint (features.py) on its band")
    probe.add_argument("--ckpt", required=True, help="trainer checkpoint, runs/RUN/ckpt/step_*.pt")
    probe.add_argument("--band", help="band shard with latents (default: the one beside the run's val_files)")
    probe.add_argument("--point", default="final", help="probe point of the conditional-mean table")
    probe.add_argument("--out", help="directory for probe_<tokens>.json and plots/ (default: RUN/measured/)")
    probe.add_argument("--device", default="auto", help="auto | cpu | cuda")
    probe.add_argument("--no_plots", action="store_true")
    return ap.parse_args(argv)


def probe_checkpoint(args):
    """measure.py probe: the probe metrics of a checkpoint, printed and written as JSON, and the
    run's probe figure (its evaluations from metrics.jsonl, then this checkpoint)."""
    try:
        device = pick_device(args.device)
        ckpt = Checkpoint.load(args.ckpt, mmap=True)
        model = load_model(args.ckpt).to(device)
        band = args.band or (features.find_band(ckpt.config["val_files"]) if ckpt.config.get("val_files") else None)
        if not band:
            raise ValueError("no band: the run's val shards have no <name>_band_*.bin beside them (the toy task's, "
                             "python data/modarith.py); give --band BAND_SHARD")
        tokens, latents = features.load_band(band, model.cfg.seq_len, model.cfg.vocab_size)
        metrics = features.measure_band(model, tokens, latents, point=args.point, seed=ckpt.config.get("seed", 0))
    except (ValueError, ShardError, RunFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(args.ckpt)))
    out = args.out or os.path.join(run_dir, "measured")
    record = dict(step=ckpt.step, tokens=ckpt.tokens, **metrics)
    print(f"feature probes of {args.ckpt} (step {ckpt.step}, {ckpt.tokens:,} tokens) on {len(tokens)} band sequences")
    print(features.summary_line(metrics, args.point))
    path = os.path.join(out, f"probe_{ckpt.tokens:012d}.json")
    try:
        os.makedirs(out, exist_ok=True)
        atomic_write(path, lambda f: f.write(json.dumps(dict(record, band=os.path.abspath(band), point=args.point,
                                                             source=os.path.abspath(args.ckpt)), indent=1).encode()))
        print(f"wrote {path}")
        if not args.no_plots:
            metrics_file = os.path.join(run_dir, "metrics.jsonl")
            records = [r for r in (read_metrics(metrics_file)[0] if os.path.exists(metrics_file) else [])
                       if r.get("tokens", -1) < ckpt.tokens or f"probe/fourier_peak/{args.point}" not in r]
            drawn = plots.feature_probes(os.path.join(out, "plots", "probe.png"), records + [record], args.point,
                                         title=f"feature probes of {os.path.basename(run_dir)} (band c="
                                               f"{int(latents['c'][0, 0])}, point {args.point})")
            print(f"wrote {drawn.path}")
    except WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


# the flag of each setting, for errors that name what the user typed
FLAGS = dict(seq_len="--seq_len", head="--head", tail="--tail", act_tokens="--tokens", act_batch_size="--batch_size",
             act_norm="--act_norm", grad_samples="--samples", grad_batch_size="--batch_size", max_gb="--max_gb",
             method="--method", precision="--precision", density_rule="--density_rule")


def command_settings(args, config, model_seq_len):
    """The run's spectral settings (from its checkpoint's config) with the command's flags applied."""
    run = spectra.SpectraSettings.from_config({"seq_len": model_seq_len, **config})
    flags = dict(seq_len=args.seq_len, head=args.head, tail=args.tail)
    if args.command == "act":
        flags.update(act_tokens=args.tokens, act_batch_size=args.batch_size, points=args.points,
                     sublayers=None if args.sublayers is None else bool(args.sublayers), act_norm=args.act_norm)
    else:
        flags.update(grad_samples=args.samples, grad_batch_size=args.batch_size, matrices=args.matrices,
                     layers=args.layers, max_gb=args.max_gb, method=args.method, precision=args.precision,
                     compile=None if args.compile is None else bool(args.compile), density_rule=args.density_rule)
    return run.override(**flags)


def main(argv=None):
    args = parse_args(argv)
    if args.command == "probe":
        return probe_checkpoint(args)
    try:
        device = pick_device(args.device)
        ckpt = Checkpoint.load(args.ckpt, mmap=True)
        model = load_model(args.ckpt).to(device)
        settings = command_settings(args, ckpt.config, model.cfg.seq_len)
        if not 0 < settings.seq_len <= model.cfg.seq_len:
            raise ValueError(f"--seq_len {settings.seq_len}: the model takes 1 to {model.cfg.seq_len} tokens per "
                             "sequence")
        settings.check(act=args.command == "act", grad=args.command == "grad", names=FLAGS)
        n_layer, linears = model.cfg.n_layer, model.linears()
        if args.command == "act":
            names = settings.point_names(n_layer)
        else:
            names = settings.matrix_names(linears, n_layer)
            spectra.plan_passes({m: linears[m].weight.shape for m in names}, settings.grad_samples, settings.seq_len,
                                settings.max_gb, settings.method)  # a forced token-Gram that cannot fit is refused
        data = args.data or ckpt.config.get("val_files")
        if not data:
            raise ValueError("--data is required: the checkpoint does not name its val_files")
        n_tokens = settings.probe_tokens(args.command)
        tokens = torch.from_numpy(load_prefix(find_shards(data), n_tokens, model.cfg.vocab_size,
                                              key="--tokens / --samples x seq_len"))
    except (ValueError, ShardError, RunFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    out = args.out or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(args.ckpt))), "measured")
    step, seen = ckpt.step, ckpt.tokens
    if args.command == "act":
        measured = {"act": spectra.measure_activations(model, tokens, settings, names)}
    else:
        measured = {"grad": spectra.measure_gradients(model, tokens, settings, names),
                    "weight": spectra.measure_weights(model, names, settings)}
    print(f"spectra of {args.ckpt} (step {step}, {seen:,} tokens) on {n_tokens // settings.seq_len} probe sequences "
          f"of {settings.seq_len} tokens")
    try:
        history = spectra.SpectraHistory.load(out, settings, seen)
        for family, spec in measured.items():
            report(family, spec, settings, out, step, seen, n_layer, history, where=f"in {args.ckpt}",
                   figures=not args.no_plots, scalars=True, meta=dict(source=os.path.abspath(args.ckpt)))
            print(f"wrote {spectra.spectra_path(out, family, seen)} and its .json"
                  + ("" if args.no_plots else f", {out}/plots/"))
    except WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
