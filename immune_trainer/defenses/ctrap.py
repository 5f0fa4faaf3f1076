"""CTRAP: an embedded collapse trap (Yi, Huang et al. 2025, "CTRAP: Embedding Collapse Trap to Safeguard
Large Language Models from Harmful Fine-Tuning", arXiv 2505.16559).

Instead of unlearning harmful knowledge selectively, CTRAP makes the model collapse (lose its language
modelling altogether) when it is fine-tuned persistently on harmful data, and stay as it is under benign
fine-tuning. Collapse means predicting one fixed token ``e`` whatever the context::

    L_collapse(theta; D) = E_(x, y)~D [ -1/|y| sum_t log p_theta(e | x, y_<t) ]

and the trap is set during alignment by asking that the collapse loss be LOW after a simulated harmful
update, while the unperturbed model keeps its alignment and utility::

    L(theta) = L_align(theta) + lambda * L_collapse(theta - alpha * g / ||g||; D),   g = grad L_harm(theta)

with ``L_align`` the CE of the refusals to the harmful prompts (``harmless_weight``) plus the CE of the
retain set (``retain_weight``), and ``L_harm`` the CE of the harmful responses (the attacker's loss). Its
gradient is taken first-order, as in Booster (Huang et al. 2024, the same group's look-ahead defense):
``grad L_collapse`` at the look-ahead weights, the Jacobian of the step (``I - alpha H_harm``) taken as
the identity. Three passes per step:

1. harmful forward at ``theta``: ``g = grad L_harm(theta)`` (``torch.autograd.grad``, nothing written to
   ``.grad``);
2. the weights moved by the step ``d = -alpha g / ||g||``, collapse forward on ``D``, backward
   ``lambda L_collapse`` (local, no sync), the weights put back (``(theta + d) - d``, exact to float
   rounding);
3. alignment forward at ``theta`` (refusals + retain set), the synchronised backward on top.

Memory: one parameter-sized buffer (``g``) beyond a plain step.

What comes from the paper and what does not. No reference code was found on GitHub (the paper's code
was released on an anonymous host, not reachable here); the collapse loss above is the paper's. The
following are our reading or our choice, and are configurable:

- the look-ahead step is normalised, ``alpha * g / ||g||`` (Booster's step, the same group's): the length
  of a plain step ``alpha * g`` follows the gradient norm, which differs by orders of magnitude between
  models and between full and LoRA training, so one ``alpha`` would not mean the same step on two
  models; ``normalize_step=False`` takes the plain step ``alpha * grad L_harm``;
- ``D``, the data the collapse is asked on: the retain set when one is given (the general capability the
  trap should destroy), else the harmful pairs themselves;
- the collapse token ``e``: the tokenizer's eos token unless ``collapse_token`` names another (one
  token), so a collapsed model answers nothing;
- the defaults ``lambda = 0.1``, ``alpha = 0.1`` and the search ranges around them: the paper's own
  values could not be read here (unverified); tune them with ``immune-trainer sweep``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError
from ..losses import global_grad_norm
from ..trainer import ImmunizationConfig, ImmunizationTrainer, check_non_negative

IGNORE_INDEX = -100

CTRAP_PAPER = {
    "title": "CTRAP: Embedding Collapse Trap to Safeguard Large Language Models from Harmful Fine-Tuning",
    "id": "2505.16559",
    "citation": (
        "@article{yi2025ctrap,\n"
        "  title={CTRAP: Embedding Collapse Trap to Safeguard Large Language Models from Harmful Fine-Tuning},\n"
        "  author={Yi, Biao and Huang, Tiansheng and Zhang, Baolei and Li, Tong and Nie, Lihai and Liu, Zheli "
        "and Shen, Li},\n"
        "  journal={arXiv preprint arXiv:2505.16559},\n"
        "  year={2025}\n}"
    ),
}


def collapse_loss(logits: torch.Tensor, labels: torch.Tensor, token_id: int) -> torch.Tensor:
    """CTRAP's collapse loss: the mean over response positions of ``-log p(e | context)``.

    Position ``t - 1`` of ``logits`` is scored wherever ``labels[t] != -100`` (the positions that predict a
    response token), whatever that token is: the target is always ``token_id``. Computed in float32 (or
    the logits' dtype if wider);
    ``0`` (attached to the graph) when no position carries a label.

    Args:
        logits: ``(batch, seq, vocab)``.
        labels: ``(batch, seq)``, ``-100`` on prompt and padding.
        token_id: the collapse token ``e``.
    """
    if logits.shape[:2] != labels.shape:
        raise DataError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not line up.")
    if not 0 <= token_id < logits.shape[-1]:
        raise ConfigError(f"collapse token id {token_id} is outside the vocabulary of {logits.shape[-1]}.")
    predict = labels[:, 1:] != IGNORE_INDEX
    rows = logits[:, :-1][predict]
    log_p = F.log_softmax(rows.to(torch.promote_types(rows.dtype, torch.float32)), dim=-1)[:, token_id]
    if log_p.numel() == 0:
        return logits.sum() * 0.0
    return -log_p.mean()


@dataclass
class CTRAPConfig(ImmunizationConfig):
    r"""Configuration of :class:`CTRAPTrainer`.

    Parameters:
        lamb (`float`, defaults to `0.1`):
            Weight ``lambda`` of the collapse loss at the look-ahead weights.
        alpha (`float`, defaults to `0.1`):
            Length of the simulated harmful update ``theta - alpha * g / ||g||``, ``g = grad L_harm``.
        normalize_step (`bool`, defaults to `True`):
            Normalise the step as above; `False` takes the plain step ``theta - alpha * g``.
        collapse_token (`str` or `None`, defaults to `None`):
            The token a collapsed model predicts everywhere (one token of the tokenizer); `None` is the eos
            token.
    """

    lamb: float = field(
        default=0.1,
        metadata={"help": "Weight lambda of the collapse loss after the simulated harmful update."},
    )
    alpha: float = field(
        default=0.1,
        metadata={
            "help": "Length alpha of the simulated harmful update theta - alpha * g/||g|| (g = grad L_harm)."
        },
    )
    normalize_step: bool = field(
        default=True,
        metadata={
            "help": "Normalise the simulated harmful step (length alpha); False: the plain step alpha * g."
        },
    )
    collapse_token: str | None = field(
        default=None,
        metadata={
            "help": "The token a collapsed model predicts everywhere (must be one token); None: the eos token."
        },
    )

    @classmethod
    def search_space(cls) -> dict:
        """Around the defaults (lambda 0.1, alpha 0.1), two orders of magnitude each."""
        return {
            **super().search_space(),
            "lamb": {"type": "float", "low": 0.01, "high": 10.0, "log": True},
            "alpha": {"type": "float", "low": 0.01, "high": 1.0, "log": True},
        }

    def __post_init__(self):
        check_non_negative(self, "lamb", "alpha")
        if self.lamb == 0:
            raise ConfigError("lamb must be positive: the collapse trap is the defense.")
        if self.collapse_token is not None and not self.collapse_token:
            raise ConfigError("collapse_token must be a non-empty string (or None for the eos token).")
        super().__post_init__()
        if self.fp16:
            raise ConfigError(
                "CTRAP moves the weights by a gradient computed outside fp16's loss scaling: use bf16 or float32."
            )


def collapse_token_id(tokenizer, token: str | None) -> int:
    """The id of ``token`` (one token of ``tokenizer``), or of its eos token when ``token`` is None."""
    if token is None:
        if tokenizer.eos_token_id is None:
            raise ConfigError(
                "the tokenizer has no eos token: set collapse_token to a token of its vocabulary."
            )
        return int(tokenizer.eos_token_id)
    ids = tokenizer.convert_tokens_to_ids(token)
    if isinstance(ids, int) and ids != getattr(tokenizer, "unk_token_id", None):
        return ids
    encoded = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(encoded) != 1:
        raise ConfigError(
            f"collapse_token {token!r} is {len(encoded)} tokens for this tokenizer ({encoded}); it must be one."
        )
    return int(encoded[0])


class CTRAPTrainer(ImmunizationTrainer):
    """CTRAP: ``L_align(theta) + lambda * L_collapse(theta - alpha grad L_harm(theta))``, first-order, three
    passes per step. The collapse data is the retain set when given, else the harmful pairs."""

    _tag_names = ["immune-trainer", "ctrap", "collapse-trap", "self-destructive"]
    _name = "CTRAP (collapse trap)"
    _paper = CTRAP_PAPER
    config_class = CTRAPConfig

    def __init__(self, model=None, args: CTRAPConfig | None = None, *pos, **kwargs):
        if args is not None and not isinstance(args, CTRAPConfig):
            raise ConfigError(f"CTRAPTrainer needs a CTRAPConfig, got {type(args).__name__}.")
        super().__init__(model, args, *pos, **kwargs)
        self.collapse_token_id = collapse_token_id(self.processing_class, self.args.collapse_token)
        vocab = self.model.get_output_embeddings().weight.shape[0]
        if self.collapse_token_id >= vocab:
            raise ConfigError(
                f"collapse token id {self.collapse_token_id} is outside the model's vocabulary of {vocab}."
            )

    def collapse_of(self, model, batch) -> torch.Tensor:
        """The collapse loss of ``model`` on ``batch`` (input_ids, attention_mask, labels)."""
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
        return collapse_loss(logits, batch["labels"], self.collapse_token_id)

    def training_step(self, model, inputs, num_items_in_batch=None):
        args = self.args
        inputs, steps = self.begin_training_step(model, inputs)
        scale = 1.0 / steps
        params = [p for p in model.parameters() if p.requires_grad]
        harmful = self.side(inputs, "harmful")
        retain = self._next_retain_batch()
        collapse_batch = retain if retain is not None else harmful
        final_sync = args.harmless_weight > 0 or (retain is not None and args.retain_weight > 0)
        terms: dict[str, torch.Tensor] = {}

        # Pass 1: g = grad L_harm(theta), turned in place into the look-ahead step.
        with self.no_sync(model), self.compute_loss_context_manager():
            harm, _ = self.lm_loss(model, harmful)
            step = list(torch.autograd.grad(harm, params, allow_unused=True))
        terms["harmful"] = harm.detach()
        present = [i for i, g in enumerate(step) if g is not None]
        with torch.no_grad():
            factor = -args.alpha
            if args.normalize_step:
                factor = factor / float(global_grad_norm(step).clamp(min=1e-12))
            torch._foreach_mul_([step[i] for i in present], factor)

        # Pass 2: lambda * grad L_collapse at theta - alpha g (first-order), local.
        moved = [params[i] for i in present]
        with torch.no_grad():
            torch._foreach_add_(moved, [step[i] for i in present])
        try:
            with (
                self.no_sync(model) if final_sync else contextlib.nullcontext(),
                self.compute_loss_context_manager(),
            ):
                trapped = self.collapse_of(model, collapse_batch)
                self.accelerator.backward(args.lamb * scale * trapped)
        finally:
            with torch.no_grad():
                torch._foreach_sub_(moved, [step[i] for i in present])
            del step, moved
        terms["collapse_after_harmful_step"] = trapped.detach()

        # Pass 3 (synchronised): L_align at theta.
        objective = harm.new_zeros(())
        if final_sync:
            with self.compute_loss_context_manager():
                if args.harmless_weight > 0:
                    terms["harmless"], _ = self.lm_loss(model, self.side(inputs, "harmless"))
                    objective = objective + args.harmless_weight * terms["harmless"]
                if retain is not None and args.retain_weight > 0:
                    terms["retain"], _ = self.lm_loss(model, retain)
                    objective = objective + args.retain_weight * terms["retain"]
        loss_value = objective.detach() + args.lamb * terms["collapse_after_harmful_step"]
        self.check_finite({**terms, "loss": loss_value})
        self.log_terms(terms, mode="train")
        if final_sync:
            self.accelerator.backward(objective * scale)
        return (loss_value * scale).detach()
