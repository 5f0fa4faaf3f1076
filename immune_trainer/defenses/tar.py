"""TAR: tamper-resistant training by first-order meta-learning (Tamirisa et al. 2024, arXiv 2408.00761).

The harmful pairs are split once into two disjoint parts: the *adversary* rows, which the simulated attacker
trains on, and the *held-out* rows (the outer batches), on which the tamper-resistance loss is measured.
Per outer step (one held-out paired batch):

1. A simulated attacker copies the trainable weights and fine-tunes the copy for ``K`` steps with its own
   AdamW, drawing a FRESH adversary batch at every inner step (as the reference's inner loop does), with a
   learning rate drawn from ``adversary_learning_rates``: by default the reference's own
   ``2e-6, 2e-5, 4e-5`` (``tar.py`` and ``run_tar_bio.sh``), which share no value with the rates the
   evaluation attacks with (``AttackConfig``'s 3e-5, 6e-5, 8e-5; the demo's 3e-5, 8e-5 and LoRA 1e-3): a
   defense trained against exactly the attack it is scored on would be over-credited. With
   ``warmup_adversary_probability`` (0.2, the reference loop's scheduler weights ``constant:1.0,
   linear_warmup:0.25``) the attacker of a step warms its rate up linearly over ``adversary_warmup_steps``
   inner steps. With ``benign_adversary_probability`` (the reference mixes 35% benign adversaries) the
   attacker of a step fine-tunes on the retain set instead. After every ``tr_every``-th step it evaluates the
   tamper-resistance loss ``L_TR`` at the adapted weights on the held-out batch and accumulates
   ``lambda_tr * w_k * grad L_TR`` with ``w_k = exp(0.0625 (k - (K - 1)))`` (first-order: the gradient at
   the adapted weights is applied to the outer weights).
   ``L_TR`` (``tamper_loss``) is either
   - ``"dpo"`` (the default): a DPO preference loss preferring the refusal (chosen) over the harmful
     response (rejected) of each held-out prompt, ``-log sigmoid(beta [(log pi(y_r|x) - log pi_0(y_r|x)) -
     (log pi(y_h|x) - log pi_0(y_h|x))])`` with summed response log-probabilities and ``pi_0`` the starting
     model: the reference's loss for harmful-request refusal (``dpo_loss_obj``, sigmoid, beta 0.1), the
     setting of this library's paired data; or
   - ``"max_entropy"``: the negated entropy of the next-token distribution on the held-out responses (the
     reference's loss for knowledge restriction, its bio/cyber scripts).
2. The outer loss ``lambda_retain * [LM loss on harmless/retain data + mean_l ||h_l(theta) - h_l(theta_0)||_2]``
   (``theta_0``: the starting model, a frozen copy for full fine-tuning, the adapters disabled for LoRA) is
   back-propagated together with the accumulated tamper-resistance gradient, through the Trainer's own
   optimizer, scaler and DDP synchronisation.

The inner adversary never touches the real weights nor the Trainer's optimizer state.

Departures from the reference (rishub-tamirisa/tamper-resistance, ``modules/training.py``):

- its ``linear_warmup`` adversary schedule is ``LambdaLR(lambda step: K / inner_optimizer_warmup_steps)``, a
  constant factor (3.2 at K = 64, 20 warm-up steps) rather than a ramp; here the warm-up adversary ramps
  linearly, ``lr (k + 1) / W`` up to the drawn rate, so its rates never exceed the drawn ones;
- ``K`` is 8 by default (reference 64) and ``adversary_warmup_steps`` is scaled with it (the reference's 20
  of 64 steps);
- in the reference's refusal (DPO) setting (``get_tar_dpo_dataloaders``) the attacker trains on the harmful
  (rejected) completions of the very loader the held-out DPO batches come from; here the two are disjoint
  rows (``adversary_fraction``);
- benign adversaries are off by default, as in that setting, whose only adversary is the harmful-completion
  one (its loop's default mixes 35% benign adversaries: ``benign_adversary_probability``, with a retain set);
  the ``retain_forget_switch`` adversary of its bio/cyber scripts (benign data up to a Beta(6, 3)-drawn step,
  then harmful) is not implemented.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch.func import functional_call

from ..errors import ConfigError, DataError
from ..losses import IGNORE_INDEX, negative_entropy, response_prediction_mask, retain_l2, tar_step_weights
from ..modeling import capture_outputs, find_decoder_structure
from ..trainer import ImmunizationConfig, ImmunizationTrainer, check_non_negative

_MODEL_KEYS = ("input_ids", "attention_mask", "labels")
TAMPER_LOSSES = ("max_entropy", "dpo")


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's labelled (response) tokens: ``(batch,)``."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != IGNORE_INDEX
    picked = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def dpo_preference_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Mean DPO (sigmoid) loss ``-log sigmoid(beta [(chosen - ref_chosen) - (rejected - ref_rejected)])``
    over the batch, from summed sequence log-probabilities (Rafailov et al. 2023)."""
    return -torch.nn.functional.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()


@dataclass
class TARConfig(ImmunizationConfig):
    r"""Configuration of :class:`TARTrainer`.

    Parameters:
        inner_steps (`int`, defaults to `8`):
            Steps `K` of the simulated attacker per outer step. The reference uses K = 64 (on 8 A100s); the
            default 8 is a CPU-sized choice that keeps a step about 11x a plain one, not the paper's setting.
            The cost grows linearly with `K`.
        tr_every (`int`, defaults to `4`):
            The tamper-resistance gradient is accumulated after every `tr_every`-th inner step.
        adversary_learning_rates (`list[float]`, defaults to `[2e-6, 2e-5, 4e-5]`):
            The attacker's learning rate is drawn from this list at each outer step. The default is the
            reference's (``tar.py``'s ``--adversary_lr_samples`` and ``run_tar_bio.sh``; its cyber script uses
            2e-5, 4e-5 and its training loop's own default is 2e-5, 4e-5, 1e-4). It shares no value with the
            evaluation's attack rates (3e-5, 6e-5, 8e-5): do not train against the very attack you will be
            scored on, or the defense is over-credited.
        warmup_adversary_probability (`float`, defaults to `0.2`):
            Probability that an outer step's attacker warms its learning rate up linearly over
            `adversary_warmup_steps` inner steps (the reference's warm-up adversary: scheduler weights
            constant 1.0, linear_warmup 0.25 in its training loop). 0 turns it off.
        adversary_warmup_steps (`int` or `None`, defaults to `None`):
            Inner steps of the warm-up adversary's linear ramp; `None` scales the reference's 20 of 64 steps to
            `inner_steps` (`max(1, round(20 K / 64))`, 2 at K = 8).
        adversary_weight_decay (`float`, defaults to `0.0`): AdamW weight decay of the simulated attacker.
        inner_batch_size (`int` or `None`, defaults to `None`):
            Rows of each fresh adversary batch (one per inner step); `None` uses `per_device_train_batch_size`.
        adversary_fraction (`float`, defaults to `0.5`):
            Share of the harmful pairs reserved for the simulated attacker; the rest are the held-out outer
            batches on which `L_TR` is measured (the two parts share no row).
        benign_adversary_probability (`float`, defaults to `0.0`):
            Probability that an outer step's attacker fine-tunes on benign data (the retain set) instead of
            harmful rows. The reference mixes adversaries 65% harmful / 35% benign (0.35); 0 by default because
            a retain set is optional here.
        tamper_loss (`str`, defaults to `"dpo"`):
            `"dpo"` (the reference's loss for refusal of harmful requests, the setting of paired harmful /
            refusal data: prefer the refusal over the harmful response after the attack) or `"max_entropy"`
            (its loss for knowledge restriction).
        dpo_beta (`float`, defaults to `0.1`): beta of the DPO tamper-resistance loss (reference: 0.1).
        lambda_tr (`float`, defaults to `4.0`): weight of the tamper-resistance gradient.
        lambda_retain (`float`, defaults to `1.0`): weight of the retain loss (LM + representation).
        step_weight_scale (`float`, defaults to `0.0625`): `w_k = exp(scale (k - (K - 1)))`.
        representation_retain (`bool`, defaults to `True`):
            Add `mean_l ||h_l(theta) - h_l(theta_0)||_2` to the retain loss (needs a frozen copy of the model
            for full fine-tuning: twice the weights in memory).
    """

    inner_steps: int = field(
        default=8,
        metadata={
            "help": "Simulated attacker steps K per outer step. The reference uses 64; the default 8 is sized "
            "for CPU runs. The cost grows linearly with K."
        },
    )
    tr_every: int = field(
        default=4, metadata={"help": "Accumulate the tamper-resistance gradient every N inner steps."}
    )
    adversary_learning_rates: list[float] = field(
        default_factory=lambda: [2e-6, 2e-5, 4e-5],
        metadata={
            "help": "Learning rates the simulated attacker draws from at each outer step; the default is the "
            "reference's (2e-6, 2e-5, 4e-5), disjoint from the evaluation's attack rates (3e-5, 6e-5, 8e-5)."
        },
    )
    warmup_adversary_probability: float = field(
        default=0.2,
        metadata={
            "help": "Probability that an outer step's simulated attacker warms its learning rate up linearly "
            "(the reference's warm-up adversary, weight 0.25 against 1.0 for a constant rate)."
        },
    )
    adversary_warmup_steps: int | None = field(
        default=None,
        metadata={
            "help": "Inner steps of the warm-up adversary's linear ramp; None: the reference's 20 of 64 steps "
            "scaled to inner_steps."
        },
    )
    adversary_weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW weight decay of the simulated attacker."}
    )
    inner_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Rows of the fresh adversary batch of each inner step; None: per_device_train_batch_size."
        },
    )
    adversary_fraction: float = field(
        default=0.5,
        metadata={
            "help": "Share of the harmful pairs reserved for the simulated attacker; the rest are the held-out "
            "batches on which the tamper-resistance loss is measured."
        },
    )
    benign_adversary_probability: float = field(
        default=0.0,
        metadata={
            "help": "Probability that an outer step's simulated attacker fine-tunes on benign (retain) data "
            "instead of harmful rows (reference: 0.35); needs a retain_dataset."
        },
    )
    tamper_loss: str = field(
        default="dpo",
        metadata={
            "help": "Tamper-resistance loss: 'dpo' (reference, harmful-request refusal: prefer the refusal over "
            "the harmful response) or 'max_entropy' (reference, knowledge restriction)."
        },
    )
    dpo_beta: float = field(
        default=0.1, metadata={"help": "Beta of the DPO tamper-resistance loss (reference: 0.1)."}
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
        check_non_negative(self, "lambda_tr", "lambda_retain", "adversary_weight_decay")
        if self.inner_batch_size is not None and self.inner_batch_size <= 0:
            raise ConfigError(f"inner_batch_size must be positive or None, got {self.inner_batch_size}.")
        if self.tamper_loss not in TAMPER_LOSSES:
            raise ConfigError(f"tamper_loss must be one of {TAMPER_LOSSES}, got {self.tamper_loss!r}.")
        if not 0 <= self.warmup_adversary_probability <= 1:
            raise ConfigError(
                f"warmup_adversary_probability must be in [0, 1], got {self.warmup_adversary_probability}."
            )
        if self.adversary_warmup_steps is None:
            self.adversary_warmup_steps = max(1, round(20 * self.inner_steps / 64))
        if isinstance(self.adversary_warmup_steps, bool) or not isinstance(self.adversary_warmup_steps, int):
            raise ConfigError(
                f"adversary_warmup_steps must be a positive integer, got {self.adversary_warmup_steps!r}."
            )
        if self.adversary_warmup_steps < 1:
            raise ConfigError(
                f"adversary_warmup_steps must be a positive integer, got {self.adversary_warmup_steps}."
            )
        if not 0 <= self.benign_adversary_probability <= 1:
            raise ConfigError(
                f"benign_adversary_probability must be in [0, 1], got {self.benign_adversary_probability}."
            )
        if not 0 < self.adversary_fraction < 1:
            raise ConfigError(f"adversary_fraction must be in (0, 1), got {self.adversary_fraction}.")
        if not math.isfinite(self.dpo_beta) or self.dpo_beta <= 0:
            raise ConfigError(f"dpo_beta must be a positive number, got {self.dpo_beta}.")
        super().__post_init__()


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and callable(getattr(model, "disable_adapter", None))


class TARTrainer(ImmunizationTrainer):
    """Tamper-resistant training (TAR): first-order meta-learning against a simulated fine-tuning attacker.

    Cost: one outer step runs ``K`` forward+backward passes of the attacker, ``K / tr_every`` forward+backward
    passes of the tamper-resistance loss and the retain passes (one forward+backward per retain batch, plus a
    forward of the starting model when ``representation_retain``): about ``K + 1`` plain steps or more, see
    :attr:`plain_steps_per_step`. Memory: the attacker's copy of the trainable weights and its AdamW state
    (3x the trainable weights), plus a frozen copy of the model (the starting model of the representation
    term and of the DPO loss) under full fine-tuning. FSDP / DeepSpeed ZeRO-3 (sharded parameters) are not
    supported; DDP is.

    The harmful pairs are split once (``adversary_fraction``, seeded): the attacker's rows, drawn as a fresh
    batch at every inner step, and the held-out rows that form the outer batches; so an epoch has about
    ``(1 - adversary_fraction)`` as many outer steps as the pairs alone would give.
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
        self.train_dataset, self.adversary_dataset = self._split_pairs(self.train_dataset)
        self._inner_iterators: dict[str, list] = {}
        if self.args.benign_adversary_probability > 0 and self.retain_dataset is None:
            raise ConfigError(
                "benign_adversary_probability > 0 makes some simulated attackers fine-tune on benign data: pass "
                "a retain_dataset (or set it to 0)."
            )
        self.step_weights = tar_step_weights(
            self.args.inner_steps, self.args.tr_every, self.args.step_weight_scale
        )
        self._structure = find_decoder_structure(self.model)
        self._hooks, self._states = capture_outputs(self._structure.layers)
        self._frozen = None
        self._uses_representation = self.args.representation_retain and self.args.lambda_retain > 0
        if (self._uses_representation or self.args.tamper_loss == "dpo") and not _is_peft(self.model):
            # The starting model theta_0 (the representation term's and the DPO loss's reference).
            self._frozen = copy.deepcopy(self.model).eval().requires_grad_(False)
        if self._uses_representation:
            ref_structure = self._structure if self._frozen is None else find_decoder_structure(self._frozen)
            self._ref_hooks, self._ref_states = capture_outputs(ref_structure.layers, detach=True)

    def _split_pairs(self, pairs):
        """Split the harmful pairs (seeded by ``args.seed``) into held-out rows (the outer batches) and
        adversary rows (the attacker's batches); the two share no row."""
        n = len(pairs)
        if n < 2:
            raise DataError(
                "TAR needs at least 2 harmful pairs: some for the simulated attacker, the others held out for "
                "the tamper-resistance loss."
            )
        n_adv = min(max(1, round(n * self.args.adversary_fraction)), n - 1)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.args.seed + 7)).tolist()
        return pairs.select(sorted(order[n_adv:])), pairs.select(sorted(order[:n_adv]))

    # ------------------------------------------------------------------ cost

    @property
    def plain_steps_per_step(self) -> float:
        """Forward+backward passes of one outer step, in units of a plain training step on one batch side:
        ``K`` attacker passes + ``K / tr_every`` tamper-resistance passes (two sides for ``"dpo"``) + the
        retain passes (a forward of the starting model counted as 1/3). A benchmark compares one TAR step
        against this many plain steps."""
        a = self.args
        retain_batches = int(a.harmless_weight > 0) + int(
            self.retain_dataset is not None and a.retain_weight > 0
        )
        ref = retain_batches / 3 if self._uses_representation else 0.0
        sides = 2 if a.tamper_loss == "dpo" else 1
        tr = sides * sum(1 for w in self.step_weights if w)
        dpo_ref = 2 / 3 if a.tamper_loss == "dpo" else 0.0
        return float(a.inner_steps + tr + retain_batches + ref + dpo_ref)

    # ------------------------------------------------------------------ inner loop

    def _adversary_lr(self) -> float:
        # Same draw on every process (seeded by the step), so DDP ranks run the same attacker.
        rng = random.Random(self.args.seed * 1_000_003 + self.state.global_step)
        return rng.choice(list(self.args.adversary_learning_rates))

    def is_benign_adversary_step(self, step: int) -> bool:
        """Whether the simulated attacker of outer step ``step`` fine-tunes on benign (retain) data instead of
        harmful rows: drawn with ``benign_adversary_probability``, seeded by the step (the same on every
        process, and replayable after a resume)."""
        p = self.args.benign_adversary_probability
        return p > 0 and random.Random(self.args.seed * 7_000_003 + step).random() < p

    def is_warmup_adversary_step(self, step: int) -> bool:
        """Whether the simulated attacker of outer step ``step`` warms its learning rate up (linearly over
        ``adversary_warmup_steps`` inner steps): drawn with ``warmup_adversary_probability``, seeded by the step
        (the same on every process, replayable after a resume) and independent of the benign draw."""
        p = self.args.warmup_adversary_probability
        # A string seed of its own: an integer seed of seed * c + step would give, at seed 0, the very stream of
        # the benign draw and of the learning-rate draw.
        return p > 0 and random.Random(f"tar-warmup-adversary:{self.args.seed}:{step}").random() < p

    def adversary_lr_factors(self, warmup: bool) -> list[float]:
        """The factor on the drawn learning rate at each inner step ``k = 0..K-1``: 1, or for the warm-up
        adversary ``min(1, (k + 1) / adversary_warmup_steps)``."""
        W = self.args.adversary_warmup_steps
        return [min(1.0, (k + 1) / W) if warmup else 1.0 for k in range(self.args.inner_steps)]

    def _inner_loader_for(self, source: str, epoch: int):
        dataset = self.adversary_dataset if source == "harmful" else self.retain_dataset
        generator = torch.Generator()
        generator.manual_seed(self.args.seed + 2_000_003 * (epoch + 1) + (0 if source == "harmful" else 17))
        sampler = torch.utils.data.RandomSampler(dataset, generator=generator)
        return self._get_dataloader(
            dataset,
            description=f"{source} adversary",
            batch_size=self.args.inner_batch_size or self._train_batch_size,
            sampler_fn=lambda _: sampler,
            is_training=True,
        )

    def next_adversary_batch(self, source: str = "harmful") -> dict[str, torch.Tensor]:
        """A fresh batch for one inner step of the attacker: the harmful side of the attacker's rows
        (``source="harmful"``) or a retain-set batch (``"benign"``), cycling with a new order each epoch.
        A resumed run continues where it stopped."""
        state = self._inner_iterators.get(source)
        if state is None:
            per_epoch = len(self._inner_loader_for(source, 0))
            if per_epoch == 0:
                rows = len(self.adversary_dataset if source == "harmful" else self.retain_dataset)
                raise DataError(
                    f"the simulated attacker's {rows} {source} rows make no batch (dataloader_drop_last with a "
                    "larger batch): lower inner_batch_size or give more data."
                )
            steps_done = sum(
                1
                for step in range(self.state.global_step)
                if self.is_benign_adversary_step(step) == (source == "benign")
            )
            consumed = steps_done * self.args.gradient_accumulation_steps * self.args.inner_steps
            epoch, skip = divmod(consumed, per_epoch)
            iterator = iter(self._inner_loader_for(source, epoch))
            for _ in range(skip):
                next(iterator)
            state = self._inner_iterators[source] = [epoch, iterator]
        try:
            batch = next(state[1])
        except StopIteration:
            state[0] += 1
            state[1] = iter(self._inner_loader_for(source, state[0]))
            batch = next(state[1])
        batch = self._prepare_inputs(batch)
        return self.side(batch, "harmful") if source == "harmful" else batch

    def _reference_logps(self, held_out) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed response log-probs of the refusal and the harmful response under the starting model."""
        out = []
        with torch.no_grad():
            for name in ("harmless", "harmful"):
                side = self.side(held_out, name)
                kwargs = {
                    "input_ids": side["input_ids"],
                    "attention_mask": side["attention_mask"],
                    "use_cache": False,
                }
                if self._frozen is not None:
                    logits = self._frozen(**kwargs).logits
                else:
                    peft_model = self.accelerator.unwrap_model(self.model)
                    with peft_model.disable_adapter():
                        logits = peft_model(**kwargs).logits
                out.append(sequence_logps(logits, side["labels"]))
        return out[0], out[1]

    def tamper_resistance_loss(self, base, fast, held_out, reference=None) -> torch.Tensor:
        """``L_TR`` of the adapted weights ``fast`` on the held-out paired batch (see ``tamper_loss``)."""

        def logits_of(side):
            return functional_call(
                base,
                fast,
                args=(),
                kwargs={
                    "input_ids": side["input_ids"],
                    "attention_mask": side["attention_mask"],
                    "use_cache": False,
                },
            ).logits

        harmful = self.side(held_out, "harmful")
        if self.args.tamper_loss == "max_entropy":
            return negative_entropy(logits_of(harmful), response_prediction_mask(harmful["labels"]))
        harmless = self.side(held_out, "harmless")
        chosen = sequence_logps(logits_of(harmless), harmless["labels"])
        rejected = sequence_logps(logits_of(harmful), harmful["labels"])
        return dpo_preference_loss(chosen, rejected, reference[0], reference[1], self.args.dpo_beta)

    def tamper_resistance_grads(
        self,
        model,
        adversary: Sequence[dict[str, torch.Tensor]] | Callable[[], dict[str, torch.Tensor]],
        held_out: dict[str, torch.Tensor],
        lr: float | None = None,
        warmup: bool | None = None,
    ) -> tuple[list[torch.Tensor | None], dict[str, torch.Tensor]]:
        """Run the simulated attacker and return the accumulated first-order tamper-resistance gradient.

        ``adversary`` gives the attacker's batch of each inner step: a list of ``K`` batches, or a function
        returning the next batch (``next_adversary_batch`` in training). ``held_out`` is a paired batch
        (``harmful_*`` and ``harmless_*`` keys). ``lr`` (drawn from ``adversary_learning_rates`` when None)
        and ``warmup`` (drawn with ``warmup_adversary_probability`` when None) set the attacker's rate at each
        inner step: ``lr * adversary_lr_factors(warmup)[k]``.

        Returns ``(grads, terms)``: ``grads[i]`` is ``sum_k lambda_tr * w_k * grad L_TR(theta_k)`` for the
        i-th trainable parameter of ``model`` (in ``named_parameters()`` order; ``None`` where ``L_TR`` does
        not depend on it); ``terms`` holds the mean ``L_TR`` and the attacker's last loss. The parameters of
        ``model`` are not modified.
        """
        if not callable(adversary):
            if len(adversary) != len(self.step_weights):
                raise ConfigError(f"pass one adversary batch per inner step ({len(self.step_weights)}).")
            batches = iter(adversary)
            adversary = batches.__next__
        base = self.accelerator.unwrap_model(model)
        named = [(n, p) for n, p in base.named_parameters() if p.requires_grad]
        fast = {n: p.detach().clone().requires_grad_(True) for n, p in named}
        tensors = list(fast.values())
        lr = self._adversary_lr() if lr is None else lr
        if warmup is None:
            warmup = self.is_warmup_adversary_step(self.state.global_step)
        factors = self.adversary_lr_factors(warmup)
        inner_opt = torch.optim.AdamW(tensors, lr=lr, weight_decay=self.args.adversary_weight_decay)
        reference = self._reference_logps(held_out) if self.args.tamper_loss == "dpo" else None
        acc: list[torch.Tensor | None] = [None] * len(tensors)
        tr_values, adv_loss = [], None
        for weight, factor in zip(self.step_weights, factors):
            for group in inner_opt.param_groups:
                group["lr"] = lr * factor
            batch = adversary()
            with self.compute_loss_context_manager():
                out = functional_call(
                    base, fast, args=(), kwargs={**{k: batch[k] for k in _MODEL_KEYS}, "use_cache": False}
                )
            grads = torch.autograd.grad(out.loss, tensors, allow_unused=True)
            for t, g in zip(tensors, grads):
                t.grad = g
            inner_opt.step()
            inner_opt.zero_grad(set_to_none=True)
            adv_loss = out.loss.detach()
            if not weight:
                continue
            with self.compute_loss_context_manager():
                tr = self.tamper_resistance_loss(base, fast, held_out, reference)
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
        if not self._uses_representation:
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
        inputs, ga = self.begin_training_step(model, inputs)
        source = "benign" if self.is_benign_adversary_step(self.state.global_step) else "harmful"
        tr_grads, terms = self.tamper_resistance_grads(
            model, lambda: self.next_adversary_batch(source), inputs
        )
        terms["benign_adversary"] = torch.tensor(float(source == "benign"))
        terms["warmup_adversary"] = torch.tensor(float(self.is_warmup_adversary_step(self.state.global_step)))

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
        self.accelerator.backward(loss / ga)
        reported = (
            self.args.lambda_retain * retain_total.detach() + self.args.lambda_tr * terms["tamper_resistance"]
        )
        return reported / ga
