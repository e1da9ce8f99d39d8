"""`run_rollout(cfg)`: sample N responses per prompt and store them with behavior log-probs.

Behavior log-prob definition (the number stored in `behavior_logprob[t]`): the log-probability
of the sampled token under the EXACT distribution it was drawn from, i.e. after temperature,
top-k and top-p: log softmax(warp(z / T))[y_t]. This is the proposal density mu of importance
sampling, so pi_theta(y_t|s_t) / mu(y_t|s_t) is an unbiased correction for any sampler setting.

Consistency with the trainer: the trainer's pi_theta is the model at temperature 1 with no
truncation. With temperature=1, top_p=1, top_k=0 (the defaults, and what TGPO/GRPO should
use) the two definitions coincide and the ratio is exactly 1 before the first update. With
other settings the ratio at step 0 is pi_1(y)/mu_T(y) != 1, so PPO-style clipping would act on
on-policy data; a trainer that wants ratio 1 must apply the same temperature to its own
logits. The sampling settings are written to the store's options (`sampling`) so it can.

For `include_chosen`, the dataset's chosen response joins the group (role `chosen`, used by
ADPA's L_SFT); it was not sampled, so its `behavior_logprob` is the sampler's temperature-
scaled log-prob without truncation (finite everywhere) and must not be used as an
importance weight.

Text (METHODS §5): every record carries `prompt_source`, the prompt field as precompute
writes it for the same dataset row (`data.prompt_source`; for a context-conditioned teacher
rollout the prompt WITHOUT the context, the student's), and `response_text` only where the
plain decoding of its ids does not give its text back, so a student with another tokenizer
can re-tokenize it. Both backends share this: the text is made from the sampled ids here.
The options carry `text`, so a store written before records carried text has another key.

Why our own warpers: transformers applies user logits processors BEFORE its own temperature /
top-p warpers, so a recorder passed to `generate` would see unwarped logits. We pass
temperature/top-k/top-p ourselves (the same transformers classes, same order as generate),
then the recorder last, and call generate with its own warpers disabled.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .config import CheckedRolloutConfig, RolloutConfig, SamplerSettings, Sampling
from .data import (
    DataError,
    IdSet,
    Tokenizing,
    _check_field,
    dataset_fingerprint,
    example_id,
    prompt_source,
    response_text,
    row_prompts,
)
from .models import (
    load_model,
    load_tokenizer,
    model_fingerprint,
    model_vocab_size,
    resolve_device,
    resolve_dtype,
    tokenizer_fingerprint,
)
from .records import record
from .run import cache_hit, code_version, out_option
from .sources import open_data
from .storeapi import TEXT_FIELDS, StoreMeta, check_output, store_key
from .writing import GroupWriter

BEHAVIOR_DEFINITION = "log-prob under the sampling distribution after temperature, top-k, top-p"


@dataclass
class PromptItem:
    example_id: str
    prompt_ids: list[int]
    teacher_prompt_ids: list[int] | None
    chosen_ids: list[int] | None
    row: dict[str, Any]
    source: str  # the store's `prompt_source`: the prompt without context (data.py's form)
    chosen_text: str | None  # the chosen response's `response_text` (data.py's rule)

    def sampler_prompt(self, role: str, use_context: bool) -> list[int]:
        if role == "teacher_rollout" and use_context and self.teacher_prompt_ids is not None:
            return self.teacher_prompt_ids
        return self.prompt_ids


def load_prompts(cfg: RolloutConfig, tok: Any) -> tuple[list[PromptItem], str, int]:
    """Tokenized prompts (+ chosen responses when asked), a dataset fingerprint, skipped count."""
    source = open_data(cfg.data, cfg.data_config, cfg.split)
    file_sha = source.sha256()
    opts = cfg.data_options
    tk = Tokenizing(tok, opts)
    items, seen, skipped = [], IdSet(), 0
    resp_col = None
    for src in source.rows(cfg.limit):
        row, where = src.row, src.where
        if opts.prompt_column not in row:
            raise DataError(f"{where}: missing column {opts.prompt_column!r} (has {sorted(row)}); "
                            "every row needs a prompt")
        _check_field(row[opts.prompt_column], where, opts.prompt_column)
        ex_id = example_id(src, opts, seen)
        p_ids, tp_ids = row_prompts(src, opts, tk, cfg.use_context)
        chosen, chosen_text = None, None
        if cfg.include_chosen:
            resp_col = resp_col or next((c for c in (opts.chosen_column, opts.completion_column)
                                         if c in row), None)
            if resp_col is None or resp_col not in row:
                raise DataError(f"{where}: --include-chosen needs a {opts.chosen_column!r} or "
                                f"{opts.completion_column!r} column (has {sorted(row)})")
            _check_field(row[resp_col], where, resp_col)
            chosen, chosen_text = _chosen(tk, row[opts.prompt_column], row[resp_col], where,
                                          resp_col)
        longest = max(len(p_ids), len(tp_ids or []))
        if cfg.max_prompt_length is not None and longest > cfg.max_prompt_length:
            if cfg.truncate == "fail":
                raise DataError(f"{where}: the prompt has {longest} tokens > --max-prompt-length "
                                f"{cfg.max_prompt_length}; raise it or pass --truncate skip")
            skipped += 1
            continue
        items.append(PromptItem(ex_id, p_ids, tp_ids, chosen, row,
                                prompt_source(row[opts.prompt_column]), chosen_text))
    if not items:
        raise DataError(f"{cfg.data}: no usable prompts: all {skipped} were longer than "
                        f"--max-prompt-length {cfg.max_prompt_length}; raise it")
    return items, dataset_fingerprint(file_sha, opts, tokenizer_fingerprint(tok)), skipped


def _chosen(tk: Tokenizing, prompt: Any, r: Any, where: str, col: str) -> tuple[list[int], str | None]:
    """A dataset response's ids and its `response_text`, as precompute's `tokenize_rows`
    makes them: a string's text is kept only where decoding its ids does not give it back;
    a message list keeps none."""
    if not isinstance(r, str):
        return tk.response(prompt, r, where, col), None
    raw = tk.encode([r], False)[0]
    return tk.finish_response(raw, where, col), response_text(tk.tok, raw, r)


def sampled_text(tok: Any, resp: list[int], eos: int | None) -> str | None:
    """A sampled response's `response_text`. Its text is what its ids spell (the body
    without the final EOS, decoded with no clean-up); kept only where the plain decoding a
    student does (train/xtok/translate.py) does not give that back (data.py's rule)."""
    body = resp[:-1] if resp and resp[-1] == eos else resp
    spelled = tok.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return response_text(tok, body, spelled)


# ------------------------------------------------------------------------------- HF sampling

class BehaviorRecorder:
    """LogitsProcessor (placed last) that records log-probs of the sampled tokens.

    At call i it sees the processed scores of step i; the token drawn from them appears at the
    end of input_ids at call i + 1 (or in the final sequences), so we keep one step of log-probs.
    """

    def __init__(self) -> None:
        self.prev: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prev is not None:
            self.steps.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """[rows, steps] log-probs of the generated tokens."""
        if self.prev is not None:
            self.steps.append(self.prev.gather(1, sequences[:, -1:]).squeeze(1))
            self.prev = None
        return torch.stack(self.steps, 1) if self.steps else sequences.new_zeros((len(sequences), 0))


def warpers(temperature: float, top_k: int, top_p: float) -> list[Any]:
    """Temperature -> top-k -> top-p, as transformers' generate orders them."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    out: list[Any] = []
    if temperature != 1.0:
        out.append(TemperatureLogitsWarper(temperature))
    if top_k:
        out.append(TopKLogitsWarper(top_k=top_k))
    if top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=top_p))
    return out


@torch.no_grad()
def sample_hf(model: Any, prompts: list[list[int]], pad_id: int, eos_id: int, temperature: float,
              top_p: float, top_k: int, max_new_tokens: int, seed: int
              ) -> list[tuple[list[int], list[float]]]:
    """One left-padded batched `generate` (KV cache); returns (response ids, behavior logprobs)
    per prompt row, cut after the first EOS."""
    from transformers import GenerationConfig, LogitsProcessorList

    dev = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=dev)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, device=dev)
        mask[i, width - len(p):] = 1
    rec = BehaviorRecorder()
    procs = LogitsProcessorList([*warpers(temperature, top_k, top_p), rec])
    # A fresh config so a model's generation_config.json (repetition penalty, its own
    # temperature ...) cannot silently change the distribution we record.
    gen = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                           max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                           eos_token_id=eos_id, bos_token_id=None)
    torch.manual_seed(seed)
    seqs = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen,
                          logits_processor=procs)
    new = seqs[:, width:]
    lps = rec.finish(seqs).cpu()
    out = []
    for i, row in enumerate(new.cpu().tolist()):
        n = row.index(eos_id) + 1 if eos_id in row else len(row)
        out.append((row[:n], lps[i, :n].tolist()))
    return out


@torch.no_grad()
def teacher_forced_logprobs(model: Any, prompt: list[int], response: list[int],
                            temperature: float) -> list[float]:
    """The sampler's temperature-scaled log-probs of a given response (for `chosen` records)."""
    dev = next(model.parameters()).device
    ids = torch.tensor([prompt + response], device=dev)
    z = model(input_ids=ids).logits[0, len(prompt) - 1: -1].float() / temperature
    lp = torch.log_softmax(z, -1).gather(1, torch.tensor(response, device=dev)[:, None])
    return lp[:, 0].cpu().tolist()


# ------------------------------------------------------------------------------- driver

def _meta(cfg: CheckedRolloutConfig, tok: Any, ds_fp: str) -> StoreMeta:
    dev = resolve_device(cfg.device)
    sampling = asdict(cfg.sampling)
    reward_name = cfg.reward if isinstance(cfg.reward, str) or cfg.reward is None else (
        f"{getattr(cfg.reward, '__module__', '?')}:{getattr(cfg.reward, '__qualname__', '?')}")
    return StoreMeta(
        k=0, betas=[], fields=["behavior_logprob"],
        models={"sampler": model_fingerprint(cfg.model, trust_remote_code=cfg.trust_remote_code)},
        tokenizer={"sha256": tokenizer_fingerprint(tok),
                   "vocab_size": model_vocab_size(cfg.model) or len(tok)},
        dataset={"sha256": ds_fp, "limit": cfg.limit},
        options={"codec": cfg.codec, "role": cfg.role, "sampling": sampling,
                 "include_chosen": cfg.include_chosen, "use_context": cfg.use_context,
                 "reward": reward_name, "behavior_logprob": BEHAVIOR_DEFINITION,
                 # the records carry text (METHODS §5): part of the key, so a store written
                 # before they did is never reused (cache_hit) or resumed into
                 "text": list(TEXT_FIELDS),
                 "dtype": str(resolve_dtype(cfg.dtype, dev)).replace("torch.", "")},
        code_version=code_version())


def run_rollout(cfg: RolloutConfig) -> str:
    """Sample, record behavior log-probs (and rewards), write a store; returns its URL.
    Every option and the whole dataset are checked before anything is written; a new store
    appears with its first committed group. The entry point: the config is checked here,
    once (`validated()`, which also resolves a `module:function` reward to the function the
    store records), and only read below."""
    cfg = cfg.validated()
    tok = load_tokenizer(cfg.model, cfg.trust_remote_code, role="sampler")
    items, ds_fp, skipped = load_prompts(cfg, tok)
    meta = _meta(cfg, tok, ds_fp)
    url = cfg.out or f"{cfg.out_root.rstrip('/')}/{store_key(meta)}"
    if cache_hit(url, meta):
        return url
    reward_fn = cfg.reward
    check_output(url, out_option(cfg))
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    with GroupWriter(url, meta, cfg.shard_records, cfg.resume, "rollout_report", clamp=True) as writer:
        todo = [it for it in items if it.example_id not in writer.done]
        todo.sort(key=lambda it: len(it.sampler_prompt(cfg.role, cfg.use_context)))
        if todo:
            model = None
            if cfg.backend == "hf" or cfg.include_chosen:
                model = load_model(cfg.model, "sampler", device=cfg.device, dtype=cfg.dtype,
                                   trust_remote_code=cfg.trust_remote_code)
            sampler, close = _make_sampler(cfg.sampler_settings, cfg.sampling, model, pad, eos)
            try:
                _rollout_into(cfg, writer, todo, sampler, model, tok, reward_fn)
            finally:
                close()
        writer.close({"prompts": len(items), "skipped": skipped})
    return url


def _make_sampler(sampler: SamplerSettings, sampling: Sampling, model: Any, pad: int, eos: int):
    """(sample(prompts, seed), close()): vLLM's engine processes are stopped when done."""
    s = sampling
    if s.backend == "vllm":
        from .vllm_backend import VLLMSampler

        vs = VLLMSampler(sampler.model, dtype=sampler.dtype,
                         trust_remote_code=sampler.trust_remote_code, seed=s.seed,
                         device=sampler.device)
        return (lambda prompts, seed: vs.sample(prompts, eos, s.temperature, s.top_p, s.top_k,
                                                s.max_new_tokens, seed)), vs.close
    return (lambda prompts, seed: sample_hf(model, prompts, pad, eos, s.temperature, s.top_p,
                                            s.top_k, s.max_new_tokens, seed)), lambda: None


def _rollout_into(cfg: CheckedRolloutConfig, writer: GroupWriter, todo: list[PromptItem], sampler: Any,
                  model: Any, tok: Any, reward_fn: Callable[..., float] | None) -> None:
    from .run import progress

    eos = tok.eos_token_id
    t0, samples, tokens = time.perf_counter(), 0, 0
    with progress(cfg.progress, len(todo), "rollout") as bar:  # rows = prompts
        task = bar.add_task("rollout", total=len(todo), seqs=0, tokens=0, tps="-")
        for b in range(0, len(todo), cfg.batch_prompts):
            batch = todo[b: b + cfg.batch_prompts]
            prompts = [it.sampler_prompt(cfg.role, cfg.use_context) for it in batch
                       for _ in range(cfg.n)]
            # seed per batch position: deterministic for a given dataset and settings
            results = sampler(prompts, cfg.seed * 1_000_003 + b)
            for j, it in enumerate(batch):
                group = []
                if it.chosen_ids is not None:
                    lp = teacher_forced_logprobs(model, it.sampler_prompt(cfg.role, cfg.use_context),
                                                 it.chosen_ids, cfg.temperature)
                    group.append(_record(it, "chosen", 0, it.chosen_ids, lp, eos, tok, reward_fn,
                                         it.chosen_text))
                for g in range(cfg.n):
                    resp, lp = results[j * cfg.n + g]
                    group.append(_record(it, cfg.role, g, resp, lp, eos, tok, reward_fn,
                                         sampled_text(tok, resp, eos)))
                writer.add_group(group)
            samples += len(results)
            tokens += sum(len(r) for r, _ in results)
            rate = tokens / max(time.perf_counter() - t0, 1e-9)
            bar.update(task, advance=len(batch), seqs=samples, tokens=tokens, tps=f"{rate:,.0f}")


def _record(it: PromptItem, role: str, group: int, resp: list[int], lp: list[float], eos: int,
            tok: Any, reward_fn: Callable[..., float] | None, text: str | None) -> dict[str, Any]:
    reward = None
    if reward_fn is not None:
        prompt_text = tok.decode(it.prompt_ids, skip_special_tokens=True)
        name = getattr(reward_fn, "__qualname__", repr(reward_fn))
        try:
            reward = float(reward_fn(prompt_text, tok.decode(resp, skip_special_tokens=True), it.row))
        except Exception as e:  # noqa: BLE001 - user code: one line naming it and the example
            raise ValueError(f"the reward function {name} failed on example {it.example_id!r} "
                             f"({type(e).__name__}: {e}); the groups committed so far are kept: "
                             "fix it and re-run the same command to resume") from None
        if not math.isfinite(reward):
            raise ValueError(f"reward for example {it.example_id!r} is {reward}; return a finite float")
    texts = {"prompt_source": it.source}
    if text is not None:
        texts["response_text"] = text
    return record(it.example_id, role, group, it.prompt_ids, resp, it.teacher_prompt_ids, eos,
                  reward, behavior_logprob=lp, text=texts)
