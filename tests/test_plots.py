"""plots.py draws what it is given and returns what it drew: the figures of an evaluation hold the
spectra, fits and alphas of the report, run by run and point by point."""
import numpy as np
import pytest

import measure
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
