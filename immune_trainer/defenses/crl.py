"""Contrastive representation learning (CRL, "triplet"; Simko et al., EMNLP 2025, arXiv 2506.11938).

A LoRA adapter is trained with two triplet losses on response-token hidden states of the upper decoder
layers, and a KL term keeping the benign output distribution on the original model's. With ``d`` the
cosine distance ``d(x, y) = 1 - <x/||x||, y/||y||>`` (margins apply after L2 normalisation, so
``d`` is in ``[0, 2]``), ``h'`` the adapted model's and ``h`` the original model's hidden state at a
representation layer ``l``, and ``mu_l`` the harmful centroid (the mean of the ADAPTED model's harmful
response-token states at layer ``l`` over the batch, with gradient, as in the reference)::

    L_harm   = mean_{l, harmful response tokens} ReLU(d(h'_h, mu_l) - d(h'_h, h_h) + margin_harmful)
    L_benign = mean_{l, benign response tokens}  ReLU(d(h'_b, h_b) - d(h'_b, mu_l) + margin_benign)
    KL       = mean_{benign real tokens} KL(p_orig || p_adapted)        (summed over the vocabulary)

    L = beta * L_harm + sum_{benign sources s} w_s * (alpha * L_benign(s) + gamma * KL(s))

The harmful anchor is pushed away from its original representation and toward the harmful cluster's
centre; benign representations stay where they were and away from that centre.

Formula and defaults from TamperBench's ``defenses/crl`` (``trainer.py``, ``config.py``, ``model.py``):
alpha 0.5, beta 0.4, gamma 0.9; margins 0.3 (benign) and 0.5 (harmful), TamperBench's values for
cosine distance (the paper's 500 / 1500 are for unnormalised L2); representation layers hidden states 20..31
of a 32-layer model (the outputs of decoder layers 19..30), mapped here to the model's depth; LoRA r 16,
alpha 16, dropout 0.05 on every linear projection of EVERY decoder layer (the KL term reads the logits, so
no layer is left out); lr 1e-5. The reference trains 1100 steps of batch 16 with gradient clipping at 1.0:
set ``max_steps`` and ``per_device_train_batch_size`` for that budget (``max_grad_norm`` is 1.0 already).

Departures from the reference:

- benign sources: the reference's benign set is one chat data set (UltraChat). Here the benign terms are
  taken on the retain set (weight ``retain_weight``) when one is given AND on the harmless side of each pair
  (the harmful prompt with a refusal; weight ``harmless_weight``, 0 turns it off), as the library's other
  retain terms are; with the default weights of 1 the two sources add up.
- the reference runs six forwards per step (hidden states and logits separately); here each side is one
  forward of the adapted and one of the original model (four per step, two more with a retain set), the
  layer outputs read by hooks during that forward. The original model is the same model with its adapter
  disabled (peft's ``disable_adapter``, under ``no_grad``), not a second copy. Same values.
- the reference's fp16 autocast and its own loop (checkpoints, data cycling) are the Trainer's business
  here (``bf16``/``fp16`` arguments); adversarial hard-negative mining (paper Section 4.2) is not
  implemented, as in the reference.
- without a response mask the reference falls back to all real tokens with a warning; here every paired
  or retain batch has response labels, so the mask is always ``labels != -100``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..modeling import capture_outputs, find_decoder_structure, resolve_layer_indices
from ..trainer import ImmunizationConfig, ImmunizationTrainer, check_non_negative
from .rerouting import _is_peft, _linear_names

logger = logging.getLogger(__name__)

#: The reference's hidden states 20..31 of a 32-layer model (decoder-layer outputs 19..30) as fractions.
REFERENCE_FIRST, REFERENCE_LAST = 20 / 32, 31 / 32

CRL_PAPER = {
    "title": "Improving Large Language Model Safety with Contrastive Representation Learning",
    "id": "2506.11938",
    "citation": (
        "@inproceedings{simko2025improving,\n"
        "  title={Improving Large Language Model Safety with Contrastive Representation Learning},\n"
        '  author={Simko, Samuel and Sachan, Mrinmaya and Sch{\\"o}lkopf, Bernhard and Jin, Zhijing},\n'
        "  booktitle={Proceedings of the 2025 Conference on Empirical Methods in Natural Language Processing},\n"
        "  year={2025}\n}"
    ),
}


def default_representation_layers(num_layers: int) -> list[int]:
    """The reference's layers (hidden states 20..31 of 32: outputs of decoder layers 19..30, 0-based) mapped
    to ``num_layers``: from ``round(20/32 L) - 1`` to ``round(31/32 L) - 1``, the last layer left out as in
    the reference (when the model has more than one)."""
    first = max(0, math.floor(REFERENCE_FIRST * num_layers + 0.5) - 1)
    last = math.floor(REFERENCE_LAST * num_layers + 0.5) - 1
    if num_layers > 1:
        last = min(last, num_layers - 2)
    last = max(first, min(last, num_layers - 1))
    return list(range(first, last + 1))


def cosine_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``1 - cos(x, y)`` over the last dimension, both L2-normalised first."""
    return 1.0 - (F.normalize(x, dim=-1) * F.normalize(y, dim=-1)).sum(-1)


def crl_triplet_losses(
    harmful_new: torch.Tensor,
    harmful_orig: torch.Tensor,
    benign_new: torch.Tensor | None,
    benign_orig: torch.Tensor | None,
    margin_harmful: float,
    margin_benign: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The two triplet losses at ONE layer, on response tokens already selected: ``(L_harm, L_benign)``.

    ``harmful_*``: ``(n_harmful_tokens, hidden)``; ``benign_*``: ``(n_benign_tokens, hidden)`` or ``None``.
    The centroid is the mean of ``harmful_new`` (with gradient)."""
    centroid = harmful_new.mean(0, keepdim=True)
    harm = F.relu(
        cosine_distance(harmful_new, centroid) - cosine_distance(harmful_new, harmful_orig) + margin_harmful
    ).mean()
    if benign_new is None:
        return harm, None
    benign = F.relu(
        cosine_distance(benign_new, benign_orig) - cosine_distance(benign_new, centroid) + margin_benign
    ).mean()
    return harm, benign


def masked_kl(new_logits: torch.Tensor, orig_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``KL(p_orig || p_new)`` summed over the vocabulary, averaged over the tokens where ``mask`` is true."""
    new = F.log_softmax(new_logits[mask].float(), dim=-1)
    orig = F.log_softmax(orig_logits[mask].float(), dim=-1)
    return F.kl_div(new, orig, reduction="batchmean", log_target=True)


@dataclass
class CRLConfig(ImmunizationConfig):
    r"""Configuration of :class:`CRLTrainer` (defaults from TamperBench's ``defenses/crl``).

    Parameters:
        alpha (`float`, defaults to `0.5`):
            Weight of the benign triplet loss.
        beta (`float`, defaults to `0.4`):
            Weight of the harmful triplet loss.
        gamma (`float`, defaults to `0.9`):
            Weight of the KL divergence to the original model on benign data.
        margin_benign (`float`, defaults to `0.3`), margin_harmful (`float`, defaults to `0.5`):
            Triplet margins, in cosine distance (in [0, 2]).
        representation_layers (`list[int]` or `None`, defaults to `None`):
            0-based decoder layers whose outputs the triplet losses read. `None` maps the reference's
            hidden states 20..31 of 32 to the model's depth.
        lora_r (`int`, defaults to `16`), lora_alpha (`int`, defaults to `16`), lora_dropout (`float`,
        defaults to `0.05`):
            The default LoRA (every linear projection of every decoder layer) when no `peft_config` is given.
    """

    alpha: float = field(default=0.5, metadata={"help": "Weight of the benign triplet loss (reference 0.5)."})
    beta: float = field(default=0.4, metadata={"help": "Weight of the harmful triplet loss (reference 0.4)."})
    gamma: float = field(
        default=0.9,
        metadata={"help": "Weight of the KL to the original model on benign data (reference 0.9)."},
    )
    margin_benign: float = field(
        default=0.3,
        metadata={"help": "Benign triplet margin in cosine distance, in [0, 2] (reference 0.3)."},
    )
    margin_harmful: float = field(
        default=0.5,
        metadata={"help": "Harmful triplet margin in cosine distance, in [0, 2] (reference 0.5)."},
    )
    representation_layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "0-based decoder layers whose outputs the triplet losses read; None maps the reference's "
            "hidden states 20..31 of 32 to the model's depth."
        },
    )
    lora_r: int = field(default=16, metadata={"help": "Rank of the default LoRA (when no peft_config)."})
    lora_alpha: int = field(default=16, metadata={"help": "Alpha of the default LoRA (when no peft_config)."})
    lora_dropout: float = field(
        default=0.05, metadata={"help": "Dropout of the default LoRA (when no peft_config)."}
    )
    learning_rate: float = field(
        default=1e-5, metadata={"help": "Learning rate of the adapter (reference: 1e-5)."}
    )

    @classmethod
    def search_space(cls) -> dict:
        """Around the reference: lr 1e-5, 1100 steps, weights 0.5 / 0.4 / 0.9, margins 0.3 / 0.5."""
        return {
            **super().search_space(),
            "learning_rate": {"type": "float", "low": 3e-6, "high": 1e-4, "log": True},
            "max_steps": {"type": "int", "low": 100, "high": 2000, "log": True},
            "beta": {"type": "float", "low": 0.1, "high": 2.0, "log": True},
            "gamma": {"type": "float", "low": 0.1, "high": 5.0, "log": True},
            "margin_harmful": {"type": "float", "low": 0.1, "high": 1.5},
        }

    def __post_init__(self):
        check_non_negative(self, "alpha", "beta", "gamma")
        if self.beta == 0:
            raise ConfigError("beta must be positive: the harmful triplet loss is the defense.")
        for name in ("margin_benign", "margin_harmful"):
            value = getattr(self, name)
            if not math.isfinite(value) or not 0 <= value <= 2:
                raise ConfigError(
                    f"{name} must be in [0, 2] (a cosine-distance margin after L2 normalisation), got {value}."
                )
        if self.lora_r <= 0 or self.lora_alpha <= 0:
            raise ConfigError(
                f"lora_r and lora_alpha must be positive, got {self.lora_r}, {self.lora_alpha}."
            )
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if self.representation_layers is not None and len(self.representation_layers) == 0:
            raise ConfigError(
                "representation_layers must name at least one layer (or be None for the default)."
            )
        super().__post_init__()


class CRLTrainer(ImmunizationTrainer):
    """CRL: a LoRA trained with triplet losses on response-token hidden states (harmful states pushed away
    from the original model's and toward the harmful centroid, benign ones kept in place and away from it)
    plus a KL to the original model on benign data.

    The model is trained through a LoRA adapter: pass ``peft_config`` or a peft model; otherwise a default
    ``LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05)`` on every linear projection of every decoder
    layer is used, and a log line says so.

    Cost per step: for the harmful side and each benign source, one forward with gradient and one without
    (the original model, adapter disabled).
    """

    _tag_names = ["immune-trainer", "crl", "contrastive-representation-learning", "triplet"]
    _name = "Contrastive representation learning (CRL, triplet)"
    _paper = CRL_PAPER
    config_class = CRLConfig

    def __init__(self, model=None, args: CRLConfig | None = None, *pos, peft_config=None, **kwargs):
        if args is not None and not isinstance(args, CRLConfig):
            raise ConfigError(f"CRLTrainer needs a CRLConfig, got {type(args).__name__}.")
        cfg = args or CRLConfig(output_dir="immunized_model", report_to="none")
        if model is not None and not isinstance(model, str) and peft_config is None and not _is_peft(model):
            structure = find_decoder_structure(model)
            self._resolve_layers(cfg, structure.num_layers)  # fail early on bad layers
            from peft import LoraConfig

            peft_config = LoraConfig(
                r=cfg.lora_r,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout,
                target_modules=_linear_names(structure.layers[0]),
                layers_pattern=structure.layers_path.rpartition(".")[2],
                layers_to_transform=list(range(structure.num_layers)),
                task_type="CAUSAL_LM",
            )
            logger.info(
                "CRLTrainer: no peft_config given; using LoRA r=%d alpha=%d dropout=%g on all linear layers "
                "of every decoder layer.",
                cfg.lora_r,
                cfg.lora_alpha,
                cfg.lora_dropout,
            )
        super().__init__(model, cfg, *pos, peft_config=peft_config, **kwargs)
        if not _is_peft(self.model):
            raise ConfigError(
                "CRLTrainer trains a LoRA adapter and reads the original model with the adapter disabled: "
                "pass peft_config=LoraConfig(...) or a peft model."
            )
        if self.args.harmless_weight == 0 and (self.retain_dataset is None or self.args.retain_weight == 0):
            raise ConfigError(
                "CRLTrainer needs benign data for its benign triplet and KL terms: keep harmless_weight > 0 "
                "(the harmful prompts with refusals) or pass a retain_dataset with retain_weight > 0."
            )
        self._structure = find_decoder_structure(self.model)
        self.representation_layers = self._resolve_layers(self.args, self._structure.num_layers)
        modules = [self._structure.layers[i] for i in self.representation_layers]
        self._hooks, self._states = capture_outputs(modules)
        self._orig_hooks, self._orig_states = capture_outputs(modules, detach=True)

    @staticmethod
    def _resolve_layers(cfg, num_layers: int) -> list[int]:
        if cfg.representation_layers is None:
            return default_representation_layers(num_layers)
        return resolve_layer_indices(cfg.representation_layers, num_layers, "representation_layers")

    # ------------------------------------------------------------------ forwards

    def forward_states(self, model, batch, original: bool):
        """One forward of the adapted (``original=False``, with gradient) or original model (adapter
        disabled, no gradient): ``(logits, [output of each representation layer])``."""
        kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        n = len(self.representation_layers)
        if original:
            peft_model = self.accelerator.unwrap_model(self.model)
            with torch.no_grad(), peft_model.disable_adapter(), self._orig_hooks:
                logits = peft_model(**kwargs).logits
                return logits, [self._orig_states[i] for i in range(n)]
        with self._hooks:
            logits = model(**kwargs).logits
            return logits, [self._states[i] for i in range(n)]

    def compute_defense_loss(self, model, inputs):
        harmful = self.side(inputs, "harmful")
        harm_mask = harmful["labels"] != -100
        _, harm_orig = self.forward_states(model, harmful, original=True)
        _, harm_new = self.forward_states(model, harmful, original=False)
        harm_new = [h[harm_mask] for h in harm_new]
        harm_orig = [h[harm_mask] for h in harm_orig]

        sources = []
        if self.args.harmless_weight > 0:
            sources.append((self.args.harmless_weight, self.side(inputs, "harmless")))
        retain_batch = self._next_retain_batch()
        if retain_batch is not None and self.args.retain_weight > 0:
            sources.append((self.args.retain_weight, retain_batch))

        harm_terms = [
            crl_triplet_losses(h, h0, None, None, self.args.margin_harmful, 0.0)[0]
            for h, h0 in zip(harm_new, harm_orig)
        ]
        triplet_harmful = torch.stack(harm_terms).mean()
        triplet_benign = torch.zeros((), device=triplet_harmful.device)
        kl = torch.zeros((), device=triplet_harmful.device)
        for weight, batch in sources:
            mask = batch["labels"] != -100
            orig_logits, ben_orig = self.forward_states(model, batch, original=True)
            new_logits, ben_new = self.forward_states(model, batch, original=False)
            benign_terms = [
                crl_triplet_losses(
                    h, h0, b[mask], b0[mask], self.args.margin_harmful, self.args.margin_benign
                )[1]
                for h, h0, b, b0 in zip(harm_new, harm_orig, ben_new, ben_orig)
            ]
            triplet_benign = triplet_benign + weight * torch.stack(benign_terms).mean()
            kl = kl + weight * masked_kl(new_logits, orig_logits, batch["attention_mask"].bool())

        total = self.args.beta * triplet_harmful + self.args.alpha * triplet_benign + self.args.gamma * kl
        return {"triplet_harmful": triplet_harmful, "triplet_benign": triplet_benign, "kl": kl, "loss": total}
