"""Vaccine: perturbation-aware alignment (Huang et al. 2024, arXiv 2402.01109), with the T-Vaccine option
(Liu et al. 2024, arXiv 2410.09760).

Two passes per step on the alignment data (the harmless side of each pair):

1. forward, ``g_l = dL/dh_l`` at every attention block's output ``h_l`` (no parameter gradient);
   ``eps_l = rho * g_l / ||g||_2`` with the norm over all layers together
   (:func:`immune_trainer.losses.perturbation_from_grads`);
2. forward again with ``h_l + eps_l`` added by hooks; the gradient of this loss updates the weights.

T-Vaccine (``layer_sampling=True``, Lslland/T-Vaccine ``trainer.py``) works on a subset of safety-critical
layers:

- every ``probability_refresh_steps`` steps (reference: 200) the layer probabilities are measured on the
  HARMFUL side of the batch: ``p_l = ||dL_harm/dh_l|| / sum_j ||dL_harm/dh_j||`` at each attention output;
- every ``resample_steps`` steps (reference: 20) ``num_sampled_layers`` layers are drawn without replacement
  with probabilities ``p``; until the next draw only they are perturbed (the norm of ``eps`` is taken over
  them), and the ATTENTION blocks of the other layers are frozen (``requires_grad=False``, so the optimizer
  leaves them untouched). Everything else keeps training: the MLPs (and norms) of every layer, drawn or not,
  and the parameters outside the decoder layers (embeddings, head). This is the reference's rule: its
  ``unfreeze_activate_layers`` freezes the parameters inside the attention modules of the undrawn layers and
  re-enables the LoRA of the drawn ones, while its LoRA also sits on ``gate_proj``/``up_proj``/``down_proj``,
  whose adapters train at every step. Under full fine-tuning the same rule freezes the undrawn attention
  blocks' weights. Under DDP set ``ddp_find_unused_parameters=True`` (frozen blocks produce no gradient).
  Departure: on models deeper than 26 layers the reference also passes the layer before each drawn one to its
  patched modeling files; that is not reproduced.

The harmful side of the pairs is not used (Vaccine is an alignment-stage defense). A retain set, when
given, adds an unperturbed CE term in pass 2 (its batch shape differs from the perturbations').
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..losses import perturbation_from_grads
from ..modeling import HookManager, add_to_outputs, primary_tensor
from ..trainer import ImmunizationConfig, ImmunizationTrainer, check_non_negative

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
            Number of layers T-Vaccine perturbs and whose attention blocks train (capped at the depth).
        probability_refresh_steps (`int`, defaults to `200`):
            T-Vaccine: re-measure the layer probabilities (gradient norms on a harmful batch) every N steps.
        resample_steps (`int`, defaults to `20`):
            T-Vaccine: draw a new set of layers every N steps; the attention blocks of the others stay frozen
            until then (their MLPs keep training, as in the reference).
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
        default=8,
        metadata={
            "help": "Number of layers T-Vaccine perturbs and whose attention blocks train between draws (capped "
            "at the depth)."
        },
    )
    probability_refresh_steps: int = field(
        default=200,
        metadata={
            "help": "T-Vaccine: re-measure the layer probabilities (gradient norms on a harmful batch) every N "
            "steps (reference: 200)."
        },
    )
    resample_steps: int = field(
        default=20,
        metadata={
            "help": "T-Vaccine: draw a new set of layers every N steps; the undrawn layers' attention blocks stay "
            "frozen until the next draw, their MLPs keep training (reference: 20)."
        },
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
        check_non_negative(self, "rho")
        if self.num_sampled_layers < 1:
            raise ConfigError(f"num_sampled_layers must be >= 1, got {self.num_sampled_layers}.")
        for name in ("probability_refresh_steps", "resample_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
        super().__post_init__()


class VaccineTrainer(ImmunizationTrainer):
    """Alignment loss under the worst-case hidden-state perturbation of norm ``rho`` (two passes)."""

    _tag_names = ["immune-trainer", "vaccine"]
    _name = "Vaccine"
    _paper = VACCINE_PAPER
    config_class = VaccineConfig

    def _alignment_loss(self, model, inputs):
        loss, _ = self.lm_loss(model, self.side(inputs, "harmless"))
        return loss

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        #: T-Vaccine state: the layer probabilities, the drawn layers, and when each was last updated.
        self.layer_probabilities: torch.Tensor | None = None
        self.active_layers: list[int] | None = None
        self.probability_refreshes: list[int] = []
        self.layer_draws: list[tuple[int, list[int]]] = []
        self._trainable_ids: set[int] | None = None

    def train(self, *args, **kwargs):
        """``Trainer.train``; T-Vaccine's frozen layers get their trainability back when training ends."""
        try:
            return super().train(*args, **kwargs)
        finally:
            if self._trainable_ids is not None:
                for param in self.model.parameters():
                    if id(param) in self._trainable_ids:
                        param.requires_grad_(True)
                self._trainable_ids = None
                self.layer_probabilities, self.active_layers = None, None

    def _attention_output_grads(
        self, model, batch, layers: list[int] | None = None
    ) -> dict[int, torch.Tensor]:
        """``{l: dL/dh_l}`` at the attention outputs of ``layers`` (all when None) for the LM loss of ``batch``;
        no parameter gradient is produced."""
        attention = self.decoder_structure(model).attention
        wanted = set(range(len(attention)) if layers is None else layers)
        store: dict[int, torch.Tensor] = {}
        hooks = HookManager()
        for idx, module in enumerate(attention):
            if idx not in wanted:
                continue

            def hook(_module, _args, output, idx=idx):
                hidden = primary_tensor(output)
                if not hidden.requires_grad:  # e.g. LoRA only on later blocks: still differentiate here.
                    hidden.requires_grad_(True)
                store[idx] = hidden

            hooks.add_hook(module, hook)
        with self.no_sync(model), hooks, self.compute_loss_context_manager():
            loss, _ = self.lm_loss(model, batch)
            order = sorted(store)
            grads = torch.autograd.grad(loss, [store[i] for i in order], allow_unused=True)
        self._last_loss = loss.detach()
        return {i: torch.zeros_like(store[i]) if g is None else g for i, g in zip(order, grads)}

    def compute_layer_probabilities(self, model, harmful_batch) -> torch.Tensor:
        """T-Vaccine's layer probabilities: ``||dL/dh_l|| / sum_j ||dL/dh_j||`` at every attention output for
        the LM loss of a harmful batch (averaged over processes)."""
        grads = self._attention_output_grads(model, harmful_batch)
        norms = torch.stack([torch.linalg.vector_norm(grads[i].float()) for i in sorted(grads)])
        norms = self.accelerator.reduce(norms, reduction="mean")
        if not torch.isfinite(norms).all() or float(norms.sum()) <= 0:  # no signal: a uniform draw
            return torch.full_like(norms, 1.0 / len(norms))
        return norms / norms.sum()

    def _draw_layers(self, probabilities: torch.Tensor) -> list[int]:
        # Seeded by (seed, step) so every process draws the same layers.
        generator = torch.Generator().manual_seed(self.args.seed * 1_000_003 + self.state.global_step)
        k = min(self.args.num_sampled_layers, len(probabilities))
        return sorted(
            torch.multinomial(probabilities.cpu(), k, replacement=False, generator=generator).tolist()
        )

    def _freeze_undrawn(self, model) -> None:
        """Freeze the attention blocks of the undrawn layers until the next draw (the reference's rule): the
        drawn layers' attention blocks get back the trainability they had; MLPs, norms, embeddings and head
        are left as they are."""
        attention = self.decoder_structure(model).attention
        if self._trainable_ids is None:
            self._trainable_ids = {id(p) for p in model.parameters() if p.requires_grad}
        for idx, block in enumerate(attention):
            for param in block.parameters():
                param.requires_grad_(idx in self.active_layers and id(param) in self._trainable_ids)

    def update_layer_sampling(self, model, inputs) -> None:
        """T-Vaccine's schedule: refresh the probabilities every ``probability_refresh_steps`` steps (on the
        harmful side of ``inputs``), draw layers every ``resample_steps`` steps, freeze the others. Called
        once per optimizer step (the first micro-batch of each step)."""
        step = self.state.global_step
        if self.layer_probabilities is None or (
            step % self.args.probability_refresh_steps == 0 and self.probability_refreshes[-1] != step
        ):
            self.layer_probabilities = self.compute_layer_probabilities(model, self.side(inputs, "harmful"))
            self.probability_refreshes.append(step)
        if self.active_layers is None or (
            step % self.args.resample_steps == 0 and self.layer_draws[-1][0] != step
        ):
            self.active_layers = self._draw_layers(self.layer_probabilities)
            self.layer_draws.append((step, self.active_layers))
            self._freeze_undrawn(model)

    def compute_perturbation(self, model, inputs) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Pass 1: ``({layer: eps_l}, alignment loss)`` for a prepared paired batch.

        Vaccine perturbs every layer; T-Vaccine only the drawn layers (``active_layers``, all layers before the
        first draw), the norm taken over them. No parameter gradient is produced.
        """
        layers = self.active_layers if self.args.layer_sampling else None
        grads = self._attention_output_grads(model, self.side(inputs, "harmless"), layers)
        order = sorted(grads)
        eps = perturbation_from_grads([grads[i] for i in order], self.args.rho)
        return dict(zip(order, eps)), self._last_loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        inputs, steps = self.begin_training_step(model, inputs)
        retain = self._next_retain_batch() if self.args.retain_weight > 0 else None
        if self.args.layer_sampling:
            self.update_layer_sampling(model, inputs)
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
        loss = loss / steps
        self.accelerator.backward(loss)
        return loss.detach()
