"""
The conditions study: activation and per-example gradient spectra of one model under five
conditions, averaged over seeds, as in the study behind this project (GPT-2 small on WikiText-2,
GPT-2 medium on WikiText-103):

    ft_train      fine-tuned (--epochs over the train split), measured on a subset of the train split
    ft_test       fine-tuned, measured on the test split
    pre_train     the starting weights as they are, on a train subset
    pre_test      the starting weights, on the test split
    random_train  the same architecture, randomly initialised, on a train subset

    python conditions.py --model gpt2 --data data/wikitext2 --seeds 5
    python conditions.py --model runs/cpu_demo/ckpt/step_00000157.pt --data data/shakespeare --seeds 2

--model is a GPT-2 name, a directory in the Hugging Face format, or a trainer checkpoint (.pt).
--ckpt adds this project's own checkpoints as extra conditions (<name>_train, <name>_test), so
their spectra sit beside the reference model's. --data is a folder of token shards with a train,
a val (for fine-tuning) and a test split (data/wikitext.py writes them; without a test split the
val split stands in, with a note).

Seeds vary what the study's seeds vary: the random initialisation, the fine-tuning run (data
order, dropout) and the train subset measured (a contiguous block at a seeded offset). The test
split is always measured from its start. Fine-tuning is the normal trainer (train_gpt.train with
init_from), so every trainer option applies through --ft KEY=VALUE.

Every measurement goes through the trainer's report path (measure.report), so a condition has the
trainer's scalars (fits, effective ranks, grad/noise_scale) under the same names.
Writes to --out (default conditions/<model name>/): conditions.csv (mean, std and count over seeds
of every scalar per condition), spectra/<condition>_seed<k>_{act,grad}.npz, and plots: alpha
against layer per condition, the spectrum of one layer per condition with its fitted tail line,
gradient alpha against layer, and sublayer alpha against depth.
"""

import argparse
import glob
import json
import math
import os
import sys
import time
from dataclasses import replace

import numpy as np
import torch

import analyze
import measure
import plots
import spectra
import train_gpt
from data.shards import ShardError, atomic_write, check_vocab, find_shards, load_tokens
from model import BLOCK_POINTS, GPT, layer_key
from rundir import RunFileError, checkpoints, load_model

CONDITIONS = ("ft_train", "ft_test", "pre_train", "pre_test", "random_train")
LABELS = {"ft_train": "fine-tuned, train", "ft_test": "fine-tuned, test", "pre_train": "not fine-tuned, train",
          "pre_test": "not fine-tuned, test", "random_train": "random init, train"}

# ----------------------------------------------------------------------------------------------
# Models and data


def model_name(spec):
    """A label for a model: the GPT-2 name or directory name, or <run>_<step_N> for a checkpoint."""
    if spec.endswith(".pt"):  # runs/RUN/ckpt/step_00000157.pt
        run = os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(spec))))
        return f"{run}_{os.path.basename(spec)[:-3]}"
    return os.path.basename(spec.rstrip("/"))


def random_like(model, seed):
    """The same architecture, initialised as the trainer initialises it from `seed`, except that
    every output projection is random: zero-initialised ones (modded's zero_init_proj) would make
    every block an identity, every activation spectrum the embedding's and every gradient zero."""
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    return GPT(replace(model.cfg, zero_init_proj=False)).to(device).eval()


def split_files(data, split):
    """The shards of one split in folder `data` (*_<split>_*.bin); the test split falls back to val."""
    files = sorted(glob.glob(os.path.join(data, f"*_{split}_*.bin")))
    if not files and split == "test":
        print(f"note: no test split in {data}; the val split stands in for it")
        return split_files(data, "val")
    if not files:
        raise ShardError(f"no {split} shards (*_{split}_*.bin) in {data}; prepare them with python data/wikitext.py "
                         "--name wikitext-2 --out DIR, or python data/prepare.py")
    return find_shards(os.path.join(data, f"*_{split}_*.bin"))


def split_tokens(files, vocab_size):
    """All tokens of a split (int64); the study's corpora fit in memory."""
    tokens = np.concatenate([np.asarray(load_tokens(f), dtype=np.int64) for f in files])
    check_vocab(tokens, files[0], vocab_size)
    return tokens


def probe_block(tokens, n_tokens, seed=None, what="probe"):
    """n_tokens + 1 contiguous tokens: from the start (seed None), or at an offset drawn from `seed`."""
    if len(tokens) < n_tokens + 1:
        raise ShardError(f"{what}: {n_tokens + 1:,} tokens needed but the split holds {len(tokens):,}; lower "
                         "--act_tokens / --grad_samples or --seq_len")
    start = 0 if seed is None else int(np.random.default_rng(seed).integers(0, len(tokens) - n_tokens))
    return torch.from_numpy(tokens[start:start + n_tokens + 1])


# ----------------------------------------------------------------------------------------------
# Fine-tuning with the trainer


def finetune(args, seed, train_tokens):
    """Fine-tune --model for --epochs over the train split with train_gpt; the final checkpoint's path."""
    tokens_per_step = args.ft_batch_size * args.seq_len
    steps = max(1, round(args.epochs * train_tokens / tokens_per_step))
    settings = dict(init_from=args.model, train_files=os.path.join(args.data, "*_train_*.bin"),
                    val_files=os.path.join(args.data, "*_val_*.bin"), seq_len=args.seq_len,
                    batch_size=args.ft_batch_size, device_batch_size=0, train_tokens=0, max_steps=steps,
                    optimizer="adamw", adamw_lr=args.ft_lr, lr_scaling="none", warmup_frac=0.0, cooldown_frac=1.0,
                    dropout=args.dropout,
                    eval_every_tokens=0, val_tokens=args.seq_len * args.ft_batch_size,
                    ckpt_every_tokens=max(1, steps // 4) * tokens_per_step,
                    ckpt_keep=1, spectra_every=0, wandb_mode="disabled", seed=seed, device=args.device,
                    out_dir=os.path.join(args.out, "finetune"), run_name=f"seed{seed}")
    overrides = [f"--{k}={v}" for k, v in settings.items()] + [f"--{kv}" for kv in args.ft]
    run_dir = os.path.join(settings["out_dir"], settings["run_name"])
    # A rerun of the study (after an interruption, say) reuses a finished fine-tuning and resumes an
    # interrupted one, but only of the same model with the same settings: recorded beside the run.
    record = os.path.join(settings["out_dir"], f"seed{seed}.json")
    wanted = {"model": os.path.abspath(args.model) if os.path.exists(args.model) else args.model,
              "overrides": sorted(overrides)}
    if os.path.isdir(run_dir):
        done = json.load(open(record)) if os.path.exists(record) else {}
        if {k: done.get(k) for k in wanted} != wanted:
            raise ValueError(f"{run_dir} holds a fine-tuning of other settings or another model (see {record}); "
                             "choose another --out or remove it")
        if done.get("final"):
            print(f"note: reusing the fine-tuned model {done['final']}")
            return done["final"]
    os.makedirs(settings["out_dir"], exist_ok=True)
    atomic_write(record, lambda f: f.write(json.dumps(wanted, indent=1).encode()))
    resume = bool(checkpoints(run_dir))  # an interrupted fine-tuning continues
    if not resume and os.path.isdir(run_dir):  # interrupted before its first checkpoint: kept aside
        aside = f"{run_dir}.interrupted-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(run_dir, aside)
        print(f"note: {run_dir} had no checkpoint; moved to {aside} and fine-tuning again")
    train_gpt.train(train_gpt.load_config(overrides + [f"--resume={int(resume)}"]))
    final = checkpoints(run_dir)[-1]  # where the trainer stopped (--ft may change the budget)
    atomic_write(record, lambda f: f.write(json.dumps({**wanted, "final": final}, indent=1).encode()))
    return final


# ----------------------------------------------------------------------------------------------
# Measuring one condition


def study_settings(args):
    """The study's spectral settings (its defaults differ from the trainer's: the study's protocol)."""
    return spectra.SpectraSettings(seq_len=args.seq_len, act_tokens=args.act_tokens // args.seq_len * args.seq_len,
                                   act_batch_size=args.batch_size, sublayers=bool(args.sublayers), head=args.head,
                                   tail=args.tail, act_norm=args.act_norm, grad_samples=args.grad_samples,
                                   matrices=args.matrices, layers="all", grad_batch_size=args.grad_batch_size,
                                   max_gb=args.max_gb)


def run_condition(name, seed, model, act_tokens, grad_tokens, args, results):
    """Measure one (condition, seed): activation spectra of every default point (every probe point
    with --sublayers) and gradient spectra of --matrices in every layer, reported as the trainer
    reports an evaluation (its npz saved as spectra/<condition>_seed<k>_<family>.npz); its scalars
    go to results[name]."""
    settings, n_layer = args.settings, model.cfg.n_layer
    measured = {"act": spectra.measure_activations(model, act_tokens, settings, settings.point_names(n_layer)),
                "grad": spectra.measure_gradients(model, grad_tokens, settings,
                                                  settings.matrix_names(model.linears(), n_layer))}
    scalars = {}
    for family, spec in measured.items():
        scalars.update(measure.report(family, spec, settings, args.out, 0, 0, n_layer, notes=args.notes,
                                      where=f"({name}, seed {seed})", figures=False, table=False,
                                      npz=os.path.join(args.out, "spectra", f"{name}_seed{seed}_{family}.npz"),
                                      meta=dict(condition=name, seed=seed)))
    results.setdefault(name, []).append(scalars)
    print(f"measured {name} (seed {seed})")


def check_models(args, models):
    """Everything about the models that can be wrong with the input, before any fine-tuning or measuring."""
    labels = [label for _, label in models[1:]]
    if len(set(labels)) < len(labels) or set(labels) & {"ft", "pre", "random"}:
        raise ValueError(f"--ckpt: the labels {labels} must be distinct and not ft/pre/random")
    for model, label in models:
        if args.seq_len > model.cfg.seq_len:
            raise ValueError(f"--seq_len {args.seq_len} exceeds the {model.cfg.seq_len} positions of {label}")
        args.settings.matrix_names(model.linears(), model.cfg.n_layer)
    n_layer = models[0][0].cfg.n_layer
    if args.layer is not None and not 0 <= args.layer < n_layer:
        raise ValueError(f"--layer {args.layer}: the model has layers 0 to {n_layer - 1}")


def run_study(args):
    """{condition: [scalars per seed]} for every condition and seed."""
    device = measure.pick_device(args.device)
    start, name = load_model(args.model).to(device), model_name(args.model)
    vocab, n_layer = start.cfg.vocab_size, start.cfg.n_layer
    extra = [(load_model(path).to(device), model_name(path)) for path in args.ckpt]
    check_models(args, [(start, name), *extra])
    train, test = split_tokens(split_files(args.data, "train"), vocab), split_tokens(split_files(args.data, "test"),
                                                                                    vocab)
    n_act, n_grad = args.act_tokens // args.seq_len * args.seq_len, args.grad_samples * args.seq_len
    test_act, test_grad = probe_block(test, n_act, what="test split"), probe_block(test, n_grad, what="test split")
    results = {}
    for seed in range(args.seeds):
        train_act, train_grad = (probe_block(train, n, seed=seed, what="train split") for n in (n_act, n_grad))
        wanted = set(args.conditions)
        if wanted & {"ft_train", "ft_test"}:
            tuned = load_model(finetune(args, seed, len(train))).to(device)
            for cond, tokens in (("ft_train", (train_act, train_grad)), ("ft_test", (test_act, test_grad))):
                if cond in wanted:
                    run_condition(cond, seed, tuned, *tokens, args, results)
            del tuned
        for cond, tokens in (("pre_train", (train_act, train_grad)), ("pre_test", (test_act, test_grad))):
            if cond in wanted:
                run_condition(cond, seed, start, *tokens, args, results)
        if "random_train" in wanted:
            run_condition("random_train", seed, random_like(start, seed), train_act, train_grad, args, results)
        for model, label in extra:
            for split, tokens in (("train", (train_act, train_grad)), ("test", (test_act, test_grad))):
                run_condition(f"{label}_{split}", seed, model, *tokens, args, results)
    return results, n_layer, name


# ----------------------------------------------------------------------------------------------
# Averaging, table and plots


def aggregate(results):
    """{condition: {key: (mean, std, count)}} over seeds; NaN values (failed fits) are left out."""
    out = {}
    for cond, per_seed in results.items():
        keys = dict.fromkeys(k for s in per_seed for k in s)
        out[cond] = {}
        for k in keys:
            values = [s[k] for s in per_seed if isinstance(s.get(k), (int, float)) and not isinstance(s[k], bool)
                      and math.isfinite(s[k])]
            if values:
                out[cond][k] = (float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                                len(values))
    return out


def print_table(summary, n_layer, stat="alpha_tail"):
    """act mlp_resid and grad attn.c_proj-style alphas per layer and condition: mean +- std."""
    conds = list(summary)
    for family, kind in (("act", "mlp_resid"), ("grad", None)):
        keys = [k for k in dict.fromkeys(k for s in summary.values() for k in s)
                if k.startswith(f"{family}/{stat}/") and (kind is None or k.endswith(kind) or k.endswith("embed")
                                                          or k.endswith("final"))]
        if not keys:
            continue
        print(f"{family}/{stat} (mean +- std over seeds)")
        print("  " + "point".ljust(22) + "".join(c.rjust(18) for c in conds))
        for k in keys:
            cells = [summary[c].get(k) for c in conds]
            print("  " + k.split("/", 2)[2].ljust(22) + "".join(
                (f"{m:.3f} +- {s:.3f}" if m is not None else "-").rjust(18) for m, s, _ in
                (c if c else (None, None, None) for c in cells)))


def alpha_by_layer(summary, cond, family, stat, kind, n_layer):
    """(layers, means, stds) of one kind of point or matrix across layers."""
    xs, ms, ss = [], [], []
    for layer in range(n_layer):
        key = f"{family}/{stat}/{layer_key(layer, n_layer)}.{kind}"
        if key in summary[cond]:
            m, s, _ = summary[cond][key]
            xs.append(layer)
            ms.append(m)
            ss.append(s)
    return xs, ms, ss


def plot_alpha_layers(path, summary, family, stat, kind, n_layer, title):
    """Mean +- std over seeds of one kind of point against layer, a line per condition."""
    lines = {LABELS.get(cond, cond): alpha_by_layer(summary, cond, family, stat, kind, n_layer) for cond in summary}
    return plots.alpha_by_layer(path, {title: {label: xy for label, xy in lines.items() if xy[0]}}, f"{stat} ({kind})",
                                xlabel="layer")


def plot_layer_spectra(path, out, conds, point, tail, title):
    """The first seed's eigenvalues of one point under each condition, with the fitted tail line."""
    curves = []
    for cond in conds:
        saved, _, limits = spectra.load_spectra(os.path.join(out, "spectra", f"{cond}_seed0_act.npz"))
        values, rank = saved[point], spectra.numerical_rank(saved[point], limits[point])
        if rank >= 2:
            curves.append(plots.Curve(LABELS.get(cond, cond), values[:rank],
                                      [("tail", spectra.fit_power_law(values, tail, rank))]))
    return plots.spectra(path, {title: curves}, "eigenvalue", ncols=1)


def plot_sublayers(path, summary, cond, stat, n_layer, title):
    """Sublayer alpha against depth (layer + position of the sublayer within the block)."""
    lines = {}
    for j, kind in enumerate(BLOCK_POINTS):
        xs, ms, _ = alpha_by_layer(summary, cond, "act", stat, kind, n_layer)
        if xs:
            lines[kind] = ([x + j / len(BLOCK_POINTS) for x in xs], ms)
    return plots.alpha_by_layer(path, {title: lines}, stat, xlabel="layer (sublayers in block order)")


def write_plots(out, summary, n_layer, name, args):
    plot_dir = os.path.join(out, "plots")
    stat = "alpha_tail"
    plot_alpha_layers(os.path.join(plot_dir, "act_alpha_layers.png"), summary, "act", stat, "mlp_resid", n_layer,
                      f"{name}: activation {stat} (block outputs), tail {args.tail[0]}-{args.tail[1]}")
    plot_alpha_layers(os.path.join(plot_dir, "grad_alpha_layers.png"), summary, "grad", stat,
                      args.matrices.split(",")[0], n_layer, f"{name}: per-example gradient {stat}")
    layer = n_layer // 2 if args.layer is None else args.layer
    point = f"{layer_key(layer, n_layer)}.mlp_resid"
    plot_layer_spectra(os.path.join(plot_dir, f"act_spectrum_{point}.png"), out, list(summary), point, args.tail,
                       f"{name}: {point}, seed 0")
    if args.sublayers:
        cond = "pre_train" if "pre_train" in summary else next(iter(summary))
        plot_sublayers(os.path.join(plot_dir, "act_sublayers.png"), summary, cond, stat, n_layer,
                       f"{name}: sublayer {stat}, {LABELS.get(cond, cond)}")


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv):
    p = argparse.ArgumentParser(prog="conditions.py", description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="gpt2 | gpt2-medium | gpt2-large | gpt2-xl, a Hugging Face "
                                                  "directory, or a trainer checkpoint (.pt)")
    p.add_argument("--data", required=True, help="folder of *_train_*, *_val_*, *_test_*.bin shards")
    p.add_argument("--ckpt", action="append", default=[], help="a trainer checkpoint measured beside (repeatable)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--conditions", default=",".join(CONDITIONS), help=f"comma-separated subset of {CONDITIONS}")
    p.add_argument("--seq_len", type=int, default=256, help="tokens per sequence (the study: 256)")
    p.add_argument("--act_tokens", type=int, default=262_144, help="activation probe tokens per condition")
    p.add_argument("--grad_samples", type=int, default=1000, help="per-example gradients (the study: 1000)")
    p.add_argument("--matrices", default="attn.c_proj", help="gradient matrices, measured in every layer")
    p.add_argument("--head", type=measure.parse_window, default=(1, 10))
    p.add_argument("--tail", type=measure.parse_window, default=(10, 100), help="the study's window: 10,100")
    p.add_argument("--sublayers", type=int, choices=(0, 1), default=1, help="every probe point of every block")
    p.add_argument("--act_norm", choices=spectra.ACT_NORMS, default="none",
                   help="the study measured raw activations (none); rms normalises residual-stream points")
    p.add_argument("--layer", type=int, help="layer of the full-spectrum plot (default: the middle one)")
    p.add_argument("--epochs", type=float, default=2.0, help="fine-tuning epochs over the train split")
    p.add_argument("--ft_lr", type=float, default=5e-5, help="fine-tuning AdamW learning rate (linear decay)")
    p.add_argument("--ft_batch_size", type=int, default=8, help="fine-tuning sequences per step")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout while fine-tuning (measured with none)")
    p.add_argument("--ft", action="append", default=[], metavar="KEY=VALUE", help="any other trainer key")
    p.add_argument("--batch_size", type=int, default=16, help="probe sequences per forward pass")
    p.add_argument("--grad_batch_size", type=int, default=8)
    p.add_argument("--max_gb", type=float, default=8.0, help="per-example gradients held at once")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="output folder (default conditions/<model name>)")
    return p.parse_args(argv)


def check_arguments(args):
    unknown = [c for c in args.conditions.split(",") if c not in CONDITIONS]
    if unknown:
        raise ValueError(f"--conditions: unknown {unknown}; choose from {CONDITIONS}")
    args.conditions = args.conditions.split(",")
    args.notes = measure.Notes()
    for key in ("seeds", "seq_len", "act_tokens", "grad_samples", "batch_size", "grad_batch_size", "ft_batch_size"):
        if getattr(args, key) <= 0:
            raise ValueError(f"--{key} must be positive")
    if args.act_tokens < 2 * args.seq_len or args.grad_samples < 2:
        raise ValueError("--act_tokens must hold two sequences and --grad_samples be at least 2 (the halves)")
    args.settings = study_settings(args)
    args.settings.check(names={k: f"--{k}" for k in ("seq_len", "head", "tail", "act_tokens", "grad_samples",
                                                      "grad_batch_size", "max_gb", "act_norm")}
                        | dict(act_batch_size="--batch_size"))


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        check_arguments(args)
        if args.out is None:
            args.out = os.path.join("conditions", model_name(args.model))
        results, n_layer, name = run_study(args)
    except (ValueError, ShardError, FileNotFoundError, RunFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    summary = aggregate(results)
    analyze.write_csv(os.path.join(args.out, "conditions.csv"), ["condition", "key", "mean", "std", "seeds"],
                      [[cond, key, *stats] for cond, by_key in summary.items() for key, stats in by_key.items()])
    print_table(summary, n_layer)
    write_plots(args.out, summary, n_layer, name, args)
    print(f"wrote {args.out}/conditions.csv, {args.out}/spectra/, {args.out}/plots/")
    return summary


if __name__ == "__main__":
    main()
