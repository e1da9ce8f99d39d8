"""`summarize(store)`: the numbers `kdcache inspect` prints.

Why these: bytes/token per field tells users what each signal costs on disk, and the top-K
mass (Σ_k exp(topk_logprobs)) tells them what truncating to K loses (METHODS.md §1).
Sizes come from the manifest (stored file sizes), so only `topk_logprobs` is decoded, one
shard at a time; roles are counted on the Arrow `role` column (no record dicts are built).
Every file of every shard is fetched and checked against the manifest's crc32c (v4+) or
sha256 (older), and every size it declares against the manifest (`Store.check_shard`), so
`kdcache inspect` also reports damage, or a crafted store, anywhere in the store.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pyarrow.compute as pc

from .codecs import array_field
from .fingerprint import store_key
from .reader import Store, open_store

__all__ = ["summarize", "format_summary"]


def summarize(store: Store | str, mass_bins: int = 10) -> dict[str, Any]:
    """Meta summary, counts, bytes/token per field, top-K mass mean and histogram, roles."""
    st = open_store(store) if isinstance(store, str) else store
    n_tok = st.num_tokens
    field_bytes: dict[str, int] = {f: 0 for f in st.fields}
    field_bytes["records.parquet"] = 0
    zarr_meta = 0
    for sh in st.shards:
        for rel, info in sh["files"].items():
            parts = rel.split("/")
            if rel == "records.parquet":
                field_bytes[rel] += info["bytes"]
            elif len(parts) > 2 and array_field(parts[1]) in field_bytes:
                field_bytes[array_field(parts[1])] += info["bytes"]
            else:
                zarr_meta += info["bytes"]
    denom = max(n_tok, 1)
    roles: Counter[str] = Counter()
    hist = np.zeros(mass_bins, dtype=np.int64)
    mass_sum = 0.0
    has_topk = "topk_logprobs" in st.fields
    for s in range(len(st.shards)):
        raw = st.fetch_shard(s, st.fields, verify=True)
        st.check_shard(s, raw)  # sizes every file declares, also of the arrays not decoded
        shard = st.decode(s, raw, ["topk_logprobs"] if has_topk else [])
        vc = pc.value_counts(shard.table.column("role"))
        roles.update({str(v["values"]): int(v["counts"]) for v in vc.to_pylist()})
        if has_topk:
            mass = np.exp(shard.tokens["topk_logprobs"].astype(np.float64)).sum(axis=1)
            mass_sum += float(mass.sum())
            hist += np.histogram(np.clip(mass, 0.0, 1.0), bins=mass_bins, range=(0.0, 1.0))[0]
    m = st.meta
    return {
        "url": st.url,
        "store_key": store_key(m),
        "schema_version": st.schema_version,
        "complete": st.complete,
        "meta": {
            "k": m.k,
            "betas": m.betas,
            "fields": m.fields,
            "models": m.models,
            "tokenizer": m.tokenizer,
            "dataset": m.dataset,
            "options": m.options,
            "code_version": m.code_version,
        },
        "n_shards": len(st.shards),
        "n_sequences": len(st),
        "n_groups": st.num_groups,
        "n_tokens": n_tok,
        "bytes_total": sum(field_bytes.values()) + zarr_meta,
        "bytes_per_token": {k: v / denom for k, v in field_bytes.items()},
        "topk_mass_mean": (mass_sum / n_tok) if has_topk and n_tok else None,
        "topk_mass_hist": {
            "edges": np.linspace(0.0, 1.0, mass_bins + 1).round(6).tolist(),
            "counts": hist.tolist(),
        } if has_topk else None,
        "roles": dict(sorted(roles.items())),
    }


def format_summary(s: dict[str, Any]) -> str:
    """`kdcache inspect` as a person reads it: provenance, sizes, bytes/token, top-K mass."""
    meta = s.get("meta", {})
    lines = [
        f"store      {s.get('url')}  (key {s.get('store_key')}, schema v{s.get('schema_version')}, "
        f"{'complete' if s.get('complete') else 'INCOMPLETE'})",
        "models     " + (", ".join(f"{role}:{str((m or {}).get('weights_sha256', '?'))[:12]}"
                                   for role, m in meta.get("models", {}).items()) or "-"),
        f"K / betas  {meta.get('k')} / {meta.get('betas')}   codec {meta.get('options', {}).get('codec')}",
        f"records    {s.get('n_sequences')} sequences in {s.get('n_groups')} groups, "
        f"{s.get('n_tokens')} tokens, {s.get('n_shards')} shards, {s.get('bytes_total', 0) / 2**20:.2f} MiB",
        f"roles      {', '.join(f'{k}={v}' for k, v in (s.get('roles') or {}).items())}",
        "bytes/token per field:",
    ]
    per = s.get("bytes_per_token") or {}
    lines += [f"  {k:<22} {v:8.2f}" for k, v in per.items()]
    lines.append(f"  {'total':<22} {sum(per.values()):8.2f}")
    if s.get("topk_mass_mean") is not None:
        lines.append(f"mean top-K mass  {s['topk_mass_mean']:.4f}  (what K keeps of the teacher's probability)")
        hist = s.get("topk_mass_hist") or {}
        counts, edges = hist.get("counts", []), hist.get("edges", [])
        top = max(counts) if counts else 0
        for i, c in enumerate(counts):
            bar = "#" * (round(30 * c / top) if top else 0)
            lines.append(f"  [{edges[i]:.1f}, {edges[i + 1]:.1f})  {bar} {c}")
    return "\n".join(lines)
