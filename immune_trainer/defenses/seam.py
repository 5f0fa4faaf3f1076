"""SEAM: self-destructive language models (Wang et al., arXiv 2505.12186, ICLR 2026).

SEAM couples the gradients of harmful and benign data so that they point in opposite directions: an
attacker who descends on harmful data then ascends on benign data, and a strong attack destroys the
model's capability along with its safety. With ``g_a = grad L_a`` (the harmful fine-tuning loss: CE of
the harmful responses) and ``g_b = grad L_b`` (CE on benign data), the objective is::

    L = L_ul + alpha * L_up + beta * L_sd

    L_ul = -log(1 + mean over the logit lens of the harmful CE)     (RepNoise's bounded ascent)
    L_up = CE of the refusals to the harmful prompts                  (alignment / utility)
    L_sd = cos(g_a, g_b) = <g_a, g_b> / (||g_a|| ||g_b||)            (self-destruction coupling)

``grad L_sd`` needs Hessian-vector products. Writing ``c = cos(g_a, g_b)`` and ``u = g / ||g||``::

    grad L_sd = H_a v_a / ||g_a|| + H_b v_b / ||g_b||,    v_a = u_b - c u_a,  v_b = u_a - c u_b

and each ``H v`` is estimated without the Hessian by a forward difference of gradients,
``H v ~ (grad L(theta + eps v) - grad L(theta)) / eps``. Its error is
``(eps / 2) * D3L(theta)[v, v] + O(eps^2)`` (Taylor's theorem; ``D3L[v, v]`` the third derivative applied
twice to ``v``), so the coupling gradient's estimate is off by at most
``beta * eps / 2 * (||D3L_a[v_a, v_a]|| / ||g_a|| + ||D3L_b[v_b, v_b]|| / ||g_b||) + O(eps^2)``, with
``||v_a||^2 = ||v_b||^2 = 1 - c^2 <= 1``: linear in ``eps`` (tests/test_defense_seam.py checks the
estimate against autograd's exact gradient of ``cos(g_a, g_b)`` within this bound).

Formula, weights and defaults from the reference code (ZJUWYH/seam, ``src/core/trainer.py`` and
``config/train.yaml``): alpha 1, beta 0.01, eps 1e-3; full fine-tuning at lr 2e-5, batch 4, cosine
schedule with 10% warm-up, no gradient clipping, one epoch over 8000 harmful examples. Set
``lr_scheduler_type``, ``warmup_steps`` (0.1: a ratio), ``max_grad_norm`` and the budget for that setting
(``SEAMConfig.reference()`` does).

Cost per step: five forwards and backwards (the reference runs six): the harmful forward gives both
``L_ul``'s backward and ``g_a`` (``torch.autograd.grad``, nothing written to ``.grad``), then ``g_b`` on a
benign batch, the two perturbed passes, and the refusal pass. Memory: two parameter-sized buffers
(``g_a``, ``g_b``) beyond a plain step; the perturbations are applied to the weights in place and taken
off again (``w = (w + eps v) - eps v``, exact to float rounding) instead of the reference's copy of the
weights.

Departures from the reference:

- benign data: the reference's benign set is its own benign instruction data; here it is the trainer's
  ``retain_dataset`` (required). It enters only through the coupling, as in the reference: the retain
  CE term of the other defenses is off by default here (``retain_weight=0``; set it to add one).
- masks: the reference's masked CE multiplies the logits by a mask of the tokens where the harmful and
  refusal sequences differ and drops token id 0; here labels are ``-100`` on everything but the
  response (the library's masks), on all three losses.
- ``L_ul``: the reference sums the output CE and the logit-lens CE of EVERY hidden state (the last one,
  already normed by the model, normed a second time) and divides by the number of hidden states (one
  fewer than the terms summed). Here the mean is over the embeddings and every decoder layer's input
  read through the final norm and unembedding plus the output CE: ``N + 1`` terms for ``N`` layers, as
  in the library's RepNoise.
- the reference's DataParallel on all but two GPUs and its gradient copies on the last two are
  replaced by the Trainer's own devices; under DDP each process estimates the coupling on its own
  micro-batch (the reference supports one process only) and the accumulated gradients are averaged.
- the logged ``loss`` is the whole objective ``L_ul + alpha L_up + beta cos`` (the reference logs
  ``L_ul + alpha L_up``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..losses import global_grad_norm, masked_token_ce
from ..modeling import unembed
from ..trainer import ImmunizationConfig, ImmunizationTrainer, check_non_negative

IGNORE_INDEX = -100

SEAM_PAPER = {
    "title": "Self-Destructive Language Model",
    "id": "2505.12186",
    "citation": (
        "@article{wang2025selfdestructive,\n"
        "  title={Self-Destructive Language Model},\n"
        "  author={Wang, Yuhui and Zhu, Rongyi and Wang, Ting},\n"
        "  journal={arXiv preprint arXiv:2505.12186},\n"
        "  year={2025}\n}"
    ),
}


@dataclass
class SEAMConfig(ImmunizationConfig):
    r"""Configuration of :class:`SEAMTrainer` (defaults from the reference's ``config/train.yaml``).

    The weight ``alpha`` of the refusal loss ``L_up`` is the base config's `harmless_weight` (reference 1).

    Parameters:
        beta (`float`, defaults to `0.01`):
            Weight of the self-destruction coupling ``cos(grad L_harmful, grad L_benign)``.
        epsilon (`float`, defaults to `1e-3`):
            Step of the finite differences that estimate the coupling's Hessian-vector products (the
            estimate's error is linear in it).
        retain_weight (`float`, defaults to `0.0`):
            Weight of a plain CE on the retain (benign) set; the reference uses the benign data only in the
            coupling.
    """

    beta: float = field(
        default=0.01,
        metadata={
            "help": "Weight of the self-destruction coupling cos(grad L_harmful, grad L_benign) (reference 0.01)."
        },
    )
    epsilon: float = field(
        default=1e-3,
        metadata={
            "help": "Finite-difference step of the Hessian-free estimate of the coupling's gradient (reference "
            "1e-3; its error is linear in epsilon)."
        },
    )
    retain_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of a plain CE on the retain (benign) set; 0 as in the reference, where benign data "
            "enters only through the coupling term."
        },
    )
    learning_rate: float = field(
        default=2e-5, metadata={"help": "Learning rate (reference: 2e-5, full fine-tuning)."}
    )

    @classmethod
    def reference(cls, **overrides) -> SEAMConfig:
        """The reference's training setting: lr 2e-5, batch 4, cosine with 10% warm-up, no gradient
        clipping, one epoch (the reference's 8000 examples give 2000 steps)."""
        values = dict(
            learning_rate=2e-5,
            per_device_train_batch_size=4,
            lr_scheduler_type="cosine",
            warmup_steps=0.1,  # transformers 5: a float below 1 is a ratio
            max_grad_norm=0.0,
            num_train_epochs=1,
            weight_decay=0.0,
        )
        values.update(overrides)
        return cls(**values)

    @classmethod
    def search_space(cls) -> dict:
        """Around the reference: lr 2e-5, beta 0.01, eps 1e-3, alpha (harmless_weight) 1."""
        return {
            **super().search_space(),
            "learning_rate": {"type": "float", "low": 5e-6, "high": 2e-4, "log": True},
            "beta": {"type": "float", "low": 1e-3, "high": 1.0, "log": True},
            "epsilon": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
            "harmless_weight": {"type": "float", "low": 0.1, "high": 10.0, "log": True},
        }

    def __post_init__(self):
        check_non_negative(self, "beta")
        if not math.isfinite(self.epsilon) or self.epsilon <= 0:
            raise ConfigError(
                f"epsilon must be a finite positive number (the finite-difference step), got {self.epsilon}."
            )
        super().__post_init__()
        if self.fp16:
            raise ConfigError(
                "SEAM adds the finite-difference gradients to .grad directly, which fp16's loss scaling does "
                "not see: use bf16 or float32."
            )


def logit_lens_ascent(model, structure, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log(1 + mean CE), output CE)`` of the harmful responses in ``batch``: the mean is over the output
    logits and the logit lens (final norm + unembedding) of the embeddings and of every decoder layer's
    input. SEAM's ``L_ul`` is minus the first value."""
    labels = batch["labels"]
    outputs = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        output_hidden_states=True,
        use_cache=False,
    )
    output_ce = masked_token_ce(outputs.logits, labels)
    predict = labels[:, 1:] != IGNORE_INDEX
    targets = labels[:, 1:][predict]
    ces = [
        torch.utils.checkpoint.checkpoint(
            _lens_ce, structure, hidden[:, :-1][predict], targets, use_reentrant=False
        )
        for hidden in outputs.hidden_states[:-1]
    ]
    ces.append(output_ce)
    return torch.log1p(torch.stack([c.float() for c in ces]).mean()), output_ce


def _lens_ce(structure, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0
    return torch.nn.functional.cross_entropy(unembed(structure, hidden).float(), targets)


def _dot(xs, ys) -> torch.Tensor:
    return sum((x.double() * y.double()).sum() for x, y in zip(xs, ys))


class SEAMTrainer(ImmunizationTrainer):
    """SEAM: ``-log(1 + harmful CE over the logit lens) + alpha CE(refusals) + beta cos(g_harmful, g_benign)``,
    the coupling's gradient estimated Hessian-free by finite differences (five passes per step).

    Needs a ``retain_dataset`` (the benign data whose gradient the harmful gradient is coupled to).
    """

    _tag_names = ["immune-trainer", "seam", "self-destructive"]
    _name = "SEAM (self-destructive language model)"
    _paper = SEAM_PAPER
    config_class = SEAMConfig

    def __init__(self, model=None, args: SEAMConfig | None = None, *pos, **kwargs):
        if args is not None and not isinstance(args, SEAMConfig):
            raise ConfigError(f"SEAMTrainer needs a SEAMConfig, got {type(args).__name__}.")
        super().__init__(model, args, *pos, **kwargs)
        if self.retain_dataset is None:
            raise ConfigError(
                "SEAM couples the harmful gradient to the gradient of benign data: pass retain_dataset= "
                "(benign instruction data; the CLI's --retain_dataset)."
            )

    def training_step(self, model, inputs, num_items_in_batch=None):
        args = self.args
        inputs, steps = self.begin_training_step(model, inputs)
        scale = 1.0 / steps
        params = [p for p in model.parameters() if p.requires_grad]
        harmful = self.side(inputs, "harmful")
        benign = self._next_retain_batch()
        structure = self.decoder_structure(model)
        terms: dict[str, torch.Tensor] = {}
        # Pass 5's weights: alpha (harmless_weight) on the refusals, retain_weight on the same benign batch.
        final_sync = args.harmless_weight > 0 or args.retain_weight > 0
        # The last backward of the step synchronises gradients under DDP: pass 5, else pass 4, else pass 1.
        sync_first = not final_sync and args.beta == 0

        # Pass 1 (local): L_ul's backward, and g_a = grad L_a from the same forward (L_a = its output CE).
        with (
            contextlib.nullcontext() if sync_first else self.no_sync(model),
            self.compute_loss_context_manager(),
        ):
            ascent, harm = logit_lens_ascent(model, structure, harmful)
            g_a = list(torch.autograd.grad(harm, params, retain_graph=True, allow_unused=True))
            self.accelerator.backward(-ascent * scale)
        terms["harmful"], terms["ascent"] = harm.detach(), ascent.detach()

        # Pass 2 (no .grad written): g_b = grad L_b on a benign batch.
        with self.no_sync(model), self.compute_loss_context_manager():
            benign_loss, _ = self.lm_loss(model, benign)
            g_b = list(torch.autograd.grad(benign_loss, params, allow_unused=True))
        terms["benign"] = benign_loss.detach()
        g_a = [torch.zeros_like(p) if g is None else g for g, p in zip(g_a, params)]
        g_b = [torch.zeros_like(p) if g is None else g for g, p in zip(g_b, params)]

        with torch.no_grad():
            norm_a, norm_b = global_grad_norm(g_a).double(), global_grad_norm(g_b).double()
            cosine = _dot(g_a, g_b) / (norm_a * norm_b + 1e-8)  # the reference's 1e-8
        terms["grad_cosine"] = cosine.float()
        if args.beta > 0:
            eps = args.epsilon
            na, nb, c = float(norm_a.clamp(min=1e-12)), float(norm_b.clamp(min=1e-12)), float(cosine)
            k_a, k_b = args.beta * scale / (eps * na), args.beta * scale / (eps * nb)
            with torch.no_grad():
                # The "- grad L(theta)" halves of the two differences, added now: .grad only accumulates
                # until the synchronised backward.
                for p, ga, gb in zip(params, g_a, g_b):
                    delta = -(k_a * ga + k_b * gb)
                    p.grad = delta.to(p.dtype) if p.grad is None else p.grad.add_(delta)
            # Pass 3: H_a v_a / ||g_a|| ~ (grad L_a(theta + eps v_a) - g_a) / (eps ||g_a||), v_a = u_b - c u_a.
            with self._shifted(params, g_b, eps / nb, g_a, -eps * c / na):
                with self.no_sync(model), self.compute_loss_context_manager():
                    harm_shifted, _ = self.lm_loss(model, harmful)
                    self.accelerator.backward(harm_shifted * k_a)
            # Pass 4: H_b v_b / ||g_b|| ~ (grad L_b(theta + eps v_b) - g_b) / (eps ||g_b||), v_b = u_a - c u_b.
            with self._shifted(params, g_a, eps / na, g_b, -eps * c / nb):
                with (
                    contextlib.nullcontext() if not final_sync else self.no_sync(model),
                    self.compute_loss_context_manager(),
                ):
                    benign_shifted, _ = self.lm_loss(model, benign)
                    self.accelerator.backward(benign_shifted * k_b)
            terms["harmful_shifted"], terms["benign_shifted"] = harm_shifted.detach(), benign_shifted.detach()
        del g_a, g_b

        # Pass 5 (synchronised): alpha L_up (harmless_weight x refusal CE) and the optional retain CE.
        objective = harm.new_zeros(())
        if final_sync:
            with self.compute_loss_context_manager():
                if args.harmless_weight > 0:
                    terms["harmless"], _ = self.lm_loss(model, self.side(inputs, "harmless"))
                    objective = objective + args.harmless_weight * terms["harmless"]
                if args.retain_weight > 0:
                    terms["retain"], _ = self.lm_loss(model, benign)
                    objective = objective + args.retain_weight * terms["retain"]
        loss_value = objective.detach() - terms["ascent"] + args.beta * terms["grad_cosine"]
        self.check_finite({**terms, "loss": loss_value})
        self.log_terms(terms, mode="train")
        if final_sync and objective.requires_grad:
            self.accelerator.backward(objective * scale)
        return (loss_value * scale).detach()

    @staticmethod
    @contextlib.contextmanager
    def _shifted(params, x, a: float, y, b: float):
        """Weights moved to ``w + a x + b y`` inside the block, put back after it (also on error)."""
        with torch.no_grad():
            torch._foreach_add_(params, x, alpha=a)
            torch._foreach_add_(params, y, alpha=b)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_add_(params, y, alpha=-b)
                torch._foreach_add_(params, x, alpha=-a)
