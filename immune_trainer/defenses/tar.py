"""TAR: tamper-resistant training by first-order meta-learning (Tamirisa et al. 2024, arXiv 2408.00761).

Per outer step (one paired batch), the harmful side is split into adversary rows and held-out rows:

1. A simulated attacker copies the trainable weights and fine-tunes the copy for ``K`` steps with its own
   AdamW on the adversary rows (learning rate drawn from ``adversary_learning_rates``). After every
   ``tr_every``-th step it evaluates the tamper-resistance loss ``L_TR`` (the negated entropy of the
   next-token distribution on the held-out rows' response tokens) at the adapted weights and accumulates
   ``lambda_tr * w_k * grad L_TR`` with ``w_k = exp(0.0625 (k - (K - 1)))`` (first-order: the gradient at
   the adapted weights is applied to the outer weights).
2. The outer loss ``lambda_retain * [LM loss on harmless/retain data + mean_l ||h_l(theta) - h_l(theta_0)||_2]``
   (``theta_0``: the starting model, a frozen copy for full fine-tuning, the adapters disabled for LoRA) is
   back-propagated together with the accumulated tamper-resistance gradient, through the Trainer's own
   optimizer, scaler and DDP synchronisation.

The inner adversary never touches the real weights nor the Trainer's optimizer state.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass, field

import torch
from torch.func import functional_call

from ..errors import ConfigError
from ..losses import negative_entropy, response_prediction_mask, retain_l2, tar_step_weights
from ..modeling import capture_outputs, find_decoder_structure
from ..trainer import ImmunizationConfig, ImmunizationTrainer

_MODEL_KEYS = ("input_ids", "attention_mask", "labels")


@dataclass
class TARConfig(ImmunizationConfig):
    r"""Configuration of :class:`TARTrainer`.

    Parameters:
        inner_steps (`int`, defaults to `8`):
            Steps `K` of the simulated attacker per outer step. The reference uses 64 (on 8 A100s); 8 keeps a
            step about 11x a plain one. The cost grows linearly with `K`.
        tr_every (`int`, defaults to `4`):
            The tamper-resistance gradient is accumulated after every `tr_every`-th inner step.
        adversary_learning_rates (`list[float]`, defaults to `[2e-6, 2e-5, 4e-5]`):
            The attacker's learning rate is drawn from this set at each outer step.
        adversary_weight_decay (`float`, defaults to `0.0`): AdamW weight decay of the simulated attacker.
        inner_batch_size (`int` or `None`, defaults to `None`):
            Rows of the adversary half drawn (without replacement) for each inner step; `None` uses them all.
        lambda_tr (`float`, defaults to `4.0`): weight of the tamper-resistance gradient.
        lambda_retain (`float`, defaults to `1.0`): weight of the retain loss (LM + representation).
        step_weight_scale (`float`, defaults to `0.0625`): `w_k = exp(scale (k - (K - 1)))`.
        representation_retain (`bool`, defaults to `True`):
            Add `mean_l ||h_l(theta) - h_l(theta_0)||_2` to the retain loss (needs a frozen copy of the model
            for full fine-tuning: twice the weights in memory).
    """

    inner_steps: int = field(
        default=8,
        metadata={"help": "Simulated attacker steps K per outer step (reference: 64; cost grows linearly)."},
    )
    tr_every: int = field(
        default=4, metadata={"help": "Accumulate the tamper-resistance gradient every N inner steps."}
    )
    adversary_learning_rates: list[float] = field(
        default_factory=lambda: [2e-6, 2e-5, 4e-5],
        metadata={"help": "Learning rates the simulated attacker draws from at each outer step."},
    )
    adversary_weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW weight decay of the simulated attacker."}
    )
    inner_batch_size: int | None = field(
        default=None,
        metadata={"help": "Adversary rows drawn for each inner step; None uses the whole adversary half."},
    )
    lambda_tr: float = field(default=4.0, metadata={"help": "Weight of the tamper-resistance gradient."})
    lambda_retain: float = field(
        default=1.0, metadata={"help": "Weight of the retain loss (LM loss + representation distance)."}
    )
    step_weight_scale: float = field(
        default=0.0625, metadata={"help": "Step weights w_k = exp(scale * (k - (K - 1)))."}
    )
    representation_retain: bool = field(
        default=True,
        metadata={"help": "Add mean_l ||h_l(theta) - h_l(theta_0)||_2 on retain data to the retain loss."},
    )

    @classmethod
    def search_space(cls) -> dict:
        """Around the reference: lr 2e-5, 750 outer steps, lambda_TR 4, lambda_retain 1, K = 64 inner steps
        (the range starts lower: every inner step costs a forward and backward)."""
        return {
            **super().search_space(),
            "learning_rate": {"type": "float", "low": 4e-6, "high": 1e-4, "log": True},
            "max_steps": {"type": "int", "low": 50, "high": 750, "log": True},
            "inner_steps": {"type": "int", "low": 4, "high": 64, "log": True},
            "lambda_tr": {"type": "float", "low": 0.5, "high": 10.0, "log": True},
            "lambda_retain": {"type": "float", "low": 0.25, "high": 4.0, "log": True},
        }

    def __post_init__(self):
        tar_step_weights(self.inner_steps, self.tr_every, self.step_weight_scale)  # ConfigError if invalid
        if isinstance(self.adversary_learning_rates, (int, float)):
            self.adversary_learning_rates = [float(self.adversary_learning_rates)]
        if not self.adversary_learning_rates or any(
            not math.isfinite(lr) or lr <= 0 for lr in self.adversary_learning_rates
        ):
            raise ConfigError(
                f"adversary_learning_rates must be positive numbers, got {self.adversary_learning_rates}."
            )
        for name in ("lambda_tr", "lambda_retain", "adversary_weight_decay"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite non-negative number, got {value}.")
        if self.inner_batch_size is not None and self.inner_batch_size <= 0:
            raise ConfigError(f"inner_batch_size must be positive or None, got {self.inner_batch_size}.")
        super().__post_init__()


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and callable(getattr(model, "disable_adapter", None))


def _rows(batch: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v.index_select(0, index) for k, v in batch.items()}


class TARTrainer(ImmunizationTrainer):
    """Tamper-resistant training (TAR): first-order meta-learning against a simulated fine-tuning attacker.

    Cost: one outer step runs ``K`` forward+backward passes of the attacker, ``K / tr_every`` forward+backward
    passes of the tamper-resistance loss and the retain passes (one forward+backward per retain batch, plus a
    forward of the starting model when ``representation_retain``): about ``K + 1`` plain steps or more, see
    :attr:`plain_steps_per_step`. Memory: the attacker's copy of the trainable weights and its AdamW state
    (3x the trainable weights), plus a frozen copy of the model for the representation term under full
    fine-tuning. FSDP / DeepSpeed ZeRO-3 (sharded parameters) are not supported; DDP is.

    Each harmful batch needs at least two rows (half for the attacker, half held out for ``L_TR``).
    """

    _tag_names = ["immune-trainer", "tar"]
    _name = "TAR"
    _paper = {
        "title": "Tamper-Resistant Safeguards for Open-Weight LLMs",
        "id": "2408.00761",
        "citation": (
            "@article{tamirisa2024tamper,\n"
            "  title={Tamper-Resistant Safeguards for Open-Weight LLMs},\n"
            "  author={Tamirisa, Rishub and Bharathi, Bhrugu and Phan, Long and Zhou, Andy and Gatti, Alice and "
            "Suresh, Tarun and Lin, Maxwell and Wang, Justin and Wang, Rowan and Arel, Ron and Zou, Andy and "
            "Song, Dawn and Li, Bo and Hendrycks, Dan and Mazeika, Mantas},\n"
            "  journal={arXiv preprint arXiv:2408.00761},\n"
            "  year={2024}\n}"
        ),
    }
    config_class = TARConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, TARConfig):
            raise ConfigError(f"TARTrainer needs a TARConfig, got {type(self.args).__name__}.")
        if self.args.per_device_train_batch_size < 2:
            raise ConfigError(
                "TAR splits each harmful batch into attacker rows and held-out rows: set "
                "per_device_train_batch_size to at least 2."
            )
        self.step_weights = tar_step_weights(
            self.args.inner_steps, self.args.tr_every, self.args.step_weight_scale
        )
        self._structure = find_decoder_structure(self.model)
        self._hooks, self._states = capture_outputs(self._structure.layers)
        self._frozen = None
        if self.args.representation_retain and self.args.lambda_retain > 0:
            if _is_peft(self.model):
                ref_structure = self._structure
            else:
                self._frozen = copy.deepcopy(self.model).eval().requires_grad_(False)
                ref_structure = find_decoder_structure(self._frozen)
            self._ref_hooks, self._ref_states = capture_outputs(ref_structure.layers, detach=True)

    # ------------------------------------------------------------------ cost

    @property
    def plain_steps_per_step(self) -> float:
        """Forward+backward passes of one outer step, in units of a plain training step on one batch side:
        ``K`` attacker passes + ``K / tr_every`` tamper-resistance passes + the retain passes (a forward of
        the starting model counted as 1/3). A benchmark compares one TAR step against this many plain steps."""
        a = self.args
        retain_batches = int(a.harmless_weight > 0) + int(
            self.retain_dataset is not None and a.retain_weight > 0
        )
        ref = retain_batches / 3 if a.representation_retain and a.lambda_retain > 0 else 0.0
        tr = sum(1 for w in self.step_weights if w)
        return float(a.inner_steps + tr + retain_batches + ref)

    # ------------------------------------------------------------------ inner loop

    def _adversary_lr(self) -> float:
        # Same draw on every process (seeded by the step), so DDP ranks run the same attacker.
        rng = random.Random(self.args.seed * 1_000_003 + self.state.global_step)
        return rng.choice(list(self.args.adversary_learning_rates))

    def _inner_rows(self, n: int, k: int, device) -> torch.Tensor | None:
        size = self.args.inner_batch_size
        if size is None or size >= n:
            return None
        gen = torch.Generator().manual_seed(self.args.seed * 7919 + self.state.global_step * 131 + k)
        return torch.randperm(n, generator=gen)[:size].to(device)

    def split_harmful(self, inputs) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Split the batch's harmful side: even rows for the attacker, odd rows held out for ``L_TR``."""
        harmful = self.side(inputs, "harmful")
        n = harmful["input_ids"].shape[0]
        device = harmful["input_ids"].device
        if n < 2:  # a last, incomplete batch of one row: use it for both.
            return harmful, harmful
        return (
            _rows(harmful, torch.arange(0, n, 2, device=device)),
            _rows(harmful, torch.arange(1, n, 2, device=device)),
        )

    def tamper_resistance_grads(
        self,
        model,
        adversary: dict[str, torch.Tensor],
        held_out: dict[str, torch.Tensor],
        lr: float | None = None,
    ) -> tuple[list[torch.Tensor | None], dict[str, torch.Tensor]]:
        """Run the simulated attacker and return the accumulated first-order tamper-resistance gradient.

        Returns ``(grads, terms)``: ``grads[i]`` is ``sum_k lambda_tr * w_k * grad L_TR(theta_k)`` for the
        i-th trainable parameter of ``model`` (in ``named_parameters()`` order; ``None`` where ``L_TR`` does
        not depend on it); ``terms`` holds the mean ``L_TR`` and the attacker's last loss. The parameters of
        ``model`` are not modified.
        """
        base = self.accelerator.unwrap_model(model)
        named = [(n, p) for n, p in base.named_parameters() if p.requires_grad]
        fast = {n: p.detach().clone().requires_grad_(True) for n, p in named}
        tensors = list(fast.values())
        lr = self._adversary_lr() if lr is None else lr
        inner_opt = torch.optim.AdamW(tensors, lr=lr, weight_decay=self.args.adversary_weight_decay)
        held_mask = response_prediction_mask(held_out["labels"])
        acc: list[torch.Tensor | None] = [None] * len(tensors)
        tr_values, adv_loss = [], None
        n_adv = adversary["input_ids"].shape[0]
        for k, weight in enumerate(self.step_weights):
            rows = self._inner_rows(n_adv, k, adversary["input_ids"].device)
            batch = adversary if rows is None else _rows(adversary, rows)
            with self.compute_loss_context_manager():
                out = functional_call(base, fast, args=(), kwargs={**batch, "use_cache": False})
            grads = torch.autograd.grad(out.loss, tensors, allow_unused=True)
            for t, g in zip(tensors, grads):
                t.grad = g
            inner_opt.step()
            inner_opt.zero_grad(set_to_none=True)
            adv_loss = out.loss.detach()
            if not weight:
                continue
            with self.compute_loss_context_manager():
                logits = functional_call(
                    base,
                    fast,
                    args=(),
                    kwargs={
                        "input_ids": held_out["input_ids"],
                        "attention_mask": held_out["attention_mask"],
                        "use_cache": False,
                    },
                ).logits
                tr = negative_entropy(logits, held_mask)
            tr_grads = torch.autograd.grad(tr, tensors, allow_unused=True)
            scale = self.args.lambda_tr * weight
            for i, g in enumerate(tr_grads):
                if g is None:
                    continue
                acc[i] = g * scale if acc[i] is None else acc[i].add_(g, alpha=scale)
            tr_values.append(tr.detach())
        del inner_opt, fast, tensors
        terms = {"tamper_resistance": torch.stack(tr_values).mean(), "adversary": adv_loss}
        return acc, terms

    # ------------------------------------------------------------------ retain

    def _reference_states(self, batch) -> list[torch.Tensor]:
        with torch.no_grad(), self._ref_hooks:
            kwargs = {
                "input_ids": batch["input_ids"],
                "attention_mask": batch["attention_mask"],
                "use_cache": False,
            }
            if self._frozen is not None:
                self._frozen(**kwargs)
            else:
                peft_model = self.accelerator.unwrap_model(self.model)
                with peft_model.disable_adapter():
                    peft_model(**kwargs)
            return [self._ref_states[i] for i in range(self._structure.num_layers)]

    def retain_loss(self, model, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(LM loss, mean_l ||h_l - h_l(theta_0)||_2)`` on one retain batch (the second is None when the
        representation term is off)."""
        if not (self.args.representation_retain and self.args.lambda_retain > 0):
            return self.lm_loss(model, batch)[0], None
        with self._hooks:
            ce, _ = self.lm_loss(model, batch)
            states = [self._states[i] for i in range(self._structure.num_layers)]
        ref = self._reference_states(batch)
        mask = batch["attention_mask"].bool()
        rep = torch.stack([retain_l2(h, h0, mask) for h, h0 in zip(states, ref)]).mean()
        return ce, rep

    # ------------------------------------------------------------------ the step

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        adversary, held_out = self.split_harmful(inputs)
        tr_grads, terms = self.tamper_resistance_grads(model, adversary, held_out)

        with self.compute_loss_context_manager():
            batches = []
            if self.args.harmless_weight > 0:
                batches.append(("harmless", self.args.harmless_weight, self.side(inputs, "harmless")))
            retain = self._next_retain_batch()
            if retain is not None and self.args.retain_weight > 0:
                batches.append(("retain", self.args.retain_weight, retain))
            retain_total = torch.zeros((), device=inputs["harmful_input_ids"].device)
            reps = []
            for name, weight, batch in batches:
                ce, rep = self.retain_loss(model, batch)
                terms[name] = ce
                retain_total = retain_total + weight * ce
                if rep is not None:
                    reps.append(rep)
            if reps:
                terms["representation"] = torch.stack(reps).mean()
                retain_total = retain_total + terms["representation"]
            # The accumulated tamper-resistance gradient enters the same backward as a linear surrogate
            # sum_i <theta_i, g_i> (its gradient is exactly g_i): loss scaling, gradient accumulation and DDP
            # all-reduce then treat it like any other gradient.
            base = self.accelerator.unwrap_model(model)
            params = [p for _, p in base.named_parameters() if p.requires_grad]
            surrogate = sum((p * g.to(p.dtype)).sum() for p, g in zip(params, tr_grads) if g is not None)
            loss = self.args.lambda_retain * retain_total + surrogate
            if not loss.requires_grad:  # nothing to retain and no gradient reached: a zero update.
                loss = loss + sum(p.sum() * 0.0 for p in params)

        self.check_finite(terms)
        self.log_terms(terms)
        ga = self.current_gradient_accumulation_steps
        self.accelerator.backward(loss / ga)
        reported = (
            self.args.lambda_retain * retain_total.detach() + self.args.lambda_tr * terms["tamper_resistance"]
        )
        return reported / ga
