"""The language-model head and its cross-entropy in one pass, chunk by chunk.

    loss = mean over labelled rows of  logsumexp(h @ W^T) - (h @ W^T)[label]       h [N, D], W [V, D]

The plain way materialises the logits [N, V], casts them to float32, takes a log-softmax, and in backward
walks the same [N, V] float32 tensors again: on CPU those passes over memory cost about as much as the
head's matmuls (benchmarks/loop_parts.py). Here each chunk of `chunk` rows is projected, its loss and its
gradient w.r.t. the logits (softmax - one-hot) taken while the chunk is in cache, and folded at once into
the gradients of h and W; backward only scales them. Same FLOPs, no [N, V] tensor kept.

Precision is the plain path's under autocast: the matmuls run in the autocast dtype (or the inputs' own),
softmax and the loss in float32; W's gradient is summed over chunks in float32.
"""

from __future__ import annotations

import torch

CHUNK_ROWS = 512  # rows a chunk: 512 x vocab 8192 float32 logits = 16 MiB (fastest of 512/1024/2048 on CPU)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,  # [N, D]
        weight: torch.Tensor,  # [V, D]
        labels: torch.Tensor,  # [N] int64, ignore_index where not scored
        ignore_index: int,
        chunk: int,
    ) -> torch.Tensor:
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]  # type: ignore[attr-defined]
        with torch.autocast(device, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            scored = labels != ignore_index  # [N]
            count = scored.sum().clamp_min(1)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device) if need_h else None
            grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
            for start in range(0, h.shape[0], chunk):
                h_c, keep = h[start : start + chunk], scored[start : start + chunk]  # [c, D], [c]
                target = labels[start : start + chunk].clamp_min(0)  # [c]; ignored rows read label 0
                logits = (h_c @ w.t()).float()  # [c, V]
                lse = torch.logsumexp(logits, dim=-1)  # [c]
                total += ((lse - logits.gather(1, target[:, None])[:, 0]) * keep).sum()
                if grad_h is None and grad_w is None:
                    continue
                # d(loss)/d(logits) = softmax - one_hot(label), zero on ignored rows; written over the logits
                grad = logits.sub_(lse[:, None]).exp_()
                grad[torch.arange(len(target), device=grad.device), target] -= 1
                grad = (grad * keep[:, None]).to(dtype)  # [c, V]
                if grad_h is not None:
                    grad_h[start : start + chunk] = grad @ w  # [c, D]
                if grad_w is not None:
                    grad_w += (grad.t() @ h_c).float()  # [V, D]
        # Intermediates, not inputs or outputs: kept on ctx (save_for_backward is for the latter)
        ctx.grads = (  # type: ignore[attr-defined]
            grad_h.div_(count).to(hidden.dtype) if grad_h is not None else None,
            grad_w.div_(count).to(weight.dtype) if grad_w is not None else None,
        )
        return total / count

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_loss: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None]:
        grad_h, grad_w = ctx.grads  # type: ignore[attr-defined]
        return (
            grad_h * grad_loss if grad_h is not None else None,
            grad_w * grad_loss if grad_w is not None else None,
            None,
            None,
            None,
        )


def linear_cross_entropy(
    hidden: torch.Tensor,  # [N, D]
    weight: torch.Tensor,  # [V, D]
    labels: torch.Tensor,  # [N]
    ignore_index: int = -100,
    chunk: int = CHUNK_ROWS,
) -> torch.Tensor:
    """F.cross_entropy(hidden @ weight.T, labels, ignore_index=...) (mean over the labelled rows; 0 when none
    is), without the [N, V] logits. Differentiable in hidden and weight."""
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(
            f"need hidden [N, D] and labels [N], got {tuple(hidden.shape)}, {tuple(labels.shape)}"
        )
    loss = _LinearCrossEntropy.apply(hidden, weight, labels, ignore_index, chunk)
    return loss  # type: ignore[no-any-return]
