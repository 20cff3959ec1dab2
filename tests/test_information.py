"""Information-flow estimators against cases with a known answer, and the tables on a real model."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.information import (
    binned_symbols, discrete_entropy, discrete_mutual_information, exit_bound_table, exit_information_lower_bound,
    gaussian_gram, information_table, label_entropy_text, label_gram, plane_blocks, plot_information_plane,
    renyi_entropy, renyi_mutual_information, silverman_sigma, stratified_indices,
)
import analysis.information
from benchmark.data import load_dataset
from benchmark.models import build_model


def gaussian_pair(rho: float, n: int = 500, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples of a standard bivariate Gaussian with correlation rho, as two (n, 1) float64 columns."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 1, generator=g, dtype=torch.float64)
    b = rho * a + math.sqrt(1 - rho ** 2) * torch.randn(n, 1, generator=g, dtype=torch.float64)
    return a, b


def gram(t: torch.Tensor) -> torch.Tensor:
    return gaussian_gram(t, silverman_sigma(t))


# ------------------------------------------------------------------------------------------- binning

def test_discrete_mi_of_a_variable_with_itself_is_its_entropy():
    uniform_over_4 = np.tile(np.arange(4), 250)
    assert discrete_entropy(uniform_over_4) == pytest.approx(2.0)
    assert discrete_mutual_information(uniform_over_4, uniform_over_4) == pytest.approx(2.0)


def test_discrete_mi_of_independent_variables_is_near_zero():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 4, 100_000), rng.integers(0, 4, 100_000)
    # plug-in bias is ~(4-1)(4-1) / (2 N ln 2) = 6.5e-5 bits
    assert 0 <= discrete_mutual_information(a, b) < 1e-3
    assert discrete_mutual_information(a, a % 2) == pytest.approx(1.0, abs=1e-3)  # a determines one fair bit


def test_binning_puts_equal_width_bins_over_the_range():
    # one feature over [0, 1] in 4 bins: 0.1 and 0.2 share bin 0, 0.3 is bin 1, 1.0 (the maximum) is the last bin
    t = torch.tensor([[0.0], [0.1], [0.2], [0.3], [0.99], [1.0]])
    symbols = binned_symbols(t, bins=4)
    assert symbols[0] == symbols[1] == symbols[2] and len(set(symbols[[0, 3, 4]])) == 3 and symbols[4] == symbols[5]
    assert discrete_entropy(binned_symbols(torch.zeros(10, 3), bins=4)) == 0.0   # a constant layer is one symbol


# ------------------------------------------------------------------------------ matrix-based Rényi

@pytest.mark.parametrize("alpha", [1.01, 1.0, 2.0])
def test_renyi_entropy_of_identical_and_of_well_separated_points(alpha):
    n = 64
    assert renyi_entropy(gram(torch.ones(n, 5)), alpha=alpha) == pytest.approx(0.0, abs=1e-9)
    separated = torch.arange(n, dtype=torch.float64)[:, None] * 10.0
    assert renyi_entropy(gaussian_gram(separated, sigma=0.1), alpha=alpha) == pytest.approx(math.log2(n))
    some_gram = gram(torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    assert renyi_entropy(3.0 * some_gram, alpha=alpha) == pytest.approx(renyi_entropy(some_gram, alpha=alpha))


def test_renyi_entropy_of_labels_is_the_entropy_of_the_class_frequencies():
    y = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])             # p = (1/2, 1/4, 1/4): 1.5 bits (Shannon)
    assert renyi_entropy(label_gram(y), alpha=1.0) == pytest.approx(1.5)
    assert renyi_entropy(label_gram(y), alpha=2.0) == pytest.approx(-math.log2(0.25 + 2 * 0.0625))


def test_renyi_mi_grows_with_gaussian_correlation_and_is_small_for_independent():
    rhos = [0.0, 0.3, 0.6, 0.9, 0.99]
    mi = [renyi_mutual_information(*map(gram, gaussian_pair(rho))) for rho in rhos]
    assert all(a < b for a, b in zip(mi, mi[1:])), dict(zip(rhos, mi))
    assert mi[0] < 0.3                              # true value 0; the N = 500 estimator bias is ~0.2 bits
    assert mi[-1] > 5 * mi[0]


def test_renyi_mi_is_symmetric_and_bounded_by_the_marginal_entropies():
    a, b = map(gram, gaussian_pair(0.6))
    assert renyi_mutual_information(a, b) == pytest.approx(renyi_mutual_information(b, a), abs=1e-12)
    assert 0 < renyi_mutual_information(a, b) <= min(renyi_entropy(a), renyi_entropy(b))


def test_silverman_width_follows_the_rule():
    t = torch.randn(400, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2.0
    expected = math.sqrt(t.var(dim=0).sum().item()) * 400 ** (-1 / 7)
    assert silverman_sigma(t) == pytest.approx(expected)
    assert silverman_sigma(t, scale=0.8) == pytest.approx(0.8 * expected)


# ------------------------------------------------------------------------------------- exit bound

def test_exit_bound_is_label_entropy_for_a_perfect_head_and_never_above_it():
    y = torch.arange(8).repeat(25)                                     # 8 balanced classes: H(Y) = 3 bits
    perfect = exit_information_lower_bound(100.0 * torch.nn.functional.one_hot(y, 8).double(), y)
    assert perfect["H_Y_bits"] == pytest.approx(3.0)
    assert perfect["CE_bits"] == pytest.approx(0.0, abs=1e-9)
    assert perfect["I_TY_lower_bound_bits"] == pytest.approx(3.0)
    uniform = exit_information_lower_bound(torch.zeros(200, 8), y)     # CE = log2 8: the bound is 0
    assert uniform["I_TY_lower_bound_bits"] == pytest.approx(0.0, abs=1e-9)
    noisy = exit_information_lower_bound(torch.randn(200, 8, generator=torch.Generator().manual_seed(0)), y)
    assert noisy["I_TY_lower_bound_bits"] < noisy["H_Y_bits"]


# ------------------------------------------------------------------------------------- model level

@pytest.fixture(scope="module")
def digits_model():
    data = load_dataset("digits", "/nonexistent")
    torch.manual_seed(0)
    return build_model("small_cnn", data.num_classes, data.input_shape), data.x_test, data.y_test


def test_stratified_subset_is_fixed_and_keeps_class_proportions(digits_model):
    _, _, y = digits_model
    first, again = stratified_indices(y, 100, seed=3), stratified_indices(y, 100, seed=3)
    assert np.array_equal(first, again) and len(np.unique(first)) == 100
    assert not np.array_equal(first, stratified_indices(y, 100, seed=4))
    counts = np.bincount(y.numpy()[first], minlength=10)
    assert counts.min() >= 9 and counts.max() <= 11                  # 10 balanced classes -> ~10 each
    assert np.array_equal(stratified_indices(y, None), np.arange(len(y)))


@pytest.mark.parametrize("estimator", ["renyi", "binning"])
def test_information_table_has_one_row_per_block(digits_model, estimator):
    model, x, y = digits_model
    model.train()
    table = information_table(model, x, y, estimator=estimator, n_samples=200)
    assert model.training                                            # the model's mode is left as it was
    assert list(table["block"]) == list(range(len(model.blocks)))
    assert (table["estimator"] == estimator).all() and (table["n_samples"] == 200).all()
    # data processing: no block can tell more about Y than there is to know (H(Y) = log2 10 for balanced labels)
    assert (table["I_TY_bits"] <= table["H_Y_bits"] + 1e-9).all() and (table["I_XT_bits"] >= 0).all()
    assert table["H_Y_bits"].iloc[0] == pytest.approx(math.log2(10), abs=0.01)
    if estimator == "binning":                                       # I(X;T) = H(T) for a deterministic network
        assert np.allclose(table["I_XT_bits"], table["H_T_bits"])


def test_exit_bound_table_has_one_row_per_exit_with_the_block_it_reads(digits_model):
    model, x, y = digits_model
    table = exit_bound_table(model, x, y, n_samples=200)
    assert list(table["exit"]) == list(range(model.num_exits))
    assert list(table["block"]) == [*model.exit_blocks, len(model.blocks) - 1]
    assert (table["I_TY_lower_bound_bits"] <= table["H_Y_bits"]).all()


def test_information_plane_figure_is_written(tmp_path):
    rows = [{"regime": regime, "block": block, "epoch": epoch, "estimator": "renyi", "H_Y_bits": 3.3,
             "I_XT_bits": 2 + block + 0.1 * epoch, "I_TY_bits": 1 + 0.2 * epoch}
            for regime in ("joint", "mixed") for block in range(3) for epoch in (2, 4, 6)]
    path = tmp_path / "plane.png"
    plot_information_plane(pd.DataFrame(rows), path)
    assert path.stat().st_size > 10_000
    with pytest.raises(ValueError, match="one estimator"):
        plot_information_plane(pd.DataFrame(rows).assign(estimator=["renyi", "binning"] * 9), tmp_path / "x.png")


CPU_REGIMES = ["joint", "disjoint", "mixed", *(f"{s}+{o}" for o in ("sdn", "distill", "cet", "bdl", "ge", "l2w")
                                               for s in ("joint", "mixed"))]


def plane_table(cells: dict, regimes=CPU_REGIMES, epochs=(0, 10, 20), seeds=(0, 1)) -> pd.DataFrame:
    """Snapshot-like rows: cells maps (dataset, arch) -> (blocks, H(Y) in bits)."""
    rows = [{"dataset": d, "arch": a, "regime": r, "seed": s, "block": b, "epoch": e, "estimator": "renyi",
             "H_Y_bits": h_y, "n_samples": 250, "I_XT_bits": 3.2 - 0.05 * b - 0.01 * e + 0.01 * i,
             "I_TY_bits": 1.8 + 0.02 * b + 0.02 * e + 0.005 * i + 0.001 * s}
            for (d, a), (blocks, h_y) in cells.items() for i, r in enumerate(regimes) for s in seeds
            for b in range(blocks) for e in epochs]
    return pd.DataFrame(rows)


def captured(monkeypatch, module):
    """Replace module.save by one that keeps the figure (and draws it) instead of writing it."""
    figures = []
    monkeypatch.setattr(module, "save", lambda fig, path: (fig.canvas.draw(), figures.append(fig)))
    return figures


def test_information_plane_titles_each_cell_with_its_own_label_entropy(monkeypatch):
    """The old title printed one H(Y) averaged over every cell (2.97 bits for 3.32- and 2.00-bit datasets)."""
    figures = captured(monkeypatch, analysis.information)
    table = plane_table({("digits", "small_cnn"): (9, math.log2(10)), ("fourclass", "small_cnn"): (9, 2.0)})
    plot_information_plane(table, "unused.png")
    texts = [t.get_text() for ax in figures[0].axes for t in (ax.yaxis.label, ax.title)]
    assert any("H(Y) = 3.32 bits" in t for t in texts) and any("H(Y) = 2.00 bits" in t for t in texts)
    assert not any("2.66" in t for t in texts) and "2.66" not in figures[0]._suptitle.get_text()
    assert label_entropy_text(table[table.dataset == "digits"]) == "H(Y) = 3.32 bits"
    assert label_entropy_text(table.assign(H_Y_bits=np.r_[[2.0], [3.0] * (len(table) - 1)])) == \
        "H(Y) = 2.00-3.00 bits"
    assert label_entropy_text(table.drop(columns="H_Y_bits")) == ""


def test_information_plane_of_fifteen_regimes_and_three_cells_is_legible(monkeypatch):
    """One row per cell, one column per schedule group, four blocks a panel: not 15 x 3 panels 8000 px wide."""
    figures = captured(monkeypatch, analysis.information)
    cells = {("digits", "cifar_resnet32"): (15, 3.32), ("digits", "small_cnn"): (9, 3.32),
             ("mnist5k", "small_cnn"): (9, 3.32)}
    plot_information_plane(plane_table(cells), "unused.png")
    fig = figures[0]
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.axison]
    assert len(panels) == 3 * 2
    box = fig.get_tightbbox(fig.canvas.get_renderer())
    assert box.width * 150 <= 2400 and box.height * 150 <= 2400, (box.width * 150, box.height * 150)
    legend = fig.legends[0]
    assert not any(legend.get_window_extent().overlaps(ax.get_window_extent()) for ax in panels)
    assert {t.get_text() for t in legend.get_texts()} >= set(CPU_REGIMES)
    labels = {t.get_text() for ax in panels[:2] for t in ax.texts}
    assert {"block 0", "block 14"} <= labels and "block 1" not in labels


def test_plane_blocks_are_evenly_spaced_with_the_first_and_the_last():
    assert plane_blocks(15) == [0, 5, 9, 14]
    assert plane_blocks(9) == [0, 3, 5, 8]
    assert plane_blocks(2) == [0, 1] and plane_blocks(1) == [0]
