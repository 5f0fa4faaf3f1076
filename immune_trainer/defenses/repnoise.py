"""Representation Noising (RepNoise; Rosati et al. 2024, arXiv 2405.14577).

    L = w_h CE(harmless) + w_r CE(retain)
        + beta * (1/|S|) sum_{l in S} MMD(m * a_l^harm, m * eps_l)
        - alpha * log(1 + [CE(logits^harm) + sum_{l=0..N} CE(W_U norm(h_l^harm))] / (N + 1))

as in the reference's ``rep_noise_loss`` (domenicrosati/representation-noising,
``representation_noising/loss.py``):

- ``a_l^harm``: output of decoder layer ``l``'s MLP on the harmful batch; ``eps_l ~ N(0, I)`` of the
  same shape; ``m``: the response tokens (``labels != -100``; the reference takes the tokens where the paired
  harmful and refusal ids differ and zeroes logits instead of masking labels: proper label masking here). As in
  the reference, each example's masked activations are flattened into one vector and the Gaussian-kernel MMD
  (5 bandwidths) is taken across the batch (:func:`immune_trainer.losses.gaussian_kernel_mmd`): use batches
  of >= 2.
- ``h_l^harm``: the ``N + 1`` hidden states transformers returns (``h_0`` = embeddings, ``h_N`` the last),
  each read through the final norm and the unembedding ("logit lens"). The reference adds the output CE to
  the sum of these ``N + 1`` lens CEs and divides by ``N + 1`` (``len(hidden_states)``): ``N + 2`` terms over
  ``N + 1``. transformers returns ``h_N`` already normed, so the output is counted twice: once as the logits,
  once as ``W_U norm(h_N)`` (the final norm applied a second time, as the reference does).
- ``lens_output_once=True`` is the average this library used before (a departure from the reference): the
  mean of ``N + 1`` distinct CEs, the lens of ``h_0..h_{N-1}`` and the output CE counted once.
- ``lens_skip_embedding=True`` (a departure from the reference) leaves ``h_0`` out: one term fewer in the sum
  and in the divisor. ``layer_stride`` > 1 (a departure) keeps the lens of the selected layers' inputs and
  ``h_N``, the divisor their count.

Everything on the harmful side comes from ONE forward (``output_hidden_states=True`` plus MLP hooks that
exist only during that forward); the harmless side is a second forward, the retain set a third.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint

from ..errors import ConfigError
from ..losses import IGNORE_INDEX, fused_linear_cross_entropy, gaussian_kernel_mmd, masked_token_ce
from ..modeling import HookManager, unembed
from ..trainer import ImmunizationConfig, ImmunizationTrainer, check_non_negative, merge_parts
from .papers import REPNOISE_PAPER


@dataclass
class RepNoiseConfig(ImmunizationConfig):
    r"""Configuration of :class:`RepNoiseTrainer` (defaults from the paper).

    Parameters:
        alpha (`float`, defaults to `1.0`):
            Weight of the bounded ascent term ``log(1 + mean harmful CE over the logit lens)``.
        beta (`float`, defaults to `0.001`):
            Weight of the noise term (mean over layers of the MMD between harmful MLP outputs and noise).
        noise_std (`float`, defaults to `1.0`):
            Standard deviation of the Gaussian noise the harmful activations are pushed towards.
        layer_stride (`int`, defaults to `1`):
            Use every ``layer_stride``-th decoder layer (the last one always) in the noise and ascent
            terms. ``1`` is the paper; larger values trade fidelity for speed and memory on deep
            models (each logit-lens layer costs a ``(batch, seq, vocab)`` tensor).
        lens_skip_embedding (`bool`, defaults to `False`):
            Leave the embedding layer (``hidden_states[0]``) out of the averaged ascent term. A departure
            from the reference, which averages over the embeddings too: on a tied-embedding model the
            embeddings' logit lens has a huge CE (about 114 on SmolLM2-135M, against 2.05 at the output)
            that dominates the mean, so at equal ``alpha`` the push on the output loss is far weaker than
            plain bounded ascent (~70x, measured with the earlier average that counted the output CE once;
            the reference's average counts it twice). The noise (MMD) term is unchanged.
        learning_rate (`float`, defaults to `2e-5`):
            The paper's defense learning rate.
        lens_output_once (`bool`, defaults to `False`):
            Average the ascent term over ``N + 1`` distinct CEs (the lens of ``h_0..h_{N-1}`` and the output CE
            once), as this library did before. A departure from the reference, which sums the output CE and
            the lens of all ``N + 1`` hidden states (the output thus twice) and divides by ``N + 1``.
        lens_chunk_size (`int`, defaults to `0`):
            Rows per chunk of the fused logit-lens cross-entropy
            (:func:`immune_trainer.losses.fused_linear_cross_entropy`), which never holds more than one
            chunk's ``(rows, vocab)`` logits. ``0`` picks the chunk so its float32 logits take at most
            64 MiB; ``-1`` turns the fusion off (each layer's logits materialised and recomputed under
            activation checkpointing: slower, kept for comparison).

    Presets:
        :meth:`RepNoiseConfig.authors_demo` gives the budget of the authors' demo (lr 1e-4, cosine with
        10% warm-up, batch 4, one epoch over ~1k pairs = 250 steps, alpha 1, beta 0.001).
    """

    alpha: float = field(
        default=1.0,
        metadata={"help": "Weight of the bounded ascent term log(1 + mean harmful CE over the logit lens)."},
    )
    beta: float = field(
        default=0.001,
        metadata={"help": "Weight of the noise term: mean over layers of MMD(harmful MLP outputs, noise)."},
    )
    noise_std: float = field(
        default=1.0, metadata={"help": "Standard deviation of the Gaussian noise target."}
    )
    layer_stride: int = field(
        default=1,
        metadata={
            "help": "Use every k-th decoder layer (plus the last) in the noise and ascent terms; 1 = all "
            "layers, as in the paper. Larger values are faster on deep models."
        },
    )
    lens_skip_embedding: bool = field(
        default=False,
        metadata={
            "help": "Leave the embedding layer (hidden_states[0]) out of the averaged logit-lens ascent term. "
            "A departure from the reference (which includes it): on tied-embedding models the embeddings' "
            "lens CE (~114 on SmolLM2 vs ~2 at the output) dominates the mean and weakens the ascent ~70x."
        },
    )
    lens_output_once: bool = field(
        default=False,
        metadata={
            "help": "Average the ascent over N+1 distinct CEs (lens of h_0..h_{N-1}, output CE once), this "
            "library's earlier form. A departure: the reference sums the output CE and the lens of all N+1 "
            "hidden states (the output twice) and divides by N+1."
        },
    )
    learning_rate: float = field(default=2e-5, metadata={"help": "Defense learning rate (paper: 2e-5)."})
    lens_chunk_size: int = field(
        default=0,
        metadata={
            "help": "Rows per chunk of the fused logit-lens cross-entropy (0: automatic, a chunk's float32 "
            "logits <= 64 MiB; -1: no fusion, materialise each layer's logits under checkpointing)."
        },
    )

    #: The authors' demo budget (domenicrosati/representation-noising README): ~1k pairs, one epoch at
    #: batch 4 (250 steps), lr 1e-4, cosine schedule with 10% warm-up, alpha 1, beta 0.001.
    AUTHORS_DEMO = {
        "max_steps": 250,
        "num_train_epochs": 1.0,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-4,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.1,
        "alpha": 1.0,
        "beta": 0.001,
    }

    @classmethod
    def authors_demo(cls, **overrides) -> RepNoiseConfig:
        """The authors' demo budget: 250 steps (one epoch over ~1k pairs at batch 4), lr 1e-4, cosine
        schedule with 10% warm-up (``warmup_steps=0.1``, transformers' ratio form), alpha 1, beta 0.001.

        ``overrides`` replace any value (``output_dir`` at least; ``max_steps=-1`` trains one epoch over
        whatever data is given instead). Their README adds that a grid search over lr, alpha, beta and the
        number of samples is always needed: this is a starting point, not a tuned setting."""
        return cls(**{**cls.AUTHORS_DEMO, **overrides})

    @classmethod
    def search_space(cls) -> dict:
        """Around the paper (lr 2e-5, alpha 1, beta 0.001) and the authors' demo (lr 1e-4, 250 steps); their
        README calls for a grid over lr, alpha, beta and sample count. ``lens_skip_embedding`` (a departure
        from the reference) is left out: add it to a sweep deliberately."""
        return {
            **super().search_space(),
            "learning_rate": {"type": "float", "low": 1e-5, "high": 3e-4, "log": True},
            "alpha": {"type": "float", "low": 0.5, "high": 4.0, "log": True},
            "beta": {"type": "float", "low": 1e-4, "high": 1.0, "log": True},
            "layer_stride": {"type": "int", "low": 1, "high": 4, "log": False},
            "retain_weight": {"type": "float", "low": 0.1, "high": 10.0, "log": True},
        }

    def __post_init__(self):
        check_non_negative(self, "alpha", "beta", "noise_std")
        if not isinstance(self.lens_chunk_size, int) or self.lens_chunk_size < -1:
            raise ConfigError(
                f"lens_chunk_size must be a positive number of rows, 0 (automatic) or -1 (no fusion), got "
                f"{self.lens_chunk_size!r}."
            )
        if not isinstance(self.layer_stride, int) or self.layer_stride < 1:
            raise ConfigError(f"layer_stride must be a positive integer, got {self.layer_stride!r}.")
        super().__post_init__()


def selected_layers(num_layers: int, stride: int) -> list[int]:
    """Indices ``0, stride, 2*stride, ...`` plus the last layer (all layers when ``stride == 1``)."""
    chosen = list(range(0, num_layers, stride))
    if chosen[-1] != num_layers - 1:
        chosen.append(num_layers - 1)
    return chosen


class RepNoiseTrainer(ImmunizationTrainer):
    """Retain loss + ``beta`` * noise (MMD to Gaussian) - ``alpha`` * log(1 + logit-lens harmful CE)."""

    _tag_names = ["immune-trainer", "repnoise"]
    _name = "RepNoise"
    _paper = REPNOISE_PAPER
    config_class = RepNoiseConfig

    def defense_loss_parts(self, model, inputs):
        # Two parts, back-propagated one after the other: the retain side, then the harmful side.
        parts = [lambda: self.retain_part(model, inputs)] if self.has_retain_terms() else []
        return parts + [lambda: self._harmful_terms(model, inputs)]

    def compute_defense_loss(self, model, inputs):
        return merge_parts(part() for part in self.defense_loss_parts(model, inputs))

    def _harmful_terms(self, model, inputs):
        args = self.args
        structure = self.decoder_structure(model)
        layers = selected_layers(structure.num_layers, args.layer_stride)
        harmful = self.side(inputs, "harmful")
        labels = harmful["labels"]

        hooks = HookManager()
        mlp_out = hooks.capture([structure.mlp[i] for i in layers])
        with hooks:
            outputs = model(
                input_ids=harmful["input_ids"],
                attention_mask=harmful["attention_mask"],
                output_hidden_states=True,
                use_cache=False,
            )
        harmful_ce = masked_token_ce(outputs.logits, labels)

        # Noise term: per-example flattened masked MLP outputs vs masked Gaussian noise.
        mask = (labels != IGNORE_INDEX).unsqueeze(-1)
        # Each layer's noise, masked copies and kernel matrices are recomputed in the backward pass rather
        # than stored (the checkpoint replays the same random numbers).
        noise_terms = [
            torch.utils.checkpoint.checkpoint(
                _noise_mmd, mlp_out[j], mask, args.noise_std, use_reentrant=False
            )
            for j in range(len(layers))
        ]
        noise_term = torch.stack(noise_terms).mean()

        # Ascent term over the logit lens: the selected layers' inputs (hidden_states[i] is the input of layer
        # i, 0: the embeddings) and, as in the reference, the last hidden state (already normed by
        # transformers, normed again here as the reference does) beside the output CE. Only the positions that
        # predict a response token are unembedded, and each layer's (positions x vocab) logits are recomputed in
        # the backward pass instead of being stored: with a 50k vocabulary and 30 layers, storing them all
        # would take gigabytes.
        # lens_skip_embedding leaves hidden_states[0] (the embeddings) out.
        lens_layers = [i for i in layers if i > 0] if args.lens_skip_embedding else layers
        predict = labels[:, 1:] != IGNORE_INDEX
        targets = labels[:, 1:][predict]

        def lens(i):
            return _lens_ce(
                structure, outputs.hidden_states[i][:, :-1][predict], targets, args.lens_chunk_size
            )

        lens_ces = [lens(i) for i in lens_layers]
        if args.lens_output_once:  # N + 1 distinct terms, the output CE once (a departure)
            mean_ce = torch.stack([*lens_ces, harmful_ce]).mean()
        else:  # the reference: (output CE + the lens of every hidden state incl. the last) / their count
            lens_ces.append(lens(len(outputs.hidden_states) - 1))
            mean_ce = (harmful_ce + torch.stack(lens_ces).sum()) / len(lens_ces)
        ascent = torch.log1p(mean_ce)
        return {
            "harmful": harmful_ce,
            "noise": noise_term,
            "ascent": ascent,
            "loss": args.beta * noise_term - args.alpha * ascent,
        }


def _noise_mmd(act: torch.Tensor, mask: torch.Tensor, std: float) -> torch.Tensor:
    """MMD between the masked activations and masked Gaussian noise of the same shape."""
    m = mask.to(act.dtype)
    noise = torch.randn_like(act) * std
    return gaussian_kernel_mmd(act * m, noise * m)


def _lens_ce(structure, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Mean CE of the logit lens ``W_U final_norm(hidden)`` on the selected positions (hidden: (n, d),
    targets: (n,)).

    With a plain ``nn.Linear`` unembedding the final norm runs as usual and the unembedding + CE is the
    chunked :func:`~immune_trainer.losses.fused_linear_cross_entropy` (the same logit scaling and
    soft-capping as :func:`~immune_trainer.modeling.unembed`): no ``(n, vocab)`` tensor is ever held. Any
    other head (a LoRA- or quantisation-wrapped ``lm_head``), or ``chunk_size == -1``, takes the unfused
    path: the logits of :func:`unembed`, recomputed in the backward pass (activation checkpointing).
    """
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0
    head = structure.unembedding
    if chunk_size >= 0 and type(head) is torch.nn.Linear:
        normed = structure.final_norm(hidden) if structure.final_norm is not None else hidden
        return fused_linear_cross_entropy(
            normed,
            head.weight,
            targets,
            head.bias,
            chunk_size=chunk_size,
            logit_scale=structure.logit_multiplier,
            softcap=structure.final_logit_softcapping or None,
        ).float()
    return torch.utils.checkpoint.checkpoint(
        _unfused_lens_ce, structure, hidden, targets, use_reentrant=False
    )


def _unfused_lens_ce(structure, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = unembed(structure, hidden).float()
    return torch.nn.functional.cross_entropy(logits, targets)
