"""Thin vLLM adapter for `run_rollout(backend="vllm")`. GPU only; vllm is imported lazily.

Behavior log-probs: vLLM returns, per generated token, the log-prob of the sampled token when
`SamplingParams(logprobs=0)`. Which distribution it refers to depends on the engine's
`logprobs_mode`: we ask for "processed_logprobs" (after temperature / top-k / top-p), the same
definition as the HF path (see rollout.py). vLLM versions without `logprobs_mode` report the
raw (temperature-1, untruncated) distribution; we refuse them unless temperature=1, top_p=1
and top_k=0, where the two coincide.
"""

from __future__ import annotations

from typing import Any


class VLLMSampler:
    def __init__(self, model: str, dtype: str = "auto", trust_remote_code: bool = False,
                 seed: int = 0, **engine_kwargs: Any) -> None:
        try:
            import vllm
        except ImportError as e:
            raise RuntimeError(
                f"backend='vllm' needs vllm ({e}); install kdcache[vllm] on a CUDA machine, or use "
                "backend='hf'") from None
        self._vllm = vllm
        kw = dict(model=model, dtype="bfloat16" if dtype == "auto" else dtype,
                  trust_remote_code=trust_remote_code, seed=seed, **engine_kwargs)
        try:
            self.llm = vllm.LLM(logprobs_mode="processed_logprobs", **kw)
            self.processed = True
        except TypeError:  # older vllm: no logprobs_mode
            self.llm = vllm.LLM(**kw)
            self.processed = False

    def sample(self, prompts: list[list[int]], eos_id: int, temperature: float, top_p: float,
               top_k: int, max_new_tokens: int, seed: int) -> list[tuple[list[int], list[float]]]:
        if not self.processed and (temperature != 1.0 or top_p < 1.0 or top_k):
            raise RuntimeError(
                "this vllm reports raw log-probs only; use temperature=1, top_p=1, top_k=0, "
                "upgrade vllm (logprobs_mode), or use backend='hf'")
        sp = self._vllm.SamplingParams(
            n=1, temperature=temperature, top_p=top_p, top_k=top_k if top_k else -1,
            max_tokens=max_new_tokens, logprobs=0, seed=seed, stop_token_ids=[eos_id])
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        result = []
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            lps = [float(step[t].logprob) for t, step in zip(ids, c.logprobs, strict=True)]
            result.append((ids, lps))
        return result
