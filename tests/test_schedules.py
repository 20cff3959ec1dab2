"""The property that defines each schedule, checked on a real model and real data."""
from contextlib import nullcontext

import pytest
import torch

from analysis.information import _forward_collect
from analysis.landscape import exit_metrics
from analysis.rank import block_activations
from benchmark.data import load_dataset
from benchmark.models.eval_mode import evaluating
from benchmark.pipeline import collect_logits, initial_model
from benchmark.snapshots import InformationSnapshots
from benchmark.spec import RunSpec
from benchmark.train import exit_accuracies, run_phase, set_train_mode
from regimes.base import Budget, Objective, Phase
from regimes.registry import build_regime, regime_names, schedule_names

CPU = torch.device("cpu")
TRAIN = {"epochs": 2, "p1_epochs": None, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
         "nesterov": True, "weight_decay": 5e-4, "eval_every": 1}
MODEL = {"head": "pool", "exits": "flops:0.25,0.5,0.75"}
MODELS = {"small_cnn": MODEL, "msdnet": {"head": "msdnet", "exits": "all"}}


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


def spec_for(regime, seed=0, arch="small_cnn"):
    return RunSpec(dataset="digits", arch=arch, regime=regime, seed=seed, train=dict(TRAIN), model=dict(MODELS[arch]))


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
    """The network (blocks, heads, classifier) is the same for every regime; an exit combiner's own parameters
    (ztw's cascades and ensembles) come on top and are drawn after it."""
    states = [initial_model(spec_for(regime), digits, CPU).network_state() for regime in regime_names()]
    for state in states[1:]:
        assert state.keys() == states[0].keys()
        assert all(torch.equal(state[k], states[0][k]) for k in state)
    other_seed = initial_model(spec_for("joint", seed=1), digits, CPU).state_dict()
    assert any(not torch.equal(other_seed[k], states[0][k]) for k in other_seed if other_seed[k].is_floating_point())


@pytest.mark.parametrize("arch", list(MODELS))
def test_disjoint_p3_never_moves_the_backbone_or_its_batchnorm_statistics(arch, digits):
    model = initial_model(spec_for("disjoint", arch=arch), digits, CPU)
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


def modes(model):
    return {name: module.training for name, module in model.named_modules()}


def backbone_state(model):
    return {n: t.detach().clone() for n, t in model.state_dict().items() if n.split(".")[0] in ("blocks", "classifier")}


def test_evaluating_runs_in_eval_without_grad_and_restores_each_modules_own_mode(digits):
    model = initial_model(spec_for("disjoint"), digits, CPU)
    set_train_mode(model, "heads")                     # P3: the model trains, its frozen backbone is in eval
    before = modes(model)
    assert before[""] and before["heads"] and not before["blocks.0"] and not before["blocks.0.1"]   # 0.1: a BatchNorm
    with evaluating(model):
        assert not any(modes(model).values()) and not torch.is_grad_enabled()
        assert not model(digits.x_val[:8])[0].requires_grad
    assert modes(model) == before and torch.is_grad_enabled()


EVAL_FORWARDS = {                                      # every evaluation forward of the suite, on (model, x, y)
    "exit_accuracies": lambda model, x, y: exit_accuracies(model, x, y, 32, nullcontext),
    "collect_logits": lambda model, x, y: collect_logits(model, x, batch_size=32),
    "block_activations": lambda model, x, y: block_activations(model, x, batch_size=32),
    "information": lambda model, x, y: _forward_collect(model, x, 32),
    "landscape": lambda model, x, y: exit_metrics(model, x, y, batch_size=32)({}),
}


@pytest.mark.parametrize("forward", EVAL_FORWARDS)
def test_every_eval_forward_leaves_a_frozen_backbone_in_eval(forward, digits):
    model = initial_model(spec_for("disjoint"), digits, CPU)
    set_train_mode(model, "heads")
    before, state = modes(model), backbone_state(model)
    EVAL_FORWARDS[forward](model, digits.x_val[:64], digits.y_val[:64])
    assert modes(model) == before
    assert all(torch.equal(t, model.state_dict()[n]) for n, t in state.items())


@pytest.mark.parametrize("regime", [r for r in regime_names() if r.partition("+")[0] == "disjoint"])
def test_p3_information_snapshots_keep_the_backbone_frozen_for_every_objective(regime, digits):
    """Snapshots run inside P3 after every epoch: after each one the backbone must still be in eval mode (else
    its BatchNorm would update its statistics on the next forward) and bitwise unchanged, buffers included.
    Every objective that composes with disjoint (the gradient-combination ones do not)."""
    built = build_regime(regime)
    model = initial_model(spec_for(regime), digits, CPU)
    state = backbone_state(model)
    assert any("running_mean" in n for n in state), "the test needs BatchNorm in the backbone"
    snapshots = InformationSnapshots(model, digits, every=1, samples=40)
    seen = []

    def after_epoch(global_epoch):
        snapshots(global_epoch)
        now = model.state_dict()
        seen.append({"epoch": global_epoch,
                     "backbone_training": [m.training for b in model.backbone_modules() for m in b.modules()],
                     "unchanged": all(torch.equal(t, now[n]) for n, t in state.items())})

    run_phase(model, Phase("P3", "heads", 2), built.objective, digits, TRAIN, pairing_seed=1, epoch_offset=0,
              device=CPU, after_epoch=after_epoch)
    assert [s["epoch"] for s in seen] == [1, 2] and len(snapshots.table()["epoch"].unique()) == 2
    for s in seen:
        assert not any(s["backbone_training"]), f"epoch {s['epoch']}: a snapshot put backbone modules in train mode"
        assert s["unchanged"], f"epoch {s['epoch']}: the frozen backbone changed"


@pytest.mark.parametrize("arch", list(MODELS))
def test_mixed_p1_updates_only_the_backbone_and_its_classifier(arch, digits):
    model = initial_model(spec_for("mixed", arch=arch), digits, CPU)
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
    for phase in built.phases(Budget(2)):
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

    class Recorder(Objective):                 # an Objective: the trainer also asks it for `step_kind`
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
