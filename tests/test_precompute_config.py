"""A precompute or rollout config is checked once, where a run enters, and then only read
(issue 20): `validated()` returns a frozen, normalised copy; the code below the entry reads
that copy and its slices and never checks it again."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from kdcache.precompute import PrecomputeConfig, RolloutConfig, run_precompute, run_rollout
from kdcache.precompute import config as config_mod
from kdcache.precompute import run as run_mod
from kdcache.precompute.config import CheckedPrecomputeConfig, CheckedRolloutConfig
from kdcache.precompute.partitions import partition_plan
from kdcache.rewards import resolve_reward
from kdcache.store import open_store
from kdcache.train.tiny import save_tiny

ROWS = [{"id": f"e{i}", "prompt": f"sort {i % 10} 1 2", "chosen": "1 2 " + "3 " * (i % 4),
         "rejected": "3 2 1 " + "a " * (i % 5)} for i in range(6)]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cfg")
    save_tiny(d / "dpo", seed=1)
    (d / "prefs.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    return d


@pytest.fixture
def checks(monkeypatch) -> list[str]:
    """Counts the configs really checked: every check ends with the codec's."""
    seen: list[str] = []
    real = config_mod.check_codec

    def counting(*a, **kw):
        seen.append("checked")
        return real(*a, **kw)

    monkeypatch.setattr(config_mod, "check_codec", counting)
    return seen


def test_validated_is_a_frozen_normalised_copy():
    cfg = PrecomputeConfig(teacher="t", reference="r", data="d", betas="1, 0.5", partition="1/2",
                           fields="topk_ids,topk_logprobs,ref_token_logprob")
    checked = cfg.validated()
    assert isinstance(checked, CheckedPrecomputeConfig) and not isinstance(cfg, CheckedPrecomputeConfig)
    assert checked.betas == (1.0, 0.5) and checked.partition == (1, 2)
    assert checked.fields == ("topk_ids", "topk_logprobs", "ref_token_logprob")
    assert (cfg.betas, cfg.partition) == ("1, 0.5", "1/2")  # the given config is untouched
    assert checked.validated() is checked  # checked once: a checked config is not checked again
    for c in (cfg, checked):
        with pytest.raises(dataclasses.FrozenInstanceError):
            c.k = 3
    # what the code below the entry derives from a checked config stays checked
    part = dataclasses.replace(checked, partition=(0, 2))
    assert isinstance(part, CheckedPrecomputeConfig) and part.partition == (0, 2)
    dev = PrecomputeConfig(teacher="t", data="d", devices="cpu,cpu").validated()
    assert dev.devices == ("cpu", "cpu")
    ref_alone = PrecomputeConfig(reference="r", data="d").validated()
    assert ref_alone.fields == ("ref_token_logprob",)


def test_validated_names_the_flag():
    with pytest.raises(ValueError, match="--betas"):
        PrecomputeConfig(teacher="t", data="d", betas="1,-1").validated()
    with pytest.raises(ValueError, match="--partition"):
        PrecomputeConfig(teacher="t", data="d", partition="2/2").validated()
    with pytest.raises(ValueError, match="--n must be"):
        RolloutConfig(model="m", data="d", n=0).validated()


def test_prepare_reads_a_checked_config_only(work):
    with pytest.raises(TypeError, match="validated"):
        run_mod.prepare(PrecomputeConfig(teacher=str(work / "dpo"), data=str(work / "prefs.jsonl")))


def test_slices_say_what_each_component_reads():
    cfg = PrecomputeConfig(teacher="t", data="d", k=7, betas=[2.0], chunk_size=5, packed=True,
                           batch_tokens=99, max_batch_seqs=3, bucket_window=11, dtype="fp32",
                           attn_implementation="sdpa").validated()
    # the partition plan is written into a part's key: same keys, same order as ever
    assert list(partition_plan(cfg).items()) == [
        ("batch_tokens", 99), ("packed", True), ("max_batch_seqs", 3), ("bucket_window", 11)]
    assert cfg.score_settings == config_mod.ScoreSettings(k=7, betas=(2.0,), chunk_size=5,
                                                          ref_mode="exact", packed=True)
    models = cfg.model_settings
    assert (models.teacher, models.dtype, models.attn_implementation) == ("t", "fp32", "sdpa")
    assert models.tokenizer_source == "t"
    assert PrecomputeConfig(reference="r", data="d").model_settings.tokenizer_source == "r"
    inputs = PrecomputeConfig(teacher="t", input_store="s1,s2", limit=3).inputs
    assert (inputs.data, inputs.input_store, inputs.limit) == (None, "s1,s2", 3)
    ro = RolloutConfig(model="m", data="d", n=3, temperature=0.5, seed=4)
    # the rollout store's `sampling` option: same keys, same order as ever
    assert list(dataclasses.asdict(ro.sampling)) == ["temperature", "top_p", "top_k",
                                                     "max_new_tokens", "seed", "n", "backend"]
    assert (ro.sampling.n, ro.sampling.seed, ro.sampler_settings.model) == (3, 4, "m")


def test_rollout_validated_resolves_the_reward():
    cfg = RolloutConfig(model="m", data="d", reward="sort_rule")
    checked = cfg.validated()
    assert isinstance(checked, CheckedRolloutConfig) and cfg.reward == "sort_rule"
    assert checked.reward is resolve_reward("sort_rule")
    assert checked.validated() is checked
    with pytest.raises(ValueError, match="reward"):
        RolloutConfig(model="m", data="d", reward="no_such_module_xyz:f").validated()


def test_a_run_checks_its_config_once(work, checks):
    base = dict(teacher=str(work / "dpo"), data=str(work / "prefs.jsonl"), k=4, batch_tokens=64,
                out_root=str(work / "stores"), progress=False, codec="lossless")
    url = run_precompute(PrecomputeConfig(**base))
    assert checks == ["checked"]
    for i in range(2):  # partitions, then the merge: one check per entry
        run_precompute(PrecomputeConfig(**base, partition=f"{i}/2", keep_parts=True))
    merged = run_precompute(PrecomputeConfig(**base, merge_parts=2))
    assert len(checks) == 4
    assert open_store(merged).manifest["checksum"] == open_store(url).manifest["checksum"]
    checks.clear()
    run_rollout(RolloutConfig(model=str(work / "dpo"), data=str(work / "prefs.jsonl"), n=1,
                              max_new_tokens=3, out_root=str(work / "stores"), progress=False))
    assert checks == ["checked"]
