"""plots.py draws what it is given and returns what it drew: the figures of an evaluation hold the
spectra, fits and alphas of the report, run by run and point by point."""
import math
import re
import warnings

import numpy as np
import pytest
from matplotlib.colors import to_hex

import measure
import plots
import spectra

POINTS = ["embed", "L00.mlp_resid", "L01.mlp_resid", "L02.mlp_resid", "L03.mlp_resid", "final"]


def power_law(alpha, scale=1.0, n=64):
    values = scale * np.arange(1, n + 1, dtype=np.float64) ** -alpha
    return dict(values=values, n=4096, width=n, limit=n)


def test_the_figures_of_an_evaluation_show_its_spectra_fits_and_alphas(tmp_path):
    settings = spectra.SpectraSettings(head=(1, 10), tail=(10, 40))
    history, notes = spectra.SpectraHistory(settings), measure.Notes(say=lambda note: None)
    for k, tokens in enumerate((0, 100, 200)):
        measured = {p: power_law(0.5 + 0.1 * i + 0.05 * k) for i, p in enumerate(POINTS)}
        metrics = measure.report("act", measured, settings, str(tmp_path), k, tokens, 4, history, notes,
                                 figures=False, table=False)
        alphas = {p: (metrics[f"act/alpha_head/{p}"], metrics[f"act/alpha_tail/{p}"]) for p in POINTS}
        drawn = measure.draw_figures(str(tmp_path / "plots"), "act", tokens, measured, metrics, settings, 4, history)
    # spectra: embed, the first, middle and last block outputs, final; each with its fitted head and tail
    (panel,) = drawn["spectrum"].values()
    curves = [label for label in panel if " fit" not in label]
    assert [c.split("  ")[0] for c in curves] == ["embed", "L00.mlp_resid", "L02.mlp_resid", "L03.mlp_resid",
                                                  "final"]
    x, y = panel[curves[1]]
    np.testing.assert_array_equal(y, measured["L00.mlp_resid"]["values"])
    fit_x, fit_y = panel["L00.mlp_resid tail fit"]
    assert (fit_x[0], fit_x[-1]) == (10, 40) and fit_y[0] / fit_y[-1] == pytest.approx(4 ** alphas["L00.mlp_resid"][1])
    assert f"tail {alphas['L00.mlp_resid'][1]:.2f}" in curves[1]  # the alpha beside the curve it belongs to
    # alpha against layer: embed at -1, the block outputs at their layers, final at L
    head = drawn["alpha_layer"]["alpha_head"]
    assert head["embed"] == ([-1], [alphas["embed"][0]]) and head["final"] == ([4], [alphas["final"][0]])
    assert head["mlp_resid"] == ([0, 1, 2, 3], [alphas[p][0] for p in POINTS[1:5]])
    # alpha against tokens: every evaluation so far, from memory
    xs, ys = drawn["alpha_tokens"]["alpha_tail"]["L01.mlp_resid"]
    assert xs == [0, 100, 200] and ys[-1] == alphas["L01.mlp_resid"][1]
    assert ys == pytest.approx([spectra.fit_power_law(power_law(0.7 + 0.05 * k)["values"], (10, 40))["alpha"]
                                for k in range(3)])


def cliff(alpha=0.8, at=40, drop=1e-3, n=64):
    """A power law that falls by `drop` after rank `at`, like a weight spectrum at the rank cliff of
    its width: a window across the cliff is no power law."""
    values = np.arange(1, n + 1, dtype=np.float64) ** -alpha
    values[at:] *= drop
    return dict(values=values, n=4096, width=n, limit=n)


def hand_r2(values, lo, hi):
    """R^2 of the straight-line fit of log values on log rank over ranks lo..hi, by numpy."""
    x, y = np.log(np.arange(lo, hi + 1)), np.log(values[lo - 1:hi])
    return np.corrcoef(x, y)[0, 1] ** 2


def test_token_ticks_read_as_counts_with_a_unit():
    expected = {0: "0", 512: "512", 32_000: "32k", 32_768: "32.8k", 1_200_000: "1.2M", 999_999: "1M",
                2.5e9: "2.5B", 40_000: "40k"}
    assert {t: plots.token_label(t) for t in expected} == expected


def test_figures_against_tokens_label_their_ticks_with_units(tmp_path):
    tokens = [0, 400_000, 800_000, 1_200_000, 1_600_000]
    drawn = plots.alpha_by_tokens(str(tmp_path / "a.png"), {"alpha_tail": {"embed": (tokens, [1, 2, 3, 4, 5])}})
    labels = [text for _, text in drawn["alpha_tail"].xticklabels]
    assert labels and all(re.fullmatch(r"\d+(\.\d+)?[kMB]?", text) for text in labels), labels
    assert "1.2M" in labels or "1M" in labels
    assert all(text == plots.token_label(x) for x, text in drawn["alpha_tail"].xticklabels)


def test_an_all_zero_spectrum_is_not_drawn_but_named_and_said_once(tmp_path):
    settings = spectra.SpectraSettings(head=(1, 10), tail=(10, 40))
    said = []
    history, notes = spectra.SpectraHistory(settings), measure.Notes(say=said.append)
    zero = dict(values=np.zeros(64), n=4096, width=64, limit=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no matplotlib warning about empty axes or legends
        for k, tokens in enumerate((0, 100)):
            measured = {p: power_law(0.5 + 0.1 * i) for i, p in enumerate(POINTS)}
            measured["L00.mlp_resid"] = zero
            metrics = measure.report("act", measured, settings, str(tmp_path), k, tokens, 4, history, notes,
                                     figures=False, table=False)
            drawn = measure.draw_figures(str(tmp_path / "plots"), "act", tokens, measured, metrics, settings, 4,
                                         history, notes)
        (title, panel), = drawn["spectrum"].items()
        assert [label.split("  ")[0] for label in panel if " fit" not in label] == \
            ["embed", "L02.mlp_resid", "L03.mlp_resid", "final"]
        assert "(not drawn: L00.mlp_resid all-zero)" in panel.title.replace("\n", " ")
        assert panel.left_out == ["L00.mlp_resid all-zero"]
        # alpha against layer: L00 has no alpha, so the block outputs start at layer 1
        assert drawn["alpha_layer"]["alpha_tail"]["mlp_resid"][0] == [0, 1, 2, 3]
        assert math.isnan(drawn["alpha_layer"]["alpha_tail"]["mlp_resid"][1][0])
        assert "L00.mlp_resid no values" in drawn["alpha_tokens"]["alpha_tail"].title.replace("\n", " ")
        # every spectrum zero (the modded preset's projections at step 0): no figure at all
        blank = {p: zero for p in POINTS}
        metrics = measure.report("act", blank, settings, str(tmp_path / "blank"), 0, 0, 4, None, notes,
                                 figures=False, table=False)
        drawn = measure.draw_figures(str(tmp_path / "blank" / "plots"), "act", 0, blank, metrics, settings, 4,
                                     None, notes)
    assert drawn["spectrum"] == {} and drawn["spectrum"].path is None
    assert drawn["alpha_layer"] == {} and drawn["alpha_tokens"] == {}
    assert not (tmp_path / "blank" / "plots").exists()
    assert "L00.mlp_resid all-zero" in drawn["spectrum"].left_out[0]
    zero_notes = [note for note in said if "all-zero" in note]
    assert len(zero_notes) == 1 and "not drawn" in zero_notes[0]  # said once in three evaluations


def test_spectra_name_nan_spectra_and_draw_fits_in_their_curves_colour(tmp_path):
    settings_windows = (("head", (1, 10)), ("tail", (10, 40)))
    good = power_law(0.7)["values"]
    fits = [(name, spectra.fit_power_law(good, w)) for name, w in settings_windows]
    drawn = plots.spectra(str(tmp_path / "s.png"), {"p": [plots.Curve("good", good, fits),
                                                          plots.Curve("broken", np.full(64, np.nan))]}, "eigenvalue")
    panel = drawn["p"]
    assert panel.left_out == ["broken all-NaN"] and "not drawn: broken all-NaN" in panel.title.replace("\n", " ")
    (curve,) = [label for label in panel if " fit" not in label]
    for name in ("head", "tail"):
        fit = panel[f"good {name} fit"]
        assert fit.color == panel[curve].color and fit.linestyle == "-"  # a good fit: solid, the curve's colour
    assert panel.spans == [(1, 10, "head"), (10, 40, "tail")]  # the fit windows, shaded


def test_a_poor_fit_is_drawn_dashed_and_flagged_in_the_table(tmp_path):
    settings = spectra.SpectraSettings(head=(1, 10), tail=(10, 60))
    bent, straight = cliff(), power_law(0.6)
    # independent check of the premise: the tail window crosses the cliff, the head does not
    assert hand_r2(bent["values"], 10, 60) < spectra.LOW_R2 < hand_r2(bent["values"], 1, 10)
    assert hand_r2(straight["values"], 10, 60) > spectra.LOW_R2
    measured = {"L00.mlp_resid": straight, "L01.mlp_resid": bent}
    metrics, _ = spectra.summarise(measured, "act", settings)
    assert metrics["act/r2_tail/L01.mlp_resid"] == pytest.approx(hand_r2(bent["values"], 10, 60))
    table = spectra.format_table(metrics, "act", list(measured)).splitlines()
    assert "? R2 < 0.9: not a power law" in table[0]
    straight_row, bent_row = table[1], table[2]
    assert "?" not in straight_row
    assert f"{metrics['act/alpha_tail/L01.mlp_resid']:.3f}?" in bent_row
    assert f"{metrics['act/alpha_head/L01.mlp_resid']:.3f} " in bent_row  # the head is a power law
    assert len(table) == 3  # the legend is in the header, no line of its own
    # the figure: the poor fit dashed in its curve's colour, its alpha marked in the legend
    curves = [measure.spectrum_curve(p, s, settings) for p, s in measured.items()]
    drawn = plots.spectra(str(tmp_path / "s.png"), {"p": curves}, "eigenvalue")
    panel = drawn["p"]
    bent_label = next(label for label in panel if label.startswith("L01.mlp_resid  ("))
    assert f"tail {metrics['act/alpha_tail/L01.mlp_resid']:.2f}?" in bent_label
    assert f"head {metrics['act/alpha_head/L01.mlp_resid']:.2f}," in bent_label
    assert panel["L01.mlp_resid tail fit"].linestyle == "--" and panel["L01.mlp_resid head fit"].linestyle == "-"
    assert panel["L00.mlp_resid tail fit"].linestyle == "-"
    assert panel["L01.mlp_resid tail fit"].color == panel[bent_label].color != panel["L00.mlp_resid tail fit"].color
    assert "R^2 < 0.9" in panel.title
    assert panel[bent_label].legend == bent_label and panel["L01.mlp_resid tail fit"].legend is None


def test_layer_axes_have_integer_ticks_and_name_embed_and_final_only_where_measured(tmp_path):
    settings = spectra.SpectraSettings(head=(1, 10), tail=(10, 40))
    for points, named in ((POINTS, {-1: "embed", 4: "final"}), (POINTS[1:5], {})):
        measured = {p: power_law(0.5 + 0.1 * i) for i, p in enumerate(points)}
        metrics = measure.report("act", measured, settings, str(tmp_path), 0, 0, 4, None,
                                 measure.Notes(say=lambda note: None), figures=False, table=False)
        drawn = measure.draw_figures(str(tmp_path / "plots"), "act", 0, measured, metrics, settings, 4)
        ticks = dict(drawn["alpha_layer"]["alpha_head"].xticklabels)
        assert {x: text for x, text in ticks.items() if not text.isdigit()} == named
        assert all(text == str(int(x)) for x, text in ticks.items() if x not in named)
        assert {0, 1, 2, 3} <= set(ticks)


def test_runs_keep_one_colour_in_natural_order_and_train_loss_is_in_the_legend(tmp_path):
    shuffled = ["bs16", "bs32", "bs4", "bs8"]
    assert plots.run_order(shuffled) == ["bs4", "bs8", "bs16", "bs32"] != sorted(shuffled)
    colors = plots.run_colors(shuffled)
    assert colors == plots.run_colors(list(reversed(shuffled))) == {"bs4": "C0", "bs8": "C1", "bs16": "C2",
                                                                    "bs32": "C3"}
    runs = {name: ([(100, 5.0), (200, 4.0)], [(0, 6.0), (200, 4.5)]) for name in plots.run_order(shuffled)}
    drawn = plots.loss_by_tokens(str(tmp_path / "loss.png"), runs, 200, 4.5, colors)
    panel = drawn["loss against tokens"]
    assert list(panel) == [f"{n} ({kind})" for n in plots.run_order(shuffled) for kind in ("val", "train")]
    for name in shuffled:
        val, train = panel[f"{name} (val)"], panel[f"{name} (train)"]
        assert val.color == train.color == to_hex(colors[name])
        assert (val.linestyle, val.marker) == ("-", "o") and train.linestyle == "--"
        assert f"{name} val" in panel.legend and f"{name} train" in panel.legend
    assert "matched tokens 200" in panel.legend


def test_long_titles_are_wrapped_to_the_figure(tmp_path):
    title = "gpt2-medium (fine-tuned on wikitext-103): activation alpha_tail (block outputs), tail 10-100, seed 0"
    drawn = plots.alpha_by_layer(str(tmp_path / "c.png"), {title: {"pretrained": ([0, 1, 2], [0.6, 0.7, 0.8])}},
                                 "alpha", xlabel="layer")
    lines = drawn[title].title.split("\n")
    assert len(lines) > 1 and " ".join(lines) == title
    assert max(len(line) for line in lines) <= 4.6 * 72 / (0.6 * 9)  # the panel's width at 9 points
