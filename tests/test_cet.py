"""`cet` and its perturbations against known answers: the term on x̃, its stop-gradient, each perturbation's
defining property, and real epochs on sensor series and images."""
import copy

import pytest
import torch
import torch.nn.functional as F

from benchmark.data import dataset_available, load_dataset
from benchmark.errors import UserError
from conftest import torch_calls
from benchmark.models import build_model
from benchmark.train import run_phase
from regimes.base import Phase, StepContext
from regimes.perturbations import (STRENGTHS, additive_noise, cutout, permute_segments, perturb, scale_channels,
                                   shift_and_flip, time_warp)
from regimes.registry import build_regime

CPU = torch.device("cpu")
IMAGE_OFF = {name: 0 for name in STRENGTHS["image"]}
SERIES_OFF = {name: 0 for name in STRENGTHS["series"]}


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def cet(**hparams):
    return build_regime("joint+cet", hparams).objective


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "/nonexistent")


@pytest.fixture(params=["small_cnn", "msdnet"])
def model_and_batch(digits, request):
    """A single-scale backbone with pool heads, and MSDNet (a list of scales between blocks, its own classifiers)."""
    torch.manual_seed(0)
    head, exits = ("pool", "flops:0.25,0.5,0.75") if request.param == "small_cnn" else ("msdnet", "all")
    model = build_model(request.param, 10, (1, 8, 8), head=head, exits=exits).train()
    return model, digits.x_train[:64], digits.y_train[:64]


def context(model, seed=0, kind="image"):
    return StepContext(phase="P2", epoch=0, epochs=1, step=0, num_exits=model.num_exits, generator=generator(seed),
                       data_kind=kind)


def frozen_sgd(model):
    """A real optimizer that leaves the weights where they are, so p.grad can be read after a step."""
    return torch.optim.SGD(model.parameters(), lr=0.0)


def cross_entropies(logits, y):
    return torch.stack([F.cross_entropy(z, y) for z in logits])


def kl_to_clean(clean, perturbed):
    """KL(sg(p_k(x)) ‖ p_k(x̃)) per exit, batch mean, written out: Σ_c p log(p / q)."""
    terms = []
    for z, z_tilde in zip(clean, perturbed):
        p = F.softmax(z.detach(), 1)
        terms.append((p * (F.log_softmax(z.detach(), 1) - F.log_softmax(z_tilde, 1))).sum(1).mean())
    return torch.stack(terms)


# --- the objective -----------------------------------------------------------------------------------------


def test_cet_is_labelled_reconstructed_and_declares_every_strength():
    objective = cet()
    assert objective.reconstructed and objective.hp["weight"] == 1.0 and objective.hp["target"] == "clean"
    assert set(objective.hp) == {"weight", "target", *STRENGTHS["image"], *STRENGTHS["series"]}
    with pytest.raises(UserError, match="target"):
        cet(target="teacher")


def test_identity_perturbation_makes_the_term_zero_and_the_loss_the_sum_of_exit_ces(model_and_batch):
    model, x, y = model_and_batch
    expected = cross_entropies(copy.deepcopy(model)(x), y).sum()
    objective = cet(**IMAGE_OFF)
    x_tilde, shift = objective.perturb(x, context(model))
    assert x_tilde is x and shift is None
    clean = model(x)
    assert torch.equal(objective.perturbed_terms(clean, model(x), y), torch.zeros(model.num_exits))
    out = objective.step(model, x, y, frozen_sgd(model), context(model))
    assert out["loss"] == expected  # exactly: the term on x̃ adds 0.0
    assert out["exit_ce"].shape == (model.num_exits,)
    assert torch.equal(out["exit_ce"], cross_entropies(clean, y).detach())


def test_loss_adds_weighted_kl_to_the_clean_prediction_on_perturbed_inputs(model_and_batch):
    model, x, y = model_and_batch
    reference = copy.deepcopy(model)
    x_tilde = perturb(x, "image", generator(7))
    clean, perturbed = reference(x), reference(x_tilde)
    kl = kl_to_clean(clean, perturbed)
    assert torch.all(kl > 1e-4), "a real perturbation must change every exit's prediction"
    out = cet(weight=0.5).step(model, x, y, frozen_sgd(model), context(model, seed=7))
    torch.testing.assert_close(out["loss"], cross_entropies(clean, y).sum() + 0.5 * kl.sum())


def test_kl_gradient_reaches_the_perturbed_branch_only(model_and_batch):
    """sg: the clean prediction is a target. Checked on the logits, then on the step's parameter gradients."""
    model, x, y = model_and_batch
    objective = cet()
    x_tilde, _ = objective.perturb(x, context(model, seed=3))
    clean, perturbed = model(x), model(x_tilde)
    terms = objective.perturbed_terms(clean, perturbed, y).sum()
    into_clean = torch.autograd.grad(terms, clean + perturbed, allow_unused=True, retain_graph=True)
    assert all(g is None for g in into_clean[:len(clean)])
    assert all(g is not None and g.abs().sum() > 0 for g in into_clean[len(clean):])

    def parameter_gradients(loss):
        return torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)

    ce = cross_entropies(clean, y).sum()
    with_sg = parameter_gradients(ce + kl_to_clean(clean, perturbed).sum())
    kl_without_sg = sum(
        (F.softmax(z, 1) * (F.log_softmax(z, 1) - F.log_softmax(z_tilde, 1))).sum(1).mean()
        for z, z_tilde in zip(clean, perturbed))
    without_sg = parameter_gradients(ce + kl_without_sg)
    objective.step(model, x, y, frozen_sgd(model), context(model, seed=3))
    stepped = [p.grad for p in model.parameters()]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(stepped, with_sg))
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(stepped, without_sg))


def test_target_label_adds_cross_entropy_on_the_perturbed_input(model_and_batch):
    model, x, y = model_and_batch
    reference = copy.deepcopy(model)
    clean, perturbed = reference(x), reference(perturb(x, "image", generator(5)))
    out = cet(target="label").step(model, x, y, frozen_sgd(model), context(model, seed=5))
    torch.testing.assert_close(out["loss"], cross_entropies(clean, y).sum() + cross_entropies(perturbed, y).sum())
    assert not torch.allclose(cross_entropies(clean, y), cross_entropies(perturbed, y))
    identity = cet(target="label", **IMAGE_OFF).step(model, x, y, frozen_sgd(model), context(model))
    torch.testing.assert_close(identity["loss"], 2 * cross_entropies(model(x), y).sum())


def test_step_draws_randomness_from_the_context_generator_only(model_and_batch):
    model, x, y = model_and_batch
    twin = copy.deepcopy(model)
    global_state = torch.get_rng_state()
    first = cet().step(model, x, y, frozen_sgd(model), context(model, seed=11))
    assert torch.equal(torch.get_rng_state(), global_state)
    assert torch.equal(cet().step(twin, x, y, frozen_sgd(twin), context(twin, seed=11))["loss"], first["loss"])
    assert not torch.equal(cet().step(twin, x, y, frozen_sgd(twin), context(twin, seed=12))["loss"], first["loss"])


TRAIN = {"batch_size": 16, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
         "eval_every": 1}


def train_one_epoch(dataset, arch, objective):
    torch.manual_seed(0)
    model = build_model(arch, dataset.num_classes, dataset.input_shape, head="pool", exits="flops:0.25,0.5,0.75")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = run_phase(model, Phase("P2", "all", 1), objective, dataset, TRAIN, pairing_seed=0, epoch_offset=0,
                       device=CPU)
    moved = [n for n, p in model.named_parameters() if not torch.equal(before[n], p)]
    return result, moved, len(before)


@pytest.mark.skipif(not dataset_available("basicmotions"), reason="needs pip install 'exitbench[timeseries]'")
@pytest.mark.parametrize("objective", ["uniform", "cet"])
def test_one_epoch_on_basicmotions_with_the_1d_cnn(objective):
    dataset = load_dataset("basicmotions", "/nonexistent")
    result, moved, total = train_one_epoch(dataset, "small_cnn1d", build_regime(f"joint+{objective}").objective)
    assert all(torch.isfinite(torch.tensor(row["train_loss"])) for row in result.history)
    assert len(moved) == total, "every parameter (backbone and heads) must move"


def test_cet_one_epoch_on_digits_with_the_2d_cnn(digits):
    result, moved, total = train_one_epoch(digits, "small_cnn", cet())
    losses = [row["train_loss"] for row in result.history]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert len(moved) == total
    exit_ce = sum(row["train_exit_ce"] for row in result.history)
    assert losses[0] > exit_ce  # Σ_k CE_k plus a positive KL term


# --- perturbations -----------------------------------------------------------------------------------------

IMAGES = torch.randn(64, 3, 16, 16, generator=generator(100))
SERIES = torch.randn(64, 6, 100, generator=generator(101))
SINGLE = [
    (additive_noise, IMAGES, 0.3), (shift_and_flip, IMAGES, (0.25, 0.5)), (cutout, IMAGES, 0.25),
    (additive_noise, SERIES, 0.3), (scale_channels, SERIES, 0.2), (time_warp, SERIES, 0.2),
    (permute_segments, SERIES, 4),
]


def apply(function, x, strength, seed=0):
    strengths = strength if isinstance(strength, tuple) else (strength,)
    return function(x, generator(seed), *strengths)


@pytest.mark.parametrize("function, x, strength", SINGLE,
                         ids=[f"{f.__name__}-{'image' if x.dim() == 4 else 'series'}" for f, x, _ in SINGLE])
def test_each_perturbation_keeps_shape_is_seeded_and_is_the_identity_at_zero(function, x, strength):
    out = apply(function, x, strength)
    assert out.shape == x.shape and out.dtype == x.dtype and not torch.equal(out, x)
    assert torch.equal(apply(function, x, strength), out)
    assert not torch.equal(apply(function, x, strength, seed=1), out)
    zero = tuple(0 for _ in strength) if isinstance(strength, tuple) else 0
    assert apply(function, x, zero) is x


@pytest.mark.parametrize("kind, x, off", [("image", IMAGES, IMAGE_OFF), ("series", SERIES, SERIES_OFF)])
def test_perturb_composes_by_kind_and_checks_its_input(kind, x, off):
    assert perturb(x, kind, generator(), **off) is x
    default = perturb(x, kind, generator(3))
    assert default.shape == x.shape and torch.equal(default, perturb(x, kind, generator(3)))
    assert not torch.equal(default, x)
    with pytest.raises(KeyError, match="no strength"):
        perturb(x, kind, generator(), warp=0.1)
    with pytest.raises(ValueError, match="rank"):
        perturb(x[0], kind, generator())


@pytest.mark.parametrize("x", [torch.zeros(400, 3, 16, 16), torch.zeros(400, 6, 100)], ids=["image", "series"])
def test_noise_std_is_the_requested_sigma(x):
    out = additive_noise(x, generator(), 0.3)
    assert abs(out.std().item() - 0.3) < 0.003 and abs(out.mean().item()) < 0.003


def test_scaling_draws_one_factor_per_sample_and_channel():
    x = torch.ones(4000, 6, 50)
    factor = scale_channels(x, generator(), 0.2)
    assert torch.equal(factor, factor[:, :, :1].expand_as(factor))  # constant along time
    per_channel = factor[:, :, 0]
    assert abs(per_channel.mean().item() - 1) < 0.01 and abs(per_channel.std().item() - 0.2) < 0.01
    between_channels = torch.corrcoef(per_channel.T) - torch.eye(6)
    assert between_channels.abs().max() < 0.06  # independent per channel, not one factor per sample


def stamped(n, c, t):
    """x[i, j, s] = s + 1000 j + 10^5 i (exact in float64): every value says which sample, channel and step it
    came from."""
    return (torch.arange(t, dtype=torch.float64) + 1000 * torch.arange(c)[:, None]
            + 1e5 * torch.arange(n)[:, None, None])


def test_permutation_reorders_whole_segments_identically_in_every_channel():
    x = stamped(500, 6, 100)
    out = permute_segments(x, generator(), 4)
    assert torch.equal(out.sort(2).values, x)  # the multiset of values per sample and channel is kept
    source_step = (out % 1000).long()
    assert torch.equal(source_step, source_step[:, :1].expand_as(source_step))  # one permutation per sample
    jumps = (source_step[:, 0].diff(dim=1) != 1).sum(1)
    assert jumps.max() <= 3 and (jumps == 3).float().mean() > 0.3  # at most 4 contiguous segments
    starts = [torch.cat([torch.tensor([0]), torch.nonzero(row.diff() != 1).flatten() + 1, torch.tensor([100])])
              for row in source_step[:, 0]]
    assert min(s.diff().min().item() for s in starts) >= 100 // 8  # the minimum segment length
    assert (source_step[:, 0, 0] != 0).float().mean() > 0.5  # order really changes
    assert len({tuple(row.tolist()) for row in source_step[:, 0]}) > 400  # each sample has its own cuts and order


def test_time_warp_is_smooth_monotone_keeps_the_endpoints_and_is_shared_by_channels():
    series = torch.randn(500, 6, 100, generator=generator(2))
    out = time_warp(series, generator(), 0.2)
    assert torch.equal(out[..., 0], series[..., 0]) and torch.equal(out[..., -1], series[..., -1])
    ramps = torch.arange(100.0).expand(500, 6, 100)        # a ramp resampled at phi(t) reads phi(t)
    warped_time = time_warp(ramps, generator(), 0.2)
    assert torch.equal(warped_time, warped_time[:, :1].expand_as(warped_time))  # one warp per sample
    steps = warped_time[:, 0].diff(dim=1)
    assert torch.all(steps > 0)
    assert steps.diff(dim=1).abs().max() < 0.1             # the speed changes slowly: a smooth warp
    assert (warped_time[:, 0] - torch.arange(100.0)).abs().amax(1).median() > 1  # it does warp
    assert time_warp(series, generator(), 0) is series


def test_flip_alone_mirrors_and_shift_alone_moves_within_the_bound_with_edge_padding():
    x = torch.randn(300, 2, 8, 8, generator=generator(4))
    assert torch.equal(shift_and_flip(x, generator(), 0.0, 1.0), x.flip(3))
    out = shift_and_flip(x, generator(), 0.125, 0.0)  # 1 px at most
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    candidates = torch.stack([padded[..., 1 + dy:9 + dy, 1 + dx:9 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    matches = (candidates == out).flatten(2).all(2)           # (9 shifts, 300 images)
    assert torch.all(matches.any(0))
    assert torch.all(matches.sum(1) > 20)  # every shift occurs


def test_cutout_zeroes_one_clipped_square_in_every_channel():
    x = torch.ones(2000, 3, 16, 16)
    out = cutout(x, generator(), 0.25)
    zeroed = out == 0
    assert torch.equal(zeroed, zeroed[:, :1].expand_as(zeroed))
    mask = zeroed[:, 0]
    rows, columns = mask.any(2), mask.any(1)
    assert torch.equal(mask, rows[:, :, None] & columns[:, None, :])  # a rectangle
    assert rows.sum(1).max() == 4 and columns.sum(1).max() == 4 and rows.sum(1).min() >= 2
    assert (mask.flatten(1).sum(1) == 16).float().mean() > 0.5  # unclipped when the centre is inside


@pytest.mark.parametrize("kind, shape", [("image", (1, 8, 8)), ("series", (6, 32))])
def test_perturbations_are_vectorised(kind, shape):
    """As many torch calls for 1 000 samples as for 2: no per-sample Python loop (which a timing would also
    show, but only on an idle machine)."""
    strengths = {"flip": 0.5} if kind == "image" else {}
    calls = [torch_calls(lambda: perturb(torch.randn(n, *shape), kind, generator(), **strengths)) for n in (2, 1000)]
    assert calls[0] == calls[1] > 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("kind, x", [("image", IMAGES), ("series", SERIES)])
def test_perturbation_is_the_same_on_cpu_and_gpu(kind, x):
    torch.testing.assert_close(perturb(x.cuda(), kind, generator(9)).cpu(), perturb(x, kind, generator(9)))
