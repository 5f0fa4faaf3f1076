"""Booster: attenuating harmful perturbation (Huang et al. 2024, arXiv 2409.01586).

Booster minimises ``L_align(w) + lambda * (L_harm(w) - L_harm(w - alpha * g / ||g||))`` with
``g = grad L_harm(w)`` held constant (the paper's first-order update): the harmful loss should drop as
little as possible after one normalised harmful gradient step. Three passes per step:

1. harmful forward at ``w``: ``g = grad L_harm(w)`` (``torch.autograd.grad``; nothing written to ``.grad``);
2. move the trainable weights to ``w - alpha g/||g||``, harmful forward, backward ``-lambda * L_harm``,
   move back;
3. alignment forward at ``w`` (harmless side + retain set), backward ``L_align + lambda * <w, g>``: the
   linear surrogate ``<w, sg(g)>`` adds ``lambda * g`` to the gradient without a fourth forward, through
   the same synchronised backward (so DDP all-reduces every part of the update).

L_align is the harmless CE of the pairs (the alignment data) plus the benign retain CE when given; the
harmful side of each pair is Booster's harmful dataset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..losses import global_grad_norm
from ..trainer import ImmunizationConfig, ImmunizationTrainer
from .vaccine import _ga_steps, _no_sync

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
        for name in ("lamb", "alpha"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite non-negative number, got {value}.")
        super().__post_init__()


class BoosterTrainer(ImmunizationTrainer):
    """``L_align(w) + lambda * (L_harm(w) - L_harm(w - alpha g/||g||))``, first-order, three passes."""

    _tag_names = ["immune-trainer", "booster"]
    _name = "Booster"
    _paper = BOOSTER_PAPER
    config_class = BoosterConfig

    def training_step(self, model, inputs, num_items_in_batch=None):
        args = self.args
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        scale = 1.0 / _ga_steps(self)
        params = [p for p in model.parameters() if p.requires_grad]
        harmful = self.side(inputs, "harmful")
        terms: dict[str, torch.Tensor] = {}

        # Pass 1: g = grad L_harm(w), turned in place into the weight step d = -alpha g/||g|| (so only one
        # parameter-sized buffer is kept: g is recovered from d below).
        with _no_sync(model), self.compute_loss_context_manager():
            harm, _ = self.lm_loss(model, harmful)
            step = list(torch.autograd.grad(harm, params, allow_unused=True))
        terms["harmful"] = harm.detach()
        with torch.no_grad():
            gnorm = global_grad_norm(step)
            factor = -args.alpha / gnorm.clamp(min=1e-12)
            for d in step:
                if d is not None:
                    d.mul_(factor)

        # Pass 2: -lambda * grad L_harm(w - alpha g/||g||), accumulated locally.
        with torch.no_grad():
            for p, d in zip(params, step):
                if d is not None:
                    p.add_(d)
        try:
            with _no_sync(model), self.compute_loss_context_manager():
                harm_perturbed, _ = self.lm_loss(model, harmful)
                if args.lamb > 0:
                    self.accelerator.backward(-args.lamb * scale * harm_perturbed)
        finally:
            with torch.no_grad():
                for p, d in zip(params, step):
                    if d is not None:
                        p.sub_(d)
        terms["harmful_perturbed"] = harm_perturbed.detach()
        terms["attenuation"] = terms["harmful"] - terms["harmful_perturbed"]

        # Pass 3: grad L_align(w) + lambda * g through one synchronised backward; g = d * (-||g|| / alpha),
        # added through the linear surrogate <w, sg(d)> whose gradient is d.
        with self.compute_loss_context_manager():
            retain = self.retain_terms(model, inputs)
            align = self.weighted_retain(retain)
            surrogate = sum((p * d).sum() for p, d in zip(params, step) if d is not None)
            g_scale = -gnorm.detach() / args.alpha if args.alpha > 0 else 0.0
            objective = align + args.lamb * g_scale * (surrogate - surrogate.detach())
        terms.update(retain)
        loss_value = (align if torch.is_tensor(align) else harm.new_zeros(())) + args.lamb * terms[
            "attenuation"
        ]
        self.check_finite({**terms, "loss": loss_value})
        self.log_terms(terms, mode="train")
        if torch.is_tensor(objective) and objective.requires_grad:
            self.accelerator.backward(objective * scale)
        return (loss_value * scale).detach()
