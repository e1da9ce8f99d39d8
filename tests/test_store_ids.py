"""The v5 id codec (`kdcache.idmap`): ids round-trip exactly (order included, ties among
log-probs too) over shapes, plain zarr decodes them like our decoder, older versions stay
readable, and a damaged table or code is an error, never other ids."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_store_util import make_groups, make_meta, write_store

from kdcache.store import SCHEMA_VERSION, StoreWriter, open_store
from kdcache.store import codecs as C
from kdcache.store.fastdecode import ChunkError, decode_array


def _ids(rng, T, K, V, skew=True):
    """Ids with a realistic skew (a few frequent ids, a long tail) or uniform."""
    if skew:
        p = 1.0 / np.arange(1, V + 1) ** 1.1
        return rng.choice(V, size=(T, K), p=p / p.sum()).astype(np.int64)
    return rng.integers(0, V, (T, K))


@pytest.mark.parametrize("T, K", [(0, 5), (1, 1), (1, 50), (7, 1), (300, 50), (5000, 3)])
@pytest.mark.parametrize("V", [40, 32_000, 151_936, 2**31 - 1])
def test_table_and_codes_round_trip(T, K, V):
    rng = np.random.default_rng(T * 31 + K + V % 97)
    ids = _ids(rng, T, K, min(V, 10**6)) if V < 2**31 - 1 else rng.integers(0, V, (T, K))
    table, classes = C.id_table(ids)
    assert sum(classes) == len(table) == len(np.unique(np.r_[ids.reshape(-1), 0]))
    cfg = C.idmap_config(ids)
    back = C.unpack_table(cfg["table"], cfg["classes"])
    assert back.dtype == np.int32 and np.array_equal(back, table)
    codes = C.id_encode(ids, back, cfg["dtype"])
    assert codes.dtype == np.dtype(cfg["dtype"]) and codes.shape == ids.shape
    assert np.array_equal(C.id_decode(codes, back), ids)
    # frequent ids get small codes: the code of the most frequent id is in the first class
    if ids.size:
        u, c = np.unique(ids, return_counts=True)
        assert codes.reshape(-1)[ids.reshape(-1) == u[c.argmax()]][0] < classes[0]


def test_int32_codes_when_the_table_is_large():
    ids = np.arange(70_000, dtype=np.int64).reshape(-1, 1) * 7
    cfg = C.idmap_config(ids)
    assert cfg["dtype"] == "int32"
    back = C.unpack_table(cfg["table"], cfg["classes"])
    assert np.array_equal(C.id_decode(C.id_encode(ids, back, "int32"), back), ids)


def test_code_outside_table_and_bad_classes_are_errors():
    ids = np.array([[3, 5, 9]])
    cfg = C.idmap_config(ids)
    table = C.unpack_table(cfg["table"], cfg["classes"])
    with pytest.raises(ValueError, match="outside the table"):
        C.id_decode(np.array([[0, 1, len(table)]], np.uint16), table)
    with pytest.raises(ValueError, match="do not add up"):
        C.unpack_table(cfg["table"], [*cfg["classes"], 1])
    with pytest.raises(ValueError, match="missing from the array's table"):
        C.id_encode(np.array([[4]]), table, "uint16")


@pytest.mark.parametrize("codec", ["compact", "lossless"])
def test_store_round_trip_with_ties_and_edge_shapes(tmp_path, codec):
    """Ids come back exactly in the stored order, also where log-probs tie (equal values
    in a row keep their ids' order), for T = 0, 1 and K = 1 stores."""
    for k in (1, 6):
        meta = make_meta(k=k, codec=codec, fields=["topk_ids", "topk_logprobs",
                                                   "ref_topk_logprobs", "token_logprob"])
        groups = make_groups(9, meta, seed=k, max_t=6)
        recs = [r for g in groups for r in g]
        assert {len(r["response_ids"]) for r in recs} & {0, 1}
        rng = np.random.default_rng(k)
        for i, r in enumerate(recs):
            T = len(r["response_ids"])
            lp = -np.sort(rng.exponential(2.0, (T, k)), axis=1)  # float64 originals
            if i % 2:
                lp[:] = -1.5  # every rank ties
            r["topk_logprobs"] = lp
            r["ref_topk_logprobs"] = lp + rng.normal(0, 0.3, (T, k)).clip(max=-lp)
            r["token_logprob"] = lp[:, 0] if k else np.zeros(T)
            r["topk_ids"] = rng.permutation(40_000)[: T * k].reshape(T, k)
        url = str(tmp_path / f"{codec}{k}")
        write_store(url, meta, groups, shard_records=5)
        st = open_store(url)
        assert st.schema_version == SCHEMA_VERSION
        bound = 2e-3 if codec == "compact" else 0.0
        for i, (a, b) in enumerate(zip(recs, st, strict=True)):
            assert b["topk_ids"].dtype == np.int32
            assert np.array_equal(np.asarray(a["topk_ids"]).reshape(b["topk_ids"].shape),
                                  b["topk_ids"])
            for f in ("topk_logprobs", "ref_topk_logprobs", "token_logprob"):
                want = a[f] if bound else a[f].astype(np.float32)
                assert b[f].shape == np.shape(a[f])
                assert np.abs(b[f].astype(np.float64) - want).max(initial=0) <= bound, f
            if i % 2:
                assert np.all(b["topk_logprobs"] == b["topk_logprobs"][:, :1])


def test_plain_zarr_decodes_v5_ids_like_fastdecode(tmp_path):
    import zarr

    from kdcache.store import writer as writer_mod

    meta = make_meta(codec="compact")
    groups = make_groups(8, meta, seed=3)
    rng = np.random.default_rng(3)
    runs = rng.integers(0, 50_000, (5, meta.k))  # rows share runs of ids: idmap is chosen
    for r in (r for g in groups for r in g):
        r["topk_ids"] = runs[rng.integers(0, 5, len(r["response_ids"]))]
    writer_mod.CHUNK_ROWS, old = 7, writer_mod.CHUNK_ROWS  # several chunks, a partial last one
    try:
        write_store(str(tmp_path / "s"), meta, groups, shard_records=100)
    finally:
        writer_mod.CHUNK_ROWS = old
    path = tmp_path / "s" / "shards" / "shard-00000" / "tokens.zarr"
    files = {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    codecs = json.loads(files["topk_ids/zarr.json"])["codecs"]
    assert [c["name"] for c in codecs] == ["kdcache.idmap", "bytes", "zstd", "crc32c"]
    ours = decode_array(files, "topk_ids")
    assert np.array_equal(zarr.open_group(str(path), mode="r")["topk_ids"][...], ours)
    want = np.concatenate([r["topk_ids"] for g in groups for r in g])
    assert np.array_equal(ours, want)
    # a code beyond the table (a chunk whose crc was rewritten to match) is refused
    import google_crc32c

    key = "topk_ids/c/0/0"
    meta_j = json.loads(files["topk_ids/zarr.json"])
    n = len(C.unpack_table(meta_j["codecs"][0]["configuration"]["table"],
                           meta_j["codecs"][0]["configuration"]["classes"]))
    from numcodecs import Zstd

    codes = np.full((7, meta.k), n, np.uint16)
    body = Zstd(1).encode(codes.tobytes())
    forged = body + np.uint32(google_crc32c.value(body)).tobytes()
    with pytest.raises(ChunkError, match="outside the table"):
        decode_array({**files, key: forged}, "topk_ids")


def test_writer_picks_the_smaller_ids_pipeline_per_shard(tmp_path):
    """Rank-major blosc wins where each rank repeats a few ids (tiny vocabularies), table
    codes + zstd where rows share runs of ids over a large vocabulary; both round-trip."""
    meta = make_meta(k=8, codec="compact", fields=["topk_ids", "topk_logprobs"])
    rng = np.random.default_rng(5)
    groups = []
    for g in range(40):
        T = 50
        if g < 20:  # shard 0: rank r holds one of two ids (a 16-symbol vocabulary)
            ids = np.arange(8)[None, :] * 2 + rng.integers(0, 2, (T, 8))
        else:  # shard 1: rows repeat whole runs of ids from a 50k vocabulary
            base = rng.integers(0, 50_000, (6, 8))
            ids = base[rng.integers(0, 6, T)]
        groups.append([{"example_id": f"e{g}", "role": "sft", "prompt_ids": [1],
                        "response_ids": np.arange(T), "is_terminal": True, "topk_ids": ids,
                        "topk_logprobs": -np.sort(rng.exponential(1, (T, 8)), 1)}])
    write_store(str(tmp_path / "s"), meta, groups, shard_records=20)
    first = {}
    for i in range(2):
        zj = tmp_path / "s" / "shards" / f"shard-{i:05d}" / "tokens.zarr" / "topk_ids" / \
            "zarr.json"
        first[i] = json.loads(zj.read_text())["codecs"][0]["name"]
    assert first == {0: "transpose", 1: "kdcache.idmap"}
    for a, b in zip([r for g in groups for r in g], open_store(str(tmp_path / "s")),
                    strict=True):
        assert np.array_equal(a["topk_ids"], b["topk_ids"])


@pytest.mark.parametrize("version", [3, 4])
def test_previous_versions_still_read_and_merge_into_v5(tmp_path, version):
    meta = make_meta(codec="compact")
    groups = make_groups(10, meta, seed=8)
    old = str(tmp_path / f"v{version}")
    with StoreWriter(old, meta, shard_records=4, _schema_version=version) as w:
        for g in groups:
            w.add_group(g)
    st = open_store(old)
    assert st.schema_version == version
    ids_kind = json.loads((tmp_path / f"v{version}" / "shards" / "shard-00000" / "tokens.zarr"
                           / "topk_ids" / "zarr.json").read_text())["codecs"][0]["name"]
    assert ids_kind == "transpose"
    from kdcache.store.admin import merge

    merge([old], str(tmp_path / "new"))
    new = open_store(str(tmp_path / "new"))
    assert new.schema_version == SCHEMA_VERSION
    for a, b in zip(st, new, strict=True):
        for f in meta.fields:
            assert np.array_equal(a[f], b[f]), f
