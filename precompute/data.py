"""Reading preference / SFT datasets and tokenizing them into groups of sequences.

Formats: JSONL (.jsonl/.json, optionally compressed) or Parquet, on any fsspec URL (globs
allowed). Columns follow TRL: preference = prompt, chosen, rejected; SFT = prompt,
completion. Each field is a plain string or a chat-message list. Optional columns: `id`
(else the row number), `context` (privileged context shown only to the PBSD teacher).

Tokenization (the one place prompts and responses are turned into ids):
- message-list prompt: the tokenizer's chat template with add_generation_prompt=True;
- string prompt: the same, wrapped as one user message, when the tokenizer has a template and
  `chat_template` is on; otherwise the plain text with the tokenizer's special tokens (BOS);
- string response: its tokens + EOS (unless it already ends with EOS);
- message-list response: the template over prompt + response, minus the prompt prefix,
  cut right after the last EOS (templates often add a newline after the end-of-turn token).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec

ROLES = ("chosen", "rejected", "sft", "student_rollout", "teacher_rollout")


class DataError(ValueError):
    """Bad input data; the message names the file/row/column and the fix."""


@dataclass
class DataOptions:
    """How rows become token ids. Every field is part of the dataset fingerprint."""

    kind: str = "auto"  # "preference" | "sft" | "auto" (decided from the columns)
    max_length: int | None = None  # prompt + response tokens (teacher prompt when longer)
    truncate: str = "truncate"  # "truncate" (cut responses) | "skip" (drop rows) | "fail"
    chat_template: bool = True  # use the tokenizer's chat template for string prompts
    add_eos: bool = True
    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    completion_column: str = "completion"
    id_column: str = "id"
    context_column: str = "context"
    use_context: bool = True  # build teacher_prompt_ids when a context column is present
    # how a string context is put in front of the prompt the teacher sees
    context_template: str = "{context}\n\n{prompt}"
    limit: int | None = None  # first N rows only


@dataclass
class Sequence:
    """One (prompt, response) to score; several of one example form a group."""

    example_id: str
    role: str
    group: int
    prompt_ids: list[int]
    response_ids: list[int]
    teacher_prompt_ids: list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # reward, behavior_logprob (carried)

    @property
    def scored_prompt(self) -> list[int]:
        """The prompt the teachers see (with the privileged context when there is one)."""
        return self.teacher_prompt_ids if self.teacher_prompt_ids is not None else self.prompt_ids

    @property
    def length(self) -> int:
        return len(self.scored_prompt) + len(self.response_ids)


@dataclass
class DataStats:
    rows: int = 0
    sequences: int = 0
    truncated: int = 0
    skipped: int = 0


# ------------------------------------------------------------------------------- reading

def _expand(url: str) -> list[str]:
    fs, _, paths = fsspec.get_fs_token_paths(url)
    if not paths:
        raise DataError(f"no data file matches {url!r}; check the path or glob")
    proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return [p if proto in ("file", "local") else f"{proto}://{p}" for p in sorted(paths)]


def read_rows(url: str) -> tuple[list[dict[str, Any]], str]:
    """All rows of a JSONL/Parquet dataset (file or glob) and a sha256 of its bytes."""
    rows: list[dict[str, Any]] = []
    h = hashlib.sha256()
    for path in _expand(url):
        try:
            with fsspec.open(path, "rb") as f:
                raw = f.read()
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {path!r}: {e}") from None
        h.update(path.rsplit("/", 1)[-1].encode() + b"\0" + raw)
        name = path.lower()
        if name.endswith(".gz"):
            raw, name = gzip.decompress(raw), name[:-3]
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            rows.extend(pq.read_table(io.BytesIO(raw)).to_pylist())
        elif name.endswith((".jsonl", ".json", ".ndjson")):
            for ln, line in enumerate(raw.decode("utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {ln} is not valid JSON ({e.msg})") from None
        else:
            raise DataError(f"{path!r}: unknown format; use .jsonl, .json (JSON lines) or .parquet")
    return rows, h.hexdigest()


def dataset_fingerprint(file_sha: str, opts: DataOptions, tokenizer_fp: str) -> str:
    payload = {"files": file_sha, "options": asdict(opts), "tokenizer": tokenizer_fp}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------- tokenizing

def _is_messages(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(m, dict) and "role" in m for m in v)


def _check_field(v: Any, row: int, col: str) -> None:
    if v is None or (isinstance(v, str) and not v.strip()) or (isinstance(v, list) and not v):
        raise DataError(f"row {row}: column {col!r} is empty; every row needs a non-empty {col}: "
                        "fix or drop that row")
    if not isinstance(v, str) and not _is_messages(v):
        raise DataError(
            f"row {row}: column {col!r} must be a string or a list of {{role, content}} messages, "
            f"got {type(v).__name__}"
        )


class Tokenizing:
    """Turns prompt/response fields into ids with one tokenizer and DataOptions."""

    def __init__(self, tokenizer: Any, opts: DataOptions):
        self.tok = tokenizer
        self.opts = opts
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise DataError("the tokenizer has no eos_token; responses must end with EOS")
        self.use_template = bool(getattr(tokenizer, "chat_template", None))

    def _template(self, messages: list[dict], generation_prompt: bool) -> list[int]:
        text = self.tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt)
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def prompt(self, p: Any, context: str | None = None) -> list[int]:
        if _is_messages(p):
            msgs = [dict(m) for m in p]
            if context is not None:  # context goes in front of the last user turn
                last = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=0)
                msgs[last]["content"] = self.opts.context_template.format(
                    context=context, prompt=msgs[last]["content"])
            if not self.use_template:
                raise DataError("chat-message prompts need a tokenizer with a chat template")
            return self._template(msgs, True)
        text = p if context is None else self.opts.context_template.format(context=context, prompt=p)
        if self.use_template and self.opts.chat_template:
            return self._template([{"role": "user", "content": text}], True)
        return list(self.tok(text, add_special_tokens=True)["input_ids"])

    def response(self, prompt: Any, r: Any, prompt_ids: list[int], row: int, col: str) -> list[int]:
        if _is_messages(r):
            pm = prompt if _is_messages(prompt) else [{"role": "user", "content": prompt}]
            full = self._template(list(pm) + list(r), False)
            base = self._template(list(pm), True)
            if full[: len(base)] != base:
                raise DataError(
                    f"row {row}: column {col!r}: the chat template does not render the prompt as a "
                    "prefix of prompt+response; pass string responses instead")
            ids = full[len(base):]
            if self.eos in ids:  # drop template text after the end-of-turn token
                ids = ids[: len(ids) - ids[::-1].index(self.eos)]
        else:
            ids = list(self.tok(r, add_special_tokens=False)["input_ids"])
            if self.opts.add_eos and (not ids or ids[-1] != self.eos):
                ids.append(self.eos)
        if not ids:
            raise DataError(f"row {row}: column {col!r} tokenizes to nothing")
        return ids


def _fit(seq: Sequence, opts: DataOptions, stats: DataStats, row: int, col: str) -> bool:
    """Apply max_length to one sequence; False = drop the row."""
    if opts.max_length is None or seq.length <= opts.max_length:
        return True
    p = max(len(seq.prompt_ids), len(seq.scored_prompt))
    if opts.truncate == "fail":
        raise DataError(
            f"row {row}: column {col!r}: {seq.length} tokens > max_length {opts.max_length}; raise "
            "max_length, or set truncate to 'truncate' or 'skip'")
    if opts.truncate == "skip" or p >= opts.max_length:
        return False
    seq.response_ids = seq.response_ids[: opts.max_length - p]  # no EOS left: not terminal
    stats.truncated += 1
    return True


def _kind(cols: set[str], opts: DataOptions) -> str:
    if opts.kind != "auto":
        return opts.kind
    if {opts.chosen_column, opts.rejected_column} <= cols:
        return "preference"
    if opts.completion_column in cols:
        return "sft"
    raise DataError(
        f"cannot tell the dataset kind from columns {sorted(cols)}: preference data needs "
        f"{opts.prompt_column!r}, {opts.chosen_column!r}, {opts.rejected_column!r}; SFT data needs "
        f"{opts.prompt_column!r}, {opts.completion_column!r}")


def example_id(row: dict[str, Any], i: int, opts: DataOptions, seen: set[str]) -> str:
    """The row's id (its `id` column, else its index), refused if already seen."""
    ex_id = str(row[opts.id_column]) if row.get(opts.id_column) is not None else str(i)
    if ex_id in seen:
        raise DataError(f"row {i}: duplicate {opts.id_column!r} {ex_id!r}; ids must be unique")
    seen.add(ex_id)
    return ex_id


def row_prompts(row: dict[str, Any], opts: DataOptions, tk: Tokenizing,
                use_context: bool) -> tuple[list[int], list[int] | None]:
    """Prompt ids as the student sees them, and as the teacher sees them when the row has
    a privileged `context` (None otherwise)."""
    prompt = row[opts.prompt_column]
    context = row.get(opts.context_column) if use_context else None
    return tk.prompt(prompt), (tk.prompt(prompt, str(context)) if context not in (None, "") else None)


def tokenize_rows(
    rows: list[dict[str, Any]], tokenizer: Any, opts: DataOptions, stats: DataStats | None = None,
) -> Iterator[list[Sequence]]:
    """Yield one group (list of Sequence) per row, in row order."""
    stats = stats if stats is not None else DataStats()
    if not rows:
        raise DataError("the dataset has no rows")
    kind = _kind(set(rows[0]), opts)
    if kind not in ("preference", "sft"):
        raise DataError(f"kind must be 'preference', 'sft' or 'auto', got {kind!r}")
    resp_cols = ([(opts.chosen_column, "chosen"), (opts.rejected_column, "rejected")]
                 if kind == "preference" else [(opts.completion_column, "sft")])
    tk = Tokenizing(tokenizer, opts)
    seen: set[str] = set()
    for i, row in enumerate(rows[: opts.limit] if opts.limit else rows):
        for col in [opts.prompt_column] + [c for c, _ in resp_cols]:
            if col not in row:
                need = ", ".join([opts.prompt_column] + [c for c, _ in resp_cols])
                raise DataError(f"row {i}: missing column {col!r} (has {sorted(row)}); {kind} data "
                                f"needs {need} in every row: add it or drop the row")
            _check_field(row[col], i, col)
        ex_id = example_id(row, i, opts, seen)
        prompt_ids, teacher_prompt = row_prompts(row, opts, tk, opts.use_context)
        group: list[Sequence] = []
        keep = True
        for col, role in resp_cols:
            resp = tk.response(row[opts.prompt_column], row[col], prompt_ids, i, col)
            seq = Sequence(ex_id, role, 0, prompt_ids, resp, teacher_prompt)
            keep = keep and _fit(seq, opts, stats, i, col)
            group.append(seq)
        stats.rows += 1
        if not keep:
            stats.skipped += 1
            continue
        stats.sequences += len(group)
        yield group
