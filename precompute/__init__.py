"""kdcache.precompute: score teachers once over datasets and rollouts, write stores.

Public API (see docs/PRECOMPUTE.md):
- `PrecomputeConfig`, `run_precompute(cfg) -> store URL`
- `RolloutConfig`, `run_rollout(cfg) -> store URL`
- `score_chunked(hidden, lm_head, targets, k, betas, chunk, ...)`, `LMHead`
- `check_input(data, config, split, columns)`: a data input checked before a run
- `check_same_tokenizer`, `model_fingerprint`, `tokenizer_fingerprint`
"""

import importlib

# Names resolve on first use (PEP 562): importing the package, or only its options
# (`kdcache.precompute.config`, what the CLI's --help reads), loads no torch.
_WHERE = {
    "LMHead": "scoring",
    "PrecomputeConfig": "config",
    "RolloutConfig": "config",
    "check_input": "sources",
    "check_same_tokenizer": "models",
    "model_fingerprint": "models",
    "run_precompute": "launch",
    "run_rollout": "rollout",
    "score_chunked": "scoring",
    "tokenizer_fingerprint": "models",
}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)


__all__ = [
    "LMHead",
    "PrecomputeConfig",
    "RolloutConfig",
    "check_input",
    "check_same_tokenizer",
    "model_fingerprint",
    "run_precompute",
    "run_rollout",
    "score_chunked",
    "tokenizer_fingerprint",
]
