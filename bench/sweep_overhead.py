"""
The learning-rate sweep's own cost, as ratios measured in one run of the CPU toy sweep (the
README's: configs/toy_modarith.py, 3 tiers x 5 rates, rungs at 131K and 393K tokens, budget 786K):

1. the driver (Optuna bookkeeping, launching, polling, reading metrics, the report): the sweep's
   wall time minus the time its trainer processes ran, over the time they ran (target < 2%);
2. pausing at rungs: the processes of one trial's segments, over the same trial trained in one
   process without pauses (what a sweep without checkpointed rungs would pay instead).

    python bench/sweep_overhead.py [--out /tmp/sweep_overhead] [--poll_s 1.0] [--quick]

--quick: one tier, two rates, short rungs (a minute, for trying the script; its ratio weighs the
fixed costs, Optuna's import and the report, against far less training).
"""

import argparse
import csv
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
from data import modarith  # noqa: E402

CONFIG = os.path.join(REPO, "configs", "toy_modarith.py")
SWEEP = ["--batch_sizes", "16,32,64", "--scalings", "sqrt", "--multipliers", "0.25,0.5,1,2,4", "--rungs",
         "131072,393216", "--budget", "786432", "--eta", "3", "--wandb_mode=disabled", "--spectra_plots=0"]
QUICK = ["--batch_sizes", "32", "--scalings", "sqrt", "--multipliers", "1,2", "--rungs", "131072,262144",
         "--budget", "393216", "--eta", "2", "--wandb_mode=disabled", "--spectra_plots=0"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "sweep_overhead"))
    p.add_argument("--poll_s", type=float, default=1.0)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    if not os.path.exists(os.path.join(REPO, "data", "modarith", "modarith.json")):
        modarith.write_dataset(modarith.ToyOptions(), os.path.join(REPO, "data", "modarith"))
    grid = QUICK if args.quick else SWEEP

    process_s = {}  # {trial log: wall time of each of its trainer processes, from launch to its end being seen}
    real_submit = sweep.Pool.submit

    def timed_submit(self, cmd, log_path, on_done):
        t0 = time.time()
        real_submit(self, cmd, log_path,
                    lambda code: (process_s.setdefault(log_path, []).append(time.time() - t0), on_done(code)))
    sweep.Pool.submit = timed_submit
    t0 = time.time()
    sweep.main(["lr", CONFIG, "--out", os.path.join(args.out, "sweep"), "--poll_s", str(args.poll_s), *grid])
    wall = time.time() - t0
    sweep.Pool.submit = real_submit

    # baseline: a trial that trained to the budget, in one process without pauses
    spec = json.load(open(os.path.join(args.out, "sweep", "sweep.json")))
    with open(os.path.join(args.out, "sweep", "sweep.csv")) as f:
        row = next(r for r in csv.DictReader(f) if r["state"] == "finished")
    bs, factor, first = int(row["batch_size"]), float(row["lr_factor"]), row["trial"]
    segments = process_s[os.path.join(args.out, "sweep", "logs", f"{first}.log")]
    total = sum(sum(v) for v in process_s.values())
    t1 = time.time()
    cmd = [sys.executable, os.path.join(REPO, "train_gpt.py"), *sweep.trial_args({**spec, "out": args.out}, bs, factor)]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    whole = time.time() - t1

    print(f"sweep wall {wall:.1f}s, its {sum(map(len, process_s.values()))} trainer processes {total:.1f}s")
    print(f"driver overhead: {(wall - total) / total:.2%} of the trials' process time (target < 2%)")
    print(f"pausing at rungs: {first} in {len(segments)} segments took {sum(segments):.1f}s, in one process "
          f"{whole:.1f}s: {sum(segments) / whole:.2f}x")

if __name__ == "__main__":
    main()
