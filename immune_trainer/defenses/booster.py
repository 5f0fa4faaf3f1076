"""Booster: attenuating harmful perturbation (Huang et al. 2024, arXiv 2409.01586).

Booster minimises ``L_align(w) + lambda * (L_harm(w) - L_harm(w - alpha * g / ||g||))`` with
``g = grad L_harm(w)`` held constant (the paper's first-order update): the harmful loss should drop as
little as possible after one normalised harmful gradient step. Three passes per step:

1. harmful forward at ``w``: ``g = grad L_harm(w)`` (``torch.autograd.grad``; nothing written to ``.grad``),
   scaled in place into the step ``d = -alpha g/||g||``;
2. move the trainable weights to ``w + d``, harmful forward, backward ``-lambda * L_harm`` (local, no
   sync). As soon as a parameter's gradient is accumulated, a hook moves it back (``w = (w + d) - d``)
   and adds ``lambda * g = d * (-lambda ||g|| / alpha)`` to its ``.grad``, reusing ``d``'s memory;
3. alignment forward at ``w`` (harmless side + retain set), backward ``L_align`` on top: the synchronised
   backward, so DDP all-reduces the whole accumulated gradient.

Memory: one parameter-sized buffer beyond a plain step (``d``, during passes 1-2; it is released
parameter by parameter while pass 2's gradients appear), the floor for this update.

L_align is the harmless CE of the pairs (the alignment data) plus the benign retain CE when given; the
harmful side of each pair is Booster's harmful dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..losses import global_grad_norm
from ..trainer import ImmunizationConfig, ImmunizationTrainer, check_non_negative

BOOSTER_PAPER = {
    "title": "Booster: Tackling harmful fine-tuning for large language models via attenuating harmful "
    "perturbation",
    "id": "2409.01586",
    "citation": (
        "@inproceedings{huang2025booster,\n"
        "  title={Booster: Tackling harmful fine-tuning for large language models via attenuating harmful "
        "perturbation},\n"
        "  author={Huang, Tiansheng and Hu, Sihao and Ilhan, Fatih and Tekin, Selim Furkan and Liu, Ling},\n"
        "  booktitle={International Conference on Learning Representations},\n"
        "  year={2025}\n}"
    ),
}


@dataclass
class BoosterConfig(ImmunizationConfig):
    r"""Configuration of :class:`BoosterTrainer` (defaults from the paper).

    Parameters:
        lamb (`float`, defaults to `5.0`):
            Weight ``lambda`` of the harmful-perturbation attenuation term.
        alpha (`float`, defaults to `0.1`):
            Length of the normalised harmful step ``w - alpha g/||g||`` the attenuation is measured over.
    """

    lamb: float = field(
        default=5.0, metadata={"help": "Weight lambda of the harmful-perturbation attenuation term."}
    )
    alpha: float = field(
        default=0.1,
        metadata={"help": "Step length of the simulated normalised harmful update w - alpha * g/||g||."},
    )

    @classmethod
    def search_space(cls) -> dict:
        """Around the paper: LoRA lr 1e-3-scale, lambda 5 and step size alpha 0.1 (its ablations vary both
        over about two orders of magnitude)."""
        return {
            **super().search_space(),
            "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
            "lamb": {"type": "float", "low": 0.5, "high": 50.0, "log": True},
            "alpha": {"type": "float", "low": 0.01, "high": 1.0, "log": True},
        }

    def __post_init__(self):
        check_non_negative(self, "lamb", "alpha")
        super().__post_init__()


class BoosterTrainer(ImmunizationTrainer):
    """``L_align(w) + lambda * (L_harm(w) - L_harm(w - alpha g/||g||))``, first-order, three passes."""

    _tag_names = ["immune-trainer", "booster"]
    _name = "Booster"
    _paper = BOOSTER_PAPER
    config_class = BoosterConfig

    def training_step(self, model, inputs, num_items_in_batch=None):
        args = self.args
        inputs, steps = self.begin_training_step(model, inputs)
        scale = 1.0 / steps
        params = [p for p in model.parameters() if p.requires_grad]
        harmful = self.side(inputs, "harmful")
        terms: dict[str, torch.Tensor] = {}

        # Pass 1: g = grad L_harm(w), turned in place into the weight step d = -alpha g/||g|| (the one extra
        # parameter-sized buffer of the method; g is recovered from d as g = d * (-||g|| / alpha)).
        with self.no_sync(model), self.compute_loss_context_manager():
            harm, _ = self.lm_loss(model, harmful)
            step = list(torch.autograd.grad(harm, params, allow_unused=True))
        terms["harmful"] = harm.detach()
        with torch.no_grad():
            gnorm = global_grad_norm(step)
            factor = -args.alpha / gnorm.clamp(min=1e-12)
            present = [i for i, d in enumerate(step) if d is not None]
            torch._foreach_mul_([step[i] for i in present], factor)
            # lambda * g, expressed on d, for the accumulated gradient.
            # alpha = 0 makes the attenuation L_harm(w) - L_harm(w) vanish: passes 1-2 then add nothing.
            attenuate = args.lamb > 0 and args.alpha > 0
            g_coef = -args.lamb * scale * gnorm / args.alpha if attenuate else None

        def settle(i: int) -> None:
            """Put parameter i back at w and add lambda * g to its gradient, then drop its d.

            Runs as soon as pass 2 has accumulated the parameter's gradient (a post-accumulate-grad hook),
            so d shrinks while the gradients of pass 2 grow: d and the gradient never coexist whole.
            """
            d, step[i] = step[i], None
            if d is None:
                return
            p = params[i]
            with torch.no_grad():
                p.sub_(d)
                if attenuate:
                    d.mul_(g_coef)
                    if p.grad is None:
                        p.grad = d
                    else:
                        p.grad.add_(d)

        # Pass 2: -lambda * grad L_harm(w - alpha g/||g||), accumulated locally; each parameter settled by
        # its hook. Parameters pass 2 did not reach (or every one, if it failed) are settled afterwards.
        with torch.no_grad():
            torch._foreach_add_([params[i] for i in present], [step[i] for i in present])
        handles = []
        try:
            if attenuate:
                handles = [
                    params[i].register_post_accumulate_grad_hook(lambda _, i=i: settle(i)) for i in present
                ]
            with self.no_sync(model), self.compute_loss_context_manager():
                harm_perturbed, _ = self.lm_loss(model, harmful)
                if attenuate:
                    self.accelerator.backward(-args.lamb * scale * harm_perturbed)
        finally:
            for handle in handles:
                handle.remove()
            for i in present:
                settle(i)
        terms["harmful_perturbed"] = harm_perturbed.detach()
        terms["attenuation"] = terms["harmful"] - terms["harmful_perturbed"]

        # Pass 3: grad L_align(w) through the synchronised backward, accumulated on top of the local
        # gradients of passes 1-2 (DDP all-reduces the accumulated .grad, as with any no_sync accumulation).
        with self.compute_loss_context_manager():
            retain = self.retain_terms(model, inputs)
            objective = self.weighted_retain(retain)
        terms.update(retain)
        loss_value = (objective if torch.is_tensor(objective) else harm.new_zeros(())) + args.lamb * terms[
            "attenuation"
        ]
        self.check_finite({**terms, "loss": loss_value})
        self.log_terms(terms, mode="train")
        if torch.is_tensor(objective) and objective.requires_grad:
            self.accelerator.backward(objective * scale)
        return (loss_value * scale).detach()
