"""Compact (bounded-error) and lossless codecs: exactness of ids, error bound of values."""

from __future__ import annotations

import numpy as np
import pytest
from test_store_util import ALL_FIELDS, make_groups, make_meta, write_store

from kdcache.store import SCHEMA_VERSION, StoreWriter, open_store, resolve_codec
from kdcache.store.codecs import (
    ADV_ARRAY,
    MAX_ABS,
    MIN_ERROR_BOUND,
    grid_decode,
    grid_encode,
    grid_step,
    snap,
)

LAYOUTS = {
    "all": ALL_FIELDS,  # ref stored as the integer advantage next to topk_logprobs
    "ref_alone": [f for f in ALL_FIELDS if f != "topk_logprobs"],  # ref quantised itself
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("bound", [1e-4, 1e-3, 2e-3, 1e-2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compact_error_bound_and_exact_ids(tmp_path, bound, dtype, layout):
    meta = make_meta(codec="compact", error_bound=bound, fields=LAYOUTS[layout])
    groups = make_groups(12, meta, seed=21, dtype=dtype)
    # push values to the edges of the accepted range (the advantage then spans ±2·MAX_ABS)
    r0 = next(r for g in groups for r in g if len(r["response_ids"]) >= 2)
    r0["token_logprob"][:] = -MAX_ABS
    r0["ref_topk_logprobs"][0] = -MAX_ABS
    r0["ref_topk_logprobs"][1] = MAX_ABS
    if "topk_logprobs" in r0:
        r0["topk_logprobs"][0] = MAX_ABS
        r0["topk_logprobs"][1] = -MAX_ABS
    r0["soft_value"][0] = [MAX_ABS, -MAX_ABS]
    write_store(str(tmp_path / "s"), meta, groups, shard_records=5)
    st = open_store(str(tmp_path / "s"))
    assert st.schema_version == SCHEMA_VERSION
    for a, b in zip([r for g in groups for r in g], st, strict=True):
        assert np.array_equal(a["topk_ids"], b["topk_ids"])
        assert np.array_equal(a["response_ids"], b["response_ids"])
        for f in meta.fields[1:]:
            assert b[f].dtype == np.float32
            if a[f].size:
                err = np.abs(a[f].astype(np.float64) - b[f].astype(np.float64)).max()
                assert err <= bound, (f, err, bound)
                # on the grid: ref rebuilt from integers equals quantising ref itself
                step = resolve_codec(meta.options).step
                snapped = np.float32(np.rint(a[f].astype(np.float64) / step) * step)
                assert np.array_equal(b[f], snapped), f


@pytest.mark.parametrize("bound", [1e-4, 2e-3, 3.2e-2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("sign, delta, zigzag", [(1, False, True), (-1, True, False),
                                                 (-1, False, False), (1, True, True)])
def test_gridq_round_trip_and_bound(bound, dtype, sign, delta, zigzag):
    """The grid codec alone: decode(encode(x)) == snap(x), |snap(x) − x| ≤ ε, idempotent."""
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.uniform(-MAX_ABS, MAX_ABS, 4000),
                        [MAX_ABS, -MAX_ABS, 0.0, -0.0, 1e-30, -MAX_ABS + 1e-3]])
    step = grid_step(bound)
    half = (np.arange(-200, 200) + 0.5) * step  # rounding ties
    x = np.concatenate([x, half, np.nextafter(half, 0), np.nextafter(half, 1e9)])
    x = x[np.abs(x) <= MAX_ABS].astype(dtype)
    x = x[: len(x) // 8 * 8].reshape(-1, 8)
    codes = grid_encode(x, step, sign, delta, zigzag)
    assert codes.dtype == np.int32
    if not zigzag and sign < 0 and not delta:
        assert (codes[x <= 0] >= 0).all()
    got = grid_decode(codes, step, sign, delta, zigzag)
    assert got.dtype == np.float32 and np.array_equal(got, snap(x, step))
    assert np.abs(got.astype(np.float64) - x.astype(np.float64)).max() <= bound
    assert np.array_equal(grid_encode(got, step, sign, delta, zigzag), codes)


def test_grid_step_is_float32_and_safe():
    for eps in np.geomspace(MIN_ERROR_BOUND, 1.0, 200):
        s = grid_step(float(eps))
        assert float(np.float32(s)) == s and s > 0
        assert s / 2 + float(np.spacing(np.float32(MAX_ABS))) / 2 < eps


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
@pytest.mark.parametrize("version", [2, 3, SCHEMA_VERSION])
def test_plain_zarr_reads_shard_without_kdcache(tmp_path, codec, version):
    """The pipeline is fully declared in zarr.json: plain zarr decodes it, and our fast
    decoder gives exactly what zarr gives (including fill-value chunks zarr skips)."""
    import zarr

    from kdcache.store.fastdecode import decode_array

    meta = make_meta(codec=codec)
    groups = make_groups(6, meta, seed=5)
    groups[2][0]["token_logprob"][:] = 0.0  # an all-fill-value stretch
    from kdcache.store import writer as writer_mod

    writer_mod.CHUNK_ROWS, old = 5, writer_mod.CHUNK_ROWS  # many chunks, some all zero
    try:
        with StoreWriter(str(tmp_path / "s"), meta, shard_records=100,
                         _schema_version=version) as w:
            for g in groups:
                w.add_group(g)
    finally:
        writer_mod.CHUNK_ROWS = old
    st = open_store(str(tmp_path / "s"))
    assert st.schema_version == version
    from kdcache.store.codecs import quiet_numcodecs

    path = tmp_path / "s" / "shards" / "shard-00000" / "tokens.zarr"
    files = {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    with quiet_numcodecs():
        z = zarr.open_group(str(path), mode="r")
        sh = st.load_shard(0)
        names = sorted(name for name, _ in z.arrays())
        adv = codec == "compact" and version >= 3
        assert (ADV_ARRAY in names) == adv and ("ref_topk_logprobs" in names) != adv
        for name in names:
            assert np.array_equal(z[name][...], decode_array(files, name)), name
        for f in ALL_FIELDS:
            if f == "ref_topk_logprobs" and adv:  # ref = topk − adv (float32: within an ulp)
                assert z[ADV_ARRAY].attrs["kdcache"]["base"] == "topk_logprobs"
                plain = z["topk_logprobs"][...].astype(np.float64) - z[ADV_ARRAY][...]
                assert np.abs(plain - sh.tokens[f]).max() < 1e-4
            else:
                assert np.array_equal(z[f][...], sh.tokens[f]), f


@pytest.mark.parametrize("codec", ["compact", "lossless"])
def test_schema_v2_store_read_by_new_reader(tmp_path, codec):
    """A store written with the v2 pipelines (float64 grid, fixedscaleoffset + delta) is
    read with v2's guarantees: bit-exact lossless, ≤ ε compact; appending v3 is refused."""
    meta = make_meta(codec=codec)
    groups = make_groups(10, meta, seed=9, dtype=np.float64)
    url = str(tmp_path / "v2")
    with StoreWriter(url, meta, shard_records=6, _schema_version=2) as w:
        for g in groups:
            w.add_group(g)
    st = open_store(url)
    assert st.schema_version == 2
    files = st.shards[0]["files"]
    assert not any(ADV_ARRAY in f for f in files)
    spec = resolve_codec(meta.options, version=2)
    for a, b in zip([r for g in groups for r in g], st, strict=True):
        assert np.array_equal(a["topk_ids"], b["topk_ids"])
        for f in ALL_FIELDS[1:]:
            want = spec.snap(a[f]) if codec == "compact" else a[f].astype(np.float32)
            assert np.array_equal(b[f], want), f
    with pytest.raises(ValueError, match="will not mix versions"):
        StoreWriter(url, meta)


def test_threaded_decode_equals_serial(tmp_path):
    from kdcache.store.reader import decode_shard

    meta = make_meta(codec="compact")
    write_store(str(tmp_path / "s"), meta, make_groups(9, meta, seed=4), shard_records=50)
    st = open_store(str(tmp_path / "s"))
    raw = st.fetch_shard(0)
    for fields in (ALL_FIELDS, ["ref_topk_logprobs"], ["token_logprob", "ref_topk_logprobs"]):
        a = decode_shard("x", raw, fields, threads=True)
        b = decode_shard("x", raw, fields, threads=False)
        assert list(a.tokens) == list(fields)
        for f in fields:
            assert np.array_equal(a.tokens[f], b.tokens[f])
    # asking only for ref fetches the advantage and its base array, nothing else
    rels = st.shard_files(0, ["ref_topk_logprobs"])
    assert {r.split("/")[1] for r in rels if r.count("/") > 1} == {ADV_ARRAY, "topk_logprobs"}
