"""One look per pass (colour, marker, line style), the same in every plot of a report, so that a mode or backend
is recognised from plot to plot and a second pass never hides the first."""

from __future__ import annotations

STYLES = [dict(color="tab:blue", marker="o", ls="-"), dict(color="tab:orange", marker="x", ls="--"),
          dict(color="tab:green", marker="^", ls=":"), dict(color="tab:red", marker="s", ls="-."),
          dict(color="tab:purple", marker="+", ls=(0, (5, 1)))]
RECORDED = "black"


def style(index: int) -> dict:
    """The look of the pass at `index` (0: the baseline)."""
    return STYLES[index % len(STYLES)]
