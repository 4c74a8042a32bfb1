"""
Fair comparisons: a learning-rate sweep per batch tier, pruned by asynchronous successive halving,
then the chosen rates trained to a target loss.

    python sweep.py lr CONFIG.py --batch_sizes 128,256,512 [--rungs 50M,150M,500M] [--eta 3]
                    [--scalings sqrt,linear] [--multipliers 0.5,0.707,1,1.414,2] [--budget 1B]
                    [--out runs/sweeps/NAME] [--gpus_per_trial 1] [--parallel N]
                    [--launcher process|inline|slurm|submitit_local] [--key=value ...]
    python sweep.py target SWEEP [--seeds 3] [--target_val_loss L] [--key=value ...]

Candidates per tier: the config's rates (every optimizer group scaled together) times
(batch / lr_ref_batch_size)^p for each scaling (sqrt: p = 1/2, linear: p = 1) times each multiplier;
equal rates counted once. Every trial is an ordinary run of train_gpt.py in SWEEP/trials/, paused at
each rung (--stop_tokens) and continued from its own checkpoint (--resume=1) when promoted: at a rung
a trial goes on only if its validation loss there is among the best 1/eta of the trials of its tier
that reached that rung (Optuna's SuccessiveHalvingPruner, one study per tier in SWEEP/optuna.journal,
a file many processes can share). Trials that pass every rung train to the budget; a tier's choice is
its best final loss. Beside each rung's loss the sweep records the fit loss = a t^-b + c of the curve
so far, extrapolated to the budget.

The state is on disk: the same command continues an interrupted sweep, runs no finished trial again
and resumes interrupted ones from their checkpoints. Outputs: SWEEP/sweep.csv (one row per trial and
rung), SWEEP/sweep.png (val loss against learning rate per tier and rung), SWEEP/best_bs<B>.py (plain
assignments: the config with the chosen lr_mult and lr_scaling = "none"), SWEEP/logs/<trial>.log.
A pruned trial's checkpoints are deleted (it never continues); its metrics stay. Extra --key=value
arguments go to every trial. `target` trains each best config with --seeds seeds to target_val_loss into
SWEEP/target/bs<B>_seed<S>, the layout `analyze.py compare` and `forecast` read.
"""

import argparse
import contextlib
import csv
import hashlib
import json
import math
import os
import random
import runpy
import shutil
import subprocess
import sys
import time
import traceback

import numpy as np

import analyze
import plots
import rundir
import train_gpt
from data.shards import atomic_write

REPO = os.path.dirname(os.path.abspath(__file__))
RATE_KEYS = ("muon_lr", "embed_lr", "head_lr", "scalar_lr", "adamw_lr")  # scaled together by lr_mult
SCALING_POWERS = {"sqrt": 0.5, "linear": 1.0}


class SweepError(ValueError):
    """Bad input to a sweep, found before any trial starts."""


def parse_tokens(text):
    """'50M' -> 50_000_000; '1.5B', '512K', '4096' as well."""
    text = text.strip()
    scale = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}.get(text[-1:].upper(), 1)
    try:
        value = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise SweepError(f"{text!r} is not a token count (e.g. 50M, 1.5B, 4096)") from None
    if value != int(value) or value <= 0:
        raise SweepError(f"{text!r}: a token count must be a positive whole number")
    return int(value)


def parse_list(text, key, kind=float):
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SweepError(f"--{key}={text!r}: expected comma-separated numbers, e.g. --{key}=0.5,1,2") from None
    if not values:
        raise SweepError(f"--{key} is empty: give at least one value")
    return values


# ----------------------------------------------------------------------------------------------
# The grid and the trials


def candidate_factors(batch_size, ref_batch_size, scalings, multipliers):
    """[(factor, scaling, multiplier)]: the rate factors of one tier relative to the config's rates,
    in grid order, equal factors (to 1e-9) kept once (the first that gives it)."""
    seen, out = [], []
    for scaling in scalings:
        for m in multipliers:
            f = (batch_size / ref_batch_size) ** SCALING_POWERS[scaling] * m
            if not any(math.isclose(f, g, rel_tol=1e-9) for g in seen):
                seen.append(f)
                out.append((f, scaling, m))
    return out


def trial_name(batch_size, factor):
    return f"bs{batch_size}_lr{factor:.4g}"


def trial_args(spec, batch_size, factor, stop_tokens=0, resume=False):
    """The trainer's command-line arguments for one trial's segment (the config file first)."""
    args = [spec["config"], f"--batch_size={batch_size}", "--lr_scaling=none", f"--lr_mult={factor!r}",
            f"--train_tokens={spec['budget']}", f"--out_dir={os.path.join(spec['out'], 'trials')}",
            f"--run_name={trial_name(batch_size, factor)}", f"--wandb_group={spec['name']}", *spec["extra"],
            "--target_val_loss=0"]  # a trial trains to its rungs and budget; the target is `sweep.py target`'s
    if stop_tokens:
        args.append(f"--stop_tokens={stop_tokens}")
    if resume:
        args.append("--resume=1")
    return args


def make_spec(args, extra):
    """The sweep's definition (what sweep.json records), checked: every error before any trial starts."""
    if args.eta < 2:
        raise SweepError(f"--eta={args.eta}: successive halving keeps the best 1/eta; use eta >= 2 (e.g. 3)")
    scalings = [s.strip() for s in args.scalings.split(",") if s.strip()]
    bad = [s for s in scalings if s not in SCALING_POWERS]
    if bad or not scalings:
        raise SweepError(f"--scalings={args.scalings!r}: choose from {', '.join(SCALING_POWERS)} (e.g. sqrt,linear)")
    multipliers = parse_list(args.multipliers, "multipliers")
    if any(m <= 0 for m in multipliers):
        raise SweepError(f"--multipliers={args.multipliers!r}: multipliers must be > 0")
    batch_sizes = parse_list(args.batch_sizes, "batch_sizes", int)
    try:
        cfg = train_gpt.load_config([args.config, *extra])
    except train_gpt.ConfigError as e:
        raise SweepError(f"{args.config}: {e}") from None
    budget = parse_tokens(args.budget) if args.budget else cfg.train_tokens
    if budget <= 0:
        raise SweepError(f"{args.config} has no token budget (train_tokens=0): give --budget, e.g. --budget=1B")
    rungs = [parse_tokens(r) for r in args.rungs.split(",") if r.strip()]
    if not rungs:
        raise SweepError("--rungs is empty: give the token counts at which trials are compared, e.g. --rungs=50M,150M")
    if any(b <= a for a, b in zip(rungs, rungs[1:])):
        raise SweepError(f"--rungs={args.rungs}: rungs must increase")
    if rungs[-1] >= budget:
        raise SweepError(f"--rungs={args.rungs}: the last rung must be below the budget ({budget} tokens); lower it "
                         "or raise --budget")
    if cfg.eval_every_tokens <= 0 or any(r % cfg.eval_every_tokens for r in rungs):
        raise SweepError(f"--rungs={args.rungs}: every rung needs an evaluation, but eval_every_tokens="
                         f"{cfg.eval_every_tokens}; pass --eval_every_tokens=N with N dividing every rung")
    if args.gpus_per_trial > 0:
        for bs in batch_sizes:
            if bs % args.gpus_per_trial:
                raise SweepError(f"--batch_sizes: batch size {bs} does not divide over --gpus_per_trial="
                                 f"{args.gpus_per_trial} GPUs; choose sizes that are multiples of it")
    stem = os.path.splitext(os.path.basename(args.config))[0]
    out = os.path.abspath(args.out or os.path.join("runs", "sweeps", stem))
    spec = dict(name=os.path.basename(out), config=os.path.abspath(args.config),
                config_sha1=hashlib.sha1(open(args.config, "rb").read()).hexdigest(), extra=list(extra),
                rates={k: getattr(cfg, k) for k in RATE_KEYS}, ref_batch_size=cfg.lr_ref_batch_size,
                scalings=scalings, multipliers=multipliers, batch_sizes=batch_sizes, rungs=rungs, budget=budget,
                eta=args.eta, out=out)
    for bs in batch_sizes:  # each trial's own arguments resolve too (a batch the device batch cannot split, ...)
        for f, _, _ in candidate_factors(bs, spec["ref_batch_size"], scalings, multipliers):
            try:
                train_gpt.load_config(trial_args(spec, bs, f, stop_tokens=rungs[0]))
            except train_gpt.ConfigError as e:
                raise SweepError(f"trial {trial_name(bs, f)}: {e}") from None
    return spec


# What must match for a sweep folder to be continued rather than refused.
DEFINING = ("config", "config_sha1", "extra", "rates", "scalings", "multipliers", "batch_sizes", "rungs", "budget",
            "eta")


def open_sweep_folder(spec):
    """Create the folder and sweep.json, or check that an existing one was made by the same sweep."""
    path = os.path.join(spec["out"], "sweep.json")
    if os.path.exists(path):
        saved = json.load(open(path))
        differ = {k: (saved.get(k), spec[k]) for k in DEFINING if saved.get(k) != spec[k]}
        if differ:
            raise SweepError(f"{spec['out']} holds a sweep of another config or grid, {{key: (that sweep, now)}} = "
                             f"{differ}; choose another --out or delete it")
        return
    os.makedirs(os.path.join(spec["out"], "logs"), exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(spec, indent=1).encode()))


# ----------------------------------------------------------------------------------------------
# Reading a trial's curve, and the power-law fit


def val_curve(run_dir):
    """[(tokens, val_loss)] of a trial's evaluations so far (finite ones, as analyze reads them)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    return analyze.series(rundir.read_metrics(path)[0], "val_loss") if os.path.exists(path) else []


def fit_power_law(tokens, loss, n_grid=400):
    """(a, b, c) of loss = a t^-b + c by least squares: for each b the best (a, c) is linear; b is
    found on a log grid over [1e-3, 3], then refined by golden-section search around the best.
    None with fewer than 3 points with t > 0."""
    t, y = np.asarray(tokens, float), np.asarray(loss, float)
    keep = (t > 0) & np.isfinite(y)
    t, y = t[keep], y[keep]
    if len(t) < 3:
        return None

    def solve(b):
        X = np.stack([t ** -b, np.ones_like(t)], axis=1)
        coef, *_ = np.linalg.lstsq(X, y, rcond=None)
        return float(np.sum((X @ coef - y) ** 2)), coef

    grid = np.geomspace(1e-3, 3, n_grid)
    errors = [solve(b)[0] for b in grid]
    i = int(np.argmin(errors))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, n_grid - 1)]
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        m1, m2 = hi - golden * (hi - lo), lo + golden * (hi - lo)
        if solve(m1)[0] < solve(m2)[0]:
            hi = m2
        else:
            lo = m1
    b = (lo + hi) / 2
    a, c = solve(b)[1]
    return float(a), float(b), float(c)


def extrapolate(curve, budget):
    fit = fit_power_law(*zip(*curve)) if curve else None
    return fit[0] * budget ** -fit[1] + fit[2] if fit else float("nan")


def loss_at(curve, tokens):
    """The val loss of the first evaluation at or past `tokens` (a rung), or None."""
    return next((loss for t, loss in curve if t >= tokens), None)


# ----------------------------------------------------------------------------------------------
# Launching trials: a subprocess on this machine, or a SLURM job through submitit


def open_log(log_path, cmd):
    """The trial's log, opened to append this command's output under a `$ command` line."""
    log = open(log_path, "ab")
    log.write(f"\n$ {' '.join(cmd)}\n".encode())
    log.flush()
    return log


def run_logged(cmd, env, log_path):
    """Run cmd with its output appended to log_path; its return code. (What a SLURM job runs.)"""
    with open_log(log_path, cmd) as log:
        return subprocess.run(cmd, cwd=REPO, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT).returncode


class ProcessLauncher:
    """Trials as subprocesses, each on its own slice of the visible GPUs (CUDA_VISIBLE_DEVICES)."""

    def __init__(self, spec, gpus_per_trial, parallel):
        self.gpus_per_trial = gpus_per_trial
        self.free_slots = list(range(parallel))

    def start(self, cmd, log_path):
        slot = self.free_slots.pop(0)
        env = {}
        if self.gpus_per_trial:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(slot * self.gpus_per_trial + g)
                                                   for g in range(self.gpus_per_trial))
        log = open_log(log_path, cmd)
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
        return dict(proc=proc, slot=slot, log=log)

    def poll(self, handle):
        code = handle["proc"].poll()
        if code is not None:
            handle["log"].close()
            self.free_slots.append(handle["slot"])
        return code

    def wait(self, handle, seconds):
        """Return when the process ends or `seconds` pass: an end is seen at once, not at the next poll."""
        try:
            handle["proc"].wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            pass

    def stop(self, handle):
        handle["proc"].terminate()
        handle["proc"].wait()
        self.poll(handle)


class InlineLauncher:
    """Trials in this process, one at a time: the trainer script run as __main__ on the command's
    arguments, its output appended to the trial's log. No interpreter or torch start-up per segment
    (seconds each, which weigh on small CPU sweeps); one trial at a time, on this process's device."""

    def __init__(self, spec, gpus_per_trial, parallel):
        if parallel != 1 or gpus_per_trial > 1:
            raise SweepError("--launcher inline runs one trial at a time in this process: use --parallel 1 and "
                             "--gpus_per_trial 0 or 1")

    def start(self, cmd, log_path):
        open_log(log_path, cmd).close()
        argv, code = sys.argv, 0
        with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            try:
                sys.argv = list(cmd[1:])
                runpy.run_path(cmd[1], run_name="__main__")
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
            except Exception:  # a crash, as a subprocess's would end: its traceback in the log, exit 1
                traceback.print_exc()
                code = 1
            finally:
                sys.argv = argv
        return dict(code=code)

    def poll(self, handle):
        return handle["code"]

    def wait(self, handle, seconds):
        pass

    def stop(self, handle):
        pass


class SubmititLauncher:
    """Trials as SLURM jobs (or submitit's local executor, the same path on one machine)."""

    def __init__(self, spec, gpus_per_trial, parallel, cluster="slurm", slurm=()):
        import submitit
        self.executor = submitit.AutoExecutor(folder=os.path.join(spec["out"], "submitit"), cluster=cluster)
        params = dict(nodes=1, tasks_per_node=1, gpus_per_node=gpus_per_trial, timeout_min=24 * 60)
        for item in slurm:  # --slurm partition=gpu --slurm timeout_min=600 ...
            key, _, value = item.partition("=")
            params[key if key in ("timeout_min", "nodes", "cpus_per_task", "mem_gb") else f"slurm_{key}"] = \
                int(value) if value.isdigit() else value
        self.executor.update_parameters(**params)
        self.free_slots = list(range(parallel))

    def start(self, cmd, log_path):
        slot = self.free_slots.pop(0)
        return dict(job=self.executor.submit(run_logged, cmd, {}, log_path), slot=slot)

    def poll(self, handle):
        job = handle["job"]
        if not job.done():
            return None
        self.free_slots.append(handle["slot"])
        try:
            return job.result()
        except Exception:  # the job itself failed (node failure, timeout): its log says why
            return 1

    def wait(self, handle, seconds):
        time.sleep(seconds)

    def stop(self, handle):
        handle["job"].cancel()


def trainer_command(trainer, gpus_per_trial, args):
    if gpus_per_trial > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus_per_trial}",
                trainer, *args]
    return [sys.executable, trainer, *args]


class Pool:
    """Runs commands through a launcher, at most `parallel` at once; `on_done(code)` is called when
    one ends (and may submit more). Checks every `poll_s` seconds, and for local processes waits on
    the oldest, so that its end is seen at once."""

    def __init__(self, launcher, parallel, poll_s):
        self.launcher, self.parallel, self.poll_s, self.running = launcher, parallel, poll_s, []

    def has_room(self):
        return len(self.running) < self.parallel

    def submit(self, cmd, log_path, on_done):
        self.running.append((self.launcher.start(cmd, log_path), on_done))

    def wait_one(self):
        """Block until at least one command ends; run the callbacks of those that did."""
        while True:
            for item in list(self.running):
                code = self.launcher.poll(item[0])
                if code is not None:
                    self.running.remove(item)
                    item[1](code)
                    return
            self.launcher.wait(self.running[0][0], self.poll_s)

    def stop_all(self):
        for handle, _ in self.running:
            self.launcher.stop(handle)
        self.running = []


def make_launcher(args, spec):
    if args.launcher == "process":
        return ProcessLauncher(spec, args.gpus_per_trial, args.parallel)
    if args.launcher == "inline":
        return InlineLauncher(spec, args.gpus_per_trial, args.parallel)
    cluster = "slurm" if args.launcher == "slurm" else "local"
    return SubmititLauncher(spec, args.gpus_per_trial, args.parallel, cluster=cluster, slurm=args.slurm)


def log_tail(path, n=4000):
    if not os.path.exists(path):
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - n))
        return f.read().decode(errors="replace")


class DriverLock:
    """One driver process per sweep folder: SWEEP/driver.lock holds its host and pid."""

    def __init__(self, folder):
        self.path = os.path.join(folder, "driver.lock")

    def __enter__(self):
        import socket
        host = socket.gethostname()
        if os.path.exists(self.path):
            other = json.load(open(self.path))
            if other["host"] != host or rundir.process_alive(other["pid"]):
                where = f"pid {other['pid']} on {other['host']}"
                raise SweepError(f"{os.path.dirname(self.path)} is being run by another sweep process ({where}); "
                                 f"wait for it, or delete {self.path} if that process is gone")
        atomic_write(self.path, lambda f: f.write(json.dumps(dict(host=host, pid=os.getpid())).encode()))
        return self

    def __exit__(self, *exc):
        os.remove(self.path)


# ----------------------------------------------------------------------------------------------
# sweep.py lr: successive halving with Optuna


def start_order(batch_size, candidates):
    """The order in which a tier's candidates start: shuffled, by a fixed seed per tier. Successive
    halving compares each trial with those that reached its rung before it, so in grid order (rates
    rising towards the best) every trial would beat its predecessors and be promoted."""
    order = list(candidates)
    random.Random(batch_size).shuffle(order)
    return order


def open_studies(spec):
    """{batch_size: optuna study} sharing SWEEP/optuna.journal, each tier's candidates enqueued once."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(os.path.join(spec["out"], "optuna.journal")))
    studies = {}
    for bs in spec["batch_sizes"]:
        # step k of a trial's reports is rung k's eta^k, so the pruner's rung promotion steps
        # (min_resource * eta^rung) are exactly our rungs
        pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=spec["eta"],
                                                        min_early_stopping_rate=0, bootstrap_count=0)
        study = optuna.create_study(study_name=f"bs{bs}", storage=storage, direction="minimize", pruner=pruner,
                                    load_if_exists=True)
        for f, scaling, m in start_order(bs, candidate_factors(bs, spec["ref_batch_size"], spec["scalings"],
                                                                 spec["multipliers"])):
            study.enqueue_trial({"lr_factor": f}, user_attrs=dict(name=trial_name(bs, f), scaling=scaling,
                                                                  multiplier=m), skip_if_exists=True)
        studies[bs] = study
    return studies


class Sweep:
    """The asynchronous loop: start trials while there is room, and at the end of each segment report
    its rung loss, ask the pruner, and continue, stop or finish the trial."""

    def __init__(self, spec, studies, pool, trainer, gpus_per_trial):
        self.spec, self.studies, self.pool, self.trainer, self.gpus = spec, studies, pool, trainer, gpus_per_trial
        self.t0, self.tokens_done = time.time(), 0
        self.pending, self.promoted = [], []

    def trial_dir(self, name):
        return os.path.join(self.spec["out"], "trials", name)

    def next_trial(self):
        """(batch_size, optuna trial): an interrupted trial first, then the next waiting candidate,
        tiers in order, then the promoted trials, first promoted first; None when none is left.
        Breadth first: a promoted trial continues once every candidate has started, so that the
        later decisions at each rung compare more trials (as many workers at once would)."""
        from optuna.trial import TrialState
        if self.pending:
            return self.pending.pop(0)
        for bs, study in self.studies.items():
            if study.get_trials(deepcopy=False, states=[TrialState.WAITING]):
                trial = study.ask()  # the next enqueued candidate (Optuna hands each to one process only)
                choices = [f for f, _, _ in candidate_factors(bs, self.spec["ref_batch_size"], self.spec["scalings"],
                                                              self.spec["multipliers"])]
                trial.suggest_categorical("lr_factor", choices)
                return bs, trial
        return self.promoted.pop(0) if self.promoted else None

    def interrupted(self):
        """Trials an interrupted driver left running: [(batch_size, trial)], to continue."""
        import optuna
        from optuna.trial import TrialState
        # (Optuna has no public call that hands back a running trial: its Trial class, built as its own
        # ask() builds it, from the study and the trial's id)
        return [(bs, optuna.trial.Trial(study, t._trial_id)) for bs, study in self.studies.items()
                for t in study.get_trials(deepcopy=False, states=[TrialState.RUNNING])]

    def frozen(self, bs, trial):
        """The trial as stored now: its reports and attributes."""
        return next(t for t in self.studies[bs].get_trials(deepcopy=False) if t.number == trial.number)

    def launch(self, bs, trial):
        """Start the trial's next segment: to the next rung it has not reported, or to the budget."""
        frozen = self.frozen(bs, trial)
        k = len(frozen.intermediate_values)
        rungs = self.spec["rungs"]
        name, factor = frozen.user_attrs["name"], frozen.params["lr_factor"]
        run_dir = self.trial_dir(name)
        resume = bool(rundir.checkpoints(run_dir)) if os.path.isdir(run_dir) else False
        if os.path.isdir(run_dir) and not resume:  # killed before its first checkpoint: nothing to keep
            shutil.rmtree(run_dir)
        args = trial_args(self.spec, bs, factor, stop_tokens=rungs[k] if k < len(rungs) else 0, resume=resume)
        log = os.path.join(self.spec["out"], "logs", f"{name}.log")
        self.pool.submit(trainer_command(self.trainer, self.gpus, args), log,
                         lambda code: self.segment_done(bs, trial, k, code, log))

    def segment_done(self, bs, trial, k, code, log):
        from optuna.trial import TrialState
        study, rungs = self.studies[bs], self.spec["rungs"]
        name = trial.user_attrs["name"]
        curve = val_curve(self.trial_dir(name))
        if code != 0:
            diverged = "training diverged" in log_tail(log)
            trial.set_user_attr("status", "diverged" if diverged else "crashed")
            trial.set_user_attr("log", log)
            study.tell(trial, state=TrialState.PRUNED if diverged else TrialState.FAIL)
            self.progress(bs, f"{name} {'diverged (pruned)' if diverged else 'crashed'}: see {log}")
            return
        target = rungs[k] if k < len(rungs) else self.spec["budget"]
        self.tokens_done += target - (rungs[k - 1] if k else 0)
        loss = loss_at(curve, target) if k < len(rungs) else (curve[-1][1] if curve else None)
        if loss is None or not math.isfinite(loss):
            status = "no evaluation at the rung" if loss is None else "diverged"
            trial.set_user_attr("status", status)
            study.tell(trial, state=TrialState.FAIL if loss is None else TrialState.PRUNED)
            self.progress(bs, f"{name}: {status}")
            return
        if k == len(rungs):
            trial.set_user_attr("status", "finished")
            study.tell(trial, loss)
            self.progress(bs, f"{name} finished: val_loss {loss:.4f}")
            return
        trial.set_user_attr(f"fit_{k}", extrapolate(curve, self.spec["budget"]))
        trial.report(loss, step=self.spec["eta"] ** k)
        if trial.should_prune():
            trial.set_user_attr("status", f"pruned at rung {k}")
            study.tell(trial, state=TrialState.PRUNED)
            # it never continues: its checkpoints only take disk
            shutil.rmtree(os.path.join(self.trial_dir(name), "ckpt"), ignore_errors=True)
            self.progress(bs, f"{name} pruned at {plots.token_label(target)} tokens (val_loss {loss:.4f})")
            return
        self.promoted.append((bs, trial))  # to continue from its own checkpoint (next_trial)
        self.progress(bs, f"{name} promoted at {plots.token_label(target)} tokens (val_loss {loss:.4f})")

    def progress(self, bs, event):
        from optuna.trial import TrialState
        trials = self.studies[bs].get_trials(deepcopy=False)
        count = {s: sum(t.state == s for t in trials) for s in TrialState}
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        best = min(done, key=lambda t: t.value) if done else None
        best_text = f"best lr x{best.params['lr_factor']:.4g} val {best.value:.4f}" if best else "best: none finished"
        waiting = sum(len(s.get_trials(deepcopy=False, states=[TrialState.WAITING])) for s in self.studies.values())
        # a lower bound on the time left: the first rung of every waiting candidate and the next segment of
        # every promoted trial, at the token rate so far (running segments and later promotions not counted)
        marks = [0, *self.spec["rungs"], self.spec["budget"]]
        left = waiting * marks[1] + sum(marks[len(t.intermediate_values) + 1] - marks[len(t.intermediate_values)]
                                        for b, t in self.promoted for t in [self.frozen(b, t)])
        rate = self.tokens_done / max(time.time() - self.t0, 1e-9)
        eta = f"eta >= {train_gpt.duration(left / rate)}" if rate > 0 else "eta ?"
        queued = sum(b == bs for b, _ in self.promoted)  # promoted, to continue once every candidate has started
        print(f"[bs{bs}] {event} | running {count[TrialState.RUNNING] - queued}, promoted {queued}, pruned "
              f"{count[TrialState.PRUNED]}, finished "
              f"{count[TrialState.COMPLETE]}, failed {count[TrialState.FAIL]}, waiting {count[TrialState.WAITING]} | "
              f"{best_text} | {eta}", flush=True)

    def run(self):
        self.pending = self.interrupted()
        for _, trial in self.pending:
            print(f"continuing interrupted trial {trial.user_attrs['name']}", flush=True)
        try:
            while True:
                while self.pool.has_room():
                    nxt = self.next_trial()
                    if nxt is None:
                        break
                    self.launch(*nxt)
                if not self.pool.running:
                    return
                self.pool.wait_one()
        except BaseException:
            self.pool.stop_all()  # no trainer outlives the driver; the trials stay RUNNING, to be continued
            raise


def trial_rows(spec, studies):
    """One row per trial and rung (and one for its final loss): what sweep.csv and the table hold."""
    from optuna.trial import TrialState
    rows = []
    for bs, study in studies.items():
        for t in study.get_trials(deepcopy=False):
            if "lr_factor" not in t.params:
                continue  # a candidate not started yet
            f = t.params["lr_factor"]
            base = dict(batch_size=bs, trial=t.user_attrs["name"], lr_factor=f, scaling=t.user_attrs["scaling"],
                        multiplier=t.user_attrs["multiplier"], **{k: spec["rates"][k] * f for k in RATE_KEYS},
                        state=t.user_attrs.get("status", t.state.name.lower()))
            for k, rung in enumerate(spec["rungs"]):
                loss = t.intermediate_values.get(spec["eta"] ** k)
                if loss is not None:
                    rows.append(dict(base, tokens=rung, val_loss=loss, fit_at_budget=t.user_attrs.get(f"fit_{k}")))
            if t.state == TrialState.COMPLETE:  # (a pruned trial's value is only its last rung's loss)
                rows.append(dict(base, tokens=spec["budget"], val_loss=t.value, fit_at_budget=None))
    return rows


def best_trials(studies):
    """{batch_size: the finished trial with the lowest final val loss}."""
    from optuna.trial import TrialState
    best = {}
    for bs, study in studies.items():
        done = study.get_trials(deepcopy=False, states=[TrialState.COMPLETE])
        if done:
            best[bs] = min(done, key=lambda t: t.value)
    return best


def write_best_config(spec, bs, trial, path):
    """The config with the tier's chosen rates, as plain assignments that import nothing; it loads
    as a config (train_gpt.load_config([path]))."""
    cfg = train_gpt.load_config(trial_args(spec, bs, trial.params["lr_factor"]))
    cfg.target_val_loss = train_gpt.load_config([spec["config"], *spec["extra"]]).target_val_loss  # the config's own
    keys = list(train_gpt.read_config_file(spec["config"]))
    keys += [k for k, _ in train_gpt.command_line_pairs(spec["extra"]) if k not in keys]
    keys += [k for k in ("batch_size", "lr_scaling", "lr_mult", "train_tokens", "target_val_loss") if k not in keys]
    factor = trial.params["lr_factor"]
    lines = [f"# Chosen by `python sweep.py lr` in {spec['out']}: batch {bs}, rates x{factor:.6g} of",
             f"# {os.path.basename(spec['config'])}'s (final val_loss {trial.value:.6g} at {spec['budget']} tokens).",
             f"# Train to target: python sweep.py target {spec['out']}"]
    for k in keys:
        if k in ("out_dir", "run_name", "wandb_group", "stop_tokens", "resume"):
            continue
        value = getattr(cfg, k) if k in train_gpt.TRAIN_KEYS else cfg.model[k]
        lines.append(f"{k} = {value!r}")
    atomic_write(path, lambda f: f.write(("\n".join(lines) + "\n").encode()))


def report(spec, studies):
    """sweep.csv, the table on the console, sweep.png and best_bs<B>.py; returns the rows."""
    rows = trial_rows(spec, studies)
    if not rows:
        print("no trial has reached a rung yet")
        return rows
    fields = list(rows[0])
    with open(os.path.join(spec["out"], "sweep.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"{'trial':<22} {'tokens':>8} {'val_loss':>9} {'fit@budget':>10}  state")
    for r in rows:
        fit = r["fit_at_budget"]
        print(f"{r['trial']:<22} {plots.token_label(r['tokens']):>8} {r['val_loss']:9.4f} "
              f"{'' if fit is None or not math.isfinite(fit) else f'{fit:.4f}':>10}  {r['state']}")
    panels = []
    for bs in spec["batch_sizes"]:
        series = []
        for tokens in [*spec["rungs"], spec["budget"]]:
            pts = sorted((r["lr_factor"], r["val_loss"]) for r in rows
                         if r["batch_size"] == bs and r["tokens"] == tokens)
            if pts:
                series.append(plots.Series(f"{plots.token_label(tokens)} tokens", *zip(*pts)))
        panels.append(plots.Panel(f"batch {bs}", series, "learning rate (x the config's rates)", "val loss", logx=True))
    plots.draw(os.path.join(spec["out"], "sweep.png"), panels, title=f"sweep {spec['name']}: val loss by rung")
    for bs, trial in best_trials(studies).items():
        path = os.path.join(spec["out"], f"best_bs{bs}.py")
        write_best_config(spec, bs, trial, path)
        print(f"batch {bs}: rates x{trial.params['lr_factor']:.4g} (val_loss {trial.value:.4f}) -> {path}")
    return rows


def sweep_lr(args, extra):
    spec = make_spec(args, extra)
    open_sweep_folder(spec)
    with DriverLock(spec["out"]):
        studies = open_studies(spec)
        pool = Pool(make_launcher(args, spec), args.parallel, args.poll_s)
        Sweep(spec, studies, pool, args.trainer, args.gpus_per_trial).run()
        report(spec, studies)
    return spec


# ----------------------------------------------------------------------------------------------
# sweep.py target: the chosen configs trained to the target loss


def reached(run_dir, target):
    return any(loss <= target for _, loss in val_curve(run_dir))


def sweep_target(args, extra):
    folder = os.path.abspath(args.sweep)
    if not os.path.exists(os.path.join(folder, "sweep.json")):
        raise SweepError(f"{folder} is not a sweep folder (no sweep.json); run `python sweep.py lr CONFIG` first")
    spec = json.load(open(os.path.join(folder, "sweep.json")))
    bests = [(bs, os.path.join(folder, f"best_bs{bs}.py")) for bs in spec["batch_sizes"]]
    missing = [p for _, p in bests if not os.path.exists(p)]
    if missing:
        raise SweepError(f"no chosen rates yet for {', '.join(map(os.path.basename, missing))}: finish the sweep "
                         f"(python sweep.py lr {os.path.relpath(spec['config'])} --out {folder} ...) first")
    cfg = train_gpt.load_config([bests[0][1], *extra])
    target = args.target_val_loss or cfg.target_val_loss
    if target <= 0:
        raise SweepError(f"no target: {os.path.basename(bests[0][1])} has target_val_loss=0; pass --target_val_loss=L")
    if args.seeds < 1:
        raise SweepError(f"--seeds={args.seeds}: train at least one seed")
    out = os.path.join(folder, "target")
    jobs = []
    for bs, best in bests:
        for i in range(args.seeds):
            name = f"bs{bs}_seed{i}"
            run_dir = os.path.join(out, name)
            if reached(run_dir, target):
                print(f"{name} reached {target} already")
                continue
            resume = os.path.isdir(run_dir) and bool(rundir.checkpoints(run_dir))
            if os.path.isdir(run_dir) and not resume:  # stopped before its first checkpoint: nothing to keep
                shutil.rmtree(run_dir)
            jobs.append((name, [best, f"--seed={cfg.seed + i}", f"--target_val_loss={target!r}", f"--out_dir={out}",
                                f"--run_name={name}", f"--wandb_group={spec['name']}-target",
                                *(["--resume=1"] if resume else []), *extra]))
    with DriverLock(folder):
        pool, failed = Pool(make_launcher(args, spec), args.parallel, args.poll_s), []

        def done(name, log):
            def on_done(code):
                if code == 0 and not reached(os.path.join(out, name), target):
                    code = "budget"
                print(f"{name}: " + {0: f"reached {target!r}", "budget": f"trained its whole budget without "
                                     f"reaching {target!r}; raise train_tokens in its best_bs*.py"}.get(
                                         code, f"failed (exit {code}), see {log}"), flush=True)
                if code:
                    failed.append(name)
            return on_done
        for name, job_args in jobs:
            while not pool.has_room():
                pool.wait_one()
            log = os.path.join(folder, "logs", f"target_{name}.log")
            pool.submit(trainer_command(args.trainer, args.gpus_per_trial, job_args), log, done(name, log))
        while pool.running:
            pool.wait_one()
    print(f"runs: {out}/ (python analyze.py compare {out}/*; python analyze.py forecast {out}/* "
          f"--target-loss {target!r})")
    return failed


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    lr = sub.add_parser("lr", help="learning-rate sweep per batch tier with successive halving")
    lr.add_argument("config")
    lr.add_argument("--batch_sizes", required=True, help="comma-separated tiers, e.g. 128,256,512")
    lr.add_argument("--scalings", default="sqrt,linear", help="centres: batch scalings of the config's rates")
    lr.add_argument("--multipliers", default="0.5,0.707,1,1.414,2", help="around each centre")
    lr.add_argument("--rungs", default="50M,150M,500M", help="token counts at which trials are compared")
    lr.add_argument("--eta", type=int, default=3, help="keep the best 1/eta of the trials at each rung")
    lr.add_argument("--budget", default="", help="tokens a promoted trial trains to (default: train_tokens)")
    lr.add_argument("--out", default="", help="sweep folder (default runs/sweeps/<config name>)")
    target = sub.add_parser("target", help="train the chosen configs to the target loss, several seeds")
    target.add_argument("sweep")
    target.add_argument("--seeds", type=int, default=3)
    target.add_argument("--target_val_loss", type=float, default=0.0, help="default: the config's")
    for q in (lr, target):
        q.add_argument("--gpus_per_trial", type=int, default=0, help="0: CPU or one device without torchrun")
        q.add_argument("--parallel", type=int, default=1, help="trials side by side (GPUs / gpus_per_trial)")
        q.add_argument("--launcher", default="process", choices=["process", "inline", "slurm", "submitit_local"],
                       help="process: a subprocess per segment; inline: in this process, one at a time (small CPU "
                            "sweeps); slurm: a job per segment through submitit")
        q.add_argument("--slurm", action="append", default=[], help="a SLURM setting, e.g. partition=gpu (repeatable)")
        q.add_argument("--poll_s", type=float, default=1.0, help="seconds between checks on running trials")
        q.add_argument("--trainer", default=os.path.join(REPO, "train_gpt.py"), help=argparse.SUPPRESS)
    return p.parse_known_args(argv)


def main(argv=None):
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.parallel < 1 or args.gpus_per_trial < 0:
            raise SweepError("--parallel must be >= 1 and --gpus_per_trial >= 0")
        if args.command == "lr":
            return sweep_lr(args, extra)
        return sweep_target(args, extra)
    except (SweepError, train_gpt.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
