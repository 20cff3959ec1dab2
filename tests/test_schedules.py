"""The property that defines each schedule, checked on a real model and real data."""
import pytest
import torch

from benchmark.data import load_dataset
from benchmark.pipeline import initial_model
from benchmark.spec import RunSpec
from benchmark.train import run_phase
from regimes.base import Budget, Phase
from regimes.registry import build_regime, regime_names, schedule_names

CPU = torch.device("cpu")
TRAIN = {"epochs": 2, "p1_epochs": None, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
         "nesterov": True, "weight_decay": 5e-4, "eval_every": 1}
MODEL = {"head": "pool", "exits": "flops:0.25,0.5,0.75"}


class Subset:
    """The digits dataset cut to a few batches, so a phase takes well under a second."""

    def __init__(self, data, n=256):
        self.__dict__.update(data.__dict__)
        self.x_train, self.y_train = data.x_train[:n], data.y_train[:n]
        self._data = data

    def augment(self, x, generator):
        return self._data.augment(x, generator)


@pytest.fixture(scope="module")
def digits():
    return Subset(load_dataset("digits", "/nonexistent"))


def spec_for(regime, seed=0):
    return RunSpec(dataset="digits", arch="small_cnn", regime=regime, seed=seed, train=dict(TRAIN), model=dict(MODEL))


def snapshot(tensors):
    return {name: t.detach().clone() for name, t in tensors}


def split_state(model):
    backbone = {id(p) for p in model.backbone_parameters()}
    named = dict(model.named_parameters())
    backbone_names = {n for n, p in named.items() if id(p) in backbone}
    return backbone_names, set(named) - backbone_names


def test_budget_split_gives_every_schedule_the_total():
    budget = Budget(10)
    phases = {name: build_regime(name).schedule.phases(budget) for name in schedule_names()}
    assert [(p.name, p.trains, p.epochs) for p in phases["joint"]] == [("P2", "all", 10)]
    assert [(p.name, p.trains, p.epochs) for p in phases["disjoint"]] == [("P1", "backbone", 5), ("P3", "heads", 5)]
    assert [(p.name, p.trains, p.epochs) for p in phases["mixed"]] == [("P1", "backbone", 5), ("P2", "all", 5)]
    assert [p.epochs for p in build_regime("mixed").schedule.phases(Budget(10, 3))] == [3, 7]


def test_every_regime_starts_from_identical_weights(digits):
    states = [initial_model(spec_for(regime), digits, CPU).state_dict() for regime in regime_names()]
    for state in states[1:]:
        assert state.keys() == states[0].keys()
        assert all(torch.equal(state[k], states[0][k]) for k in state)
    other_seed = initial_model(spec_for("joint", seed=1), digits, CPU).state_dict()
    assert any(not torch.equal(other_seed[k], states[0][k]) for k in other_seed if other_seed[k].is_floating_point())


def test_disjoint_p3_never_moves_the_backbone_or_its_batchnorm_statistics(digits):
    model = initial_model(spec_for("disjoint"), digits, CPU)
    regime = build_regime("disjoint")
    run_phase(model, Phase("P1", "backbone", 1), regime.objective, digits, TRAIN, pairing_seed=1, epoch_offset=0,
              device=CPU)
    backbone_names, head_names = split_state(model)
    before = snapshot(model.state_dict().items())
    run_phase(model, Phase("P3", "heads", 2), regime.objective, digits, TRAIN, pairing_seed=1, epoch_offset=1,
              device=CPU)
    after = model.state_dict()
    buffers = [n for n, _ in model.named_buffers()]
    frozen = [n for n in after if n.split(".")[0] in ("blocks", "classifier")]
    assert any("running_mean" in n for n in frozen), "the test needs BatchNorm buffers in the backbone"
    for name in frozen:                                        # parameters *and* BN running stats / counters
        assert torch.equal(before[name], after[name]), f"P3 changed backbone tensor {name}"
    assert all(n in frozen for n in backbone_names)
    assert any(not torch.equal(before[n], after[n]) for n in head_names), "P3 must train the heads"
    assert set(buffers) & set(frozen)


def test_mixed_p1_updates_only_the_backbone_and_its_classifier(digits):
    model = initial_model(spec_for("mixed"), digits, CPU)
    backbone_names, head_names = split_state(model)
    assert any(n.startswith("classifier") for n in backbone_names) and head_names
    before = snapshot(model.named_parameters())
    head_buffers = snapshot((n, b) for n, b in model.named_buffers() if n.startswith("heads"))
    run_phase(model, Phase("P1", "backbone", 1), build_regime("mixed").objective, digits, TRAIN, pairing_seed=1,
              epoch_offset=0, device=CPU)
    params = dict(model.named_parameters())
    assert all(torch.equal(before[n], params[n]) for n in head_names), "P1 must not touch the heads"
    assert all(not torch.equal(before[n], params[n]) for n in backbone_names if n.startswith("classifier"))
    assert sum(not torch.equal(before[n], params[n]) for n in backbone_names) >= len(backbone_names) // 2
    buffers = dict(model.named_buffers())
    assert all(torch.equal(v, buffers[n]) for n, v in head_buffers.items())


def test_mixed_p2_trains_backbone_and_heads(digits):
    model = initial_model(spec_for("mixed"), digits, CPU)
    backbone_names, head_names = split_state(model)
    before = snapshot(model.named_parameters())
    run_phase(model, Phase("P2", "all", 1), build_regime("mixed").objective, digits, TRAIN, pairing_seed=1,
              epoch_offset=1, device=CPU)
    params = dict(model.named_parameters())
    assert any(not torch.equal(before[n], params[n]) for n in head_names)
    assert any(not torch.equal(before[n], params[n]) for n in backbone_names)


@pytest.mark.parametrize("regime", regime_names())
def test_every_regime_trains_one_epoch_without_error(regime, digits):
    """Parametrised over the registry: a new schedule or objective is tested automatically."""
    model = initial_model(spec_for(regime), digits, CPU)
    built = build_regime(regime)
    offset = 0
    for phase in built.schedule.phases(Budget(2)):
        result = run_phase(model, phase, built.objective, digits, TRAIN, pairing_seed=3, epoch_offset=offset,
                           device=CPU)
        offset += phase.epochs
        batches = phase.epochs * (len(digits.x_train) // TRAIN["batch_size"])
        assert result.cost.optimizer_steps in (batches, 2 * batches)      # l2w steps twice per batch
        assert all(torch.isfinite(torch.tensor(row["train_loss"])) for row in result.history)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step:UserWarning")  # the recorder never steps
def test_batch_order_depends_on_the_pairing_seed_and_global_epoch_only(digits):
    """A mixed run's P2 epoch e sees the batches a joint run sees at global epoch E1 + e."""
    seen = {}

    class Recorder:
        def __init__(self, key):
            self.key = key

        def step(self, model, x, y, optimizer, ctx):
            seen.setdefault(self.key, []).append(y.clone())
            return {"loss": torch.zeros(()), "exit_ce": torch.zeros(model.num_exits)}

    model = initial_model(spec_for("joint"), digits, CPU)
    run_phase(model, Phase("P2", "all", 2), Recorder("joint"), digits, TRAIN, pairing_seed=5, epoch_offset=0,
              device=CPU)
    run_phase(model, Phase("P2", "all", 1), Recorder("mixed-p2"), digits, TRAIN, pairing_seed=5, epoch_offset=1,
              device=CPU)
    per_epoch = len(seen["mixed-p2"])
    assert all(torch.equal(a, b) for a, b in zip(seen["joint"][per_epoch:], seen["mixed-p2"]))
    assert not all(torch.equal(a, b) for a, b in zip(seen["joint"][:per_epoch], seen["mixed-p2"]))
