"""
Comparing runs and forecasting token efficiency from spectra measured early in training.

    python analyze.py compare RUN... [--wandb ENTITY/PROJECT[/GROUP]] [--out DIR] [--layer L] [--tokens T]
                      [--loss L] [--family act|grad] [--stat alpha_tail] [--allow-mixed]
    python analyze.py forecast RUN... --target-loss L --at-tokens T [--out DIR] [--allow-mixed]
    python analyze.py stages RUN... [--wandb ENTITY/PROJECT[/GROUP]] [--out DIR] [--loss L]

RUN is a run directory (config.json + metrics.jsonl, as train_gpt.py writes them) or a folder
holding run directories at any depth (a sweep's out_dir, or runs/ with its sweeps). Runs from
W&B (`--wandb`) become the same `Run` structure, so everything after loading is one code path.
Outputs go to --out (default analysis/).

Read top to bottom:

1. Loading: run directories and W&B into Run(name, record, records, truncated); the record is
   config.json's schema (rundir.RunRecord).
2. Checks: runs compared together must share the probe set, the fit windows, the model profile and
   the arithmetic of the gradient passes.
3. Curves: a metric's value at a token count (linear interpolation between evaluations) and the
   tokens at which the validation loss first reaches a target.
4. Forecast core, pure functions: predictors at T, Spearman correlation, least-squares line,
   leave-one-out error, predictor ranking, forecast_ratio; and the in-run forecast's policy
   (load_forecast_reference: which target, how many reference runs, what spread of ratios).
5. The forecast command: table, forecast.csv, predictors.csv, forecast.png.
6. The compare command: alpha against layer at matched tokens (the most every run reached, values
   interpolated between evaluations) and at matched loss, alpha against tokens, loss against
   tokens, spectra overlaid at one layer; table and compare.csv. Runs in natural order of their
   names (bs4, bs8, bs16), each in one colour in every figure of compare and forecast.
7. Command line.

From the trainer (a reference sweep of finished runs, the run's own metrics.jsonl records so far):

    reference = analyze.load_forecast_reference(["runs/sweep1"], this_run, target_loss)  # once; AnalysisError
    metrics = reference.metrics(own_records, tokens)    # at each evaluation: forecast/token_ratio, ...; {} until
                                                         # own_records has an evaluation at or past `tokens`

Definitions used throughout:

- token ratio (relative token efficiency): tokens-to-target of a run divided by the smallest
  tokens-to-target in its family (same preset, profile, resolved model architecture and seed;
  batch size and learning rates may differ), so the family's best run is 1.0 and larger is worse.
- a predictor's value at T is interpolated linearly in tokens between the two evaluations that
  bracket T and carry that metric (exact when an evaluation falls on T); it is missing when no
  evaluation at or after T has it yet, so a running trainer only ever uses what it has measured.
"""

import argparse
import csv
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, fields

import plots
import spectra
from rundir import RunFileError, RunRecord, read_metrics

# ----------------------------------------------------------------------------------------------
# 1. Loading


@dataclass
class Run:
    name: str
    record: RunRecord                # config.json (or the W&B config): {config, model, derived, ...}
    records: list                    # metrics.jsonl lines (dicts), in file order
    truncated: bool = False          # some line could not be read (a crashed run's last line, cut mid-JSON)
    path: str = ""                   # the run directory ("" for runs from W&B: no spectra files)

    def __post_init__(self):
        if isinstance(self.record, dict):
            self.record = RunRecord.from_dict(self.record)


class AnalysisError(Exception):
    """Bad input (the command line prints it and exits 2)."""


class MixedRunsError(AnalysisError):
    """Runs measured differently (probe set, fit windows, model profile, gradient precision) in one comparison."""


class WandbError(AnalysisError):
    """A W&B project that cannot be reached or read."""


class AnalysisWarning(UserWarning):
    pass


def warn(message):
    warnings.warn(message, AnalysisWarning, stacklevel=2)


def is_run_dir(path):
    return os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(path, "metrics.jsonl"))


def read_records(path):
    """(records, truncated) of a metrics.jsonl: every complete JSON line. A line that cannot be
    parsed (the last one of a crashed run is cut mid-JSON) is skipped and reported by file and
    line number, so a crashed run still contributes everything it logged."""
    records, bad = read_metrics(path)
    for number, cut in bad:  # cut: no newline after it, the write was interrupted
        warn(f"{path}: line {number} is {'cut short' if cut else 'not a JSON object'} "
             f"(truncated metrics, {'a crashed run?' if cut else 'corrupt line'}); using the {len(records)} "
             "complete lines")
    if not records and not bad:
        warn(f"{path} is empty: the run logged nothing (crashed before its first log line?)")
    return records, bool(bad)


def load_run(path):
    """The Run of a run directory; AnalysisError naming the path when it is not one."""
    if not os.path.isdir(path):
        raise AnalysisError(f"{path}: no such run directory")
    if not is_run_dir(path):
        raise AnalysisError(f"{path} is not a run directory: it needs config.json and metrics.jsonl "
                            "(as train_gpt.py writes to runs/<run_name>/)")
    try:
        record = RunRecord.load(path)
    except RunFileError as e:
        raise AnalysisError(str(e)) from None
    records, truncated = read_records(os.path.join(path, "metrics.jsonl"))
    return Run(os.path.basename(os.path.normpath(path)), record, records, truncated, path)


def find_run_dirs(path, seen=None):
    """The run directories under a folder that is not one, at any depth (runs/demo_sweep/bs4 from
    runs/), in natural order (bs4 before bs16). A run's own folders (ckpt/, spectra/, wandb/) are
    not searched; a folder reached twice through links is searched once."""
    seen = set() if seen is None else seen
    real = os.path.realpath(path)
    if real in seen:
        return []
    seen.add(real)
    try:
        names = plots.run_order(os.listdir(path))
    except OSError:  # an unreadable folder holds no run we can read
        return []
    found = []
    for name in names:
        sub = os.path.join(path, name)
        if is_run_dir(sub):
            found.append(sub)
        elif os.path.isdir(sub):
            found += find_run_dirs(sub, seen)
    return found


def run_dirs(path):
    """[path] for a run directory; the run directories it holds, at any depth, for a folder of runs."""
    if is_run_dir(path) or not os.path.isdir(path):
        return [path]
    inside = find_run_dirs(path)
    if not inside:
        raise AnalysisError(f"{path} is not a run directory (no config.json and metrics.jsonl) and holds none, "
                            "nor do its subfolders")
    return inside


def distinct_runs(dirs):
    """Run directories without repeats: one run reached twice (runs/cpu_demo_latest is a link to the
    newest cpu_demo run) is read once, under its own folder's name rather than the link's."""
    chosen = {}
    for d in dirs:
        real = os.path.realpath(d)
        if real not in chosen or os.path.islink(os.path.normpath(chosen[real])):
            chosen[real] = d
    return list(chosen.values())


def load_runs(paths):
    """Runs of run directories and folders of runs, each once, with unique names."""
    return unique_names([load_run(d) for d in distinct_runs(d for p in paths for d in run_dirs(p))])


def unique_names(runs):
    """Runs with the same name (one run_name in two sweeps) get their parent folder appended, then a
    number if that is not enough: names key every table."""
    def duplicates():
        names = [r.name for r in runs]
        return [r for r in runs if names.count(r.name) > 1]
    for run in duplicates():
        run.name += "@" + (os.path.basename(os.path.dirname(os.path.normpath(run.path))) if run.path else "wandb")
    for k, run in enumerate(duplicates()):
        run.name += f"#{k + 1}"
    return runs


def parse_wandb_path(text):
    """'ENTITY/PROJECT[/GROUP]' -> ('ENTITY/PROJECT', GROUP or None)."""
    parts = [p for p in text.strip().strip("/").split("/") if p]
    if len(parts) not in (2, 3):
        raise AnalysisError(f"--wandb {text!r}: expected ENTITY/PROJECT or ENTITY/PROJECT/GROUP")
    return "/".join(parts[:2]), (parts[2] if len(parts) == 3 else None)


def unwrap_config(config):
    """W&B configs may come as {key: {"value": v, "desc": ...}}; the trainer's structure is {key: v}."""
    return {k: v["value"] if isinstance(v, dict) and "value" in v and set(v) <= {"value", "desc"} else v
            for k, v in dict(config).items()}


def wandb_to_run(wandb_run):
    """One W&B run as a Run: history rows without W&B's own `_step`, `_runtime`, ... keys."""
    records = [{k: v for k, v in row.items() if not k.startswith("_")} for row in wandb_run.scan_history()]
    return Run(wandb_run.name, RunRecord.from_dict(unwrap_config(wandb_run.config), f"W&B run {wandb_run.name}"),
               [r for r in records if r])


def load_wandb_runs(path, api=None):
    """Runs of a W&B project (and group), through `api` (default wandb.Api(), imported only here)."""
    project, group = parse_wandb_path(path)
    try:
        if api is None:
            import wandb
            api = wandb.Api()
        found = api.runs(project, filters={"group": group} if group else None)
        runs = [wandb_to_run(r) for r in found]
    except Exception as e:  # network, authentication, unknown project: all mean "cannot be read"
        raise WandbError(f"W&B project {path!r} cannot be reached ({type(e).__name__}: {e})") from None
    if not runs:
        raise WandbError(f"W&B project {path!r} has no runs{f' in group {group!r}' if group else ''}")
    return runs


# ----------------------------------------------------------------------------------------------
# 2. Checks: what must agree for spectra of different runs to be compared


COMPARABLE = {"probe set": ("spectra_tokens", "grad_samples", "seq_len", "val_files", "spectra_act_norm"),
              "fit windows": ("spectra_head", "spectra_tail"),
              "model profile": ("profile", "n_layer", "n_embd"),
              "gradient precision": ("grad_spectra_precision",)}
# the spectral settings by their trainer keys: a run from before one existed measured with its default
SPECTRAL_KEYS = {spectra.CONFIG_KEYS.get(f.name, f.name): f.name for f in fields(spectra.SpectraSettings)}


def freeze(value):
    """Lists (JSON's tuples) as tuples, so settings compare and hash."""
    return tuple(freeze(v) for v in value) if isinstance(value, (list, tuple)) else value


def setting(record, key):
    """A setting of a run: the resolved model (config.json's `model`) first, since `config.model`
    holds only overrides; then the trainer config; a spectral setting the run's record lacks is the
    default it was measured with (spectra.SpectraSettings)."""
    if key in record.model:
        return freeze(record.model[key])
    if key in record.config and key != "model":
        return freeze(record.config[key])
    if key in SPECTRAL_KEYS:
        return freeze(getattr(spectra.SpectraSettings.from_config(record.config), SPECTRAL_KEYS[key]))
    return None


def differing_settings(runs):
    """['<what>: <key> = v1 in a, b; v2 in c', ...] for every comparable setting that differs."""
    problems = []
    for what, keys in COMPARABLE.items():
        for key in keys:
            groups = {}
            for run in runs:
                groups.setdefault(setting(run.record, key), []).append(run.name)
            if len(groups) > 1:
                sides = "; ".join(f"{v!r} in {', '.join(names)}" for v, names in groups.items())
                problems.append(f"{what}: {key} = {sides}")
    return problems


def check_comparable(runs, allow_mixed=False, override="pass --allow-mixed"):
    """MixedRunsError (or, with allow_mixed, a warning) when runs differ in a COMPARABLE setting;
    `override` says how the caller lets them be compared anyway (None: it does not)."""
    problems = differing_settings(runs)
    if not problems:
        return
    text = "the runs were not measured alike:\n  " + "\n  ".join(problems)
    if not allow_mixed:
        raise MixedRunsError(text + "\ncompare runs of one probe set (and activation normalisation), fit windows, "
                             "model profile and gradient precision" + (f", or {override}" if override else ""))
    warn(text + "\n(--allow-mixed: comparing them anyway)")


# ----------------------------------------------------------------------------------------------
# 3. Curves


def finite(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def mean(values):
    """Mean of the finite values; NaN when there is none."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


def series(records, key):
    """[(tokens, value)] of one metric, by tokens, where it is a finite number (the trainer writes
    null for NaN, e.g. a fit window beyond the valid rank)."""
    points = {}
    for r in records:
        if finite(r.get(key)) and finite(r.get("tokens")) and r["tokens"] not in points:
            points[r["tokens"]] = float(r[key])
    return sorted(points.items())


def interpolate(points, x):
    """Linear interpolation in [(x, y)] sorted by x; exact at a point; None outside their range."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x == x0 else y1 if x == x1 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[0][1] if len(points) == 1 and points[0][0] == x else None


def value_at(records, key, tokens):
    """A metric at `tokens`, interpolated between the evaluations that bracket it; None when no
    evaluation at or after `tokens` (or at or before it) has the metric."""
    return interpolate(series(records, key), tokens)


def tokens_to_target(records, target_loss):
    """Tokens at which val_loss first reaches target_loss: linear interpolation of tokens between
    the last evaluation above the target and the first at or below it (the loss curve between
    evaluations taken as a straight line). None when no evaluation reached it."""
    evals = series(records, "val_loss")
    for i, (tokens, loss) in enumerate(evals):
        if loss <= target_loss:
            if i == 0:
                return float(tokens)
            t0, l0 = evals[i - 1]
            return t0 + (tokens - t0) * (l0 - target_loss) / (l0 - loss)
    return None


def final_loss(records):
    evals = series(records, "val_loss")
    return evals[-1][1] if evals else None


# ----------------------------------------------------------------------------------------------
# 4. Forecast core (pure functions) and the in-run forecast's policy (train_gpt calls it)


PREDICTOR_FAMILIES = ("act", "grad")
PREDICTOR_STATS = ("alpha_head", "alpha_tail", "rankme")
BASELINE = "loss/val_loss"  # the loss itself at T: shown for reference, never chosen as the predictor
# The activation point paired with a gradient matrix in the act - grad gap, by preference: the
# matrix's own output where that is a probe point (attn, fc, proj), its input for q/k/v (ln1),
# else the residual stream after the sublayer, else the block output, which the trainer measures by
# default. So with default settings the gap of L05 is act L05.mlp_resid minus grad L05.attn.c_proj.
GAP_PAIRS = {"attn.c_proj": ("attn", "attn_resid", "mlp_resid"), "attn.c_q": ("ln1", "attn_resid", "mlp_resid"),
             "attn.c_k": ("ln1", "attn_resid", "mlp_resid"), "attn.c_v": ("ln1", "attn_resid", "mlp_resid"),
             "mlp.c_fc": ("fc", "mlp_resid"), "mlp.c_proj": ("proj", "mlp_resid")}


def split_point(point):
    """'L05.mlp_resid' -> (5, 'mlp_resid'); 'embed' -> (None, 'embed')."""
    m = re.match(r"^L(\d+)\.(.+)$", point)
    return (int(m.group(1)), m.group(2)) if m else (None, point)


def spectral_keys(records):
    """The act/grad keys of the predictor stats that any record holds."""
    keys = set()
    for r in records:
        keys.update(k for k in r if k.count("/") >= 2 and k.split("/", 1)[0] in PREDICTOR_FAMILIES
                    and k.split("/")[1] in PREDICTOR_STATS)
    return keys


def gap_values(values):
    """gap/<stat>/<layer>.<matrix> = act - grad for each gradient matrix whose layer has a paired
    activation point (GAP_PAIRS); None where either side has no value at T."""
    gaps = {}
    for key, g in values.items():
        family, stat, point = key.split("/", 2)
        layer, matrix = split_point(point)
        if family != "grad" or layer is None:
            continue
        prefix = point[:point.index(".")]
        for kind in GAP_PAIRS.get(matrix, ("mlp_resid",)):
            a = values.get(f"act/{stat}/{prefix}.{kind}", "absent")
            if a != "absent":
                gaps[f"gap/{stat}/{point}"] = None if a is None or g is None else a - g
                break
    return gaps


def layer_means(values):
    """<family>/<stat>/mean.<kind>: the mean over layers of one kind of point (mlp_resid,
    attn.c_proj, ...), only where every layer that the run measures has a value at T."""
    groups = {}
    for key, v in values.items():
        family, stat, point = key.split("/", 2)
        layer, kind = split_point(point)
        if layer is not None:
            groups.setdefault(f"{family}/{stat}/mean.{kind}", []).append(v)
    return {name: None if None in vs else sum(vs) / len(vs) for name, vs in groups.items()}


def predictor_values(records, at_tokens):
    """{predictor: value at at_tokens} for every act/grad alpha_head, alpha_tail and rankme of the
    records, the act - grad gaps, their means over layers, and the baseline val_loss."""
    values = {k: value_at(records, k, at_tokens) for k in spectral_keys(records)}
    values.update(gap_values(values))
    values.update(layer_means(values))
    values[BASELINE] = value_at(records, "val_loss", at_tokens)
    return {k: v for k, v in sorted(values.items()) if v is not None}


def average_ranks(values):
    """1-based ranks; tied values share the mean of the ranks they occupy."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def pearson(x, y):
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def spearman(x, y):
    """Spearman's rank correlation: Pearson's correlation of the average ranks (the tie-corrected
    form). NaN for fewer than two points or when either side is constant."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} x values but {len(y)} y values")
    return pearson(average_ranks(list(x)), average_ranks(list(y))) if len(x) >= 2 else math.nan


def fit_line(x, y):
    """(slope, intercept) of the least-squares line y = slope * x + intercept. A line is monotone, so
    forecasts keep the predictor's ranking. Constant x (or one point): the flat line at mean(y)."""
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxx = sum((a - mx) ** 2 for a in x)
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx if sxx > 0 else 0.0
    return slope, my - slope * mx


def loo_predictions(x, y):
    """The prediction of each y[i] by the line fitted to all other points."""
    out = []
    for i in range(len(x)):
        slope, intercept = fit_line(x[:i] + x[i + 1:], y[:i] + y[i + 1:])
        out.append(slope * x[i] + intercept)
    return out


def loo_error(x, y):
    """Leave-one-out mean absolute error of the line; NaN below 3 points (a line needs 2 to be fitted)."""
    if len(x) < 3:
        return math.nan
    return sum(abs(p - b) for p, b in zip(loo_predictions(x, y), y)) / len(y)


def family_key(record):
    """Runs whose token ratios are taken against each other: same ladder stage, preset, profile,
    optimizer, resolved model (every architecture flag) and seed; batch size and learning rates are
    free."""
    arch = tuple(sorted((k, freeze(v)) for k, v in record.model.items()))
    return (setting(record, "stage"), setting(record, "preset"), setting(record, "profile"),
            setting(record, "optimizer"), arch, setting(record, "seed"))


def token_ratios(runs, target_loss):
    """{run name: (tokens to target, token ratio)}: tokens over the smallest tokens of the run's
    family; (None, None) for a run that has not reached the target."""
    tokens = {r.name: tokens_to_target(r.records, target_loss) for r in runs}
    best = {}
    for r in runs:
        if tokens[r.name] is not None:
            key = family_key(r.record)
            best[key] = min(best.get(key, math.inf), tokens[r.name])
    out = {}
    for r in runs:
        t, b = tokens[r.name], best.get(family_key(r.record))
        # a family whose best run starts at the target (0 tokens) has no scale: every reached run counts 1
        out[r.name] = (None, None) if t is None else (t, t / b if b > 0 else 1.0)
    return out


@dataclass
class PredictorRow:
    predictor: str
    runs: list                       # names of the runs that reached the target and have the predictor at T
    x: list                          # predictor values at T
    y: list                          # token ratios
    spearman: float
    loo_error: float
    slope: float
    intercept: float
    eligible: bool                   # may be chosen as the forecasting predictor

    @property
    def n(self):
        return len(self.x)


def predictor_row(name, runs, x, y, n_reached):
    """One predictor's statistics. Eligible: not the loss baseline, measured in every run that reached
    the target (so predictors are ranked on the same runs), at least 3 of them, a defined Spearman."""
    rho, loo = spearman(x, y), loo_error(x, y)
    slope, intercept = fit_line(x, y) if x else (math.nan, math.nan)
    eligible = name != BASELINE and len(x) == n_reached and len(x) >= 3 and math.isfinite(rho)
    return PredictorRow(name, runs, x, y, rho, loo, slope, intercept, eligible)


def ranking_key(row):
    """Eligible first; then highest |Spearman| (rounded: equal ranks give float-equal values), lowest
    leave-one-out error, name."""
    rho = round(abs(row.spearman), 9) if math.isfinite(row.spearman) else -1.0
    loo = row.loo_error if math.isfinite(row.loo_error) else math.inf
    return not row.eligible, -rho, loo, row.predictor


def rank_predictors(runs, target_loss, at_tokens):
    """[PredictorRow] of every predictor at at_tokens against the token ratio to target_loss, over
    the runs that reached the target, best first (the first row is the forecasting predictor when
    it is eligible)."""
    ratios = token_ratios(runs, target_loss)
    reached = [r for r in runs if ratios[r.name][1] is not None]
    values = {r.name: predictor_values(r.records, at_tokens) for r in reached}
    rows = []
    for name in sorted(set().union(*values.values()) if values else ()):
        have = [r.name for r in reached if name in values[r.name]]
        rows.append(predictor_row(name, have, [values[n][name] for n in have], [ratios[n][1] for n in have],
                                  len(reached)))
    return sorted(rows, key=ranking_key)


@dataclass
class Forecast:
    ratio: float                     # predicted token ratio (1.0 = the family's best run)
    predictor: str
    value: float                     # the predictor's value at T for the forecast run
    loo_error: float                 # leave-one-out mean absolute error of the fit, in token-ratio units
    spearman: float
    n: int                           # reference runs the fit used


def forecast_from_rows(rows, own_values):
    """Forecast with the best eligible predictor that own_values has; None when there is none."""
    for row in rows:
        if row.eligible and row.predictor in own_values:
            v = own_values[row.predictor]
            return Forecast(row.slope * v + row.intercept, row.predictor, v, row.loo_error, row.spearman, row.n)
    return None


def forecast(reference_runs, target_loss, own_records, at_tokens):
    """The Forecast of a run's token ratio from its records so far and a reference sweep; None when
    no predictor qualifies or own_records has not reached at_tokens yet."""
    rows = rank_predictors(reference_runs, target_loss, at_tokens)
    return forecast_from_rows(rows, predictor_values(own_records, at_tokens))


def forecast_ratio(reference_runs, target_loss, own_records, at_tokens):
    """(predicted token ratio, predictor name), or (None, None) (see forecast)."""
    f = forecast(reference_runs, target_loss, own_records, at_tokens)
    return (f.ratio, f.predictor) if f else (None, None)


@dataclass
class ForecastReference:
    """The in-run forecast's reference: a finished sweep and the target loss token ratios are taken to."""
    runs: list
    target: float

    def metrics(self, own_records, tokens):
        """forecast/token_ratio (tokens to the target relative to the reference family's best, predicted
        from a run's records so far by the reference's best predictor at these tokens), the predictor's
        name and its leave-one-out error; {} when no predictor is available yet."""
        f = forecast(self.runs, self.target, own_records, tokens)
        if f is None:
            return {}
        return {"forecast/token_ratio": f.ratio, "forecast/loo_error": f.loo_error, "forecast/predictor": f.predictor}


def load_forecast_reference(paths, this_run, target_loss=0.0):
    """The reference of the trainer's in-run forecast (its forecast_reference): the runs under `paths`
    (run directories or folders of them), which must have been measured like `this_run` (COMPARABLE);
    the target is target_loss if > 0, else the highest final val_loss of the reference. AnalysisError
    when the reference cannot be read, was measured otherwise, has fewer than 3 runs at the target, or
    gives every run the same token ratio (nothing to rank)."""
    runs = load_runs(paths)
    check_comparable(runs + [this_run], override=None)
    finals = [loss for loss in (final_loss(r.records) for r in runs) if loss is not None]
    target = target_loss or max(finals, default=0.0)
    ratios = [ratio for _, ratio in token_ratios(runs, target).values() if ratio is not None]
    if len(ratios) < 3:
        raise AnalysisError(f"{len(ratios)} of its {len(runs)} runs reach val_loss {target:.4g}; a forecast needs 3 "
                            "(set forecast_target_loss higher or add runs)")
    if len(set(ratios)) < 2:  # no spread to correlate with: every run is the best of its own family
        raise AnalysisError(f"every run's token ratio is {ratios[0]:g}, so no predictor can rank them; the reference "
                            "needs runs of one family (same preset, profile, architecture and seed) at different "
                            "batch sizes")
    return ForecastReference(runs, target)


# Validation across stages (the study's statistic): does a predictor rank a stage's batch tiers, and
# does a line fitted on the other stages forecast a stage it has not seen better than a constant?


@dataclass
class Validation:
    predictor: str
    spearman: dict                   # {stage: Spearman of the predictor with the token ratio over its runs}
    loso_error: float                # leave-one-stage-out mean absolute error of the line, token-ratio units
    constant_error: float            # the same for a constant: the mean token ratio of the other stages
    forecasts: list                  # [(run name, stage, held-out forecast, token ratio)]
    eligible: bool                   # measured in every run at the target: may be chosen

    @property
    def mean_spearman(self):
        return mean(list(self.spearman.values()))

    @property
    def spearman_sd(self):
        values = [v for v in self.spearman.values() if math.isfinite(v)]
        m = mean(values)
        return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else math.nan

    @property
    def better_than_constant(self):
        return self.eligible and self.loso_error < self.constant_error


def stage_groups(runs):
    """{stage: [runs]} by the recorded `stage`, runs without one grouped by their family (F1, F2...)."""
    labels, groups = family_labels(runs), {}
    for r in runs:
        groups.setdefault(setting(r.record, "stage") or labels[r.name], []).append(r)
    return groups


def held_out_forecasts(points):
    """points: [(stage, run, x, y)]. For each point, the forecast of the line fitted to the other
    stages' points and of their mean: [(run, stage, line forecast, constant forecast, y)]."""
    out = []
    for stage in dict.fromkeys(p[0] for p in points):
        rest = [p for p in points if p[0] != stage]
        slope, intercept = fit_line([p[2] for p in rest], [p[3] for p in rest])
        constant = sum(p[3] for p in rest) / len(rest)
        out += [(run, stage, slope * x + intercept, constant, y) for s, run, x, y in points if s == stage]
    return out


def validate_predictors(runs, target_loss, at_tokens):
    """[Validation] of every predictor at at_tokens, over runs grouped by stage (stage_groups), best
    first: eligible, then the lowest leave-one-stage-out error. Needs two stages or more."""
    groups = stage_groups(runs)
    ratios = token_ratios(runs, target_loss)
    stage_of = {r.name: g for g, rs in groups.items() for r in rs}
    reached = [r for r in runs if ratios[r.name][1] is not None]
    values = {r.name: predictor_values(r.records, at_tokens) for r in reached}
    rows = []
    for name in sorted(set().union(*values.values()) if values else ()):
        points = [(stage_of[r.name], r.name, values[r.name][name], ratios[r.name][1]) for r in reached
                  if name in values[r.name]]
        stages = list(dict.fromkeys(p[0] for p in points))
        if len(stages) < 2:
            continue
        rho = {g: spearman([p[2] for p in points if p[0] == g], [p[3] for p in points if p[0] == g])
               for g in stages if sum(p[0] == g for p in points) >= 3}
        held = held_out_forecasts(points)
        rows.append(Validation(name, rho, mean([abs(f - y) for _, _, f, _, y in held]),
                               mean([abs(c - y) for _, _, _, c, y in held]),
                               [(run, g, f, y) for run, g, f, _, y in held],
                               name != BASELINE and len(points) == len(reached)))
    return sorted(rows, key=lambda v: (not v.eligible, v.loso_error if math.isfinite(v.loso_error) else math.inf,
                                       v.predictor))


VALIDATION_COLUMNS = ("predictor", "stages", "mean_spearman", "spearman_sd", "loso_error", "constant_error",
                      "better_than_constant")


def validation_cells(v):
    return [v.predictor, len(v.spearman), v.mean_spearman, v.spearman_sd, v.loso_error, v.constant_error,
            v.better_than_constant]


def print_validation(rows, top=10):
    best = rows[0] if rows and rows[0].eligible else None
    n_stages = len(best.spearman) if best else 0
    print(f"forecast validation across stages: Spearman of each predictor with the token ratio within each stage "
          f"(pooled: mean and sd over stages), and the leave-one-stage-out error of its line against a constant "
          f"(the other stages' mean ratio); {n_stages} stage(s) with 3 runs or more")
    print(text_table(list(VALIDATION_COLUMNS), [validation_cells(v) for v in rows[:top]]))
    if best is None:
        print("no validation: no predictor is measured in every run at the target of two stages or more")
    elif best.better_than_constant:
        beat = sum(v.better_than_constant for v in rows)
        print(f"beats a constant: {best.predictor} forecasts a stage it was not fitted on with mean absolute error "
              f"{best.loso_error:.3g} against {best.constant_error:.3g} for a constant, "
              f"{100 * (1 - best.loso_error / best.constant_error):.0f}% lower (Spearman within stages "
              f"{best.mean_spearman:+.2f} +- {best.spearman_sd:.2f}); {beat} of {len(rows)} predictors beat the "
              "constant, and choosing the best of them is not itself held out")
    else:
        print(f"NO PREDICTOR FORECASTS BETTER THAN A CONSTANT: the best, {best.predictor}, forecasts a held-out "
              f"stage with mean absolute error {best.loso_error:.3g}; a constant (the other stages' mean token "
              f"ratio) does {best.constant_error:.3g}")
    return best


def plot_calibration(path, best, target_loss, at_tokens):
    """Held-out forecast against the actual token ratio, a colour per stage, with the diagonal."""
    stages = list(dict.fromkeys(g for _, g, _, _ in best.forecasts))
    series = [plots.Series(g, [f for _, s, f, _ in best.forecasts if s == g],
                           [y for _, s, _, y in best.forecasts if s == g], style="o", ms=6) for g in stages]
    lo = min(min(f, y) for _, _, f, y in best.forecasts)
    hi = max(max(f, y) for _, _, f, y in best.forecasts)
    series.insert(0, plots.Series("forecast = actual", [lo, hi], [lo, hi], style="--", color="k", ms=0, lw=1))
    title = (f"{best.predictor} at {plots.token_label(at_tokens)} tokens, forecast of each stage from the others "
             f"(val_loss <= {target_loss:.4g}): error {best.loso_error:.3g}, constant {best.constant_error:.3g}")
    return plots.draw(path, [plots.Panel(title, series, "forecast token ratio (held-out stage)",
                                         "actual token ratio")], ncols=1, panel_size=(6.4, 4.8))


# ----------------------------------------------------------------------------------------------
# 5. The forecast command


def family_labels(runs):
    """{run name: 'F1', ...} in order of first appearance."""
    labels, names = {}, {}
    for r in runs:
        labels.setdefault(family_key(r.record), f"F{len(labels) + 1}")
        names[r.name] = labels[family_key(r.record)]
    return names


def forecast_rows(runs, target_loss, at_tokens):
    """(a dict per run for the table, predictor rows, best row or None). A run not at the target yet
    gets the best predictor's line at its value; a run that reached it gets its leave-one-out
    prediction (what the forecast would have said without it), to set beside its real ratio."""
    rows = rank_predictors(runs, target_loss, at_tokens)
    best = rows[0] if rows and rows[0].eligible else None
    ratios, families = token_ratios(runs, target_loss), family_labels(runs)
    family_best = {}
    for r in runs:
        if ratios[r.name][0] is not None:
            family_best[families[r.name]] = min(family_best.get(families[r.name], math.inf), ratios[r.name][0])
    held_out = dict(zip(best.runs, loo_predictions(best.x, best.y))) if best else {}
    table = []
    for r in runs:
        tokens, ratio = ratios[r.name]
        value = predictor_values(r.records, at_tokens).get(best.predictor) if best else None
        if value is None:
            predicted = None
        elif tokens is not None:
            predicted = held_out.get(r.name)
        else:
            predicted = best.slope * value + best.intercept
        scale = family_best.get(families[r.name]) if tokens is None and predicted is not None else None
        table.append(dict(run=r.name, family=families[r.name], batch_size=setting(r.record, "batch_size"),
                          reached=tokens is not None, tokens_to_target=tokens, token_ratio=ratio,
                          predictor=best.predictor if best else None, predictor_value=value,
                          forecast_ratio=predicted, loo_error=best.loo_error if best else None,
                          forecast_tokens=None if scale is None else predicted * scale, truncated=r.truncated))
    return table, rows, best


def fmt(value, spec=".4g"):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:,.0f}" if abs(value) >= 1e4 else format(value, spec)  # token counts: 32,768
    return str(value)


def text_table(header, rows):
    """Columns padded to their widest cell."""
    cells = [header] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in cells)


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows([["" if c is None or (isinstance(c, float) and math.isnan(c)) else c for c in row]
                     for row in rows])  # empty: not measured (no seed spread, no spectra)


FORECAST_COLUMNS = ("run", "family", "batch_size", "reached", "tokens_to_target", "token_ratio", "predictor",
                    "predictor_value", "forecast_ratio", "loo_error", "forecast_tokens", "truncated")
PREDICTOR_COLUMNS = ("predictor", "n", "spearman", "loo_error", "slope", "intercept", "eligible")


def predictor_cells(row):
    return [row.predictor, row.n, row.spearman, row.loo_error, row.slope, row.intercept, row.eligible]


def print_forecast(table, rows, best, target_loss, at_tokens, families, top=15):
    print(f"token ratio to val_loss <= {target_loss:g} (tokens to target / family best; 1 = best), "
          f"predictors at {at_tokens:,.0f} tokens")
    print("families: " + "; ".join(f"{f} = {', '.join(n for n, g in families.items() if g == f)}"
                                    for f in dict.fromkeys(families.values())))
    show = [[row[c] if c != "reached" else ("yes" if row[c] else "NOT YET") for c in FORECAST_COLUMNS[:-1]]
            for row in table]
    print(text_table(list(FORECAST_COLUMNS[:-1]), show))
    if best is None:
        print("no forecast: no predictor measured in every run that reached the target, with at least 3 such runs")
    else:
        print(f"best predictor: {best.predictor} (Spearman {best.spearman:+.3f} over {best.n} runs, leave-one-out "
              f"error {best.loo_error:.3g}); forecast_ratio of runs that reached the target is their leave-one-out "
              "prediction")
    print(f"predictors (top {min(top, len(rows))} of {len(rows)}; all in predictors.csv):")
    print(text_table(list(PREDICTOR_COLUMNS), [predictor_cells(r) for r in rows[:top]]))


def forecast_title(target_loss, at_tokens, best):
    """The forecast figure's title: the target loss, the tokens the predictors were read at
    (--at-tokens) and, with a predictor, how well it ranks the runs."""
    title = (f"token ratio to val_loss <= {target_loss:.4g}, predictors read at {plots.token_label(at_tokens)} tokens "
             f"(--at-tokens {at_tokens:,.0f})")
    return title + (f"\nSpearman {best.spearman:+.2f}, leave-one-out error {best.loo_error:.3g}" if best else "")


def plot_forecast(path, table, best, target_loss, at_tokens, colors=None):
    """Best predictor against token ratio: reached runs with the fitted line, runs not yet at the
    target at their forecast with the leave-one-out error as a bar, each run in its colour
    (plots.run_colors of the table's runs, as compare colours them). With no eligible predictor
    there is nothing to draw: no file, an empty result."""
    if best is None:
        return plots.DrawnFigure(forecast_title(target_loss, at_tokens, best))
    colors = colors or plots.run_colors([row["run"] for row in table])
    pending = [row for row in table if not row["reached"] and row["forecast_ratio"] is not None]
    return plots.forecast(path, (best.runs, best.x, best.y), (best.slope, best.intercept),
                          ([r["run"] for r in pending], [r["predictor_value"] for r in pending],
                           [r["forecast_ratio"] for r in pending], best.loo_error), best.predictor,
                          forecast_title(target_loss, at_tokens, best), colors)


def forecast_command(runs, target_loss, at_tokens, out):
    """The forecast table, forecast.csv, predictors.csv and forecast.png (runs in natural order of
    their names, coloured as compare colours them); returns (table, predictor rows, best row)."""
    runs = sorted(runs, key=lambda r: plots.natural_key(r.name))
    last = max((r["tokens"] for run in runs for r in run.records if finite(r.get("tokens"))), default=0)
    if at_tokens > last:
        warn(f"--at-tokens {at_tokens:,.0f} is past every run's last evaluation ({last:,} tokens): no run has "
             "predictors measured there; choose a token count the runs have reached")
    table, rows, best = forecast_rows(runs, target_loss, at_tokens)
    print_forecast(table, rows, best, target_loss, at_tokens, family_labels(runs))
    os.makedirs(out, exist_ok=True)
    write_csv(os.path.join(out, "forecast.csv"), FORECAST_COLUMNS, [[r[c] for c in FORECAST_COLUMNS] for r in table])
    write_csv(os.path.join(out, "predictors.csv"), PREDICTOR_COLUMNS, [predictor_cells(r) for r in rows])
    written = ["forecast.csv", "predictors.csv"]
    if plot_forecast(os.path.join(out, "forecast.png"), table, best, target_loss, at_tokens,
                     plots.run_colors([r.name for r in runs])):
        written.append("forecast.png")
    validation = validate_predictors(runs, target_loss, at_tokens) if len(stage_groups(runs)) > 1 else []
    if validation:
        checked = print_validation(validation)
        write_csv(os.path.join(out, "validation.csv"), VALIDATION_COLUMNS, [validation_cells(v) for v in validation])
        written.append("validation.csv")
        if checked and plot_calibration(os.path.join(out, "calibration.png"), checked, target_loss, at_tokens):
            written.append("calibration.png")
    print(f"wrote {', '.join(os.path.join(out, f) for f in written)}")
    return table, rows, best


# ----------------------------------------------------------------------------------------------
# 6. The compare command


PREFERRED_KIND = {"act": "mlp_resid", "grad": "attn.c_proj"}  # what the trainer measures by default


def plotted_points(runs, family, stat):
    """Points of one kind, by layer: the block outputs (act) or attn.c_proj (grad) where measured,
    else the most common kind; embed and final around them for activations."""
    points = {k.split("/", 2)[2] for r in runs for rec in r.records for k in rec if k.startswith(f"{family}/{stat}/")}
    kinds = [split_point(p)[1] for p in points if split_point(p)[0] is not None]
    if not kinds:
        return sorted(points)
    kind = PREFERRED_KIND[family] if PREFERRED_KIND[family] in kinds else max(set(kinds), key=kinds.count)
    layered = sorted((p for p in points if split_point(p)[1] == kind and split_point(p)[0] is not None),
                     key=lambda p: split_point(p)[0])
    return [p for p in ("embed",) if p in points] + layered + [p for p in ("final",) if p in points]


def x_position(point, n_layer):
    """Layer axis: embed -1, L05.* 5, final n_layer."""
    layer = split_point(point)[0]
    return -1 if point == "embed" else n_layer if point == "final" else layer


def eval_tokens(run, family, stat):
    """Tokens of the evaluations that measured this family's stat."""
    return [r["tokens"] for r in run.records if finite(r.get("tokens"))
            and any(k.startswith(f"{family}/{stat}/") for k in r)]


def matched_tokens(runs, family, stat, tokens=None):
    """The token count runs are compared at: `tokens` if given, else the largest every run reached,
    the last evaluation of the run that stopped first. Evaluations at different batch sizes rarely
    fall on the same token counts, so a run's values there are interpolated between the two
    evaluations around it (compare_rows), not taken from a shared evaluation, which may be the one
    at 0 tokens only. A note says so when the runs are compared at 0 tokens."""
    lasts = {r.name: max(eval_tokens(r, family, stat), default=None) for r in runs}
    lasts = {name: last for name, last in lasts.items() if last is not None}
    if not lasts:
        raise AnalysisError(f"no run has {family}/{stat} measurements")
    if tokens is not None:
        return tokens
    chosen = min(lasts.values())
    if chosen == 0:
        at_zero = [name for name, last in lasts.items() if last == 0]
        print(f"note: matched tokens 0, the runs at initialisation: {', '.join(at_zero)} measured {family}/{stat} "
              "at 0 tokens only; pass --tokens T to compare the others later")
    return chosen


def nearest_record(run, family, stat, tokens):
    """The evaluation (with this family's spectra) nearest to tokens; None when there is none."""
    candidates = [r for r in run.records if finite(r.get("tokens")) and finite(r.get("val_loss"))
                  and any(k.startswith(f"{family}/{stat}/") for k in r)]
    return min(candidates, key=lambda r: (abs(r["tokens"] - tokens), r["tokens"])) if candidates else None


def row_at_tokens(run, family, stat, points, tokens):
    """(row, interpolated): [name, tokens, val_loss, value per point] at `tokens`, interpolated
    linearly between the run's two evaluations around it; the run's nearest evaluation instead
    (interpolated False) when its evaluations of this stat do not reach both sides of `tokens`."""
    grid = eval_tokens(run, family, stat)
    if grid and min(grid) <= tokens <= max(grid):
        return [run.name, tokens, value_at(run.records, "val_loss", tokens)] + \
            [value_at(run.records, f"{family}/{stat}/{p}", tokens) for p in points], True
    rec = nearest_record(run, family, stat, tokens) or {}
    return [run.name, rec.get("tokens"), rec.get("val_loss")] + [rec.get(f"{family}/{stat}/{p}") for p in points], \
        False


def compare_rows(runs, family, stat, points, tokens, loss):
    """({'tokens': rows, 'loss': rows}, [names of runs at their nearest evaluation]), a row per run:
    [name, tokens, val_loss, value per point]. At matched tokens: values interpolated in tokens
    between the run's evaluations around them (row_at_tokens). At matched loss: the first crossing
    of val_loss <= loss, values interpolated in tokens between the evaluations bracketing it."""
    out, nearest = {"tokens": [], "loss": []}, []
    for run in runs:
        row, interpolated = row_at_tokens(run, family, stat, points, tokens)
        out["tokens"].append(row)
        if not interpolated:
            nearest.append(run.name)
        crossing = tokens_to_target(run.records, loss)
        values = [None if crossing is None else value_at(run.records, f"{family}/{stat}/{p}", crossing)
                  for p in points]
        out["loss"].append([run.name, crossing, loss if crossing is not None else final_loss(run.records)] + values)
    return out, nearest


def warn_nearest(runs, nearest, family, stat, tokens):
    """Say which runs are compared at their nearest evaluation, not at `tokens` itself."""
    if not nearest:
        return
    grids = [eval_tokens(r, family, stat) for r in runs if r.name in nearest]
    last, first = max(max(g, default=0) for g in grids), min(min(g, default=0) for g in grids)
    if len(nearest) == len(runs) and tokens > last:
        warn(f"--tokens {tokens:,.0f} is past every run's last evaluation ({last:,} tokens); each run is compared "
             "at its nearest evaluation")
    elif len(nearest) == len(runs) and tokens < first:
        warn(f"--tokens {tokens:,.0f} is before every run's first evaluation ({first:,} tokens); each run is "
             "compared at its nearest evaluation")
    else:
        warn(f"{', '.join(nearest)}: no {family}/{stat} evaluations on both sides of {tokens:,.0f} tokens; compared "
             "at the nearest evaluation (its tokens in the table)")


def short(point):
    """Column label: L05.mlp_resid -> L05."""
    return point.split(".", 1)[0]


def print_compare(rows, family, stat, points, tokens, loss, nearest=()):
    header = ["run", "tokens", "val_loss"] + [short(p) for p in points]
    kind = ", ".join(sorted({split_point(p)[1] for p in points if split_point(p)[0] is not None}))
    how = "interpolated between each run's evaluations" + (f"; {', '.join(nearest)} at the nearest evaluation"
                                                           if nearest else "")
    print(f"{family}/{stat} of {kind or 'the points'} (L = layer), at matched tokens {tokens:,.0f} ({how}):")
    print(text_table(header, rows["tokens"]))
    print(f"{family}/{stat} at matched loss val_loss <= {loss:.4g} (first crossing, interpolated in tokens; "
          "tokens '-' = not reached, val_loss then its final one):")
    print(text_table(header, rows["loss"]))


def plot_alpha_layers(path, rows, family, stat, points, n_layer, tokens, loss, colors=None):
    xs = [x_position(p, n_layer) for p in points]
    panels = {title: {row[0]: (xs, row[3:]) for row in rows[which]}
              for which, title in (("tokens", f"at {tokens:,.0f} tokens"), ("loss", f"at val_loss {loss:.4g}"))}
    names = {x_position(p, n_layer): p for p in ("embed", "final") if p in points}
    return plots.alpha_by_layer(path, panels, f"{family}/{stat}", sharey=True, xlabel="layer", xnames=names,
                                colors=colors)


def plot_alpha_tokens(path, runs, family, stat, points, colors=None):
    panels = {p: {run.name: tuple(zip(*series(run.records, f"{family}/{stat}/{p}")))
                  for run in runs if series(run.records, f"{family}/{stat}/{p}")} for p in points}
    return plots.alpha_by_tokens(path, panels, title=f"{family}/{stat} against tokens", ncols=min(4, len(points)),
                                 colors=colors)


def plot_loss(path, runs, tokens, loss, colors=None):
    return plots.loss_by_tokens(path, {run.name: (series(run.records, "train_loss"), series(run.records, "val_loss"))
                                       for run in runs}, tokens, loss, colors)


def spectrum_near(run, family, point, tokens):
    """(file tokens, values, valid rank) of the run's saved spectrum nearest to tokens."""
    files = spectra.spectra_files(run.path, family) if run.path else []
    if not files or tokens is None:
        return None
    t, f = min(files, key=lambda tf: (abs(tf[0] - tokens), tf[0]))
    saved, _, limits = spectra.load_spectra(f)
    if point not in saved:
        return None
    values = saved[point]
    return t, values, spectra.numerical_rank(values, limits.get(point, len(values)))


def plot_spectra_overlay(path, runs, family, point, tokens, crossings, loss, colors=None):
    """Eigen- (act) or singular (grad) values against rank of one point for every run, at matched
    tokens and at matched loss (the saved spectrum nearest to each run's crossing), each run in its
    colour; {} when no run has a saved spectrum there (nothing is drawn). Spectra with nothing to
    draw (all zero at initialisation) are named in the panel's title."""
    colors = colors or plots.run_colors([r.name for r in runs])
    panels = {}
    for title, where in ((f"at {tokens:,.0f} tokens", [tokens] * len(runs)), (f"at val_loss {loss:.4g}", crossings)):
        panels[title] = []
        for run, t in zip(runs, where):
            found = spectrum_near(run, family, point, t)
            if found is not None and len(found[1]):
                panels[title].append(plots.Curve(f"{run.name} ({plots.token_label(found[0])} tok)", found[1],
                                                 color=colors[run.name], rank=found[2]))
    if not any(panels.values()):
        return {}
    return plots.spectra(path, panels, "eigenvalue" if family == "act" else "singular value",
                         f"{family} spectra of {point}")


def layer_point(points, layer):
    """The plotted point of a layer (the block output for act), None when it was not measured."""
    return next((p for p in points if split_point(p)[0] == layer), None)


def n_layers(runs):
    return max(setting(r.record, "n_layer") or 0 for r in runs)


def compare_command(runs, out, family="act", stat="alpha_tail", layer=None, tokens=None, loss=None):
    """Plots and tables comparing runs, in natural order of their names (bs4, bs8, bs16), each run in
    one colour in every figure (plots.run_colors of all the runs given, as the forecast command
    colours them); returns {'tokens', 'loss', 'points', 'rows', 'files', 'figures'}, figures
    {file name: what it drew}."""
    runs = sorted(runs, key=lambda r: plots.natural_key(r.name))
    colors = plots.run_colors([r.name for r in runs])
    for r in runs:
        if not series(r.records, "val_loss"):
            warn(f"{r.name}: no evaluation in its metrics, left out of the comparison")
    runs = [r for r in runs if series(r.records, "val_loss")]
    if not runs:
        raise AnalysisError("no run has an evaluation to compare")
    points = plotted_points(runs, family, stat)
    if not points:
        raise AnalysisError(f"no run has {family}/{stat}/... metrics (spectra off, or another --family/--stat?)")
    if family == "weight" and stat in ("alpha_density", "density_xmin", "density_ks"):
        rules = {r.name: setting(r.record, "weight_density_rule") for r in runs}
        if len(set(rules.values())) > 1:
            warn(f"weight/{stat} was measured with different x_min rules (weight_density_rule) {rules}; its values "
                 "are not comparable")
    for version, families, stats in spectra.METRIC_CHANGES:
        if family in families and stat in stats:
            versions = {r.name: r.record.metric_version for r in runs}
            if len({v >= version for v in versions.values()}) > 1:
                warn(f"{family}/{stat} was defined differently before metric version {version} "
                     f"(spectra.METRIC_CHANGES); these runs mix versions {versions}, so its values are not comparable")
    tokens = matched_tokens(runs, family, stat, tokens)
    loss = max(final_loss(r.records) for r in runs) if loss is None else loss
    rows, nearest = compare_rows(runs, family, stat, points, tokens, loss)
    warn_nearest(runs, nearest, family, stat, tokens)
    if all(v is None for which in ("tokens", "loss") for row in rows[which] for v in row[3:]):
        warn(f"every {family}/{stat} value is null at the compared evaluations (a fit window beyond the valid "
             "ranks, e.g. a tail window with fewer grad_samples than its start): try --stat alpha_head")
    print_compare(rows, family, stat, points, tokens, loss, nearest)
    n_layer = n_layers(runs)
    layer = n_layer // 2 if layer is None else layer
    os.makedirs(out, exist_ok=True)
    files = [os.path.join(out, f) for f in ("compare.csv", "alpha_layer.png", "alpha_tokens.png", "loss_tokens.png")]
    write_csv(files[0], ["match", "run", "tokens", "val_loss"] + points,
              [[which] + row for which in ("tokens", "loss") for row in rows[which]])
    figures = {"alpha_layer.png": plot_alpha_layers(files[1], rows, family, stat, points, n_layer, tokens, loss,
                                                    colors),
               "alpha_tokens.png": plot_alpha_tokens(files[2], runs, family, stat, points, colors),
               "loss_tokens.png": plot_loss(files[3], runs, tokens, loss, colors)}
    files = files[:1] + [os.path.join(out, name) for name, drawn in figures.items() if drawn]
    point = layer_point(points, layer)
    if point is None:
        warn(f"layer {layer}: no {family} spectrum measured there; no spectra overlay")
    else:
        name = f"spectra_{family}_{short(point)}.png"
        drawn = plot_spectra_overlay(os.path.join(out, name), runs, family, point, tokens,
                                     [r[1] for r in rows["loss"]], loss, colors)
        if drawn:
            files.append(os.path.join(out, name))
            figures[name] = drawn
        else:
            why = f" ({'; '.join(drawn.left_out)})" if getattr(drawn, "left_out", None) else \
                " under RUN/spectra/ (runs from W&B have none)"
            warn(f"no saved {family} spectra of {point} to draw{why}; no overlay")
    print("wrote " + ", ".join(files))
    return dict(tokens=tokens, loss=loss, points=points, rows=rows, files=files, figures=figures)


# ----------------------------------------------------------------------------------------------
# 7. The stage report: what each stage of a ladder changed against the stage before, at one loss


SPREAD_K = 1.0  # a change counts when it exceeds SPREAD_K seed standard deviations (pooled over batch tiers)
VERDICT_RULE = (
    "at matched val_loss; spread = standard deviation over seeds within a (stage, batch tier), pooled over tiers;\n"
    f"  learning-side: tokens to target lower by more than {SPREAD_K:g} spread and the head moved (the mean JS "
    "divergence between the\n    stages' activation spectra exceeds the largest between two seeds of one stage, "
    "same tier, at most points);\n"
    f"  execution-side: tokens within {SPREAD_K:g} spread, training time to target lower by more than {SPREAD_K:g} "
    "spread;\n"
    f"  both: learning-side, and the time per token lower by more than {SPREAD_K:g} spread; neither: otherwise")


@dataclass
class StageRun:
    """One run of a ladder at its matched loss."""
    name: str
    stage: str
    tier: int                        # batch size
    seed: int
    tokens: float                    # tokens to the matched loss (interpolated between evaluations)
    seconds: float                   # training time to it: tokens / the run's median training throughput
    spectra: dict                    # {act point: trace-normalised spectrum at the matched loss}; {} without files
    grad: dict                       # {"alpha_head/<point>": gradient alpha at the matched loss, ...}

    @property
    def seconds_per_token(self):
        return self.seconds / self.tokens if self.tokens else math.nan


def ladder(runs):
    """({stage: [runs]} in the ladder's order, runs that record no stage). The order is the natural
    order of the names (03_baseline, 04_rope, ..., 18_attn_scale), as configs/stages/ numbers them."""
    stages, unplaced = {}, []
    for r in runs:
        stage = setting(r.record, "stage")
        if stage:
            stages.setdefault(stage, []).append(r)
        else:
            unplaced.append(r)
    return {s: stages[s] for s in sorted(stages, key=plots.natural_key)}, unplaced


def lowest_common_loss(runs):
    """The lowest val_loss every run reached: the highest of the runs' lowest evaluations."""
    lows = [min(v for _, v in series(r.records, "val_loss")) for r in runs if series(r.records, "val_loss")]
    return max(lows) if lows else None


def median_throughput(records):
    """The median of a run's training throughput (tokens_per_s: evaluations excluded); None if unlogged."""
    tps = sorted(v for _, v in series(records, "tokens_per_s") if v > 0)
    return (tps[(len(tps) - 1) // 2] + tps[len(tps) // 2]) / 2 if tps else None


def normalised_spectra_at(run, tokens):
    """{act point: trace-normalised spectrum at `tokens`}, linear in tokens between the two saved
    spectra around it (the nearest one outside their range); {} for a run without saved spectra."""
    files = spectra.spectra_files(run.path, "act") if run.path else []
    if not files:
        return {}
    before = [tf for tf in files if tf[0] <= tokens] or files[:1]
    after = [tf for tf in files if tf[0] >= tokens] or files[-1:]
    (t0, f0), (t1, f1) = before[-1], after[0]
    w = (tokens - t0) / (t1 - t0) if t1 > t0 else 0.0
    lo, hi = spectra.load_spectra(f0)[0], spectra.load_spectra(f1)[0]
    out = {}
    for point in lo.keys() & hi.keys():
        k = min(len(lo[point]), len(hi[point]))
        p, q = spectra.normalised(lo[point][:k]), spectra.normalised(hi[point][:k])
        if p is not None and q is not None:
            out[point] = (1 - w) * p + w * q
    return out


def grad_value_near(records, key, tokens):
    """A gradient metric at `tokens`, interpolated between the evaluations around it; where none
    follows (gradient spectra come every grad_spectra_every-th evaluation, and a run stopped at its
    target may end between two), the value of the nearest evaluation that has it."""
    value = value_at(records, key, tokens)
    points = series(records, key)
    return value if value is not None or not points else min(points, key=lambda p: abs(p[0] - tokens))[1]


def stage_run(run, stage, loss, grad_points):
    """The StageRun of a run at val_loss `loss`; None when the run never reached it."""
    tokens = tokens_to_target(run.records, loss)
    if tokens is None:
        return None
    tps = median_throughput(run.records)
    grad = {f"{stat}/{p}": grad_value_near(run.records, f"grad/{stat}/{p}", tokens)
            for stat in ("alpha_head", "alpha_tail") for p in grad_points}
    return StageRun(run.name, stage, setting(run.record, "batch_size"), setting(run.record, "seed"), tokens,
                    tokens / tps if tps else math.nan, normalised_spectra_at(run, tokens),
                    {k: v for k, v in grad.items() if v is not None})


def by_tier(runs):
    tiers = {}
    for r in runs:
        tiers.setdefault(r.tier, []).append(r)
    return tiers


def pooled_sd(groups):
    """Standard deviation pooled over groups (sum of squared deviations from each group's mean over
    the sum of n - 1); NaN when no group has two values."""
    ss = dof = 0.0
    for values in groups:
        values = [v for v in values if math.isfinite(v)]
        if len(values) >= 2:
            mean = sum(values) / len(values)
            ss += sum((v - mean) ** 2 for v in values)
            dof += len(values) - 1
    return math.sqrt(ss / dof) if dof else math.nan


def log_change(prev, cur, value):
    """(change, spread) of log value(run) from stage `prev` to `cur`: the mean over common tiers of
    the difference of the tiers' mean logs, and the seed spread of the log pooled over both stages'
    tiers. exp(change) is the ratio cur / prev."""
    a, b = by_tier(prev), by_tier(cur)
    tiers = sorted(a.keys() & b.keys())
    logs = {(s, t): [math.log(value(r)) for r in runs[t] if value(r) > 0]
            for s, runs in (("a", a), ("b", b)) for t in tiers}
    change = mean([mean(logs["b", t]) - mean(logs["a", t]) for t in tiers])
    return change, pooled_sd(logs.values())


def js_between(prev, cur, point):
    """Mean JS divergence between a run of `prev` and one of `cur` at the same tier, every pair."""
    a, b = by_tier(prev), by_tier(cur)
    return mean([spectra.js_divergence(x.spectra[point], y.spectra[point]) for t in a.keys() & b.keys()
                 for x in a[t] for y in b[t] if point in x.spectra and point in y.spectra])


def js_floor(runs, point):
    """The largest JS divergence between two seeds of one stage at one tier (the noise floor);
    NaN when no tier has two seeds."""
    pairs = [spectra.js_divergence(x.spectra[point], y.spectra[point]) for group in by_tier(runs).values()
             for i, x in enumerate(group) for y in group[i + 1:] if point in x.spectra and point in y.spectra]
    return max(pairs, default=math.nan)


def grad_change(prev, cur, key):
    """(change of a gradient alpha from prev to cur: mean over common tiers of the tiers' mean
    difference, its seed spread pooled over both stages' tiers)."""
    a, b = by_tier(prev), by_tier(cur)
    tiers = sorted(a.keys() & b.keys())
    vals = {(s, t): [r.grad[key] for r in runs[t] if key in r.grad] for s, runs in (("a", a), ("b", b)) for t in tiers}
    change = mean([mean(vals["b", t]) - mean(vals["a", t]) for t in tiers])
    return change, pooled_sd(vals.values())


def judge(tokens, seconds, per_token, moved, n_points):
    """(verdict, reason) from (change, spread) of log tokens, log seconds and log seconds per token
    and the number of act points whose head moved (None: unknown) out of n_points."""
    (dt, st), (ds, ss), (dp, sp) = tokens, seconds, per_token
    if not math.isfinite(st):
        return "withheld", "one seed per batch tier: no seed spread"
    fewer, within = dt < -SPREAD_K * st, abs(dt) <= SPREAD_K * st
    faster = math.isfinite(ss) and ds < -SPREAD_K * ss
    cheaper = math.isfinite(sp) and dp < -SPREAD_K * sp
    if fewer and moved is None:
        return "withheld", "fewer tokens, but no saved activation spectra to tell whether the head moved"
    head = moved is not None and moved * 2 > n_points
    if fewer and head:
        return ("both", "fewer tokens, head moved, cheaper tokens") if cheaper else \
            ("learning-side", "fewer tokens, head moved")
    if within and faster:
        return "execution-side", "tokens within the seed spread, less training time"
    if fewer:
        return "neither", f"fewer tokens, but the head moved at only {moved} of {n_points} points"
    return "neither", "more tokens than the seed spread allows" if dt > SPREAD_K * st else \
        "tokens within the seed spread" + ("" if faster else ", training time too")


def compare_stage(prev, cur, act_points, grad_points, spectral):
    """(row, layer rows) of stage `cur` against stage `prev` (lists of StageRun). With `spectral`
    False (the stages were measured differently) no spectra are compared."""
    tokens = log_change(prev, cur, lambda r: r.tokens)
    seconds = log_change(prev, cur, lambda r: r.seconds)
    per_token = log_change(prev, cur, lambda r: r.seconds_per_token)
    layers, moved = [], None
    if spectral and all(r.spectra for r in prev + cur):
        for p in act_points:
            between, floor = js_between(prev, cur, p), max(js_floor(prev, p), js_floor(cur, p))
            layers.append(dict(stage=cur[0].stage, family="act", point=p, js=between, js_floor=floor,
                               moved=between > floor if math.isfinite(floor) else None))
        if layers and all(r["moved"] is not None for r in layers):
            moved = sum(r["moved"] for r in layers)
    for p in grad_points if spectral else ():
        (dh, sh), (dt, st) = (grad_change(prev, cur, f"{stat}/{p}") for stat in ("alpha_head", "alpha_tail"))
        layers.append(dict(stage=cur[0].stage, family="grad", point=p, d_alpha_head=dh, alpha_head_spread=sh,
                           d_alpha_tail=dt, alpha_tail_spread=st))
    verdict, reason = judge(tokens, seconds, per_token, moved, len(act_points))
    if not spectral and verdict != "execution-side":
        verdict, reason = "withheld", "the stages were measured differently: their spectra are not compared"
    a, b = by_tier(prev), by_tier(cur)
    act, grad = ([r for r in layers if r["family"] == f] for f in ("act", "grad"))
    row = dict(stage=cur[0].stage, previous=prev[0].stage, tiers=" ".join(map(str, sorted(a.keys() & b.keys()))),
               seeds=min(len(g) for g in [*a.values(), *b.values()]),
               token_ratio=math.exp(tokens[0]), token_spread=math.exp(tokens[1]),
               time_ratio=math.exp(seconds[0]), time_spread=math.exp(seconds[1]),
               per_token_ratio=math.exp(per_token[0]), per_token_spread=math.exp(per_token[1]),
               js=mean([r["js"] for r in act]), js_floor=mean([r["js_floor"] for r in act]),
               head_moved=None if moved is None else f"{moved}/{len(act)}",
               d_grad_alpha_head=mean([r["d_alpha_head"] for r in grad]),
               grad_head_spread=mean([r["alpha_head_spread"] for r in grad]),
               d_grad_alpha_tail=mean([r["d_alpha_tail"] for r in grad]),
               grad_tail_spread=mean([r["alpha_tail_spread"] for r in grad]),
               verdict=verdict, reason=reason)
    return row, layers


STAGE_COLUMNS = ("stage", "previous", "tiers", "seeds", "token_ratio", "token_spread", "time_ratio", "time_spread",
                 "per_token_ratio", "per_token_spread", "js", "js_floor", "head_moved", "d_grad_alpha_head",
                 "grad_head_spread", "d_grad_alpha_tail", "grad_tail_spread", "verdict", "reason")
LAYER_COLUMNS = ("stage", "family", "point", "js", "js_floor", "moved", "d_alpha_head", "alpha_head_spread",
                 "d_alpha_tail", "alpha_tail_spread")


def ladder_notes(stages, reached, loss):
    """What the ladder lacks, one line each: stages between two numbered ones, tiers a stage lacks,
    stages with one seed per tier, runs that never reached the matched loss."""
    notes = []
    numbers = {s: int(re.match(r"\d+", s).group()) for s in stages if re.match(r"\d+", s)}
    names = list(stages)
    for a, b in zip(names, names[1:]):
        if a in numbers and b in numbers and numbers[b] - numbers[a] > 1:
            gap = f"stage {numbers[a] + 1:02d} is" if numbers[b] - numbers[a] == 2 else \
                f"stages {numbers[a] + 1:02d}-{numbers[b] - 1:02d} are"
            notes.append(f"{b} is compared with {a}: {gap} not in these runs")
    tiers = set().union(*(by_tier(r).keys() for r in reached.values()))
    for s, runs in reached.items():
        have = by_tier(runs)
        if tiers - have.keys():
            notes.append(f"{s} lacks batch tier(s) {', '.join(map(str, sorted(tiers - have.keys())))} at val_loss "
                         f"{loss:.4g}: its comparisons use the tiers both stages have")
        if have and max(len(g) for g in have.values()) < 2:
            notes.append(f"{s} has one seed per tier: no noise floor, verdicts that involve it are withheld")
    for s, runs in stages.items():
        reached_names = {x.name for x in reached[s]}
        missed = [r.name for r in runs if r.name not in reached_names]
        if missed:
            notes.append(f"{s}: {', '.join(missed)} never reached val_loss {loss:.4g}; left out")
    return notes


def stage_rows(runs, loss=None):
    """(rows, layer rows, notes, matched loss) of a ladder's runs, each stage against the one before.
    The matched loss is `loss`, else the lowest val_loss every run reached."""
    stages, unplaced = ladder(runs)
    notes = [f"{', '.join(r.name for r in unplaced)}: no stage recorded (config key `stage`); left out"] \
        if unplaced else []
    if len(stages) < 2:
        raise AnalysisError(f"a ladder needs runs of two stages or more; these runs record {len(stages)} "
                            f"({', '.join(stages) or 'none'}): set `stage` in each stage's config (configs/stages/ "
                            "files set it by their names, bench/toy_study.py writes it)")
    placed = [r for rs in stages.values() for r in rs]
    loss = lowest_common_loss(placed) if loss is None else loss
    if loss is None:
        raise AnalysisError("no run has an evaluation: there is no loss to match the stages at")
    act_points = plotted_points(placed, "act", "alpha_tail")
    grad_points = [p for p in plotted_points(placed, "grad", "alpha_tail") if split_point(p)[0] is not None]
    reached = {s: [x for x in (stage_run(r, s, loss, grad_points) for r in rs) if x is not None]
               for s, rs in stages.items()}
    notes += ladder_notes(stages, reached, loss)
    rows, layers = [], []
    for a, b in zip(stages, list(stages)[1:]):
        if not by_tier(reached[a]).keys() & by_tier(reached[b]).keys():
            notes.append(f"{b} against {a}: no batch tier where both reached val_loss {loss:.4g}; not compared")
            continue
        mixed = differing_settings(stages[a] + stages[b])
        if mixed:
            notes.append(f"{b} against {a}: measured differently ({'; '.join(mixed)}); spectra not compared")
        row, lrows = compare_stage(reached[a], reached[b], act_points, grad_points, not mixed)
        rows.append(row)
        layers += lrows
    return rows, layers, notes, loss


def plot_stages(path, rows, layers, loss):
    """One panel per quantity against the stage: the token and time ratios with their seed spread,
    the head's JS divergence over its seed floor per point, the gradient alpha changes per point."""
    xs = {row["stage"]: i for i, row in enumerate(rows)}

    def points(family, key):  # {point: ([x], [value])} over the stages that have it
        out = {}
        for r in layers:
            if r["family"] == family and r.get(key) is not None and r["stage"] in xs:
                out.setdefault(r["point"], ([], []))
                out[r["point"]][0].append(xs[r["stage"]])
                out[r["point"]][1].append(r[key])
        return out

    def bars(key, spread):  # the ratio divided and multiplied by the spread factor
        return [[r[key] - r[key] / r[spread] for r in rows], [r[key] * r[spread] - r[key] for r in rows]]

    axis = dict(xlabel="stage (against the one before)", xticks="layer", xnames={i: s for s, i in xs.items()})
    ratio = [plots.Series(label, list(xs.values()), [r[key] for r in rows], yerr=bars(key, spread))
             for label, key, spread in (("tokens to target", "token_ratio", "token_spread"),
                                        ("training time to target", "time_ratio", "time_spread"))]
    for r in layers:
        if r["family"] == "act":
            r["js_over_floor"] = r["js"] / r["js_floor"] if r["js_floor"] and math.isfinite(r["js_floor"]) else None
    panels = [plots.Panel("ratio to the stage before (bars: seed spread)", ratio, ylabel="ratio (< 1: better)",
                          hlines=[(1.0, "no change")], **axis),
              plots.Panel("head movement: JS between stages / seed floor", [
                  plots.Series(p, x, y) for p, (x, y) in points("act", "js_over_floor").items()],
                  ylabel="JS / floor (> 1: moved)", hlines=[(1.0, "seed floor")], **axis)]
    for stat in ("alpha_head", "alpha_tail"):
        panels.append(plots.Panel(f"change of gradient {stat}", [
            plots.Series(p, x, y) for p, (x, y) in points("grad", f"d_{stat}").items()],
            ylabel=f"d grad {stat}", hlines=[(0.0, None)], **axis))
    return plots.draw(path, panels, f"each stage against the one before, at val_loss {loss:.4g}", ncols=2,
                      panel_size=(max(4.6, 1.1 * len(rows) + 1.5), 3.6))  # room for every stage name


def log_wandb_table(path, columns, rows):
    """The stage table as a W&B Table, in a run of job type 'analysis' in the runs' project
    (ENTITY/PROJECT[/GROUP], the group too when given)."""
    import wandb
    project, group = parse_wandb_path(path)
    entity, name = project.split("/")
    run = wandb.init(entity=entity, project=name, group=group, job_type="analysis", name="stage-report")
    run.log({"stages": wandb.Table(columns=list(columns), data=[[row.get(c) for c in columns] for row in rows])})
    run.finish()


def stages_command(runs, out, loss=None, wandb_project=None):
    """The stage report: table, stages.csv, stages_layers.csv, stages.png (and, for runs from W&B,
    the table as a W&B Table); returns (rows, layer rows, notes, matched loss)."""
    rows, layers, notes, loss = stage_rows(runs, loss)
    print(f"stages at matched val_loss {loss:.4g} (ratios: this stage over the one before; spread: the seed "
          "spread as a factor)")
    show = [c for c in STAGE_COLUMNS if c not in ("previous", "reason")]
    print(text_table(show, [[row[c] for c in show] for row in rows]))
    for row in rows:
        print(f"  {row['stage']}: {row['verdict']} ({row['reason']})")
    print("rule: " + VERDICT_RULE)
    for note in notes:
        print(f"note: {note}")
    os.makedirs(out, exist_ok=True)
    files = [os.path.join(out, f) for f in ("stages.csv", "stages_layers.csv", "stages.png")]
    write_csv(files[0], STAGE_COLUMNS, [[row[c] for c in STAGE_COLUMNS] for row in rows])
    write_csv(files[1], LAYER_COLUMNS, [[row.get(c) for c in LAYER_COLUMNS] for row in layers])
    if not rows or not plot_stages(files[2], rows, layers, loss):
        files.pop()
    if wandb_project:
        log_wandb_table(wandb_project, STAGE_COLUMNS, rows)
        files.append(f"W&B table 'stages' in {wandb_project}")
    print("wrote " + ", ".join(files))
    return rows, layers, notes, loss


# ----------------------------------------------------------------------------------------------
# 8. Command line


def count(text):
    """'40000', '4e4', '40k', '2.5M', '1B' -> float."""
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([kKmMbB]?)\s*", text)
    try:
        return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}[m.group(2).lower()]
    except (AttributeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (e.g. 40000, 4e4, 40k, 2.5M)") from None


def parse_args(argv):
    p = argparse.ArgumentParser(prog="analyze.py", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("compare", "forecast", "stages"):
        s = sub.add_parser(name)
        s.add_argument("runs", nargs="*", help="run directories, or folders of run directories")
        s.add_argument("--wandb", action="append", default=[], metavar="ENTITY/PROJECT[/GROUP]",
                       help="runs of a W&B project (and group), in addition to directories")
        s.add_argument("--out", default="analysis", help="output folder (default analysis/)")
        s.add_argument("--allow-mixed", action="store_true",
                       help="compare runs with different probe sets, fit windows or model profiles (warning)")
        if name == "compare":
            s.add_argument("--layer", type=int, help="layer of the spectra overlay (default n_layer // 2)")
            s.add_argument("--tokens", type=count, help="matched tokens (default the largest every run reached; "
                                                        "values interpolated between each run's evaluations)")
            s.add_argument("--loss", type=float, help="matched val_loss (default the highest final val_loss)")
            s.add_argument("--family", choices=("act", "grad"), default="act")
            s.add_argument("--stat", default="alpha_tail", help="alpha_tail (default), alpha_head, rankme, ...")
        elif name == "stages":
            s.add_argument("--loss", type=float, help="matched val_loss (default the lowest every run reached)")
        else:
            s.add_argument("--target-loss", type=float, required=True, help="val_loss target")
            s.add_argument("--at-tokens", type=count, required=True, help="tokens at which predictors are read")
    return p.parse_args(argv)


def gather_runs(args, api=None):
    """Local runs, then W&B runs. An unreachable W&B project is an error, unless local runs were
    given: then it is reported and the local runs are analysed."""
    runs = load_runs(args.runs)
    for path in args.wandb:
        try:
            runs += load_wandb_runs(path, api)
        except WandbError as e:
            if not runs:
                raise
            print(f"warning: {e}; going on with the {len(runs)} local run(s)", file=sys.stderr)
    if not runs:
        raise AnalysisError("no runs given: pass run directories or --wandb ENTITY/PROJECT[/GROUP]")
    return unique_names(runs)


def show_warning(message, category, filename, lineno, file=None, line=None):
    """Our own warnings as one 'warning: ...' line on stderr; others (numpy, matplotlib) as usual."""
    if issubclass(category, AnalysisWarning):
        print(f"warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def main(argv=None, api=None):
    """The command line; `api` stands in for wandb.Api() (tests)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        print(f"error: --out {args.out} is a file; give a directory for the tables and plots", file=sys.stderr)
        sys.exit(2)
    with warnings.catch_warnings():
        warnings.simplefilter("always", AnalysisWarning)
        warnings.showwarning = show_warning
        try:
            runs = gather_runs(args, api)
            if args.command == "stages":  # stages measured differently still get their tokens and times compared
                stages_command(runs, args.out, args.loss, args.wandb[0] if args.wandb else None)
                return
            check_comparable(runs, args.allow_mixed)
            if args.command == "compare":
                compare_command(runs, args.out, args.family, args.stat, args.layer, args.tokens, args.loss)
            else:
                forecast_command(runs, args.target_loss, args.at_tokens, args.out)
        except AnalysisError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)


if __name__ == "__main__":
    main()
