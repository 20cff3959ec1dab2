"""One look for every figure: a fixed colour per regime (the same in every plot and report), readable labels."""
from __future__ import annotations

import functools

SCHEDULE_ORDER = ("joint", "disjoint", "mixed")
OBJECTIVE_ORDER = ("uniform", "sdn", "distill", "cet", "bdl", "l2w", "ge")


@functools.cache
def _plotting():
    """(pyplot, seaborn), imported on first use: together ~0.5 s, which `bench run` and `bench list` (they import
    the analyses) should not pay. The backend is set before seaborn imports pyplot."""
    import matplotlib

    matplotlib.use("Agg")                     # figures are files; never open a window
    import matplotlib.pyplot as plt
    import seaborn as sns

    return plt, sns


def regime_order(regimes) -> list[str]:
    """Regimes sorted by objective then schedule, so related regimes sit together in legends and tables."""
    def key(name: str):
        schedule, _, objective = name.partition("+")
        objective = objective or "uniform"
        o = OBJECTIVE_ORDER.index(objective) if objective in OBJECTIVE_ORDER else len(OBJECTIVE_ORDER)
        s = SCHEDULE_ORDER.index(schedule) if schedule in SCHEDULE_ORDER else len(SCHEDULE_ORDER)
        return (o, name if o == len(OBJECTIVE_ORDER) else "", s, name)
    return sorted(set(regimes), key=key)


def regime_colour(regime: str) -> tuple[float, float, float]:
    """Hue by objective, shade by schedule (joint light, disjoint mid, mixed dark): stable across figures."""
    schedule, _, objective = regime.partition("+")
    objective = objective or "uniform"
    palettes = ["Blues", "Oranges", "Greens", "Reds", "Purples", "YlOrBr", "Greys"]
    o = OBJECTIVE_ORDER.index(objective) if objective in OBJECTIVE_ORDER else sum(map(ord, objective)) % len(palettes)
    shades = _plotting()[1].color_palette(palettes[o % len(palettes)], 7)
    s = SCHEDULE_ORDER.index(schedule) if schedule in SCHEDULE_ORDER else 1
    return tuple(shades[2 + 2 * s])


def regime_style(regime: str) -> dict:
    """Keyword arguments for plot(): colour, and a line style per schedule for print-friendly figures."""
    schedule = regime.partition("+")[0]
    dashes = {"joint": "-", "disjoint": ":", "mixed": "--"}
    return {"color": regime_colour(regime), "linestyle": dashes.get(schedule, "-.")}


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 4.5, height: float = 3.5, **kwargs):
    plt, sns = _plotting()
    sns.set_theme(style="whitegrid", context="paper", font_scale=1.1)
    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, **kwargs)


def cell_panels(cells: list, max_cols: int, width: float = 4.5, height: float = 3.5):
    """A figure with one panel per (dataset, arch) cell, wrapped after `max_cols`; spare panels hidden.
    Returns (fig, the axes in cell order)."""
    ncols = max(1, min(len(cells), max_cols))
    fig, axes = new_figure(ncols=ncols, nrows=-(-len(cells) // ncols), width=width, height=height,
                           layout="constrained")
    for ax in axes.flat[len(cells):]:
        ax.set_visible(False)
    return fig, list(axes.flat[:len(cells)])


def save(fig, path) -> None:
    """PNG at 150 dpi, tight, closed afterwards (figure loops must not leak memory)."""
    from pathlib import Path
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    _plotting()[0].close(fig)
