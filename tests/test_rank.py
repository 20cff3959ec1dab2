"""Numerical rank checked against matrices of known rank and spectrum, numpy.linalg.matrix_rank and a real model."""

import math
import time

import numpy as np
import pandas as pd
import pytest
import torch

import analysis.rank
from analysis.rank import block_activations, numerical_rank, plot_rank_profiles, rank_table, singular_values
from benchmark.models.registry import build_model


def orthonormal_columns(rng, rows, columns):
    q, _ = np.linalg.qr(rng.standard_normal((rows, columns)))
    return q


def with_spectrum(rng, rows, columns, sigma):
    """An (rows, columns) matrix whose nonzero singular values are exactly ``sigma`` (up to rounding)."""
    k = len(sigma)
    return orthonormal_columns(rng, rows, k) @ np.diag(sigma) @ orthonormal_columns(rng, columns, k).T


@pytest.mark.parametrize("rows, columns, rank", [(60, 200, 5), (300, 40, 7), (120, 120, 30)])
def test_product_of_known_rank_has_that_rank_at_both_tolerances(rows, columns, rank):
    rng = np.random.default_rng(rank)
    matrix = rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, columns))
    matrix += 1e-16 * rng.standard_normal(matrix.shape)      # noise far below sigma_max * max(N, D) * eps
    result = numerical_rank(matrix)
    assert result["rank_numpy_tol"] == rank == np.linalg.matrix_rank(matrix)
    assert result["rank_rel_1e-3"] == rank
    assert (result["n_samples"], result["features"]) == (rows, columns)
    assert result["spectrum_from"] == "svd"                   # zero singular values cannot be read off a Gram


@pytest.mark.parametrize("rows, columns", [(80, 300), (300, 80)])
def test_full_rank_matrix_takes_the_gram_route_and_agrees_with_the_svd(rows, columns):
    rng = np.random.default_rng(rows)
    matrix = rng.standard_normal((rows, columns))
    sigma, route = singular_values(matrix)
    assert route == "gram"
    np.testing.assert_allclose(sigma, np.linalg.svd(matrix, compute_uv=False), rtol=1e-10)
    result = numerical_rank(matrix)
    assert result["rank_numpy_tol"] == np.linalg.matrix_rank(matrix) == min(rows, columns)
    assert result["sigma_max"] == pytest.approx(np.linalg.norm(matrix, 2), rel=1e-12)
    svd = np.linalg.svd(matrix, compute_uv=False)
    assert result["effective_rank"] == pytest.approx(np.exp(-np.sum(svd / svd.sum() * np.log(svd / svd.sum()))),
                                                     rel=1e-12)


@pytest.mark.parametrize("smallest", [1e-7, 1e-10, 1e-13, 1e-17])
def test_ill_conditioned_full_rank_matrix_matches_matrix_rank(smallest):
    """sigma_min below what a Gram matrix resolves: the rank must still be numpy's, whichever side of its
    tolerance (~6e-14 here) sigma_min falls."""
    rng = np.random.default_rng(7)
    matrix = with_spectrum(rng, 50, 250, np.geomspace(1.0, smallest, 50))
    assert numerical_rank(matrix)["rank_numpy_tol"] == np.linalg.matrix_rank(matrix)
    assert singular_values(matrix)[1] == "svd"


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("offset, expected", [(1 + 1e-11, 31), (1 - 1e-11, 30)])
def test_singular_value_next_to_the_relative_cutoff_is_counted_exactly(offset, expected, seed):
    """A singular value 1e-11 (relative) above or below 1e-3 * sigma_max: closer than the Gram route can tell, so the
    SVD decides."""
    rng = np.random.default_rng(seed)
    sigma = np.r_[np.linspace(1.0, 0.01, 30), 1e-3 * offset, np.full(9, 1e-4)]
    assert numerical_rank(with_spectrum(rng, 40, 90, sigma))["rank_rel_1e-3"] == expected


@pytest.mark.parametrize("size", [1, 4, 25])
def test_flat_spectrum_has_effective_rank_equal_to_its_size(size):
    rng = np.random.default_rng(size)
    matrix = 3.0 * orthonormal_columns(rng, 100, size)       # orthogonal columns, all singular values 3
    result = numerical_rank(matrix)
    assert result["effective_rank"] == pytest.approx(size, rel=1e-10)
    assert result["rank_numpy_tol"] == result["rank_rel_1e-3"] == size


def test_rank_one_matrix_has_effective_rank_one():
    rng = np.random.default_rng(0)
    matrix = np.outer(rng.standard_normal(70), rng.standard_normal(130))
    result = numerical_rank(matrix)
    assert result["effective_rank"] == pytest.approx(1.0, abs=1e-9)
    assert result["rank_numpy_tol"] == result["rank_rel_1e-3"] == 1


def test_effective_rank_of_a_two_value_spectrum_by_hand():
    """sigma = (3, 1): p = (3/4, 1/4), erank = exp(-(3/4 ln 3/4 + 1/4 ln 1/4)) = 4 / 3^(3/4)."""
    result = numerical_rank(with_spectrum(np.random.default_rng(1), 10, 12, [3.0, 1.0]))
    assert result["effective_rank"] == pytest.approx(4 / 3 ** 0.75, rel=1e-10)
    assert math.isclose(result["sigma_max"], 3.0, rel_tol=1e-12)


def test_zero_matrix_has_rank_zero():
    result = numerical_rank(np.zeros((5, 8)))
    assert (result["rank_numpy_tol"], result["rank_rel_1e-3"], result["effective_rank"]) == (0, 0, 0.0)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return build_model("small_cnn", 10, (1, 8, 8)).train()


def test_block_activations_are_the_blocks_outputs_in_eval_mode(tiny_model):
    x = torch.randn(37, 1, 8, 8)
    activations = block_activations(tiny_model, x, batch_size=16)        # three batches, the last one short
    assert tiny_model.training                                           # mode restored
    tiny_model.eval()
    hidden = x
    with torch.no_grad():
        for block, got in zip(tiny_model.blocks, activations, strict=True):
            hidden = block(hidden)
            torch.testing.assert_close(got, hidden.flatten(1))


def test_rank_table_has_one_row_per_block(tiny_model):
    x = torch.randn(64, 1, 8, 8)
    table = rank_table(tiny_model, x, n_samples=50, run_id="abc", regime="joint")
    assert list(table["block"]) == list(range(len(tiny_model.blocks)))
    assert (table["n_samples"] == 50).all() and (table["run_id"] == "abc").all()
    expected = [numerical_rank(a[:50].numpy())["effective_rank"] for a in block_activations(tiny_model, x)]
    np.testing.assert_allclose(table["effective_rank"], expected, rtol=1e-12)
    assert (table["rank_numpy_tol"] <= np.minimum(table["n_samples"], table["features"])).all()


def test_default_rank_table_of_a_cifar_resnet8_on_mnist_takes_seconds():
    """The cost the quick grid pays per model at the default N = 500, 28 px: ~0.4 s of CPU, on the Gram route
    (an SVD would take ~1.2 s more). Generous bound; the CPU is shared."""
    torch.manual_seed(0)
    model = build_model("cifar_resnet8", 10, (1, 28, 28))
    x = torch.randn(600, 1, 28, 28)
    started = time.perf_counter()
    table = rank_table(model, x)
    elapsed = time.perf_counter() - started
    assert (table["spectrum_from"] == "gram").all() and (table["n_samples"] == 500).all()
    assert elapsed < 20, f"rank_table took {elapsed:.1f} s"


def test_rank_figure_is_written(tmp_path):
    rows = [{"run_id": f"{regime}{seed}", "regime": regime, "dataset": "digits", "arch": arch, "seed": seed,
             "block": block, "n_samples": 100, "features": 64, "effective_rank": 10.0 + block + seed,
             "rank_rel_1e-3": 20, "rank_numpy_tol": 30}
            for regime in ("joint", "mixed") for seed in range(2) for arch in ("a", "b") for block in range(3)]
    plot_rank_profiles(pd.DataFrame(rows), tmp_path / "rank.png")
    assert (tmp_path / "rank.png").stat().st_size > 10_000


def test_rank_figure_shows_fifteen_regimes_relative_to_joint_split_by_schedule(monkeypatch):
    figures = []
    monkeypatch.setattr(analysis.rank, "save", lambda fig, path: (fig.canvas.draw(), figures.append(fig)))
    regimes = ["joint", "disjoint", "mixed", *(f"{s}+{o}" for o in ("sdn", "distill", "cet", "bdl", "ge", "l2w")
                                               for s in ("joint", "mixed"))]
    rows = [{"regime": regime, "dataset": "digits", "arch": arch, "seed": seed, "block": block, "n_samples": 100,
             "features": 64, "effective_rank": 10.0 * (block + 1) * (1 + 0.01 * i) + seed,
             "rank_rel_1e-3": 20, "rank_numpy_tol": 30}
            for i, regime in enumerate(regimes) for seed in range(2) for arch in ("a", "b", "c") for block in range(4)]
    plot_rank_profiles(pd.DataFrame(rows), "unused.png")
    fig = figures[0]
    axes = np.array(fig.axes).reshape(3, 3)                 # absolute; joint's objectives; disjoint / mixed
    assert {line.get_label() for line in axes[0, 0].lines} == {"joint", "disjoint", "mixed", "min(N, D)"}
    row_regimes = [{line.get_label() for line in ax.lines} - {"joint (= 1)"} for ax in axes[1:, 0]]
    assert row_regimes[0] == {r for r in regimes if r.startswith("joint+")}
    assert row_regimes[1] == {"disjoint", "mixed"} | {r for r in regimes if r.startswith("mixed+")}
    sdn = next(line for line in axes[1, 0].lines if line.get_label() == "joint+sdn")
    expected = [(10.0 * (b + 1) * 1.03 + 0.5) / (10.0 * (b + 1) + 0.5) for b in range(4)]   # seed means' ratio
    assert np.allclose(sdn.get_ydata(), expected)
    for row in axes:                                        # legends outside the panels, one per row
        legend = row[-1].get_legend()
        assert legend is not None
        assert not any(legend.get_window_extent().overlaps(ax.get_window_extent()) for ax in fig.axes)
    box = fig.get_tightbbox(fig.canvas.get_renderer())
    assert box.width * 150 <= 2400
