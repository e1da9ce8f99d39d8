"""Compact (bounded-error) and lossless codecs: exactness of ids, error bound of values."""

from __future__ import annotations

import numpy as np
import pytest
from test_store_util import ALL_FIELDS, make_groups, make_meta, write_store

from kdcache.store import StoreWriter, open_store, resolve_codec
from kdcache.store.codecs import MAX_ABS


@pytest.mark.parametrize("bound", [1e-4, 1e-3, 2e-3, 1e-2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compact_error_bound_and_exact_ids(tmp_path, bound, dtype):
    meta = make_meta(codec="compact", error_bound=bound)
    groups = make_groups(12, meta, seed=21, dtype=dtype)
    # push some values to the edges of the accepted range
    groups[0][0]["token_logprob"][:] = -MAX_ABS if len(groups[0][0]["token_logprob"]) else 0
    write_store(str(tmp_path / "s"), meta, groups, shard_records=5)
    st = open_store(str(tmp_path / "s"))
    for a, b in zip([r for g in groups for r in g], st, strict=True):
        assert np.array_equal(a["topk_ids"], b["topk_ids"])
        assert np.array_equal(a["response_ids"], b["response_ids"])
        for f in ALL_FIELDS[1:]:
            assert b[f].dtype == np.float32
            if a[f].size:
                err = np.abs(a[f].astype(np.float64) - b[f].astype(np.float64)).max()
                assert err <= bound, (f, err, bound)


def test_compact_is_default_and_smaller_than_lossless(tmp_path):
    meta_c = make_meta(codec="compact")
    meta_c.options = {}
    assert resolve_codec(meta_c.options).mode == "compact"
    meta_l = make_meta(codec="lossless")
    groups = make_groups(40, meta_l, seed=22, max_t=40)
    write_store(str(tmp_path / "c"), meta_c, groups, shard_records=100)
    write_store(str(tmp_path / "l"), meta_l, groups, shard_records=100)
    size = {k: open_store(str(tmp_path / k)).manifest["totals"]["n_bytes"] for k in "cl"}
    assert size["c"] < 0.8 * size["l"]


def test_compact_refuses_non_finite(tmp_path):
    meta = make_meta(codec="compact")
    g = make_groups(1, meta, seed=3, max_t=6)[0]
    r = next(r for r in g if len(r["response_ids"]))
    r["topk_logprobs"][0, -1] = -np.inf
    w = StoreWriter(str(tmp_path / "s"), meta)
    with pytest.raises(ValueError, match="codec='lossless'"):
        w.add_group([r])
    # lossless keeps -inf exactly
    meta_l = make_meta(codec="lossless")
    write_store(str(tmp_path / "l"), meta_l, [[r]])
    assert open_store(str(tmp_path / "l"))[0]["topk_logprobs"][0, -1] == -np.inf


@pytest.mark.parametrize("opts, pattern", [
    ({"codec": "zip"}, "not a codec"),
    ({"codec": "compact", "error_bound": 1e-6}, "below the supported minimum"),
    ({"codec": "lossless", "error_bound": 1e-3}, "non-zero error_bound"),
])
def test_codec_option_errors(opts, pattern):
    with pytest.raises(ValueError, match=pattern):
        resolve_codec(opts)


@pytest.mark.parametrize("codec", ["compact", "lossless"])
def test_plain_zarr_reads_shard_without_kdcache(tmp_path, codec):
    """The pipeline is fully declared in zarr.json: plain zarr decodes it, and our fast
    decoder gives exactly what zarr gives (including fill-value chunks zarr skips)."""
    import zarr

    meta = make_meta(codec=codec)
    groups = make_groups(6, meta, seed=5)
    groups[2][0]["token_logprob"][:] = 0.0  # an all-fill-value stretch
    from kdcache.store import writer as writer_mod

    writer_mod.CHUNK_ROWS, old = 5, writer_mod.CHUNK_ROWS  # many chunks, some all zero
    try:
        write_store(str(tmp_path / "s"), meta, groups, shard_records=100)
    finally:
        writer_mod.CHUNK_ROWS = old
    st = open_store(str(tmp_path / "s"))
    from kdcache.store.codecs import quiet_numcodecs

    with quiet_numcodecs():
        z = zarr.open_group(str(tmp_path / "s" / "shards" / "shard-00000" / "tokens.zarr"), mode="r")
        sh = st.load_shard(0)
        for f in ALL_FIELDS:
            assert np.array_equal(z[f][...], sh.tokens[f])
