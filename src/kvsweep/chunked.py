"""Language-model loss from final hidden states through a frozen output projection, a chunk of rows at a time.

The plain route, ``F.cross_entropy((hidden @ weight.T).float(), targets)``, materialises float32
logits for every token at once: with Pythia's 50k vocabulary at batch 256 x 128 tokens that is
32768 x 50304 x 4 bytes = 6.6 GB, plus as much again for their gradient in the backward pass.

``linear_nll`` instead walks over ``chunk_rows`` rows (tokens) at a time. For each chunk it forms the
logits, their negative log-likelihood and, when a gradient will be needed, the gradient with respect
to that chunk of ``hidden`` right away: ``(softmax(logits) - onehot(target)) @ weight``. Only that
gradient (the size of ``hidden``) is kept for the backward pass, which then just scales it by the
incoming per-token gradient. Peak memory for the logits is O(chunk_rows * V) instead of O(N * V).
This works because ``weight`` is frozen: no gradient with respect to it is ever needed.

Precision: the matmul runs in the dtype autocast would give ``F.linear(hidden, weight)``, so the
loss matches ``F.cross_entropy(logits.float(), ...)`` of the same model:

* under ``torch.autocast`` on ``hidden``'s device: the autocast dtype (bf16/fp16);
* otherwise ``hidden``'s own dtype (``weight`` is cast to it): float32 hidden -> float32 matmul,
  bf16/fp16 hidden -> bf16/fp16 matmul.

Each chunk's logits are then upcast to float32 (at least) for the log-sum-exp and softmax. The
stored gradient is computed from float32 ``softmax - onehot`` cast to the matmul dtype (as the
backward of ``logits.float()`` would) and kept in ``hidden``'s dtype.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

__all__ = ["linear_nll"]


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes matmuls in on ``device_type``, or None when autocast is off there."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except (TypeError, RuntimeError):  # torch < 2.4 (no device_type argument) or an unknown device type
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
        if device_type == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        return None


class _LinearNLL(torch.autograd.Function):
    """nll = logsumexp(h @ W.T) - (h @ W.T)[target], with d nll / d h precomputed in forward."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,  # (N, d)
        weight: torch.Tensor,  # (V, d), already in the matmul dtype
        targets: torch.Tensor,  # (N,) int64
        chunk_rows: int,
        want_grad: bool,
    ) -> torch.Tensor:
        n = hidden.shape[0]
        logits_dtype = torch.promote_types(weight.dtype, torch.float32)
        nll = torch.empty(n, dtype=torch.float32, device=hidden.device)  # (N,)
        grad_hidden = torch.empty_like(hidden) if want_grad else None  # (N, d) in hidden's dtype
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are chosen explicitly here
            for start in range(0, n, chunk_rows):
                stop = min(start + chunk_rows, n)
                h = hidden[start:stop].to(weight.dtype)  # (C, d)
                t = targets[start:stop]  # (C,)
                logits = (h @ weight.T).to(logits_dtype)  # (C, V), float32, a tensor of our own
                picked = logits.gather(1, t[:, None]).squeeze(1)  # (C,)
                # log-sum-exp by hand, in place, so the chunk never needs a second (C, V) buffer
                # (torch.logsumexp allocates one for exp(logits - max)).
                row_max = logits.amax(dim=-1, keepdim=True)  # (C, 1)
                exps = logits.sub_(row_max).exp_()  # (C, V), overwrites the logits
                sums = exps.sum(dim=-1, keepdim=True)  # (C, 1)
                nll[start:stop] = (row_max + sums.log()).squeeze(1) - picked
                if grad_hidden is not None:
                    probs = exps.div_(sums)  # (C, V) softmax
                    probs[torch.arange(stop - start, device=probs.device), t] -= 1.0  # softmax - onehot
                    grad_hidden[start:stop] = probs.to(weight.dtype) @ weight  # (C, V) @ (V, d) -> (C, d)
                del logits, exps
        if grad_hidden is not None:
            ctx.save_for_backward(grad_hidden)
        ctx.set_materialize_grads(False)
        return nll

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor | None):  # grad_out: (N,)
        if grad_out is None or not ctx.saved_tensors:
            return None, None, None, None, None
        (grad_hidden,) = ctx.saved_tensors  # (N, d)
        scaled = grad_hidden * grad_out[:, None]  # (N, d), promoted to at least float32
        return scaled.to(grad_hidden.dtype), None, None, None, None


def linear_nll(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, chunk_rows: int = 1024
) -> torch.Tensor:
    """Per-token negative log-likelihood of ``targets`` under logits ``hidden @ weight.T``, ``chunk_rows`` rows at a time.

    hidden: (..., d), any float dtype (bf16 under autocast is common); weight: (V, d), frozen
    (``requires_grad`` False); targets: (...) integer class ids, the leading shape of ``hidden``.
    Returns the float32 nll, shape (...). Differentiable with respect to ``hidden`` only.
    """
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be an integer >= 1, got {chunk_rows!r}")
    if weight.requires_grad:
        raise ValueError(
            "weight must be frozen (requires_grad=False): linear_nll computes no gradient for it; "
            "call weight.detach() or weight.requires_grad_(False)"
        )
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (V, d), got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden (..., d) and weight (V, d) disagree on d: hidden shape {tuple(hidden.shape)}, "
            f"weight shape {tuple(weight.shape)}"
        )
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal hidden's leading shape: "
            f"hidden shape {tuple(hidden.shape)} -> {tuple(hidden.shape[:-1])}"
        )
    if not hidden.is_floating_point() or not weight.is_floating_point():
        raise ValueError(f"hidden and weight must be floating point, got {hidden.dtype} and {weight.dtype}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"targets must hold integer class ids, got dtype {targets.dtype}")

    lead = hidden.shape[:-1]
    matmul_dtype = _autocast_dtype(hidden.device.type) or hidden.dtype
    want_grad = torch.is_grad_enabled() and hidden.requires_grad
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # (..., d) -> (N, d)
    flat_targets = targets.reshape(-1).long()  # (...) -> (N,)
    nll = _LinearNLL.apply(flat_hidden, weight.to(matmul_dtype), flat_targets, chunk_rows, want_grad)  # (N,)
    return nll.reshape(lead)  # (N,) -> (...)
