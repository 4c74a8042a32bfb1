"""
A fair batch-size comparison of the CPU demo, then `analyze.py compare` and `analyze.py forecast`
on it: each batch size gets its own learning rate from a sweep, and is then trained to one target
loss, so runs are compared at equal loss after each had a fair rate.

    python bench/demo_sweep.py [--out runs/demo_sweep] [--batch_sizes 4,8,16,32] [--multipliers 0.25,1,4]
                               [--rung 4096] [--train_tokens 16384] [--eval_every_tokens 4096]
                               [--target_loss L] [--at_tokens T] [--key=value ...]

1. `sweep.py lr configs/cpu_demo.py` into OUT/sweep: per batch size, the demo's rates (for batch 8) x sqrt(B / 8)
   x each multiplier, every trial to the rung, the best third on to --train_tokens (the budget).
2. The target: the highest of the tiers' best final losses (each tier reached it with its chosen
   rate), printed and passed rounded up, never below the loss that defines it.
3. `sweep.py target` trains each tier's choice (one seed) to that loss, within twice the budget,
   into OUT/sweep/target/bs<B>_seed0.
4. compare and forecast on those runs, into OUT/analysis/{compare,forecast}/; the forecast reads its
   predictors at the first evaluation past a fifth of the budget where every run has gradient
   spectra (the demo measures them at every other evaluation).

Trials run in this process, one at a time (sweep.py --launcher inline). W&B is off; extra
--key=value arguments go to every run. The budget, rung and cadence must be multiples of every
run's tokens per step (batch x 128). The same command continues an interrupted sweep and reuses
finished runs. About 6 minutes on 2 CPU cores.
"""

import argparse
import csv
import os
import sys
import time
from decimal import ROUND_CEILING, Decimal

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import analyze  # noqa: E402
import sweep  # noqa: E402

DEMO = os.path.join(REPO, "configs", "cpu_demo.py")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("runs", "demo_sweep"))
    p.add_argument("--batch_sizes", default="4,8,16,32")
    p.add_argument("--multipliers", default="0.25,1,4", help="around each tier's sqrt-scaled rates")
    p.add_argument("--rung", type=int, default=4_096, help="tokens at which a tier's trials are compared")
    p.add_argument("--train_tokens", type=int, default=16_384, help="the sweep's budget")
    p.add_argument("--eval_every_tokens", type=int, default=4_096)
    p.add_argument("--grad_samples", type=int, default=24,
                   help="per-example gradient samples (24: head fits and RankMe only; 48 costs twice the time)")
    p.add_argument("--target_loss", type=float)
    p.add_argument("--at_tokens", type=float)
    return p.parse_known_args(argv)


def chosen_losses(folder, budget):
    """{batch size: its best trial's val loss at the budget}, from the sweep's sweep.csv."""
    best = {}
    with open(os.path.join(folder, "sweep.csv")) as f:
        for row in csv.DictReader(f):
            if int(row["tokens"]) == budget and row["state"] == "finished":
                bs, loss = int(row["batch_size"]), float(row["val_loss"])
                best[bs] = min(best.get(bs, loss), loss)
    return best


def threshold_text(value, places=4):
    """`value` printed with `places` decimals, rounded up: a target loss printed (and passed on) this
    way is never below the loss that defines it, so the run whose loss it is still reaches it.
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
    folder = os.path.join(out, "sweep")
    runs_args = ["--wandb_mode=disabled", "--spectra_plots=0", f"--eval_every_tokens={args.eval_every_tokens}",
                 f"--grad_samples={args.grad_samples}", *extra]
    t0 = time.time()
    lr = ["lr", DEMO, "--batch_sizes", args.batch_sizes, "--scalings", "sqrt", "--multipliers", args.multipliers,
          "--rungs", str(args.rung), "--budget", str(args.train_tokens), "--eta", "3", "--out", folder,
          "--launcher", "inline", *runs_args]
    print(f"$ python sweep.py {' '.join(lr)}", flush=True)
    sweep.main(lr)
    chosen = chosen_losses(folder, args.train_tokens)
    target = repr(args.target_loss) if args.target_loss is not None else threshold_text(max(chosen.values()))
    print(f"target: val_loss {target}, the highest of the tiers' chosen final losses "
          f"({', '.join(f'bs{bs} {loss:.4f}' for bs, loss in sorted(chosen.items()))})", flush=True)
    to_target = ["target", folder, "--seeds", "1", "--target_val_loss", target, "--launcher", "inline", *runs_args,
                 f"--train_tokens={2 * args.train_tokens}"]
    print(f"\n$ python sweep.py {' '.join(to_target)}", flush=True)
    sweep.main(to_target)
    t_train = time.time() - t0
    runs_dir = os.path.join(folder, "target")
    runs = analyze.load_runs([runs_dir])
    at = args.at_tokens if args.at_tokens is not None else choose_at_tokens(runs, args.train_tokens)
    where = os.path.join(out, "analysis")
    print(f"\n$ python analyze.py compare {runs_dir} --loss {target} --out {where}/compare", flush=True)
    analyze.main(["compare", runs_dir, "--loss", target, "--out", os.path.join(where, "compare")])
    print(f"\n$ python analyze.py forecast {runs_dir} --target-loss {target} --at-tokens {at:.0f} "
          f"--out {where}/forecast", flush=True)
    analyze.main(["forecast", runs_dir, "--target-loss", target, "--at-tokens", f"{at:.0f}",
                  "--out", os.path.join(where, "forecast")])
    print(f"\nsweep: {folder}; runs: {runs_dir}/; compare: {where}/compare/; forecast: {where}/forecast/")
    print(f"wall time: {time.time() - t0:.0f}s (sweep and training to target {t_train:.0f}s)")


if __name__ == "__main__":
    main()
