"""
The CPU study on the toy task: the ladder's stages that apply to it (baseline, rope, muon, untie,
value_mix, unet, window, attn_scale, each adding its change to the stages before, as in
configs/stages/), each at three batch sizes with its own learning rates from the sweep runner
(sweep.py lr), then trained to the target loss with three seeds (sweep.py target).

    python bench/toy_study.py [--out runs/toy_study] [--stages baseline,rope,...] [--seeds 3] [--workers 2] [--quick]

Per stage: OUT/configs/<stage>.py (configs/toy_modarith.py plus the stage's flags, plain
assignments), OUT/<stage>/ its sweep folder, OUT/<stage>/target/bs<B>_seed<S>/ the runs trained to
the target, the layout analyze.py reads (python analyze.py compare OUT/<stage>/target). Trials run
in this process (sweep.py --launcher inline: no start-up per segment). The same command continues
an interrupted study. --workers N: N processes of one thread each, the stages dealt out in turn
(on 2 cores two one-thread processes train this small model about 1.4x faster than one process on
two threads). --quick: a tiny model on tiny toy data, two stages, two tiers, one seed (the
test suite runs it).
"""

import argparse
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import sweep  # noqa: E402
import train_gpt  # noqa: E402
from data import modarith  # noqa: E402

TOY = os.path.join(REPO, "configs", "toy_modarith.py")
# the toy's own stages, in ladder order: the stage file each follows (its name is the runs' `stage`)
STAGES = dict(baseline="03_baseline", rope="04_rope", muon="05_muon", untie="06_untie", value_mix="07_value_mix",
              unet="08_unet", window="09_fixed_window", attn_scale="18_attn_scale")
# keys of a stage file that belong to its size, data and cadences, not to its change: the toy keeps its own
TOY_KEEPS = {"profile", "seq_len", "batch_size", "device_batch_size", "lr_ref_batch_size", "train_tokens",
             "target_val_loss", "eval_every_tokens", "ckpt_every_tokens", "grad_samples", "grad_spectra_every",
             "grad_spectra_precision", "doc_mask", "train_files", "val_files"}

# The baseline (AdamW, tied head, learned positions) is the slow end: at batch 32 its val loss at 393K
# tokens was 4.17, 4.20 and 4.56 at x8, x32 and x128 of its rate, and 3.56 after 3.1M tokens at
# batch 16; hence a grid up to x16 and a target it reaches. An evaluation (val loss, spectra, probes)
# costs about as much as training 32K tokens on one thread: evaluating every 32K tokens the study took
# 93 min on 2 cores; every 64K tokens (tokens to a loss interpolated between them) 60 min.
FULL = dict(batch_sizes="16,32,64", multipliers="1,4,16", rungs="131072", budget="393216", seeds=3,
            target=3.8, cap=3145728, extra=["--wandb_mode=disabled", "--spectra_plots=0", "--eval_every_tokens=65536"])
QUICK = dict(batch_sizes="8,16", multipliers="1,4", rungs="1024", budget="2048", seeds=1, target=4.3, cap=16384,
             extra=["--wandb_mode=disabled", "--spectra_plots=0", "--n_layer=2", "--n_head=2", "--n_embd=32",
                    "--seq_len=16", "--vocab_size=128", "--eval_every_tokens=512", "--val_tokens=1024",
                    "--spectra_tokens=512", "--grad_samples=8", "--log_every=8"])
QUICK_DATA = modarith.ToyOptions(vocab_size=128, seq_len=16, c_max=64, train_sequences=2048, val_sequences=128,
                                 test_sequences=0, band_sequences=32)


def stage_changes(stage_file):
    """{key: value} a stage file adds to the stage before (the keys its '# changes:' header names;
    every key for the first stage), without the keys the toy keeps."""
    values = train_gpt.read_config_file(stage_file)
    header = re.search(r"^# changes: (.*)$", open(stage_file).read(), re.M).group(1)
    keys = list(values) if header.startswith("(the first") else [k.strip() for k in header.split(",")]
    return {k: values[k] for k in keys if k not in TOY_KEEPS}


def stage_flags(name, seq_len):
    """The flags of toy stage `name`: the changes of every toy stage up to it, in order. The fixed
    window is a quarter of the toy's sequence (the study's 1,024 tokens would cover it whole)."""
    flags = {}
    for stage, file in STAGES.items():
        changes = stage_changes(os.path.join(REPO, "configs", "stages", f"{file}.py"))
        if changes.get("window"):  # the stages before the window stage keep full attention (window 0)
            changes["window"] = seq_len // 4
        flags.update(changes)
        if stage == name:
            return flags
    raise ValueError(f"unknown stage {name!r}; the toy's stages: {', '.join(STAGES)}")


def write_stage_config(name, folder, seq_len):
    """OUT/configs/<name>.py: the toy config, then the stage's flags as plain assignments."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.py")
    lines = [open(TOY).read().rstrip(), "", f"# toy stage {name}: the flags of configs/stages/ up to "
             f"{STAGES[name]}.py (bench/toy_study.py)"]
    lines += [f"{k} = {v!r}" for k, v in stage_flags(name, seq_len).items()] + [f"stage = {STAGES[name]!r}"]
    text = "\n".join(lines) + "\n"
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)
    return path


def run_workers(args, stages):
    """The study in args.workers processes of one thread each, stage i in process i mod workers, each
    writing its console to OUT/worker<k>.log; exits non-zero if any did."""
    os.makedirs(args.out, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = []
    for k in range(args.workers):
        mine = stages[k::args.workers]
        if mine:
            cmd = [sys.executable, os.path.abspath(__file__), "--out", args.out, "--stages", ",".join(mine),
                   "--seeds", str(args.seeds)] + (["--quick"] if args.quick else [])
            log = open(os.path.join(args.out, f"worker{k}.log"), "a")
            print(f"worker {k}: {', '.join(mine)} (log {log.name})", flush=True)
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    codes = [p.wait() for p in procs]
    if any(codes):
        sys.exit(f"error: worker exit codes {codes}; see {args.out}/worker*.log")
    print(f"runs: {args.out}/<stage>/target/")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(REPO, "runs", "toy_study"))
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--seeds", type=int, default=0, help="default 3 (1 with --quick)")
    p.add_argument("--workers", type=int, default=1, help="processes of one thread each (default 1)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    grid = QUICK if args.quick else FULL
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if args.quick and args.stages == ",".join(STAGES):
        stages = ["baseline", "muon"]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        sys.exit(f"error: --stages: unknown {', '.join(unknown)}; the toy's stages: {', '.join(STAGES)}")
    extra = list(grid["extra"])
    if args.quick:  # its own tiny data, beside the runs
        data = os.path.join(args.out, "data")
        if not os.path.exists(os.path.join(data, "modarith.json")):
            modarith.write_dataset(QUICK_DATA, data)
        extra += [f"--train_files={data}/modarith_train_*.bin", f"--val_files={data}/modarith_val_*.bin"]
    elif not os.path.exists(os.path.join(REPO, "data", "modarith", "modarith.json")):
        modarith.write_dataset(modarith.ToyOptions(), os.path.join(REPO, "data", "modarith"))
    if args.workers > 1:
        return run_workers(args, stages)
    seq_len = train_gpt.load_config([TOY, *extra]).seq_len
    for name in stages:
        config = write_stage_config(name, os.path.join(args.out, "configs"), seq_len)
        folder = os.path.join(args.out, name)
        print(f"== stage {name}: {os.path.relpath(config)}", flush=True)
        sweep.main(["lr", config, "--batch_sizes", grid["batch_sizes"], "--scalings", "sqrt", "--multipliers",
                    grid["multipliers"], "--rungs", grid["rungs"], "--budget", grid["budget"], "--eta", "3",
                    "--out", folder, "--launcher", "inline", *extra])
        failed = sweep.main(["target", folder, "--seeds", str(args.seeds or grid["seeds"]), "--target_val_loss",
                             str(grid["target"]), "--launcher", "inline", *extra, f"--train_tokens={grid['cap']}"])
        if failed:
            print(f"stage {name}: {', '.join(failed)} did not reach {grid['target']}", flush=True)
    print(f"runs: {args.out}/<stage>/target/ (python analyze.py compare {args.out}/<stage>/target)")


if __name__ == "__main__":
    main()
