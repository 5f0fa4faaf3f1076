"""Representation rerouting ("circuit breakers", Zou et al. 2024, arXiv 2406.04313).

A LoRA adapter is trained so that, at a few decoder layers, the representations of harmful examples
point away from the original model's (rerouting), while the representations of harmless inputs stay
where they were (retain)::

    L = c_rr(t) * mean_{l in T} mean_{tokens of harmful} ReLU(cos(h_l(theta), h_l(theta_orig)))
      + c_retain(t) * mean_{l = 0..max(T)+1} mean_{tokens of harmless / retain} ||h_l(theta) - h_l(theta_orig)||_2

As in the reference (GraySwanAI/circuit-breakers, ``lorra_circuit_breaker.py``):

- the rerouting mask is the attention mask of the whole harmful example, request AND response (the
  reference concatenates the two and masks only padding);
- the rerouting term reads the target layers ``T`` only; the retain term reads EVERY hidden state up to the
  last target layer: ``hidden_states[0]`` (the embeddings) to ``hidden_states[max(T) + 1]`` (the output of
  decoder layer ``max(T)``; the reference drops later layers from the model).

Departures, both about normalisation: the reference's retain loss is a ``nanmean`` over every position,
padding included (padding contributes 0 but counts in the denominator, so the value depends on how much a
batch is padded); here it is a mean over real tokens, per layer, averaged over layers. In the reference's
truncated model the last hidden state passes the final norm; here ``hidden_states[max(T) + 1]`` is the
decoder layer's own output unless ``max(T)`` is the last layer (then transformers applies the norm too).

``h_l(theta_orig)`` is the same model with its adapters disabled (peft's ``disable_adapter``), computed
under ``no_grad``: no second copy of the model is kept. The coefficients follow the reference training
loop (GraySwanAI/circuit-breakers): with progress ``p = step / (schedule_stretch * max_steps)``,
``c_rr = alpha * (1 - p)`` and ``c_retain = alpha * p`` (the reference divides the step by 300 for a
150-step run, hence ``schedule_stretch = 2``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..losses import rerouting_loss, retain_l2
from ..modeling import capture_outputs, find_decoder_structure, resolve_layer_indices
from ..trainer import ImmunizationConfig, ImmunizationTrainer

logger = logging.getLogger(__name__)

#: The reference's layers 10 and 20 of a 32-layer model, as fractions of depth.
REFERENCE_LAYER_FRACTIONS = (10 / 32, 20 / 32)


def default_target_layers(num_layers: int) -> list[int]:
    """The reference's target layers (hidden states 10 and 20 of 32, i.e. the outputs of decoder layers
    9 and 19, 0-based) mapped to a model with ``num_layers`` layers: 0-based decoder-layer indices."""
    layers = sorted(
        {max(0, min(num_layers - 1, round(f * num_layers) - 1)) for f in REFERENCE_LAYER_FRACTIONS}
    )
    return layers


@dataclass
class ReroutingConfig(ImmunizationConfig):
    r"""Configuration of :class:`ReroutingTrainer` (circuit breakers).

    Parameters:
        target_layers (`list[int]` or `None`, defaults to `None`):
            0-based indices of the decoder layers whose outputs are rerouted and retained. `None` maps the
            reference's layers 10 and 20 of 32 to the model's depth (about 1/3 and 2/3).
        alpha (`float`, defaults to `10.0`):
            Scale of the coefficient schedule (the reference's `lorra_alpha`).
        schedule_stretch (`float`, defaults to `2.0`):
            Progress is `step / (schedule_stretch * max_steps)`: with 2, training ends halfway through the
            schedule, as in the reference (step / 300 over 150 steps).
        lora_r (`int`, defaults to `16`), lora_alpha (`int`, defaults to `16`):
            The default LoRA adapter used when no `peft_config` is given and the model is not a peft model.
    """

    target_layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "0-based decoder layers to reroute and retain; None maps the reference's 10 and 20 of 32 "
            "to the model's depth."
        },
    )
    alpha: float = field(
        default=10.0, metadata={"help": "Scale of the coefficient schedule (the reference's lorra_alpha)."}
    )
    schedule_stretch: float = field(
        default=2.0,
        metadata={
            "help": "Progress = step / (schedule_stretch * max_steps); c_rr = alpha (1 - p), c_retain = alpha p."
        },
    )
    lora_r: int = field(default=16, metadata={"help": "Rank of the default LoRA (when no peft_config)."})
    lora_alpha: int = field(default=16, metadata={"help": "Alpha of the default LoRA (when no peft_config)."})
    learning_rate: float = field(
        default=1e-4, metadata={"help": "Learning rate of the adapter (reference: 1e-4)."}
    )

    @classmethod
    def search_space(cls) -> dict:
        """Around the circuit-breakers reference: LoRA r 16, lr 1e-4, 150 steps, lorra_alpha 10."""
        return {
            **super().search_space(),
            "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
            "max_steps": {"type": "int", "low": 50, "high": 300, "log": True},
            "alpha": {"type": "float", "low": 1.0, "high": 20.0, "log": True},
            "lora_r": {"type": "int", "low": 4, "high": 32, "log": True},
            "retain_weight": {"type": "float", "low": 0.1, "high": 10.0, "log": True},
        }

    def __post_init__(self):
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"alpha must be a finite positive number, got {self.alpha}.")
        if not math.isfinite(self.schedule_stretch) or self.schedule_stretch <= 0:
            raise ConfigError(f"schedule_stretch must be positive, got {self.schedule_stretch}.")
        if self.lora_r <= 0 or self.lora_alpha <= 0:
            raise ConfigError(
                f"lora_r and lora_alpha must be positive, got {self.lora_r}, {self.lora_alpha}."
            )
        if self.target_layers is not None and len(self.target_layers) == 0:
            raise ConfigError("target_layers must name at least one layer (or be None for the default).")
        super().__post_init__()


def _linear_names(layer: torch.nn.Module) -> list[str]:
    """Short names of the linear projections inside a decoder layer (nn.Linear, or GPT-2's Conv1D)."""
    names = set()
    for name, module in layer.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            names.add(name.rpartition(".")[2])
    if not names:
        raise ConfigError("No linear layer found in the decoder layers: pass peft_config=LoraConfig(...).")
    return sorted(names)


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and callable(getattr(model, "disable_adapter", None))


class ReroutingTrainer(ImmunizationTrainer):
    """Circuit breakers: reroute harmful representations (ReLU cosine to the original) with a LoRA, retain
    harmless ones (L2 to the original), on a schedule that moves weight from rerouting to retain.

    The model is trained through a LoRA adapter: pass ``peft_config`` or a peft model; otherwise a default
    ``LoraConfig(r=16, lora_alpha=16)`` on every linear projection of the decoder layers, restricted to the layers up to the
    last target layer is used (later layers cannot change the loss), and a log line says so.

    Cost per step: two forwards with gradient (harmful, harmless) plus two without (the original model on
    the same batches); the retain pair is skipped while its coefficient is 0 (the first step), the
    rerouting pair once its coefficient is 0. A retain set adds one more pair.
    """

    _tag_names = ["immune-trainer", "circuit-breakers", "representation-rerouting"]
    _name = "Representation rerouting (circuit breakers)"
    _paper = {
        "title": "Improving Alignment and Robustness with Circuit Breakers",
        "id": "2406.04313",
        "citation": (
            "@inproceedings{zou2024improving,\n"
            "  title={Improving Alignment and Robustness with Circuit Breakers},\n"
            "  author={Zou, Andy and Phan, Long and Wang, Justin and Duenas, Derek and Lin, Maxwell and "
            "Andriushchenko, Maksym and Kolter, J Zico and Fredrikson, Matt and Hendrycks, Dan},\n"
            "  booktitle={Advances in Neural Information Processing Systems},\n"
            "  year={2024}\n}"
        ),
    }
    config_class = ReroutingConfig

    def __init__(self, model=None, args: ReroutingConfig | None = None, *pos, peft_config=None, **kwargs):
        if args is not None and not isinstance(args, ReroutingConfig):
            raise ConfigError(f"ReroutingTrainer needs a ReroutingConfig, got {type(args).__name__}.")
        cfg = args or ReroutingConfig(output_dir="immunized_model", report_to="none")
        if model is not None and not isinstance(model, str) and peft_config is None and not _is_peft(model):
            structure = find_decoder_structure(model)
            layers = self._resolve_layers(cfg, structure.num_layers)
            from peft import LoraConfig

            peft_config = LoraConfig(
                r=cfg.lora_r,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=0.0,
                target_modules=_linear_names(structure.layers[0]),
                layers_to_transform=list(range(max(layers) + 1)),
                layers_pattern=structure.layers_path.rpartition(".")[2],
                task_type="CAUSAL_LM",
            )
            logger.info(
                "ReroutingTrainer: no peft_config given; using LoRA r=%d alpha=%d on all linear layers of "
                "decoder layers 0..%d.",
                cfg.lora_r,
                cfg.lora_alpha,
                max(layers),
            )
        super().__init__(model, cfg, *pos, peft_config=peft_config, **kwargs)
        if not _is_peft(self.model):
            raise ConfigError(
                "ReroutingTrainer trains a LoRA adapter and reads the original model with the adapter "
                "disabled: pass peft_config=LoraConfig(...) or a peft model."
            )
        if self.args.harmless_weight == 0 and self.retain_dataset is None:
            raise ConfigError(
                "ReroutingTrainer needs something to retain: keep harmless_weight > 0 (the harmful prompts "
                "with refusals) or pass a retain_dataset."
            )
        self._structure = find_decoder_structure(self.model)
        self.target_layers = self._resolve_layers(self.args, self._structure.num_layers)
        modules = [self._structure.layers[i] for i in self.target_layers]
        self._hooks, self._states = capture_outputs(modules)
        self._orig_hooks, self._orig_states = capture_outputs(modules, detach=True)

    @staticmethod
    def _resolve_layers(cfg, num_layers: int) -> list[int]:
        if cfg.target_layers is None:
            return default_target_layers(num_layers)
        return resolve_layer_indices(cfg.target_layers, num_layers, "target_layers")

    # ------------------------------------------------------------------ schedule

    def coefficients(self) -> tuple[float, float]:
        """``(c_rr, c_retain)`` at the current step."""
        horizon = self.args.schedule_stretch * max(1, self.state.max_steps or 1)
        progress = min(1.0, self.state.global_step / horizon)
        return self.args.alpha * (1.0 - progress), self.args.alpha * progress

    # ------------------------------------------------------------------ states

    def _original_states(self, batch) -> list[torch.Tensor]:
        peft_model = self.accelerator.unwrap_model(self.model)
        with torch.no_grad(), peft_model.disable_adapter(), self._orig_hooks:
            peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            return [self._orig_states[i] for i in range(len(self.target_layers))]

    def _adapted_states(self, model, batch) -> list[torch.Tensor]:
        with self._hooks:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            return [self._states[i] for i in range(len(self.target_layers))]

    def rerouting_term(self, model, batch) -> torch.Tensor:
        """Mean over target layers of ReLU(cos) between adapted and original states, over every real token of
        the harmful example (request and response, as the reference's attention mask)."""
        orig = self._original_states(batch)
        adapted = self._adapted_states(model, batch)
        mask = batch["attention_mask"].bool()
        return torch.stack([rerouting_loss(h, h0, mask) for h, h0 in zip(adapted, orig)]).mean()

    def _retain_hidden_states(self, model, batch) -> tuple[torch.Tensor, ...]:
        """``hidden_states[0 .. max(target_layers) + 1]``: the embeddings and every decoder layer's output up
        to the last target layer."""
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=True,
            use_cache=False,
        )
        return out.hidden_states[: max(self.target_layers) + 2]

    def retain_term(self, model, batch) -> torch.Tensor:
        """Mean over every hidden state up to the last target layer (embeddings included) of the per-token L2
        distance to the original model's, over all real tokens."""
        peft_model = self.accelerator.unwrap_model(self.model)
        with torch.no_grad(), peft_model.disable_adapter():
            orig = [h.detach() for h in self._retain_hidden_states(peft_model, batch)]
        adapted = self._retain_hidden_states(model, batch)
        mask = batch["attention_mask"].bool()
        return torch.stack([retain_l2(h, h0, mask) for h, h0 in zip(adapted, orig)]).mean()

    def compute_defense_loss(self, model, inputs):
        c_rr, c_retain = self.coefficients()
        terms: dict[str, torch.Tensor] = {}
        device = inputs["harmful_input_ids"].device
        total = torch.zeros((), device=device)
        if c_rr > 0:
            terms["rerouting"] = self.rerouting_term(model, self.side(inputs, "harmful"))
            total = total + c_rr * terms["rerouting"]
        if c_retain > 0:
            retains = []
            if self.args.harmless_weight > 0:
                retains.append(
                    self.args.harmless_weight * self.retain_term(model, self.side(inputs, "harmless"))
                )
            retain_batch = self._next_retain_batch()
            if retain_batch is not None and self.args.retain_weight > 0:
                retains.append(self.args.retain_weight * self.retain_term(model, retain_batch))
            if retains:
                terms["retain_l2"] = sum(retains)
                total = total + c_retain * terms["retain_l2"]
        terms["loss"] = total
        return terms
