"""Reading preference / SFT datasets and tokenizing them into groups of sequences, streamed.

Sources (`sources.open_data`): JSONL (.jsonl/.json/.ndjson, optionally .gz/.bz2/.xz/.zst) or Parquet
files, on any fsspec URL (globs allowed), read here line by line; everything else
`datasets.load_dataset` accepts (a hub id, a dataset folder, a `save_to_disk` folder, csv)
through hfdata.py, streamed. Columns follow TRL: preference = prompt, chosen, rejected; SFT =
prompt, completion (other names: `--columns prompt=question,...`). Each field is a plain
string or a chat-message list. Optional columns: `id` (else the row number), `context`
(privileged context shown only to the PBSD teacher).

Everything here streams: `iter_rows` yields one row at a time (JSONL line by line, Parquet
by record batch), `tokenize_rows` one group at a time, so memory does not grow with the
dataset. Every error names the file and the line (or Parquet row) it comes from.

Tokenization (the one place prompts and responses are turned into ids):
- message-list prompt: the tokenizer's chat template with add_generation_prompt=True;
- string prompt: the same, wrapped as one user message, when the tokenizer has a template and
  `chat_template` is on; otherwise the plain text with the tokenizer's special tokens (BOS);
- string response: its tokens + EOS (unless it already ends with EOS);
- message-list response: the template over prompt + response, minus the prompt prefix,
  cut right after the last EOS (templates often add a newline after the end-of-turn token).
"""

from __future__ import annotations

import hashlib
import io
import json
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import numpy as np

from .checks import COLUMN_ROLES, parse_columns  # noqa: F401 - re-exported

ROLES = ("chosen", "rejected", "sft", "student_rollout", "teacher_rollout")
_JSONL = (".jsonl", ".json", ".ndjson")


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
    """One (prompt, response) to score; several of one example form a group. Token ids are
    int32 arrays (a Python list of ints costs ~9x the memory) or lists."""

    example_id: str
    role: str
    group: int
    prompt_ids: Any
    response_ids: Any
    teacher_prompt_ids: Any = None
    extra: dict[str, Any] = field(default_factory=dict)  # reward, behavior_logprob (carried)

    @property
    def scored_prompt(self) -> Any:
        """The prompt the teachers see (with the privileged context when there is one)."""
        return self.teacher_prompt_ids if self.teacher_prompt_ids is not None else self.prompt_ids

    @property
    def length(self) -> int:
        return len(self.scored_prompt) + len(self.response_ids)


@dataclass
class DataStats:
    rows: int = 0
    sequences: int = 0
    tokens: int = 0  # response tokens kept (what the teachers score)
    truncated: int = 0
    skipped: int = 0
    skipped_long_prompt: int = 0  # of `skipped`: the prompt alone filled max_length


@dataclass
class RowSource:
    """One row and where it came from (for error messages)."""

    index: int  # 0-based over the whole dataset (all files, in order)
    where: str  # "path line 12" / "path row 7"
    row: dict[str, Any]


# ------------------------------------------------------------------------------- files

class FileSource:
    """JSONL / Parquet files (path, fsspec URL or glob), read by the hand-written reader."""

    def __init__(self, url: str) -> None:
        self.url, self.name = url, url
        self.file_list = data_files(url)

    def sha256(self) -> str:
        return files_sha256(self.file_list)

    def rows(self, limit: int | None = None) -> Iterator[RowSource]:
        return iter_rows(self.file_list, limit)


def data_files(url: str) -> list[str]:
    """The files a dataset URL (path, fsspec URL or glob) names, sorted."""
    try:
        fs, _, paths = fsspec.get_fs_token_paths(url)
    except (OSError, ValueError, ImportError) as e:
        raise DataError(f"cannot open the data URL {url!r} ({e})") from None
    if not paths:
        raise DataError(f"no data file matches {url!r}; check the path or glob")
    proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    files = [p if proto in ("file", "local") else f"{proto}://{p}" for p in sorted(paths)]
    if len(paths) == 1 and fs.isdir(paths[0]):
        raise DataError(f"{url!r} is a directory; pass a data file or a glob such as "
                        f"'{url.rstrip('/')}/*.jsonl'")
    for p in files:
        _format(p)  # refuse an unknown extension before reading anything
    return files


def _format(path: str) -> tuple[str, str | None]:
    """("jsonl" | "parquet", compression or None) from the file name."""
    compression = fsspec.utils.infer_compression(path)
    name = path.lower()
    if compression:
        name = name.rsplit(".", 1)[0]
    if name.endswith(".parquet"):
        return "parquet", compression
    if name.endswith(_JSONL):
        return "jsonl", compression
    raise DataError(f"{path!r}: unknown format; use .jsonl / .json (JSON lines), .parquet or "
                    ".csv, optionally compressed (.gz), or a dataset folder")


def files_sha256(files: list[str]) -> str:
    """sha256 over each file's name and bytes, read in blocks (no file is held in memory)."""
    h = hashlib.sha256()
    for path in files:
        h.update(path.rsplit("/", 1)[-1].encode() + b"\0")
        try:
            with fsspec.open(path, "rb") as f:
                for block in iter(lambda f=f: f.read(1 << 20), b""):
                    h.update(block)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {path!r}: {e}") from None
    return h.hexdigest()


def iter_rows(files: list[str], limit: int | None = None) -> Iterator[RowSource]:
    """The rows of the files in order, one at a time; `limit` stops after that many."""
    index = 0
    for path in files:
        kind, compression = _format(path)
        reader = _jsonl_rows if kind == "jsonl" else _parquet_rows
        try:
            for where, row in reader(path, compression):
                if limit is not None and index >= limit:
                    return
                yield RowSource(index, where, row)
                index += 1
        except DataError:
            raise
        except (OSError, EOFError, zlib.error) as e:  # unreadable or corrupt (e.g. bad gzip)
            raise DataError(f"cannot read {path!r} ({type(e).__name__}: {e}); check the file "
                            "is complete and in the format its name says") from None
    if index == 0:
        raise DataError(f"the dataset {', '.join(files)} has no rows")


def _jsonl_rows(path: str, compression: str | None) -> Iterator[tuple[str, dict[str, Any]]]:
    with fsspec.open(path, "rb", compression=compression) as f:
        for ln, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path} line {ln} is not UTF-8 text (byte {e.start} of the line, {e.reason}); "
                    "is it a JSON-lines file? kdcache reads UTF-8 JSONL (one object per line) "
                    "or Parquet") from None
            if ln == 1:
                line = line.lstrip("\ufeff")  # a byte-order mark some editors write
            if not line.strip():
                continue
            array = ln == 1 and line.lstrip().startswith("[")
            hint = (" (the file looks like one JSON array; kdcache reads JSON lines: one object "
                    "per line, e.g. `jq -c '.[]' in.json > out.jsonl`)" if array else "")
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {ln} is not valid JSON ({e.msg}){hint}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {ln}: a row must be a JSON object of columns "
                                f"(prompt, chosen, ...), got {type(row).__name__}{hint}")
            yield f"{path} line {ln}", row


def _parquet_rows(path: str, compression: str | None) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with fsspec.open(path, "rb", compression=compression) as f:
        src = io.BytesIO(f.read()) if compression else f  # a compressed stream cannot seek
        try:
            pf = pq.ParquetFile(src)
            batches = pf.iter_batches(batch_size=1024)
            j = 0
            for batch in batches:
                for row in batch.to_pylist():
                    yield f"{path} row {j}", row
                    j += 1
        except (pa.ArrowException, ValueError) as e:
            raise DataError(f"cannot read {path!r} as Parquet ({e}); check the file is complete "
                            "and really Parquet") from None


def dataset_fingerprint(file_sha: str, opts: DataOptions, tokenizer_fp: str) -> str:
    payload = {"files": file_sha, "options": asdict(opts), "tokenizer": tokenizer_fp}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class IdSet:
    """Example ids seen so far, at ~8 bytes per id: 64-bit hashes, recent ones in a Python
    set, older ones merged into one sorted numpy array. A hash collision (odds ~n^2 / 2^65:
    1e-8 for a million rows) would be reported as a duplicate id."""

    _MERGE_AT = 1 << 16

    def __init__(self) -> None:
        self._recent: set[int] = set()
        self._sorted = np.empty(0, np.uint64)

    @staticmethod
    def _h(key: str) -> int:
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")

    def add(self, key: str) -> bool:
        """Add `key`; False if it was already there."""
        h = self._h(key)
        if h in self._recent:
            return False
        i = int(np.searchsorted(self._sorted, np.uint64(h)))
        if i < len(self._sorted) and int(self._sorted[i]) == h:
            return False
        self._recent.add(h)
        if len(self._recent) >= self._MERGE_AT:
            merged = np.fromiter(self._recent, np.uint64, len(self._recent))
            self._sorted = np.union1d(self._sorted, merged)
            self._recent.clear()
        return True


# ------------------------------------------------------------------------------- tokenizing

def _is_messages(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(m, dict) and "role" in m for m in v)


def _check_field(v: Any, where: str, col: str) -> None:
    if v is None or (isinstance(v, str) and not v.strip()) or (isinstance(v, list) and not v):
        raise DataError(f"{where}: column {col!r} is empty; every row needs a non-empty {col}: "
                        "fix or drop that row")
    if not isinstance(v, str) and not _is_messages(v):
        raise DataError(
            f"{where}: column {col!r} must be a string or a list of {{role, content}} messages, "
            f"got {type(v).__name__}"
        )


def _turn(m: dict) -> tuple[str, str]:
    return str(m.get("role")), str(m.get("content") or "").strip()


def _check_response_messages(prompt: list[dict], r: list[dict], where: str, col: str) -> None:
    """A message-list response holds only the assistant's turns (TRL's conversational
    format): refuse one that repeats the prompt's turns, and an empty assistant turn."""
    n = len(prompt)
    if len(r) > n and [_turn(m) for m in r[:n]] == [_turn(m) for m in prompt]:
        raise DataError(
            f"{where}: column {col!r} repeats the prompt's {n} message(s) before the answer; "
            f"a response holds only the assistant turns: drop the prompt turns from {col!r} "
            f"(keep {col}[{n}:])")
    if r and r[0].get("role") != "assistant" and any(m.get("role") == "assistant" for m in r):
        first = next(i for i, m in enumerate(r) if m.get("role") == "assistant")
        raise DataError(
            f"{where}: column {col!r} starts with {first} {r[0].get('role')!r} message(s) before "
            f"the assistant's turn; a response holds only the assistant turns: drop the prompt "
            f"turns from {col!r} and keep them in the prompt")
    for i, m in enumerate(r):
        if m.get("role") == "assistant" and not _turn(m)[1]:
            raise DataError(f"{where}: column {col!r} message {i} (assistant) has empty content; "
                            f"every row needs a non-empty {col}: fix or drop that row")


class Tokenizing:
    """Turns prompt/response fields into ids with one tokenizer and DataOptions."""

    def __init__(self, tokenizer: Any, opts: DataOptions):
        self.tok = tokenizer
        self.opts = opts
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise DataError("the tokenizer has no eos_token; responses must end with EOS")
        self.use_template = bool(getattr(tokenizer, "chat_template", None))

    def _render(self, messages: list[dict], generation_prompt: bool, where: str) -> str:
        try:
            return self.tok.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # noqa: BLE001 - a jinja error from the template, one line
            raise DataError(f"{where}: the tokenizer's chat template failed on this row "
                            f"({type(e).__name__}: {e}); fix the messages (roles, content) or "
                            "pass string prompts / --no-chat-template") from None

    def _template(self, messages: list[dict], generation_prompt: bool, where: str) -> list[int]:
        return self.encode([self._render(messages, generation_prompt, where)], False)[0]

    def encode(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        """Many texts in one call: the Rust tokenizer batches them (and uses every core)."""
        if not texts:
            return []
        return [list(x) for x in self.tok(texts, add_special_tokens=add_special_tokens)["input_ids"]]

    def prompt_text(self, p: Any, context: str | None = None, where: str = "row"
                    ) -> tuple[str, bool]:
        """The text a prompt is tokenized from, and whether special tokens (BOS) are added."""
        if _is_messages(p):
            msgs = [dict(m) for m in p]
            if context is not None:  # context goes in front of the last user turn
                last = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=0)
                msgs[last]["content"] = self.opts.context_template.format(
                    context=context, prompt=msgs[last]["content"])
            if not self.use_template:
                raise DataError(f"{where}: chat-message prompts need a tokenizer with a chat "
                                "template; pass string prompts or a tokenizer that has one")
            return self._render(msgs, True, where), False
        text = p if context is None else self.opts.context_template.format(context=context, prompt=p)
        if self.use_template and self.opts.chat_template:
            return self._render([{"role": "user", "content": text}], True, where), False
        return text, True

    def prompt(self, p: Any, context: str | None = None, where: str = "row") -> list[int]:
        text, special = self.prompt_text(p, context, where)
        return self.encode([text], special)[0]

    def finish_response(self, ids: list[int], where: str, col: str) -> list[int]:
        """A string response's tokens + EOS (unless it already ends with one). The text is
        not empty (checked), so no tokens at all means the tokenizer cannot read it."""
        if not ids:
            raise DataError(f"{where}: column {col!r} tokenizes to nothing; is the tokenizer "
                            "the one the models were trained with?")
        if self.opts.add_eos and ids[-1] != self.eos:
            ids = [*ids, self.eos]
        return ids

    def response(self, prompt: Any, r: Any, where: str, col: str) -> list[int]:
        if not _is_messages(r):
            return self.finish_response(self.encode([r], False)[0], where, col)
        pm = prompt if _is_messages(prompt) else [{"role": "user", "content": prompt}]
        _check_response_messages(pm, r, where, col)
        full = self._template(list(pm) + list(r), False, where)
        base = self._template(list(pm), True, where)
        if full[: len(base)] != base:
            raise DataError(
                f"{where}: column {col!r}: the chat template does not render the prompt as a "
                "prefix of prompt+response; pass string responses instead")
        ids = full[len(base):]
        if self.eos in ids:  # drop template text after the end-of-turn token
            ids = ids[: len(ids) - ids[::-1].index(self.eos)]
        if not ids:
            raise DataError(f"{where}: column {col!r} tokenizes to nothing")
        return ids


def _prompt_fits(p_ids: list[int], tp_ids: list[int] | None, opts: DataOptions, stats: DataStats,
                 where: str) -> bool:
    """The prompt (as the longer of the student's and the teacher's view) leaves room for at
    least one response token; False = drop the row."""
    p = max(len(p_ids), len(tp_ids or ()))
    if opts.max_length is None or p < opts.max_length:
        return True
    if opts.truncate == "fail":
        view = " (with the context the teacher sees)" if tp_ids is not None else ""
        raise DataError(
            f"{where}: the prompt alone is {p} tokens{view} >= max_length {opts.max_length}, "
            "leaving no room for a response; raise --max-length, shorten the prompt, or "
            "--truncate skip to drop such rows")
    stats.skipped_long_prompt += 1
    return False


def _fit(seq: Sequence, opts: DataOptions, stats: DataStats, where: str, col: str) -> bool:
    """Apply max_length to one sequence (its prompt fits); False = drop the row."""
    if opts.max_length is None or seq.length <= opts.max_length:
        return True
    if opts.truncate == "fail":
        raise DataError(
            f"{where}: column {col!r}: prompt + response are {seq.length} tokens > max_length "
            f"{opts.max_length}; raise --max-length, or set --truncate to 'truncate' or 'skip'")
    if opts.truncate == "skip":
        return False
    p = max(len(seq.prompt_ids), len(seq.scored_prompt))
    seq.response_ids = seq.response_ids[: opts.max_length - p]  # no EOS left: not terminal
    stats.truncated += 1
    return True


def _kind(cols: set[str], opts: DataOptions, where: str) -> str:
    if opts.kind != "auto":
        return opts.kind
    if {opts.chosen_column, opts.rejected_column} <= cols:
        return "preference"
    if opts.completion_column in cols:
        return "sft"
    raise DataError(
        f"{where}: cannot tell the dataset kind from columns {sorted(cols)}: preference data "
        f"needs {opts.prompt_column!r}, {opts.chosen_column!r}, {opts.rejected_column!r}; SFT "
        f"data needs {opts.prompt_column!r}, {opts.completion_column!r}")


def example_id(src: RowSource, opts: DataOptions, seen: IdSet | None) -> str:
    """The row's id (its `id` column, else its index), refused if already seen."""
    row = src.row
    ex_id = str(row[opts.id_column]) if row.get(opts.id_column) is not None else str(src.index)
    if seen is not None and not seen.add(ex_id):
        raise DataError(f"{src.where}: duplicate {opts.id_column!r} {ex_id!r}; ids must be "
                        "unique: fix or drop the repeated row")
    return ex_id


def row_prompts(src: RowSource, opts: DataOptions, tk: Tokenizing,
                use_context: bool) -> tuple[list[int], list[int] | None]:  # (one row: rollout)
    """Prompt ids as the student sees them, and as the teacher sees them when the row has
    a privileged `context` (None otherwise)."""
    prompt = src.row[opts.prompt_column]
    context = src.row.get(opts.context_column) if use_context else None
    ids = tk.prompt(prompt, where=src.where)
    if context in (None, ""):
        return ids, None
    return ids, tk.prompt(prompt, str(context), where=src.where)


def prompt_source(prompt: Any) -> str:
    """A prompt field as the store's `prompt_source` (METHODS §5): the dataset's value (a
    string or a message list, before any template) as JSON. One form for every writer
    (dataset rows here, rollouts in rollout.py), so a student re-tokenizes both alike."""
    return json.dumps(prompt, ensure_ascii=False)


def response_text(tok: Any, ids: Iterable[int], text: str) -> str | None:
    """`text` where decoding `ids` (no final EOS) does not give it back, else None: the
    store's `response_text` rule (METHODS §5)."""
    return None if tok.decode(list(ids), skip_special_tokens=False) == text else text


def _ids(v: list[int]) -> np.ndarray:
    return np.asarray(v, dtype=np.int32)


class _Texts:
    """Texts of a chunk of rows, tokenized together (two batched calls: with and without
    special tokens); `add` returns a slot whose ids `ids(slot)` gives after `run()`."""

    def __init__(self, tk: Tokenizing) -> None:
        self.tk = tk
        self.texts: dict[bool, list[str]] = {True: [], False: []}
        self.out: dict[bool, list[list[int]]] = {}

    def add(self, text: str, special: bool) -> tuple[bool, int]:
        self.texts[special].append(text)
        return special, len(self.texts[special]) - 1

    def run(self) -> None:
        self.out = {k: self.tk.encode(v, k) for k, v in self.texts.items()}

    def ids(self, slot: tuple[bool, int]) -> list[int]:
        return self.out[slot[0]][slot[1]]


def _chunks(rows: Iterable[RowSource], n: int) -> Iterator[list[RowSource]]:
    chunk: list[RowSource] = []
    for r in rows:
        chunk.append(r)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def tokenize_rows(
    rows: Iterable[RowSource], tokenizer: Any, opts: DataOptions, stats: DataStats | None = None,
    check_ids: bool = True, chunk_rows: int = 256,
) -> Iterator[list[Sequence]]:
    """Yield one group (list of Sequence) per kept row, in row order, streamed. Rows are
    tokenized `chunk_rows` at a time (one batched tokenizer call per chunk). `check_ids=False`
    skips the duplicate-id check (the data was checked by an earlier pass)."""
    stats = stats if stats is not None else DataStats()
    if opts.kind not in ("preference", "sft", "auto"):
        raise DataError(f"kind must be 'preference', 'sft' or 'auto', got {opts.kind!r}")
    tk = Tokenizing(tokenizer, opts)
    seen = IdSet() if check_ids else None
    kind = None
    resp_cols: list[tuple[str, str]] = []
    for chunk in _chunks(rows, chunk_rows):
        texts = _Texts(tk)
        todo = []
        for src in chunk:  # checks, ids and the texts to tokenize, in row order
            row, where = src.row, src.where
            if kind is None:  # decided by the first row's columns
                kind = _kind(set(row), opts, where)
                resp_cols = ([(opts.chosen_column, "chosen"), (opts.rejected_column, "rejected")]
                             if kind == "preference" else [(opts.completion_column, "sft")])
            for col in [opts.prompt_column] + [c for c, _ in resp_cols]:
                if col not in row:
                    need = ", ".join([opts.prompt_column] + [c for c, _ in resp_cols])
                    raise DataError(f"{where}: missing column {col!r} (has {sorted(row)}); {kind} "
                                    f"data needs {need} in every row: add it or drop the row")
                _check_field(row[col], where, col)
            ex_id = example_id(src, opts, seen)
            prompt = row[opts.prompt_column]
            context = row.get(opts.context_column) if opts.use_context else None
            p_slot = texts.add(*tk.prompt_text(prompt, None, where))
            tp_slot = (None if context in (None, "") else
                       texts.add(*tk.prompt_text(prompt, str(context), where)))
            resps = [(col, role, texts.add(row[col], False) if isinstance(row[col], str)
                      else tk.response(prompt, row[col], where, col)) for col, role in resp_cols]
            todo.append((src, ex_id, p_slot, tp_slot, resps))
        texts.run()
        for src, ex_id, p_slot, tp_slot, resps in todo:  # lengths, in row order
            prompt_ids = texts.ids(p_slot)
            teacher_prompt = None if tp_slot is None else texts.ids(tp_slot)
            stats.rows += 1
            if not _prompt_fits(prompt_ids, teacher_prompt, opts, stats, src.where):
                stats.skipped += 1
                continue
            group: list[Sequence] = []
            keep = True
            source = prompt_source(src.row[opts.prompt_column])
            for col, role, r in resps:
                resp = (tk.finish_response(texts.ids(r), src.where, col) if isinstance(r, tuple)
                        else r)
                seq = Sequence(ex_id, role, 0, prompt_ids, resp, teacher_prompt,
                               {"prompt_source": source})
                n = len(seq.response_ids)
                keep = keep and _fit(seq, opts, stats, src.where, col)
                # the text only where decoding the ids does not give it back (and the ids
                # were not cut: then the decoded prefix is what the teacher scored)
                if isinstance(r, tuple) and len(seq.response_ids) == n:
                    text = response_text(tk.tok, texts.ids(r), src.row[col])
                    if text is not None:
                        seq.extra["response_text"] = text
                group.append(seq)
            if not keep:
                stats.skipped += 1
                continue
            p = _ids(prompt_ids)
            tp = None if teacher_prompt is None else _ids(teacher_prompt)
            for s in group:
                s.prompt_ids, s.teacher_prompt_ids, s.response_ids = p, tp, _ids(s.response_ids)
            stats.sequences += len(group)
            stats.tokens += sum(len(s.response_ids) for s in group)
            yield group
