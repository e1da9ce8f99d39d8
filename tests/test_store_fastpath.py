"""The reader's fast decoding paths against plain references: blocked id gathers, blocked
grid scaling, the fused topk/ref rebuild, scratch-buffer decompression."""

from __future__ import annotations

import json

import google_crc32c
import numpy as np
import pytest
from numcodecs import Blosc, Zstd
from test_store_util import ALL_FIELDS, make_groups, make_meta, write_store

from kdcache.store import codecs as C
from kdcache.store import open_store
from kdcache.store.codecs import ADV_ARRAY, MAX_ABS, MAX_GRID_INT, MIN_ERROR_BOUND, grid_step
from kdcache.store.fastdecode import (
    ChunkError,
    _frame_size,
    decode_array,
    decode_grid,
    decode_topk_ref,
)
from kdcache.store.reader import decode_shard


def _zfiles(raw: dict[str, bytes]) -> dict[str, bytes]:
    return {k[len("tokens.zarr/"):]: v for k, v in raw.items() if k.startswith("tokens.zarr/")}


def _reference(files: dict[str, bytes], name: str) -> np.ndarray:
    """float64 values of a gridq array from its plain integer decoding, rounded once."""
    q, s = decode_grid(files, name)
    return (q.astype(np.float64) * s).astype(np.float32)


def _reference_ref(files: dict[str, bytes]) -> np.ndarray:
    (qt, st), (qa, _) = decode_grid(files, "topk_logprobs"), decode_grid(files, ADV_ARRAY)
    sign = 1 if st > 0 else -1
    return ((qt.astype(np.float64) - sign * qa) * st).astype(np.float32)


def _write(tmp_path, chunk_rows: int, n_groups: int = 10, seed: int = 1, **kw):
    from kdcache.store import writer as writer_mod

    meta = make_meta(codec="compact", **kw)
    groups = make_groups(n_groups, meta, seed=seed)
    groups[1][0]["token_logprob"][:] = 0.0  # an all-fill stretch (chunks zarr skips)
    old = writer_mod.CHUNK_ROWS
    writer_mod.CHUNK_ROWS = chunk_rows
    try:
        write_store(str(tmp_path / "s"), meta, groups, shard_records=8)
    finally:
        writer_mod.CHUNK_ROWS = old
    return open_store(str(tmp_path / "s")), groups


@pytest.mark.parametrize("block", [1, 7, 64, 1 << 16])
@pytest.mark.parametrize("chunk_rows", [5, 4096])
def test_blocked_decode_equals_plain_reference(tmp_path, monkeypatch, block, chunk_rows):
    """Every field of every shard, at block sizes from one element to whole chunks (so the
    blocks cut rows, chunks and partial last chunks in every way), equals the plain float64
    rebuild from the integer grid and, for ids and single arrays, plain zarr."""
    import zarr

    st, groups = _write(tmp_path, chunk_rows)
    monkeypatch.setattr(C, "BLOCK_ELEMS", block)
    for i in range(len(st.shards)):
        raw = st.fetch_shard(i)
        files = _zfiles(raw)
        shard = decode_shard("x", raw, ALL_FIELDS, threads=False)
        assert np.array_equal(shard.tokens["topk_logprobs"], _reference(files, "topk_logprobs"))
        assert np.array_equal(shard.tokens["ref_topk_logprobs"], _reference_ref(files))
        z = zarr.open_group(str(tmp_path / "s" / "shards" / st.shards[i]["name"] / "tokens.zarr"),
                            mode="r")
        for f in ("topk_ids", "token_logprob", "soft_value", "ref_token_logprob"):
            assert np.array_equal(shard.tokens[f], z[f][...]), f
            assert np.array_equal(decode_array(files, f), z[f][...]), f
        # ref alone (topk not asked for) is the same rebuild
        alone = decode_shard("x", raw, ["ref_topk_logprobs"], threads=False)
        assert np.array_equal(alone.tokens["ref_topk_logprobs"], _reference_ref(files))
    want = np.concatenate([r["topk_ids"] for g in groups for r in g])
    assert np.array_equal(np.concatenate([r["topk_ids"] for r in st]), want)


def test_topk_ref_with_different_chunk_grids(tmp_path):
    """topk and the advantage chunked differently (not what the writer does, but legal
    zarr): the fused rebuild falls back to whole arrays and still equals the reference."""
    import zarr

    from kdcache.store.codecs import CodecSpec

    spec = CodecSpec("compact", 2e-3)
    rng = np.random.default_rng(0)
    topk = spec.snap(-np.sort(rng.exponential(2.0, (23, 6)), axis=1))
    ref = spec.snap(topk + rng.normal(0, 0.5, topk.shape))
    adv = spec.snap(topk.astype(np.float64) - ref)
    g = zarr.open_group(str(tmp_path / "z"), mode="w")
    for name, data, rows in (("topk_logprobs", topk, 7), (ADV_ARRAY, adv, 5)):
        a = g.create_array(name, shape=data.shape, dtype="float32", chunks=(rows, 6),
                           **spec.zarr_codecs(name, data))
        a[...] = data
    files = {str(p.relative_to(tmp_path / "z")): p.read_bytes()
             for p in (tmp_path / "z").rglob("*") if p.is_file()}
    got_topk, got_ref = decode_topk_ref(files, ADV_ARRAY, True)
    assert np.array_equal(got_topk, _reference(files, "topk_logprobs"))
    assert np.array_equal(got_ref, _reference_ref(files))
    assert np.abs(got_ref.astype(np.float64) - ref).max() <= 2e-3 + 1e-6


def test_scratch_buffers_do_not_leak_between_shards(tmp_path):
    """Chunks are decompressed into reused per-thread buffers: a shard decoded earlier keeps
    its values after later shards (and a second decode of itself) are decoded."""
    st, _ = _write(tmp_path, 4096, n_groups=12, seed=5)
    assert len(st.shards) >= 2
    raws = [st.fetch_shard(i) for i in range(len(st.shards))]
    first = decode_shard("x", raws[0], ALL_FIELDS, threads=False)
    kept = {f: a.copy() for f, a in first.tokens.items()}
    for raw in raws[1:] + raws[:1]:
        decode_shard("x", raw, ALL_FIELDS, threads=True)
    for f, a in kept.items():
        assert np.array_equal(first.tokens[f], a), f


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
@pytest.mark.parametrize("block", [1, 5, 1 << 16])
def test_id_decode_blocked_equals_take(monkeypatch, dtype, block):
    monkeypatch.setattr(C, "BLOCK_ELEMS", block)
    rng = np.random.default_rng(2)
    table = rng.permutation(151_936)[:300].astype(np.int32)
    codes = rng.integers(0, len(table), (17, 9)).astype(dtype)
    assert np.array_equal(C.id_decode(codes, table), table[codes])
    out = np.empty((17, 18), np.int32)[:, ::2]  # not contiguous: one unblocked gather
    C.id_decode(codes, table, out=out)
    assert np.array_equal(out, table[codes])
    bad = codes.copy()
    bad[3, 4] = len(table)
    with pytest.raises(ValueError, match="outside the table"):
        C.id_decode(bad, table)
    if dtype == np.int32:  # a negative code is refused too (a clipped gather would hide it)
        bad = codes.copy()
        bad[0, 0] = -1
        with pytest.raises(ValueError, match="code -1 is outside"):
            C.id_decode(bad, table)


@pytest.mark.parametrize("n", [0, 1, 255, 256, 70_000])
def test_frame_size_reads_blosc_and_zstd_headers(n):
    a = np.arange(n, dtype=np.int32)
    for codec in (Blosc("zstd", 5, 1), Zstd(9), Zstd(1)):
        u8 = np.frombuffer(codec.encode(a), np.uint8)
        assert _frame_size(codec, u8) == a.nbytes, codec


def test_wrong_size_frame_is_refused_not_read_from_scratch(tmp_path):
    """A chunk whose (checksum-valid) frame holds fewer bytes than the chunk shape is a
    ChunkError — never a partly stale scratch buffer."""
    st, _ = _write(tmp_path, 4096)
    files = _zfiles(st.fetch_shard(0))
    decode_array(files, "token_logprob")  # fills this thread's scratch with real bytes
    key = next(k for k in files if k.startswith("token_logprob/c/"))
    n = json.loads(files["token_logprob/zarr.json"])["chunk_grid"]["configuration"][
        "chunk_shape"][0]
    body = Blosc("zstd", 5, 2).encode(np.zeros(n - 1, np.int32))
    forged = body + np.uint32(google_crc32c.value(body)).tobytes()
    with pytest.raises(ChunkError, match="cannot be decoded"):
        decode_array({**files, key: forged}, "token_logprob")


def test_grid_ints_fit_float32_exactly():
    """The float32 scaling loop is exact only for |q| < 2^24: the finest grid allowed keeps
    every stored value's index below it."""
    assert MAX_GRID_INT < 1 << 24
    assert MAX_GRID_INT * grid_step(MIN_ERROR_BOUND) >= MAX_ABS
