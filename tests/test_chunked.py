"""linear_nll: chunked cross-entropy through a frozen output projection, against F.cross_entropy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from kvsweep.chunked import linear_nll

D, V = 16, 97


def _data(lead: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, D, generator=g).to(dtype)
    weight = torch.randn(V, D, generator=g) / math.sqrt(D)
    targets = torch.randint(0, V, lead, generator=g)
    return hidden, weight, targets


def _reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()  # (..., V)
    return F.cross_entropy(logits.flatten(0, -2), targets.reshape(-1), reduction="none").reshape(targets.shape)


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


class _CountOps(TorchDispatchMode):
    """Records every aten op's name and output shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        shapes = [tuple(o.shape) for o in outs if isinstance(o, torch.Tensor)]
        self.calls.append((func.overloadpacket.__name__, shapes))
        return out

    def matmuls(self) -> list[tuple[int, ...]]:
        return [s[0] for name, s in self.calls if name in ("mm", "addmm", "bmm", "matmul")]

    def largest_with_vocab(self) -> int:
        return max((math.prod(s) for _, shapes in self.calls for s in shapes if V in s), default=0)


# ----------------------------------------------------------------------------- float32 values


@pytest.mark.parametrize(
    "lead, chunk_rows",
    [
        ((40,), 8),  # divides N
        ((40,), 7),  # remainder chunk
        ((40,), 1),  # one row at a time
        ((40,), 1000),  # one chunk larger than N
        ((3, 13), 5),  # (B, T, d) input, chunks cross sequence boundaries
        ((2, 3, 5), 4),  # more leading dims
    ],
)
def test_float32_matches_cross_entropy(lead, chunk_rows):
    hidden, weight, targets = _data(lead)
    nll = linear_nll(hidden, weight, targets, chunk_rows=chunk_rows)
    assert nll.shape == lead and nll.dtype == torch.float32
    _close(nll, _reference(hidden, weight, targets), rtol=1e-5)


def test_empty_input():
    hidden, weight, targets = _data((0,))
    hidden.requires_grad_(True)
    nll = linear_nll(hidden, weight, targets, chunk_rows=4)
    assert nll.shape == (0,)
    nll.sum().backward()
    assert hidden.grad.shape == (0, D)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("lead, chunk_rows", [((40,), 7), ((3, 13), 5), ((3, 13), 1), ((3, 13), 1024)])
def test_grad_wrt_hidden_matches_autograd(lead, chunk_rows):
    hidden, weight, targets = _data(lead)
    scale = torch.randn(lead, generator=torch.Generator().manual_seed(1))  # non-uniform grad_out
    h1 = hidden.clone().requires_grad_(True)
    (linear_nll(h1, weight, targets, chunk_rows=chunk_rows) * scale).sum().backward()
    h2 = hidden.clone().requires_grad_(True)
    (_reference(h2, weight, targets) * scale).sum().backward()
    _close(h1.grad, h2.grad, rtol=1e-5)


def test_grad_reaches_upstream_linear():
    torch.manual_seed(0)
    x = torch.randn(2, 11, 12)
    _, weight, _ = _data((1,))
    targets = torch.randint(0, V, (2, 11))
    scale = torch.rand(2, 11)
    up1 = torch.nn.Linear(12, D)
    up2 = torch.nn.Linear(12, D)
    up2.load_state_dict(up1.state_dict())
    (linear_nll(up1(x), weight, targets, chunk_rows=6) * scale).sum().backward()
    (_reference(up2(x), weight, targets) * scale).sum().backward()
    _close(up1.weight.grad, up2.weight.grad, rtol=1e-5)
    _close(up1.bias.grad, up2.bias.grad, rtol=1e-5)
    assert weight.grad is None


def test_saved_gradient_has_hidden_shape_and_dtype():
    hidden, weight, targets = _data((3, 13))
    hidden.requires_grad_(True)
    nll = linear_nll(hidden, weight, targets, chunk_rows=4)
    (saved,) = nll.grad_fn.next_functions[0][0].saved_tensors  # through the final reshape
    assert saved.shape == (39, D) and saved.dtype == hidden.dtype


def test_double_backward_is_refused():
    hidden, weight, targets = _data((10,))
    hidden.requires_grad_(True)
    (g,) = torch.autograd.grad(linear_nll(hidden, weight, targets).sum(), hidden, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


# ----------------------------------------------------------------------------- no grad, chunked work


def test_no_grad_stores_nothing_and_skips_gradient_matmul():
    hidden, weight, targets = _data((40,))
    hidden.requires_grad_(True)
    with torch.no_grad(), _CountOps() as ops:
        nll = linear_nll(hidden, weight, targets, chunk_rows=8)
    assert nll.grad_fn is None and not nll.requires_grad
    assert len(ops.matmuls()) == 5  # one logits matmul per chunk, no gradient matmul
    _close(nll, _reference(hidden.detach(), weight, targets), rtol=1e-5)


def test_hidden_without_grad():
    hidden, weight, targets = _data((40,))
    with _CountOps() as ops:
        nll = linear_nll(hidden, weight, targets, chunk_rows=8)
    assert nll.grad_fn is None
    assert len(ops.matmuls()) == 5
    _close(nll, _reference(hidden, weight, targets), rtol=1e-5)


def test_logits_are_only_materialised_a_chunk_at_a_time():
    n, chunk = 64, 8
    hidden, weight, targets = _data((n,))
    hidden.requires_grad_(True)
    with _CountOps() as ops:
        nll = linear_nll(hidden, weight, targets, chunk_rows=chunk)
        nll.sum().backward()
    # Forward: a logits and a gradient matmul per chunk; nothing with a vocabulary axis above one chunk.
    assert ops.matmuls() == [(chunk, V), (chunk, D)] * (n // chunk)
    assert ops.largest_with_vocab() <= max(chunk * V, V * D)
    with _CountOps() as full:
        _reference(hidden, weight, targets).sum().backward()
    assert full.largest_with_vocab() >= n * V  # the plain route does hold (N, V)


# ----------------------------------------------------------------------------- bf16


def test_bf16_autocast_cpu():
    torch.manual_seed(0)
    x = torch.randn(3, 13, 12)
    _, weight, _ = _data((1,))
    targets = torch.randint(0, V, (3, 13))
    up1 = torch.nn.Linear(12, D)
    up2 = torch.nn.Linear(12, D)
    up2.load_state_dict(up1.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h1 = up1(x)
        assert h1.dtype == torch.bfloat16
        nll = linear_nll(h1, weight, targets, chunk_rows=5)
        ref = _reference(up2(x), weight, targets)  # bf16 logits, upcast
    assert nll.dtype == torch.float32
    _close(nll, ref, rtol=1e-2, atol=1e-2)
    nll.mean().backward()
    ref.mean().backward()
    assert up1.weight.grad is not None and torch.isfinite(up1.weight.grad).all()
    _close(up1.weight.grad, up2.weight.grad, rtol=5e-2, atol=5e-3)


def test_float32_hidden_under_autocast_uses_bf16_matmul():
    hidden, weight, targets = _data((3, 13))
    hidden.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nll = linear_nll(hidden, weight, targets, chunk_rows=4)
        ref = _reference(hidden, weight, targets)
    _close(nll, ref, rtol=1e-2, atol=1e-2)
    nll.sum().backward()
    assert hidden.grad.dtype == torch.float32


def test_bf16_hidden_without_autocast():
    hidden, weight, targets = _data((40,), dtype=torch.bfloat16)
    hidden.requires_grad_(True)
    nll = linear_nll(hidden, weight, targets, chunk_rows=7)  # weight stays float32, cast to bf16 inside
    _close(nll, _reference(hidden.detach(), weight.bfloat16(), targets), rtol=1e-2, atol=1e-2)
    nll.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and hidden.grad.shape == hidden.shape


# ----------------------------------------------------------------------------- validation


def test_trainable_weight_is_refused():
    hidden, weight, targets = _data((4,))
    with pytest.raises(ValueError, match="weight"):
        linear_nll(hidden, weight.requires_grad_(True), targets)


@pytest.mark.parametrize("chunk_rows", [0, -3, 2.5, True])
def test_bad_chunk_rows(chunk_rows):
    hidden, weight, targets = _data((4,))
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_nll(hidden, weight, targets, chunk_rows=chunk_rows)


def test_mismatched_shapes():
    hidden, weight, targets = _data((2, 5))
    with pytest.raises(ValueError, match=r"\(2, 5, 16\).*\(97, 17\)"):
        linear_nll(hidden, torch.randn(V, D + 1), targets)
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 5, 16\)"):
        linear_nll(hidden, weight, targets[:, :4])
    with pytest.raises(ValueError, match="2-D"):
        linear_nll(hidden, weight[None], targets)
    with pytest.raises(ValueError, match="integer"):
        linear_nll(hidden, weight, targets.float())
