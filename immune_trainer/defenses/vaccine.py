"""Vaccine: perturbation-aware alignment (Huang et al. 2024, arXiv 2402.01109), with the T-Vaccine option
(Liu et al. 2024, arXiv 2410.09760).

Two passes per step on the alignment data (the harmless side of each pair):

1. forward, ``g_l = dL/dh_l`` at every attention block's output ``h_l`` (no parameter gradient);
   ``eps_l = rho * g_l / ||g||_2`` with the norm over all layers together
   (:func:`immune_trainer.losses.perturbation_from_grads`);
2. forward again with ``h_l + eps_l`` added by hooks; the gradient of this loss updates the weights.

T-Vaccine (``layer_sampling=True``) perturbs only ``num_sampled_layers`` layers, drawn each step without
replacement with probability proportional to ``||g_l||``; the norm is then taken over the drawn layers.

The harmful side of the pairs is not used (Vaccine is an alignment-stage defense). A retain set, when
given, adds an unperturbed CE term in pass 2 (its batch shape differs from the perturbations').
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..losses import perturbation_from_grads
from ..modeling import HookManager, add_to_outputs, primary_tensor
from ..trainer import ImmunizationConfig, ImmunizationTrainer

VACCINE_PAPER = {
    "title": "Vaccine: Perturbation-aware alignment for large language models against harmful fine-tuning",
    "id": "2402.01109",
    "citation": (
        "@inproceedings{huang2024vaccine,\n"
        "  title={Vaccine: Perturbation-aware alignment for large language models against harmful "
        "fine-tuning attack},\n"
        "  author={Huang, Tiansheng and Hu, Sihao and Liu, Ling},\n"
        "  booktitle={Advances in Neural Information Processing Systems},\n"
        "  year={2024}\n}"
    ),
}


@dataclass
class VaccineConfig(ImmunizationConfig):
    r"""Configuration of :class:`VaccineTrainer`.

    Parameters:
        rho (`float` or `None`, defaults to `None`):
            Joint L2 norm of the hidden-state perturbations. ``None`` resolves to 2 (Vaccine) or 3
            (T-Vaccine, when ``layer_sampling``). The paper trains a LoRA (r=8) with lr 1e-3, batch 5.
        layer_sampling (`bool`, defaults to `False`):
            T-Vaccine: perturb only a subset of layers drawn each step with probability proportional to
            their gradient norm.
        num_sampled_layers (`int`, defaults to `8`):
            Number of layers T-Vaccine perturbs (capped at the model's depth).
    """

    rho: float | None = field(
        default=None,
        metadata={
            "help": "Joint L2 norm of the perturbations; None = 2 (Vaccine) or 3 (T-Vaccine). The paper "
            "uses a LoRA of rank 8 with learning rate 1e-3 and batch size 5."
        },
    )
    layer_sampling: bool = field(
        default=False,
        metadata={
            "help": "T-Vaccine: perturb only layers sampled with probability proportional to their "
            "gradient norm."
        },
    )
    num_sampled_layers: int = field(
        default=8, metadata={"help": "Number of layers T-Vaccine perturbs each step (capped at the depth)."}
    )

    @classmethod
    def search_space(cls) -> dict:
        """Around the papers: LoRA lr 1e-3; rho 2 (Vaccine) and 3 (T-Vaccine), whose ablations span 0.1..10
        (a larger rho hurts the alignment loss); T-Vaccine samples 8 layers."""
        return {
            **super().search_space(),
            "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
            "rho": {"type": "float", "low": 0.1, "high": 10.0, "log": True},
            "num_sampled_layers": {"type": "int", "low": 2, "high": 16, "log": False},
        }

    def __post_init__(self):
        if self.rho is None:
            self.rho = 3.0 if self.layer_sampling else 2.0
        if not math.isfinite(self.rho) or self.rho < 0:
            raise ConfigError(f"rho must be a finite non-negative number, got {self.rho}.")
        if self.num_sampled_layers < 1:
            raise ConfigError(f"num_sampled_layers must be >= 1, got {self.num_sampled_layers}.")
        super().__post_init__()


def _no_sync(model):
    """DDP's ``no_sync`` for the auxiliary passes (a null context for an unwrapped model)."""
    return model.no_sync() if callable(getattr(model, "no_sync", None)) else contextlib.nullcontext()


def _ga_steps(trainer) -> int:
    """The Trainer's current accumulation steps (1 when training_step is called outside ``train()``)."""
    return getattr(trainer, "current_gradient_accumulation_steps", 1)


class VaccineTrainer(ImmunizationTrainer):
    """Alignment loss under the worst-case hidden-state perturbation of norm ``rho`` (two passes)."""

    _tag_names = ["immune-trainer", "vaccine"]
    _name = "Vaccine"
    _paper = VACCINE_PAPER
    config_class = VaccineConfig

    def _alignment_loss(self, model, inputs):
        loss, _ = self.lm_loss(model, self.side(inputs, "harmless"))
        return loss

    def compute_perturbation(self, model, inputs) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Pass 1: ``({layer: eps_l}, alignment loss)`` for a prepared paired batch.

        No parameter gradient is produced (``torch.autograd.grad`` w.r.t. the attention outputs only).
        """
        attention = self.decoder_structure(model).attention
        store: dict[int, torch.Tensor] = {}
        hooks = HookManager()
        for idx, module in enumerate(attention):

            def hook(_module, _args, output, idx=idx):
                hidden = primary_tensor(output)
                if not hidden.requires_grad:  # e.g. LoRA only on later blocks: still differentiate here.
                    hidden.requires_grad_(True)
                store[idx] = hidden

            hooks.add_hook(module, hook)
        with _no_sync(model), hooks, self.compute_loss_context_manager():
            loss = self._alignment_loss(model, inputs)
            order = sorted(store)
            grads = torch.autograd.grad(loss, [store[i] for i in order], allow_unused=True)
        grads = [torch.zeros_like(store[i]) if g is None else g for i, g in zip(order, grads)]
        if self.args.layer_sampling:
            norms = torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
            k = min(self.args.num_sampled_layers, len(grads))
            weights = norms + 1e-12  # all-zero gradients: uniform draw, no error
            chosen = torch.multinomial(weights, k, replacement=False).tolist()
            order = [order[i] for i in sorted(chosen)]
            grads = [grads[i] for i in sorted(chosen)]
        eps = perturbation_from_grads(grads, self.args.rho)
        return dict(zip(order, eps)), loss.detach()

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        retain = self._next_retain_batch() if self.args.retain_weight > 0 else None
        eps, clean = self.compute_perturbation(model, inputs)

        attention = self.decoder_structure(model).attention
        terms: dict[str, torch.Tensor] = {"harmless_clean": clean}
        with self.compute_loss_context_manager():
            with add_to_outputs(attention, eps):
                perturbed = self._alignment_loss(model, inputs)
            terms["harmless"] = perturbed
            loss = self.args.harmless_weight * perturbed
            if retain is not None:
                terms["retain"], _ = self.lm_loss(model, retain)
                loss = loss + self.args.retain_weight * terms["retain"]
        self.check_finite({**terms, "loss": loss})
        self.log_terms(terms, mode="train")
        if self.args.n_gpu > 1:
            loss = loss.mean()
        loss = loss / _ga_steps(self)
        self.accelerator.backward(loss)
        return loss.detach()
