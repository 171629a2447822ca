"""models/fused_loss.py: the head and cross-entropy fused chunk by chunk equal the plain logits path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.config import ModelConfig
from models.fused_loss import linear_cross_entropy
from models.llama import Transformer

N, D, V = 37, 16, 50  # 37 rows in chunks of 8: four full chunks and a remainder of 5


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, requires_grad=True)
    weight = (0.3 * torch.randn(V, D, generator=g)).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[0, 9, 36]] = -100  # ignored rows, one of them in the last, partial chunk
    return hidden, weight, labels


def loss_and_grads(loss_fn, hidden, weight, labels, **kw):  # type: ignore[no-untyped-def]
    loss = loss_fn(hidden, weight, labels, **kw)
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    return loss.detach(), dh, dw


def plain(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=-100)


def test_equals_the_plain_loss_and_gradients_in_float32():
    hidden, weight, labels = inputs()
    want = loss_and_grads(plain, hidden, weight, labels)
    got = loss_and_grads(linear_cross_entropy, hidden, weight, labels, chunk=8)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    again = loss_and_grads(linear_cross_entropy, hidden, weight, labels, chunk=8)
    assert all(torch.equal(a, b) for a, b in zip(got, again, strict=True))  # deterministic
    assert torch.count_nonzero(got[1][[0, 9, 36]]) == 0  # ignored rows get no gradient


def test_under_bf16_autocast_matches_the_plain_bf16_path():
    """Both round the matmuls to bf16 (the fused one chunk by chunk), so they agree to bf16 precision."""
    hidden, weight, labels = inputs(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = loss_and_grads(plain, hidden, weight, labels)
        got = loss_and_grads(linear_cross_entropy, hidden, weight, labels, chunk=8)
    exact = loss_and_grads(plain, hidden, weight, labels)  # float32
    for a, b, c in zip(got, want, exact, strict=True):
        assert a.dtype == c.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)
        # no further from the float32 values than the plain bf16 path is
        assert (a - c).norm() <= 2 * (b - c).norm() + 1e-6


def test_no_labelled_row_gives_zero_and_no_grad_mode_skips_gradients():
    hidden, weight, labels = inputs()
    loss, dh, dw = loss_and_grads(linear_cross_entropy, hidden, weight, torch.full_like(labels, -100))
    assert loss.item() == 0.0 and torch.count_nonzero(dh) == 0 and torch.count_nonzero(dw) == 0
    with torch.no_grad():
        assert linear_cross_entropy(hidden, weight, labels, chunk=8).item() == pytest.approx(
            plain(hidden, weight, labels).item(), rel=1e-6
        )
    with pytest.raises(ValueError, match=r"hidden \[N, D\] and labels \[N\]"):
        linear_cross_entropy(hidden[None], weight, labels)


@pytest.mark.parametrize("tie", [True, False])
def test_transformer_with_labels_returns_the_loss_of_its_logits(tie: bool):
    """model(x, labels=y) is the cross-entropy of model(x), with the same gradient for every parameter
    (the tied embedding gets both of its uses)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=70, n_layer=2, n_head=2, n_kv_head=1, d_model=32, max_seq_len=40)
    cfg.tie_embeddings = tie
    model = Transformer(cfg)
    x = torch.randint(0, 70, (3, 40))
    y = torch.randint(0, 70, (3, 40))
    y[0, :5] = -100
    fused = model(x, labels=y)
    fused_grads = torch.autograd.grad(fused, list(model.parameters()))
    logits = model(x)
    ref = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(fused_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
