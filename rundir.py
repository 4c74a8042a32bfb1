"""
The files of a run directory that more than one module reads, each with one schema and one owner:

    runs/<run>/config.json       RunRecord: what the run is (resolved config, model, spectra, labels)
    runs/<run>/metrics.jsonl     read_metrics: one JSON object per line (written by the trainer's MetricsLog)
    runs/<run>/ckpt/step_N.pt    Checkpoint: weights and the state that resumes training

and `load_model(spec)`, the one way to build a model from a GPT-2 name, a Hugging Face directory or
a trainer checkpoint. The npz spectra are spectra.py's format. Every error names the file and what
is wrong with it.
"""

import json
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field, fields

import torch

from data.shards import atomic_write
from model import GPT, GPTConfig, from_pretrained


class RunFileError(ValueError):
    """A run-directory file that is missing, unreadable or not what its name says."""


def as_dict(record):
    """A dataclass's fields as a dict, values as they are (dataclasses.asdict deep-copies every
    tensor: a second copy of the weights and optimizer state)."""
    return {f.name: getattr(record, f.name) for f in fields(record)}


# ----------------------------------------------------------------------------------------------
# config.json


@dataclass
class RunRecord:
    """config.json: written once when a run starts, read by the trainer (on resume), analyze.py and
    sweeps. Runs from W&B carry the same structure as their W&B config."""
    config: dict                     # the trainer's Config (train_gpt.Config, as a dict)
    model: dict                      # the resolved GPTConfig
    derived: dict = field(default_factory=dict)   # world size, steps, tokens per step, ...
    spectra: dict = field(default_factory=dict)   # resolved spectral settings: points, layers, matrices
    labels: list = None              # W&B (group, job_type, tags), fixed at the start
    wandb_id: str = ""
    metric_version: int = 1          # spectra.METRIC_VERSION of the run (absent in the oldest records: 1)
    git: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    device: str = ""

    @classmethod
    def from_dict(cls, d, source="config"):
        """The record of a config.json (or a W&B run's config) as parsed JSON; keys of other versions
        are ignored, absent ones take their defaults (what runs from before them had)."""
        if not isinstance(d, dict):
            raise RunFileError(f"{source}: expected a JSON object ({{config, model, ...}} as train_gpt.py writes it), "
                               f"found a {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        values.setdefault("config", {k: v for k, v in d.items() if k not in known})  # a flat config (W&B)
        values.setdefault("model", {})
        return cls(**values)

    def save(self, run_dir):
        text = json.dumps(as_dict(self), indent=2).encode()
        atomic_write(os.path.join(run_dir, "config.json"), lambda f: f.write(text))

    @classmethod
    def load(cls, run_dir):
        path = os.path.join(run_dir, "config.json")
        try:
            with open(path) as f:
                d = json.load(f)
        except OSError as e:
            raise RunFileError(f"{path}: cannot read ({e.strerror})") from None
        except ValueError as e:
            raise RunFileError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, path)


# ----------------------------------------------------------------------------------------------
# metrics.jsonl


def read_metrics(path):
    """(records, bad): every line of a metrics.jsonl that is a complete JSON object, and the 1-based
    numbers of those that are not (the last line of a crashed run is cut mid-write); `bad` holds
    (number, cut) with cut=True for a last line without its newline."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    records, bad = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            bad.append((number, number == len(lines)))
    return records, bad


# ----------------------------------------------------------------------------------------------
# Checkpoints


@dataclass
class Checkpoint:
    """ckpt/step_XXXXXXXX.pt: saved as a plain dict of tensors and builtins, so it loads with
    torch.load(weights_only=True). Only `model` and `model_config` are needed to build the model."""
    model: dict                      # state_dict
    model_config: dict               # GPTConfig as a dict
    config: dict = field(default_factory=dict)    # the trainer's Config as a dict
    step: int = 0
    tokens: int = 0
    optimizers: list = field(default_factory=list)
    data: dict = field(default_factory=dict)      # the train loader's position
    rng: list = field(default_factory=list)       # one RNG state per rank
    elapsed_s: float = 0.0
    wandb_id: str = ""
    interval: dict = None            # the log interval in progress (train_gpt.LogInterval.state)
    progress: float = 0.0            # step / total steps: what a growing attention window depends on

    def save(self, run_dir, keep):
        """Write ckpt/step_XXXXXXXX.pt atomically, then keep only the newest `keep`; returns the path."""
        os.makedirs(os.path.join(run_dir, "ckpt"), exist_ok=True)
        path = os.path.join(run_dir, "ckpt", f"step_{self.step:08d}.pt")
        state = as_dict(self)
        atomic_write(path, lambda f: torch.save(state, f))
        for old in checkpoints(run_dir)[:-keep]:
            os.remove(old)
        return path

    @classmethod
    def load(cls, path, map_location="cpu", mmap=False):
        """The checkpoint at `path`; RunFileError naming the file and what is wrong with it. mmap=True
        maps the weights instead of reading them (for the config alone)."""
        hint = "trainer checkpoints are written by train_gpt.py to runs/RUN/ckpt/step_*.pt"
        if not os.path.isfile(path):
            raise RunFileError(f"checkpoint {path!r} not found ({hint})")
        if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a cut-short one has no central directory
            raise RunFileError(f"{path} is not a trainer checkpoint: it is truncated or corrupt, or not a file "
                               f"torch.save wrote (no complete zip archive); {hint}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's notes on pickle protocols of files that are not ours
                d = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except Exception as e:  # said in our words: torch's own advice (weights_only=False) would run its code
            raise RunFileError(f"{path} is not a trainer checkpoint: {unreadable_reason(e)}; {hint}") from None
        if not isinstance(d, dict) or not {"model", "model_config"} <= set(d):
            raise RunFileError(f"{path} is not a trainer checkpoint (no 'model' and 'model_config' entries); {hint}")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def unreadable_reason(error):
    """What a torch.load(weights_only=True) failure means for a zip archive that should be a checkpoint."""
    if isinstance(error, pickle.UnpicklingError):
        return "it holds Python objects other than tensors and plain data (not written by train_gpt.py)"
    text = str(error).splitlines()[0][:160] if str(error) else "unreadable"
    return f"it cannot be read ({type(error).__name__}: {text})"


def checkpoints(run_dir):
    """Checkpoint paths of a run, oldest first."""
    ckpt_dir = os.path.join(run_dir, "ckpt")
    names = sorted(n for n in os.listdir(ckpt_dir) if re.fullmatch(r"step_\d+\.pt", n)) \
        if os.path.isdir(ckpt_dir) else []
    return [os.path.join(ckpt_dir, n) for n in names]


def newest_checkpoint(run_dir, mmap=False, warn=print):
    """(path, Checkpoint) of the newest checkpoint of the run that loads; each newer one that does not
    is named through `warn`. RunFileError when none loads (or there is none)."""
    problems = []
    for path in reversed(checkpoints(run_dir)):
        try:
            ckpt = Checkpoint.load(path, mmap=mmap)
        except RunFileError as e:
            problems.append(str(e))
            continue
        for problem in problems:
            warn(f"skipping a checkpoint that does not load: {problem}; resuming from {path}")
        return path, ckpt
    if not problems:
        raise RunFileError(f"{run_dir} has no checkpoint (trained with ckpt_every_tokens=-1, or stopped before its "
                           "first checkpoint)")
    raise RunFileError(f"no checkpoint of {run_dir} loads:\n  " + "\n  ".join(problems))


def remove_stale_temporaries(folder):
    """Remove `*.tmp<PID>` files that atomic_write left behind in `folder` (and its subfolders) when
    its process was killed mid-write; a file whose writer is still alive is left alone. Returns the
    removed paths."""
    removed = []
    for root, _, names in os.walk(folder):
        for name in names:
            m = re.search(r"\.tmp(\d+)$", name)
            if m and not process_alive(int(m.group(1))):
                os.remove(os.path.join(root, name))
                removed.append(os.path.join(root, name))
    return removed


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


# ----------------------------------------------------------------------------------------------
# Models from a name, a directory or a checkpoint


def load_model(spec, **overrides):
    """A GPT in eval mode on the CPU from `spec`: a GPT-2 name (gpt2, gpt2-medium, ...) or a directory
    in the Hugging Face format (model.from_pretrained), or a trainer checkpoint (.pt). `overrides` set
    GPTConfig fields that do not change the weights' shapes (seq_len, dropout, ...); a shorter seq_len
    keeps the first learned positions. RunFileError or PretrainedError name what does not fit."""
    if not spec.endswith(".pt"):
        return from_pretrained(spec, **overrides)
    ckpt = Checkpoint.load(spec, mmap=True)
    try:
        cfg = GPTConfig(**{**ckpt.model_config, **overrides})
        state = dict(ckpt.model)
        if cfg.pos == "learned" and "wpe.weight" in state:
            if cfg.seq_len > len(state["wpe.weight"]):
                raise ValueError(f"seq_len={cfg.seq_len} exceeds its {len(state['wpe.weight'])} learned positions")
            state["wpe.weight"] = state["wpe.weight"][:cfg.seq_len]
        model = GPT(cfg)
        model.load_state_dict(state)
        model.set_progress(ckpt.progress)  # the masks of the step it was saved at
    except (TypeError, ValueError, RuntimeError) as e:  # written by another version of model.py, or bad overrides
        raise RunFileError(f"{spec}: its model does not match this model.py with {overrides or 'its config'} "
                           f"({type(e).__name__}: {str(e)[:200]}); use the commit that trained it") from None
    return model.eval()

