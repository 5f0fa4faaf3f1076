"""The defenses' loss terms against small independent reference computations."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from immune_trainer.errors import ConfigError, DataError
from immune_trainer.losses import (
    fused_ce_chunk_rows,
    fused_linear_cross_entropy,
    gaussian_kernel_mmd,
    masked_token_ce,
    masked_token_ce_per_example,
    negative_entropy,
    perturbation_from_grads,
    repnoise_ascent_term,
    rerouting_loss,
    response_prediction_mask,
    retain_l2,
    tar_step_weights,
)


@pytest.fixture
def lm_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g)
    labels = torch.randint(0, 11, (3, 6), generator=g)
    labels[0, :3] = -100  # prompt of example 0
    labels[1, :] = -100  # example 1 has no response at all
    labels[2, 4:] = -100  # right padding of example 2
    return logits, labels


# --------------------------------------------------------------------------- cross-entropy


def _reference_ce_terms(logits, labels):
    terms = []
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if labels[b, t] != -100:
                terms.append((b, F.cross_entropy(logits[b, t - 1][None], labels[b, t][None])))
    return terms


def test_masked_token_ce_matches_manual_shift(lm_batch):
    logits, labels = lm_batch
    terms = _reference_ce_terms(logits, labels)
    expected = torch.stack([ce for _, ce in terms]).mean()
    torch.testing.assert_close(masked_token_ce(logits, labels), expected)


def test_masked_token_ce_ignores_logits_of_masked_positions(lm_batch):
    logits, labels = lm_batch
    changed = logits.clone()
    changed[1] += 100.0  # example 1 has no labelled token
    changed[0, 3:5] += 3.0 * torch.arange(11.0)  # predict tokens 4, 5: labelled
    assert not torch.allclose(masked_token_ce(changed, labels), masked_token_ce(logits, labels))
    changed = logits.clone()
    changed[1] += 100.0
    changed[:, -1] += 100.0  # the last position predicts nothing
    torch.testing.assert_close(masked_token_ce(changed, labels), masked_token_ce(logits, labels))


def test_masked_token_ce_per_example(lm_batch):
    logits, labels = lm_batch
    per_example = masked_token_ce_per_example(logits, labels)
    assert per_example.shape == (3,)
    terms = _reference_ce_terms(logits, labels)
    for b in (0, 2):
        expected = torch.stack([ce for i, ce in terms if i == b]).mean()
        torch.testing.assert_close(per_example[b], expected)
    assert per_example[1].item() == 0.0


def test_masked_token_ce_without_labels_is_zero_with_graph():
    logits = torch.randn(2, 4, 7, requires_grad=True)
    loss = masked_token_ce(logits, torch.full((2, 4), -100))
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0


def test_masked_token_ce_bad_inputs():
    logits = torch.randn(2, 4, 7)
    with pytest.raises(DataError, match="do not match"):
        masked_token_ce(logits, torch.zeros(2, 5, dtype=torch.long))
    labels = torch.zeros(2, 4, dtype=torch.long)
    labels[0, 2] = 7
    with pytest.raises(DataError, match="vocabulary"):
        masked_token_ce(logits, labels)


# --------------------------------------------------------------------------- fused linear + cross-entropy


def _lens_case(n=13, d=5, vocab=17, bias=True, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, d, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(vocab, generator=g, dtype=dtype, requires_grad=True) if bias else None
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[::4] = -100
    return hidden, weight, b, targets


def _plain_ce(hidden, weight, bias, targets, scale=1.0, softcap=None):
    logits = F.linear(hidden, weight, bias) * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, ignore_index=-100)


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 13, 100, 0])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_linear_ce_matches_full_logits(chunk_size, bias):
    """Value and gradients wrt hidden, weight and bias equal F.cross_entropy on the full logits (float64),
    for chunk sizes that do and do not divide the 13 rows."""
    hidden, weight, b, targets = _lens_case(bias=bias)
    params = [hidden, weight] + ([b] if bias else [])
    expected = _plain_ce(hidden, weight, b, targets)
    expected_grads = torch.autograd.grad(expected, params)
    got = fused_linear_cross_entropy(hidden, weight, targets, b, chunk_size=chunk_size)
    got_grads = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for a, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_fused_linear_ce_scale_softcap_and_leading_dims():
    hidden, weight, b, targets = _lens_case()
    expected = _plain_ce(hidden, weight, b, targets, scale=0.7, softcap=3.0)
    expected_grads = torch.autograd.grad(expected, [hidden, weight, b])
    got = fused_linear_cross_entropy(hidden, weight, targets, b, chunk_size=5, logit_scale=0.7, softcap=3.0)
    got_grads = torch.autograd.grad(got, [hidden, weight, b])
    torch.testing.assert_close(got, expected)
    for a, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, e)
    # (batch, seq, hidden) input with (batch, seq) targets is the same as the flattened rows.
    batched = fused_linear_cross_entropy(hidden[:12].reshape(3, 4, -1), weight, targets[:12].reshape(3, 4))
    torch.testing.assert_close(batched, _plain_ce(hidden[:12], weight, None, targets[:12]))


def test_fused_linear_ce_gradcheck():
    hidden, weight, b, targets = _lens_case(n=5, d=3, vocab=4)
    for softcap in (None, 2.0):
        assert torch.autograd.gradcheck(
            lambda h, w, bb, cap=softcap: fused_linear_cross_entropy(
                h, w, targets, bb, chunk_size=2, softcap=cap
            ),
            (hidden, weight, b),
        )


def test_fused_linear_ce_tied_weight_accumulates_both_uses():
    """A tied embedding used as input table and as unembedding gets both gradients summed."""
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 9, (6,), generator=g)
    targets = torch.randint(0, 9, (6,), generator=g)

    def loss(fn):
        h = torch.tanh(emb[ids] * 1.3)
        return fn(h, emb, targets)

    expected = torch.autograd.grad(loss(lambda h, w, t: _plain_ce(h, w, None, t)), emb)[0]
    got = torch.autograd.grad(loss(lambda h, w, t: fused_linear_cross_entropy(h, w, t, chunk_size=4)), emb)[0]
    torch.testing.assert_close(got, expected)


def test_fused_linear_ce_no_targets_and_bad_inputs():
    hidden, weight, _, targets = _lens_case(bias=False)
    none = fused_linear_cross_entropy(hidden, weight, torch.full_like(targets, -100))
    assert float(none.detach()) == 0.0 and none.requires_grad
    assert torch.autograd.grad(none, hidden)[0].abs().max() == 0
    with pytest.raises(DataError, match="vocabulary"):
        fused_linear_cross_entropy(hidden, weight, torch.full_like(targets, 17))
    with pytest.raises(DataError, match="targets of shape"):
        fused_linear_cross_entropy(hidden, weight, targets[:-1])
    with pytest.raises(DataError, match="weight"):
        fused_linear_cross_entropy(hidden, weight.T, targets)
    with pytest.raises(ConfigError, match="chunk_size"):
        fused_linear_cross_entropy(hidden, weight, targets, chunk_size=-1)
    assert fused_ce_chunk_rows(49152) == 336 and fused_ce_chunk_rows(151936) == 96
    assert fused_ce_chunk_rows(10**9) == 1 and fused_ce_chunk_rows(2**20) == 16


def test_fused_linear_ce_under_autocast_close_to_plain():
    """bfloat16 autocast (CPU): matmuls in bf16, softmax in float32; close to the plain computation."""
    hidden, weight, b, targets = _lens_case(n=64, d=32, vocab=300, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.cross_entropy(F.linear(hidden, weight, b).float(), targets, ignore_index=-100)
        got = fused_linear_cross_entropy(hidden, weight, targets, b, chunk_size=10)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
    ge = torch.autograd.grad(expected, [hidden, weight])
    gg = torch.autograd.grad(got, [hidden, weight])
    for a, e in zip(gg, ge):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, e, rtol=5e-2, atol=5e-3)


def test_response_prediction_mask():
    labels = torch.tensor([[-100, -100, 5, 6, -100]])
    assert response_prediction_mask(labels).tolist() == [[False, True, True, False, False]]


# --------------------------------------------------------------------------- MMD


def _reference_mmd(x, y, num_kernels=5, kernel_mul=2.0):
    z = [*x, *y]
    n = len(z)
    dists = [[float(((z[i] - z[j]) ** 2).sum()) for j in range(n)] for i in range(n)]
    base = sum(dists[i][j] for i in range(n) for j in range(n) if i != j) / (n * n - n)
    base /= kernel_mul ** (num_kernels // 2)

    def k(i, j):
        return sum(math.exp(-dists[i][j] / (base * kernel_mul**q)) for q in range(num_kernels))

    nx = len(x)
    xs, ys = range(nx), range(nx, n)
    kxx = sum(k(i, j) for i in xs for j in xs) / nx**2
    kyy = sum(k(i, j) for i in ys for j in ys) / len(ys) ** 2
    kxy = sum(k(i, j) for i in xs for j in ys) / (nx * len(ys))
    return kxx + kyy - 2 * kxy


@pytest.mark.parametrize("n_x,n_y", [(3, 3), (2, 4)])
def test_mmd_matches_double_loop(n_x, n_y):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n_x, 5, generator=g, dtype=torch.float64)
    y = torch.randn(n_y, 5, generator=g, dtype=torch.float64) * 2 + 1
    got = gaussian_kernel_mmd(x, y)
    assert got.item() == pytest.approx(_reference_mmd(x, y), rel=1e-4)
    assert gaussian_kernel_mmd(x, y, num_kernels=3, kernel_mul=3.0).item() == pytest.approx(
        _reference_mmd(x, y, 3, 3.0), rel=1e-4
    )


def test_mmd_flattens_examples_and_orders_distributions():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 2, generator=g)
    torch.testing.assert_close(gaussian_kernel_mmd(x, x.clone()), torch.tensor(0.0), atol=1e-6, rtol=0)
    near = torch.randn(4, 3, 2, generator=g)
    far = torch.randn(4, 3, 2, generator=g) + 5.0
    assert gaussian_kernel_mmd(x, far) > gaussian_kernel_mmd(x, near) > 0
    assert gaussian_kernel_mmd(x, near).item() == pytest.approx(
        _reference_mmd(x.reshape(4, -1).double(), near.reshape(4, -1).double()), rel=1e-4
    )


def test_mmd_gradient_pulls_samples_together():
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 6, generator=g) + 2.0).requires_grad_(True)
    y = torch.randn(4, 6, generator=g)
    loss = gaussian_kernel_mmd(x, y)
    loss.backward()
    with torch.no_grad():
        assert gaussian_kernel_mmd(x - 0.05 * x.grad, y) < loss


def test_mmd_single_example_warns_and_bad_shapes_raise():
    with pytest.warns(UserWarning, match="degenerate"):
        gaussian_kernel_mmd(torch.randn(1, 4), torch.randn(1, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gaussian_kernel_mmd(torch.randn(2, 4), torch.randn(2, 4))
    with pytest.raises(ConfigError):
        gaussian_kernel_mmd(torch.randn(2, 4), torch.randn(2, 5))
    with pytest.raises(ConfigError):
        gaussian_kernel_mmd(torch.randn(0, 4), torch.randn(2, 4))


def test_repnoise_ascent_term():
    values = [torch.tensor(1.0), torch.tensor(2.0), torch.tensor(6.0)]
    assert repnoise_ascent_term(values).item() == pytest.approx(math.log(3.0 + 1.0))
    with pytest.raises(ConfigError):
        repnoise_ascent_term([])


# --------------------------------------------------------------------------- TAR / circuit breakers


def test_negative_entropy_matches_definition():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 5, generator=g)
    mask = torch.tensor([[1, 0, 1], [0, 0, 1]], dtype=torch.bool)
    expected = []
    for b, t in mask.nonzero().tolist():
        p = torch.softmax(logits[b, t], -1)
        expected.append(float((p * p.log()).sum()))
    assert negative_entropy(logits, mask).item() == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    uniform = torch.zeros(1, 2, 5)
    assert negative_entropy(uniform, torch.ones(1, 2)).item() == pytest.approx(-math.log(5))
    with pytest.raises(DataError):
        negative_entropy(logits, torch.ones(2, 4))


def test_tar_step_weights():
    weights = tar_step_weights(8, every=4, scale=0.0625)
    assert len(weights) == 8
    assert [k for k, w in enumerate(weights) if w] == [3, 7]
    assert weights[7] == pytest.approx(1.0)
    assert weights[3] == pytest.approx(math.exp(-0.25))
    assert tar_step_weights(3, every=1, scale=0.5) == pytest.approx([math.exp(-1.0), math.exp(-0.5), 1.0])
    with pytest.raises(ConfigError, match="no step"):
        tar_step_weights(2, every=4)


def test_rerouting_loss_zero_when_orthogonal_positive_when_aligned():
    h_orig = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    mask = torch.ones(1, 2)
    assert rerouting_loss(torch.tensor([[[0.0, 3.0], [-2.0, 0.0]]]), h_orig, mask).item() == 0.0
    assert rerouting_loss(torch.tensor([[[-1.0, 0.0], [0.0, -1.0]]]), h_orig, mask).item() == 0.0
    assert rerouting_loss(2 * h_orig, h_orig, mask).item() == pytest.approx(1.0)
    half = torch.tensor([[[1.0, 1.0], [5.0, 5.0]]])
    assert rerouting_loss(half, h_orig, torch.tensor([[1, 0]])).item() == pytest.approx(1 / math.sqrt(2))


def test_retain_l2():
    h_orig = torch.zeros(1, 3, 2)
    h = torch.tensor([[[3.0, 4.0], [0.0, 1.0], [100.0, 0.0]]])
    assert retain_l2(h, h_orig, torch.tensor([[1, 1, 0]])).item() == pytest.approx(3.0)
    with pytest.raises(ConfigError):
        retain_l2(h, torch.zeros(1, 3, 3), torch.ones(1, 3))


# --------------------------------------------------------------------------- Vaccine / Booster


def test_perturbation_global_norm_is_rho_and_direction_kept():
    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(2, 3, 4, generator=g), None, torch.randn(2, 3, 4, generator=g) * 10]
    eps = perturbation_from_grads(grads, rho=2.0)
    assert eps[1] is None
    total = math.sqrt(sum(float((e**2).sum()) for e in eps if e is not None))
    assert total == pytest.approx(2.0, rel=1e-5)
    joint = math.sqrt(sum(float((x**2).sum()) for x in grads if x is not None))
    torch.testing.assert_close(eps[0], grads[0] * 2.0 / joint)
    torch.testing.assert_close(eps[2], grads[2] * 2.0 / joint)


def test_perturbation_zero_gradients_and_errors():
    eps = perturbation_from_grads([torch.zeros(3), torch.zeros(2)], rho=2.0)
    assert all(torch.count_nonzero(e) == 0 and not torch.isnan(e).any() for e in eps)
    with pytest.raises(ConfigError):
        perturbation_from_grads([None], rho=1.0)
    with pytest.raises(ConfigError):
        perturbation_from_grads([torch.ones(2)], rho=-1.0)
