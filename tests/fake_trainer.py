"""Stands in for train_gpt.py in the sweep tests: the same command line, no torch. Its validation
loss follows a known curve, loss(t) = curve(lr, t) below (lr = muon_lr * lr_mult; muon_lr must be
given), written at every eval_every_tokens up to --stop_tokens (then a checkpoint) or the budget or
the first loss <= --target_val_loss. It refuses
to start over a run directory without --resume=1, continues from its checkpoint with it, and appends
each launch to $FAKE_LAUNCHES. Runs named in $FAKE_CRASH exit 3; in $FAKE_DIVERGE, report a
divergence as the trainer does."""
import json
import math
import os
import sys


def curve(lr, tokens):
    """A fast start for high rates, a low floor for rates near 0.01: crossings between rungs."""
    return 3.0 + 4.0 * (tokens / 1000) ** -(0.3 + 10 * lr) + 40 * math.log(lr / 0.01) ** 2 / 100


def main(argv):
    args = {}
    exec(open(argv[1]).read(), {}, args)  # the config file: plain assignments
    args.update(a[2:].split("=", 1) for a in argv[2:])
    args = {k: str(v) for k, v in args.items()}
    name, out = args["run_name"], args["out_dir"]
    lr = float(args["muon_lr"]) * float(args.get("lr_mult", 1))  # (the sweeps pass lr_scaling=none)
    every, budget = int(args["eval_every_tokens"]), int(args["train_tokens"])
    stop, target = int(args.get("stop_tokens", 0)) or budget, float(args.get("target_val_loss", 0))
    run_dir = os.path.join(out, name)
    ckpt_dir = os.path.join(run_dir, "ckpt")
    start = 0
    if os.path.isdir(run_dir):
        if args.get("resume") not in ("1", "True"):
            sys.exit(f"error: {run_dir} exists; --resume=1 continues it")
        saved = sorted(os.listdir(ckpt_dir)) if os.path.isdir(ckpt_dir) else []
        if not saved:
            sys.exit(f"error: --resume=1: no checkpoint in {run_dir}")
        start = json.load(open(os.path.join(ckpt_dir, saved[-1])))["tokens"]
    os.makedirs(ckpt_dir, exist_ok=True)
    with open(os.environ["FAKE_LAUNCHES"], "a") as f:
        f.write(json.dumps(dict(name=name, start=start, stop=stop, resume=args.get("resume") in ("1", "True"))) + "\n")
    if name in os.environ.get("FAKE_CRASH", "").split(","):
        sys.exit(3)
    if name in os.environ.get("FAKE_DIVERGE", "").split(","):
        print("error: training diverged at step 7: train_loss is nan", file=sys.stderr)
        sys.exit(1)
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        for t in range(start + every, stop + 1, every):
            loss = curve(lr, t)
            f.write(json.dumps(dict(step=t // every, tokens=t, val_loss=loss)) + "\n")
            if 0 < target and loss <= target:
                stop = t
                break
    with open(os.path.join(ckpt_dir, f"step_{stop // every:08d}.pt"), "w") as f:
        json.dump(dict(tokens=stop), f)


if __name__ == "__main__":
    main(sys.argv)
