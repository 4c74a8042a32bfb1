import json
import os
import subprocess
import sys
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

DEMO = os.path.join(REPO, "configs", "cpu_demo.py")


def tiny_args(out_dir, **overrides):
    """Command-line arguments for a seconds-long run on the embedded corpus."""
    args = dict(out_dir=str(out_dir), wandb_mode="disabled", n_layer=2, n_head=2, n_embd=64, seq_len=32,
                batch_size=4, device_batch_size=4, train_tokens=0, max_steps=12, log_every=2,
                eval_every_tokens=512, val_tokens=512, ckpt_every_tokens=0, run_name="tiny",
                spectra_tokens=512, spectra_batch_size=4, spectra_plots=0, grad_samples=8, grad_batch_size=4)
    args.update(overrides)
    return [DEMO] + [f"--{k}={v}" for k, v in args.items()]


def run_command(main, args, capsys):
    """A command's main(args) in this process, ending as its `python X.py args` would: returncode,
    stdout, stderr (sys.exit("message") prints the message to stderr and exits 1). The same code
    as the subprocess without the interpreter's and torch's start, a few seconds each; one test per
    command still runs it as a subprocess."""
    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    out, err = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


def crash_in_step(monkeypatch, args, n):
    """Run train_gpt on `args` until the loader is asked for step n's batch, then raise as a crash would."""
    import train_gpt
    real_next_step, calls = train_gpt.TrainLoader.next_step, []

    def crashing(self, grad_accum):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt("simulated crash")
        return real_next_step(self, grad_accum)
    monkeypatch.setattr(train_gpt.TrainLoader, "next_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        train_gpt.train(train_gpt.load_config(args))
    monkeypatch.setattr(train_gpt.TrainLoader, "next_step", real_next_step)


# Worker processes start with OMP_NUM_THREADS=1 (torchrun_worker, the trainer's DDP test; torchrun's
# default too). MKL's fp32 products may round differently with the thread count (on AVX2: 5-11 rows
# against the 50304-wide head), so a 1-process reference in this process, which has one thread per
# core, runs in `worker_threads()`: the same arithmetic, and 1 and N processes agree to fp64
# round-off (1e-10), whatever the machine and its load. Across thread counts the spectra agree to
# FP32_ORDER_BOUND of lambda_1 / sigma_1 (the tests of that bound are in test_spectra and
# test_grad_spectra; 11.5 fp32 epsilons is the largest difference measured, in gradient spectra).
FP32_ORDER_BOUND = 64 * float(np.finfo(np.float32).eps)  # 7.6e-6


@contextmanager
def threads(n):
    """torch's intra-op threads (OpenMP and MKL) set to n inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def worker_threads():
    """The arithmetic of a torchrun worker (OMP_NUM_THREADS=1), for a 1-process reference."""
    return threads(1)


def torchrun_worker(tmp_path, source):
    """Run `source` (a script template with {repo} and {out}) as 2 gloo processes under torchrun;
    returns the npz that rank 0 saved to {out}."""
    import numpy as np
    script, out = tmp_path / "worker.py", tmp_path / "ddp.npz"
    script.write_text(source.format(repo=REPO, out=str(out)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.join(REPO, "tests")}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return np.load(out)


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(records):
    """(step, key, value) for every train/val loss: what must match between equivalent runs."""
    return [(r["step"], k, r[k]) for r in records for k in ("train_loss", "val_loss") if k in r]


@pytest.fixture(autouse=True, scope="session")
def _wandb_dirs_of_this_session(tmp_path_factory):
    # W&B's staging copies of artifacts, its cache, settings and service logs in a folder of this
    # test session, not the user's home: offline runs never upload, so staged files would pile up
    root = tmp_path_factory.mktemp("wandb")
    keys = {"WANDB_DATA_DIR": "data", "WANDB_CACHE_DIR": "cache", "WANDB_CONFIG_DIR": "config"}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: str(root / v) for k, v in keys.items()})
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    # Config paths in configs/ are relative to the repository root, as for a user.
    monkeypatch.chdir(REPO)


def load_bench(name):
    """bench/<name>.py as a module (bench/ is scripts, not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
