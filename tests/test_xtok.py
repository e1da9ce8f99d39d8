"""A student with another tokenizer (METHODS §5): vocabulary map and alignment on hand-made
tokenizers, the store's tokenizer files and text, the identity check (cross-tokenizer KD ==
same-tokenizer tail-mode KD exactly, value and gradient), and end-to-end training."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from kdcache.precompute import PrecomputeConfig, run_precompute
from kdcache.store import open_store
from kdcache.train.batch import collate
from kdcache.train.config import TrainConfig
from kdcache.train.objectives import OBJECTIVE_SPECS, select_records
from kdcache.train.student import student_forward
from kdcache.train.tiny import build_split_tokenizer, build_tokenizer, save_tiny
from kdcache.train.trainer import train
from kdcache.train.xtok.align import align_spans, encode_with_offsets
from kdcache.train.xtok.setup import store_tokenizer
from kdcache.train.xtok.translate import FLOOR, CrossTokenizer
from kdcache.train.xtok.vocab_map import UNMAPPED, build_map, load_or_build_map, token_bytes

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def _fast(tok: Tokenizer, template: str | None = None, extra: list[str] | None = None):
    f = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                pad_token="<pad>", unk_token="<unk>",
                                additional_special_tokens=extra or [])
    if template:
        f.chat_template = template
    return f


def _byte_level(merges: list[tuple[str, str]]):
    """GPT-2 style byte-level BPE over a tiny alphabet with the given merges."""
    from kdcache.train.xtok.vocab_map import _byte_decoder

    alphabet = sorted(_byte_decoder())  # all 256 byte characters
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for c in alphabet + [a + b for a, b in merges]:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return _fast(tok)


def _sentencepiece(pieces: list[str], merges: list[tuple[str, str]]):
    """Llama-2 style: Metaspace, BPE with byte fallback (<0xNN> tokens)."""
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for p in [f"<0x{b:02X}>" for b in range(256)] + pieces + [a + b for a, b in merges]:
        vocab.setdefault(p, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return _fast(tok)


# ------------------------------------------------------------------ byte strings and map

def test_token_bytes_by_tokenizer_kind():
    bl = _byte_level([("Ġ", "a")])
    b = token_bytes(bl)
    assert b[bl.convert_tokens_to_ids("Ġa")] == b" a"
    assert b[bl.convert_tokens_to_ids("Ã")] == bytes([0xC3])  # half of a UTF-8 character
    sp = _sentencepiece(["▁", "a", "b"], [("▁", "a")])
    b = token_bytes(sp)
    assert b[sp.convert_tokens_to_ids("▁a")] == b" a"
    assert b[sp.convert_tokens_to_ids("<0x41>")] == b"A"
    assert b[sp.eos_token_id] == b"</s>"
    wl = build_tokenizer()
    assert token_bytes(wl)[wl.convert_tokens_to_ids("sort")] == b"sort"


def test_identical_tokenizers_map_is_the_identity():
    for tok in (build_tokenizer(), build_split_tokenizer(), _byte_level([("Ġ", "a")])):
        m = build_map(tok, tok)
        assert torch.equal(m, torch.arange(len(m)))


def test_map_between_different_merges_and_byte_fallback():
    teacher = _byte_level([("Ġ", "a"), ("a", "b")])
    student = _sentencepiece(["▁", "a", "b", "c"], [("▁", "a"), ("a", "b")])
    m = build_map(teacher, student)
    t, s = teacher.convert_tokens_to_ids, student.convert_tokens_to_ids
    assert m[t("Ġa")] == s("▁a")  # " a" both ways
    assert m[t("ab")] == s("ab")
    # the student spells "a" as a regular piece and as <0x61>: the regular one wins
    assert m[t("a")] == s("a")
    # a byte only the fallback spells maps to the fallback token
    assert m[t("Z")] == s("<0x5A>")
    assert m[t("Ġ")] == s("▁")
    assert m[teacher.eos_token_id] == student.eos_token_id


def test_map_unmapped_and_ambiguous_ids():
    teacher, student = build_tokenizer(), build_split_tokenizer()
    m = build_map(teacher, student)
    assert m[teacher.convert_tokens_to_ids("sort")] == UNMAPPED  # the student spells it s o r t
    assert m[teacher.convert_tokens_to_ids("7")] == student.convert_tokens_to_ids("7")
    # two student ids with one byte string and neither a byte-fallback: no unique id
    vocab = {t: i for i, t in enumerate(SPECIALS)} | {"x": 4, "y": 5}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.add_tokens(["x"])  # an added token "x" beside the vocabulary's "x"
    dup = _fast(tok)
    assert build_map(build_tokenizer(words=["x"]), dup)[6] in (UNMAPPED, 4)


def test_added_special_tokens_map_by_content():
    teacher = build_tokenizer()
    student = build_split_tokenizer()
    m = build_map(teacher, student)
    for name in ("<|user|>", "<|assistant|>", "<pad>"):
        assert m[teacher.convert_tokens_to_ids(name)] == student.convert_tokens_to_ids(name)


def test_map_cache_is_keyed_and_rebuilt_when_wrong(tmp_path):
    t, s = build_tokenizer(), build_split_tokenizer()
    a = load_or_build_map(t, s, "t" * 64, "s" * 64, tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"
    assert torch.equal(load_or_build_map(t, s, "t" * 64, "s" * 64, tmp_path), a)
    files[0].write_bytes(b"garbage")
    assert torch.equal(load_or_build_map(t, s, "t" * 64, "s" * 64, tmp_path), a)


# ------------------------------------------------------------------ alignment

def test_alignment_identical_tokenizers_aligns_everything():
    tok = _byte_level([("Ġ", "a")])
    _, spans = encode_with_offsets(tok, "a a b a")
    assert (align_spans(spans, spans) == np.arange(len(spans))).all()


def test_alignment_different_merges():
    teacher, student = build_tokenizer(), build_split_tokenizer()
    text = "1 2 2 5 7"
    t_ids, t_spans = encode_with_offsets(teacher, text)
    s_ids, s_spans = encode_with_offsets(student, text)
    assert student.convert_ids_to_tokens(s_ids) == ["1 2", " 2", " ", "5", " ", "7"]
    assert align_spans(t_spans, s_spans).tolist() == [-1, -1, -1, 3, -1, 4]


def test_alignment_byte_split_character_is_ambiguous():
    # "é" is two bytes: a byte-level tokenizer without the merge gives two tokens over one
    # character span; they align nowhere (neither would carry the whole character)
    teacher = _byte_level([])
    student = _byte_level([("Ã", "©")])
    _, t_spans = encode_with_offsets(teacher, "é")
    _, s_spans = encode_with_offsets(student, "é")
    assert len(t_spans) == 2 and len(s_spans) == 1
    assert align_spans(t_spans, s_spans).tolist() == [-1]


# ------------------------------------------------------------------ stores written by precompute

ROWS = [{"id": f"e{i}", "prompt": f"sort : {i % 10} 1 2", "chosen": "1 2 " + f"{i % 10}",
         "rejected": f"{i % 10} 2 1 a"} for i in range(6)] + [
    {"id": "msg", "prompt": [{"role": "user", "content": "sort : 2 1"}], "chosen": "1 2 ",
     "rejected": "2 1"}]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("xtok")
    save_tiny(d / "teacher", build_tokenizer(), hidden=32, layers=1, heads=2, seed=1)
    save_tiny(d / "student", build_tokenizer(), hidden=32, layers=1, heads=2, seed=3)
    save_tiny(d / "split", build_split_tokenizer(), hidden=32, layers=1, heads=2, seed=3)
    (d / "prefs.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    url = run_precompute(PrecomputeConfig(
        teacher=str(d / "teacher"), reference=str(d / "teacher"), data=str(d / "prefs.jsonl"), k=5,
        betas=[1.0], out_root=str(d / "stores"), progress=False, codec="lossless"))
    return d, url


def test_store_carries_tokenizer_files_and_text(work):
    d, url = work
    store = open_store(url)
    files = store.tokenizer_files()
    assert files["tokenizer.json"] == (d / "teacher" / "tokenizer.json").read_bytes()
    assert set(store.meta.tokenizer["files"]) == set(files)
    recs = {(r["example_id"], r["role"]): r for r in store}
    src = recs[("e1", "chosen")]["prompt_source"]
    assert json.loads(src) == "sort : 1 1 2"
    assert json.loads(recs[("msg", "chosen")]["prompt_source"])[0]["content"] == "sort : 2 1"
    # "1 2 " decodes to "1 2": its text is kept; "1 2 1" decodes exactly: no text
    assert recs[("msg", "chosen")]["response_text"] == "1 2 "
    assert "response_text" not in recs[("e1", "chosen")]
    tok = store_tokenizer(store)
    assert tok.get_vocab() == build_tokenizer().get_vocab()


def test_damaged_tokenizer_file_is_refused(work, tmp_path):
    import shutil

    _, url = work
    copy = tmp_path / "copy"
    shutil.copytree(url, copy)
    (copy / "tokenizer" / "tokenizer.json").write_bytes(b"{}")
    with pytest.raises(ValueError, match="does not match its recorded size/sha256"):
        open_store(str(copy)).tokenizer_files()


def _batch(records, objective):
    recs, blocks = select_records(objective, [records])
    b = collate(recs, pad_id=0)
    b.block_ids = blocks
    return b


def test_identity_translation_and_exact_tail_kd(work):
    """Identical tokenizers: every position aligns, M is the identity, and the
    cross-tokenizer KD equals same-tokenizer tail-mode KD exactly (value and gradient)."""
    d, url = work
    store = open_store(url)
    tok = build_tokenizer()
    xt = CrossTokenizer(store_tokenizer(store), tok, build_map(tok, tok))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(d / "student"))
    cfg = TrainConfig(model="m", store="s", objective="dckd", kd_mode="tail",
                      cross_tokenizer="map")
    for group in store.groups():
        translated = [xt(r) for r in group]
        for r, x in zip(group, translated, strict=True):
            np.testing.assert_array_equal(r["prompt_ids"], x["prompt_ids"])
            np.testing.assert_array_equal(r["response_ids"], x["response_ids"])
            np.testing.assert_array_equal(r["topk_ids"], x["topk_ids"])
            np.testing.assert_array_equal(r["topk_logprobs"], x["topk_logprobs"])
            assert x["xtok_aligned"].all() and x["xtok_slots"].all()
        for objective in ("kd", "dckd"):
            cfg = dataclasses.replace(cfg, objective=objective)  # a config is frozen
            out = []
            for recs in (group, translated):
                model.zero_grad()
                b = _batch(recs, objective)
                loss, _ = OBJECTIVE_SPECS[objective].loss(student_forward(model, b, 3), b, cfg, 0)
                loss.backward()
                out.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
            assert torch.equal(out[0][0], out[1][0])
            assert all(torch.equal(a, b) for a, b in zip(out[0][1], out[1][1], strict=True))
    assert xt.stats.aligned_fraction == 1.0 and xt.stats.mapped_mass_fraction == pytest.approx(1.0)


def test_split_translation_slots_and_sums(work):
    _, url = work
    store = open_store(url)
    teacher, student = store_tokenizer(store), build_split_tokenizer()
    xt = CrossTokenizer(teacher, student, build_map(teacher, student))
    r = next(r for r in store if r["example_id"] == "e5" and r["role"] == "chosen")
    x = xt(r)
    # "1 2 5": student "1 2", " ", "5", </s>; "5" and </s> align with teacher positions 2, 3
    assert student.convert_ids_to_tokens(x["response_ids"].tolist()) == ["1 2", " ", "5", "</s>"]
    assert x["xtok_aligned"].tolist() == [False, False, True, True]
    assert student.decode(x["prompt_ids"]) == student.apply_chat_template(
        [{"role": "user", "content": "sort : 5 1 2"}], tokenize=False, add_generation_prompt=True)
    row = x["topk_ids"][2]
    for k, tid in enumerate(r["topk_ids"][2]):
        mapped = int(xt.vmap[tid])
        if mapped >= 0:
            assert x["xtok_slots"][2, k] and row[k] == mapped
            assert x["topk_logprobs"][2, k] == r["topk_logprobs"][2, k]
        else:
            assert not x["xtok_slots"][2, k] and x["topk_logprobs"][2, k] == FLOOR
    assert not x["xtok_slots"][:2].any()
    # a sequence's stored sums survive on the first position
    assert x["ref_token_logprob"][0] == pytest.approx(float(np.sum(r["ref_token_logprob"], dtype=np.float64)))
    assert (x["ref_token_logprob"][1:] == 0).all()


def test_duplicate_mapped_ids_are_one_slot():
    from kdcache.train.xtok.translate import _merge_duplicates

    mapped = np.array([[7, 3, 7, -1]])
    slots = mapped >= 0
    lp = np.log(np.array([[0.4, 0.2, 0.1, 0.05]], dtype=np.float32))
    _merge_duplicates(mapped, slots, lp, None)
    assert slots.tolist() == [[True, True, False, False]]
    assert np.exp(lp[0, 0]) == pytest.approx(0.5, rel=1e-6) and lp[0, 2] == FLOOR


# ------------------------------------------------------------------ the trainer

def _train_cfg(d, url, out, **kw):
    base = dict(model=str(d / "split"), store=url, out=str(out), objective="dckd", max_steps=2,
                batch_groups=2, lr=1e-3, chunk_size=4, progress=False, log_every=1, kd_mode="tail")
    return TrainConfig(**{**base, **kw})


def test_mismatch_without_the_option_names_it(work, tmp_path):
    d, url = work
    with pytest.raises(ValueError, match="--cross-tokenizer map"):
        train(_train_cfg(d, url, tmp_path / "r"))
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("objective,mode", [("dckd", "map"), ("kd", "uld"), ("dckd", "uld"),
                                            ("sft", "map"), ("dpo", "map")])
def test_cross_tokenizer_trains(work, tmp_path, monkeypatch, objective, mode):
    d, url = work
    monkeypatch.setenv("KDCACHE_CACHE", str(tmp_path / "cache"))
    res = train(_train_cfg(d, url, tmp_path / "r", objective=objective, cross_tokenizer=mode))
    assert res.steps == 2 and np.isfinite(res.final_loss)
    rows = [json.loads(x) for x in (Path(res.out) / "metrics.jsonl").read_text().splitlines()]
    assert 0 < rows[-1]["aligned_fraction"] < 1
    if mode == "map" and objective == "dckd":
        assert 0 < rows[-1]["mapped_topk_mass"] <= 1
        assert list((tmp_path / "cache" / "xtok").glob("map-*.safetensors"))


def test_tvkd_is_refused_across_tokenizers(work, tmp_path):
    d, url = work
    with pytest.raises(ValueError, match="tvkd reads the teacher's soft value"):
        train(_train_cfg(d, url, tmp_path / "r", objective="tvkd", cross_tokenizer="map",
                         tvkd_beta=1.0))


def test_old_store_says_what_to_rerun(work, tmp_path):
    import shutil

    d, url = work
    old = tmp_path / "old"
    shutil.copytree(url, old)
    m = json.loads((old / "manifest.json").read_text())
    m["meta"]["tokenizer"].pop("files")
    from kdcache.store._io import open_fs
    from kdcache.store.fingerprint import store_key
    from kdcache.store.writer import commit_manifest

    m["store_key"] = store_key(m["meta"], m["schema_version"])
    fs, root = open_fs(str(old))
    commit_manifest(fs, root, m)
    with pytest.raises(ValueError, match="re-run the same `kdcache precompute` command"):
        train(_train_cfg(d, str(old), tmp_path / "r", cross_tokenizer="map"))


def test_inspect_student_reports_both_numbers(work, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from kdcache.cli import app

    d, url = work
    monkeypatch.setenv("KDCACHE_CACHE", str(tmp_path / "cache"))
    res = CliRunner().invoke(app, ["inspect", url, "--student", str(d / "split"), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)["cross_tokenizer"]
    assert 0 < rep["aligned_fraction"] < 1 and 0 < rep["mapped_topk_mass"] <= 1
    res = CliRunner().invoke(app, ["inspect", url, "--student", str(d / "student")])
    assert res.exit_code == 0 and "aligned fraction of student tokens   100.0%" in res.stdout


def test_records_without_text_keep_the_old_columns(tmp_path):
    """A shard whose records carry no text has exactly the columns (and bytes) it had."""
    import pyarrow.parquet as pq

    from kdcache.store import StoreMeta, StoreWriter

    def rec(eid, **kw):
        return {"example_id": eid, "role": "sft", "prompt_ids": [1, 2], "response_ids": [3, 2],
                "is_terminal": True, **kw}

    meta = StoreMeta(k=0, fields=[], tokenizer={"vocab_size": 8})
    for name, extra in (("plain", {}), ("text", {"prompt_source": '"a"'})):
        with StoreWriter(str(tmp_path / name), meta, shard_records=4) as w:
            w.add_group([rec("e0", **extra)])
    plain = pq.read_schema(tmp_path / "plain" / "shards" / "shard-00000" / "records.parquet").names
    text = pq.read_schema(tmp_path / "text" / "shards" / "shard-00000" / "records.parquet").names
    assert "prompt_source" not in plain and "response_text" not in plain
    assert "prompt_source" in text and "response_text" not in text  # each column only when set
    assert "prompt_source" not in open_store(str(tmp_path / "plain"))[0]
    assert open_store(str(tmp_path / "text"))[0]["prompt_source"] == '"a"'
