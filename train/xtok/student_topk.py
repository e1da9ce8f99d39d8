"""The student's K largest log-probs over its full vocabulary, without [N, V] logits (ULD).

Two passes: the ids of the K largest logits per row are found here chunk by chunk, without
gradient (top-K selection is piecewise constant); `gather_logprobs` then returns their
log-probs, chunked, with gradient. So only one chunk's [chunk, V] logits is alive at a time.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..chunked import _chunk_logits, _compute_dtype, _weight

__all__ = ["student_topk_ids"]


@torch.no_grad()
def student_topk_ids(hidden: Tensor, weight: Tensor, bias: Tensor | None, k: int,
                     chunk_size: int) -> Tensor:
    """[N, H] hidden rows -> [N, k] int64 ids of each row's k largest logits."""
    n = hidden.shape[0]
    k = min(int(k), weight.shape[0])
    out = torch.empty((n, k), dtype=torch.long, device=hidden.device)
    dtype = _compute_dtype(hidden, weight, bias)
    with torch.autocast(hidden.device.type, enabled=False):
        w = _weight(weight, dtype)
        b = None if bias is None else bias.to(dtype)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            out[s:e] = _chunk_logits(hidden[s:e].detach(), w, b, dtype).topk(k, dim=-1).indices
    return out
