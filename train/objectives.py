"""Objectives: which records and stored fields each one reads, and how a batch maps onto
its loss in `losses/`. The trainer's loop is the same for all of them.

Records of a group arrive in stored order; `select_records` lays a micro-batch out as
role blocks (e.g. all chosen, then all rejected), so pair i of one block lines up with
pair i of the other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from . import losses
from .batch import SeqBatch
from .config import TrainConfig
from .student import StudentOut
from .xtok.translate import student_topk

LossFn = Callable[[StudentOut, SeqBatch, TrainConfig, int], tuple[torch.Tensor, dict]]


@dataclass(frozen=True)
class ObjectiveSpec:
    blocks: tuple[tuple[str, ...], ...]  # per block, the roles it accepts (one record each)
    fields: tuple[str, ...]  # stored per-token fields the loss reads
    loss: LossFn
    paired: bool = True  # a group must supply one record to every block, or it is skipped


def _rows(batch: SeqBatch, block: int) -> torch.Tensor:
    return torch.tensor([i for i, b in enumerate(batch.block_ids) if b == block], device=batch.mask.device)


def _take(t: torch.Tensor | None, idx: torch.Tensor):
    return None if t is None else t.index_select(0, idx)


def _sft(student, batch, cfg, step):
    return losses.sft_loss(student.token_logprobs, batch.mask)


def _kd(student, batch, cfg, step):
    if "uld_teacher" in batch.stored:  # another tokenizer, --cross-tokenizer uld
        return losses.uld_loss(student.own_topk_logprobs, batch.stored["uld_teacher"], _aligned(batch))
    return losses.topk_kd_loss(student_topk(student.topk_logprobs, batch.stored), batch.stored["topk_logprobs"],
                          batch.mask, mode=cfg.kd_mode, divergence=cfg.kd_divergence)


def _aligned(batch: SeqBatch) -> torch.Tensor:
    """Response positions aligned with a teacher position (another tokenizer, METHODS §5)."""
    return batch.mask & batch.stored["xtok_aligned"].bool()


def _or(value, default):
    """A variant's weight: None in the config means that variant's published default."""
    return default if value is None else value


def _dckd(student, batch, cfg, step):
    w, r = _rows(batch, 0), _rows(batch, 1)
    if "uld_teacher" in batch.stored:  # another tokenizer, --cross-tokenizer uld
        return _dckd_uld(student, batch, cfg, w, r)
    teacher = batch.stored["topk_logprobs"]
    s_topk = student_topk(student.topk_logprobs, batch.stored)
    return losses.dckd_loss(
        chosen_token_logprobs=_take(student.token_logprobs, w),
        chosen_student_topk=_take(s_topk, w),
        chosen_teacher_topk=_take(teacher, w),
        chosen_mask=_take(batch.mask, w),
        rejected_student_topk=_take(s_topk, r),
        rejected_teacher_topk=_take(teacher, r),
        rejected_mask=_take(batch.mask, r),
        alpha=_or(cfg.dckd_alpha, 0.2), mode=cfg.kd_mode, divergence=cfg.kd_divergence,
        released_code=cfg.dckd_released_code,
        weights=(_or(cfg.dckd_sft_weight, 1.0), _or(cfg.dckd_chosen_weight, 0.1),
                 _or(cfg.dckd_rejected_weight, 0.1)),
    )


def _dckd_uld(student, batch, cfg, w, r):
    """DCKD's Eq. 7 with ULD's distance in place of the KD term: L_SFT(y_w) on every
    position + α (Σ_t d_t on y_w + Σ_t d_t on y_l) on the aligned ones."""
    own, teacher, aligned = student.own_topk_logprobs, batch.stored["uld_teacher"], _aligned(batch)
    sft = losses.sft_loss(_take(student.token_logprobs, w), _take(batch.mask, w))
    dw = losses.uld_loss(_take(own, w), _take(teacher, w), _take(aligned, w))
    dl = losses.uld_loss(_take(own, r), _take(teacher, r), _take(aligned, r))
    alpha = _or(cfg.dckd_alpha, 0.2)
    return sft.loss + alpha * (dw.loss + dl.loss), {
        **sft.metrics, "uld_chosen": dw.metrics["uld_per_token"], "uld_rejected": dl.metrics["uld_per_token"]}


def _adpa(student, batch, cfg, step):
    y, roll = _rows(batch, 0), _rows(batch, 1)
    # with --ref-mode paper / paper-dpo-floor the store's ref_topk_logprobs holds the
    # approximation, so this difference is that approximate advantage
    adv = losses.exact_advantage(batch.stored["topk_logprobs"], batch.stored["ref_topk_logprobs"])
    weight = _or(cfg.adpa_weight, 1.6) if cfg.adpa_released_code else _or(cfg.adpa_gamma, 3.0)
    return losses.adpa_loss(
        _take(student.token_logprobs, y), _take(batch.mask, y),
        _take(student_topk(student.topk_logprobs, batch.stored), roll), _take(adv, roll), _take(batch.mask, roll),
        gamma=weight, released_code=cfg.adpa_released_code,
    )


def _dpo(student, batch, cfg, step):
    w, r = _rows(batch, 0), _rows(batch, 1)
    ref = batch.stored["ref_token_logprob"]
    out = losses.dpo_loss(
        _take(student.token_logprobs, w), _take(ref, w), _take(batch.mask, w),
        _take(student.token_logprobs, r), _take(ref, r), _take(batch.mask, r),
        beta=cfg.dpo_beta,
    )
    if cfg.dpo_nll <= 0:
        return out
    lp, m = _take(student.token_logprobs, w), _take(batch.mask, w).float()
    nll = (-(lp * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()  # length-normalised, as in RPO
    return out.loss + cfg.dpo_nll * nll, {**out.metrics, "nll": nll.detach()}


def _tvkd(student, batch, cfg, step):
    w, r = _rows(batch, 0), _rows(batch, 1)
    col = [abs(b - cfg.tvkd_beta) < 1e-9 for b in batch.betas].index(True)
    value = batch.stored["soft_value"][..., col]
    ref = batch.stored.get("ref_token_logprob") if cfg.tvkd_maxent else None
    return losses.tvkd_loss(
        _take(student.token_logprobs, w), _take(value, w), _take(batch.mask, w),
        _take(student.token_logprobs, r), _take(value, r), _take(batch.mask, r),
        alpha=cfg.tvkd_alpha, beta_s=cfg.tvkd_beta_s, gamma=cfg.tvkd_gamma,
        chosen_ref_logprobs=_take(ref, w), rejected_ref_logprobs=_take(ref, r),
    )


def _tgpo(student, batch, cfg, step):
    if batch.reward is None:
        raise ValueError("tgpo needs rollouts with rewards: run `kdcache rollout --reward module:function`")
    ids = {e: i for i, e in enumerate(dict.fromkeys(batch.example_ids))}
    group_ids = torch.tensor([ids[e] for e in batch.example_ids], device=batch.mask.device)
    # the teacher's greedy token y^T_t = topk_ids[t, 0], its top-1 id: student.topk_logprobs
    # is the student's log-prob at the stored topk_ids, so its column 0
    guide = student.topk_logprobs[..., 0]
    return losses.tgpo_loss(
        student.token_logprobs, batch.stored["behavior_logprob"], guide, batch.reward, group_ids,
        batch.mask, step + cfg.tgpo_step_offset, w_init=cfg.tgpo_w_init, delta=cfg.tgpo_delta, clip=cfg.tgpo_clip,
        shaping=cfg.tgpo_shaping, lam=cfg.tgpo_lambda,
    )


def _pbsd(student, batch, cfg, step):
    pos, neg = _rows(batch, 0), _rows(batch, 1)
    teach = batch.stored["token_logprob"]  # the teacher WITH context c, scored at precompute
    return losses.pbsd_loss(
        _take(student.token_logprobs, pos), _take(teach, pos), _take(batch.mask, pos),
        _take(student.token_logprobs, neg), _take(teach, neg), _take(batch.mask, neg),
        beta=cfg.pbsd_beta,
    )


PAIR = (("chosen",), ("rejected",))
OBJECTIVE_SPECS: dict[str, ObjectiveSpec] = {
    "sft": ObjectiveSpec((("chosen", "sft"),), (), _sft),
    "seqkd": ObjectiveSpec((("teacher_rollout",),), (), _sft, paired=False),
    "kd": ObjectiveSpec(
        (("chosen", "rejected", "sft", "teacher_rollout", "student_rollout"),),
        ("topk_ids", "topk_logprobs"), _kd, paired=False,
    ),
    "dckd": ObjectiveSpec(PAIR, ("topk_ids", "topk_logprobs"), _dckd),
    "adpa": ObjectiveSpec(
        (("chosen", "sft"), ("student_rollout",)),
        ("topk_ids", "topk_logprobs", "ref_topk_logprobs"), _adpa, paired=False,
    ),
    "dpo": ObjectiveSpec(PAIR, ("ref_token_logprob",), _dpo),
    "tvkd": ObjectiveSpec(PAIR, ("soft_value",), _tvkd),
    "tgpo": ObjectiveSpec(
        (("student_rollout",),), ("topk_ids", "behavior_logprob"), _tgpo, paired=False,
    ),
    "pbsd": ObjectiveSpec((("teacher_rollout",), ("student_rollout",)), ("token_logprob",), _pbsd),
}



def objective_fields(cfg) -> tuple[str, ...]:
    """The stored fields a run reads: the objective's own, plus `ref_token_logprob` for the
    MaxEnt TVKD (its log-ratio needs the reference; without it the reader would not load the
    field and the loss would silently train the plain form)."""
    fields = OBJECTIVE_SPECS[cfg.objective].fields
    if cfg.objective == "tvkd" and cfg.tvkd_maxent:
        fields = (*fields, "ref_token_logprob")
    return fields

# --ensemble (METHODS §4): the single-teacher loss once per teacher, on that teacher's view
def _teacher_views(student: StudentOut, batch: SeqBatch) -> Iterator[tuple[StudentOut, SeqBatch]]:
    """Per teacher j: the student's log-probs at j's top-K ids (sliced out of the union
    gathered once) and the batch with j's stored fields."""
    for j, stored in enumerate(batch.teachers):
        topk = student.topk_logprobs
        if topk is not None and batch.teacher_pos:
            topk = topk.gather(-1, batch.teacher_pos[j])
        yield (StudentOut(student.token_logprobs, topk),
               dataclasses.replace(batch, stored=stored, betas=batch.teacher_betas[j], teachers=[], teacher_pos=[]))


def _ensemble(single: LossFn) -> LossFn:
    def loss(student, batch, cfg, step):
        outs = [single(s, b, cfg, step) for s, b in _teacher_views(student, batch)]
        return losses.ensemble_loss(outs, batch.teacher_weights)
    return loss


def _tvkd_ensemble(student, batch, cfg, step):
    """ψ is linear in the stored values: the loss on the w-mixed V (and, for MaxEnt, the
    w-mixed reference log-probs) is the loss with the shaping Σ_j w_j ψ_t(j)."""
    w, dtype = batch.teacher_weights, student.token_logprobs.dtype  # mixed in the loss's precision
    cols = [[abs(b - cfg.tvkd_beta) < 1e-9 for b in betas].index(True) for betas in batch.teacher_betas]
    values = [t["soft_value"][..., c:c + 1].to(dtype) for t, c in zip(batch.teachers, cols, strict=True)]
    mixed = {"soft_value": losses.mix_teachers(values, w)}
    if cfg.tvkd_maxent and all("ref_token_logprob" in t for t in batch.teachers):
        mixed["ref_token_logprob"] = losses.mix_teachers([t["ref_token_logprob"].to(dtype) for t in batch.teachers], w)
    view = dataclasses.replace(batch, stored=mixed, betas=(cfg.tvkd_beta,), teachers=[], teacher_pos=[])
    return _tvkd(student, view, cfg, step)


ENSEMBLE_LOSSES: dict[str, LossFn] = {
    "kd": _ensemble(_kd), "dckd": _ensemble(_dckd), "adpa": _ensemble(_adpa), "tvkd": _tvkd_ensemble,
}


def objective_loss(objective: str, batch: SeqBatch) -> LossFn:
    """The loss function of `objective` for this batch: its ensemble form when the batch
    carries several teachers."""
    if batch.teachers:
        if objective not in ENSEMBLE_LOSSES:
            raise ValueError(f"objective {objective!r} has no ensemble form: use one of {', '.join(ENSEMBLE_LOSSES)}")
        return ENSEMBLE_LOSSES[objective]
    return OBJECTIVE_SPECS[objective].loss


def select_records(objective: str, groups: list[list[dict]]) -> tuple[list[dict], list[int]]:
    """Lay out the records one micro-batch needs, block by block, and their block ids.

    Paired objectives take one record per block from each group (pair i of block 0 matches
    pair i of block 1) and skip groups that cannot supply every block. Unpaired ones take
    every record whose role a block accepts (e.g. all G rollouts of a prompt for TGPO).
    """
    spec = OBJECTIVE_SPECS[objective]
    blocks: list[list[dict]] = [[] for _ in spec.blocks]
    for group in groups:
        if spec.paired:
            picks = [next((r for r in group if r["role"] in roles), None) for roles in spec.blocks]
            if all(p is not None for p in picks):
                for b, p in enumerate(picks):
                    blocks[b].append(p)
        else:
            for r in group:
                for b, roles in enumerate(spec.blocks):
                    if r["role"] in roles:
                        blocks[b].append(r)
                        break
    records = [r for block in blocks for r in block]
    block_ids = [b for b, block in enumerate(blocks) for _ in block]
    return records, block_ids
