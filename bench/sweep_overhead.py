"""
The learning-rate sweep's own cost, as ratios measured in one run on the CPU demo model:

1. the driver (Optuna bookkeeping, launching, polling, reading metrics, the report): the sweep's
   wall time minus the time its trainer processes ran, over the time they ran (target < 2%);
2. pausing at rungs: the processes of one trial's segments, over the same trial trained in one
   process without pauses (what a sweep without checkpointed rungs would pay instead).

    python bench/sweep_overhead.py [--out /tmp/sweep_overhead] [--poll_s 1.0]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import sweep  # noqa: E402

TINY = ["--eval_every_tokens=1024", "--n_layer=2", "--n_head=2", "--n_embd=64", "--seq_len=64", "--val_tokens=2048",
        "--spectra_tokens=1024", "--grad_samples=8", "--wandb_mode=disabled", "--spectra_plots=0"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "sweep_overhead"))
    p.add_argument("--poll_s", type=float, default=1.0)
    args = p.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    config = os.path.join(REPO, "configs", "cpu_demo.py")

    process_s = []  # wall time of each trainer process the sweep ran, from launch to its end being seen
    real_submit = sweep.Pool.submit

    def timed_submit(self, cmd, log_path, on_done):
        t0 = time.time()
        real_submit(self, cmd, log_path, lambda code: (process_s.append(time.time() - t0), on_done(code)))
    sweep.Pool.submit = timed_submit
    t0 = time.time()
    sweep.main(["lr", config, "--batch_sizes", "8", "--scalings", "sqrt", "--multipliers", "1,2", "--rungs",
                "4096,8192", "--budget", "16384", "--out", os.path.join(args.out, "sweep"), "--poll_s",
                str(args.poll_s), *TINY])
    wall = time.time() - t0
    sweep.Pool.submit = real_submit

    # baseline: the first trial (it finishes: the first trial at a rung is always promoted) in one process
    spec = json.load(open(os.path.join(args.out, "sweep", "sweep.json")))
    factor = sweep.candidate_factors(8, spec["ref_batch_size"], ["sqrt"], [1])[0][0]
    first = sweep.trial_name(8, factor)
    segments = sum(1 for line in open(os.path.join(args.out, "sweep", "logs", f"{first}.log")) if line.startswith("$ "))
    t1 = time.time()
    cmd = [sys.executable, os.path.join(REPO, "train_gpt.py"), *sweep.trial_args({**spec, "out": args.out}, 8, factor)]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    whole = time.time() - t1

    print(f"sweep wall {wall:.1f}s, its {len(process_s)} trainer processes {sum(process_s):.1f}s")
    print(f"driver overhead: {(wall - sum(process_s)) / sum(process_s):.2%} of the trials' process time "
          f"(target < 2%)")
    print(f"pausing at rungs: {first} in {segments} segments took {sum(process_s[:segments]):.1f}s, in one process "
          f"{whole:.1f}s: {sum(process_s[:segments]) / whole:.2f}x")


if __name__ == "__main__":
    main()
