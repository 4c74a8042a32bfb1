"""
A batch-size sweep of the CPU demo, then `analyze.py compare` and `analyze.py forecast` on it.

    python bench/demo_sweep.py [--out runs/demo_sweep] [--batch_sizes 4,8,16,32] [--train_tokens 32768]
                               [--eval_every_tokens 4096] [--target_loss L] [--at_tokens T] [--key=value ...]

Each batch size trains configs/cpu_demo.py for --train_tokens tokens (the same token budget, so
smaller batches take more steps) with W&B disabled, into OUT/bs<B>; a finished run directory that
already exists with the same settings is reused, not retrained (one with other settings, or
unfinished, is an error that names it). Extra --key=value arguments go to every training run. The budget
and the evaluation cadence are multiples of every run's tokens per step (batch x 128), so all runs
evaluate at the same token counts.

Then, unless given: the target loss is the second-highest final val_loss of the sweep (every run
but the slowest reaches it, and that one gets a forecast), and the forecast reads its predictors
at the first evaluation past a fifth of the budget where every run has gradient spectra (the
demo measures them at every other evaluation; the one at 0 tokens has none for the zero-initialised
attention projections). Outputs: OUT/analysis/{compare,forecast}/. About 5 minutes on 2 CPU cores.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from decimal import ROUND_CEILING, Decimal

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import analyze  # noqa: E402
import rundir  # noqa: E402
import train_gpt  # noqa: E402

DEMO = os.path.join(REPO, "configs", "cpu_demo.py")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("runs", "demo_sweep"))
    p.add_argument("--batch_sizes", default="4,8,16,32")
    p.add_argument("--train_tokens", type=int, default=32_768)
    p.add_argument("--eval_every_tokens", type=int, default=4_096)
    p.add_argument("--grad_samples", type=int, default=24,
                   help="per-example gradient samples (24: head fits and RankMe only; 48 costs twice the time)")
    p.add_argument("--target_loss", type=float)
    p.add_argument("--at_tokens", type=float)
    return p.parse_known_args(argv)


def check_reusable(run_dir, config_args):
    """Exit with a message unless run_dir was trained to the end with the settings config_args resolve to."""
    saved = rundir.RunRecord.load(run_dir)
    try:
        wanted = json.loads(json.dumps(asdict(train_gpt.load_config(config_args))))  # tuples as JSON lists
    except train_gpt.ConfigError as e:
        sys.exit(f"error: {e}")
    defaults = json.loads(json.dumps(asdict(train_gpt.Config())))  # keys added since that run: their defaults
    resolved = ("out_dir", "run_name", "config_file", "device_batch_size")  # paths; filled in by the trainer
    differ = {k: (saved.config.get(k, defaults[k]), v) for k, v in wanted.items()
              if k not in resolved and saved.config.get(k, defaults[k]) != v}
    if differ:
        sys.exit(f"{run_dir} was trained with other settings, {{key: (that run, requested)}} = {differ}; delete it "
                 "or choose another --out")
    records, _ = analyze.read_records(os.path.join(run_dir, "metrics.jsonl"))
    last, total = max((r.get("step", 0) for r in records), default=0), saved.derived["total_steps"]
    if last < total:
        sys.exit(f"{run_dir} stopped at step {last} of {total}; delete it to train it again")


def train(out, bs, args, extra):
    """Train one run (or reuse it); returns its directory."""
    run_dir = os.path.join(out, f"bs{bs}")
    config_args = [DEMO, f"--batch_size={bs}", "--device_batch_size=0", f"--train_tokens={args.train_tokens}",
                   f"--eval_every_tokens={args.eval_every_tokens}", f"--grad_samples={args.grad_samples}",
                   f"--out_dir={out}", f"--run_name=bs{bs}", "--wandb_mode=disabled", "--spectra_plots=0",
                   "--ckpt_every_tokens=-1", *extra]
    if analyze.is_run_dir(run_dir):
        check_reusable(run_dir, config_args)
        print(f"reusing {run_dir}")
        return run_dir
    t0 = time.time()
    print(f"training batch size {bs}: train_gpt.py {' '.join(config_args)}", flush=True)
    code, stdout, stderr = run_trainer(config_args)
    if code:
        sys.exit(f"training bs{bs} failed:\n{stderr[-3000:]}")
    last = [line for line in stdout.splitlines() if "val_loss" in line][-1]
    print(f"  {time.time() - t0:.0f}s, {last.strip()}", flush=True)
    return run_dir


def run_trainer(config_args):
    """`python train_gpt.py config_args` in a fresh process: (returncode, stdout, stderr)."""
    cmd = [sys.executable, os.path.join(REPO, "train_gpt.py"), *config_args]
    # large allocations on transparent huge pages: about twice as fast on CPU (see the Makefile)
    env = {**os.environ, "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    return result.returncode, result.stdout, result.stderr


def choose_target(runs):
    """The second-highest final val_loss: all runs but the slowest reach it."""
    finals = sorted((analyze.final_loss(r.records) for r in runs), reverse=True)
    return finals[1] if len(finals) > 2 else finals[0]


def threshold_text(value, places=4):
    """`value` printed with `places` decimals, rounded up: a target loss printed (and passed on) this
    way is never below the loss that defines it, so the run whose final loss it is still reaches it.
    Decimal(value) is the float's exact value; the float nearest the text is then >= value too."""
    return str(Decimal(value).quantize(Decimal(1).scaleb(-places), rounding=ROUND_CEILING))


def choose_at_tokens(runs, budget):
    """The first token count past budget / 5 at which every run has finite gradient spectra."""
    def grad_tokens(run):
        return {t for t, _ in analyze.series(run.records, "grad/alpha_head/" + grad_point(run))}
    common = sorted(set.intersection(*(grad_tokens(r) for r in runs)))
    later = [t for t in common if t >= budget / 5]
    return (later or common or [budget / 4])[0]


def grad_point(run):
    """A gradient matrix the run measured (the first in its records)."""
    keys = sorted(k for r in run.records for k in r if k.startswith("grad/alpha_head/"))
    return keys[0].split("/", 2)[2] if keys else ""


def main(argv=None):
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    out = os.path.abspath(args.out)
    t0 = time.time()
    dirs = [train(out, int(bs), args, extra) for bs in args.batch_sizes.split(",")]
    t_train = time.time() - t0
    runs = analyze.load_runs(dirs)
    target = repr(args.target_loss) if args.target_loss is not None else threshold_text(choose_target(runs))
    at = args.at_tokens if args.at_tokens is not None else choose_at_tokens(runs, args.train_tokens)
    where = os.path.join(out, "analysis")
    print(f"\n$ python analyze.py compare {out}/bs* --out {where}/compare", flush=True)
    analyze.main(["compare", *dirs, "--out", os.path.join(where, "compare")])
    print(f"\n$ python analyze.py forecast {out}/bs* --target-loss {target} --at-tokens {at:.0f} "
          f"--out {where}/forecast", flush=True)
    analyze.main(["forecast", *dirs, "--target-loss", target, "--at-tokens", f"{at:.0f}",
                  "--out", os.path.join(where, "forecast")])
    print(f"\nruns: {out}/bs*; compare: {where}/compare/; forecast: {where}/forecast/")
    print(f"wall time: {time.time() - t0:.0f}s (training and spectra {t_train:.0f}s)")


if __name__ == "__main__":
    main()
