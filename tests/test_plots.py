"""Curves as PNG files: a sweep's dev CER per job."""

import matplotlib.image
import numpy as np

from asr.run import plots


def test_the_sweep_plot_draws_one_line_per_job(tmp_path):
    """Every job's curve is on the figure: a plot of two jobs differs from the plot of one."""
    rows = [{"step": s, "val_cer": c} for s, c in ((10, 0.9), (20, 0.4), (30, 0.2))]
    plots.sweep_curves(tmp_path / "one.png", [{"name": "a", "evaluations": rows}])
    plots.sweep_curves(tmp_path / "two.png", [{"name": "a", "evaluations": rows},
                                              {"name": "b", "evaluations": [dict(r, val_cer=1 - r["val_cer"])
                                                                            for r in rows]}])
    one, two = (matplotlib.image.imread(tmp_path / f"{n}.png") for n in ("one", "two"))
    assert one.shape[:2] == two.shape[:2] == (500, 800)
    assert np.abs(one - two).sum() > 100  # the second line (and its legend entry)
    assert not list(tmp_path.glob(".*partial*"))  # written whole, then moved into place
