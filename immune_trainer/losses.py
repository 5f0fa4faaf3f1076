"""The defenses' loss terms as pure torch functions.

Each function states its formula and the paper it comes from. None of them touches a model: the
defense trainers run the forwards (with :mod:`immune_trainer.modeling`'s hooks) and combine these
terms. Token masks follow the library's convention: ``labels == -100`` marks tokens that carry no
loss; a ``mask`` argument is a ``(batch, seq)`` bool / 0-1 tensor aligned with the tensor it masks.

Layer 3 of the package: imports torch and :mod:`immune_trainer.errors` only.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .errors import ConfigError, DataError

__all__ = [
    "IGNORE_INDEX",
    "fused_linear_cross_entropy",
    "gaussian_kernel_mmd",
    "global_grad_norm",
    "masked_token_ce",
    "masked_token_ce_per_example",
    "negative_entropy",
    "perturbation_from_grads",
    "repnoise_ascent_term",
    "rerouting_loss",
    "response_prediction_mask",
    "retain_l2",
    "tar_step_weights",
]

IGNORE_INDEX = -100


# --------------------------------------------------------------------------- cross-entropy


def _shifted_token_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token CE of the shifted sequence and its validity mask, both ``(batch, seq - 1)``."""
    if logits.dim() != 3:
        raise DataError(f"logits must have shape (batch, seq, vocab), got {tuple(logits.shape)}.")
    if tuple(labels.shape) != tuple(logits.shape[:2]):
        raise DataError(
            f"labels of shape {tuple(labels.shape)} do not match logits of shape {tuple(logits.shape)}: "
            "labels need one entry per input token (pad them with -100)."
        )
    vocab = logits.shape[-1]
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].long()
    valid = shift_labels != IGNORE_INDEX
    if valid.any():
        bad = valid & ((shift_labels < 0) | (shift_labels >= vocab))
        if bad.any():
            raise DataError(
                f"labels contain token ids outside the model's vocabulary of {vocab} (other than -100): "
                "the tokenizer and the model do not match, or the padding id was not replaced by -100."
            )
    token_ce = F.cross_entropy(
        shift_logits.reshape(-1, vocab),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    return token_ce, valid


def masked_token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the tokens whose label is not -100.

    ``CE = -(1/|M|) sum_{(b,t) in M} log softmax(logits[b, t-1])[labels[b, t]]`` with
    ``M = {(b, t): labels[b, t] != -100}``: position ``t-1`` predicts token ``t`` as in every causal
    LM. This is the masked CE of RepNoise (Rosati et al. 2024, "Representation noising: a defence
    mechanism against harmful finetuning") with proper label masking instead of the reference
    code's multiplication of the logits by the mask. Computed in float32.

    Args:
        logits: ``(batch, seq, vocab)``.
        labels: ``(batch, seq)`` token ids, ``-100`` on tokens that carry no loss.

    Returns:
        A scalar; ``0`` (still attached to the graph) when no token carries a label.

    Raises:
        DataError: shapes disagree, or a label lies outside the vocabulary.
    """
    token_ce, valid = _shifted_token_ce(logits, labels)
    count = valid.sum()
    return token_ce.sum() / count.clamp(min=1)


def masked_token_ce_per_example(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example version of :func:`masked_token_ce`: shape ``(batch,)``.

    Example ``b`` gets the mean CE over its own labelled tokens (``0`` when it has none).
    """
    token_ce, valid = _shifted_token_ce(logits, labels)
    return token_ce.sum(dim=1) / valid.sum(dim=1).clamp(min=1)


# --------------------------------------------------------------------------- fused linear + cross-entropy

#: Default budget of one chunk's float32 logits in :func:`fused_linear_cross_entropy` (64 MiB).
FUSED_CE_CHUNK_BYTES = 64 * 2**20


def fused_ce_chunk_rows(vocab_size: int, budget_bytes: int = FUSED_CE_CHUNK_BYTES) -> int:
    """Rows per chunk so that one chunk's ``(rows, vocab)`` float32 logits take at most ``budget_bytes``
    (rounded down to a multiple of 16 rows, which matrix units tile well, when above 16)."""
    rows = max(1, budget_bytes // (4 * max(1, vocab_size)))
    return rows - rows % 16 if rows > 16 else rows


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    chunk_size: int = 0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of ``logits = hidden @ weight.T + bias`` without materialising the logits.

    ``CE = (1/|M|) sum_{i in M} [logsumexp_v z_{i,v} - z_{i,t_i}]`` over the rows ``M = {i: t_i != -100}``,
    with ``z = logit_scale * (hidden @ weight.T + bias)``, then ``z = softcap * tanh(z / softcap)`` when
    ``softcap`` is given (Gemma-2/3). The rows are processed ``chunk_size`` at a time: the forward keeps
    only each row's logsumexp; the backward recomputes one chunk's logits at a time and forms
    ``grad_hidden = G @ weight`` and ``grad_weight = sum_chunks G^T @ hidden`` with
    ``G = (softmax(z) - onehot(t)) / |M|``. Peak extra memory is one chunk's ``(rows, vocab)`` logits
    instead of the whole ``(n, vocab)`` tensor and its softmax -- the same idea as Liger Kernel's
    ``FusedLinearCrossEntropy`` and Apple's Cut Cross-Entropy (Wijmans et al. 2025), in plain torch so it
    runs on any device. The cost is one extra ``hidden @ weight.T`` per chunk in the backward.

    Targets are aligned with the rows (shift them before calling for next-token prediction). Under
    ``torch.autocast`` the matrix products run in the autocast dtype; the softmax and the sums in float32.
    ``weight`` may be a tied embedding: its gradient is returned like any other and autograd adds it to
    the embedding's.

    Args:
        hidden: ``(..., hidden)``.
        weight: ``(vocab, hidden)`` (an ``nn.Linear``'s weight).
        targets: ``(...)`` token ids matching ``hidden``'s leading dimensions, ``-100`` on ignored rows.
        bias: optional ``(vocab,)``.
        chunk_size: rows per chunk; ``0`` picks the largest chunk whose float32 logits fit in 64 MiB
            (:func:`fused_ce_chunk_rows`).
        logit_scale: a constant the logits are multiplied by (Cohere / Granite logit scaling).
        softcap: Gemma-2/3 final-logit soft-capping value, or ``None``.

    Returns:
        A float32 scalar (float64 for float64 inputs); ``0`` (attached to the graph) when no row has a target.

    Raises:
        DataError: shapes disagree, or a target lies outside the vocabulary.
        ConfigError: a negative chunk size or a non-positive softcap.
    """
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise DataError(
            f"hidden of shape {tuple(hidden.shape)} cannot be multiplied by a weight of shape "
            f"{tuple(weight.shape)}: the weight must be (vocab, hidden)."
        )
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise DataError(
            f"targets of shape {tuple(targets.shape)} do not match hidden of shape {tuple(hidden.shape)}: "
            "give one target per row (-100 to ignore it)."
        )
    vocab = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise DataError(f"bias must have shape ({vocab},), got {tuple(bias.shape)}.")
    if not isinstance(chunk_size, int) or chunk_size < 0:
        raise ConfigError(f"chunk_size must be a non-negative integer (0: automatic), got {chunk_size!r}.")
    if softcap is not None and not softcap > 0:
        raise ConfigError(f"softcap must be positive or None, got {softcap}.")
    targets = targets.reshape(-1).long()
    valid = targets != IGNORE_INDEX
    if bool((valid & ((targets < 0) | (targets >= vocab))).any()):
        raise DataError(
            f"targets contain token ids outside the vocabulary of {vocab} (other than -100): the tokenizer "
            "and the model do not match, or the padding id was not replaced by -100."
        )
    rows = chunk_size or fused_ce_chunk_rows(vocab)
    return _FusedLinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets, rows, float(logit_scale), softcap
    )


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    device_type = tensors[0].device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _chunk_logits(h, w, b, scale, softcap, acc):
    """One chunk's logits in ``acc`` (float32, or float64 for float64 inputs) and, with soft-capping,
    ``tanh(z / cap)`` (for the backward)."""
    z = (h @ w.T if b is None else torch.addmm(b, h, w.T)).to(acc)
    if scale != 1.0:
        z = z * scale
    if softcap is None:
        return z, None
    t = torch.tanh(z / softcap)
    return t * softcap, t


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Chunked linear + cross-entropy; see :func:`fused_linear_cross_entropy`."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows, scale, softcap):
        dtype = _compute_dtype(hidden, weight, bias)
        acc = torch.promote_types(dtype, torch.float32)
        n = hidden.shape[0]
        valid = targets != IGNORE_INDEX
        count = valid.sum()
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            for start in range(0, n, rows):
                end = min(start + rows, n)
                logits, _ = _chunk_logits(hidden[start:end].to(dtype), w, b, scale, softcap, acc)
                chunk_lse = torch.logsumexp(logits, dim=-1)
                lse[start:end] = chunk_lse
                picked = logits.gather(1, targets[start:end].clamp(min=0).unsqueeze(1)).squeeze(1)
                total += torch.where(valid[start:end], chunk_lse - picked, 0.0).sum()
        ctx.save_for_backward(hidden, weight, bias, targets, lse, count)
        ctx.config = (rows, scale, softcap, dtype, acc)
        return total / count.clamp(min=1)

    @staticmethod
    def backward(ctx, grad_output):
        hidden, weight, bias, targets, lse, count = ctx.saved_tensors
        rows, scale, softcap, dtype, acc = ctx.config
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n = hidden.shape[0]
        valid = targets != IGNORE_INDEX
        coeff = grad_output.to(acc) / count.clamp(min=1)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            for start in range(0, n, rows):
                end = min(start + rows, n)
                h = hidden[start:end].to(dtype)
                logits, t = _chunk_logits(h, w, b, scale, softcap, acc)
                # d CE / d logits = softmax - onehot on valid rows, zero elsewhere; logits reused in place.
                g = logits.sub_(lse[start:end, None]).exp_()
                chunk_valid = valid[start:end]
                rows_idx = torch.arange(end - start, device=g.device)
                g[rows_idx, targets[start:end].clamp(min=0)] -= 1.0
                g.mul_((chunk_valid.to(acc) * coeff).unsqueeze(1))
                if t is not None:
                    g.mul_(1.0 - t * t)
                if scale != 1.0:
                    g.mul_(scale)
                if need_b:
                    grad_b += g.sum(dim=0)
                g = g.to(dtype)
                if need_h:
                    grad_h[start:end] = (g @ w).to(hidden.dtype)
                if need_w:
                    if dtype == acc:
                        grad_w.addmm_(g.T, h)
                    else:
                        grad_w += (g.T @ h).to(acc)
        return (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
            None,
            None,
            None,
        )


def response_prediction_mask(labels: torch.Tensor) -> torch.Tensor:
    """Bool mask aligned with the *logits* positions that predict a labelled token.

    ``mask[b, t] = labels[b, t + 1] != -100`` and the last position is ``False``. Pass it to
    :func:`negative_entropy` to score the next-token distributions over a response.
    """
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


# --------------------------------------------------------------------------- RepNoise


def gaussian_kernel_mmd(
    x: torch.Tensor, y: torch.Tensor, num_kernels: int = 5, kernel_mul: float = 2.0
) -> torch.Tensor:
    """Biased estimate of the squared MMD between samples ``x`` and ``y`` with a multi-bandwidth
    Gaussian kernel, as RepNoise uses it (Rosati et al. 2024, following Gretton et al. 2012).

    With ``z = concat(x, y)`` (``n = n_x + n_y`` samples) and ``D_ij = ||z_i - z_j||^2``:
    ``s = sum_{i != j} D_ij / (n^2 - n) / kernel_mul ** (num_kernels // 2)``,
    ``K(a, b) = sum_{k=0}^{num_kernels-1} exp(-||a - b||^2 / (s * kernel_mul ** k))`` and
    ``MMD^2 = mean K(x, x') + mean K(y, y') - 2 mean K(x, y)`` (all pairs, diagonals included).
    As in the reference code the bandwidth ``s`` is treated as a constant (no gradient flows
    through it). RepNoise flattens each example's masked MLP activations into one vector, so the
    samples are examples; inputs with more than two dimensions are flattened the same way.

    A batch of one example per side is degenerate: the only distance sets the bandwidth, so the
    value is a constant (gradients are not zero but carry little signal). A ``UserWarning`` says so;
    use at least two examples per side.

    Args:
        x: ``(n_x, features...)``.
        y: ``(n_y, features...)`` with the same feature shape.
        num_kernels: number of bandwidths (5 in RepNoise).
        kernel_mul: ratio between consecutive bandwidths (2 in RepNoise).

    Returns:
        A scalar (float32).
    """
    if num_kernels < 1 or kernel_mul <= 0:
        raise ConfigError(f"num_kernels must be >= 1 and kernel_mul > 0, got {num_kernels} and {kernel_mul}.")
    if x.dim() < 2 or y.dim() < 2 or x.shape[1:] != y.shape[1:]:
        raise ConfigError(
            f"MMD needs two samples of shape (n, features...) with the same features, got {tuple(x.shape)} "
            f"and {tuple(y.shape)}."
        )
    n_x, n_y = x.shape[0], y.shape[0]
    if n_x == 0 or n_y == 0:
        raise ConfigError("MMD needs at least one example on each side.")
    if n_x == 1 and n_y == 1:
        warnings.warn(
            "gaussian_kernel_mmd on one example per side is degenerate (its value is a constant); "
            "use a batch of at least 2 examples.",
            UserWarning,
            stacklevel=2,
        )
    z = torch.cat([x.reshape(n_x, -1), y.reshape(n_y, -1)], dim=0).float()
    n = z.shape[0]
    # Squared distances through the Gram matrix: O(n^2) memory instead of O(n^2 * features).
    sq_norms = (z * z).sum(dim=1)
    dist = (sq_norms[:, None] + sq_norms[None, :] - 2.0 * (z @ z.T)).clamp(min=0.0)
    off_diagonal = 1.0 - torch.eye(n, device=z.device, dtype=z.dtype)
    dist = dist * off_diagonal
    bandwidth = dist.detach().sum() / (n * n - n)
    bandwidth = bandwidth / kernel_mul ** (num_kernels // 2)
    bandwidth = bandwidth.clamp(min=torch.finfo(z.dtype).tiny)
    kernel = sum(torch.exp(-dist / (bandwidth * kernel_mul**k)) for k in range(num_kernels))
    k_xx = kernel[:n_x, :n_x].mean()
    k_yy = kernel[n_x:, n_x:].mean()
    k_xy = kernel[:n_x, n_x:].mean()
    return k_xx + k_yy - 2.0 * k_xy


def repnoise_ascent_term(ce_values: Sequence[torch.Tensor]) -> torch.Tensor:
    """RepNoise's gradient-ascent term ``log(mean(ce_values) + 1)`` (Rosati et al. 2024).

    ``ce_values`` are the harmful CE of the final logits and of every hidden state read through
    the final norm and the unembedding; the defense subtracts ``alpha`` times this term, which
    grows without the unbounded blow-up of a plain negated CE.
    """
    if len(ce_values) == 0:
        raise ConfigError("repnoise_ascent_term needs at least one cross-entropy value.")
    return torch.log(torch.stack([torch.as_tensor(v).float().reshape(()) for v in ce_values]).mean() + 1.0)


# --------------------------------------------------------------------------- TAR


def negative_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked positions of ``sum_v p_v log p_v`` (the negated entropy of the next-token
    distribution): TAR's tamper-resistance loss (Tamirisa et al. 2024, "Tamper-resistant safeguards
    for open-weight LLMs"). Minimising it maximises the entropy.

    Args:
        logits: ``(batch, seq, vocab)``.
        mask: ``(batch, seq)`` bool / 0-1, aligned with the logits positions (see
            :func:`response_prediction_mask`).

    Returns:
        A scalar in ``[-log(vocab), 0]``; ``0`` when the mask is empty.
    """
    _check_mask(mask, logits.shape[:2], "logits")
    log_p = F.log_softmax(logits.float(), dim=-1)
    neg_ent = (log_p.exp() * log_p).sum(dim=-1)
    weights = mask.to(neg_ent.dtype)
    return (neg_ent * weights).sum() / weights.sum().clamp(min=1)


def tar_step_weights(K: int, every: int = 4, scale: float = 0.0625) -> list[float]:
    """TAR's weight of each inner step's tamper-resistance gradient (Tamirisa et al. 2024).

    The adversary runs ``K`` inner steps ``k = 0..K-1``. As in the reference training loop, the
    tamper-resistance gradient is accumulated after every ``every``-th adversary step
    (``(k + 1) % every == 0``, so the last step counts when ``every`` divides ``K``), weighted by
    ``w_k = exp(scale * (k - (K - 1)))``: later, more adapted, steps weigh more and the last weighs 1.

    Returns:
        A list of length ``K``, indexed by inner step: ``w_k`` on the accumulated steps and ``0.0``
        on the others (skip those).

    Raises:
        ConfigError: ``K < every`` (no step would be accumulated) or non-positive arguments.
    """
    if K < 1 or every < 1:
        raise ConfigError(f"tar_step_weights needs K >= 1 and every >= 1, got K={K}, every={every}.")
    if K < every:
        raise ConfigError(
            f"With K={K} inner steps and a tamper-resistance gradient every {every} steps no step is "
            f"accumulated: raise K to at least {every} or lower `every`."
        )
    return [math.exp(scale * (k - (K - 1))) if (k + 1) % every == 0 else 0.0 for k in range(K)]


def retain_l2(h: torch.Tensor, h_orig: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked tokens of ``||h - h_orig||_2`` (per-token L2 distance over the hidden size).

    TAR's representation-retain term and the circuit breakers' retain loss (Zou et al. 2024,
    "Improving alignment and robustness with circuit breakers"). ``h`` and ``h_orig`` are
    ``(batch, seq, hidden)``; ``0`` when the mask is empty.
    """
    _check_pair(h, h_orig)
    _check_mask(mask, h.shape[:2], "hidden states")
    dist = torch.linalg.vector_norm(h.float() - h_orig.float(), dim=-1)
    weights = mask.to(dist.dtype)
    return (dist * weights).sum() / weights.sum().clamp(min=1)


# --------------------------------------------------------------------------- circuit breakers


def rerouting_loss(h: torch.Tensor, h_orig: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked tokens of ``ReLU(cos(h, h_orig))``: representation rerouting (Zou et al.
    2024, circuit breakers). Zero once the harmful representations are orthogonal to (or point
    away from) the original model's; positive while they stay aligned.
    """
    _check_pair(h, h_orig)
    _check_mask(mask, h.shape[:2], "hidden states")
    cos = F.cosine_similarity(h.float(), h_orig.float(), dim=-1, eps=1e-8)
    weights = mask.to(cos.dtype)
    return (F.relu(cos) * weights).sum() / weights.sum().clamp(min=1)


# --------------------------------------------------------------------------- Vaccine / Booster


def global_grad_norm(grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """``||g||_2`` over all tensors together (``None`` entries count as zero)."""
    present = [g for g in grads if g is not None]
    if not present:
        raise ConfigError("No gradients given: did the loss depend on the hooked tensors / parameters?")
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in present]))


def perturbation_from_grads(
    grads: Sequence[torch.Tensor | None], rho: float, eps: float = 1e-12
) -> list[torch.Tensor | None]:
    """Vaccine's perturbation ``eps_l = rho * g_l / ||g||_2`` (Huang et al. 2024, "Vaccine:
    perturbation-aware alignment for large language models against harmful fine-tuning").

    ``g_l`` is the gradient of the alignment loss at layer ``l``'s hidden output and the norm is
    taken over ALL layers together, so the perturbations' joint L2 norm is ``rho``. When every
    gradient is zero the perturbations are zero (no division by zero). Results are detached and
    keep each gradient's dtype; ``None`` stays ``None``.
    """
    if rho < 0:
        raise ConfigError(f"rho must be >= 0, got {rho}.")
    norm = global_grad_norm(grads).detach()
    # All-zero gradients give zero perturbations: 0 * rho / eps. No host sync.
    scale = rho / norm.clamp(min=eps)
    return [None if g is None else (g.detach().float() * scale).to(g.dtype) for g in grads]


# --------------------------------------------------------------------------- checks


def _check_pair(h: torch.Tensor, h_orig: torch.Tensor) -> None:
    if h.shape != h_orig.shape:
        raise ConfigError(
            f"Hidden states of shape {tuple(h.shape)} and {tuple(h_orig.shape)} cannot be compared: "
            "run both models on the same batch and read the same layer."
        )
    if h.dim() != 3:
        raise ConfigError(f"Hidden states must have shape (batch, seq, hidden), got {tuple(h.shape)}.")


def _check_mask(mask: torch.Tensor, shape: Sequence[int], what: str) -> None:
    if tuple(mask.shape) != tuple(shape):
        raise DataError(
            f"mask of shape {tuple(mask.shape)} does not match the {what}' (batch, seq) = {tuple(shape)}."
        )
