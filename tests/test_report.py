"""`train --report-to` / `eval --report-to` (issue 21 §3): W&B in offline mode and TensorBoard
get metrics.jsonl's rows, the resolved config and the store's key and provenance; eval adds
its results to the same run; a missing package is one line naming what to install. W&B runs
offline against an unreachable base URL: nothing can leave the machine."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import kdcache.cli as cli
from kdcache.store import open_store
from kdcache.train.config import TrainConfig
from kdcache.train.report import parse_report_to

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from kdcache.train.tasks import make_demo_data
    from kdcache.train.tiny import build_tokenizer, save_tiny

    d = tmp_path_factory.mktemp("report")
    tok = build_tokenizer()
    teacher = str(save_tiny(d / "teacher", tok, hidden=32, layers=1, heads=2, seed=1))
    data = make_demo_data(d / "data", n_sft=4, n_pref=6, n_rollout_prompts=4, n_eval=4)
    pre = runner.invoke(cli.app, ["precompute", "--teacher", teacher, "--reference", teacher,
                                  "--data", str(data["pref"]), "--k", "4", "--out-root",
                                  str(d / "stores"), "--no-progress"])
    assert pre.exit_code == 0, pre.output
    return {"dir": d, "store": pre.stdout.strip(),
            "student": str(save_tiny(d / "student", tok, hidden=16, layers=1, heads=2, seed=2))}


@pytest.fixture
def offline(tmp_path, monkeypatch):
    wdir = tmp_path / "wandb-dir"
    wdir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wdir))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # unreachable: nothing leaves
    monkeypatch.setenv("WANDB_API_KEY", "")
    monkeypatch.setenv("WANDB_SILENT", "true")
    return wdir


def _wandb_records(path: Path) -> list:
    """The records of an offline .wandb file: a 7-byte W&B header, then LevelDB-log blocks
    of 32 KiB (7-byte chunk headers: crc, length, type FULL/FIRST/MIDDLE/LAST) holding
    protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def _runs(wdir: Path) -> list[dict]:
    """Each offline run: its id, config sections and history rows."""
    import wandb

    wandb.teardown()  # the W&B service flushes run files when it stops (a CLI process's exit)
    runs = []
    for f in sorted(wdir.glob("wandb/offline-run-*/run-*.wandb")):
        run = {"dir": f.parent, "config": {}, "history": []}
        for r in _wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run["id"], run["name"] = r.run.run_id, r.run.display_name
                run["config"].update({u.key: json.loads(u.value_json) for u in r.run.config.update})
            elif kind == "config":
                run["config"].update({u.key: json.loads(u.value_json) for u in r.config.update})
            elif kind == "history":
                run["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                       for i in r.history.item})
        runs.append(run)
    return runs


def _train(tiny, out: Path, *extra: str):
    return runner.invoke(cli.app, ["train", "--model", tiny["student"], "--store", tiny["store"],
                                   "--objective", "dckd", "--max-steps", "3", "--batch-groups",
                                   "2", "--log-every", "1", "--out", str(out), "--no-progress",
                                   *extra])


def test_parse_report_to():
    assert parse_report_to("none") == [] and parse_report_to(["none"]) == []
    assert parse_report_to("wandb, tensorboard,wandb") == ["wandb", "tensorboard"]
    with pytest.raises(ValueError, match="--report-to 'mlflow': use none, tensorboard, wandb"):
        parse_report_to("tensorboard,mlflow")
    with pytest.raises(ValueError, match="'none' cannot be combined"):
        parse_report_to("none,wandb")
    assert TrainConfig().report_to == ["none"]  # default: metrics.jsonl only, as before


def test_a_missing_package_says_what_to_install(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    res = _train(tiny, tmp_path / "run", "--report-to", "wandb")
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "pip install wandb" in lines[0] and "kdcache[wandb]" in lines[0]
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_wandb_offline_holds_metrics_config_and_store_provenance(tiny, tmp_path, offline):
    run_dir = tmp_path / "runs" / "dckd"
    res = _train(tiny, run_dir, "--report-to", "wandb,tensorboard", "--run-name", "my-dckd")
    assert res.exit_code == 0, res.output
    assert res.stdout == str(run_dir / "model") + "\n"  # W&B's lines went to stderr
    (run,) = _runs(offline)
    assert run["name"] == "my-dckd" and run["dir"].name.startswith("offline-run-")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["train/step"] for h in run["history"]] == [r["step"] for r in rows] == [1, 2, 3]
    for h, r in zip(run["history"], rows, strict=True):
        for k, v in r.items():
            if k != "step":
                assert h[f"train/{k}"] == pytest.approx(v, rel=1e-12), k
    # the resolved config and where the signals came from
    store = open_store(tiny["store"])
    cfg, prov = run["config"]["train"], run["config"]["store"]
    assert cfg["objective"] == "dckd" and cfg["max_steps"] == 3 and cfg["report_to"] == ["wandb", "tensorboard"]
    assert prov["key"] == store.manifest["store_key"] and prov["checksum"] == store.manifest["checksum"]
    meta = store.meta.to_dict()
    assert prov["meta"] == json.loads(json.dumps(meta))
    assert prov["meta"]["models"]["dpo"] and prov["meta"]["models"]["ref"]  # teacher, reference
    assert prov["meta"]["dataset"] and prov["meta"]["options"] and prov["meta"]["code_version"]
    # TensorBoard got the same rows
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([r["loss"] for r in rows])
    texts = {t.split("/")[0]: acc.Tensors(t)[0].tensor_proto.string_val[0].decode()
             for t in acc.Tags()["tensors"]}
    assert store.manifest["store_key"] in texts["store"] and '"objective": "dckd"' in texts["train"]
    state = json.loads((run_dir / "report.json").read_text())
    assert state["wandb"]["id"] == run["id"]

    # eval of runs/x/model adds its results to the same W&B run (and TensorBoard), at step 3
    ev = runner.invoke(cli.app, ["eval", "--model", str(run_dir / "model"), "--store", tiny["store"]])
    assert ev.exit_code == 0, ev.output
    result = json.loads(ev.stdout)
    runs = _runs(offline)
    (ev_run,) = [r for r in runs if "eval" in r["config"]]  # not by order: see below
    assert len(runs) == 2 and ev_run["id"] == run["id"]
    (h,) = ev_run["history"]
    assert h["train/step"] == 3 and h["eval/reward_accuracy"] == result["reward_accuracy"]
    assert h["eval/kl_topk"] == pytest.approx(result["kl_topk"])
    assert ev_run["config"]["eval"]["max_groups"] == 0
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval/kl_topk")] == [3]
    # eval --report-to none: nothing more is logged
    ev = runner.invoke(cli.app, ["eval", "--model", str(run_dir / "model"), "--store",
                                 tiny["store"], "--report-to", "none"])
    assert ev.exit_code == 0, ev.output
    assert len(_runs(offline)) == 2


def test_a_resumed_run_logs_to_the_same_wandb_run(tiny, tmp_path, offline):
    from kdcache.train.trainer import train

    cfg = TrainConfig(model=tiny["student"], store=tiny["store"], objective="dckd", max_steps=3,
                      batch_groups=2, log_every=1, out=str(tmp_path / "run"), progress=False,
                      report_to=["wandb"])
    train(cfg, stop_after=2)
    train(cfg)
    # run directories are named by their start second and id: two runs started within one
    # second sort by id, so nothing below depends on their order
    runs = _runs(offline)
    assert len(runs) == 2 and runs[0]["id"] == runs[1]["id"]
    assert sorted([h["train/step"] for h in r["history"]] for r in runs) == [[1, 2], [3]]
    # started over in the same --out: a new W&B run, not the old one continued
    train(TrainConfig(**{**cfg.to_dict(), "resume": False, "max_steps": 1}))
    new = [r for r in _runs(offline) if r["id"] != runs[0]["id"]]
    assert len(new) == 1 and [h["train/step"] for h in new[0]["history"]] == [1]
    assert json.loads((tmp_path / "run" / "report.json").read_text())["wandb"]["id"] == new[0]["id"]


def test_default_reports_nowhere(tiny, tmp_path, offline):
    res = _train(tiny, tmp_path / "run")
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "run" / "report.json").exists() and not (tmp_path / "run" / "tb").exists()
    assert not list(offline.iterdir()) and not (tmp_path / "run" / "wandb").exists()
