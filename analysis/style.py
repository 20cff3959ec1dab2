"""One look for every figure: a fixed style per regime (the same in every plot and report), readable labels.

A regime is ``schedule+objective`` (``joint`` alone is ``joint+uniform``). Its style encodes the two halves
separately, so that 15 or more regimes stay distinguishable:
- colour and marker = objective: a qualitative palette (matplotlib's tab10, then hand-picked hues) with one clearly
  distinct hue per known objective, and a marker of its own per objective, so two objectives whose hues are near
  each other still differ in shape; unknown objectives get one of the remaining hues, chosen by a stable hash of the
  name, and an octagon;
- line style = schedule: joint solid, disjoint dotted, mixed dashed; an unknown schedule dash-dot (bars: hatches).
``regime_colour`` and ``regime_style`` are the single source of that look; ``place_legend`` puts a legend in an
empty grid slot or outside the axes, never over data.
"""
from __future__ import annotations

import functools
import zlib

SCHEDULE_ORDER = ("joint", "disjoint", "mixed")
OBJECTIVE_ORDER = ("uniform", "sdn", "distill", "cet", "bdl", "l2w", "ge", "boosted", "ztw", "pcgrad", "cagrad", "nash",
                   "metagf")
BASELINE = "joint"

OBJECTIVE_COLOURS = {             # matplotlib tab10, in its own order: the most distinct hues first
    "uniform": "#1f77b4",         # blue
    "sdn": "#ff7f0e",             # orange
    "distill": "#2ca02c",         # green
    "cet": "#d62728",             # red
    "bdl": "#9467bd",             # purple
    "l2w": "#8c564b",             # brown
    "ge": "#e377c2",              # pink
    "boosted": "#00ced1",         # dark turquoise (beyond tab10: each > 0.3 in RGB from every other colour here)
    "ztw": "#ff00ff",             # magenta
    "pcgrad": "#bcbd22",          # olive
    "cagrad": "#000000",          # black
    "nash": "#00008b",            # navy
    "metagf": "#8b0000",          # dark red
}
OBJECTIVE_MARKERS = {"uniform": "o", "sdn": "v", "distill": "s", "cet": "P", "bdl": "D", "l2w": "X", "ge": "*",
                     "boosted": "h", "ztw": "p", "pcgrad": "<", "cagrad": ">", "nash": "^", "metagf": "d"}
FALLBACK_COLOURS = ("#a6761d", "#17becf", "#ffd92f")   # ochre, cyan, yellow: objectives not listed above
SCHEDULE_LINESTYLES = {"joint": "-", "disjoint": ":", "mixed": "--"}
SCHEDULE_HATCHES = {"joint": "", "disjoint": "....", "mixed": "////"}   # bars cannot show a line style
FALLBACK_LINESTYLE, FALLBACK_MARKER = "-.", "8"


@functools.cache
def _plotting():
    """(pyplot, seaborn), imported on first use: together ~0.5 s, which `bench run` and `bench list` (they import
    the analyses) should not pay. The backend is set before seaborn imports pyplot."""
    import matplotlib

    matplotlib.use("Agg")                     # figures are files; never open a window
    import matplotlib.pyplot as plt
    import seaborn as sns

    return plt, sns


def split_regime(regime: str) -> tuple[str, str]:
    """(schedule, objective) of a regime name; a bare schedule has the "uniform" objective."""
    schedule, _, objective = regime.partition("+")
    return schedule, objective or "uniform"


def regime_order(regimes) -> list[str]:
    """Regimes sorted by objective then schedule, so related regimes sit together in legends and tables."""
    def key(name: str):
        schedule, objective = split_regime(name)
        o = OBJECTIVE_ORDER.index(objective) if objective in OBJECTIVE_ORDER else len(OBJECTIVE_ORDER)
        s = SCHEDULE_ORDER.index(schedule) if schedule in SCHEDULE_ORDER else len(SCHEDULE_ORDER)
        return (o, name if o == len(OBJECTIVE_ORDER) else "", s, name)
    return sorted(set(regimes), key=key)


def objective_colour(objective: str) -> tuple[float, float, float]:
    """The objective's hue (RGB in [0, 1]); an unknown objective gets a fallback hue by a stable hash of its name
    (zlib.crc32, not Python's salted hash), so it too is the same in every figure and every process."""
    from matplotlib.colors import to_rgb

    if objective in OBJECTIVE_COLOURS:
        return to_rgb(OBJECTIVE_COLOURS[objective])
    return to_rgb(FALLBACK_COLOURS[zlib.crc32(objective.encode()) % len(FALLBACK_COLOURS)])


def regime_colour(regime: str) -> tuple[float, float, float]:
    """Colour by objective (the schedule is told by line style): stable across figures."""
    return objective_colour(split_regime(regime)[1])


def regime_style(regime: str) -> dict:
    """Keyword arguments for plot(): the objective's colour and marker, the schedule's line style."""
    schedule, objective = split_regime(regime)
    return {"color": regime_colour(regime), "linestyle": SCHEDULE_LINESTYLES.get(schedule, FALLBACK_LINESTYLE),
            "marker": OBJECTIVE_MARKERS.get(objective, FALLBACK_MARKER)}


def regime_bar_style(regime: str) -> dict:
    """Keyword arguments for bar(): the objective's colour, the schedule's hatch."""
    return {"color": regime_colour(regime), "hatch": SCHEDULE_HATCHES.get(split_regime(regime)[0], "xx"),
            "edgecolor": "white", "linewidth": 0}


def regime_handles(regimes, linewidth: float = 1.6, markersize: float = 5.0, **overrides) -> list:
    """Legend handles (Line2D) in every regime's style, labelled with its name, in the order given."""
    from matplotlib.lines import Line2D

    return [Line2D([], [], label=regime, linewidth=linewidth, markersize=markersize,
                   **{**regime_style(regime), **overrides}) for regime in regimes]


def schedule_groups(regimes) -> list[tuple[str, list[str]]]:
    """Regimes split into panels that each stay readable: those trained on the baseline's schedule (joint: only
    the objective varies) and all others (disjoint, mixed). Returns [(title, regimes in regime_order)], empty
    groups left out."""
    ordered = regime_order(regimes)
    base = split_regime(BASELINE)[0]
    same = [r for r in ordered if split_regime(r)[0] == base]
    other = [r for r in ordered if split_regime(r)[0] != base]
    schedules = sorted({split_regime(r)[0] for r in other},
                       key=lambda s: (SCHEDULE_ORDER.index(s) if s in SCHEDULE_ORDER else len(SCHEDULE_ORDER), s))
    groups = [(f"{base} schedule", same)] if same else []
    if other:
        groups.append((" / ".join(schedules) + (" schedules" if len(schedules) > 1 else " schedule"), other))
    return groups


def comparison_panels(regimes, per_panel: int = 3) -> list[list[str]]:
    """Small multiples: the regimes other than the baseline in groups of at most `per_panel`, each group drawn
    beside the baseline (so every panel compares a few regimes with joint, none is a tangle of fifteen). Groups
    follow `schedule_groups` (other schedules first, then the baseline's schedule) in regime_order; the baseline
    alone makes one group if it is the only regime."""
    ordered = regime_order(regimes)
    groups = [group for _, group in sorted(schedule_groups(r for r in ordered if r != BASELINE),
                                            key=lambda titled: titled[0].startswith(split_regime(BASELINE)[0]))]
    chunks = [group[i:i + per_panel] for group in groups for i in range(0, len(group), per_panel)]
    baseline = [BASELINE] if BASELINE in ordered else []
    return [baseline + chunk for chunk in chunks] or [baseline or ordered]


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 4.5, height: float = 3.5, **kwargs):
    plt, sns = _plotting()
    sns.set_theme(style="whitegrid", context="paper", font_scale=1.1)
    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, **kwargs)


def cell_panels(cells: list, max_cols: int, width: float = 4.5, height: float = 3.5):
    """A figure with one panel per (dataset, arch) cell, wrapped after `max_cols`; spare panels hidden (and used
    by ``place_legend`` for the legend). Returns (fig, the axes in cell order)."""
    ncols = max(1, min(len(cells), max_cols))
    fig, axes = new_figure(ncols=ncols, nrows=-(-len(cells) // ncols), width=width, height=height,
                           layout="constrained")
    for ax in axes.flat[len(cells):]:
        ax.set_visible(False)
    return fig, list(axes.flat[:len(cells)])


def place_legend(fig, handles, labels=None, title: str | None = None, ncol: int = 1, fontsize="small"):
    """A figure legend that never covers data: in the first empty (hidden) grid slot of ``fig`` if there is one,
    else outside the axes on the right, vertically centred (clear of a suptitle). Returns the legend."""
    labels = [h.get_label() for h in handles] if labels is None else labels
    spare = [ax for ax in fig.axes if not ax.get_visible()]
    if spare:
        slot = spare[0]
        slot.set_visible(True)
        slot.axis("off")
        return slot.legend(handles, labels, title=title, ncol=ncol, fontsize=fontsize, loc="center",
                           frameon=False, title_fontsize=fontsize)
    if fig.get_layout_engine() is not None and type(fig.get_layout_engine()).__name__ == "ConstrainedLayoutEngine":
        return fig.legend(handles, labels, title=title, ncol=ncol, fontsize=fontsize, loc="outside right center",
                          title_fontsize=fontsize)
    return fig.legend(handles, labels, title=title, ncol=ncol, fontsize=fontsize, loc="upper left",
                      bbox_to_anchor=(1.0, 0.95), title_fontsize=fontsize)


def save(fig, path) -> None:
    """PNG at 150 dpi, tight, closed afterwards (figure loops must not leak memory)."""
    from pathlib import Path
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    _plotting()[0].close(fig)


def task_kinds(datasets) -> frozenset[str]:
    """The task kinds of a table's `datasets` (`benchmark.data.table_task`)."""
    from benchmark.data import table_task
    return frozenset(map(table_task, set(datasets)))


def quality_word(datasets) -> str:
    """What the accuracy columns and axes over `datasets` hold: "accuracy", "mIoU" when every dataset is a
    segmentation task (exits.csv and runs.csv keep the accuracy names for mIoU), or both named."""
    return {frozenset({"segmentation"}): "mIoU", frozenset({"classification", "segmentation"}):
            "accuracy (mIoU on segmentation cells)"}.get(task_kinds(datasets), "accuracy")
