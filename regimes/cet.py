"""`cet`: consistent exit training (Saeed, "Consistency Training of Multi-exit Architectures for Sensor Data",
arXiv 2109.13192) — reconstructed from the abstract, as specified in REGIMES.md:

    L = Σ_k [ CE(y, p_k(x)) + λ · KL( sg(p_k(x)) ‖ p_k(x̃) ) ],   λ = 1,

with x̃ a randomly perturbed copy of the batch (regimes/perturbations.py; the kind follows the dataset). Every
exit is asked to predict on x̃ what it predicts on x, which the abstract credits for robust early exits on
sensor data. The abstract's "weak supervision" could also mean that x̃ is supervised by the label itself:
``target="label"`` replaces the KL term with CE(y, p_k(x̃)).

Cost: two forward passes per step (clean and perturbed) and one backward through both graphs, which costs as
much as two backwards: about twice a `uniform` step. BatchNorm's running statistics see both batches, as in
other consistency-training methods that forward clean and perturbed inputs through the same network.

Segmentation (issue 23): both terms per pixel, averaged over labelled pixels. The perturbation's shift and mirror
move x̃'s pixels, so the labels and the clean prediction are moved with them before either is compared with
p_k(x̃) (pixels shifted in from outside the image are not counted); cutout and noise change no pixel's place.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from regimes.base import HParam, Objective, StepContext
from regimes.losses import cross_entropy, is_dense, kl_divergence
from regimes.perturbations import STRENGTHS, Shift, perturb_with_shift
from regimes.registry import register_objective

TARGETS = ("clean", "label")


@register_objective
class ConsistentExitTraining(Objective):
    name = "cet"
    description = "L = Σ_k [CE(y, p_k(x)) + λ·KL(sg(p_k(x)) ‖ p_k(x̃))], x̃ a perturbed input"
    source = "Saeed, arXiv 2109.13192 (2021), Consistency Training of Multi-exit Architectures for Sensor Data"
    reconstructed = True
    hparams = {
        "weight": HParam(1.0, "λ, the weight of each exit's term on the perturbed input", low=0),
        "target": HParam("clean", "what p_k(x̃) is fit to: 'clean' (KL to the detached clean prediction) or 'label' "
                                  "(CE to y: the 'weak supervision' reading)", choices=TARGETS),
        **{name: value for strengths in STRENGTHS.values() for name, value in strengths.items()},
    }

    def perturb(self, x: Tensor, ctx: StepContext) -> tuple[Tensor, Shift | None]:
        """x̃ with this objective's strengths for the dataset's kind, and its geometric part (`Shift`, or None);
        random numbers from ctx.generator only."""
        if ctx.generator is None:
            raise ValueError("cet draws its perturbations from ctx.generator, which is None")
        strengths = {name: self.hp[name] for name in STRENGTHS[ctx.data_kind]}
        return perturb_with_shift(x, ctx.data_kind, ctx.generator, **strengths)

    def perturbed_terms(self, clean: list[Tensor], perturbed: list[Tensor], y: Tensor,
                        shift: Shift | None = None) -> Tensor:
        """Per-exit term on x̃, shape (K,): KL(sg(p_k(x)) ‖ p_k(x̃)) (batch mean), or CE(y, p_k(x̃)). Segmentation:
        per pixel, with the clean prediction and the labels moved as x̃'s pixels were (`shift`), counted over the
        pixels whose moved label is labelled — a pixel shifted in from outside the image has no source to agree
        with."""
        if shift is not None and is_dense(perturbed[0]):
            clean = [shift.move(z.detach()) for z in clean]
            y = shift.move_labels(y)
        if self.hp["target"] == "label":
            return torch.stack([cross_entropy(z.float(), y) for z in perturbed])
        return torch.stack([
            kl_divergence(F.log_softmax(z_tilde.float(), 1), F.log_softmax(z.detach().float(), 1), y, log_target=True)
            for z, z_tilde in zip(clean, perturbed)
        ])

    def step(self, model, x, y, optimizer, ctx):
        x_tilde, shift = self.perturb(x, ctx)
        clean, perturbed = model(x), model(x_tilde)
        exit_ce = torch.stack([cross_entropy(z.float(), y) for z in clean])
        loss = exit_ce.sum() + self.hp["weight"] * self.perturbed_terms(clean, perturbed, y, shift).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.detach(), "exit_ce": exit_ce.detach()}
