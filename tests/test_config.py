import glob
import os
import re
import subprocess
import sys
from dataclasses import replace

import pytest

import spectra
import train_gpt
from data import modarith
from conftest import DEMO, REPO, run_command, tiny_args
from train_gpt import ConfigError, load_config


def write(tmp_path, text, name="cfg.py"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_layers_of_config_override_in_order(tmp_path):
    path = write(tmp_path, "batch_size = 64\nseq_len = 256\nqk_norm = False\ntrain_tokens = 1e9\n")
    cfg = load_config([path, "--seq_len=128", "--qk_norm=1", "--softcap=0"])
    assert (cfg.batch_size, cfg.seq_len, cfg.train_tokens) == (64, 128, 10 ** 9)
    assert cfg.device_batch_size == train_gpt.Config().device_batch_size  # untouched default
    assert cfg.model == {"qk_norm": True, "softcap": 0.0}
    gcfg = train_gpt.model_config(cfg)
    assert (gcfg.qk_norm, gcfg.softcap, gcfg.seq_len) == (True, 0.0, 128)


def test_unknown_key_in_file_names_file_key_and_closest(tmp_path):
    path = write(tmp_path, "batch_szie = 64\n")
    match = rf"{re.escape(path)}: unknown config key 'batch_szie'; did you mean batch_size"
    with pytest.raises(ConfigError, match=match):
        load_config([path])


def test_unknown_key_on_command_line_suggests_model_keys_too():
    with pytest.raises(ConfigError, match=r"command line: unknown config key 'qknorm'; did you mean qk_norm"):
        load_config([DEMO, "--qknorm=0"])


@pytest.mark.parametrize("arg,match", [
    ("--batch_size=abc", r"batch_size='abc' is not a valid int"),
    ("--batch_size=1.5", r"batch_size='1.5' is not a valid int"),
    ("--qk_norm=maybe", r"qk_norm='maybe' is not a valid bool"),
    ("--muon_lr=fast", r"muon_lr='fast' is not a valid float"),
    ("--optimizer=sgd", r"optimizer='sgd' is not one of"),
    ("--preset=gpt3", r"unknown model preset 'gpt3'; known: \['gpt2', 'modded'\]"),
    ("--pos=alibi", r"pos='alibi' is not one of"),
    ("--warmup_frac=2", r"warmup_frac=2.0 must be in \[0, 1\]"),
    ("--n_embd=0", r"n_embd=0 must be positive"),
    ("--n_layer=-2", r"n_layer=-2 must be positive"),
    ("--rope_base=0", r"rope_base=0.0 must be positive"),
    ("--muon_lr=-0.1", r"muon_lr=-0.1 must be >= 0"),
    ("--adam_eps=-1", r"adam_eps=-1.0 must be >= 0"),
    ("--adam_beta1=1.5", r"adam_beta1=1.5 must be in \[0, 1\)"),
    ("--muon_momentum=1", r"muon_momentum=1.0 must be in \[0, 1\)"),
    ("batch_size=3", r"expected --key=value"),
    ("--muon_lr=nan", r"muon_lr=nan is not a finite number"),
    ("--adamw_lr=inf", r"adamw_lr=inf is not a finite number"),
    ("--softcap=nan", r"softcap=nan is not a finite number"),
    ("--eval_every_tokens=-5", r"eval_every_tokens=-5: a token count > 0, or 0 evaluates at the start and the end "
                               r"only, -1 never"),
    ("--ckpt_every_tokens=-7", r"ckpt_every_tokens=-7: a token count > 0, or 0 checkpoints at the end only, -1 never"),
    ("--spectra_every=-1", r"spectra_every=-1 must be >= 0"),
    ("--max_steps=-3", r"max_steps=-3 must be >= 0 \(0: no limit of this kind\)"),
    ("--train_tokens=-5", r"train_tokens=-5 must be >= 0"),
    ("--weight_density_rule=powerlaw", r"weight_density_rule='powerlaw': valid values are weightwatcher, exact"),
])
def test_bad_values_are_config_errors(arg, match):
    with pytest.raises(ConfigError, match=match):
        load_config([DEMO, arg])


def test_wrong_type_in_file(tmp_path):
    path = write(tmp_path, 'batch_size = "64"\n')
    with pytest.raises(ConfigError, match=rf"{re.escape(path)}: batch_size='64' is not a valid int"):
        load_config([path])


def test_missing_and_broken_config_files(tmp_path):
    with pytest.raises(ConfigError, match="config file 'nope.py' not found"):
        load_config(["nope.py"])
    path = write(tmp_path, "batch_size = 64 +\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(path)}: cannot execute config file: SyntaxError"):
        load_config([path])


def test_typed_parsing_from_the_command_line():
    cfg = load_config([DEMO, "--compile=auto", "--resume=yes", "--train_tokens=2_000_000", "--max_steps=1e3"])
    assert cfg.compile is None and cfg.resume is True and cfg.train_tokens == 2_000_000 and cfg.max_steps == 1000
    assert load_config([DEMO, "--compile=0"]).compile is False


def test_grad_accumulation_error_shows_the_arithmetic_and_valid_choices():
    cfg = load_config([DEMO, "--batch_size=512", "--device_batch_size=24"])
    with pytest.raises(ConfigError, match=r"batch_size=512 is not a multiple of device_batch_size x world_size = "
                                          r"24 x 8 = 192: each of the 8 processes takes 64 sequences per step, so "
                                          r"choose device_batch_size from 1, 2, 4, 8, 16, 32, 64 \(0: 64"):
        train_gpt.batch_layout(cfg, 8)
    # a batch that no device_batch_size can split: the advice names batch sizes that can be split
    with pytest.raises(ConfigError, match=r"batch_size=3 cannot be split over 2 processes: choose a multiple of 2, "
                                          r"e.g. batch_size=2 or 4"):
        train_gpt.batch_layout(load_config([DEMO, "--batch_size=3", "--device_batch_size=0"]), 2)
    for bs, dbs, world in ((3, 0, 2), (6, 4, 2), (512, 24, 8), (7, 0, 3)):  # every value advised works
        try:
            train_gpt.batch_layout(load_config([DEMO, f"--batch_size={bs}", f"--device_batch_size={dbs}"]), world)
        except ConfigError as e:
            sizes = re.search(r"batch_size=(\d+) or (\d+)", str(e))
            choices = re.search(r"device_batch_size from ([\d, ]+) \(", str(e))
            for b in (sizes.groups() if sizes else []):
                train_gpt.batch_layout(load_config([DEMO, f"--batch_size={b}", "--device_batch_size=0"]), world)
            for d in (choices.group(1).split(", ") if choices else []):
                train_gpt.batch_layout(load_config([DEMO, f"--batch_size={bs}", f"--device_batch_size={d}"]), world)
    assert train_gpt.batch_layout(load_config([DEMO, "--batch_size=512", "--device_batch_size=16"]), 8) == (16, 4)
    assert train_gpt.batch_layout(load_config([DEMO, "--batch_size=512", "--device_batch_size=0"]), 8) == (64, 1)


def test_batch_size_scales_learning_rates_by_the_stated_rule():
    base = load_config([DEMO, "--lr_scaling=sqrt", "--lr_ref_batch_size=512", "--batch_size=128"])
    assert train_gpt.lr_factor(base) == pytest.approx(0.5)
    base.lr_scaling = "linear"
    assert train_gpt.lr_factor(base) == pytest.approx(0.25)


def test_bad_command_fails_before_writing_anything(tmp_path, capsys):
    out = tmp_path / "runs"
    for bad in ("--batch_szie=3", "--batch_size=6", "--train_files=nowhere/fineweb_train_*.bin"):
        r = run_command(train_gpt.main, [*tiny_args(out), bad], capsys)
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith("error: ")
        assert not out.exists(), f"{bad} wrote {list(out.iterdir())}"
    assert "python data/fineweb.py" in r.stderr  # a missing FineWeb shard names the command that fetches it


def test_existing_run_directory_needs_resume(tmp_path):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="holds a run without a checkpoint .* or delete .*tiny to train it again"):
        train_gpt.train(load_config(tiny_args(tmp_path)))
    with pytest.raises(ConfigError, match="no checkpoint to resume from .*ckpt_every_tokens=-1.* delete .*tiny"):
        train_gpt.train(load_config(tiny_args(tmp_path, resume=1)))
    (tmp_path / "tiny" / "ckpt").mkdir()
    (tmp_path / "tiny" / "ckpt" / "step_00000002.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="already holds a run; continue it with --resume=1"):
        train_gpt.train(load_config(tiny_args(tmp_path)))


def expected_params(L, d, V=50304):
    """modded preset: blocks 12 L d^2 (bias-free) + 2 mixing gains in each of the 2k layers that take one of
    the k = min(3, L/2) value embeddings; token embedding, value embeddings and untied head (V d each);
    L/2 U-net skip weights."""
    k = min(3, L // 2)
    return 12 * L * d * d + 4 * k + (2 + k) * V * d + L // 2


def no_fineweb(tmp_path):
    """Flags that point a FineWeb config at data that is certainly absent, and its output to tmp_path."""
    return [f"--train_files={tmp_path}/fineweb_train_*.bin", f"--val_files={tmp_path}/fineweb_val_*.bin",
            f"--out_dir={tmp_path}/runs"]


def dry_run(args, fineweb):
    """train_gpt.train on a dry run; a FineWeb config must report exactly its two missing data globs."""
    cfg = load_config([*args, "--dry_run=1"])
    if not fineweb:
        return train_gpt.train(cfg)
    with pytest.raises(ConfigError, match=r"dry run: 2 problem\(s\).*\n  - train data: no token shards match .*"
                                          r"\n  - val data: no token shards match "):
        train_gpt.train(cfg)


def spectra_cost_line(out, device="CUDA"):
    return float(re.search(rf"spectra cost on {device}.* = ([\d.]+)% of training time", out).group(1))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))), ids=os.path.basename)
def test_every_config_passes_dry_run(path, capsys, tmp_path):
    toy = os.path.basename(path).startswith("toy_")
    fineweb = path != DEMO and not toy
    data = []
    if toy:  # the toy's data, generated small (the config's own folder may not exist yet)
        modarith.write_dataset(modarith.ToyOptions(train_sequences=64, val_sequences=1024, test_sequences=0,
                                                   band_sequences=8), str(tmp_path / "toy"))
        data = [f"--train_files={tmp_path}/toy/modarith_train_*.bin", f"--val_files={tmp_path}/toy/modarith_val_*.bin",
                f"--out_dir={tmp_path}/runs"]
    cfg = load_config([path, "--dry_run=1", *data])
    dry_run([path, *(no_fineweb(tmp_path) if fineweb else data)], fineweb)
    out = capsys.readouterr().out
    if fineweb:  # every size measures all its spectra in at most 3% of its training time (the estimate)
        assert spectra_cost_line(out) <= 3.0
    else:
        assert "dry run: data, output folder and settings are ready" in out
    total = int(re.search(r"parameters: ([\d,]+) total", out).group(1).replace(",", ""))
    gcfg = train_gpt.model_config(cfg)
    assert total == expected_params(gcfg.n_layer, gcfg.n_embd, gcfg.vocab_size)
    assert f"grad_accum = {train_gpt.batch_layout(cfg, 1)[1]}" in out
    # FineWeb configs divide over 1, 2, 4 or 8 GPUs; the demo and the toy run on 1 or 2 processes
    for world in (1, 2) if not fineweb else (1, 2, 4, 8):
        dbs, accum = train_gpt.batch_layout(load_config([path]), world)
        assert dbs * world * accum == cfg.batch_size


def test_d36_dry_run_command(tmp_path, capsys):
    r = run_command(train_gpt.main, [f"{REPO}/configs/d36_bs512.py", "--dry_run", *no_fineweb(tmp_path)], capsys)
    assert r.returncode == 2 and "train data: no token shards match" in r.stderr  # FineWeb is not here
    assert "python data/fineweb.py --train_shards" in r.stderr
    assert not (tmp_path / "runs").exists()
    total = int(re.search(r"parameters: ([\d,]+) total", r.stdout).group(1).replace(",", ""))
    assert total == expected_params(36, 1280)
    assert "12*L*d^2 = 12*36*1280^2 = 707,788,800" in r.stdout


@pytest.mark.parametrize("sweep", sorted(glob.glob(os.path.join(REPO, "configs", "sweeps", "*.yaml"))))
def test_every_run_of_a_sweep_file_resolves_to_a_distinct_valid_config(sweep, tmp_path):
    """Expand the W&B grid as the agent does (${program} -> train_gpt.py, ${args} -> --key=value per
    parameter) and resolve each run's command line with a dry run: no key or value may be invalid."""
    import itertools
    yaml = pytest.importorskip("yaml")  # PyYAML comes with wandb
    with open(sweep) as f:
        spec = yaml.safe_load(f)
    assert spec["method"] == "grid" and spec["program"] == "train_gpt.py"
    command = spec["command"]
    after = command[command.index("${program}") + 1]  # the config file, or ${args} holding --config=PATH
    assert command[-1] == "${args}" and (after.startswith("configs/") or "config" in spec["parameters"])
    fixed = [os.path.join(REPO, after)] if after != "${args}" else []
    names = list(spec["parameters"])
    choices = [p["values"] if "values" in p else [p["value"]] for p in spec["parameters"].values()]
    resolved = []
    for combo in itertools.product(*choices):
        args = [f"--{k}={v}" for k, v in zip(names, combo)]  # W&B writes Python values: True, 0.5, 64
        argv = [*fixed, *args, *no_fineweb(tmp_path)]
        cfg = load_config(argv)
        dry_run(argv, fineweb=True)
        resolved.append((cfg.config_file, cfg.batch_size, round(train_gpt.lr_factor(cfg), 9),
                         tuple(sorted(cfg.model.items()))))
    assert len(set(resolved)) == len(resolved) > 1


def test_help_lists_every_key_with_type_default_and_meaning(capsys):
    for flag in ("--help", "-h"):  # the command itself once, then its main in this process
        r = run_command(train_gpt.main, [DEMO, flag], capsys) if flag == "-h" else \
            subprocess.run([sys.executable, "train_gpt.py", "configs/cpu_demo.py", flag], capture_output=True,
                           text=True, cwd=REPO)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        lines = {m.group(1): m.group(2) for m in re.finditer(r"^  --(\w+) +(.*)$", r.stdout, re.M)}
        assert set(lines) == set(train_gpt.TRAIN_KEYS) | set(train_gpt.MODEL_KEYS)
        for key, rest in lines.items():
            typ, default, meaning = re.match(r"(\S+) +(\S+) +(.*)", rest).groups()
            assert meaning.strip(), f"--{key} has no meaning in --help: give its Config field a comment"
            if key in train_gpt.TRAIN_KEYS:  # the default shown parses back, as typed, to the Config default
                typed = "" if default == '""' else default
                parsed = train_gpt.coerce(key, typed, train_gpt.TRAIN_KEYS[key], "--help", cli=True)
                assert parsed == getattr(train_gpt.Config(), key), key
    assert re.search(r"^  --seq_len +int +1024 +tokens per training sequence$", r.stdout, re.M)
    assert re.search(r"^  --spectra_tail +int,int +30,150 ", r.stdout, re.M)
    assert "\nmodel flags (GPTConfig" in r.stdout and re.search(r"^  --qk_norm +bool +True ", r.stdout, re.M)


def test_key_value_pairs_parse_with_a_space_or_an_equals_sign():
    cfg = load_config([DEMO, "--seed", "3", "--qk_norm", "0", "--spectra_tail", "10,100", "--resume", "--dry_run=1",
                       "--run_name", "x"])
    assert (cfg.seed, cfg.model["qk_norm"], cfg.spectra_tail, cfg.resume, cfg.dry_run, cfg.run_name) == \
        (3, False, (10, 100), True, True, "x")
    assert load_config([DEMO, "--tied"]).model["tied"] is True  # a bare bool flag at the end
    assert load_config([DEMO, "--eval_every_tokens", "-1"]).eval_every_tokens == -1  # a negative value is a value
    with pytest.raises(ConfigError, match=r"--seed needs a value: --seed=VALUE or --seed VALUE"):
        load_config([DEMO, "--seed"])
    with pytest.raises(ConfigError, match=r"--seed needs a value"):
        load_config([DEMO, "--seed", "--resume"])
    with pytest.raises(ConfigError, match=r"expected --key=value or --key value, got 'stray'"):
        load_config([DEMO, "--seed", "3", "stray"])


def test_dry_run_lists_every_problem_a_launch_would_stop_at(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    args = tiny_args(f"{blocker}/runs", train_files=f"{tmp_path}/none_train_*.bin", val_tokens=10 ** 7, dry_run=1)
    with pytest.raises(ConfigError) as e:
        train_gpt.train(load_config(args))
    problems = str(e.value).splitlines()
    assert problems[0] == "dry run: 3 problem(s) a launch would stop at:"
    assert problems[1].startswith(f"  - train data: no token shards match '{tmp_path}/none_train_*.bin'")
    assert problems[2].startswith("  - val data: val_tokens=") and "lower val_tokens to at most" in problems[2]
    assert problems[3].startswith(f"  - output: cannot write the run directory {blocker}/runs/tiny")
    assert "parameters:" in capsys.readouterr().out  # the config and the size are printed all the same
    assert os.listdir(tmp_path) == ["a_file"]  # and nothing is written


def test_dry_run_warns_when_the_probe_set_is_too_small_for_an_unbiased_alpha(tmp_path, capsys):
    need = spectra.min_probe_tokens(64)  # the tiny model's width
    assert need == spectra.PROBE_RATIO * 64 * spectra.PROBE_TOKEN_FACTOR
    for tokens, warned in ((need - 32, True), (need, False)):  # whole sequences of 32 tokens
        train_gpt.train(load_config(tiny_args(tmp_path, spectra_tokens=tokens, dry_run=1)))
        out = capsys.readouterr().out
        assert (f"warning: spectra_tokens={tokens:,} is below the {need:,} tokens that keep the bias of alpha under "
                f"0.02 at width 64 even if every token were an independent sample" in out) == warned


def test_spectra_cost_counts_the_evaluations_a_run_measures(tmp_path):
    """The estimate's evaluation counts against the npz files a real run writes; its shares scale as
    the counts do (halving the gradient cadence halves the gradient share)."""
    args = tiny_args(tmp_path, max_steps=7, eval_every_tokens=256, grad_spectra_every=2)
    cfg = load_config(args)
    run_dir = train_gpt.train(cfg)
    written = {f: len(glob.glob(os.path.join(run_dir, "spectra", f"{f}_*.npz"))) for f in ("act", "grad")}
    gcfg, settings = train_gpt.model_config(cfg), train_gpt.spectral_settings(cfg)
    points = settings.point_names(gcfg.n_layer)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    cost = train_gpt.spectra_cost(cfg, gcfg, settings, points, 7, tokens_per_step)
    # evaluations at steps 0, 2, 4, 6 (every 256 tokens of 128 per step) and 7 (the last); gradients at 0, 4, 7
    assert (cost["act_evals"], cost["grad_evals"]) == (written["act"], written["grad"]) == (5, 3)
    every = train_gpt.spectra_cost(replace(cfg, grad_spectra_every=1), gcfg, settings, points, 7, tokens_per_step)
    assert every["grad_evals"] == 5
    assert every["cuda"]["grad"] == pytest.approx(cost["cuda"]["grad"] * 5 / 3)
    assert every["cuda"]["act"] == cost["cuda"]["act"] == pytest.approx(cost["cpu"]["act"] * 10)
