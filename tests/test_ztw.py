"""`ztw`: cascading connections between the internal exits, then geometric ensembles fitted last on the frozen
network — checked on a real model and real data, through a whole run on disk."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmark.flops import exit_costs
from benchmark.models.eval_mode import evaluating
from benchmark.pipeline import execute_run, initial_model
from benchmark.store import ResultsStore, read_logits, read_torch
from benchmark.train import held
from regimes.base import Budget
from regimes.registry import build_regime
from regimes.ztw import ZeroTimeWaste

from conftest import digits_spec

CPU = torch.device("cpu")
TRAIN = {"epochs": 2, "p1_epochs": None, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
         "nesterov": True, "weight_decay": 5e-4, "eval_every": 1}


def spec_for(regime, hparams=None):
    return digits_spec(regime, TRAIN, hparams)


def model_for(regime, arch, digits):
    """A digits model of `arch`: small_cnn with pool heads, or MSDNet with its own classifier after every block."""
    if arch == "small_cnn":
        return initial_model(spec_for(regime), digits, CPU)
    from benchmark.spec import RunSpec
    spec = RunSpec(dataset="digits", arch=arch, regime=regime, seed=0, train=dict(TRAIN),
                   model={"head": "msdnet", "exits": "all"})
    return initial_model(spec, digits, CPU)


def test_ensemble_of_one_exit_is_that_exit():
    torch.manual_seed(0)
    combiner = ZeroTimeWaste(num_exits=4, num_classes=10, feature_dims=[16, 16, 16])
    combiner.begin_last_phase()
    z = torch.randn(32, 10) * 3
    out, _ = combiner.step(0, z, None)
    assert torch.equal(out.argmax(1), z.argmax(1))          # exp(w) > 0 scales log-probabilities: same ranking
    with torch.no_grad():
        combiner.ensembles[0].log_weight.zero_()
    out, _ = combiner.step(0, z, None)                      # w = 0, b = 0: the exit's own distribution
    assert torch.allclose(F.softmax(out, 1), F.softmax(z, 1), atol=1e-6)


def test_ensemble_is_the_weighted_mean_of_the_cascaded_log_probabilities():
    torch.manual_seed(1)
    combiner = ZeroTimeWaste(num_exits=4, num_classes=6, feature_dims=[16, 16, 16])
    with torch.no_grad():
        for ensemble in combiner.ensembles:
            ensemble.log_weight.normal_(0, 0.5)
            ensemble.bias.normal_(0, 0.5)
    heads = [torch.randn(5, 6) for _ in range(4)]
    cascaded, state = [], None
    for k, z in enumerate(heads):                           # before the last phase: exits output their cascades
        out, state = combiner.step(k, z, state)
        cascaded.append(out)
    combiner.begin_last_phase()
    state = None
    for k, z in enumerate(heads):
        out, state = combiner.step(k, z, state)
        if k == 3:
            assert torch.equal(out, z)                      # the backbone's classifier: neither cascaded nor ensembled
            continue
        ensemble = combiner.ensembles[k]
        log_p = np.stack([F.log_softmax(c, 1).detach().numpy() for c in cascaded[:k + 1]], axis=1)
        weights = np.exp(ensemble.log_weight.detach().numpy())[None, :, None]
        expected = (log_p * weights).mean(axis=1) + ensemble.bias.detach().numpy()
        np.testing.assert_allclose(out.detach().numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("arch", ["small_cnn", "msdnet"])
def test_cascade_reads_the_previous_exit_detached(arch, digits, inputs):
    x, y = inputs
    model = model_for("joint+ztw", arch, digits)
    plain = model_for("joint", arch, digits)                # same initial weights: the same head logits
    with evaluating(model), evaluating(plain):
        cascaded, heads = model(x), plain(x)
    assert torch.equal(cascaded[0], heads[0]) and torch.equal(cascaded[-1], heads[-1])
    for k in range(1, model.num_exits - 1):
        combiner = model.combiner
        expected = heads[k] + combiner.cascades[k - 1](combiner.norms[k - 1](cascaded[k - 1]))
        assert torch.allclose(cascaded[k], expected, atol=1e-5)
    model.train()
    for k in range(1, model.num_exits - 1):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x)[k], y).backward()
        for j in range(k):                                  # an earlier head learns nothing from exit k's loss
            assert all(p.grad is None or not p.grad.any() for p in model.heads[j].parameters()), (k, j)
        assert any(p.grad is not None and p.grad.any() for p in model.combiner.cascades[k - 1].parameters())
        assert all(p.grad is None for p in model.combiner.last_phase_parameters())


def test_cascades_are_charged_in_the_exit_costs(digits):
    ztw = initial_model(spec_for("joint+ztw"), digits, CPU)
    plain = initial_model(spec_for("joint"), digits, CPU)
    extra = np.asarray(exit_costs(ztw, digits.input_shape)) - np.asarray(exit_costs(plain, digits.input_shape))
    cascade = 2 * digits.num_classes ** 2                   # one C x C multiply per cascaded exit, 2 FLOPs per MAC
    np.testing.assert_allclose(extra, [0, cascade, 2 * cascade, 2 * cascade])


@pytest.mark.parametrize("regime", ["joint+ztw", "disjoint+ztw"])
def test_a_run_fits_the_ensembles_last_on_the_frozen_network(regime, digits, tmp_path):
    """The ensemble phase changes nothing but the ensembles, is charged as a phase, and the stored logits are the
    ensembles' outputs; a disjoint+ztw run shares disjoint's P1 backbone."""
    store = ResultsStore(tmp_path)
    spec = spec_for(regime, {"ensemble_epochs": 1})
    if regime.startswith("disjoint"):
        execute_run(spec_for("disjoint"), store, data_root=tmp_path, device=CPU, threads=1)
    metrics = execute_run(spec, store, data_root=tmp_path, device=CPU, threads=1, keep_model=True)
    phases = [p["phase"] for p in metrics["cost"]["phases"]]
    assert phases == (["P2", "ensemble"] if regime.startswith("joint") else ["P1", "P3", "ensemble"])
    assert metrics["cost"]["p1_reused"] is regime.startswith("disjoint")
    ensemble_cost = metrics["cost"]["phases"][-1]
    assert ensemble_cost["optimizer_steps"] == len(digits.x_train) // TRAIN["batch_size"]
    assert ensemble_cost["train_flops"] > 0

    trained = read_torch(tmp_path / "runs" / spec.run_id / "model.pt")
    assert bool(trained["combiner.ensembled"])
    model = initial_model(spec, digits, CPU)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(trained)
    moved = {k for k, v in trained.items() if not torch.equal(v, initial[k])}
    assert any(k.startswith("combiner.ensembles") for k in moved)

    # rerun the schedule's phases alone: everything but the ensembles ends where the full run ended
    without = spec_for(regime, {"ensemble_epochs": 0})
    execute_run(without, store, data_root=tmp_path, device=CPU, threads=1, keep_model=True)
    cascaded = read_torch(tmp_path / "runs" / without.run_id / "model.pt")
    assert not bool(cascaded["combiner.ensembled"])
    for key, value in cascaded.items():
        if not key.startswith("combiner.ensemble"):
            assert torch.equal(value, trained[key]), f"the ensemble phase changed {key}"

    stored = read_logits(tmp_path / "runs" / spec.run_id / "logits.npz", model.num_exits, len(digits.y_val),
                         len(digits.y_test))
    x_test, prepare = held(digits, "test")
    with evaluating(model), torch.no_grad():
        outputs = torch.stack(model(prepare(x_test[:50]))).numpy()
    np.testing.assert_allclose(stored["test"][:, :50], outputs, atol=1e-4)
    plain = read_logits(tmp_path / "runs" / without.run_id / "logits.npz", model.num_exits, len(digits.y_val),
                        len(digits.y_test))
    assert np.array_equal(plain["test"][-1], stored["test"][-1])         # the final exit is not ensembled
    assert not np.allclose(plain["test"][0], stored["test"][0])


def test_ztw_adds_the_official_image_scripts_ensemble_phase_to_every_schedule():
    """2 epochs of Adam at lr 1e-3 without weight decay (ztw_cv/scripts: `ensembling_model_args`)."""
    for schedule in ("joint", "mixed", "disjoint"):
        phases = build_regime(f"{schedule}+ztw").phases(Budget(10))
        assert phases[-1].name == "ensemble" and phases[-1].trains == "combiner" and phases[-1].epochs == 2
        assert phases[-1].train == {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0}


@pytest.mark.parametrize("arch", ["small_cnn", "msdnet"])
def test_cascades_start_as_the_extra_columns_of_the_official_concatenated_layer(arch, digits):
    """Cascade k reads exit k-1's output into head k: its weights are U(+-1/sqrt(D_k + C)), D_k the features of head
    k's last linear layer, as the columns of the official Linear(D + C, C) — not the fan-in C of a Linear(C, C)."""
    model = model_for("joint+ztw", arch, digits)
    classes = digits.num_classes
    for k, cascade in enumerate(model.combiner.cascades, start=1):
        features = model.heads[k].linear.in_features
        bound = 1 / np.sqrt(features + classes)
        weight = cascade.weight.detach().abs()
        assert float(weight.max()) <= bound and float(weight.max()) > 0.9 * bound, (k, float(weight.max()), bound)
        assert bound < 0.5 / np.sqrt(classes)                          # far below Linear(C, C)'s own bound
