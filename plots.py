"""
Every figure of spectral-nanogpt, drawn from the arrays it is given: no file reads, no fits.

One engine, `draw`, lays out panels of line series and writes the PNG atomically; the named
figures below build its panels. Each returns what it drew, {panel title: {label: (x, y)}}, so a
test asserts what a figure shows, not only that a file exists. The (x, y) pairs also carry how
they were drawn (colour, line style, marker, legend text: DrawnSeries), the panels their title as
drawn, tick labels, shaded windows and what they left out (DrawnPanel), the figure its title and
file (DrawnFigure).

A series with no finite value is not drawn and is named in its panel's title; a panel with nothing
left is named in the figure's title; a figure with nothing left is not written, and returns an
empty DrawnFigure. A series keeps its colour in every panel of a figure (colours follow the order
labels first appear); runs take theirs from run_colors, the same in every figure of a command.
"""

import math
import os
import re
import textwrap
from dataclasses import dataclass, field

import numpy as np

from data.shards import atomic_write
from spectra import LOW_R2


@dataclass
class Series:
    label: str
    x: list
    y: list
    style: str = "o-"                # matplotlib format string
    color: object = None             # None: the label's colour in this figure
    yerr: list = None                # error bars
    names: list = None               # text beside each point
    lw: float = 1.2
    ms: float = 3
    alpha: float = 1.0
    in_legend: bool = True
    legend: str = None               # legend text when it differs from the label (the label keys the result)
    hollow: bool = False             # open markers (e.g. a forecast, not a measurement)


@dataclass
class Panel:
    title: str
    series: list
    xlabel: str = ""
    ylabel: str = ""
    loglog: bool = False
    logx: bool = False               # a log x axis only (e.g. learning rates on a multiplicative grid)
    hlines: list = field(default_factory=list)   # [(y, label)]
    vlines: list = field(default_factory=list)   # [(x, label)]
    spans: list = field(default_factory=list)    # [(x0, x1, label)]: shaded x ranges, e.g. fit windows
    legend: bool = True
    xticks: str = ""                 # "tokens": 32k, 1.2M; "layer": integer layers with `xnames`
    xnames: dict = field(default_factory=dict)   # {x: tick label} on a layer axis, e.g. {-1: "embed"}
    left_out: list = field(default_factory=list)  # ["<label> <why>"] the caller did not draw, named in the title
    notes: list = field(default_factory=list)    # lines added under the title


class DrawnSeries(tuple):
    """(x, y) of a drawn series, with how it was drawn: color (hex), linestyle ('-', '--', ':' or
    'None'), marker, legend (its legend text, None when not in the legend)."""

    def __new__(cls, x, y, color, linestyle, marker, legend):
        self = super().__new__(cls, (x, y))
        self.color, self.linestyle, self.marker, self.legend = color, linestyle, marker, legend
        return self


class DrawnPanel(dict):
    """{label: DrawnSeries} of one panel; title (as drawn: wrapped, with what was left out),
    left_out ['<label> <why>'], xticklabels [(x, text)] in view, spans [(x0, x1, label)], legend
    [entry texts]."""

    def __init__(self, title="", left_out=(), spans=()):
        super().__init__()
        self.title, self.left_out, self.spans = title, list(left_out), list(spans)
        self.xticklabels, self.legend = [], []


class DrawnFigure(dict):
    """{panel title: DrawnPanel}; title (as drawn), path (None when nothing was drawn and no file
    written), left_out (panels with nothing to draw, '<title> <why>')."""

    def __init__(self, title="", path=None, left_out=()):
        super().__init__()
        self.title, self.path, self.left_out = title, path, list(left_out)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    return plt


# ----------------------------------------------------------------------------------------------
# Axes and titles that stay readable


def token_label(x, pos=None):
    """A token count as a tick label: 0, 512, 32k, 32.8k, 1.2M, 2.5B (three significant digits;
    full counts such as 1200000 run together on a crowded axis)."""
    x = float(f"{x:.3g}")  # round first, so 999,999 reads 1M rather than 1e+03k
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def layer_ticks(xs, names):
    """Integer ticks over the layers drawn (at most about a dozen), plus the named positions
    (embed, final). A block tick right beside a named one is dropped: 'embed' and '0' a layer
    apart would print over each other on a deep model's axis."""
    layers = sorted({round(x) for x in xs if math.isfinite(x)} - set(names))
    ticks = set()
    if layers:
        step = max(1, math.ceil((layers[-1] - layers[0] + 1) / 12))
        span = max(layers + list(names)) - min(layers + list(names))
        gap = max(step, 0.06 * span) if names else 0
        ticks = {t for t in range(layers[0], layers[-1] + 1, step) if all(abs(t - n) >= gap for n in names)}
    return sorted(ticks | set(names))


def wrap(text, width_in, fontsize):
    """Title text broken into lines that fit width_in inches at fontsize points (about 0.6 em a
    character): a centred title wider than its axes is cut off on both sides of the figure."""
    chars = max(20, int(width_in * 72 / (0.6 * fontsize)))
    return "\n".join(textwrap.fill(line, chars) for line in text.split("\n"))


def with_left_out(title, left_out):
    """The title naming what was left out of the plot, e.g. 'act spectra (not drawn: L01.attn all-zero)'."""
    if not left_out:
        return title
    said = f"not drawn: {', '.join(left_out)}"
    return f"{title} ({said})" if title else said


def has_values(s):
    """Whether a series has a point to draw (a finite x with a finite y)."""
    return any(x is not None and y is not None and math.isfinite(x) and math.isfinite(y) for x, y in zip(s.x, s.y))


# ----------------------------------------------------------------------------------------------
# The engine


def draw(path, panels, title="", ncols=2, panel_size=(4.6, 3.6), sharey=False, legend_size=7):
    """Write the panels to `path` (PNG) and return what was drawn (a DrawnFigure). Series without a
    finite value are left out and named in their panel's title; panels without a series, in the
    figure's title; with nothing left no file is written."""
    from matplotlib.colors import to_hex
    from matplotlib.ticker import FixedLocator, FuncFormatter
    plt = pyplot()
    kept, empty = [], []
    for panel in panels:
        drawable = [s for s in panel.series if has_values(s)]
        left_out = panel.left_out + [f"{s.label} no values" for s in panel.series if not has_values(s)]
        if drawable:
            kept.append((panel, drawable, left_out))
        else:
            empty.append(f"{panel.title}: " + (", ".join(left_out) if left_out else "nothing to draw"))
    if not kept:
        return DrawnFigure(title, None, empty)
    ncols = max(1, min(ncols, len(kept)))
    nrows = math.ceil(len(kept) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_size[0] * ncols, panel_size[1] * nrows), squeeze=False,
                             sharey=sharey, layout="constrained")
    colors = {}
    drawn = DrawnFigure(with_left_out(title, empty), path, empty)
    for ax, (panel, drawable, left_out) in zip(axes.flat, kept):
        out = drawn[panel.title] = DrawnPanel(wrap("\n".join([with_left_out(panel.title, left_out)] + panel.notes),
                                                   panel_size[0], 9), left_out, panel.spans)
        for s in drawable:
            color = s.color if s.color is not None else colors.setdefault(s.label, f"C{len(colors) % 10}")
            x, y = list(s.x), [math.nan if v is None else v for v in s.y]
            label = (s.legend or s.label) if s.in_legend else None
            face = dict(mfc="none") if s.hollow else {}
            if s.style == "bar":  # bars side by side: the panel's bar series share each x, in order
                bars = [b for b in drawable if b.style == "bar"]
                xs = sorted(set(x))
                width = 0.8 * min((b - a for a, b in zip(xs, xs[1:])), default=1) / len(bars)
                shift = (bars.index(s) - (len(bars) - 1) / 2) * width  # side by side around each x
                patches = ax.bar([xi + shift for xi in x], y, width, color=color, label=label, alpha=s.alpha)
                out[s.label] = DrawnSeries(x, y, to_hex(patches.patches[0].get_facecolor()), "None", "bar", label)
                continue
            if s.yerr is not None:
                line = ax.errorbar(x, y, yerr=s.yerr, fmt=s.style, color=color, ms=s.ms, lw=s.lw, capsize=2,
                                   label=label, **face).lines[0]
            else:
                (line,) = ax.plot(x, y, s.style, color=color, ms=s.ms, lw=s.lw, alpha=s.alpha, label=label, **face)
            for name, xi, yi in zip(s.names or [], x, y):
                ax.annotate(name, (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points", color=color)
            out[s.label] = DrawnSeries(x, y, to_hex(line.get_color()), line.get_linestyle(), line.get_marker(), label)
        for x0, x1, label in panel.spans:  # a window: shaded, named at the top of the axes
            ax.axvspan(x0, x1, color="0.5", alpha=0.12, lw=0)
            middle = math.sqrt(x0 * x1) if panel.loglog and x0 > 0 else (x0 + x1) / 2
            ax.text(middle, 0.99, label, transform=ax.get_xaxis_transform(), ha="center", va="top", fontsize=7,
                    color="0.35")
        for y, label in panel.hlines:
            ax.axhline(y, color="k", ls=":", lw=1, label=label)
        for x, label in panel.vlines:
            ax.axvline(x, color="k", ls="--", lw=1, label=label)
        if panel.loglog or panel.logx:
            ax.set_xscale("log")
        if panel.loglog:
            ax.set_yscale("log")
        if panel.xticks == "tokens":
            ax.xaxis.set_major_formatter(FuncFormatter(token_label))
        elif panel.xticks == "layer":
            names = dict(panel.xnames)
            ax.xaxis.set_major_locator(FixedLocator(layer_ticks([x for s in drawable for x in s.x], names)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, pos, names=names: names.get(round(x), f"{x:.0f}")))
            ax.tick_params(axis="x", labelsize=8)
        ax.set_title(out.title, fontsize=9)
        ax.set(xlabel=panel.xlabel, ylabel=panel.ylabel)
        handles = ax.get_legend_handles_labels()[0]
        if panel.legend and handles:  # an empty legend is a matplotlib warning
            ax.legend(fontsize=legend_size, ncol=2 if len(handles) > 8 else 1)
    for ax in list(axes.flat)[len(kept):]:
        ax.axis("off")
    if drawn.title:
        drawn.title = wrap(drawn.title, panel_size[0] * ncols, 10)
        fig.suptitle(drawn.title, fontsize=10)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90))
    for ax, (panel, _, _) in zip(axes.flat, kept):  # the tick labels the saved figure shows
        lo, hi = sorted(ax.get_xlim())
        locs = [float(t) for t in ax.xaxis.get_majorticklocs() if lo <= t <= hi]
        drawn[panel.title].xticklabels = list(zip(locs, ax.xaxis.get_major_formatter().format_ticks(locs)))
        legend = ax.get_legend()
        drawn[panel.title].legend = [t.get_text() for t in legend.get_texts()] if legend else []
    plt.close(fig)
    return drawn


# ----------------------------------------------------------------------------------------------
# Runs: ordered by their numbers, one colour each


def natural_key(name):
    """Sort key that orders the numbers inside names by value: bs4, bs8, bs16, bs32 (text order
    puts bs16 before bs4)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)], name


def run_order(names):
    return sorted(names, key=natural_key)


def run_colors(names):
    """{run name: colour} from each run's place in the natural order of all the runs of a command,
    so the same runs get the same colours in every figure of `compare` and of `forecast`; more than
    ten runs take colours along a colormap."""
    ordered = run_order(set(names))
    if len(ordered) <= 10:
        return {name: f"C{k}" for k, name in enumerate(ordered)}
    from matplotlib.colors import to_hex
    cmap = pyplot().get_cmap("viridis")
    return {name: to_hex(cmap(k / (len(ordered) - 1))) for k, name in enumerate(ordered)}


# ----------------------------------------------------------------------------------------------
# Spectra: values against rank on log-log axes, with fitted power laws


@dataclass
class Curve:
    label: str
    values: np.ndarray               # a spectrum, descending; its meaningful part is ranks 1..rank
    fits: list = field(default_factory=list)  # [(name, fit)]: fit as spectra.fit_power_law returns it
    color: object = None
    rank: int = None                 # meaningful ranks (spectra.numerical_rank); None: every value


def not_drawable(values, rank=None):
    """Why a spectrum has nothing to draw on log axes ('' when it has): all-NaN, non-finite,
    all-zero (zero-initialised weights before their first update), or fewer than two valid ranks."""
    v = np.asarray(values, dtype=np.float64)
    if v.size and np.isnan(v).all():
        return "all-NaN"
    if not np.isfinite(v).all():
        return "non-finite"
    if not v.any():
        return "all-zero"
    if (len(v) if rank is None else rank) < 2:
        return "rank < 2"
    return ""


def poor_fit(fit):
    """A fit whose R^2 is below spectra.LOW_R2: a slope, not a power law's exponent."""
    return fit["r2"] < LOW_R2


def spectrum_series(curve, color):
    """The curve's own series (its alphas in its legend entry, '?' where the fit is poor), then one
    for each fitted line over the ranks it was fitted on, in the curve's colour: a wide translucent
    band where the fit is good, a thin dashed line where it is poor."""
    fits = [(name, fit) for name, fit in curve.fits if math.isfinite(fit["alpha"])]
    alphas = ", ".join(f"{name} {fit['alpha']:.2f}{'?' if poor_fit(fit) else ''}" for name, fit in fits)
    values = np.asarray(curve.values)[:curve.rank]
    out = [Series(f"{curve.label}  ({alphas})" if alphas else curve.label, np.arange(1, len(values) + 1), values,
                  style="-", ms=0, color=color)]
    for name, fit in fits:
        i = np.arange(fit["lo"], fit["hi"] + 1)
        poor = poor_fit(fit)
        out.append(Series(f"{curve.label} {name} fit", i, np.exp(fit["intercept"]) * i ** -fit["alpha"],
                          style="--" if poor else "-", color=color, ms=0, lw=1.2 if poor else 4,
                          alpha=1.0 if poor else 0.3, in_legend=False))
    return out


def fit_windows(curves):
    """[(lo, hi, name)] of the fit windows of the curves, each name once over its widest ranks."""
    windows = {}
    for c in curves:
        for name, fit in c.fits:
            if math.isfinite(fit["alpha"]):
                lo, hi = windows.get(name, (fit["lo"], fit["hi"]))
                windows[name] = (min(lo, fit["lo"]), max(hi, fit["hi"]))
    return [(lo, hi, name) for name, (lo, hi) in windows.items()]


def spectra_panel(title, curves, ylabel, colors):
    """One panel of spectra; a curve that cannot be drawn is named in the title, not drawn."""
    drawable = [c for c in curves if not not_drawable(c.values, c.rank)]
    left_out = [f"{c.label} {not_drawable(c.values, c.rank)}" for c in curves if not_drawable(c.values, c.rank)]
    for c in drawable:
        colors.setdefault(c.label, c.color if c.color is not None else f"C{len(colors) % 10}")
    notes = [f"? and dashed: R^2 < {LOW_R2:g}, not a power law"] if any(
        poor_fit(f) for c in drawable for _, f in c.fits if math.isfinite(f["alpha"])) else []
    return Panel(title, [s for c in drawable for s in spectrum_series(c, colors[c.label])], "rank i", ylabel,
                 loglog=True, spans=fit_windows(drawable), left_out=left_out, notes=notes)


def spectra(path, panels, ylabel, title="", ncols=2):
    """Spectra against rank: {panel title: [Curve]}. All-zero, non-finite and rank < 2 spectra are
    named in their panel's title, not drawn; with none left, no file is written (an empty
    DrawnFigure whose left_out says why)."""
    colors = {}
    built = [spectra_panel(t, curves, ylabel, colors) for t, curves in panels.items()]
    return draw(path, built, title, ncols=ncols, panel_size=(5.2, 4.2))


# ----------------------------------------------------------------------------------------------
# Alphas against layer and against tokens, loss against tokens


def alpha_by_layer(path, panels, ylabel, title="", xlabel="layer", sharey=False, xnames=None, colors=None):
    """{panel title: {label: (layers, values) or (layers, values, errors)}}: one line per label, on
    integer layer ticks; `xnames` names positions such as {-1: 'embed', 12: 'final'} (only those the
    data has); `colors` {label: colour} fixes colours (runs)."""
    colors = colors or {}
    return draw(path, [Panel(t, [Series(label, *xy[:2], yerr=xy[2] if len(xy) > 2 else None, color=colors.get(label))
                                 for label, xy in lines.items()], xlabel, ylabel, xticks="layer",
                             xnames=xnames or {})
                       for t, lines in panels.items()], title, sharey=sharey)


def alpha_by_tokens(path, panels, ylabel="", title="", ncols=2, colors=None):
    """{panel title: {label: (tokens, values)}}; `colors` {label: colour} fixes colours (runs), else
    many labels are coloured along a colormap."""
    labels = list(dict.fromkeys(label for lines in panels.values() for label in lines))
    if colors is None and len(labels) > 10:
        cmap = pyplot().get_cmap("viridis")
        colors = {label: cmap(k / (len(labels) - 1)) for k, label in enumerate(labels)}
    colors = colors or {}
    return draw(path, [Panel(t, [Series(label, *xy, style=".-", color=colors.get(label))
                                 for label, xy in lines.items()], "tokens", ylabel, xticks="tokens")
                       for t, lines in panels.items()],
                title, ncols=ncols, panel_size=(4.6, 3.6) if ncols <= 2 else (3.2, 2.6),
                legend_size=6 if len(labels) > 6 else 7)


def loss_by_tokens(path, runs, tokens, loss, colors=None):
    """{run: (train [(tokens, loss)], val [(tokens, loss)])}: val solid with markers, train thin and
    dashed in the same colour, both in the legend; the matched tokens and loss as lines."""
    colors = colors or run_colors(list(runs))
    series = []
    for name, (train, val) in runs.items():
        if val:
            series.append(Series(f"{name} (val)", *zip(*val), style="o-", color=colors[name], legend=f"{name} val"))
        if train:
            series.append(Series(f"{name} (train)", *zip(*train), style="--", lw=0.8, ms=0, alpha=0.7,
                                 color=colors[name], legend=f"{name} train"))
    panel = Panel("loss against tokens", series, "tokens", "loss (val: solid with markers, train: dashed)",
                  hlines=[(loss, f"matched loss {loss:.4g}")],
                  vlines=[(tokens, f"matched tokens {token_label(tokens)}")], xticks="tokens")
    return draw(path, [panel], ncols=1, panel_size=(6.4, 4.4))


def forecast(path, reached, line, pending, xlabel, title, colors=None):
    """Predictor against token ratio, a series per run in its colour: `reached` = (names, x, y) of
    runs at the target (filled markers), `line` = (slope, intercept) of the least-squares line or
    None, `pending` = (names, x, forecasts, error) of runs not there yet, drawn hollow with the
    leave-one-out error as a bar."""
    names, xs, ys = reached
    pending_names, pending_x, forecasts, error = pending
    colors = colors or run_colors(list(names) + list(pending_names))
    series = []
    if line is not None and xs:
        grid = np.linspace(min(list(xs) + list(pending_x)), max(list(xs) + list(pending_x)), 50)
        series.append(Series("least-squares line", grid, line[0] * grid + line[1], style="--", color="k", ms=0, lw=1))
    for name, x, y in zip(names, xs, ys):
        series.append(Series(name, [x], [y], style="o", ms=6, color=colors[name], names=[name]))
    for name, x, y in zip(pending_names, pending_x, forecasts):
        series.append(Series(f"{name} (forecast)", [x], [y], style="o", ms=6, color=colors[name], yerr=[error],
                             hollow=True, names=[f"{name} (forecast)"],
                             legend=f"{name} forecast +- leave-one-out error"))
    return draw(path, [Panel(title, series, xlabel, "token ratio (1 = family best)")], ncols=1, panel_size=(6.4, 4.6))


def feature_probes(path, records, point, title=""):
    """The toy task's feature probes of one run from its evaluation records (metrics.jsonl lines
    with probe/ keys): the Fourier peak and the activation alphas of `point` against tokens, and
    the causal drops (key mode against a random subspace) at each evaluation as bars."""
    rows = [r for r in records if f"probe/fourier_peak/{point}" in r]
    tokens = [r["tokens"] for r in rows]
    alpha = [r for r in records if f"act/alpha_tail/{point}" in r]
    panels = [
        Panel(f"Fourier features ({point})",
              [Series(stat, tokens, [r[f"probe/{stat}/{point}"] for r in rows])
               for stat in ("fourier_peak", "fourier_gini")], "tokens", "share / concentration", xticks="tokens"),
        Panel(f"activation alpha ({point})",
              [Series(f"alpha_{w}", [r["tokens"] for r in alpha], [r[f"act/alpha_{w}/{point}"] for r in alpha])
               for w in ("head", "tail")], "tokens", "alpha", xticks="tokens"),
        Panel("causal drop from the final state: band loss increase", [
            Series("key-frequency subspace", tokens, [r["probe/drop_key/final"] for r in rows], style="bar"),
            Series("random subspace (same dim.)", tokens, [r["probe/drop_random/final"] for r in rows], style="bar")],
              "tokens", "loss increase (nats)", xticks="tokens"),
    ]
    return draw(path, panels, title, ncols=3)
