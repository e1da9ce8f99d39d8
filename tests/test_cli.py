"""The `kdcache` CLI: flags mirror the config dataclasses, a YAML file is overridden by
flags, and bad input ends in one clear line (exit 2), not a traceback."""

from __future__ import annotations

import dataclasses

from typer.testing import CliRunner

import kdcache.cli as cli
from kdcache.train.config import TrainConfig

runner = CliRunner()


def test_help_lists_every_command():
    out = runner.invoke(cli.app, ["--help"]).output
    for cmd in ("precompute", "rollout", "train", "eval", "inspect", "demo", "plot", "store"):
        assert cmd in out


def test_train_flags_mirror_the_dataclass():
    out = runner.invoke(cli.app, ["train", "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"}).output
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in out, f.name


def test_config_file_then_flags(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "_train", lambda cfg: seen.setdefault("cfg", cfg))
    # a fresh list, restored after the test: the re-registered command must not leak into others
    monkeypatch.setattr(cli.app, "registered_commands", [c for c in cli.app.registered_commands if c.name != "train"])
    cli.config_command("train", TrainConfig, lambda cfg: cli._train(cfg), "train")
    f = tmp_path / "c.yaml"
    f.write_text("model: m\nstore: s\nobjective: dckd\nlr: 0.5\nlora_targets: [q_proj]\n")
    res = runner.invoke(cli.app, ["train", "-c", str(f), "--lr", "0.1", "--no-grad-checkpointing",
                                  "--lora-targets", "q_proj,v_proj"])
    assert res.exit_code == 0, res.output
    cfg = seen["cfg"]
    assert (cfg.objective, cfg.lr, cfg.grad_checkpointing) == ("dckd", 0.1, False)
    assert cfg.lora_targets == ["q_proj", "v_proj"]


def test_bad_input_is_one_line(tmp_path):
    res = runner.invoke(cli.app, ["train", "--model", str(tmp_path / "nope"), "--store",
                                  str(tmp_path / "nostore"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "error:" in res.output and "Traceback" not in res.output


def test_unknown_yaml_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("learning_rate: 1\n")
    res = runner.invoke(cli.app, ["train", "-c", str(f)])
    assert res.exit_code != 0 and "unknown keys" in res.output


def _tiny_store(url):
    import numpy as np

    from kdcache.store import StoreMeta, StoreWriter

    meta = StoreMeta(k=2, betas=[1.0], fields=["topk_ids", "topk_logprobs"], options={"codec": "lossless"})
    with StoreWriter(url, meta) as w:
        for e in range(3):
            w.add_group([{"example_id": f"e{e}", "role": "chosen", "group": 0,
                          "prompt_ids": np.array([4, 5], np.int32), "response_ids": np.array([7, 2], np.int32),
                          "is_terminal": True, "topk_ids": np.array([[7, 8], [2, 9]], np.int32),
                          "topk_logprobs": np.log(np.array([[0.6, 0.3], [0.9, 0.05]], np.float32))}])


def test_inspect_verify_gc(tmp_path):
    url = str(tmp_path / "s")
    _tiny_store(url)
    out = runner.invoke(cli.app, ["inspect", url]).output
    assert "bytes/token per field" in out and "mean top-K mass  0.9250" in out and "chosen=3" in out
    assert runner.invoke(cli.app, ["store", "verify", url]).output.strip() == "ok"
    stray = tmp_path / "s" / "shards" / "orphan"
    stray.mkdir(parents=True)
    (stray / "x.bin").write_bytes(b"0" * 10)
    res = runner.invoke(cli.app, ["store", "gc", str(tmp_path), "--dry-run"])
    assert res.exit_code == 0 and '"dry_run": true' in res.output
    assert stray.exists()  # a dry run removes nothing
    res = runner.invoke(cli.app, ["inspect", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "error:" in res.output
