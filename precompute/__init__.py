"""kdcache.precompute: score teachers once over datasets and rollouts, write stores.

Public API (see docs/PRECOMPUTE.md):
- `PrecomputeConfig`, `run_precompute(cfg) -> store URL`
- `RolloutConfig`, `run_rollout(cfg) -> store URL`
- `score_chunked(hidden, lm_head, targets, k, betas, chunk, ...)`, `LMHead`
- `check_same_tokenizer`, `model_fingerprint`, `tokenizer_fingerprint`
"""

from .launch import run_precompute
from .models import check_same_tokenizer, model_fingerprint, tokenizer_fingerprint
from .rollout import RolloutConfig, run_rollout
from .run import PrecomputeConfig
from .scoring import LMHead, score_chunked

__all__ = [
    "LMHead",
    "PrecomputeConfig",
    "RolloutConfig",
    "check_same_tokenizer",
    "model_fingerprint",
    "run_precompute",
    "run_rollout",
    "score_chunked",
    "tokenizer_fingerprint",
]
