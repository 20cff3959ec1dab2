"""`distill`: exits distil from a later exit (Phuong & Lampert, ICCV 2019; BYOT variants, Zhang et al., ICCV 2019).

L = (1-c) CE_K + sum_{k<K} [(1-c) CE_k + c T^2 KL(softmax(sg(z_teacher)/T) || softmax(z_k/T))], KL averaged over
the batch (segmentation: per pixel, averaged over the labelled pixels; `regimes.losses`). The teacher never
receives gradient from the distillation term (sg). `teacher` picks it:
`last` — the final exit teaches every internal exit (Phuong & Lampert; BYOT's deepest-teacher setting);
`next` — exit k+1 teaches exit k (a chain); `later` — the mean of the softened predictions of all exits after k.
"""
import torch
import torch.nn.functional as F

from regimes.base import HParam, Objective
from regimes.losses import cross_entropy, kl_divergence
from regimes.registry import register_objective

TEACHERS = ("last", "next", "later")


def soft_targets(logits, k: int, teacher: str, temperature: float):
    """Detached teacher distribution for exit k."""
    with torch.no_grad():
        if teacher == "last":
            return F.softmax(logits[-1].float() / temperature, dim=1)
        if teacher == "next":
            return F.softmax(logits[k + 1].float() / temperature, dim=1)
        return torch.stack([F.softmax(z.float() / temperature, dim=1) for z in logits[k + 1:]]).mean(0)


@register_objective
class Distill(Objective):
    name = "distill"
    description = "(1-c) CE_k on every exit + c T^2 KL(teacher || exit k) on internal exits; teacher detached"
    source = "Phuong & Lampert, Distillation-Based Training for Multi-Exit Architectures, ICCV 2019; BYOT (ICCV 2019)"
    hparams = {
        "weight": HParam(0.5, "c: share of the distillation term (1-c goes to cross-entropy)", low=0, high=1),
        "temperature": HParam(4.0, "T: softmax temperature of teacher and student", low=0, low_open=True),
        "teacher": HParam("last", "which exit(s) teach exit k ('later': the mean of all later exits)",
                          choices=TEACHERS),
    }

    def loss(self, logits, y, ctx):
        c, T = self.hp["weight"], self.hp["temperature"]
        total = (1 - c) * cross_entropy(logits[-1], y)
        for k, z in enumerate(logits[:-1]):
            target = soft_targets(logits, k, self.hp["teacher"], T)
            student = F.log_softmax(z.float() / T, dim=1)
            kl = kl_divergence(student, target, y)
            total = total + (1 - c) * cross_entropy(z, y) + c * T * T * kl
        return total
