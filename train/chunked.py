"""Student log-probs at chosen ids without materialising [N, V] logits.

`gather_logprobs(hidden, weight, index)` returns `log_softmax(hidden @ weight.T)[n, index[n, m]]`
(log-probs normalised over the FULL vocabulary) for every row n. Rows (positions) are
processed `chunk_size` at a time, and only one chunk's [chunk, V] logits is alive at any
moment, in forward AND backward: a custom autograd.Function saves just (hidden, weight,
bias, index, per-row logsumexp) and recomputes the chunk's logits in backward. This is the
fused-linear-cross-entropy idea of Liger-Kernel, in plain PyTorch, generalised from one
target id per row to M ids per row (the response token plus the teacher's top-K).

Precision: logits are reduced in float32 (float64 if an input is float64), whatever the
input dtype; the result is float32/float64. Autocast is disabled inside, so bf16 autocast
regions give float32 logits rather than bf16 ones. A bf16/fp16 weight is used in its own
dtype: each chunk's logits come from a bf16 GEMM with float32 accumulation and float32 output
(`torch.mm(..., out_dtype=float32)` on CUDA; on CPU, which lacks that kernel, the weight is
upcast one vocabulary block at a time), so no V x H float32 copy of the head is made; the
chunk's hidden rows are rounded to the weight's dtype first, as autocast would. In backward
the chunk's float32 logit gradient is rounded to the weight's dtype for the two GEMMs, and a
bf16 weight's gradient is accumulated in bf16 (its .grad has the weight's dtype anyway).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor
from torch.autograd.function import once_differentiable

__all__ = ["gather_logprobs"]


def has_data(t: Tensor) -> bool:
    """False for the fake / meta tensors of the memory estimate, whose values cannot be read."""
    return not (t.is_meta or isinstance(t, FakeTensor))


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


LOW = (torch.bfloat16, torch.float16)
BLOCK_ELEMS = 1 << 24  # CPU fallback: float32 weight block of at most 64 MB


def _mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for bf16/fp16 `a`, `b` with float32 accumulation and a float32 result."""
    if a.device.type == "cuda" or not has_data(a):  # the fake-tensor estimate models CUDA
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, NotImplementedError):  # an older GPU / torch without mm.dtype
            pass
    # upcast `b` one block of columns at a time; the sums are over exactly the same products
    out = torch.empty(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
    a32 = a.float()
    step = max(1, BLOCK_ELEMS // max(1, b.shape[0]))
    for s in range(0, b.shape[1], step):
        out[:, s:s + step] = a32 @ b[:, s:s + step].float()
    return out


def _chunk_logits(h: Tensor, w: Tensor, b: Tensor | None, dtype: torch.dtype) -> Tensor:
    """[C, H] @ [V, H].T (+ b) in `dtype`; `b` is already in `dtype`. A low-precision `w` is
    used as it is (float32 accumulation); otherwise `w` is already in `dtype`."""
    if w.dtype in LOW and dtype == torch.float32:
        logits = _mm_f32(h.to(w.dtype), w.t())
    else:
        logits = h.to(dtype) @ w.t()
    if b is not None:
        logits += b
    return logits


def _weight(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """The weight as the chunk GEMMs use it: bf16/fp16 stays (no V x H copy) unless the
    compute dtype is float64; float32 is cast to the compute dtype (a no-op in float32)."""
    return weight if weight.dtype in LOW and dtype == torch.float32 else weight.to(dtype)


def _acc(acc: Tensor | None, a: Tensor, b: Tensor) -> Tensor:
    """acc + a @ b, where a None `acc` is zero: the first product is written, not added."""
    return a @ b if acc is None else acc.addmm_(a, b)


class _ChunkedGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, index: Tensor, chunk_size: int):
        dtype = _compute_dtype(hidden, weight, bias)
        n = hidden.shape[0]
        out = torch.empty(index.shape, dtype=dtype, device=hidden.device)
        lse = torch.empty(n, dtype=dtype, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            w = _weight(weight, dtype)
            b = None if bias is None else bias.to(dtype)
            for s in range(0, n, chunk_size):
                e = min(s + chunk_size, n)
                logits = _chunk_logits(hidden[s:e], w, b, dtype)
                lse[s:e] = torch.logsumexp(logits, dim=-1)
                out[s:e] = logits.gather(1, index[s:e]) - lse[s:e, None]
                del logits
        ctx.save_for_backward(hidden, weight, bias, index, lse)
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(index)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor | None, grad_lse: Tensor | None):
        hidden, weight, bias, index, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        dtype = lse.dtype
        n = hidden.shape[0]
        grad_h = torch.empty_like(hidden) if need_h else None
        w_dtype = weight.dtype if weight.dtype in LOW and dtype == torch.float32 else dtype
        grad_w = None  # the first chunk's GEMM writes it (no V x H zero fill), later ones add
        grad_b = torch.zeros(weight.shape[0], dtype=dtype, device=weight.device) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = _weight(weight, dtype)
            b = None if bias is None else bias.to(dtype)
            for s in range(0, n, ctx.chunk_size):
                e = min(s + ctx.chunk_size, n)
                # d out[n,m] / d logits[n,v] = 1[v == index[n,m]] - softmax[n,v], and
                # d lse[n] / d logits[n,v] = softmax[n,v]; so
                # grad_logits = scatter_add(grad_out) - softmax * (sum_m grad_out - grad_lse).
                # The chunk's [C, V] buffer is reused in place: logits -> softmax -> grad_logits.
                g = _chunk_logits(hidden[s:e], w, b, dtype)
                g.sub_(lse[s:e, None]).exp_()
                coef = torch.zeros(e - s, 1, dtype=dtype, device=g.device)
                if grad_out is not None:
                    coef -= grad_out[s:e].sum(-1, keepdim=True).to(dtype)
                if grad_lse is not None:
                    coef += grad_lse[s:e, None].to(dtype)
                g.mul_(coef)
                if grad_out is not None:
                    # scatter_add (not scatter): duplicate ids in a row must add up.
                    g.scatter_add_(1, index[s:e], grad_out[s:e].to(dtype))
                if need_b:
                    grad_b += g.sum(0)
                if w.dtype != dtype:  # low-precision head: both GEMMs in its dtype, fp32 accumulation
                    g = g.to(w.dtype)
                    if need_h:
                        grad_h[s:e] = _mm_f32(g, w).to(hidden.dtype)
                    if need_w:
                        grad_w = _acc(grad_w, g.t(), hidden[s:e].to(w.dtype))
                else:
                    if need_h:
                        grad_h[s:e] = (g @ w).to(hidden.dtype)
                    if need_w:
                        grad_w = _acc(grad_w, g.t(), hidden[s:e].to(dtype))
                del g
        if need_w and grad_w is None:  # no rows
            grad_w = torch.zeros(weight.shape, dtype=w_dtype, device=weight.device)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None


def gather_logprobs(
    hidden: Tensor,
    weight: Tensor,
    index: Tensor,
    chunk_size: int = 1024,
    bias: Tensor | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Full-vocabulary student log-probs at `index`, chunked over rows.

    hidden: [N, H] final hidden states (any float dtype; may require grad).
    weight: [V, H] lm_head weight (may be frozen, e.g. under LoRA). bias: optional [V].
    index:  [N, M] int64 vocabulary ids per row (duplicates allowed).
    Returns out [N, M] float32 (float64 if an input is float64) with
    out[n, m] = log_softmax(hidden[n] @ weight.T + bias)[index[n, m]], and with
    `return_lse` also the per-row logsumexp [N] (differentiable too).
    Peak extra memory is one [chunk_size, V] buffer in forward and in backward.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"gather_logprobs: hidden must be [N, H] and weight [V, H]; got {tuple(hidden.shape)} "
            f"and {tuple(weight.shape)}"
        )
    if index.dim() != 2 or index.shape[0] != hidden.shape[0]:
        raise ValueError(f"gather_logprobs: index must be [N, M] with N={hidden.shape[0]}; got {tuple(index.shape)}")
    if index.dtype != torch.long:
        raise TypeError(f"gather_logprobs: index must be int64 (torch.long), got {index.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"gather_logprobs: bias must be [V]={weight.shape[0]}; got {tuple(bias.shape)}")
    if chunk_size < 1:
        raise ValueError(f"gather_logprobs: chunk_size must be >= 1, got {chunk_size}")
    # checked where it is free: on CPU. On a GPU reading min/max would sync the device on every
    # forward; there the trainer has already checked that the store's ids fit the head
    # (trainer._check_store) and gather's own device-side bounds check remains.
    if index.numel() and has_data(index) and index.device.type == "cpu" and (
            int(index.min()) < 0 or int(index.max()) >= weight.shape[0]):
        raise IndexError(f"gather_logprobs: index out of range [0, {weight.shape[0]})")
    out, lse = _ChunkedGather.apply(hidden, weight, bias, index, chunk_size)
    return (out, lse) if return_lse else out
