"""Several teachers over the same examples (METHODS §4, revision 3): one student forward, and
the teacher-dependent terms weighted by w_j (Σ_j w_j = 1):

    top-K KD / DCKD:  Σ_j w_j KL_t(j), each teacher with its own top-K ids and mode;
    ADPA:             L_SFT − γ Σ_j w_j Σ_t Σ_k π_θ(id_jk|s_t) adv_jk;
    TVKD:             the shaping Σ_j w_j ψ_t(j) in place of ψ_t.

Every one of these losses is affine in its teacher terms, with teacher-free terms (the SFT
term of DCKD and ADPA) that do not change between teachers. So with Σ_j w_j = 1,
Σ_j w_j L(teacher j) IS the ensemble loss: the teacher-free terms enter with total weight
Σ_j w_j = 1, i.e. once (`ensemble_loss`). TVKD is not affine in ψ (−log σ of the margin),
but ψ is linear in the stored values, Σ_j w_j ψ(V_j) = ψ(Σ_j w_j V_j), so its ensemble is
the single-teacher loss on the mixed values (`mix_teachers`). Why a sum of losses and not a
mixed target: a teacher's probability outside its own top-K is not stored; the weighted sum
uses only what was stored, exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ._common import LossOutput


def check_weights(weights: Sequence[float], n: int) -> None:
    if len(weights) != n:
        raise ValueError(f"ensemble: {len(weights)} weights for {n} teachers")
    if any(w < 0 for w in weights) or abs(sum(weights) - 1.0) > 1e-6:
        raise ValueError(f"ensemble: weights {list(weights)} must be >= 0 and sum to 1")


def ensemble_loss(per_teacher: Sequence[LossOutput], weights: Sequence[float]) -> LossOutput:
    """Σ_j w_j L_j of one affine-in-the-teacher loss evaluated once per teacher (with the
    student log-probs at that teacher's ids); metrics are weighted the same way."""
    check_weights(weights, len(per_teacher))
    loss = sum(w * out[0] for w, out in zip(weights, per_teacher, strict=True))
    keys = [k for k in per_teacher[0][1] if all(k in out[1] for out in per_teacher)]
    metrics = {k: sum(w * out[1][k] for w, out in zip(weights, per_teacher, strict=True)).detach() for k in keys}
    return LossOutput(loss, metrics)


def mix_teachers(values: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Σ_j w_j values_j: a teacher quantity a loss uses linearly (TVKD's stored soft values)."""
    check_weights(weights, len(values))
    return sum(w * v for w, v in zip(weights, values, strict=True))
