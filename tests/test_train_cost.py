"""Training cost: the measured FLOPs of each objective's step against relations derivable by hand, the count
charged per step kind, the examples the steps really drew, and counting that leaves training bitwise unchanged.

Every FLOP relation below is exact (tolerance 0): FlopCounterMode counts matmul/conv FLOPs from shapes alone, and
on small_cnn (conv-BN-ReLU blocks, pooled linear heads) every counted op is a conv or a linear layer.
"""
import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmark import train
from benchmark.data import Dataset, load_dataset
from benchmark.flops import exit_costs_of, profile_flops
from benchmark.models import build_model
from benchmark.pipeline import obtain_p1
from benchmark.spec import RunSpec
from benchmark.store import ResultsStore
from benchmark.train import make_optimizer, run_phase, set_train_mode, set_trainable
from regimes.base import Phase, StepContext
from regimes.registry import build_regime, objective_names

CPU = torch.device("cpu")
BATCH = 128
TRAIN = {"epochs": 2, "p1_epochs": None, "batch_size": BATCH, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
         "nesterov": True, "weight_decay": 5e-4, "eval_every": 10 ** 9}
P1, P2, P3 = Phase("P1", "backbone", 1), Phase("P2", "all", 1), Phase("P3", "heads", 1)


@pytest.fixture(scope="module")
def digits():
    """digits cut to two batches of 128: a phase epoch is two steps."""
    full = load_dataset("digits", "/nonexistent")
    return dataclasses.replace(full, x_train=full.x_train[:2 * BATCH], y_train=full.y_train[:2 * BATCH])


def tiny_dataset(n: int) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 1, 8, 8, generator=generator), torch.arange(n) % 10
    return Dataset(name="tiny", kind="image", num_classes=10, input_shape=(1, 8, 8), x_train=x, y_train=y,
                   x_val=x, y_val=y, x_test=x, y_test=y, augmentation="none")


def model():
    torch.manual_seed(0)
    return build_model("small_cnn", 10, (1, 8, 8))


def objective(name: str, **hp):
    return build_regime("joint" if name == "uniform" else f"joint+{name}", hp).objective


def phase_cost(data, name: str | None, phase: Phase = P2, **hp):
    """Cost of `phase` (objective `name`, or P1's backbone step when None) on a fresh small_cnn."""
    return run_phase(model(), phase, objective(name, **hp) if name else None, data, TRAIN, pairing_seed=0,
                     epoch_offset=0, device=CPU).cost


@pytest.fixture(scope="module")
def forward():
    """Per-sample forward FLOPs: every exit (all blocks, heads and the classifier), the first conv, the heads."""
    net = model()
    profile = profile_flops(net, (1, 8, 8))
    stem_conv = net.blocks[0][0]
    assert isinstance(stem_conv, torch.nn.Conv2d), "small_cnn's first block starts with the stem's conv"
    with FlopCounterMode(display=False) as counter:
        stem_conv(torch.zeros(1, 1, 8, 8))
    return {"all_exits": exit_costs_of(profile, net.exit_blocks)[-1], "first_conv": counter.get_total_flops(),
            "heads": sum(profile.heads), "backbone": sum(profile.blocks) + profile.classifier}


@pytest.fixture(scope="module")
def uniform(digits):
    return phase_cost(digits, "uniform").step_flops["step"]


def test_uniform_p2_step_is_three_forwards_of_every_exit_but_the_images_gradient(digits, forward, uniform):
    """Backward = 2 x forward (input and weight gradient of every conv/linear) except that the first conv computes
    no input gradient (the image needs none): batch x (3 x forward − first conv). That is 0.4 % under the
    textbook 3 x forward on 8x8 digits, so the 1:2 rule holds within 1 %."""
    assert uniform == BATCH * (3 * forward["all_exits"] - forward["first_conv"])
    assert uniform == pytest.approx(3 * BATCH * forward["all_exits"], rel=0.01)


def test_p3_step_pays_the_forward_and_only_the_heads_weight_gradients(digits, forward, uniform):
    """Frozen backbone (classifier included): no gradient flows below a head. The backward is the heads' own:
    weight and input gradients of their linear layers (the input gradient reaches the learnable mix of SDN's
    max/avg pooling), two more forwards of the heads."""
    p3 = phase_cost(digits, "uniform", P3).step_flops["step"]
    assert p3 == BATCH * (forward["all_exits"] + 2 * forward["heads"])
    assert p3 < uniform


def test_p1_step_is_three_forwards_of_the_backbone_alone(digits, forward):
    """P1 is measured like every phase: the heads are not computed, the backbone's classifier is."""
    assert phase_cost(digits, None, P1).step_flops["step"] == BATCH * (3 * forward["backbone"] - forward["first_conv"])


@pytest.mark.parametrize("target", ["clean", "label"])
def test_cet_step_is_two_uniform_steps(digits, uniform, target):
    """Clean and perturbed forwards, one backward through both graphs; the perturbation, KL and CE are no
    matmuls: exactly 2 x uniform."""
    assert phase_cost(digits, "cet", target=target).step_flops["step"] == 2 * uniform


def test_l2w_meta_step_costs_over_three_uniform_steps_and_its_plain_step_one(digits, uniform):
    """A meta step adds, per half, the functional pseudo forward, its double backward, the meta forward and g's
    meta-gradient to the real update; a plain step is the two real updates on the halves (one uniform step) plus
    g's forward on the detached (n, K) losses: two linear layers, K -> hidden -> K."""
    net, hidden = model(), 500
    flops = phase_cost(digits, "l2w", meta_interval=2, hidden=hidden).step_flops    # step 0 meta, step 1 plain
    assert flops["meta"] > 3 * uniform
    assert flops["plain"] == uniform + BATCH * 2 * (2 * net.num_exits * hidden)


def test_phase_flops_are_the_counted_step_times_the_steps(digits):
    steps = 3 * 2
    cost = phase_cost(digits, "uniform", Phase("P2", "all", 3))
    assert cost.train_flops == cost.flops_per_step * steps == cost.step_flops["step"] * steps
    mixed = phase_cost(digits, "l2w", Phase("P2", "all", 2), meta_interval=2)    # steps 0..3: meta, plain, meta, plain
    assert mixed.train_flops == 2 * mixed.step_flops["meta"] + 2 * mixed.step_flops["plain"]
    assert mixed.flops_per_step == mixed.train_flops / 4


@pytest.mark.parametrize("name", objective_names())
def test_steps_of_one_declared_kind_do_the_same_work(digits, name):
    """The trainer counts one step per `step_kind`: every step of a kind must cost the same, counted each time."""
    net, obj = model(), objective(name, **({"meta_interval": 2} if name == "l2w" else {}))
    optimizer = make_optimizer(set_trainable(net, "all"), TRAIN)
    set_train_mode(net, "all")
    counts: dict[str, set[float]] = {}
    for step in range(4):
        ctx = StepContext(phase="P2", epoch=0, epochs=1, step=step, num_exits=net.num_exits,
                          generator=torch.Generator().manual_seed(step), data_kind=digits.kind)
        x, y = digits.x_train[64 * step:64 * (step + 1)], digits.y_train[64 * step:64 * (step + 1)]
        with FlopCounterMode(display=False) as counter:
            obj.step(net, x, y, optimizer, ctx)
        counts.setdefault(obj.step_kind(ctx), set()).add(counter.get_total_flops())
    assert all(len(flops) == 1 for flops in counts.values()), counts
    if name == "l2w":
        assert counts["meta"] != counts["plain"], "without its declared kinds l2w's first step would overcount"


class NotCounting:
    """FlopCounterMode's interface, counting nothing: training with and without the counter must agree."""

    def __init__(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def get_total_flops(self):
        return 0


@pytest.mark.parametrize("name", [None, *objective_names()])
def test_counting_leaves_training_bitwise_unchanged(digits, monkeypatch, name):
    def trained():
        net = model()
        result = run_phase(net, P1 if name is None else Phase("P2", "all", 2), objective(name) if name else None,
                           digits, TRAIN, pairing_seed=0, epoch_offset=0, device=CPU)
        return net.state_dict(), [row["train_loss"] for row in result.history]

    counted_state, counted_losses = trained()
    monkeypatch.setattr(train, "counting_flops", NotCounting)
    plain_state, plain_losses = trained()
    assert all(torch.equal(counted_state[k], plain_state[k]) for k in plain_state)
    assert counted_losses == plain_losses


@pytest.mark.parametrize("n, per_step", [(20, 20), (300, BATCH)])   # smaller than a batch; a ragged last batch
@pytest.mark.parametrize("name", ["uniform", "l2w"])                # l2w halves the batch but draws it once
def test_examples_seen_counts_what_the_steps_drew(name, n, per_step):
    obj, drawn = objective(name), []
    step = obj.step

    def recording_step(model, x, y, optimizer, ctx):
        drawn.append(len(x))
        return step(model, x, y, optimizer, ctx)

    obj.step = recording_step
    cost = run_phase(model(), Phase("P2", "all", 3), obj, tiny_dataset(n), TRAIN, pairing_seed=0, epoch_offset=0,
                     device=CPU).cost
    assert drawn == [per_step] * (3 * max(1, n // BATCH))
    assert cost.examples_seen == sum(drawn)


def test_shared_p1_stores_its_measured_flops_and_reuse_charges_them(digits, tmp_path):
    spec = RunSpec(dataset="digits", arch="small_cnn", regime="mixed", seed=0, train=dict(TRAIN),
                   model={"head": "pool", "exits": "flops:0.25,0.5,0.75"})
    disjoint = dataclasses.replace(spec, regime="disjoint")          # same P1, another run
    store = ResultsStore(tmp_path)
    _, trained, reused_first, _ = obtain_p1(spec, P1, model(), digits, store, CPU, None, None)
    _, loaded, reused_second, _ = obtain_p1(disjoint, P1, model(), digits, store, CPU, None, None)
    _, _, reused_on_rerun, _ = obtain_p1(spec, P1, model(), digits, store, CPU, None, None)
    assert (reused_first, reused_second) == (False, True)
    assert not reused_on_rerun, "the run that trained P1 paid for it, also when it is rerun after a kill"
    assert loaded == trained and loaded.train_flops == 2 * loaded.step_flops["step"] > 0
