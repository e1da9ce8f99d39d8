"""`kdcache eval`: how well a student learned the preference, measured on an eval store.

- reward accuracy (Meng et al. 2024, the ADPA paper's metric): the fraction of pairs whose
  chosen response gets a higher *average* token log-prob than the rejected one;
- student-vs-teacher KL on the stored top-K (renormalised forward KL per token), where the
  store holds teacher fields;
- a rule reward on the student's own samples, where a reward is given: for the demo's
  binary rule this is the rule-judged preference rate; with it, the fraction of samples
  that end with EOS (`eos_rate`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdcache.store import open_store

from . import losses as L
from .batch import collate
from .rewards import resolve_reward
from .student import StudentOut, student_forward


@dataclass
class EvalConfig:
    model: str
    store: str
    reward: str | None = None  # `module:function`; None: no sampling
    samples: int = 4  # samples per prompt for the rule reward
    max_new_tokens: int = 32
    temperature: float = 1.0
    batch_size: int = 32
    max_groups: int = 0  # 0: all
    seed: int = 0
    chunk_size: int = 1024


def _load(model_dir: str, device):
    try:
        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load model {model_dir!r} for eval: {e.__class__.__name__}: {e}") from e
    return model.to(device).eval(), tok


@torch.no_grad()
def _score(model, records, pad_id, chunk_size, device) -> tuple[StudentOut, object]:
    batch = collate(records, pad_id=pad_id).to(device)
    return student_forward(model, batch, chunk_size), batch


@torch.no_grad()
def _sample(model, tok, prompts: list[list[int]], cfg: EvalConfig, device) -> tuple[list[list[int]], int]:
    """cfg.samples sampled continuations per prompt (left-padded batched generate), and how
    many of them ended with EOS within max_new_tokens."""
    out: list[list[int]] = []
    ended = 0
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for i in range(0, len(prompts), cfg.batch_size):
        chunk = [p for p in prompts[i : i + cfg.batch_size] for _ in range(cfg.samples)]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for j, p in enumerate(chunk):
            ids[j, width - len(p) :] = torch.tensor(p)
            attn[j, width - len(p) :] = 1
        gen = model.generate(
            input_ids=ids.to(device), attention_mask=attn.to(device), do_sample=True,
            temperature=cfg.temperature, top_k=0, top_p=1.0, max_new_tokens=cfg.max_new_tokens,
            pad_token_id=pad, eos_token_id=tok.eos_token_id,
        )
        for row in gen[:, width:].tolist():
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id)]
                ended += 1
            out.append(row)
    return out, ended


def evaluate(cfg: EvalConfig) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    model, tok = _load(cfg.model, device)
    store = open_store(cfg.store)
    pad_id = tok.pad_token_id or 0
    pairs, prompts, n_groups = [], [], 0
    for group in store.groups():
        if cfg.max_groups and n_groups >= cfg.max_groups:
            break
        n_groups += 1
        chosen = next((r for r in group if r["role"] == "chosen"), None)
        rejected = next((r for r in group if r["role"] == "rejected"), None)
        if chosen is not None and rejected is not None:
            pairs.append((chosen, rejected))
        prompts.append(group[0])
    result: dict = {"groups": n_groups}
    has_topk = "topk_logprobs" in store.fields and "topk_ids" in store.fields

    wins, kl_sum, kl_tokens = 0, 0.0, 0
    for i in range(0, len(pairs), cfg.batch_size):
        chunk = pairs[i : i + cfg.batch_size]
        records = [c for c, _ in chunk] + [r for _, r in chunk]
        out, batch = _score(model, records, pad_id, cfg.chunk_size, device)
        avg = (out.token_logprobs * batch.mask).sum(-1) / batch.mask.sum(-1).clamp(min=1)
        n = len(chunk)
        wins += int((avg[:n] > avg[n:]).sum())
        if has_topk:
            kl = L.kd_per_token(out.topk_logprobs, batch.stored["topk_logprobs"])
            kl_sum += float((kl * batch.mask).sum())
            kl_tokens += int(batch.mask.sum())
    if pairs:
        result["reward_accuracy"] = wins / len(pairs)
        result["pairs"] = len(pairs)
    if kl_tokens:
        result["kl_topk"] = kl_sum / kl_tokens

    if cfg.reward:
        fn = resolve_reward(cfg.reward)
        prompt_ids = [list(map(int, r["prompt_ids"])) for r in prompts]
        responses, ended = _sample(model, tok, prompt_ids, cfg, device)
        scores = []
        for j, resp in enumerate(responses):
            rec = prompts[j // cfg.samples]
            prompt_text = tok.decode(rec["prompt_ids"], skip_special_tokens=True)
            scores.append(float(fn(prompt_text, tok.decode(resp, skip_special_tokens=True), None)))
        result["reward_mean"] = sum(scores) / max(1, len(scores))
        # a student that stops stopping (e.g. ADPA drifting onto tail tokens) shows here first
        result["eos_rate"] = ended / max(1, len(scores))
        result["samples"] = len(scores)
    return result
