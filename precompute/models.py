"""Loading teachers / references / samplers, and cheap content fingerprints for the store key.

Why fingerprints: a store is content-addressed (kdcache.store.store_key), so a model must be
identified by what it computes, not by its path. Hashing 16 GB of weights on every run would
cost minutes; instead we hash the config, each weight file's size and safetensors header, and
a fixed sample of its bytes (64 x 64 KiB blocks spread across the file). Any retrain changes
sampled bytes with overwhelming probability; `full=True` hashes every byte.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .scoring import LMHead

# config keys that name where/with-what a model was saved, not what it computes
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_commit_hash", "torch_dtype",
                         "dtype", "_attn_implementation_autoset", "use_cache"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_SAMPLE_BLOCKS, _BLOCK = 64, 64 * 1024


class ModelLoadError(ValueError):
    """A model or tokenizer could not be loaded; the message names the path and the fix.
    (A ValueError: bad user input, reported by the CLI as one `error:` line.)"""


def resolve_device(device: str | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU unless asked (CPU bf16 matmuls are slow and imprecise)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}: use one of auto, {', '.join(table)}")
    return table[dtype]


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"


def local_model_dir(name_or_path: str, trust_remote_code: bool = False) -> Path | None:
    """The local directory holding a model's files (a path, or a hub id already in the cache)."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    try:
        from transformers.utils import cached_file

        cfg = cached_file(name_or_path, "config.json")
        return Path(cfg).parent if cfg else None
    except Exception:  # noqa: BLE001 - not local, not cached: caller decides
        return None


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, role: str = "model"):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - turned into one clear line
        raise ModelLoadError(
            f"cannot load the {role} tokenizer from {name_or_path!r} ({_one_line(e)}); pass a local "
            "HF model directory with tokenizer files, or a hub id that is cached"
        ) from None


def load_model(
    name_or_path: str,
    role: str = "teacher",
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> nn.Module:
    """An HF causal LM in eval mode on `device` (bf16 on GPU, fp32 on CPU by default).

    A directory with `adapter_config.json` is loaded as a PEFT adapter and merged, so
    LoRA-trained teachers/students work like full models.
    """
    from transformers import AutoModelForCausalLM

    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code, "dtype": dt}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    try:
        if (Path(name_or_path) / "adapter_config.json").is_file():
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(name_or_path, **kw).merge_and_unload()
        else:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, **kw)
    except Exception as e:  # noqa: BLE001 - turned into one clear line
        hint = ("pass trust_remote_code=True only if you trust its code"
                if "trust_remote_code" in str(e) else
                "pass a local HF model directory (config.json + weights) or a cached hub id")
        raise ModelLoadError(
            f"cannot load the {role} model from {name_or_path!r} ({_one_line(e)}); {hint}"
        ) from None
    model.to(dev)
    model.eval()
    model.requires_grad_(False)
    return model


def base_model(model: nn.Module) -> nn.Module:
    """The decoder stack that returns the final (normed) hidden states, without the lm_head."""
    for get in (lambda m: m.get_decoder(), lambda m: getattr(m, m.base_model_prefix)):
        try:
            base = get(model)
        except Exception:  # noqa: BLE001 - try the next way
            continue
        if isinstance(base, nn.Module) and base is not model:
            return base
    raise ModelLoadError(
        f"cannot find the decoder stack of {type(model).__name__} (no get_decoder()/"
        f"{getattr(model, 'base_model_prefix', 'model')}); precompute needs an HF causal LM"
    )


@torch.no_grad()
def verify_head(model: nn.Module, head: LMHead, n_tokens: int = 8) -> float:
    """Check that base(x) -> head reproduces the model's own logits on a short input.

    Catches logit transforms `LMHead.from_model` does not know (a custom scale, a remote-code
    model): we refuse rather than store subtly wrong numbers. Returns the max |difference|.
    """
    dev = head.weight.device
    ids = torch.arange(n_tokens, device=dev).remainder(head.vocab_size).unsqueeze(0)
    # a head restricted to the tokenizer's ids (padded rows dropped) matches those columns
    want = model(input_ids=ids).logits[0, :, : head.vocab_size].float()
    hid = base_model(model)(input_ids=ids).last_hidden_state[0]
    got = head.logits(hid)
    diff = (got - want).abs().max().item()
    # Low-precision models round their own logits to bf16/fp16 (~2^-8 relative).
    tol = 1e-3 if head.weight.dtype == torch.float32 else 2e-2 * max(1.0, want.abs().max().item())
    if not diff <= tol:
        raise ModelLoadError(
            f"{type(model).__name__}: logits from the decoder's hidden states and lm_head differ "
            f"from the model's own forward by {diff:.3g} (> {tol:.3g}); its config applies a logit "
            "transform kdcache does not know, so precompute refuses (file an issue with the model)"
        )
    return diff


# ------------------------------------------------------------------------------- fingerprints

def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_digest(path: Path, full: bool) -> dict[str, Any]:
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if full or size <= _SAMPLE_BLOCKS * _BLOCK:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            return {"size": size, "sha256": h.hexdigest()}
        if path.suffix == ".safetensors":  # the header names every tensor, dtype and shape
            n = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(n, 100 << 20)))
        step = size // _SAMPLE_BLOCKS
        for i in range(_SAMPLE_BLOCKS):
            f.seek(i * step)
            h.update(f.read(_BLOCK))
        f.seek(max(0, size - _BLOCK))
        h.update(f.read(_BLOCK))
    return {"size": size, "sampled_sha256": h.hexdigest()}


def config_hash(config: Any) -> str:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    d = {k: v for k, v in d.items() if k not in _VOLATILE_CONFIG_KEYS}
    return _sha(json.dumps(d, sort_keys=True, default=str).encode())


def model_fingerprint(name_or_path: str, full: bool = False,
                      trust_remote_code: bool = False) -> dict[str, Any]:
    """Content-derived identity of a model directory (see module doc); no weights are loaded."""
    d = local_model_dir(name_or_path, trust_remote_code)
    if d is None:
        raise ModelLoadError(
            f"cannot find model files for {name_or_path!r}; pass a local HF model directory or a "
            "hub id that is already downloaded"
        )
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"{str(d)!r} has no config.json; it is not an HF model directory")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {str(cfg_path)!r} ({_one_line(e)})") from None
    files = sorted(p for p in d.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    adapter = d / "adapter_config.json"
    if adapter.is_file():
        files.append(adapter)
    if not files:
        raise ModelLoadError(f"{str(d)!r} holds no weight files (*.safetensors / *.bin)")
    weights = {p.name: _file_digest(p, full) for p in files}
    # No path/name in here: moving a model directory must not change the store key.
    return {
        "config_sha256": config_hash(cfg),
        "weights_sha256": _sha(json.dumps(weights, sort_keys=True).encode()),
        "vocab_size": cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size"),
    }


def tokenizer_fingerprint(tok: Any) -> str:
    """sha256 over everything that maps text to ids: vocab, merges, normalisation, special
    tokens and the chat template (the template shapes every prompt)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        core: Any = json.loads(backend.to_str())
    else:  # slow tokenizer: vocab is the best cheap proxy
        core = sorted(tok.get_vocab().items())
    payload = {
        "core": core,
        "special": {k: str(v) for k, v in sorted(tok.special_tokens_map.items())},
        "added": sorted((str(k), int(v)) for k, v in tok.get_added_vocab().items()),
        "chat_template": getattr(tok, "chat_template", None),
        "bos": tok.bos_token_id, "eos": tok.eos_token_id,
    }
    return _sha(json.dumps(payload, sort_keys=True, default=str).encode())


def tokenizer_files(name_or_path: str, names: tuple[str, ...]) -> dict[str, bytes]:
    """The tokenizer's files `names` as saved in its directory (bytes as on disk: re-saving
    a loaded tokenizer adds load-time keys, which would move the store key). Empty when the
    directory has no `tokenizer.json` (a slow tokenizer: no cross-tokenizer students)."""
    d = local_model_dir(name_or_path)
    if d is None or not (d / "tokenizer.json").is_file():
        return {}
    return {n: (d / n).read_bytes() for n in names if (d / n).is_file()}


def _vocab_of(tok: Any) -> dict[str, int]:
    return dict(tok.get_vocab())


def tokenizer_size(tok: Any) -> int:
    """How many ids the tokenizer can emit: max id + 1 (len(tok) unless ids have holes)."""
    vocab = _vocab_of(tok)
    return max(len(tok), max(vocab.values(), default=-1) + 1)


def check_same_tokenizer(
    tok_a: Any,
    tok_b: Any,
    name_a: str = "teacher",
    name_b: str = "student",
    model_vocab_a: int | None = None,
    model_vocab_b: int | None = None,
) -> None:
    """Raise if two models do not share one tokenizer (ids must mean the same tokens).

    Their output layers may have different numbers of rows (vocabulary padding, e.g.
    Qwen2.5-7B 152,064 vs Qwen2.5-1.5B 151,936 with one tokenizer of 151,665 tokens): only the
    tokenizer's ids are scored. `model_vocab_*` (lm_head rows), if given, must cover them.
    """
    va, vb = _vocab_of(tok_a), _vocab_of(tok_b)
    size_a, size_b = tokenizer_size(tok_a), tokenizer_size(tok_b)
    if size_a != size_b:
        raise ValueError(
            f"{name_a} vocab {size_a} != {name_b} vocab {size_b}: their token ids do not line up; "
            "use models that share one tokenizer"
        )
    if va != vb:
        diff = sorted(set(va.items()) ^ set(vb.items()))[:3]
        raise ValueError(
            f"{name_a} and {name_b} tokenizers differ (both {len(va)} tokens, first differences "
            f"{diff}): use models that share one tokenizer"
        )
    if tok_a.eos_token_id != tok_b.eos_token_id:
        raise ValueError(
            f"{name_a} eos id {tok_a.eos_token_id} != {name_b} eos id {tok_b.eos_token_id}: "
            "use models that share one tokenizer"
        )
    check_vocab_rows(name_a, name_a, model_vocab_a, size_a)
    check_vocab_rows(name_b, name_b, model_vocab_b, size_b)


def check_vocab_rows(role: str, name: str, rows: int | None, n_ids: int) -> None:
    """A model's output layer must have a row for every id its tokenizer can emit."""
    if rows is not None and rows < n_ids:
        raise ValueError(
            f"the {role} {name!r} has {rows} output rows (config vocab_size) but its tokenizer "
            f"has {n_ids} token ids: ids >= {rows} cannot be scored; use the tokenizer that "
            "belongs to the model"
        )


def model_vocab_size(name_or_path: str) -> int | None:
    """lm_head rows from config.json without loading weights (None if unknown)."""
    d = local_model_dir(name_or_path)
    if d is None or not (d / "config.json").is_file():
        return None
    cfg = json.loads((d / "config.json").read_text())
    return cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size")


def env_device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"
