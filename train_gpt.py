"""
spectral-nanogpt trainer: one file, read top to bottom.

    python train_gpt.py configs/cpu_demo.py
    torchrun --standalone --nproc_per_node=8 train_gpt.py configs/d36_bs512.py [--key=value ...]
    python train_gpt.py configs/d36_bs512.py --dry_run=1

Sections: config -> data -> optimizers -> run directory, metrics and W&B -> distributed helpers ->
evaluation (the session, evaluate_and_log) -> the log interval, divergence, checkpoints and
resuming -> console -> training loop. Tokens are the first-class axis: budgets, evaluation
and checkpoint cadence are in tokens, so runs at different batch sizes line up.
"""

import dataclasses
import difflib
import fnmatch
import functools
import inspect
import json
import math
import os
import re
import secrets
import subprocess
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from typing import Optional, Union, get_args, get_origin, get_type_hints

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import analyze
import features
import measure
import spectra
from data import modarith
from data.shards import ShardError, WriteError, atomic_write, check_vocab, find_shards, load_prefix, load_tokens, \
    read_header
from model import GPT, PRESETS, GPTConfig, make_config, probe_point_width
from rundir import Checkpoint, RunFileError, RunRecord, checkpoints, load_model, newest_checkpoint, read_metrics, \
    remove_stale_temporaries

REPO = os.path.dirname(os.path.abspath(__file__))
SPECTRA = spectra.DEFAULTS  # the spectral settings' defaults, owned by spectra.SpectraSettings

# ----------------------------------------------------------------------------------------------
# Config: dataclass defaults < config file (plain Python assignments) < --key=value


@dataclass
class Config:
    # run and output
    config_file: str = ""              # the CONFIG.py given first on the command line (not a settable key)
    run_name: str = ""                 # "" -> <config file name>_<date-time>
    out_dir: str = "runs"              # run directories go to out_dir/run_name
    seed: int = 1337                   # initial weights and dropout streams
    stage: str = ""                    # ladder stage, e.g. 05_muon (analyze.py stages groups runs by it); "" -> the
                                       # config file's name when the file sits in a folder named stages/
    resume: bool = False               # continue runs/<run_name> (default: newest run of this config)
    dry_run: bool = False              # check data, output folder and budgets; print config, size, spectra cost; exit
    device: str = "auto"               # auto | cpu | cuda
    compile: Optional[bool] = None     # torch.compile; None: on for CUDA, off for CPU
    # model: preset + size profile; any GPTConfig field of model.py (qk_norm, n_layer, ...) may be
    # set as a top-level key too and is collected in `model`
    preset: str = "modded"             # gpt2 | modded
    init_from: str = ""                # "" -> random init; gpt2 | gpt2-medium | gpt2-large | gpt2-xl, a directory in
                                       # the Hugging Face format, or a trainer checkpoint (.pt) to fine-tune from
    profile: str = "d12"               # d12 | d24 | d36 | d48
    model: dict = field(default_factory=dict)  # (collected GPTConfig keys; not settable itself)
    # data and budget
    train_files: str = "data/fineweb10B/fineweb_train_*.bin"  # glob of training shards (data/shards.py format)
    val_files: str = "data/fineweb10B/fineweb_val_*.bin"      # glob of validation shards: val loss and spectra
    seq_len: int = 1024                # tokens per training sequence
    batch_size: int = 512              # sequences per optimizer step, all ranks together
    device_batch_size: int = 64        # sequences per forward/backward on one device (0: batch_size / world size)
    train_tokens: int = 2_500_000_000  # stop after this many tokens (0: use max_steps alone)
    max_steps: int = 0                 # stop after this many steps (0: no step limit)
    target_val_loss: float = 0.0       # > 0: stop at the first evaluation with val_loss <= this
    stop_tokens: int = 0               # > 0: pause here (evaluate, checkpoint, exit); the schedule still runs
                                       # to the budget, --resume=1 continues (sweep rungs); eval_every_tokens divides it
    val_tokens: int = 10_485_760       # fixed slice of the val split, the same at every evaluation
    eval_every_tokens: int = 0         # tokens between evaluations; 0: at the start and the end only; -1: never
    log_every: int = 10                # steps between console/metrics lines (and a line at every evaluation)
    # optimizer: Muon for hidden matrices + Adam for the rest, or AdamW everywhere
    optimizer: str = "muon"            # muon | adamw
    lr_ref_batch_size: int = 512       # the learning rates below are for this batch size ...
    lr_scaling: str = "sqrt"           # ... and scale by (batch_size / lr_ref_batch_size)^p, p = 0 | 1/2 | 1
    lr_mult: float = 1.0               # ... and by this (every rate at once: a learning-rate sweep's one knob)
    muon_lr: float = 0.05              # Muon: hidden weight matrices
    muon_momentum: float = 0.95        # Muon: momentum after its warmup
    muon_momentum_start: float = 0.85  # momentum warms up linearly from this ...
    muon_momentum_warmup_steps: int = 300  # ... over this many steps
    embed_lr: float = 0.3              # Adam: token, position and value embeddings
    head_lr: float = 0.008             # Adam: untied output head
    scalar_lr: float = 0.04            # Adam: gains, biases, skip and value-embedding weights
    adamw_lr: float = 6e-4             # optimizer="adamw": one LR for every parameter
    weight_decay: float = 0.0          # decoupled; hidden matrices (Muon) or all matrices (AdamW)
    adam_beta1: float = 0.8            # Adam(W): first-moment decay
    adam_beta2: float = 0.95           # Adam(W): second-moment decay
    adam_eps: float = 1e-10            # Adam(W): denominator epsilon
    grad_clip: float = 0.0             # max global grad norm; 0: off
    warmup_frac: float = 0.0           # LR schedule: linear warmup over this share of the steps,
    cooldown_frac: float = 0.4         # constant, then linear cooldown over the last share
    final_lr_frac: float = 0.0         # LR at the end of the cooldown, relative to the peak
    lr_mults: str = ""                 # per-parameter LR multipliers on top of the above: "lm_head.weight=27.5,..."
                                       # (parameter-name globs, first match wins; the later records' lr_mul)
    wd_mults: str = ""                 # per-parameter multipliers of weight_decay, the same form (wd_mul)
    # spectral evaluation (spectra.SpectraSettings owns these defaults): activation covariance spectra
    spectra_every: int = 1             # evaluations: measure at every k-th evaluation (and the last); 0: off
    spectra_tokens: int = SPECTRA.act_tokens  # probe set: the first this-many val tokens, the same at every evaluation
    spectra_batch_size: int = SPECTRA.act_batch_size  # probe sequences per forward pass (a fixed unit: N GPUs agree)
    spectra_points: str = SPECTRA.points     # "" -> embed, every L{l}.mlp_resid, final; or names/globs "L0*.attn,final"
    spectra_sublayers: bool = SPECTRA.sublayers  # with spectra_points="": every probe point of every block
    spectra_head: tuple[int, int] = SPECTRA.head  # rank windows [a, b] of the power-law fits;
    spectra_tail: tuple[int, int] = SPECTRA.tail  # (10, 100) is the earlier protocol's tail
    spectra_act_norm: str = SPECTRA.act_norm  # rms: RMS-normalise residual-stream points per token | none
    spectra_plots: bool = True         # plots/ at each spectral evaluation
    # per-example gradient spectra (and the weights' own spectra) of chosen Linear layers
    grad_spectra_every: int = 1        # spectral evaluations: at every k-th of them (and the last); 0: off
    grad_samples: int = SPECTRA.grad_samples  # examples: the first this-many val sequences, one example each
    grad_matrices: str = SPECTRA.matrices    # comma-separated from attn.c_q/c_k/c_v/c_proj, mlp.c_fc/c_proj
    grad_layers: str = SPECTRA.layers        # "" -> 5 evenly spaced layers, first and last included; "all"; or "0,5,11"
    grad_batch_size: int = SPECTRA.grad_batch_size  # examples per forward/backward (a fixed unit, too)
    grad_spectra_max_gb: float = SPECTRA.max_gb  # per-example gradients (fp32) held at once; more goes in column blocks
    grad_spectra_method: str = SPECTRA.method  # auto | materialise | token_gram (see spectra.gram_method)
    grad_spectra_precision: str = SPECTRA.precision  # fp32 (exact) | tf32 | bf16: faster, approximate passes on a GPU
    grad_spectra_compile: bool = SPECTRA.compile  # torch.compile the head's gradient in those passes (a GPU speedup)
    weight_density_rule: str = SPECTRA.density_rule  # weight/alpha_density: weightwatcher (its x_min rule) | exact
    # feature probes of the toy task (features.py) on its probe band, at every evaluation
    probe_band: str = "auto"           # band shard with latents; auto: <name>_band_*.bin beside the val shards, if any;
                                       # "": off
    probe_point: str = "final"         # the probe point whose hidden state makes the conditional-mean table
    # checkpoints
    ckpt_every_tokens: int = 0         # tokens between checkpoints; 0: only at the end; -1: never
    ckpt_keep: int = 2                 # most recent checkpoints kept
    # Weights & Biases
    wandb_mode: str = ""               # online | offline | disabled; "" -> $WANDB_MODE, else offline
    wandb_project: str = "spectral-nanogpt"  # W&B project
    wandb_group: str = ""              # "" -> derived from the model family (preset, profile, changes, optimizer)
    wandb_name: str = ""               # "" -> run_name
    wandb_milestones: str = "100K,1M,10M,50M,100M,500M,1B"  # run-summary copies of alphas at these tokens
    # in-run forecast of token efficiency from a finished reference sweep (analyze.py)
    forecast_reference: str = ""       # run directories or sweep folders, comma-separated; "" -> off
    forecast_target_loss: float = 0.0  # 0 -> target_val_loss, else the highest final val_loss of the reference


CHOICES = {"device": ("auto", "cpu", "cuda"), "optimizer": ("muon", "adamw"), "lr_scaling": ("none", "sqrt", "linear"),
           "wandb_mode": ("", "online", "offline", "disabled")}
MODEL_KEYS = {f.name: f.type for f in dataclasses.fields(GPTConfig) if f.name != "seq_len"}
TRAIN_KEYS = {k: v for k, v in get_type_hints(Config).items() if k not in ("model", "config_file")}
CADENCES = {"eval_every_tokens": "0 evaluates at the start and the end only, -1 never",
            "ckpt_every_tokens": "0 checkpoints at the end only, -1 never"}


class ConfigError(ValueError):
    pass


def coerce(key, value, typ, source, cli):
    """Check a value against a field's type. Values from the command line arrive as strings and are
    parsed; values from a config file are Python objects and must already have the right type
    (an int is accepted for a float, an integral float such as 1e9 for an int)."""
    raw = value

    def fail():
        return ConfigError(f"{source}: {key}={raw!r} is not a valid {getattr(typ, '__name__', typ)}")
    if get_origin(typ) is Union:  # Optional[X]: None, or "none"/"auto" on the command line
        if value is None or (cli and value.lower() in ("none", "auto")):
            return None
        return coerce(key, value, get_args(typ)[0], source, cli)
    if get_origin(typ) is tuple:  # a rank window: (10, 100) in a file, 10,100 on the command line
        items = [v for v in value.strip("()[] ").split(",")] if cli else value
        if not isinstance(items, (tuple, list)) or len(items) != len(get_args(typ)):
            raise ConfigError(f"{source}: {key}={raw!r} is not a pair of integers, e.g. (10, 100) or --{key}=10,100")
        return tuple(coerce(key, v.strip() if cli else v, t, source, cli) for v, t in zip(items, get_args(typ)))
    if cli and typ is not str:
        words = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
        try:
            value = words[value.lower()] if typ is bool and value.lower() in words else \
                float(value) if any(c in value for c in ".eEn") else int(value.replace("_", ""))
        except ValueError:
            raise fail() from None
    if typ is bool and (isinstance(value, bool) or value in (0, 1)):
        return bool(value)
    if typ is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if typ in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool) \
            and (typ is float or isinstance(value, int)):
        return typ(value)
    if typ is str and isinstance(value, str):
        return value
    raise fail()


def set_key(cfg, key, value, source, cli=False):
    if key in TRAIN_KEYS:
        setattr(cfg, key, coerce(key, value, TRAIN_KEYS[key], source, cli))
    elif key in MODEL_KEYS:
        cfg.model[key] = coerce(key, value, MODEL_KEYS[key], source, cli)
    else:
        close = difflib.get_close_matches(key, list(TRAIN_KEYS) + list(MODEL_KEYS), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(close)}?" if close else \
            "; the keys are the fields of Config in train_gpt.py and GPTConfig in model.py"
        raise ConfigError(f"{source}: unknown config key {key!r}{hint}")


def read_config_file(path):
    """The assignments of a plain-Python config file, as {name: value}."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found (configs live in configs/, e.g. configs/cpu_demo.py)")
    namespace = {}
    try:
        with open(path) as f:
            exec(compile(f.read(), path, "exec"), {}, namespace)
    except Exception as e:
        raise ConfigError(f"{path}: cannot execute config file: {type(e).__name__}: {e}") from None
    return {k: v for k, v in namespace.items() if not k.startswith("_") and not callable(v)
            and type(v).__name__ != "module"}


def command_line_pairs(args):
    """[(key, value)] from --key=value, --key value, or a bare --flag (a bool key: True)."""
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"command line: expected --key=value or --key value, got {arg!r} (a config file "
                              "comes first; python train_gpt.py --help lists the keys)")
        if "=" in arg:
            pairs.append(tuple(arg[2:].split("=", 1)))
        elif {**TRAIN_KEYS, **MODEL_KEYS}.get(arg[2:]) is bool and (i + 1 == len(args) or args[i + 1].startswith("--")):
            pairs.append((arg[2:], "1"))
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            pairs.append((arg[2:], args[i + 1]))
            i += 1
        else:
            raise ConfigError(f"command line: {arg} needs a value: {arg}=VALUE or {arg} VALUE")
        i += 1
    return pairs


def load_config(argv):
    """Config from [CONFIG.py | --config=CONFIG.py] [--key=value | --key value ...]; raises ConfigError naming
    the key and the fix."""
    cfg = Config()
    args = list(argv)
    if args and not args[0].startswith("-"):
        cfg.config_file = args.pop(0)
    elif any(a.startswith("--config=") for a in args):  # W&B sweeps pass every parameter as --key=value
        named = next(a for a in args if a.startswith("--config="))
        args.remove(named)
        cfg.config_file = named.split("=", 1)[1]
    if cfg.config_file:
        for key, value in read_config_file(cfg.config_file).items():
            set_key(cfg, key, value, cfg.config_file)
    for key, value in command_line_pairs(args):
        set_key(cfg, key, value, "command line", cli=True)
    if not cfg.stage and os.path.basename(os.path.dirname(os.path.abspath(cfg.config_file))) == "stages":
        cfg.stage = config_stem(cfg)  # configs/stages/05_muon.py is stage 05_muon
    check_config(cfg)
    return cfg


def key_docs(cls):
    """[(group, key, meaning)] of a dataclass, read from its source: a comment line at field indent
    opens a group, the comment after a field is its meaning, a deeper comment line continues it. So
    --help says what the code says, from one place."""
    docs, group, in_group = [], "", False
    for line in inspect.getsource(cls).splitlines()[1:]:
        comment = line.partition("#")[2].strip()
        field_match = re.match(r"    (\w+): ", line)
        if field_match:
            docs.append([group, field_match.group(1), comment])
        elif re.match(r"    #", line):
            group = f"{group} {comment}" if in_group else comment
        elif re.match(r" {5,}#", line) and docs:
            docs[-1][2] += " " + comment
        in_group = bool(re.match(r"    #", line))
    return [tuple(d) for d in docs]


def type_name(typ):
    if get_origin(typ) is tuple:
        return ",".join(type_name(t) for t in get_args(typ))
    if get_origin(typ) is Union:
        return type_name(get_args(typ)[0]) + "|none"
    return typ.__name__


def cli_text(value):
    """A default as it is written on the command line: 10,100 for a pair, "" for an empty string."""
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return '""' if value == "" else str(value)


def config_help():
    """The text of --help: every key with its type, default and meaning, grouped as in Config, then
    the model flags of GPTConfig with the values of the default preset and profile."""
    defaults = Config()
    preset = make_config(defaults.preset, defaults.profile)
    width = max(len(k) for k in [*TRAIN_KEYS, *MODEL_KEYS]) + 2

    def row(key, typ, value, meaning):
        return f"  --{key:<{width}} {type_name(typ):<9} {cli_text(value):<16} {meaning}"
    lines = ["usage:", __doc__.strip().split("\n\n")[1], "",
             "Precedence: Config defaults < CONFIG.py (plain Python assignments) < --key=value or --key value "
             "(a bare --flag sets a bool key)."]
    last_group = None
    for group, key, meaning in key_docs(Config):
        if key not in TRAIN_KEYS:
            continue
        if group != last_group:
            lines += ["", group + ":"]
            last_group = group
        lines.append(row(key, TRAIN_KEYS[key], getattr(defaults, key), meaning))
    lines += ["", f"model flags (GPTConfig in model.py; defaults of preset={defaults.preset!r}, "
                  f"profile={defaults.profile!r}; preset=gpt2 sets "
                  + ", ".join(f"{k}={v}" for k, v in PRESETS["gpt2"].items()) + "):"]
    lines += [row(key, MODEL_KEYS[key], getattr(preset, key), meaning) for _, key, meaning in key_docs(GPTConfig)
              if key in MODEL_KEYS]
    return "\n".join(lines)


def check_config(cfg):
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"{key}={getattr(cfg, key)!r} is not one of {allowed}")
    floats = {k: v for k, v in [*asdict(cfg).items(), *cfg.model.items()] if isinstance(v, float)}
    for key, value in floats.items():  # nan passes every comparison below, and inf most
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value} is not a finite number")
    if cfg.device_batch_size < 0:
        raise ConfigError(f"device_batch_size={cfg.device_batch_size} must be >= 0")
    for key in ("seq_len", "batch_size", "val_tokens", "log_every", "lr_ref_batch_size", "ckpt_keep"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be positive")
    for key, meaning in CADENCES.items():
        if getattr(cfg, key) < -1:
            raise ConfigError(f"{key}={getattr(cfg, key)}: a token count > 0, or {meaning}")
    for key in ("spectra_every", "grad_spectra_every"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be >= 0 (every k-th evaluation; 0 switches it off)")
    for key in ("train_tokens", "max_steps"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be >= 0 (0: no limit of this kind)")
    if cfg.train_tokens == 0 and cfg.max_steps == 0:
        raise ConfigError("set a budget: train_tokens > 0 or max_steps > 0")
    if cfg.stop_tokens < 0:
        raise ConfigError(f"stop_tokens={cfg.stop_tokens} must be >= 0 (0: train to the budget)")
    if cfg.stop_tokens > 0 and (cfg.eval_every_tokens <= 0 or cfg.stop_tokens % cfg.eval_every_tokens):
        raise ConfigError(f"stop_tokens={cfg.stop_tokens} needs an evaluation there: set eval_every_tokens > 0 to a "
                          f"divisor of it (now {cfg.eval_every_tokens})")
    if cfg.stop_tokens > 0 and cfg.ckpt_every_tokens < 0:
        raise ConfigError("stop_tokens > 0 pauses a run to be resumed: it needs its checkpoint, so ckpt_every_tokens "
                          "must be >= 0 (not -1)")
    if cfg.val_tokens < cfg.seq_len:
        raise ConfigError(f"val_tokens={cfg.val_tokens} is less than one sequence (seq_len={cfg.seq_len})")
    if not cfg.lr_mult > 0:
        raise ConfigError(f"lr_mult={cfg.lr_mult} must be > 0 (it multiplies every learning rate)")
    for key in ("muon_lr", "embed_lr", "head_lr", "scalar_lr", "adamw_lr", "adam_eps", "weight_decay", "grad_clip"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be >= 0")
    for key in ("muon_momentum", "muon_momentum_start", "adam_beta1", "adam_beta2"):
        if not 0 <= getattr(cfg, key) < 1:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be in [0, 1) (an exponential-average coefficient)")
    for key in ("warmup_frac", "cooldown_frac", "final_lr_frac"):
        if not 0 <= getattr(cfg, key) <= 1:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be in [0, 1]")
    try:
        parse_milestones(cfg.wandb_milestones)
    except ValueError:
        raise ConfigError(f"wandb_milestones={cfg.wandb_milestones!r}: expected token counts like "
                          "'100K,1M,50M,1B'") from None
    if cfg.warmup_frac + cfg.cooldown_frac > 1:
        raise ConfigError(f"warmup_frac + cooldown_frac = {cfg.warmup_frac + cfg.cooldown_frac} exceeds 1")
    try:
        settings = spectral_settings(cfg)
        act, grad = cfg.spectra_every > 0, cfg.spectra_every > 0 and cfg.grad_spectra_every > 0
        settings.check(act=act, grad=grad)
        gcfg = model_config(cfg)
        with torch.device("meta"):
            meta = GPT(gcfg)
            linears = meta.linears()
        check_multipliers(cfg, [n for n, _ in meta.named_parameters()])
        settings.point_names(gcfg.n_layer)
        names = settings.matrix_names(linears, gcfg.n_layer)
        if grad:  # a forced token-Gram must fit grad_spectra_max_gb
            spectra.plan_passes({m: linears[m].weight.shape for m in names}, settings.grad_samples, settings.seq_len,
                                settings.max_gb, settings.method)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def spectral_settings(cfg):
    """The run's spectral settings (spectra.SpectraSettings), from its flat keys."""
    return spectra.SpectraSettings.from_config(asdict(cfg))


def model_config(cfg):
    """The GPTConfig of the run: preset + profile + overrides, or, with init_from, the architecture of
    the weights it starts from (their shapes fix it) with this run's seq_len and overrides (dropout, ...)."""
    if not cfg.init_from:
        return make_config(cfg.preset, cfg.profile, seq_len=cfg.seq_len, **cfg.model)
    if cfg.resume:  # the run's own checkpoint fixes the architecture: its source may be gone by now
        run_dir = os.path.join(cfg.out_dir, choose_run_name(cfg))
        _, ckpt = resume_checkpoint(run_dir, mmap=True)
        return GPTConfig(**{**ckpt.model_config, "seq_len": cfg.seq_len, **cfg.model})
    if cfg.init_from.endswith(".pt"):
        base = checkpoint_model_config(cfg.init_from)
        fixed = [f"{k}={v} (the checkpoint has {base[k]})" for k, v in cfg.model.items()
                 if k in ("n_layer", "n_head", "n_embd", "vocab_size") and v != base[k]]
        if fixed:
            raise ConfigError(f"init_from={cfg.init_from!r} fixes the model's shape: cannot set {', '.join(fixed)}")
        if cfg.seq_len > base["seq_len"] and base["pos"] == "learned":
            raise ConfigError(f"seq_len={cfg.seq_len} exceeds the {base['seq_len']} learned positions of "
                              f"init_from={cfg.init_from!r}; use --seq_len<={base['seq_len']}")
        return GPTConfig(**{**base, "seq_len": cfg.seq_len, **cfg.model})
    from model import PretrainedError, pretrained_config
    try:
        return pretrained_config(cfg.init_from, seq_len=cfg.seq_len, **cfg.model)
    except PretrainedError as e:
        raise ConfigError(f"init_from={cfg.init_from!r}: {e}") from None


@functools.lru_cache(maxsize=4)
def checkpoint_model_config(path):
    """The model_config a trainer checkpoint was saved with (memory-mapped: the weights are not read)."""
    try:
        return dict(Checkpoint.load(path, mmap=True).model_config)
    except RunFileError as e:
        raise ConfigError(f"init_from={path!r}: {e}") from None


def initial_model(cfg, gcfg):
    """The model a run starts from: randomly initialised, or holding init_from's weights (learned
    positions cut to seq_len; a pretrained GPT-2 is built without the random initialisation its
    weights would overwrite, 26 s for gpt2-xl on 2 cores)."""
    if not cfg.init_from or cfg.resume:  # a resumed run loads its own checkpoint later
        return GPT(gcfg)
    model = load_model(cfg.init_from, **{**cfg.model, "seq_len": gcfg.seq_len})
    assert model.cfg == gcfg, (model.cfg, gcfg)  # model_config resolved the same architecture
    return model.train()  # load_model returns it in eval mode; training needs dropout on


def parse_milestones(text):
    """'100K,1M,1B' -> [('100K', 100000), ('1M', 1000000), ('1B', 1000000000)]; ValueError if malformed."""
    out = []
    for label in (t.strip() for t in text.split(",") if t.strip()):
        scale = {"K": 10 ** 3, "M": 10 ** 6, "B": 10 ** 9}.get(label[-1].upper(), 1)
        number = float(label[:-1] if scale > 1 else label)
        if number <= 0:
            raise ValueError(label)
        if int(number * scale) not in (tokens for _, tokens in out):  # "1M,1000K": one milestone
            out.append((label, int(number * scale)))
    return out


WANDB_NAME_LIMIT = 128  # W&B refuses longer run names and groups


def run_labels(cfg, gcfg):
    """(group, job_type, tags) for W&B, derived from the config so that sweeps group without manual
    naming: the group is the model family (preset, size, model settings changed from the preset,
    optimizer), the job type the batch tier; tags carry each part."""
    sizes = ("n_layer", "n_head", "n_embd")
    if cfg.init_from:  # fine-tuning: the family is what it starts from, e.g. "gpt2"
        source = cfg.init_from.rstrip("/")
        if source.endswith(".pt"):  # runs/RUN/ckpt/step_*.pt: the run's name
            source = os.path.dirname(os.path.dirname(os.path.abspath(source)))
        preset, base = "from-" + os.path.basename(source), model_config(replace(cfg, model={}))
        size = f"L{gcfg.n_layer}-d{gcfg.n_embd}-h{gcfg.n_head}"
    else:
        preset, base = cfg.preset, make_config(cfg.preset, cfg.profile, seq_len=gcfg.seq_len)
        size = cfg.profile if all(getattr(gcfg, k) == getattr(base, k) for k in sizes) else \
            f"L{gcfg.n_layer}-d{gcfg.n_embd}-h{gcfg.n_head}"
    changed = [f"{f.name}={getattr(gcfg, f.name)}" for f in dataclasses.fields(GPTConfig)
               if f.name not in (*sizes, "seq_len") and getattr(gcfg, f.name) != getattr(base, f.name)]
    tier = f"bs{cfg.batch_size}"
    group = "-".join([preset, size, *changed, cfg.optimizer])
    if len(group) > WANDB_NAME_LIMIT and cfg.config_file:  # a ladder stage changes a dozen flags: its file names it
        group = "-".join([preset, size, config_stem(cfg), cfg.optimizer])[:WANDB_NAME_LIMIT]
    return group, tier, [preset, size, tier, cfg.optimizer, *changed]


def saved_labels(run_dir):
    """The (group, job_type, tags) a run's config.json recorded at its start; None for a run from
    before they were recorded (or without the file)."""
    try:
        group, job_type, tags = RunRecord.load(run_dir).labels
    except (RunFileError, TypeError, ValueError):
        return None
    return group, job_type, tuple(tags)


def batch_layout(cfg, world_size):
    """(device_batch_size, grad_accum): how one optimizer step's batch_size sequences are split over
    processes and micro-steps. device_batch_size=0 means batch_size / world_size, no accumulation."""
    if cfg.batch_size % world_size:
        near = sorted({max(world_size, cfg.batch_size // world_size * world_size),
                       -(-cfg.batch_size // world_size) * world_size})
        raise ConfigError(f"batch_size={cfg.batch_size} cannot be split over {world_size} processes: choose a multiple "
                          f"of {world_size}, e.g. batch_size={' or '.join(map(str, near))}")
    per_rank = cfg.batch_size // world_size
    dbs = cfg.device_batch_size or per_rank
    if per_rank % dbs:
        valid = [d for d in range(1, per_rank + 1) if per_rank % d == 0]
        raise ConfigError(f"batch_size={cfg.batch_size} is not a multiple of device_batch_size x world_size = "
                          f"{dbs} x {world_size} = {dbs * world_size}: each of the {world_size} processes takes "
                          f"{per_rank} sequences per step, so choose device_batch_size from "
                          f"{', '.join(map(str, valid))} (0: {per_rank}, no accumulation)")
    return dbs, per_rank // dbs


def lr_factor(cfg):
    """Multiplier of every rate: (batch_size / lr_ref_batch_size) ** {none: 0, sqrt: 1/2, linear: 1} * lr_mult."""
    power = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}[cfg.lr_scaling]
    return (cfg.batch_size / cfg.lr_ref_batch_size) ** power * cfg.lr_mult


def total_steps(cfg):
    tokens_per_step = cfg.batch_size * cfg.seq_len
    steps = math.ceil(cfg.train_tokens / tokens_per_step) if cfg.train_tokens > 0 else cfg.max_steps
    return min(steps, cfg.max_steps) if cfg.max_steps > 0 else steps


# ----------------------------------------------------------------------------------------------
# Data: modded-NanoGPT shards (data/shards.py), read as windows of seq_len + 1 tokens


def open_train_shards(pattern, tokens_per_step, budget_tokens, rank):
    """Validated train shard paths (headers and sizes): each must hold one optimizer step, and a
    budget beyond all of them (the data would repeat) is warned about."""
    files = find_shards(pattern)
    sizes = [read_header(path) for path in files]
    for path, n in zip(files, sizes):
        if n < tokens_per_step + 1:
            raise ShardError(f"{path}: {n} tokens is fewer than one optimizer step needs ({tokens_per_step + 1}); "
                             "lower batch_size or seq_len, or use larger shards")
    if budget_tokens > sum(sizes) and rank == 0:
        warnings.warn(f"train_tokens={budget_tokens:,} exceeds the {sum(sizes):,} tokens of the {len(files)} train "
                      f"shard(s): the data repeats {budget_tokens / sum(sizes):.1f} times; fetch more shards "
                      "(e.g. python data/fineweb.py --train_shards 103) for a single pass", stacklevel=2)
    return files


def load_val_and_probe(cfg, gcfg, settings):
    """(val, probe): the fixed val slice the loss is measured on, and the probe slice of the spectra
    (None with spectra off). One probe slice serves both families: activation spectra read its first
    spectra_tokens, gradient spectra its first grad_samples sequences (+1 token for the last target)."""
    val_files = find_shards(cfg.val_files)
    val = torch.from_numpy(load_prefix(val_files, (cfg.val_tokens // cfg.seq_len) * cfg.seq_len, gcfg.vocab_size))
    if not cfg.spectra_every:
        return val, None
    n_probe = max(settings.probe_tokens("act"), settings.probe_tokens("grad") if cfg.grad_spectra_every else 0)
    probe = load_prefix(val_files, n_probe, gcfg.vocab_size, key="spectra_tokens / grad_samples x seq_len")
    return val, torch.from_numpy(probe)


def load_band(cfg, gcfg):
    """(tokens (n, seq_len), latents) of the feature probes' band, or None when there is none: with
    probe_band="auto", the band beside the val shards (data/modarith.py writes one), if present."""
    path = features.find_band(cfg.val_files) if cfg.probe_band == "auto" else cfg.probe_band
    if not path:
        return None
    with torch.device("meta"):
        points = list(GPT(gcfg).probe_points())
    if cfg.probe_point not in points:
        raise ConfigError(f"probe_point={cfg.probe_point!r} is not a probe point of this model; choose one of "
                          f"{', '.join(points)}")
    try:
        return features.load_band(path, cfg.seq_len, gcfg.vocab_size)
    except modarith.ToyError as e:
        raise ConfigError(f"probe_band={cfg.probe_band!r}: {e}; or set probe_band='' to turn the probes off") from None


class TrainLoader:
    """The global batch of one optimizer step is `batch_size` consecutive windows of seq_len + 1
    tokens (neighbours overlap by one token) starting at the current position of the shard stream.
    Micro-step m of rank r takes windows [(m * world + r) * dbs, + dbs). So one process and N
    processes at the same batch_size train on the same sequences in every step, each rank reading
    only its own. The position (shard, offset, epoch) is all the state there is to checkpoint."""

    def __init__(self, files, cfg, rank, world_size, device, vocab_size):
        self.files, self.rank, self.world, self.device = files, rank, world_size, device
        self.T, self.B, self.dbs = cfg.seq_len, cfg.batch_size, cfg.device_batch_size
        self.vocab_size = vocab_size
        self.state = {"shard": 0, "offset": 0, "epoch": 0}
        self._load(0)

    def _load(self, shard):
        self.tokens = load_tokens(self.files[shard])
        check_vocab(self.tokens, self.files[shard], self.vocab_size)
        self.loaded = shard

    def next_step(self, grad_accum):
        """[(x, y)] * grad_accum for this rank, then advance the position by one step."""
        s = self.state
        if self.loaded != s["shard"]:  # after load_state_dict
            self._load(s["shard"])
        if s["offset"] + self.B * self.T + 1 > len(self.tokens):  # not enough left: next shard
            s["shard"], s["offset"] = (s["shard"] + 1) % len(self.files), 0
            s["epoch"] += s["shard"] == 0
            self._load(s["shard"])
        batches = []
        for m in range(grad_accum):
            first = (m * self.world + self.rank) * self.dbs
            start = s["offset"] + first * self.T
            buf = torch.from_numpy(self.tokens[start:start + self.dbs * self.T + 1].astype(np.int64))
            windows = buf.unfold(0, self.T + 1, self.T)  # (dbs, T + 1) views, stride T
            x, y = windows[:, :-1], windows[:, 1:]
            if self.device.type == "cuda":
                x, y = (t.pin_memory().to(self.device, non_blocking=True) for t in (x, y))
            batches.append((x.contiguous(), y.contiguous()))
        s["offset"] += self.B * self.T
        return batches

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, state):
        self.state = dict(state)


# ----------------------------------------------------------------------------------------------
# Optimizers


def newton_schulz(G, steps=5):
    """Approximately orthogonalise G (replace its singular values by ~1) with a quintic Newton-Schulz
    iteration, whose coefficients (3.4445, -4.7750, 2.0315) are tuned to pull small singular values
    up fast; the result has singular values in about [0.7, 1.2], which Muon does not mind. bf16 on
    CUDA, where it is fast and accurate enough; fp32 elsewhere."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    tall = X.size(0) > X.size(1)
    if tall:  # iterate on the smaller Gram matrix
        X = X.T
    X = X / (X.norm() + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for 2-D hidden weight matrices: SGD momentum
    (Nesterov), with each update replaced by its nearest semi-orthogonal matrix and scaled by
    sqrt(max(1, rows / cols)) so tall and wide matrices move at comparable RMS rates."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0, compile=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      weight_decay=weight_decay))
        self.orthogonalize = torch.compile(newton_schulz) if compile else newton_schulz

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)
                update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
                update = self.orthogonalize(update, group["ns_steps"])
                if group["weight_decay"]:
                    p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-lr * max(1.0, p.size(0) / p.size(1)) ** 0.5)


def parse_multipliers(text, key):
    """'lm_head.weight=27.5,value_embeds.*=2' -> [('lm_head.weight', 27.5), ('value_embeds.*', 2.0)]."""
    rules = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        glob, _, value = item.partition("=")
        try:
            rules.append((glob.strip(), float(value)))
        except ValueError:
            raise ConfigError(f"{key}={text!r}: {item!r} is not NAME_GLOB=NUMBER, e.g. {key}=lm_head.weight=27.5") \
                from None
        if not glob.strip() or not math.isfinite(rules[-1][1]) or rules[-1][1] < 0:
            raise ConfigError(f"{key}={text!r}: {item!r} needs a parameter-name glob and a number >= 0, "
                              f"e.g. {key}=lm_head.weight=27.5")
    return rules


def check_multipliers(cfg, names):
    """Every glob of lr_mults and wd_mults must name at least one of the model's parameters."""
    for key in ("lr_mults", "wd_mults"):
        for glob, _ in parse_multipliers(getattr(cfg, key), key):
            if not any(fnmatch.fnmatchcase(n, glob) for n in names):
                raise ConfigError(f"{key}: {glob!r} matches no parameter of this model; its parameters are named "
                                  f"like {', '.join(names[:4])}, ..., blocks.0.attn.c_q.weight")


def with_multipliers(groups, names, cfg):
    """The optimizer groups split so every parameter gets its lr_mults / wd_mults multiplier (first
    matching glob; 1 otherwise) times its group's LR and weight decay: record-style lr_mul / wd_mul."""
    lr_rules, wd_rules = parse_multipliers(cfg.lr_mults, "lr_mults"), parse_multipliers(cfg.wd_mults, "wd_mults")
    if not lr_rules and not wd_rules:
        return groups

    def mult(rules, p):
        return next((m for glob, m in rules if fnmatch.fnmatchcase(names[id(p)], glob)), 1.0)
    out = []
    for g in groups:
        split = {}
        for p in g["params"]:
            split.setdefault((mult(lr_rules, p), mult(wd_rules, p)), []).append(p)
        for (lr_m, wd_m), ps in split.items():
            out.append({**g, "params": ps, "lr": g["lr"] * lr_m, "weight_decay": g.get("weight_decay", 0.0) * wd_m})
    return out


def build_optimizers(raw, cfg, device, compile=False):
    """[optimizers]. Muon mode: Muon on the 2-D weights inside blocks; Adam on embeddings (embed_lr),
    the untied head (head_lr) and every other parameter (scalar_lr). AdamW mode: one LR, weight
    decay on matrices only. LRs are scaled for the batch size (lr_factor) here, once, and by the
    per-parameter multipliers (lr_mults, wd_mults)."""
    f = lr_factor(cfg)
    betas, fused = (cfg.adam_beta1, cfg.adam_beta2), device.type == "cuda"
    params = list(raw.parameters())
    names = {id(p): n for n, p in raw.named_parameters()}
    if cfg.optimizer == "adamw":
        groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=cfg.weight_decay, lr=cfg.adamw_lr * f),
                  dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0, lr=cfg.adamw_lr * f)]
        opts = [torch.optim.AdamW(with_multipliers(groups, names, cfg), betas=betas, eps=cfg.adam_eps, fused=fused)]
    else:
        hidden = [p for p in raw.blocks.parameters() if p.dim() == 2]
        embeds = [m.weight for m in (raw.wte, raw.wpe, *raw.value_embeds) if m is not None]
        head = [] if raw.cfg.tied else [raw.lm_head.weight]
        taken = {id(p) for p in hidden + embeds + head}
        scalars = [p for p in params if id(p) not in taken]
        adam_groups = [dict(params=ps, lr=lr * f) for ps, lr in
                       ((embeds, cfg.embed_lr), (head, cfg.head_lr), (scalars, cfg.scalar_lr)) if ps]
        muon_groups = [dict(params=hidden, lr=cfg.muon_lr * f, weight_decay=cfg.weight_decay)]
        opts = [torch.optim.Adam(with_multipliers(adam_groups, names, cfg), betas=betas, eps=cfg.adam_eps,
                                 fused=fused),
                Muon(with_multipliers(muon_groups, names, cfg), lr=cfg.muon_lr * f, momentum=cfg.muon_momentum,
                     weight_decay=cfg.weight_decay, compile=compile)]
    assert sum(len(g["params"]) for o in opts for g in o.param_groups) == len(params)
    for o in opts:
        for g in o.param_groups:
            g["peak_lr"] = g["lr"]
    return opts


def lr_multiplier(step, n_steps, cfg):
    """Warmup / stable / cooldown: linear up over warmup_frac of the steps, 1, then linear down to
    final_lr_frac over the last cooldown_frac."""
    progress = step / n_steps
    warmup_steps = math.ceil(cfg.warmup_frac * n_steps)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if cfg.cooldown_frac > 0 and progress > 1 - cfg.cooldown_frac:
        w = (1 - progress) / cfg.cooldown_frac
        return w + (1 - w) * cfg.final_lr_frac
    return 1.0


def set_schedule(opts, step, n_steps, cfg):
    """Set every group's LR (and Muon's momentum) for this step; returns the LR of the hidden
    matrices (Muon's, or AdamW's single LR), the one logged as `lr`."""
    m = lr_multiplier(step, n_steps, cfg)
    warm = min(1.0, step / cfg.muon_momentum_warmup_steps) if cfg.muon_momentum_warmup_steps > 0 else 1.0
    for o in opts:
        for g in o.param_groups:
            g["lr"] = g["peak_lr"] * m
            if isinstance(o, Muon):
                g["momentum"] = cfg.muon_momentum_start + warm * (cfg.muon_momentum - cfg.muon_momentum_start)
    return opts[-1].param_groups[0]["lr"]


# ----------------------------------------------------------------------------------------------
# Run directory (rundir.py owns its files), metrics and W&B


def config_stem(cfg):
    """The config file's name without .py ("run" without one): automatic run names start with it."""
    return os.path.splitext(os.path.basename(cfg.config_file))[0] if cfg.config_file else "run"


def is_automatic_name(cfg, name):
    """Is `name` one the trainer gives a run of this config, <stem>_YYYYmmdd-HHMMSS (sorting by time)?"""
    return re.fullmatch(re.escape(config_stem(cfg)) + r"_\d{8}-\d{6}", name) is not None


def link_latest(cfg, run_dir):
    """out_dir/<stem>_latest -> the run just started, when its name is the automatic one: a stable path
    to the newest run of a config (runs/cpu_demo_latest/...). A relative link, replaced atomically; a
    file or folder of that name that is not such a link is left alone, with a warning."""
    name = os.path.basename(run_dir)
    if not is_automatic_name(cfg, name):
        return
    link = os.path.join(os.path.dirname(run_dir), f"{config_stem(cfg)}_latest")
    if os.path.lexists(link) and not os.path.islink(link):
        print(f"warning: {link} exists and is not a link; it does not follow the newest run", file=sys.stderr)
        return
    temporary = f"{link}.tmp{os.getpid()}"
    try:
        os.symlink(name, temporary)
        os.replace(temporary, link)
    except OSError as e:
        print(f"warning: cannot link {link} -> {name} ({e.strerror or e})", file=sys.stderr)


def choose_run_name(cfg):
    """The run's name, decided before anything is written: a fresh run needs a new (or empty)
    directory; --resume=1 needs one with a checkpoint (default: the newest run of this config)."""
    stem = config_stem(cfg)
    name = cfg.run_name
    if cfg.resume and not name:  # the runs named by the clock below: STEM_YYYYmmdd-HHMMSS sorts by time
        candidates = sorted((d for d in os.listdir(cfg.out_dir) if is_automatic_name(cfg, d)
                             and checkpoints(os.path.join(cfg.out_dir, d))), reverse=True) \
            if os.path.isdir(cfg.out_dir) else []
        if not candidates:
            raise ConfigError(f"--resume=1: no automatically named run of {stem!r} ({stem}_YYYYmmdd-HHMMSS) with a "
                              f"checkpoint under {cfg.out_dir}/; pass --run_name=NAME of the run to continue")
        name = candidates[0]
    name = name or f"{stem}_{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = os.path.join(cfg.out_dir, name)
    if cfg.resume and not checkpoints(run_dir):
        raise ConfigError(f"--resume=1: {run_dir} has no checkpoint to resume from (trained with "
                          "ckpt_every_tokens=-1, or stopped before its first checkpoint); choose another --run_name, "
                          f"or delete {run_dir} to train it again")
    if not cfg.resume and os.path.isdir(run_dir) and os.listdir(run_dir):
        if not checkpoints(run_dir):
            raise ConfigError(f"{run_dir} already holds a run without a checkpoint (trained with ckpt_every_tokens=-1, "
                              f"or stopped before its first checkpoint); choose a new --run_name, or delete {run_dir} "
                              "to train it again")
        raise ConfigError(f"{run_dir} already holds a run; continue it with --resume=1 or choose a new --run_name")
    return name


def check_writable(run_dir):
    """ConfigError unless the run directory can be created and written (a read-only out_dir, a path
    through a file, no permission), found before any training starts. Leaves nothing behind: the
    folders it had to create for the test are removed again."""
    missing = []
    parent = os.path.abspath(run_dir)
    while not os.path.exists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, f".write-test{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"cannot write the run directory {run_dir} ({e.strerror or e}); choose a writable "
                          "--out_dir") from None
    finally:
        for folder in missing:  # deepest first
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)


def resolve_run_dir(cfg, rank):
    """Rank 0 decides (its clock names the run, its file system is the one written to) and checks it
    can write there; every rank gets the same answer, or the same error."""
    decision = None
    if rank == 0:
        try:
            name = choose_run_name(cfg)
            if not cfg.dry_run:
                check_writable(os.path.join(cfg.out_dir, name))
            decision = ("name", name)
        except ConfigError as e:
            decision = ("error", str(e))
    kind, value = broadcast_object(decision, rank)
    if kind == "error":
        raise ConfigError(value)
    cfg.run_name = value
    return os.path.join(cfg.out_dir, value)


def rng_state(device):
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"].cpu())  # RNG states are CPU byte tensors, wherever they were loaded
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def rewind_metrics(run_dir, step):
    """On resume: keep the complete metrics lines up to the checkpoint's step. Lines after it (the
    interrupted stretch that is about to be re-run) and a half-written last line are moved to
    metrics.discarded.jsonl, not deleted. Returns the last step those lines reached."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return step
    keep, drop, last = [], [], step
    with open(path, "rb") as f:
        for line in f.read().splitlines(keepends=True):
            try:
                line_step = json.loads(line)["step"]
                ok = line.endswith(b"\n") and line_step <= step
                last = max(last, line_step)
            except (ValueError, KeyError):
                ok = False
            (keep if ok else drop).append(line)
    if drop:
        with open(os.path.join(run_dir, "metrics.discarded.jsonl"), "ab") as f:
            f.writelines(d if d.endswith(b"\n") else d + b"\n" for d in drop)
    atomic_write(path, lambda f: f.writelines(keep))
    return last


def rewind_spectra(run_dir, tokens):
    """On resume: spectra saved after the checkpoint move to spectra/discarded/ (they are re-measured)."""
    later = [f for family in spectra.FAMILIES for t, f in spectra.spectra_files(run_dir, family) if t > tokens]
    if later:
        os.makedirs(os.path.join(run_dir, "spectra", "discarded"), exist_ok=True)
    for f in later:
        os.replace(f, os.path.join(run_dir, "spectra", "discarded", os.path.basename(f)))


def versions():
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "numpy", "tiktoken", "wandb", "huggingface-hub", "matplotlib"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def git_state():
    def git(*args):
        r = subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None
    commit = git("rev-parse", "HEAD")
    return {"commit": commit, "dirty": bool(git("status", "--porcelain")) if commit else None}


def json_safe(record):
    """Non-finite floats become null so metrics.jsonl stays strict JSON."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


class MetricsLog:
    """metrics.jsonl (one JSON object per line, flushed as written) and W&B with `tokens` as the
    x-axis of every metric. Rank 0 only. A W&B failure is a warning, never a stopped run.
    After a resume (wandb_sent_step >= 0), online: records up to `wandb_sent_step` were already
    sent by the interrupted attempt (W&B history cannot be rewound), so only metrics.jsonl receives
    their re-run. Offline: each attempt writes its own offline-run folder, and `wandb sync` of a
    later folder of the same run id replaces the history of an earlier one (wandb issues #3841,
    #5865), so the resumed attempt's folder first receives every record kept in metrics.jsonl and
    then everything after: the newest folder holds every metrics line (not the eigenvalue
    histograms of the earlier attempts' evaluations)."""

    MILESTONE_STATS = ("alpha_head", "alpha_tail", "rankme")  # copied to the summary at token milestones

    def __init__(self, run_dir, cfg, run_config, wandb_id, wandb_sent_step=-1, labels=(None, None, ())):
        self.run_dir = run_dir
        path = os.path.join(run_dir, "metrics.jsonl")
        # (milestone, key) pairs already in the summary: those of the records kept from an interrupted
        # attempt (sent then), so a resumed run never overwrites them with later values
        self.milestones, self.summarised = parse_milestones(cfg.wandb_milestones), set()
        kept, kept_summary = read_metrics(path)[0] if os.path.exists(path) else [], {}
        for record in kept:
            kept_summary.update(self.milestone_summary(record))
        self.file = open(path, "a")
        self.wandb, self.wandb_sent_step = None, wandb_sent_step
        self.artifact_tokens = None  # tokens of the last spectra artifact logged
        mode = cfg.wandb_mode or os.environ.get("WANDB_MODE") or "offline"
        if mode == "disabled":
            return
        group, job_type, tags = labels
        try:
            import wandb
            self.wandb = wandb.init(project=cfg.wandb_project, group=cfg.wandb_group or group, job_type=job_type,
                                    tags=list(tags), name=cfg.wandb_name or cfg.run_name, id=wandb_id,
                                    resume="allow", config=run_config, dir=run_dir, mode=mode,
                                    settings=wandb.Settings(init_timeout=wandb_init_timeout()))
            self.wandb.define_metric("tokens")
            self.wandb.define_metric("*", step_metric="tokens")
            if mode in ("offline", "dryrun") and wandb_sent_step >= 0:  # a resume: this folder gets every line
                for record in kept:
                    self.wandb.log(record)
                if kept_summary:
                    self.wandb.summary.update(kept_summary)
                self.wandb_sent_step = -1
        except Exception as e:
            self._wandb_failed(e)

    def _wandb_failed(self, e):
        warnings.warn(f"W&B disabled for the rest of this run ({type(e).__name__}: {e}); "
                      "metrics.jsonl is unaffected", stacklevel=2)
        self.wandb = None

    def milestone_summary(self, record):
        """{'<key>@<milestone>': value} for the alphas, RankMe and val_loss of `record` whose milestone
        this is the first record at or past, per key (an evaluation without gradient spectra leaves
        the grad keys to the next one that has them), but before the next milestone (a value @1M is
        never one measured at 10M); each pair is marked as summarised."""
        out = {}
        bounds = sorted(tokens for _, tokens in self.milestones) + [math.inf]
        for label, tokens in self.milestones:
            upper = bounds[bounds.index(tokens) + 1]
            if not tokens <= record.get("tokens", -1) < upper:
                continue
            for k, v in record.items():
                wanted = k == "val_loss" or k.count("/") == 2 and k.split("/")[1] in self.MILESTONE_STATS
                if wanted and v is not None and (label, k) not in self.summarised:
                    self.summarised.add((label, k))
                    out[f"{k}@{label}"] = v
        return out

    def log(self, record, media=None):
        """One line of metrics.jsonl and the same keys to W&B; `media` (histograms) goes to W&B only.
        Milestone copies go to the W&B run summary (milestone_summary), so a sweep table sorts by
        early alpha."""
        record = json_safe(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        summary = self.milestone_summary(record)  # re-sent records count as summarised too
        if self.wandb is None or record["step"] <= self.wandb_sent_step:
            return
        try:
            self.wandb.log({**record, **(media or {})})
            if summary:
                self.wandb.summary.update(summary)
        except Exception as e:
            self._wandb_failed(e)

    def log_spectra_artifact(self, tokens):
        """The npz spectra so far as a W&B artifact (at checkpoints and at the end)."""
        files = [f for family in spectra.FAMILIES for _, f in spectra.spectra_files(self.run_dir, family)]
        if self.wandb is None or not files or tokens == self.artifact_tokens:
            return
        self.artifact_tokens = tokens
        try:
            import wandb
            artifact = wandb.Artifact(f"spectra-{self.wandb.id}", type="spectra", metadata={"tokens": tokens})
            for f in files:
                artifact.add_file(f)
            self.wandb.log_artifact(artifact)
        except Exception as e:
            self._wandb_failed(e)

    def sync(self):
        os.fsync(self.file.fileno())

    def close(self):
        self.sync()
        self.file.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception as e:
                self._wandb_failed(e)


def wandb_init_timeout():
    """Seconds wandb.init may wait for W&B's servers before the run goes on without W&B (a warning):
    WANDB_INIT_TIMEOUT if set, else 30 (wandb's own default, 90, stalls an offline machine's start)."""
    try:
        return float(os.environ.get("WANDB_INIT_TIMEOUT", 30))
    except ValueError:
        return 30.0


# ----------------------------------------------------------------------------------------------
# Distributed helpers (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain python runs one process)


def setup_device_and_dist(cfg):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but CUDA is not available; use --device=cpu")
    device = torch.device(f"cuda:{local_rank}" if want_cuda else "cpu")
    if want_cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if want_cuda else "gloo")
    return rank, world, device


def all_sum(t):
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def broadcast_object(obj, rank):
    if not dist.is_initialized():
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj):
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def close_process_group():
    """Wait for every rank, then end the process group. Gloo's worker threads free the tensors of
    the last collectives under the GIL, while the process group's destructor joins those threads
    holding it: a pause that releases the GIL first avoids the rare deadlock this makes at exit
    (seen as a hung rank after a final all_gather_object and barrier)."""
    if dist.is_initialized():
        dist.barrier()
        time.sleep(0.2)
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Evaluation: the validation loss, the spectra, the in-run forecast; one metrics line


@torch.no_grad()
def val_loss(model, val, cfg, rank, world, device, autocast):
    """Mean next-token loss over the fixed val slice. Sequence i goes to rank i % world; sums and
    counts are reduced, so the value does not depend on the number of processes."""
    model.eval()
    n_seq = (len(val) - 1) // cfg.seq_len
    mine = list(range(rank, n_seq, world))
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for i in range(0, len(mine), cfg.device_batch_size):
        idx = mine[i:i + cfg.device_batch_size]
        rows = torch.stack([val[j * cfg.seq_len: (j + 1) * cfg.seq_len + 1] for j in idx]).to(device)
        with autocast:
            _, loss = model(rows[:, :-1], rows[:, 1:])
        total += torch.stack([loss.double() * rows[:, 1:].numel(), torch.tensor(rows[:, 1:].numel(), device=device)])
    model.train()
    all_sum(total)
    return (total[0] / total[1]).item()


def crossed_multiple(every, tokens, tokens_per_step):
    """Did the step that ended at `tokens` cross a multiple of `every` (> 0)? (eval/ckpt cadence)"""
    return every > 0 and tokens // every > (tokens - tokens_per_step) // every


def spectral_eval(cfg, step, n_steps, tokens_per_step):
    """Which spectra the evaluation at `step` measures: a subset of {"act", "grad"}. Evaluations
    happen at step 0 and at every step that crosses a multiple of eval_every_tokens; activation
    spectra at every spectra_every-th of them (the first included), gradient and weight spectra at
    every grad_spectra_every-th of those, and both at the last step."""
    index = sum(crossed_multiple(cfg.eval_every_tokens, s * tokens_per_step, tokens_per_step)
                for s in range(1, step + 1))
    return spectral_families(cfg, index, last=step == n_steps)


def spectral_families(cfg, index, last):
    """spectral_eval of the evaluation numbered `index` (0 at step 0), `last` at the run's last step."""
    act = cfg.spectra_every > 0 and (index % cfg.spectra_every == 0 or last)
    grad = act and cfg.grad_spectra_every > 0 and (index % (cfg.spectra_every * cfg.grad_spectra_every) == 0 or last)
    return {family for family, on in (("act", act), ("grad", grad)) if on}


# The spectral passes run in full fp32 (no TF32: exact), training in bf16 on tensor cores: on an
# H200 training reaches ~400 TFLOP/s (MFU 0.40) and the fp32 passes 35-45 TFLOP/s, so a FLOP of
# theirs costs about 10 of training's. On a CPU both run in fp32 (1). bf16/tf32 gradient passes: ~1.
# Calibration on d12 (H200, README): the activation pass took 1.0 s, 0.96% of the training between
# evaluations, which this estimate gives (0.9%); the gradient spectra took 13.6 s, twice their
# estimate (small batches, the head's chunks, G formed per example), hence GRAD_PASS_OVERHEAD.
FP32_SLOWDOWN = {"cuda": 10.0, "cpu": 1.0}
GRAD_PASS_OVERHEAD = 2.0


def evaluation_steps(cfg, n_steps, tokens_per_step):
    """The steps at which the run evaluates: 0, every step crossing a multiple of eval_every_tokens,
    and the last (none with eval_every_tokens = -1)."""
    if cfg.eval_every_tokens < 0:
        return []
    every = [s for s in range(1, n_steps) if crossed_multiple(cfg.eval_every_tokens, s * tokens_per_step,
                                                               tokens_per_step)]
    return [0, *every, n_steps]


def spectra_cost(cfg, gcfg, settings, points, n_steps, tokens_per_step):
    """Estimated share of training time that the run's spectral evaluations take, from FLOP counts:
    {"act_evals": n, "grad_evals": n, device type: {"act": share, "grad": share}}. Training:
    GPT.flops_per_token per token. Activation spectra: one forward (a third of that) over the probe
    tokens plus 2 d^2 per token and point for the covariance. Gradient spectra: a forward and a
    backward without weight gradients (two thirds) over grad_samples sequences, plus per matrix the
    per-example outer products (2 d_in d_out per token) and K = G G^T (2 n^2 d_in d_out). Fits,
    files and plots are left out (about a second per evaluation at d12 on an H200). An estimate:
    bench/spectra_overhead.py measures it."""
    with torch.device("meta"):
        meta = GPT(gcfg)
    per_token = meta.flops_per_token()
    train_flops = per_token * n_steps * tokens_per_step
    steps = evaluation_steps(cfg, n_steps, tokens_per_step)
    evals = [spectral_families(cfg, index, step == n_steps) for index, step in enumerate(steps)]
    n_act, n_grad = sum("act" in e for e in evals), sum("grad" in e for e in evals)
    act_tokens = settings.probe_tokens("act")
    act = per_token / 3 * act_tokens + sum(2 * probe_point_width(p, gcfg.n_embd) ** 2 * act_tokens for p in points)
    n, grad_tokens = settings.grad_samples, settings.probe_tokens("grad")
    linears = meta.linears()
    shapes = [linears[m].weight.shape for m in settings.matrix_names(linears, gcfg.n_layer)] if n_grad else []
    grad = per_token * 2 / 3 * grad_tokens + sum(2 * (grad_tokens + n * n) * o * i for o, i in shapes)
    cost = dict(act_evals=n_act, grad_evals=n_grad)
    for device_type, slow in FP32_SLOWDOWN.items():
        grad_slow = (slow if settings.precision == "fp32" else 1.0) * GRAD_PASS_OVERHEAD
        cost[device_type] = dict(act=n_act * act * slow / train_flops, grad=n_grad * grad * grad_slow / train_flops)
    return cost


@dataclass
class Session:
    """One attempt at a run, from its start to its end: what the training loop shares with the
    functions it calls (resume, open_run, evaluate_and_log, log_interval, save_checkpoint), passed to
    them explicitly. The fields above `reference` are fixed at the start; those below are set by
    resume and open_run or grow as the run goes (the log, the history, the records so far)."""
    cfg: Config
    gcfg: GPTConfig
    settings: spectra.SpectraSettings
    rank: int
    world: int
    device: torch.device
    autocast: object                 # bf16 autocast on CUDA, a no-op on CPU
    run_dir: str
    n_steps: int
    tokens_per_step: int
    raw: GPT                         # the module itself (hooks, state dicts)
    model: object                    # raw, compiled or not (validation loss)
    opts: list
    loader: object                   # TrainLoader
    val: torch.Tensor                # the fixed val slice
    probe: object                    # the spectra's probe slice of the val split (None: spectra off)
    points: list                     # probe points of the activation spectra
    matrices: list                   # Linear layers of the gradient and weight spectra
    reference: object = None         # analyze.ForecastReference of the in-run forecast
    band: object = None              # (tokens, latents) of the feature probes (None: no band)
    wandb_id: str = ""
    elapsed_before: float = 0.0      # wall clock of earlier attempts
    t_start: float = field(default_factory=time.time)
    log: object = None               # MetricsLog, rank 0 only
    history: object = None           # spectra.SpectraHistory, rank 0 only
    notes: object = field(default_factory=measure.Notes)
    own_records: list = field(default_factory=list)  # this run's evaluations so far (the in-run forecast)
    train_losses: list = field(default_factory=list)  # logged train_loss values of this attempt
    warned_uniform: bool = False

    def elapsed(self):
        """Wall clock of the run across resumes."""
        return self.elapsed_before + time.time() - self.t_start


def measure_spectra(s, families):
    """{family: spectra} of the families asked for (grad brings weight), from the uncompiled module
    in eval mode: parameters, .grad, optimizer state, RNG and data position are untouched. Every
    rank takes part; the spectra are complete on rank 0 (None elsewhere)."""
    measured = {}
    if "act" in families:
        measured["act"] = spectra.measure_activations(s.raw, s.probe, s.settings, s.points, s.rank, s.world)
    if "grad" in families:
        measured["grad"] = spectra.measure_gradients(s.raw, s.probe, s.settings, s.matrices, s.rank, s.world)
        measured["weight"] = spectra.measure_weights(s.raw, s.matrices, s.settings) if s.rank == 0 else None
    return measured


def evaluate_and_log(s, step):
    """Evaluate at `step`: the validation loss, the spectra this evaluation measures (spectral_eval)
    and their report (measure.report: npz, figures, table), the in-run forecast, one metrics line.
    Diverged on a non-finite validation loss; True when target_val_loss is reached."""
    t0, tokens = time.time(), step * s.tokens_per_step
    s.raw.set_progress(step / s.n_steps)  # the masks (window) of this step, for the loss and the spectra
    loss = val_loss(s.model, s.val, s.cfg, s.rank, s.world, s.device, s.autocast)
    if not math.isfinite(loss):
        raise diverged(s, step, f"val_loss is {loss}")
    measured = measure_spectra(s, spectral_eval(s.cfg, step, s.n_steps, s.tokens_per_step))
    if s.log:
        print(f"step {step:6d}/{s.n_steps} | tokens {human(tokens)} | val_loss {loss:.4f} | "
              f"eval {time.time() - t0:.1f}s")
        record = dict(step=step, tokens=tokens, val_loss=loss)
        for family, spec in measured.items():
            record.update(measure.report(family, spec, s.settings, s.run_dir, step, tokens, s.gcfg.n_layer, s.history,
                                         s.notes, where=f"at step {step}", figures=s.cfg.spectra_plots))
        if s.band is not None:
            probes = features.measure_band(s.raw, *s.band, point=s.cfg.probe_point, seed=s.cfg.seed)
            record.update(probes)
            print(features.summary_line(probes, s.cfg.probe_point))
        record["elapsed_s"] = s.elapsed()
        if s.reference:
            s.own_records.append(json_safe(record))
            record.update(s.reference.metrics(s.own_records, tokens))
            if "forecast/token_ratio" in record:
                print(f"forecast: {record['forecast/token_ratio']:.3f}x the reference family's best tokens to "
                      f"val_loss {s.reference.target:.4g} (from {record['forecast/predictor']}, leave-one-out "
                      f"error {record['forecast/loo_error']:.3f})")
        s.log.log(record, media=spectrum_histograms(measured) if s.log.wandb is not None else None)
    reached = 0 < s.cfg.target_val_loss and loss <= s.cfg.target_val_loss
    if reached and s.log:
        print(f"reached target_val_loss={s.cfg.target_val_loss} at {human(tokens)} tokens")
    return reached


def spectrum_histograms(measured, per_family=3):
    """{"<family>/log_spectrum/<name>": wandb.Histogram of log10 of the positive finite eigenvalues
    (act) or singular values (grad, weight)} for the first, middle and last measured point (or
    matrix) of each family: the shape of whole spectra in W&B panels, beside the scalar fits."""
    import wandb
    out = {}
    for family, spec in measured.items():
        names = list(spec)
        for name in dict.fromkeys(names[i] for i in np.linspace(0, len(names) - 1, per_family).round().astype(int)):
            values = np.asarray(spec[name]["values"])
            values = values[np.isfinite(values) & (values > 0)]
            if len(values):
                out[f"{family}/log_spectrum/{name}"] = wandb.Histogram(np.log10(values))
    return out


def load_forecast_reference(cfg, gcfg):
    """analyze.ForecastReference of the in-run forecast, or None when it is off; ConfigError before
    anything is written when analyze's policy refuses the reference (analyze.load_forecast_reference)."""
    if not cfg.forecast_reference:
        return None
    this_run = analyze.Run("this run", RunRecord(config=asdict(cfg), model=asdict(gcfg)), [])
    try:
        return analyze.load_forecast_reference([p.strip() for p in cfg.forecast_reference.split(",") if p.strip()],
                                               this_run, cfg.forecast_target_loss or cfg.target_val_loss)
    except analyze.AnalysisError as e:
        raise ConfigError(f"forecast_reference={cfg.forecast_reference!r}: {e}") from None


# ----------------------------------------------------------------------------------------------
# The log interval, divergence, checkpoints and resuming


class LogInterval:
    """The steps since the last log line: their summed loss (kept on the device, so no step waits
    for it), the step they began at, and how long they trained. Evaluations and checkpoints pause
    its clock, so tokens_per_s is training throughput. Its state goes into checkpoints, so that a
    resumed run's next train_loss and tokens_per_s average the same steps as an uninterrupted run's
    (each rank's own loss sum, bitwise)."""

    def __init__(self, step, device):
        self.start, self.loss_sum, self.t0, self.paused = step, torch.zeros((), device=device), time.time(), None
        self.first_step, self.train_time = step, 0.0  # the ETA's rate: this attempt's steps and training time

    def add(self, loss):
        self.loss_sum += loss

    def pause(self):
        self.paused = time.time()

    def resume(self):
        self.t0 += time.time() - self.paused
        self.paused = None

    def seconds(self):
        return (self.paused or time.time()) - self.t0

    def close(self, step, world):
        """(mean train loss over the interval's steps and all ranks, its training seconds); the next
        interval starts at `step`. Waits for the device (.item())."""
        loss = (all_sum(self.loss_sum) / (world * (step - self.start))).item()
        seconds = self.seconds()
        self.train_time += seconds
        self.start, self.loss_sum, self.t0 = step, torch.zeros_like(self.loss_sum), time.time()
        return loss, seconds

    def eta(self, step, n_steps):
        return (n_steps - step) * self.train_time / max(1, step - self.first_step)

    def state(self):
        """For a checkpoint; every rank takes part (each rank's loss sum is gathered)."""
        return dict(start=self.start, train_s=self.seconds(), loss_sums=gather_objects(self.loss_sum.item()))

    def restore(self, state, rank):
        """Continue an interval a checkpoint was written in."""
        self.start, self.first_step = state["start"], state["start"]
        self.t0 = time.time() - state["train_s"]
        self.loss_sum.fill_(state["loss_sums"][rank])


class Diverged(RuntimeError):
    """A non-finite loss or weights: the run stops, and what is non-finite is never checkpointed."""


def diverged(s, step, what):
    rates = "adamw_lr" if s.cfg.optimizer == "adamw" else "muon_lr, embed_lr, head_lr, scalar_lr"
    saved = checkpoints(s.run_dir)
    kept = f"the last checkpoint, {saved[-1]}, is from before it" if saved else "no checkpoint was written"
    return Diverged(f"training diverged at step {step}: {what}; lower the learning rates ({rates}) or set grad_clip "
                    f"(e.g. --grad_clip=1.0) and train again; {kept}")


def back_at_uniform(losses, vocab_size, patience=3, tolerance=0.02):
    """Has the train loss climbed back to ln(vocab_size), the loss of a uniform prediction over the
    vocabulary, after falling clearly below it (by 10%), and stayed within `tolerance` of it (or
    above) for the last `patience` log lines? A finite loss that does this has collapsed."""
    level = math.log(vocab_size)
    earlier, recent = losses[:-patience], losses[-patience:]
    return (len(recent) == patience and bool(earlier) and min(earlier) < 0.9 * level
            and all(loss >= (1 - tolerance) * level for loss in recent))


def log_interval(s, interval, step, lr):
    """The log line at `step`: mean train loss of the interval (Diverged if it is not finite), learning
    rate, throughput, ETA; a warning, once, when the loss is back at the uniform level."""
    n = step - interval.start
    train_loss, seconds = interval.close(step, s.world)
    if not math.isfinite(train_loss):
        raise diverged(s, step, f"train_loss is {train_loss} (the mean of steps {step - n + 1}-{step})")
    s.train_losses.append(train_loss)
    if not s.warned_uniform and back_at_uniform(s.train_losses, s.gcfg.vocab_size):
        s.warned_uniform = True
        if s.rank == 0:
            print(f"warning: train_loss {train_loss:.3f} at step {step} is back at ln(vocab_size) = "
                  f"{math.log(s.gcfg.vocab_size):.3f}, the loss of a uniform prediction, after falling below it: the "
                  "model has collapsed; lower the learning rates or set grad_clip", file=sys.stderr)
    if s.log:
        tokens, tps = step * s.tokens_per_step, n * s.tokens_per_step / seconds
        s.log.log(dict(step=step, tokens=tokens, train_loss=train_loss, lr=lr, tokens_per_s=tps, elapsed_s=s.elapsed()))
        print(f"step {step:6d}/{s.n_steps} | tokens {human(tokens)} | loss {train_loss:.4f} | lr {lr:.3g} | "
              f"{human(tps)} tok/s | eta {duration(interval.eta(step, s.n_steps))}")


def check_finite(s, step, interval):
    """Diverged unless the weights and every step loss since the last log line are finite on every
    rank: the check before a checkpoint (its synchronisation is the checkpoint's, not a step's)."""
    bad = (~interval.loss_sum.isfinite()).float() + (~torch.stack([p.isfinite().all() for p in s.raw.parameters()])
                                                      ).any().float()
    if all_sum(bad).item() > 0:
        raise diverged(s, step, "the weights or a step's loss are not finite")


def save_checkpoint(s, step, interval):
    """Every rank: check the state is finite (a non-finite checkpoint is never written, so it cannot
    push out good ones) and gather the RNG states and the interval; rank 0 writes ckpt/step_N.pt,
    with the metrics up to this step on disk first."""
    check_finite(s, step, interval)
    ckpt = Checkpoint(model=s.raw.state_dict(), model_config=asdict(s.gcfg), config=asdict(s.cfg), step=step,
                      tokens=step * s.tokens_per_step, optimizers=[o.state_dict() for o in s.opts],
                      data=s.loader.state_dict(), rng=gather_objects(rng_state(s.device)), elapsed_s=s.elapsed(),
                      wandb_id=s.wandb_id, interval=interval.state(), progress=step / s.n_steps)
    if s.log:
        s.log.sync()
        ckpt.save(s.run_dir, s.cfg.ckpt_keep)
        s.log.log_spectra_artifact(step * s.tokens_per_step)


def resume_checkpoint(run_dir, mmap=False):
    """(path, Checkpoint): the newest checkpoint of the run that loads, each newer one that does not
    named in a warning (on rank 0, once); ConfigError when none loads."""
    try:
        return newest_checkpoint(run_dir, mmap=mmap, warn=warn_once)
    except RunFileError as e:
        raise ConfigError(f"--resume=1: {e}") from None


@functools.cache
def warn_once(message):
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: {message}", file=sys.stderr)


def resume(s, ckpt):
    """Continue from a checkpoint: weights, optimizers, data position, RNG and clocks. The model and
    what the spectra measure must be as the run was trained (ConfigError otherwise). Returns the step
    to continue from and the log interval in progress (LogInterval.restore; None when it was saved
    by another number of processes: the next line then averages the steps since the resume)."""
    if ckpt.model_config != asdict(s.gcfg):
        diff = {k: (ckpt.model_config.get(k), v) for k, v in asdict(s.gcfg).items() if ckpt.model_config.get(k) != v}
        raise ConfigError(f"--resume=1: the model config differs from the checkpoint's, "
                          f"{{key: (checkpoint, now)}} = {diff}")
    before = spectra.SpectraSettings.from_config(ckpt.config)  # a setting the checkpoint lacks had its default
    for key, was, now in (("batch_size", ckpt.config["batch_size"], s.cfg.batch_size),
                          ("seq_len", ckpt.config["seq_len"], s.cfg.seq_len),
                          ("grad_spectra_precision", before.precision, s.settings.precision)):
        if was != now:
            raise ConfigError(f"--resume=1: {key}={now!r} but the run was trained with {key}={was!r}; resume with "
                              "the same value")
    s.raw.load_state_dict(ckpt.model)
    for o, state in zip(s.opts, ckpt.optimizers):
        o.load_state_dict(state)
    s.loader.load_state_dict(ckpt.data)
    s.elapsed_before, s.wandb_id = ckpt.elapsed_s, ckpt.wandb_id
    if len(ckpt.rng) == s.world:
        set_rng_state(ckpt.rng[s.rank], s.device)
    elif s.rank == 0:
        print(f"warning: resuming on {s.world} processes from a checkpoint of {len(ckpt.rng)}: dropout RNG streams "
              "restart", file=sys.stderr)
    return ckpt.step, ckpt.interval if ckpt.interval and len(ckpt.interval["loss_sums"]) == s.world else None


def open_run(s, step, derived):
    """Rank 0: the run directory for this attempt (config.json for a new run; for a resumed one its
    metrics and spectra rewound to the checkpoint), stale temporary files of a killed writer removed,
    the console header, the metrics log and W&B, and the spectral history so far."""
    if s.rank != 0:
        return
    cfg, gcfg = s.cfg, s.gcfg
    # W&B group, job type and tags: decided at the run's start and kept, so a resume needs no init_from source
    labels = (saved_labels(s.run_dir) if cfg.resume else None) or run_labels(cfg, gcfg)
    record = RunRecord(config=asdict(cfg), model=asdict(gcfg), derived=derived, labels=list(labels),
                       spectra=s.settings.record(gcfg.n_layer, s.points, s.matrices), wandb_id=s.wandb_id,
                       metric_version=spectra.METRIC_VERSION, git=git_state(), versions=versions(),
                       device=torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else "cpu")
    os.makedirs(s.run_dir, exist_ok=True)
    for path in remove_stale_temporaries(s.run_dir):
        print(f"removed {path}, left by a writer that was killed")
    wandb_sent_step = -1
    if cfg.resume:
        wandb_sent_step = rewind_metrics(s.run_dir, step)
        rewind_spectra(s.run_dir, step * s.tokens_per_step)
    else:
        record.save(s.run_dir)
        link_latest(cfg, s.run_dir)
    print(describe(cfg, gcfg, s.raw.param_counts(), derived, every_key=False))
    print(f"run directory: {s.run_dir}")
    s.log = MetricsLog(s.run_dir, cfg, dataclasses.asdict(record), s.wandb_id, wandb_sent_step, labels)
    s.history = spectra.SpectraHistory.load(s.run_dir, s.settings, math.inf) if cfg.resume else \
        spectra.SpectraHistory(s.settings)
    if s.reference and cfg.resume:  # the in-run forecast reads the evaluations of the interrupted attempts too
        s.own_records = [json_safe(r) for r in read_metrics(os.path.join(s.run_dir, "metrics.jsonl"))[0]]


# ----------------------------------------------------------------------------------------------
# Console


def human(n):
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def duration(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def describe(cfg, gcfg, counts, derived, every_key=True):
    """The console header: config, model, derived sizes and parameter counts. A run prints only the
    keys its config file and command line changed (config.json holds them all); a dry run all."""
    defaults = asdict(Config())
    changed = {k: v for k, v in asdict(cfg).items() if k != "model" and (every_key or v != defaults[k])}
    lines = ["config:" if every_key else "config (keys changed from the defaults; config.json holds every key):"]
    lines += [f"  {k} = {v!r}" for k, v in changed.items()]
    lines += ["model:"] + [f"  {k} = {v!r}" for k, v in asdict(gcfg).items()]
    lines += ["derived:"] + [f"  {k} = {v!r}" for k, v in derived.items()]
    L, d = gcfg.n_layer, gcfg.n_embd
    lines.append(f"parameters: {counts['total']:,} total | blocks {counts['blocks']:,} "
                 f"(12*L*d^2 = 12*{L}*{d}^2 = {12 * L * d * d:,}) | embeddings {counts['embed']:,} | "
                 f"value embeddings {counts['value_embeds']:,} | head {counts['head']:,} | other {counts['other']:,}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Training


def preflight(cfg, gcfg, settings, n_steps, tokens_per_step):
    """Every problem a launch would stop at, found without training: the train and val shards, the
    output folder, the forecast reference. Returns (problems, warnings) as lines of text."""
    problems, notes = [], []
    checks = [("train data", lambda: open_train_shards(cfg.train_files, tokens_per_step, n_steps * tokens_per_step,
                                                       rank=0)),
              ("val data", lambda: load_val_and_probe(cfg, gcfg, settings)),
              ("probe band", lambda: load_band(cfg, gcfg)),
              ("output", lambda: check_writable(os.path.join(cfg.out_dir, choose_run_name(cfg)))),
              ("forecast reference", lambda: load_forecast_reference(cfg, gcfg))]
    for what, check in checks:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                check()
            except (ConfigError, ShardError, RunFileError, ValueError) as e:
                budget = n_steps * tokens_per_step
                need = f" (this run reads {human(budget)} tokens: --train_shards {math.ceil(budget / 1e8)})" \
                    if what == "train data" and "fineweb" in cfg.train_files else ""
                problems.append(f"{what}: {e}{need}")
        notes += [f"{what}: {w.message}" for w in caught]
    return problems, notes


def dry_run(cfg, gcfg, settings, points, derived, rank):
    """--dry_run=1: the resolved config, the model's size, the spectra's estimated cost and every
    problem preflight finds; ConfigError (exit 2) when there is one. Writes nothing."""
    if rank != 0:
        return None
    with torch.device("meta"):
        counts = GPT(gcfg).param_counts()
    print(describe(cfg, gcfg, counts, derived))
    cost = spectra_cost(cfg, gcfg, settings, points, derived["total_steps"], derived["tokens_per_step"])
    for device_type, how in (("cuda", "CUDA, bf16 training"), ("cpu", "CPU, fp32 training")):
        share = cost[device_type]
        print(f"spectra cost on {how} (estimated from FLOPs): activation spectra at {cost['act_evals']} evaluations "
              f"{share['act']:.1%} + gradient and weight spectra at {cost['grad_evals']} {share['grad']:.1%} = "
              f"{share['act'] + share['grad']:.1%} of training time")
    problems, notes = preflight(cfg, gcfg, settings, derived["total_steps"], derived["tokens_per_step"])
    need = spectra.min_probe_tokens(gcfg.n_embd)
    if cfg.spectra_every and settings.probe_tokens("act") < need:
        notes.append(f"spectra_tokens={cfg.spectra_tokens:,} is below the {need:,} tokens that keep the bias of "
                     f"alpha under 0.02 at width {gcfg.n_embd} even if every token were an independent sample "
                     "(bench/estimator_bias.py); raise spectra_tokens, or compare alphas only between runs of the "
                     "same probe size")
    for note in notes:
        print(f"warning: {note}")
    if problems:
        raise ConfigError(f"dry run: {len(problems)} problem(s) a launch would stop at:\n"
                          + "\n".join(f"  - {p}" for p in problems))
    print("dry run: data, output folder and settings are ready")
    return None




def train(cfg):
    """Train per cfg; returns the run directory (None for a dry run)."""
    gcfg, settings = model_config(cfg), spectral_settings(cfg)
    rank, world, device = (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), None) \
        if cfg.dry_run else setup_device_and_dist(cfg)
    cfg.device_batch_size, grad_accum = batch_layout(cfg, world)
    n_steps, tokens_per_step = total_steps(cfg), cfg.batch_size * cfg.seq_len
    points = settings.point_names(gcfg.n_layer) if cfg.spectra_every else []
    derived = dict(world_size=world, grad_accum=grad_accum, tokens_per_step=tokens_per_step, total_steps=n_steps,
                   total_tokens=n_steps * tokens_per_step, lr_factor=round(lr_factor(cfg), 6),
                   spectra_points=len(points),
                   spectra_memory_gib=round(spectra.stats_memory(points, gcfg.n_embd) / 2**30, 3))
    if cfg.dry_run:
        return dry_run(cfg, gcfg, settings, points, derived, rank)

    # Everything that can fail on bad input fails here, before anything is written.
    train_files = open_train_shards(cfg.train_files, tokens_per_step, n_steps * tokens_per_step, rank)
    loader = TrainLoader(train_files, cfg, rank, world, device, gcfg.vocab_size)
    val, probe = load_val_and_probe(cfg, gcfg, settings)
    band = load_band(cfg, gcfg)
    reference = load_forecast_reference(cfg, gcfg)  # every rank: a bad one fails on all alike
    run_dir = resolve_run_dir(cfg, rank)
    ckpt_path, ckpt = resume_checkpoint(run_dir) if cfg.resume else (None, None)
    use_compile = cfg.compile if cfg.compile is not None else device.type == "cuda"
    if use_compile and gcfg.window_start:  # a graph per window of the ramp (GPT.set_progress), not a fallback to eager
        n_windows = (gcfg.window - gcfg.window_start) // (gcfg.window_block or 64) + 1
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, n_windows + 8)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    raw = initial_model(cfg, gcfg).to(device)
    model = torch.compile(raw) if use_compile else raw
    train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    opts = build_optimizers(raw, cfg, device, compile=use_compile)
    torch.manual_seed(cfg.seed + 1 + rank)  # per-rank stream for dropout
    with torch.device("meta"):
        matrices = settings.matrix_names(GPT(gcfg).linears(), gcfg.n_layer) \
            if cfg.spectra_every and cfg.grad_spectra_every else []
    # a W&B sweep agent names the run it launched in WANDB_RUN_ID; otherwise a fresh id
    s = Session(cfg, gcfg, settings, rank, world, device, autocast, run_dir, n_steps, tokens_per_step, raw, model,
                opts, loader, val, probe, points, matrices, reference, band,
                wandb_id=os.environ.get("WANDB_RUN_ID") or secrets.token_hex(4))
    step, resumed_interval = resume(s, ckpt) if ckpt else (0, None)
    del ckpt  # weights and optimizer state are in place: no second copy in host memory for the run
    if ckpt_path and rank == 0:
        print(f"resuming {run_dir} from step {step} (checkpoint {ckpt_path})")
    stop_step = n_steps if cfg.stop_tokens == 0 else min(n_steps, math.ceil(cfg.stop_tokens / tokens_per_step))
    if step >= stop_step:  # nothing left: no new W&B folder, no files touched
        if rank == 0:
            print(f"{run_dir} is finished (step {step} of {n_steps}); nothing to do" if step >= n_steps else
                  f"{run_dir} is at step {step}, past stop_tokens={cfg.stop_tokens}; nothing to do")
        close_process_group()
        return run_dir
    open_run(s, step, derived)

    done = evaluate_and_log(s, step) if step == 0 and cfg.eval_every_tokens >= 0 else False
    interval = LogInterval(step, device)  # throughput counts training time only: it starts after the first eval
    if resumed_interval:  # resumed within a log interval: continue it
        interval.restore(resumed_interval, rank)
    while step < stop_step and not done:
        lr = set_schedule(opts, step, n_steps, cfg)
        raw.set_progress(step / n_steps)  # a growing attention window follows training progress
        for m, (x, y) in enumerate(loader.next_step(grad_accum)):
            sync = m == grad_accum - 1  # DDP all-reduces gradients on the last micro-step only
            with (train_model.no_sync() if world > 1 and not sync else nullcontext()), autocast:
                _, loss = train_model(x, y)
            (loss / grad_accum).backward()
            interval.add(loss.detach() / grad_accum)  # on the device: no synchronisation per step
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
        step += 1
        tokens = step * tokens_per_step

        evaluating = cfg.eval_every_tokens >= 0 and (
            step in (n_steps, stop_step) or crossed_multiple(cfg.eval_every_tokens, tokens, tokens_per_step))
        if step % cfg.log_every == 0 or step == n_steps or evaluating:  # a train loss beside every val loss
            log_interval(s, interval, step, lr)
        interval.pause()  # evaluations and checkpoints are not training throughput
        if evaluating:
            done = evaluate_and_log(s, step)
        if cfg.ckpt_every_tokens >= 0 and (step in (n_steps, stop_step) or done
                                           or crossed_multiple(cfg.ckpt_every_tokens, tokens, tokens_per_step)):
            save_checkpoint(s, step, interval)
        interval.resume()

    if s.log:
        s.log.log_spectra_artifact(step * tokens_per_step)  # unless the final checkpoint just did
        s.log.close()
    close_process_group()
    return run_dir


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(config_help())
        return
    try:
        cfg = load_config(argv)
        train(cfg)
    except (ConfigError, ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (Diverged, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
