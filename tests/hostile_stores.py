"""Sealed, self-consistent hostile stores (issue 19): each starts from an honest store and is
then edited the way an attacker would, with every checksum recomputed as the writer does
(file sha256/crc32c/size, the shard entry checksum, totals, the store checksum and the
manifest checksum, and the crc32c that ends every chunk), so the checksums verify and only
the reader's own bounds can refuse the store.  Used by tests/test_store_hostile.py and
benchmarks/bench_hostile.py.

A builder takes (root, outside) — `outside` is a directory next to the store holding
files a reader must never open (`SENTINEL` in their names) — and returns (store URL, the
text the one-line error must contain).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdcache.store import StoreMeta, StoreWriter
from kdcache.store.fingerprint import hash_bytes, hash_json
from kdcache.store.integrity import crc32c
from kdcache.store.writer import commit_manifest

SENTINEL = "SENTINEL-must-not-be-read"
VOCAB = 1000
SHARD = "shard-00000"


def honest_meta(k: int = 8) -> StoreMeta:
    return StoreMeta(k=k, betas=[0.5, 2.0],
                     fields=["topk_ids", "topk_logprobs", "token_logprob", "behavior_logprob",
                             "soft_value"],
                     models={"dpo": {"name": "tiny-dpo"}},
                     tokenizer={"name": "tiny-tok", "vocab_size": VOCAB},
                     dataset={"name": "toy"}, options={"codec": "lossless"},
                     code_version="test")


def honest_groups(n_groups: int, meta: StoreMeta, seed: int = 0, max_t: int = 64
                  ) -> list[list[dict[str, Any]]]:
    """Groups of 1-2 records; top-K ids drawn from a few shared runs (as real teachers'
    neighbouring rows are), so the writer picks the v5 id table codec."""
    rng = np.random.default_rng(seed)
    K, B = meta.k, len(meta.betas)
    runs = np.stack([rng.permutation(VOCAB)[:K] for _ in range(16)]).astype(np.int32)
    groups = []
    for g in range(n_groups):
        size = int(rng.integers(1, 3))
        roles = ["chosen", "rejected"] if size == 2 else ["sft"]
        recs = []
        for i in range(size):
            T = int(rng.integers(1, max_t + 1))
            lp = -np.sort(rng.exponential(2.0, (T, K)), axis=1).astype(np.float32)
            recs.append({
                "example_id": f"ex{g:06d}", "role": roles[i], "group": 0,
                "prompt_ids": rng.integers(0, VOCAB, int(rng.integers(1, 16))).astype(np.int32),
                "response_ids": rng.integers(0, VOCAB, T).astype(np.int32),
                "teacher_prompt_ids": None, "is_terminal": True, "reward": None,
                "topk_ids": runs[rng.integers(0, len(runs), T)],
                "topk_logprobs": lp,
                "token_logprob": (-rng.exponential(2.0, T)).astype(np.float32),
                "behavior_logprob": (-rng.exponential(1.0, T)).astype(np.float32),
                "soft_value": rng.normal(0, 3, (T + 1, B)).astype(np.float32),
            })
        groups.append(recs)
    return groups


def build_honest(root: Path, n_groups: int = 40, seed: int = 0, shard_records: int = 10_000,
                 max_t: int = 64) -> str:
    url = str(root)
    meta = honest_meta()
    with StoreWriter(url, meta, shard_records=shard_records) as w:
        for g in honest_groups(n_groups, meta, seed, max_t):
            w.add_group(g)
    return url


# ----------------------------------------------------------------------------- sealing
def manifest(url: str) -> dict[str, Any]:
    return json.loads((Path(url) / "manifest.json").read_text())


def file_info(data: bytes) -> dict[str, Any]:
    return {"sha256": hash_bytes(data), "bytes": len(data), "crc32c": crc32c(data)}


def seal(url: str, m: dict[str, Any]) -> None:
    """Recompute every checksum of manifest `m` as the writer does and commit it."""
    for s in m["shards"]:
        s.pop("checksum", None)
        s["checksum"] = hash_json(s)
    commit_manifest(_fs(url), url, m)


def _fs(url: str) -> Any:
    from kdcache.store._io import open_fs

    return open_fs(url)[0]


def shard_dir(url: str) -> Path:
    return Path(url) / "shards" / SHARD


def replace_file(url: str, rel: str, data: bytes, m: dict[str, Any] | None = None) -> dict:
    """Write `data` as shard file `rel`, list it in the manifest with its checksums, seal."""
    m = manifest(url) if m is None else m
    p = shard_dir(url) / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    m["shards"][0]["files"][rel] = file_info(data)
    seal(url, m)
    return m


def chunk(body: bytes) -> bytes:
    """A zarr chunk as the `crc32c` codec stores it: body + its crc32c, little endian."""
    return body + np.uint32(google_crc32c.value(body)).tobytes()


def zstd_bomb(nbytes: int) -> bytes:
    """A zstd frame that declares and really decompresses to `nbytes` zero bytes, made of
    RLE blocks (4 bytes per 128 KiB), so 2.8 GB fit in ~85 KB without compressing them."""
    block = 1 << 17
    out = bytearray((0xFD2FB528).to_bytes(4, "little"))
    out.append(0xE0)  # 8-byte content size, single segment, no checksum, no dictionary
    out += nbytes.to_bytes(8, "little")
    left = nbytes
    while left > 0:
        n = min(block, left)
        left -= n
        out += ((n << 3) | (1 << 1) | (1 if left == 0 else 0)).to_bytes(3, "little") + b"\0"
    return bytes(out)


def zarr_meta(url: str, array: str) -> dict[str, Any]:
    return json.loads((shard_dir(url) / "tokens.zarr" / array / "zarr.json").read_text())


def rewrite_zarr_meta(url: str, array: str, meta: dict[str, Any],
                      m: dict[str, Any] | None = None) -> dict:
    return replace_file(url, f"tokens.zarr/{array}/zarr.json",
                        json.dumps(meta, indent=2).encode(), m)


def rewrite_records(url: str, table: pa.Table, m: dict[str, Any] | None = None) -> dict:
    import io

    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", compression_level=9)
    return replace_file(url, "records.parquet", buf.getvalue(), m)


def records(url: str) -> pa.Table:
    return pq.read_table(shard_dir(url) / "records.parquet")


# ----------------------------------------------------------------------------- cases
def _rename_file(url: str, rel: str, new: str) -> None:
    m = manifest(url)
    files = m["shards"][0]["files"]
    files[new] = files.pop(rel)
    seal(url, m)


def case_dotdot_file(root: Path, outside: Path) -> tuple[str, str]:
    """records.parquet renamed to `../../../outside/SENTINEL.parquet`, a copy of the real
    one: without the name check verify would read and hash it, and report ok."""
    url = build_honest(root / "s")
    shutil.copy(shard_dir(url) / "records.parquet", outside / f"{SENTINEL}.parquet")
    _rename_file(url, "records.parquet", f"../../../outside/{SENTINEL}.parquet")
    return url, "leaves its directory (`..`)"


def case_dotdot_shard(root: Path, outside: Path) -> tuple[str, str]:
    """The shard's name is `../../outside/SENTINEL-shard`, a full copy of the real shard."""
    url = build_honest(root / "s")
    shutil.copytree(shard_dir(url), outside / f"{SENTINEL}-shard")
    m = manifest(url)
    m["shards"][0]["name"] = f"../../outside/{SENTINEL}-shard"
    seal(url, m)
    return url, "leaves its directory (`..`)"


def case_absolute_name(root: Path, outside: Path) -> tuple[str, str]:
    url = build_honest(root / "s")
    shutil.copy(shard_dir(url) / "records.parquet", outside / f"{SENTINEL}.parquet")
    _rename_file(url, "records.parquet", str(outside / f"{SENTINEL}.parquet"))
    return url, "is an absolute path or URL"


def case_dev_zero(root: Path, outside: Path) -> tuple[str, str]:
    """A file named `/dev/zero` listed with a 1 TB size: read until memory runs out."""
    url = build_honest(root / "s")
    m = manifest(url)
    m["shards"][0]["files"]["/dev/zero"] = {"sha256": "0" * 64, "bytes": 1 << 40,
                                            "crc32c": "00000000"}
    seal(url, m)
    return url, "is an absolute path or URL"


def case_fifo(root: Path, outside: Path) -> tuple[str, str]:
    """records.parquet replaced by a FIFO (listed as 0 bytes): open() would block forever."""
    url = build_honest(root / "s")
    p = shard_dir(url) / "records.parquet"
    p.unlink()
    os.mkfifo(p)
    m = manifest(url)
    m["shards"][0]["files"]["records.parquet"] = file_info(b"")
    seal(url, m)
    return url, "is a FIFO, not a regular file"


def case_symlink_file(root: Path, outside: Path) -> tuple[str, str]:
    """records.parquet is a symlink to an identical file outside the store."""
    url = build_honest(root / "s")
    p = shard_dir(url) / "records.parquet"
    shutil.copy(p, outside / f"{SENTINEL}.parquet")
    p.unlink()
    p.symlink_to(outside / f"{SENTINEL}.parquet")
    return url, "is a symlink that leads out of the store"


def case_symlink_shards(root: Path, outside: Path) -> tuple[str, str]:
    """shards/ is a symlink to a copy outside the store."""
    url = build_honest(root / "s")
    shutil.move(str(Path(url) / "shards"), str(outside / f"{SENTINEL}-shards"))
    (Path(url) / "shards").symlink_to(outside / f"{SENTINEL}-shards")
    return url, "through a symlink that leads out of the store"


def case_frame_bomb(root: Path, outside: Path, nbytes: int = 2_800_000_000) -> tuple[str, str]:
    """behavior_logprob's chain declared as bytes → zstd → crc32c, its only chunk an ~85 KB
    zstd frame that declares (and decompresses to) 2.8 GB."""
    url = build_honest(root / "s")
    meta = zarr_meta(url, "behavior_logprob")
    meta["codecs"] = [{"name": "bytes", "configuration": {"endian": "little"}},
                      {"name": "zstd", "configuration": {"level": 1, "checksum": False}},
                      {"name": "crc32c"}]
    m = rewrite_zarr_meta(url, "behavior_logprob", meta)
    replace_file(url, "tokens.zarr/behavior_logprob/c/0", chunk(zstd_bomb(nbytes)), m)
    return url, "compressed frame declares 2800000000 bytes"


def case_zarr_shape(root: Path, outside: Path, rows: int = 1_000_000_000) -> tuple[str, str]:
    """token_logprob declares 10^9 rows in one chunk (4 GB of float32, all fill)."""
    url = build_honest(root / "s")
    meta = zarr_meta(url, "token_logprob")
    meta["shape"] = [rows]
    meta["chunk_grid"]["configuration"]["chunk_shape"] = [rows]
    rewrite_zarr_meta(url, "token_logprob", meta)
    return url, "declares shape [1000000000], but the manifest implies"


def case_parquet_rows(root: Path, outside: Path, times: int = 2000) -> tuple[str, str]:
    """records.parquet holds its rows `times` times over (compresses to a few hundred KB)."""
    url = build_honest(root / "s")
    t = records(url)
    rewrite_records(url, pa.concat_tables([t] * times))
    return url, f"holds {t.num_rows * times} rows but the manifest says {t.num_rows}"


def case_response_ids(root: Path, outside: Path, extra: int = 50_000_000) -> tuple[str, str]:
    """The first record's response_ids is `extra` zeros longer than its n_tokens."""
    url = build_honest(root / "s")
    t = records(url)
    resp = t.column("response_ids").combine_chunks()
    offs = resp.offsets.to_numpy().astype(np.int64)
    vals = resp.values.to_numpy()
    vals = np.concatenate([vals[: offs[1]], np.zeros(extra, np.int32), vals[offs[1]:]])
    offs[1:] += extra
    col = pa.ListArray.from_arrays(pa.array(offs.astype(np.int32)), pa.array(vals, pa.int32()))
    i = t.schema.get_field_index("response_ids")
    rewrite_records(url, t.set_column(i, t.schema.field(i), col))
    return url, "values in response_ids, more than the"


def case_id_table(root: Path, outside: Path, entries: int = 200_000_000) -> tuple[str, str]:
    """topk_ids' id table declares `entries` ids (an ~800 MB zstd bomb in zarr.json)."""
    url = build_honest(root / "s")
    meta = zarr_meta(url, "topk_ids")
    idmap = meta["codecs"][0]
    assert idmap["name"] == "kdcache.idmap", meta["codecs"]
    idmap["configuration"]["table"] = base64.b64encode(zstd_bomb(4 * entries)).decode()
    idmap["configuration"]["classes"] = [entries]
    idmap["configuration"]["dtype"] = "int32"
    rewrite_zarr_meta(url, "topk_ids", meta)
    return url, f"declares a table of {entries} ids"


def case_id_outside_vocab(root: Path, outside: Path) -> tuple[str, str]:
    """A small id table whose ids lie outside the vocabulary (would index past the
    student's embedding)."""
    from kdcache.store.codecs import _pack_table

    url = build_honest(root / "s")
    meta = zarr_meta(url, "topk_ids")
    cfg = meta["codecs"][0]["configuration"]
    from kdcache.store.codecs import unpack_table

    table = unpack_table(cfg["table"], cfg["classes"]).astype(np.int64)
    table[1] = VOCAB + 10**6  # a valid table shape, one id far outside [0, VOCAB)
    cfg["table"] = _pack_table(table, [len(table)])
    cfg["classes"] = [len(table)]
    rewrite_zarr_meta(url, "topk_ids", meta)
    return url, "holds ids outside the vocabulary"


def case_token_id_outside_vocab(root: Path, outside: Path, column: str = "response_ids",
                                value: int = VOCAB + 10**6) -> tuple[str, str]:
    """One id of a token-id column set outside [0, VOCAB): the student's embedding lookup
    would index past its table (a device-side assert on CUDA)."""
    url = build_honest(root / "s")
    t = records(url)
    col = t.column(column).combine_chunks()
    vals = col.values.to_numpy().copy()
    vals[len(vals) // 2] = value
    new = pa.ListArray.from_arrays(col.offsets, pa.array(vals, pa.int32()))
    i = t.schema.get_field_index(column)
    rewrite_records(url, t.set_column(i, t.schema.field(i), new))
    return url, f"holds token id {value} in {column}, outside the store's vocabulary [0, {VOCAB})"


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def case_deep_manifest(root: Path, outside: Path, depth: int = 200_000) -> tuple[str, str]:
    """manifest.json with a 200 000-deep list (RecursionError in Python's json)."""
    url = build_honest(root / "s")
    p = Path(url) / "manifest.json"
    text = p.read_text().rstrip()
    assert text.endswith("}")
    p.write_text(text[:-1] + f', "zz": {_nested(depth)}}}\n')
    return url, "nests JSON deeper than"


def case_deep_zarr_json(root: Path, outside: Path, depth: int = 200_000) -> tuple[str, str]:
    url = build_honest(root / "s")
    meta = zarr_meta(url, "token_logprob")
    raw = json.dumps(meta)[:-1] + f', "zz": {_nested(depth)}}}'
    replace_file(url, "tokens.zarr/token_logprob/zarr.json", raw.encode())
    return url, "nests JSON deeper than"


CASES = {
    "dotdot_file": case_dotdot_file,
    "dotdot_shard": case_dotdot_shard,
    "absolute_name": case_absolute_name,
    "dev_zero": case_dev_zero,
    "fifo": case_fifo,
    "symlink_file": case_symlink_file,
    "symlink_shards": case_symlink_shards,
    "frame_bomb": case_frame_bomb,
    "zarr_shape": case_zarr_shape,
    "parquet_rows": case_parquet_rows,
    "response_ids": case_response_ids,
    "id_table": case_id_table,
    "id_outside_vocab": case_id_outside_vocab,
    "token_id_outside_vocab": case_token_id_outside_vocab,
    "deep_manifest": case_deep_manifest,
    "deep_zarr_json": case_deep_zarr_json,
}


def build(name: str, root: Path) -> tuple[str, str, Path]:
    """Build case `name` under `root`: (store URL, expected error text, outside dir)."""
    outside = root / "outside"
    outside.mkdir(parents=True, exist_ok=True)
    url, text = CASES[name](root, outside)
    return url, text, outside
