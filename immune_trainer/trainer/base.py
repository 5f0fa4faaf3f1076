"""The ImmunizationTrainer base: a ``transformers.Trainer`` that trains on paired harmful/harmless batches.

Every defense in :mod:`immune_trainer.defenses` subclasses :class:`ImmunizationTrainer` and
implements :meth:`ImmunizationTrainer.compute_defense_loss` (or, for multi-pass defenses, overrides
``training_step``). The base class owns what every defense shares:

- turning the user's harmful dataset (prompt/completion or messages) into paired batches: each harmful
  prompt with its harmful response and with a harmless (refusal) response, response-only labels;
- an optional *retain* set of ordinary capability data, drawn batch by batch beside the pairs (without
  one, a strong defense breaks the model: see the README);
- logging every loss term under ``loss/<term>``, averaged over the logging interval and across processes;
- stopping with :class:`~immune_trainer.errors.DivergenceError` when a loss term becomes NaN or inf;
- gradient accumulation: ``compute_defense_loss`` returns a per-batch mean and the Trainer divides by the
  accumulation steps (``loss_is_scaled_for_ga = False``); defenses that write their own ``training_step``
  divide by :meth:`~ImmunizationTrainer.accumulation_steps` and run their auxiliary passes under
  :meth:`~ImmunizationTrainer.no_sync`;
- identity for model cards (``_tag_names``, ``_name``, ``_paper``, ``_defense_name``), which
  :meth:`~ImmunizationTrainer.create_model_card` passes to :mod:`immune_trainer.model_card`.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import defaultdict
from typing import Any

import torch
from transformers import Trainer

from .. import data as data_lib
from ..errors import ConfigError, DataError, DivergenceError
from .config import ImmunizationConfig

__all__ = ["IMMUNIZATION_PAPER", "PAIRED_KEYS", "ImmunizationCollator", "ImmunizationTrainer", "merge_parts"]

PAIRED_KEYS = (
    "harmful_input_ids",
    "harmful_attention_mask",
    "harmful_labels",
    "harmless_input_ids",
    "harmless_attention_mask",
    "harmless_labels",
)

IMMUNIZATION_PAPER = {
    "title": "Immunization against harmful fine-tuning attacks",
    "id": "2402.16382",
    "citation": (
        "@inproceedings{rosati2024immunization,\n"
        "  title={Immunization against harmful fine-tuning attacks},\n"
        "  author={Rosati, Domenic and Wehner, Jan and Williams, Kai and Bartoszcze, {\\L}ukasz and "
        "Sajjad, Hassan and Rudzicz, Frank},\n"
        "  booktitle={Findings of the Association for Computational Linguistics: EMNLP 2024},\n"
        "  year={2024}\n}"
    ),
}


def merge_parts(parts) -> dict[str, torch.Tensor]:
    """Merge loss parts (dicts of terms, each with its total under ``"loss"``) into one dict whose
    ``"loss"`` is the sum of the parts' totals."""
    merged: dict[str, torch.Tensor] = {}
    total = 0.0
    for part in parts:
        total = total + part["loss"]
        merged.update({k: v for k, v in part.items() if k != "loss"})
    merged["loss"] = total
    return merged


class ImmunizationCollator:
    """Collates paired examples with :class:`~immune_trainer.data.PairedCollator` and plain supervised
    examples (retain and evaluation sets) with :class:`~immune_trainer.data.SupervisedCollator`."""

    def __init__(self, tokenizer):
        self.paired = data_lib.PairedCollator(tokenizer)
        self.supervised = data_lib.SupervisedCollator(tokenizer)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if examples and "harmful_input_ids" in examples[0]:
            return self.paired(examples)
        return self.supervised(examples)


def _is_paired(dataset) -> bool:
    return all(key in dataset.column_names for key in PAIRED_KEYS)


class ImmunizationTrainer(Trainer):
    """Base of every defense: a ``transformers.Trainer`` fed with paired harmful/harmless batches.

    Args:
        model: a causal LM, or a Hub id / local path loaded with ``AutoModelForCausalLM`` (safetensors
            only; ``trust_remote_code`` from the config).
        args: the defense's config; ``None`` builds the default one writing to ``immunized_model``.
        harmful_dataset: harmful prompts with harmful responses (prompt/completion, conversational or
            messages), or an already paired dataset with the six ``harmful_*``/``harmless_*`` columns.
        harmless_dataset: optional dataset with the same prompts and harmless responses; when omitted,
            the harmless side comes from ``args.refusal_column`` or from the documented refusal set.
        retain_dataset: optional ordinary capability data (any supported format) kept by a retain loss.
        eval_dataset: optional dataset or dict of datasets (raw or tokenized) evaluated with the plain LM
            loss, e.g. ``{"harmful": ..., "harmless": ...}`` gives ``eval_harmful_loss``.
        processing_class: the tokenizer (loaded from ``model`` when it is a string and this is None).
        peft_config: an optional ``peft`` config; the model is wrapped with ``get_peft_model``.

    Subclasses implement :meth:`compute_defense_loss`.
    """

    _tag_names = ["immune-trainer"]
    _name = "Immunization"
    _paper = IMMUNIZATION_PAPER
    # The name a registered defense's trainer class is registered under (set by register_defense).
    _defense_name: str | None = None
    # compute_defense_loss returns a per-batch mean: the Trainer divides by the accumulation steps.
    loss_is_scaled_for_ga = False
    config_class = ImmunizationConfig
    # False for a defense that trains on harmful data only (Security Vectors), which refuses a retain set.
    takes_retain_dataset = True

    @classmethod
    def retain_for(cls, retain_dataset):
        """``retain_dataset``, or None for a defense that takes none: what a caller holding one retain set for
        every defense (the demo, the sweep, the leaderboard) passes to this one."""
        return retain_dataset if cls.takes_retain_dataset else None

    def __init__(
        self,
        model=None,
        args: ImmunizationConfig | None = None,
        harmful_dataset=None,
        harmless_dataset=None,
        retain_dataset=None,
        eval_dataset=None,
        processing_class=None,
        peft_config=None,
        **kwargs,
    ):
        if args is None:
            args = self.config_class(output_dir="immunized_model", report_to="none")
        if not isinstance(args, ImmunizationConfig):
            raise ConfigError(
                f"{type(self).__name__} needs an ImmunizationConfig (or the defense's own config), got "
                f"{type(args).__name__}."
            )
        if harmful_dataset is None:
            raise DataError(
                f"{type(self).__name__} needs a harmful_dataset (harmful prompts with harmful responses)."
            )
        if isinstance(model, str):
            from ..data.loading import ModelArguments, load_model_and_tokenizer

            # Safetensors only, remote code only if allowed; clear ConfigErrors for bad paths.
            model, tokenizer = load_model_and_tokenizer(
                ModelArguments(model=model, trust_remote_code=args.trust_remote_code)
            )
            if processing_class is None:
                processing_class = tokenizer
        if processing_class is None:
            raise ConfigError(
                "Pass the tokenizer as processing_class=... (it is needed to build the paired batches)."
            )
        data_lib.check_tokenizer(processing_class)
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)

        tokenizer = processing_class
        train_dataset = self._prepare_pairs(harmful_dataset, harmless_dataset, tokenizer, args)
        retain = None
        if retain_dataset is not None:
            retain = data_lib.ensure_tokenized(retain_dataset, tokenizer, max_length=args.max_length)
            if len(retain) == 0:
                raise DataError("retain_dataset is empty.")
        self.retain_dataset = retain
        if eval_dataset is not None:
            eval_dataset = self._prepare_eval(eval_dataset, tokenizer, args.max_length)

        kwargs.setdefault("data_collator", ImmunizationCollator(tokenizer))
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        self._metrics: dict[str, dict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        self._retain_iterator = None
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)

    # ------------------------------------------------------------------ data

    @staticmethod
    def _prepare_pairs(harmful, harmless, tokenizer, args):
        if _is_paired(harmful):
            if harmless is not None:
                raise DataError("harmful_dataset is already paired; do not pass harmless_dataset as well.")
            return harmful
        if harmless is not None:
            return data_lib.pair_datasets(harmful, harmless, tokenizer, max_length=args.max_length)
        return data_lib.build_pairs(
            harmful,
            tokenizer,
            max_length=args.max_length,
            refusal_column=args.refusal_column,
            seed=args.pair_seed,
        )

    @staticmethod
    def _prepare_eval(eval_dataset, tokenizer, max_length):
        def one(ds):
            return data_lib.ensure_tokenized(ds, tokenizer, max_length=max_length)

        if isinstance(eval_dataset, dict):
            return {name: one(ds) for name, ds in eval_dataset.items()}
        return one(eval_dataset)

    def _retain_loader_for(self, epoch: int):
        """The retain set's dataloader for ``epoch``: its order is a function of (seed, epoch) alone, so a
        resumed run draws the same retain batches as an uninterrupted one."""
        generator = torch.Generator()
        generator.manual_seed(self.args.seed + 1_000_003 * epoch)
        sampler = torch.utils.data.RandomSampler(self.retain_dataset, generator=generator)
        return self._get_dataloader(
            self.retain_dataset,
            description="retain",
            batch_size=self._train_batch_size,
            sampler_fn=lambda _: sampler,
            is_training=True,
        )

    def _next_retain_batch(self) -> dict[str, torch.Tensor] | None:
        """The next batch of the retain set (one per micro-batch), cycling forever with a new order each
        epoch. After a checkpoint resume it continues where the interrupted run stopped."""
        if self.retain_dataset is None:
            return None
        if self._retain_iterator is None:
            consumed = self.state.global_step * self.args.gradient_accumulation_steps
            per_epoch = len(self._retain_loader_for(0))
            self._retain_epoch, skip = divmod(consumed, max(per_epoch, 1))
            self._retain_loader = self._retain_loader_for(self._retain_epoch)
            self._retain_iterator = iter(self._retain_loader)
            for _ in range(skip):
                next(self._retain_iterator)
        try:
            batch = next(self._retain_iterator)
        except StopIteration:
            self._retain_epoch += 1
            self._retain_loader = self._retain_loader_for(self._retain_epoch)
            self._retain_iterator = iter(self._retain_loader)
            batch = next(self._retain_iterator)
        return self._prepare_inputs(batch)

    # ------------------------------------------------------------------ helpers for defenses

    def decoder_structure(self, model):
        """The model's decoder layers, attention and MLP blocks, final norm and unembedding (found once per
        model by :func:`immune_trainer.modeling.find_decoder_structure`, through DDP and peft wrappers)."""
        from ..modeling import find_decoder_structure, unwrap_model

        base = unwrap_model(model)
        cached = getattr(self, "_structure_cache", None)
        if cached is None or cached[0] is not base:
            self._structure_cache = (base, find_decoder_structure(base))
        return self._structure_cache[1]

    def accumulation_steps(self) -> int:
        """The Trainer's current gradient accumulation steps, which divide each micro-batch's loss (1 when
        ``training_step`` is called outside ``train()``)."""
        return getattr(self, "current_gradient_accumulation_steps", 1)

    def begin_training_step(self, model, inputs) -> tuple[dict[str, Any], int]:
        """The prologue of every ``training_step`` written here, in the order of transformers'
        ``Trainer.training_step``: ``model.train()``, ``optimizer.train()`` when the optimizer has one
        (schedule-free optimizers), then ``_prepare_inputs``. Returns the prepared inputs and the gradient
        accumulation steps that divide the micro-batch's loss (:meth:`accumulation_steps`).

        Departure from the Trainer: no context-parallel input preparation (the defenses' multi-pass steps
        do not support context parallelism) and no SageMaker model-parallel branch."""
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        return self._prepare_inputs(inputs), self.accumulation_steps()

    @staticmethod
    def no_sync(model):
        """DDP's ``no_sync`` for an auxiliary pass whose gradients stay local (a null context for a model
        that is not wrapped by DDP)."""
        return model.no_sync() if callable(getattr(model, "no_sync", None)) else contextlib.nullcontext()

    @staticmethod
    def side(inputs: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
        """The ``harmful`` or ``harmless`` half of a paired batch, as model keyword arguments."""
        return {
            "input_ids": inputs[f"{name}_input_ids"],
            "attention_mask": inputs[f"{name}_attention_mask"],
            "labels": inputs[f"{name}_labels"],
        }

    def lm_loss(self, model, batch: dict[str, torch.Tensor], **forward_kwargs):
        """Forward ``batch`` (input_ids, attention_mask, labels) and return ``(mean response CE, outputs)``.

        The output layer projects only the positions that predict a labelled token
        (:func:`immune_trainer.modeling.response_loss`): the same loss as the model's own ``labels=`` loss
        without the vocabulary projection of prompt and padding tokens. ``outputs.logits`` therefore holds
        those rows only; a subclass that needs the full logits calls the model itself.
        """
        from ..modeling import response_loss

        return response_loss(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
            use_cache=False,
            **forward_kwargs,
        )

    def retain_terms(self, model, inputs) -> dict[str, torch.Tensor]:
        """The terms that keep the model useful: harmless CE on the pairs and CE on the retain set."""
        terms: dict[str, torch.Tensor] = {}
        if self.args.harmless_weight > 0:
            terms["harmless"], _ = self.lm_loss(model, self.side(inputs, "harmless"))
        retain = self._next_retain_batch()
        if retain is not None and self.args.retain_weight > 0:
            terms["retain"], _ = self.lm_loss(model, retain)
        return terms

    def has_retain_terms(self) -> bool:
        """Whether :meth:`retain_terms` returns anything (a harmless weight, or a retain set with a weight)."""
        return self.args.harmless_weight > 0 or (
            self.retain_dataset is not None and self.args.retain_weight > 0
        )

    def retain_part(self, model, inputs) -> dict[str, torch.Tensor]:
        """:meth:`retain_terms` as a loss part (for :meth:`defense_loss_parts`)."""
        terms = self.retain_terms(model, inputs)
        return {**terms, "loss": self.weighted_retain(terms)}

    def weighted_retain(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        total = 0.0
        if "harmless" in terms:
            total = total + self.args.harmless_weight * terms["harmless"]
        if "retain" in terms:
            total = total + self.args.retain_weight * terms["retain"]
        return total

    def log_terms(self, terms: dict[str, torch.Tensor | float], mode: str | None = None) -> None:
        """Record loss terms; they are averaged and logged as ``loss/<term>`` at the next log."""
        mode = mode or ("train" if self.model.training else "eval")
        for name, value in terms.items():
            self._metrics[mode][name].append(
                float(value.detach()) if torch.is_tensor(value) else float(value)
            )

    def check_finite(self, terms: dict[str, torch.Tensor]) -> None:
        """Raise :class:`DivergenceError` naming the first term that is NaN or infinite."""
        if not self.args.check_finite:
            return
        for name, value in terms.items():
            v = float(value.detach()) if torch.is_tensor(value) else float(value)
            if not math.isfinite(v):
                raise DivergenceError(
                    f"Loss term {name!r} became {v} at step {self.state.global_step + 1}; training stopped before "
                    f"the update. Checkpoints already in {self.args.output_dir!r} are the last good state. Lower "
                    "the learning rate or the defense's loss weights, or use gradient clipping (max_grad_norm)."
                )

    # ------------------------------------------------------------------ the loss

    def compute_defense_loss(self, model, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return the defense's loss terms for one paired batch, with the total under ``"loss"``.

        Every other entry is logged as ``loss/<name>``. Subclasses must implement it.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement compute_defense_loss().")

    def defense_loss_parts(self, model, inputs: dict[str, torch.Tensor]) -> list:
        """The defense's loss in parts: a list of zero-argument functions, each returning a dict of terms
        with that part's total under ``"loss"``. The total loss is the sum of the parts.

        :meth:`training_step` computes each part and back-propagates it before computing the next, so
        only one part's activations are alive at a time (the harmless and harmful sides are separate
        sequences: holding both graphs would double activation memory). The default is
        :meth:`compute_defense_loss` as a single part; defenses whose terms split cleanly override this
        instead (see :class:`~immune_trainer.defenses.GradientAscentTrainer`).
        """
        return [lambda: self.compute_defense_loss(model, inputs)]

    def _checked(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        if "loss" not in terms:
            raise RuntimeError(f"{type(self).__name__}: every loss part needs its total under 'loss'.")
        self.check_finite(terms)
        self.log_terms({name: value for name, value in terms.items() if name != "loss"})
        return terms["loss"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "harmful_input_ids" not in inputs:
            # Plain supervised batches (evaluation sets): the ordinary LM loss.
            return super().compute_loss(model, inputs, return_outputs=return_outputs)
        loss = sum(self._checked(part()) for part in self.defense_loss_parts(model, inputs))
        return (loss, {"loss": loss}) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Back-propagate each loss part before computing the next (see :meth:`defense_loss_parts`).

        Gradients of the parts add up in ``.grad`` exactly as the gradient of their sum would; under DDP
        only the last part's backward synchronises gradients (``no_sync`` for the others). Under DeepSpeed,
        whose engine counts backward calls, the parts are summed and back-propagated once.
        """
        from accelerate.utils import DistributedType

        if (
            "harmful_input_ids" not in inputs
            or self.accelerator.distributed_type == DistributedType.DEEPSPEED
        ):
            return super().training_step(model, inputs, num_items_in_batch)
        inputs, scale = self.begin_training_step(model, inputs)
        parts = self.defense_loss_parts(model, inputs)
        if not parts:
            raise RuntimeError(f"{type(self).__name__}.defense_loss_parts returned no part.")
        total = 0.0
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            with self.compute_loss_context_manager():
                loss = self._checked(part())
            with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                self.accelerator.backward(loss / scale)
            total = total + loss.detach()
        return total / scale

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """6 x parameters x tokens over every sequence of the batch (both sides of the pairs)."""
        tokens = sum(
            int(v.numel()) for k, v in inputs.items() if k.endswith("input_ids") and torch.is_tensor(v)
        )
        return 6 * tokens * self.model.num_parameters(exclude_embeddings=True) if tokens else 0

    def create_model_card(
        self, model_name=None, dataset_name=None, tags=None, report=None, overwrite=False, **kwargs
    ):
        """Write README.md (the card of the immunization report given or found in ``output_dir``),
        ``badges/*.svg`` and ``attack_curves.png`` into ``args.output_dir``; ``push_to_hub()`` calls this.

        As in trl's trainers, only the main process writes, and the card names the trainer itself: its
        registered defense name (``_defense_name``, set by :func:`~immune_trainer.defenses.register_defense`),
        ``_name``, ``_paper`` and ``_tag_names`` go to :func:`immune_trainer.model_card.save_model_card`.
        A trainer class that is not registered itself names the defense the report records, described by
        the registered class it derives from. No report, no card (ReportError); a README.md not written by
        immune_trainer is replaced only with ``overwrite=True`` (OutputError otherwise)."""
        if hasattr(self, "is_world_process_zero") and not self.is_world_process_zero():
            return None
        from ..attacks import ATTACKS
        from ..model_card import folder_report, save_model_card

        tag_list = [tags] if isinstance(tags, str) else list(tags or [])
        tag_list += [t for t in getattr(self, "_tag_names", []) if t not in tag_list]
        base_model = None
        config = getattr(getattr(self, "model", None), "config", None)
        name_or_path = getattr(config, "_name_or_path", None)
        if name_or_path and not os.path.isdir(name_or_path):
            base_model = name_or_path
        hub_id = getattr(self, "hub_model_id", None) or getattr(self.args, "hub_model_id", None)
        folder = self.args.output_dir
        os.makedirs(folder, exist_ok=True)
        report = folder_report(folder, report)
        defense, described_by = self._card_defense(report)
        return save_model_card(
            folder,
            report,
            model_name=model_name or hub_id or os.path.basename(os.path.abspath(folder)),
            defense=defense,
            defense_title=(getattr(described_by, "_name", None) or defense) if described_by else None,
            defense_paper=dict(getattr(described_by, "_paper", {}) or {}) if described_by else None,
            conditions_paper=dict(IMMUNIZATION_PAPER),
            base_model=base_model,
            tags=tag_list,
            dataset_name=dataset_name,
            repo_id=hub_id,
            overwrite=overwrite,
            registered_attacks=sorted(ATTACKS),
        )

    def _card_defense(self, report) -> tuple[str | None, type | None]:
        """The defense the card names, and the trainer class whose ``_name`` and ``_paper`` describe it: this
        class when it is registered itself; else the defense the report records, described by the class
        of this trainer's bases registered under that name (None: the card gives just the name)."""
        own = vars(type(self)).get("_defense_name")
        if own:
            return own, type(self)
        name = (report.defense or {}).get("name")
        if not name:
            return None, None
        key = name.lower().replace("-", "_")  # as get_defense reads names
        for cls in type(self).__mro__:
            if vars(cls).get("_defense_name") == key:
                return key, cls
        return name, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if "loss" in logs or not any(k.startswith("eval_") for k in logs) else "eval"
        store = self._metrics[mode]
        names = sorted(store)
        if names:
            local = torch.tensor(
                [sum(store[n]) / len(store[n]) if store[n] else float("nan") for n in names],
                device=self.args.device,
                dtype=torch.float64 if self.args.device.type == "cpu" else torch.float32,
            )
            gathered = self.accelerator.gather(local.unsqueeze(0)).reshape(-1, len(names))
            means = torch.nanmean(gathered.double(), dim=0).tolist()
            prefix = "loss/" if mode == "train" else "eval_loss/"
            logs.update({f"{prefix}{n}": m for n, m in zip(names, means)})
        store.clear()
        super().log(logs, start_time)
