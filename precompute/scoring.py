"""The precompute fast path: final hidden states -> the per-token fields of METHODS.md §1.

Pure tensor code, no model. The full-vocabulary logits `[N, V]` exist only for one chunk of
positions at a time (`chunk` rows), in float32, so scoring a 128k-vocabulary teacher over
long sequences needs `chunk * V * 4` bytes of scratch instead of `N * V * 4`.

Conventions
- `targets[i]` is the token whose log-prob is read at position i (the next token); a
  negative target means "no target" (the state after the last response token, s_{T+1}); its
  `token_logprob` / `ref_token_logprob` are NaN so a mistaken use is loud.
- Everything is normalised over the FULL vocabulary (never renormalised over the top-K).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

# how ref_topk_logprobs is filled (exact gather, or the ADPA paper's approximation)
from .checks import REF_MODES

# Scratch budget for one chunk of float32 logits plus its temporaries (~3 copies).
DEFAULT_CHUNK_BYTES = 1 << 30


@dataclass
class LMHead:
    """A causal LM's output projection, including any logit post-processing its config applies.

    logits = softcap(scale * (h @ weight.T + bias)), softcap(z) = c * tanh(z / c) when set.
    """

    weight: Tensor  # [V, H]
    bias: Tensor | None = None  # [V]
    scale: float = 1.0
    softcap: float | None = None
    # float32 copy of a low-precision weight, built on first use when the backend cannot
    # multiply bf16/fp16 inputs into a float32 output directly (CPU, older torch).
    _w32: Tensor | None = field(default=None, repr=False)
    _out_dtype_ok: bool | None = field(default=None, repr=False)

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> LMHead:
        """Read the head and the logit transform from an HF causal LM; refuse unknown transforms."""
        head = model.get_output_embeddings()
        if head is None or not hasattr(head, "weight"):
            raise ValueError(
                f"{type(model).__name__} has no output embedding (lm_head): "
                "precompute needs a causal LM with a linear head"
            )
        cfg = model.config
        cfg = getattr(cfg, "get_text_config", lambda: cfg)()
        scale = 1.0
        softcap = None
        # Logit transforms known in transformers' causal LMs. Anything else is caught by
        # `verify_head` in models.py, which compares against the model's own forward.
        if getattr(cfg, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
            scale *= float(cfg.logit_scale)
        if getattr(cfg, "logits_scaling", None) is not None:  # Granite: logits / logits_scaling
            scale /= float(cfg.logits_scaling)
        if getattr(cfg, "lm_head_multiplier", None) is not None:  # Falcon-H1
            scale *= float(cfg.lm_head_multiplier)
        if getattr(cfg, "final_logit_softcapping", None) is not None:  # Gemma 2/3
            softcap = float(cfg.final_logit_softcapping)
        bias = getattr(head, "bias", None)
        return cls(weight=head.weight.detach(), bias=None if bias is None else bias.detach(),
                   scale=scale, softcap=softcap)

    def _matmul_f32(self, h: Tensor) -> Tensor:
        w = self.weight
        if w.dtype == torch.float32 and h.dtype == torch.float32:
            return h @ w.t()
        if w.dtype == h.dtype and self._out_dtype_ok is not False and h.is_cuda:
            # bf16 x bf16 with a float32 output: exact products, fp32 accumulation, and no
            # rounding of the logits to bf16 (which would cost ~0.1 nats at |z| ~ 20).
            try:
                out = torch.mm(h, w.t(), out_dtype=torch.float32)
                self._out_dtype_ok = True
                return out
            except (RuntimeError, TypeError, NotImplementedError):
                self._out_dtype_ok = False
        if self._w32 is None:
            self._w32 = w.float()
        return h.float() @ self._w32.t()

    def logits(self, h: Tensor) -> Tensor:
        """float32 logits [n, V] for hidden states [n, H]."""
        z = self._matmul_f32(h)
        if self.bias is not None:
            z = z + self.bias.float()
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


def auto_chunk(vocab_size: int, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk so that ~3 float32 [rows, V] temporaries fit in `budget_bytes`."""
    return max(1, budget_bytes // (3 * 4 * vocab_size))


def _as_head(h: LMHead | Tensor) -> LMHead:
    return h if isinstance(h, LMHead) else LMHead(weight=h)


def score_chunked(
    hidden: Tensor,
    lm_head: LMHead | Tensor,
    targets: Tensor,
    k: int,
    betas: Sequence[float] = (1.0,),
    chunk: int | None = None,
    ref_hidden: Tensor | None = None,
    ref_lm_head: LMHead | Tensor | None = None,
    ref_mode: str = "exact",
) -> dict[str, Tensor]:
    """Reduce hidden states to the METHODS.md §1 per-position fields, one chunk at a time.

    hidden [N, H] (DPO teacher, final normed hidden states), targets [N] (next-token ids,
    negative = none). With `ref_hidden`/`ref_lm_head` also scores the reference at the DPO
    teacher's top-K ids and at the target. Returns float32 tensors on `hidden.device`:
    lse [N], topk_ids [N,K] int64 (descending), topk_logprobs [N,K], token_logprob [N],
    soft_value [N,B], topk_mass [N]; with a reference: ref_lse [N], ref_topk_logprobs [N,K],
    ref_token_logprob [N]; with ref_mode "paper" or "paper-dpo-floor" also ref_paper_abs_err [N]
    (the mean over K of |approximation - exact|, the approximation being what
    ref_topk_logprobs holds).
    `k=0` skips the top-K (no topk_*/ref_topk_* outputs: stores of sequence log-probs only),
    empty `betas` the soft values. A reference that is the teacher itself (`ref_hidden is
    hidden`, same head) reuses the teacher's logits: its fields equal the teacher's own.
    """
    head = _as_head(lm_head)
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"score_chunked: hidden must be [N, H] and targets [N], got {tuple(hidden.shape)} "
            f"and {tuple(targets.shape)}"
        )
    n, vocab = hidden.shape[0], head.vocab_size
    if not 0 <= k <= vocab:
        raise ValueError(f"k={k} must be in [0, vocab size {vocab}] (0: no top-K)")
    betas = [float(b) for b in betas]
    if any(not (b > 0 and math.isfinite(b)) for b in betas):
        raise ValueError(f"betas must be positive numbers, got {betas}")
    if ref_mode not in REF_MODES:
        raise ValueError(f"ref_mode must be one of {', '.join(REF_MODES)}, got {ref_mode!r}")
    has_ref = ref_hidden is not None or ref_lm_head is not None
    if has_ref:
        if ref_hidden is None or ref_lm_head is None:
            raise ValueError("score_chunked: pass both ref_hidden and ref_lm_head, or neither")
        if ref_hidden.shape[0] != n:
            raise ValueError(f"ref_hidden has {ref_hidden.shape[0]} rows, hidden has {n}")
        ref_head = _as_head(ref_lm_head)
        same_model = ref_hidden is hidden and (ref_head is head or ref_lm_head is lm_head)
        if ref_head.vocab_size != vocab:
            raise ValueError(
                f"reference vocab {ref_head.vocab_size} != teacher vocab {vocab}: "
                "the teacher and the reference must share one tokenizer"
            )
    chunk = chunk or auto_chunk(vocab)
    dev = hidden.device
    f32 = dict(device=dev, dtype=torch.float32)
    out: dict[str, Tensor] = {"lse": torch.empty(n, **f32), "token_logprob": torch.empty(n, **f32)}
    if k:
        out["topk_ids"] = torch.empty(n, k, device=dev, dtype=torch.long)
        out["topk_logprobs"] = torch.empty(n, k, **f32)
        out["topk_mass"] = torch.empty(n, **f32)
    if betas:
        out["soft_value"] = torch.empty(n, len(betas), **f32)
    if has_ref:
        out["ref_lse"] = torch.empty(n, **f32)
        out["ref_token_logprob"] = torch.empty(n, **f32)
        if k:
            out["ref_topk_logprobs"] = torch.empty(n, k, **f32)
        if k and ref_mode != "exact":
            out["ref_paper_abs_err"] = torch.empty(n, **f32)
    targets = targets.to(dev)

    with torch.no_grad():
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            tgt = targets[s:e]
            has_tgt = tgt >= 0
            tgt_idx = tgt.clamp(min=0).unsqueeze(1)
            nan = torch.tensor(float("nan"), **f32)

            z = head.logits(hidden[s:e])  # [c, V] float32: the only full-vocab tensor
            # what needs the raw logits first (gathers, top-K, other betas), then the lse,
            # which may overwrite z (`_lse_rows`) unless the reference reuses it
            if k:
                vals, ids = torch.topk(z, k, dim=-1, largest=True, sorted=True)
            tok_z = z.gather(1, tgt_idx).squeeze(1)
            for j, b in enumerate(betas):  # V_beta(s) = beta * logsumexp(z / beta)
                if b != 1.0:
                    out["soft_value"][s:e, j] = b * torch.logsumexp(z / b, -1)
            teacher_z = z if has_ref and same_model else None
            lse = _lse_rows(z, vals[:, :1] if k else None, overwrite=teacher_z is None)
            del z
            out["lse"][s:e] = lse
            if k:
                topk_lp = vals - lse.unsqueeze(1)
                out["topk_ids"][s:e] = ids
                out["topk_logprobs"][s:e] = topk_lp
                out["topk_mass"][s:e] = topk_lp.exp().sum(-1)
                del vals
            out["token_logprob"][s:e] = torch.where(has_tgt, tok_z - lse, nan)
            for j, b in enumerate(betas):
                if b == 1.0:  # beta = 1 is the lse itself
                    out["soft_value"][s:e, j] = lse

            if has_ref:
                zr = teacher_z if teacher_z is not None else ref_head.logits(ref_hidden[s:e])
                tok_zr = zr.gather(1, tgt_idx).squeeze(1)
                zr_at_ids = zr.gather(1, ids) if k else None
                paper = k and ref_mode != "exact"  # the approximation reads the raw logits
                lse_r = lse if teacher_z is not None else _lse_rows(zr, None, overwrite=not paper)
                out["ref_lse"][s:e] = lse_r
                out["ref_token_logprob"][s:e] = torch.where(has_tgt, tok_zr - lse_r, nan)
            if has_ref and k:
                ref_at_ids = zr_at_ids - lse_r.unsqueeze(1)
                if paper:
                    floor = "dpo" if ref_mode == "paper-dpo-floor" else "reference"
                    approx = _paper_ref_approx(zr, lse_r, ids, k, floor, topk_lp)
                    out["ref_paper_abs_err"][s:e] = (approx - ref_at_ids).abs().mean(-1)
                    out["ref_topk_logprobs"][s:e] = approx
                else:
                    out["ref_topk_logprobs"][s:e] = ref_at_ids
            if has_ref:
                del zr
    return out


def _lse_rows(z: Tensor, row_max: Tensor | None = None, overwrite: bool = False) -> Tensor:
    """logsumexp over the last dim of [c, V] logits. With `overwrite` on CPU, z is turned
    into exp(z - max) in place: torch.logsumexp makes a [c, V] temporary and reads the
    logits once more, which at V = 151,936 cost ~0.3 ms of ~3.3 ms a scored position on one
    core (benchmarks/results/precompute_qwen0.5b_cpu.md). `row_max` [c, 1]: the row maxima
    when known (the top-1 of the top-K). GPUs keep torch's kernel (not measured there)."""
    if not overwrite or z.device.type != "cpu":
        return torch.logsumexp(z, dim=-1)
    m = z.amax(-1, keepdim=True) if row_max is None else row_max
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # an all -inf row: lse -inf
    return z.sub_(m).exp_().sum(-1).log_().add_(m.squeeze(1))


def _paper_ref_approx(zr: Tensor, lse_r: Tensor, dpo_ids: Tensor, k: int,
                      floor: str = "reference", dpo_lp: Tensor | None = None) -> Tensor:
    """ADPA paper's approximation: the reference's logprob where the DPO id is in the
    reference's own top-K, else the reference's lowest top-K logprob (floor="reference").
    floor="dpo" is the released data pipeline: a missing id gets the DPO teacher's lowest
    top-K probability and every probability is floored at 1e-7; the value returned is then
    the one that makes `dpo_lp - value` that pipeline's advantage (train/losses/adpa.py
    `paper_advantage(..., floor="dpo")` computes the same advantage)."""
    rvals, rids = torch.topk(zr, k, dim=-1)
    rlp = rvals - lse_r.unsqueeze(1)
    # membership [c, K, K] is small (K ~ 50), no full-vocab temporaries
    match = dpo_ids.unsqueeze(2) == rids.unsqueeze(1)
    found = match.any(-1)
    gathered = (match.float() * rlp.unsqueeze(1)).sum(-1)
    if floor == "reference":
        return torch.where(found, gathered, rlp[:, -1:].expand_as(gathered))
    lo = math.log(1e-7)
    dpo_floored = dpo_lp.clamp(min=lo)
    ref = torch.where(found, gathered.clamp(min=lo), dpo_floored.amin(-1, keepdim=True).expand_as(gathered))
    return ref - (dpo_floored - dpo_lp)  # exactly `ref` unless a DPO probability was floored


def reference_fields_float64(
    logits: Tensor, targets: Tensor, k: int, betas: Sequence[float]
) -> dict[str, Tensor]:
    """Slow float64 reference from full logits [N, V] (for tests and verification)."""
    z = logits.double()
    lp = torch.log_softmax(z, -1)
    vals, ids = torch.topk(lp, k, -1)
    has = targets >= 0
    tok = lp.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    tok = torch.where(has, tok, torch.full_like(tok, float("nan")))
    sv = torch.stack([b * torch.logsumexp(z / b, -1) for b in betas], -1)
    return {"logprobs": lp, "topk_ids": ids, "topk_logprobs": vals, "token_logprob": tok,
            "soft_value": sv}
