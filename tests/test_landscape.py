"""Loss-landscape slices and interpolation checked against direct evaluation, an analytic quadratic and hand
computations."""

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from analysis import landscape
from analysis.landscape import (
    displaced, interpolate, plot_contour_2d, plot_interpolation, plot_slices_1d, random_direction, sharpness,
    slice_1d, slice_2d, sweep,
)
from benchmark import analyze
from benchmark.data import load_dataset
from benchmark.models import build_model
from benchmark.snapshots import analysis_subset
from benchmark.spec import RunSpec
from benchmark.store import ResultsStore

SHAPE = (1, 8, 8)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: one thread avoids OpenMP synchronisation, which costs 10x on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def trained_like(seed: int, arch: str = "cifar_resnet8"):
    """A model whose BatchNorm running statistics are far from the statistics of the test batch, so that a
    slice evaluated in train mode (batch statistics) would give a different loss than in eval mode."""
    torch.manual_seed(seed)
    model = build_model(arch, 10, SHAPE)
    with torch.no_grad():
        for _ in range(3):
            model(3.0 * torch.randn(64, *SHAPE) + 1.0)       # train-mode forwards move the running stats
    return model


@pytest.fixture(scope="module")
def data():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(48, *SHAPE, generator=generator), torch.randint(0, 10, (48,), generator=generator)


def direct_metrics(model, x, y):
    """Per-exit (mean CE, accuracy) by an ordinary eval-mode forward."""
    model.eval()
    with torch.no_grad():
        out = [(F.cross_entropy(z, y).item(), (z.argmax(1) == y).sum().item() / len(y)) for z in model(x)]
    model.train()
    return out


def test_centre_of_slices_is_the_models_own_loss_in_eval_mode(data):
    x, y = data
    model = trained_like(0)
    expected = direct_metrics(model, x, y)
    generator = torch.Generator().manual_seed(1)
    d1, d2 = random_direction(model, generator), random_direction(model, generator)
    one = slice_1d(model, x, y, d1, alphas=[-0.5, 0.0, 0.5], batch_size=20)   # 20: the batch loop is exercised
    two = slice_2d(model, x, y, d1, d2, alphas=[-0.5, 0.0], betas=[0.0, 0.5])
    assert model.training                                                      # its mode is given back
    for table in (one[one.alpha == 0], two[(two.alpha == 0) & (two.beta == 0)]):
        assert list(table.exit) == list(range(model.num_exits))
        np.testing.assert_allclose(table.loss, [loss for loss, _ in expected], rtol=1e-5)
        np.testing.assert_allclose(table.accuracy, [acc for _, acc in expected], rtol=0, atol=1e-12)
    assert not np.allclose(one[one.alpha == 0.5].loss, one[one.alpha == 0].loss)   # the direction does move θ


def test_sweep_on_a_quadratic_matches_the_analytic_slice():
    """L(θ) = ½(θ−θ*)ᵀH(θ−θ*): along θ + αd₁ + βd₂ it is ½vᵀHv + (θ−θ*)ᵀHv + L(θ) with v = αd₁ + βd₂."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    hessian = torch.tensor(a @ a.T + np.eye(6))
    theta, optimum, d1, d2 = (torch.tensor(rng.normal(size=6)) for _ in range(4))

    def loss(t):
        return float(0.5 * (t - optimum) @ hessian @ (t - optimum))

    grid = [(a_, b_) for a_ in np.linspace(-1, 1, 5) for b_ in (-0.7, 0.0, 0.3)]
    table = sweep(lambda tensors: [(loss(tensors["theta"]), np.nan)],
                  displaced({"theta": theta}, [{"theta": d1}, {"theta": d2}]), grid, ["alpha", "beta"])
    for row in table.itertuples():
        v = row.alpha * d1 + row.beta * d2
        analytic = float(0.5 * v @ hessian @ v + (theta - optimum) @ hessian @ v) + loss(theta)
        assert row.loss == pytest.approx(analytic, rel=1e-12, abs=1e-12)
    assert len(table) == len(grid) and set(table.exit) == {0}


def test_directions_are_filter_normalised_and_skip_biases_and_batchnorm():
    model = trained_like(0)
    direction = random_direction(model, torch.Generator().manual_seed(0))
    assert list(direction) == [name for name, _ in model.named_parameters()]      # parameters only, no buffers
    normalised = 0
    for name, weight in model.named_parameters():
        d = direction[name]
        assert d.shape == weight.shape
        if weight.dim() <= 1:                                                    # biases, BN weight and bias
            assert torch.count_nonzero(d) == 0, name
            continue
        normalised += 1
        np.testing.assert_allclose(d.flatten(1).norm(dim=1), weight.detach().flatten(1).norm(dim=1), rtol=1e-5)
        assert not torch.allclose(d, weight)
    assert normalised >= 5                                   # convolutions and linear layers were all covered


def test_directions_are_deterministic_for_a_seed():
    model = trained_like(0)
    first, again, other = (random_direction(model, torch.Generator().manual_seed(s)) for s in (3, 3, 4))
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not all(torch.equal(first[n], other[n]) for n in first if first[n].dim() > 1)


def test_interpolation_reproduces_both_endpoints(data):
    x, y = data
    model_a, model_b, carrier = trained_like(0), trained_like(1), trained_like(2)
    table = interpolate(carrier, model_a.state_dict(), model_b.state_dict(), x, y, ts=[0.0, 0.5, 1.0])
    for t, endpoint in ((0.0, model_a), (1.0, model_b)):
        expected = direct_metrics(endpoint, x, y)
        rows = table[table.t == t]
        np.testing.assert_allclose(rows.loss, [loss for loss, _ in expected], rtol=1e-4)
        np.testing.assert_allclose(rows.accuracy, [acc for _, acc in expected], atol=1e-12)
    assert not np.allclose(table[table.t == 0.5].loss, table[table.t == 0].loss)


def test_extrapolated_running_variance_is_clamped_at_zero(data):
    """At t = 1.25, var_a + t(var_b − var_a) < 0 where var_b < var_a / 5: the point is evaluated as a network
    whose running variances are clamped at 0, which we build by hand."""
    x, y = data
    model_a, model_b = trained_like(0), trained_like(1)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    variances = [k for k in state_a if k.endswith("running_var")]
    for k in variances:
        state_b[k] = state_a[k] / 10
    by_hand = {k: (v + 1.25 * (state_b[k] - v) if v.is_floating_point() else v) for k, v in state_a.items()}
    assert all((by_hand[k] < 0).all() for k in variances)
    reference = trained_like(2)
    reference.load_state_dict({k: v.clamp(min=0) if k in variances else v for k, v in by_hand.items()})
    table = interpolate(trained_like(3), state_a, state_b, x, y, ts=[1.25])
    assert np.isfinite(table.loss).all()
    np.testing.assert_allclose(table.loss, [loss for loss, _ in direct_metrics(reference, x, y)], rtol=1e-5)


def test_interpolation_rejects_states_of_another_architecture(data):
    x, y = data
    other = build_model("small_cnn", 10, SHAPE).state_dict()
    with pytest.raises(ValueError, match="state_b does not match"):
        interpolate(trained_like(0), trained_like(1).state_dict(), other, x, y)


def test_model_is_bitwise_unchanged_by_every_analysis(data):
    x, y = data
    model, model_b = trained_like(0), trained_like(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    d1, d2 = random_direction(model, generator), random_direction(model, generator)
    sharpness(slice_1d(model, x, y, d1, alphas=[-0.1, 0.0, 0.1]))
    slice_2d(model, x, y, d1, d2, alphas=[0.0, 1.0], betas=[0.0, 1.0])
    interpolate(model, model_b.state_dict(), model.state_dict(), x, y, ts=[-0.25, 0.5, 1.25])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


def test_sharpness_is_keskars_ratio_within_the_radius():
    alphas = [-0.2, -0.1, 0.0, 0.1, 0.2]
    table = pd.concat([
        pd.DataFrame({"alpha": alphas, "exit": 0, "loss": [3.0, 1.5, 1.0, 2.0, 5.0], "accuracy": 0.5,
                      "direction": 0, "run_id": "r"}),
        pd.DataFrame({"alpha": alphas, "exit": 0, "loss": [2.0, 2.5, 1.0, 1.2, 1.1], "accuracy": 0.5,
                      "direction": 1, "run_id": "r"}),
        pd.DataFrame({"alpha": alphas, "exit": 1, "loss": [0.5, 0.3, 0.2, 0.2, 0.2], "accuracy": 0.9,
                      "direction": 0, "run_id": None}),                  # a missing key must not drop rows
    ])
    result = sharpness(table, radius=0.1).set_index("exit")
    assert result.loc[0, "sharpness"] == pytest.approx((2.5 - 1.0) / 2.0)   # max over both directions
    assert result.loc[1, "sharpness"] == pytest.approx((0.3 - 0.2) / 1.2)
    assert result.loc[0, "run_id"] == "r" and set(result.radius) == {0.1}
    assert sharpness(table, radius=0.2).set_index("exit").loc[0, "sharpness"] == pytest.approx(4.0 / 2.0)
    with pytest.raises(ValueError, match="α = 0"):
        sharpness(table[table.alpha != 0])


def test_bench_analyze_slices_on_the_stratified_analysis_subset(monkeypatch, tmp_path):
    """The landscape of a run is measured on `analysis_subset` at size landscape_samples: stratified (each class
    within one sample of its share of the training split), without repeats, and the same for every call."""
    digits = load_dataset("digits", "/nonexistent")
    spec = RunSpec(dataset="digits", arch="small_cnn", regime="joint", seed=1, train={}, model={})
    settings = {**analyze.ANALYSIS_DEFAULTS, "landscape_samples": 100, "landscape_points_1d": 3,
                "landscape_2d_seeds": []}
    measured = []

    def recording_slice_1d(model, x, y, *args, **kwargs):
        measured.append((x.clone(), y.clone()))
        return slice_1d(model, x, y, *args, **kwargs)

    monkeypatch.setattr(landscape, "slice_1d", recording_slice_1d)
    monkeypatch.setattr(analyze, "p1_state", lambda spec, store: None)      # joint: no P1 backbone to start from
    model = build_model("small_cnn", digits.num_classes, digits.input_shape)
    for _ in range(2):
        analyze.run_landscape(spec, ResultsStore(tmp_path), model, digits, settings)
    (x, y), (x_again, y_again) = measured
    assert torch.equal(x, x_again) and torch.equal(y, y_again)
    share = torch.bincount(digits.y_train).double() / len(digits.y_train)
    counts = torch.bincount(y, minlength=len(share))
    assert len(y) == 100 and ((counts - 100 * share).abs() < 1).all()
    x_subset, y_subset = analysis_subset(digits, 100)          # the rule of every model analysis
    assert torch.equal(x, x_subset) and torch.equal(y, y_subset)
    assert len(torch.unique(x.flatten(1), dim=0)) == 100


def test_figures_are_written(tmp_path, data):
    x, y = data
    tables_1d, tables_2d, tables_interp = [], [], []
    for seed, regime in enumerate(["joint", "mixed"]):
        model = trained_like(seed)
        generator = torch.Generator().manual_seed(seed)
        d1, d2 = random_direction(model, generator), random_direction(model, generator)
        tables_1d.append(slice_1d(model, x, y, d1, alphas=np.linspace(-1, 1, 5)).assign(regime=regime))
        tables_2d.append(slice_2d(model, x, y, d1, d2, alphas=[-1, 0, 1], betas=[-1, 0, 1]).assign(regime=regime))
    state_a, state_b = trained_like(0).state_dict(), trained_like(1).state_dict()
    for pair, regime in (("P1 → mixed", "mixed"), ("joint → mixed", "mixed")):
        tables_interp.append(interpolate(trained_like(0), state_a, state_b, x, y, ts=[0, 0.5, 1])
                             .assign(pair=pair, regime=regime))
    paths = [tmp_path / f"{name}.png" for name in ("slices", "contour", "interpolation")]
    plot_slices_1d(pd.concat(tables_1d), paths[0])
    plot_contour_2d(pd.concat(tables_2d), paths[1])
    plot_interpolation(pd.concat(tables_interp), paths[2])
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
