"""`kdcache eval`: how well a student learned the preference, measured on an eval store.

- `reward_accuracy` (Meng et al. 2024, the ADPA paper's metric): the fraction of the store's
  chosen/rejected pairs in which the student gives the chosen response the higher *mean*
  token log-prob (no reward model: the student's own likelihoods rank the pair);
- `kl_topk`, where the store holds the teacher's top-K: per response token of chosen and
  rejected, Σ_k p_k (log p_k − log q_k), with p the teacher's distribution renormalised over
  its stored top-K ids and q the student's full-vocabulary probabilities of those ids; the
  mean over tokens, in nats (0: the student gives the teacher's top-K the teacher's mass);
- with `--reward`, a reward on the student's own samples (`reward_mean`: for the demo's
  binary rule, the rule-judged preference rate) and the fraction of samples that end with the
  tokenizer's EOS within --max-new-tokens (`eos_rate`; `eos_token` names it).

A reward is called as `fn(prompt_text, response_text, None) -> float`: `prompt_text` is the
stored prompt's ids decoded with special tokens skipped (with a chat template its markers go,
the role names stay: "user\nsort 3 1 2\nassistant\n"), `response_text` the sample up to its EOS,
decoded the same way, and the third argument (a training row in TGPO rewards) is None.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# torch, transformers and the store are imported inside the functions: `kdcache eval --help`
# builds its options from EvalConfig and must start without them.


@dataclass(frozen=True)
class EvalConfig:
    """`kdcache eval`'s options; frozen, checked once where an evaluation enters (`evaluate`)."""

    model: str = field(metadata={
        "help": "student to evaluate: a local HF model dir (e.g. runs/x/model) or a cached hub id",
        "panel": "Essentials"})
    store: str = field(metadata={
        "help": "eval store with chosen/rejected pairs (from `kdcache precompute` on held-out data)",
        "panel": "Essentials"})
    reward: str | None = field(default=None, metadata={
        "help": "reward on samples, called fn(prompt_text, response_text, None) -> float (prompt decoded "
                "without special tokens): module:function (a module.py in the current directory works) or "
                "built in: sort_rule, numeric_exact_match; unset: no sampling",
        "panel": "Essentials"})
    samples: int = field(default=4, metadata={
        "help": "samples per prompt for the rule reward", "panel": "Sampling"})
    max_new_tokens: int = field(default=32, metadata={
        "help": "longest sampled answer in tokens", "panel": "Sampling"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature", "panel": "Sampling"})
    batch_size: int = field(default=32, metadata={
        "help": "pairs scored (or prompts sampled) per forward", "panel": "Execution"})
    max_groups: int = field(default=0, metadata={
        "help": "evaluate only the first N groups of the store; 0: all", "panel": "Execution"})
    seed: int = field(default=0, metadata={"help": "sampling seed", "panel": "Sampling"})
    chunk_size: int = field(default=1024, metadata={
        "help": "positions per lm_head chunk when scoring", "panel": "Execution"})
    cross_tokenizer: bool = field(default=False, metadata={
        "help": "a student with another tokenizer than the store's: re-tokenize the text and align "
                "(METHODS §5; KL top-K then covers aligned positions, on the mapped ids); default off",
        "panel": "Essentials"})
    out: str | None = field(default=None, metadata={
        "help": "directory for eval.json and eval.csv; unset: the run directory (runs/x for "
                "--model runs/x/model), else the model directory", "panel": "Essentials"})
    report_to: list[str] | None = field(default=None, metadata={
        "help": "trackers that get the results (logged at the run's last step under eval/), "
                "comma-separated: none, tensorboard, wandb; unset: those the training run in the "
                "results directory used (its report.json: the same W&B run)", "panel": "Essentials"})


    def validated(self) -> EvalConfig:
        """This config, checked (one clear error for a value out of range)."""
        if self.samples < 1 or self.batch_size < 1 or self.max_groups < 0:
            raise ValueError("--samples and --batch-size must be >= 1, --max-groups >= 0")
        return self


def _load(model_dir: str, store, device, cross_tokenizer: bool = False):
    """Tokenizer, then the vocabulary check (the store's ids must mean the same tokens to the
    student, as `train` checks), then the weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def fail(e: Exception) -> ValueError:
        return ValueError(f"cannot load model {model_dir!r} for eval: {e.__class__.__name__}: {e}")

    try:
        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise fail(e) from e
    vocab = len(tok) if cross_tokenizer else store.meta.scored_vocab
    if vocab is not None and vocab != len(tok):
        raise ValueError(
            f"teacher vocab {vocab} != student vocab {len(tok)} ({model_dir}): the store's ids "
            f"would mean other tokens to this student; pass --cross-tokenizer to align the two "
            f"tokenizers, or evaluate a student that shares the teachers' tokenizer")
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError, pickle.UnpicklingError, EOFError) as e:  # *.bin: weights_only
        raise fail(e) from e
    rows = model.get_output_embeddings().weight.shape[0]
    if vocab is not None and vocab > rows:
        raise ValueError(f"teacher vocab {vocab} > student output rows {rows} ({model_dir}): the "
                         f"student cannot score every stored id; evaluate another student")
    return model.to(device).eval(), tok


def _score(model, records, pad_id, chunk_size, device, vocab: int | None = None):
    import torch

    from .batch import collate
    from .student import student_forward

    batch = collate(records, pad_id=pad_id)
    batch.vocab = vocab
    batch = batch.to(device)
    with torch.no_grad():
        return student_forward(model, batch, chunk_size), batch


def _sample(model, tok, prompts: list[list[int]], cfg: EvalConfig, device) -> tuple[list[list[int]], int]:
    """cfg.samples sampled continuations per prompt (left-padded batched generate), and how
    many of them ended with EOS within max_new_tokens."""
    import torch

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
        with torch.no_grad():
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
    import torch

    from kdcache.store import open_store

    from . import losses
    from .rewards import resolve_reward

    cfg = cfg.validated()  # the entry point: checked here, once
    fn = resolve_reward(cfg.reward) if cfg.reward else None  # a bad spec fails before any load
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    store = open_store(cfg.store)
    model, tok = _load(cfg.model, store, device, cfg.cross_tokenizer)
    pad_id = tok.pad_token_id or 0
    xtok = None
    if cfg.cross_tokenizer:  # every record in the student's tokens (train/xtok)
        from types import SimpleNamespace

        from .xtok.setup import prepare, xtok_cache_dir

        xtok = prepare(SimpleNamespace(cross_tokenizer="map", objective="kd"), store, tok,
                       xtok_cache_dir(), cfg.store)
    pairs, prompts, n_groups = [], [], 0
    for group in store.groups():
        if cfg.max_groups and n_groups >= cfg.max_groups:
            break
        n_groups += 1
        chosen = next((r for r in group if r["role"] == "chosen"), None)
        rejected = next((r for r in group if r["role"] == "rejected"), None)
        if xtok is not None:
            chosen, rejected = (None if r is None else xtok(r) for r in (chosen, rejected))
        if chosen is not None and rejected is not None:
            pairs.append((chosen, rejected))
        prompts.append(group[0] if xtok is None else xtok(group[0]))
    result: dict = {"groups": n_groups}
    has_topk = "topk_logprobs" in store.fields and "topk_ids" in store.fields

    wins, kl_sum, kl_tokens = 0, 0.0, 0
    # the student normalises over the ids the teachers scored (its own, across tokenizers)
    vocab = len(tok) if xtok is not None else store.meta.scored_vocab
    for i in range(0, len(pairs), cfg.batch_size):
        chunk = pairs[i : i + cfg.batch_size]
        records = [c for c, _ in chunk] + [r for _, r in chunk]
        out, batch = _score(model, records, pad_id, cfg.chunk_size, device, vocab)
        avg = (out.token_logprobs * batch.mask).sum(-1) / batch.mask.sum(-1).clamp(min=1)
        n = len(chunk)
        wins += int((avg[:n] > avg[n:]).sum())
        if has_topk:
            mask = batch.mask
            s_topk = out.topk_logprobs
            if xtok is not None:  # aligned positions with a mapped id, on the mapped ids
                from .xtok.translate import student_topk

                s_topk = student_topk(s_topk, batch.stored)
                mask = mask & batch.stored["xtok_slots"].bool().any(-1)
            kl = losses.kd_per_token(s_topk, batch.stored["topk_logprobs"])
            kl_sum += float((kl * mask).sum())
            kl_tokens += int(mask.sum())
    if pairs:
        result["reward_accuracy"] = wins / len(pairs)
        result["pairs"] = len(pairs)
    if kl_tokens:
        result["kl_topk"] = kl_sum / kl_tokens
    if xtok is not None:
        result.update(xtok.stats.summary())

    if fn is not None:
        prompt_ids = [list(map(int, r["prompt_ids"])) for r in prompts]
        responses, ended = _sample(model, tok, prompt_ids, cfg, device)
        scores = []
        for j, resp in enumerate(responses):
            rec = prompts[j // cfg.samples]
            prompt_text = tok.decode(rec["prompt_ids"], skip_special_tokens=True)
            scores.append(float(fn(prompt_text, tok.decode(resp, skip_special_tokens=True), None)))
        result["reward_mean"] = sum(scores) / max(1, len(scores))
        result["reward"] = cfg.reward  # names the column in `kdcache plot --table`
        # a student that stops stopping (e.g. ADPA drifting onto tail tokens) shows here first
        result["eos_rate"] = ended / max(1, len(scores))
        result["eos_token"] = tok.convert_ids_to_tokens(tok.eos_token_id)
        result["samples"] = len(scores)
    return result


def results_dir(cfg: EvalConfig) -> Path:
    """Where `kdcache eval` saves its results: --out, else the training run the model came
    from (runs/x for runs/x/model), else the model directory itself."""
    if cfg.report_to is not None:  # a tracker that is not installed: one line, before the work
        from .report import check_available, parse_report_to

        check_available(parse_report_to(cfg.report_to))
    if cfg.out:
        return Path(cfg.out)
    model = Path(cfg.model)
    run = model.parent
    if model.name == "model" and any((run / f).exists() for f in ("metrics.jsonl", "config.yaml")):
        return run
    if model.is_dir():
        return model
    raise ValueError(f"--model {cfg.model!r} is not a local directory: pass --out DIR for eval.json")


def save_results(cfg: EvalConfig, result: dict) -> Path:
    """Write eval.json (the result, with the model, store and settings) and eval.csv (one
    header row, one value row) into `results_dir(cfg)`; each file appears whole or not at all."""
    out = results_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    record = {"model": cfg.model, "store": cfg.store, **result,
              "config": {k: v for k, v in asdict(cfg).items() if k not in ("model", "store")},
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    flat = {k: v for k, v in record.items() if k != "config"}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(flat), lineterminator="\n")
    writer.writeheader()
    writer.writerow(flat)
    for name, text in (("eval.json", json.dumps(record, indent=2) + "\n"), ("eval.csv", buf.getvalue())):
        tmp = out / f".{name}.tmp-{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    from .report import parse_report_to, report_eval

    names = None if cfg.report_to is None else parse_report_to(cfg.report_to)
    report_eval(names, out, result, record["config"])
    return out / "eval.json"
