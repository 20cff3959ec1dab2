"""The figure style: one colour and marker per objective, one line style per schedule, stable across calls; legends
never over data."""
import itertools
import tomllib

import numpy as np
import pytest

from analysis.style import (FALLBACK_COLOURS, OBJECTIVE_COLOURS, cell_panels, new_figure, place_legend,
                            regime_colour, regime_handles, regime_order, regime_style, save, schedule_groups,
                            split_regime)
from benchmark.grid import resolve_grid_path
from regimes.registry import objective_names, schedule_names


def cpu_regimes() -> list[str]:
    return tomllib.loads(resolve_grid_path("cpu").read_text())["regimes"]


def test_every_regime_of_the_cpu_grid_has_its_own_colour_and_line_style():
    regimes = cpu_regimes()
    assert len(regimes) == 15
    pairs = {regime: (regime_colour(regime), regime_style(regime)["linestyle"]) for regime in regimes}
    assert len(set(pairs.values())) == len(regimes), pairs
    # the same pair for the same regime on every call, whatever was asked before it
    again = {regime: (regime_colour(regime), regime_style(regime)["linestyle"]) for regime in reversed(regimes)}
    assert again == pairs
    assert all(regime_style(r) == regime_style(r) for r in regimes)


def test_colour_and_marker_encode_the_objective_and_line_style_the_schedule():
    for schedule, objective in itertools.product(schedule_names(), objective_names()):
        regime = schedule if objective == "uniform" else f"{schedule}+{objective}"
        assert split_regime(regime) == (schedule, objective)
        assert regime_colour(regime) == regime_colour(f"joint+{objective}")
        style = regime_style(regime)
        assert style["linestyle"] == regime_style(schedule)["linestyle"]
        assert style["marker"] == regime_style(f"joint+{objective}")["marker"]
    styles = {s: regime_style(s) for s in schedule_names()}
    assert len({s["linestyle"] for s in styles.values()}) == len(styles)
    assert (styles["joint"]["linestyle"], styles["disjoint"]["linestyle"], styles["mixed"]["linestyle"]) \
        == ("-", ":", "--")
    markers = {o: regime_style(f"joint+{o}")["marker"] for o in objective_names()}
    assert len(set(markers.values())) == len(markers)           # 13 objectives, 13 shapes: near hues still differ


def test_objective_colours_are_clearly_distinct():
    """Every registered objective has a listed colour (no fallback), and no two are near each other (RGB distance
    > 0.3; the nearest pair, bdl's purple and ge's pink, is at 0.32): the old palette had mixed+sdn and mixed+l2w
    the same brown, joint+sdn and joint+cet near-identical oranges, later pcgrad/cagrad two olives and nash/bdl two
    purples. Fallback hues differ from every listed one."""
    from matplotlib.colors import to_rgb

    assert set(objective_names()) <= set(OBJECTIVE_COLOURS)
    colours = {o: regime_colour(f"joint+{o}") for o in objective_names()}
    assert len(set(colours.values())) == len(colours) >= 7
    nearest = min(np.linalg.norm(np.subtract(a, b)) for a, b in itertools.combinations(colours.values(), 2))
    assert nearest > 0.3, nearest
    fallbacks = {to_rgb(c) for c in FALLBACK_COLOURS}
    assert len(fallbacks) == len(FALLBACK_COLOURS) and not fallbacks & set(colours.values())


def test_unknown_objectives_and_schedules_get_a_stable_fallback():
    from matplotlib.colors import to_rgb

    assert regime_colour("joint+newthing") in [to_rgb(c) for c in FALLBACK_COLOURS]
    assert regime_colour("joint+newthing") == regime_colour("mixed+newthing")
    style = regime_style("cyclic+sdn")
    assert (style["linestyle"], style["marker"]) == ("-.", regime_style("joint+sdn")["marker"])
    assert regime_style("joint+newthing")["marker"] == "8"
    assert style["color"] == regime_colour("joint+sdn")


def test_regime_order_and_schedule_groups():
    regimes = cpu_regimes()
    ordered = regime_order(regimes)
    assert ordered[:3] == ["joint", "disjoint", "mixed"] and ordered[3:5] == ["joint+sdn", "mixed+sdn"]
    groups = schedule_groups(regimes)
    assert [title for title, _ in groups] == ["joint schedule", "disjoint / mixed schedules"]
    assert sorted(sum((members for _, members in groups), [])) == sorted(regimes)
    assert all(len(members) <= 8 for _, members in groups)
    assert schedule_groups(["mixed", "mixed+sdn"]) == [("mixed schedule", ["mixed", "mixed+sdn"])]
    handles = regime_handles(ordered)
    assert [h.get_label() for h in handles] == ordered
    assert handles[1].get_linestyle() == ":" and handles[1].get_marker() == "o"          # disjoint: uniform's circle


def _overlaps(fig, legend) -> list:
    fig.canvas.draw()
    box = legend.get_window_extent()
    return [ax for ax in fig.axes if ax.get_visible() and ax.axison and box.overlaps(ax.get_window_extent())]


@pytest.mark.parametrize("cells, columns, in_slot", [(3, 2, True), (3, 3, False), (1, 1, False)])
def test_legends_take_an_empty_slot_or_sit_outside(tmp_path, cells, columns, in_slot):
    fig, axes = cell_panels(list(range(cells)), columns)
    regimes = cpu_regimes()
    for ax in axes:
        for i, regime in enumerate(regimes):
            ax.plot([0, 1], [i, i + 1], **regime_style(regime))
    legend = place_legend(fig, regime_handles(regimes), title="regime")
    assert (legend.axes is not None) == in_slot
    assert _overlaps(fig, legend) == []
    save(fig, tmp_path / "legend.png")


def test_a_legend_outside_a_figure_without_layout_engine_stays_clear_of_the_axes():
    fig, axes = new_figure(ncols=2)
    legend = place_legend(fig, regime_handles(cpu_regimes()))
    assert _overlaps(fig, legend) == []
