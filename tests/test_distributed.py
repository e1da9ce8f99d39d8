"""Data-parallel training on 2 gloo processes (CPU): DDP equals one process accumulating
the same micro-batches, for every objective; ranks holding unequal numbers of groups run
the same steps; LoRA and FSDP2 under 2 ranks; resume (same world size: exact; another:
refused); a rank killed mid-run fails the job naming it, and --resume then finishes it
exactly as an uninterrupted run.

One 2-process job (tests/dist_worker.py) runs all in-process scenarios; the kill test
launches the CLI itself (srun-style env, then torchrun to resume)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kdcache.store import StoreMeta, StoreWriter, StreamReader, open_store
from kdcache.train import distributed as D
from kdcache.train.checkpoint import set_seed
from kdcache.train.config import OBJECTIVES, TrainConfig
from kdcache.train.data import group_stream, next_batches
from kdcache.train.objectives import objective_fields
from kdcache.train.optim import make_optimizer, make_scheduler
from kdcache.train.step import Precision, train_step
from kdcache.train.student import StudentForward, load_student
from kdcache.train.tiny import build_tokenizer, save_tiny
from kdcache.train.trainer import train

K, BETAS, WORLD = 3, [1.0, 2.0], 2
FIELDS = ["topk_ids", "topk_logprobs", "token_logprob", "ref_topk_logprobs",
          "ref_token_logprob", "soft_value", "behavior_logprob"]
WORKER = Path(__file__).with_name("dist_worker.py")


def _record(rng, eid, role, group, vocab, eos, reward=None):
    T = int(rng.integers(1, 5))
    resp = rng.integers(6, vocab, size=T).astype(np.int32)
    resp[-1] = eos
    logits = rng.normal(size=(T + 1, vocab))
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ref = lp[:T] + rng.normal(scale=0.3, size=(T, vocab))
    ref = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    ids = np.argsort(-lp[:T], axis=-1)[:, :K].astype(np.int32)
    return {
        "example_id": eid, "role": role, "group": group,
        "prompt_ids": rng.integers(6, vocab, size=int(rng.integers(2, 4))).astype(np.int32),
        "response_ids": resp, "teacher_prompt_ids": None, "is_terminal": True, "reward": reward,
        "topk_ids": ids, "topk_logprobs": np.take_along_axis(lp[:T], ids, -1).astype(np.float32),
        "token_logprob": lp[np.arange(T), resp].astype(np.float32),
        "ref_topk_logprobs": np.take_along_axis(ref, ids, -1).astype(np.float32),
        "ref_token_logprob": ref[np.arange(T), resp].astype(np.float32),
        "soft_value": np.stack([b * np.log(np.exp(logits / b).sum(-1)) for b in BETAS], -1).astype(np.float32),
        "behavior_logprob": (lp[np.arange(T), resp] - 0.1).astype(np.float32),
    }


def _write_store(url, tok, n_groups, shard_records, seed, roles_per_group):
    rng = np.random.default_rng(seed)
    meta = StoreMeta(k=K, betas=BETAS, fields=FIELDS, models={}, tokenizer={"vocab_size": len(tok)},
                     dataset={}, options={"codec": "lossless"}, code_version="test")
    with StoreWriter(url, meta, shard_records=shard_records) as w:
        for e in range(n_groups):
            group = []
            for role, g in roles_per_group:
                reward = float(rng.integers(0, 2)) if role == "student_rollout" else None
                group.append(_record(rng, f"ex{e}", role, g, len(tok), tok.eos_token_id, reward))
            w.add_group(group)
    return url


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    tok = build_tokenizer()
    model = save_tiny(root / "student", tok, hidden=16, layers=2, heads=2)
    tied = save_tiny(root / "tied", tok, hidden=16, layers=2, heads=2, tie_embeddings=True)  # as Qwen2.5 0.5-3B
    every_role = [("chosen", 0), ("rejected", 0), ("student_rollout", 0), ("student_rollout", 1),
                  ("teacher_rollout", 0), ("teacher_rollout", 1)]
    # 13 groups of 6 records, 2 groups a shard: 7 shards, dealt 4 / 3 (unequal) to 2 ranks
    full = _write_store(str(root / "full"), tok, 13, 12, 0, every_role)
    # 11 pairs, 2 a shard: 6 shards, the last holding 1 pair: per-rank counts differ by epoch
    pairs = _write_store(str(root / "pairs"), tok, 11, 4, 1, [("chosen", 0), ("rejected", 0)])
    return {"model": str(model), "tied": str(tied), "full": full, "pairs": pairs, "root": root}


def _cfg(setup, out, store="full", **kw) -> dict:
    base = {"model": setup["model"], "store": setup[store], "out": str(out), "objective": "dckd",
            "max_steps": 3, "batch_groups": 2, "lr": 1e-2, "chunk_size": 4, "progress": False,
            "log_every": 1, "tvkd_beta": 2.0, "warmup_steps": 1}
    return {**base, **kw}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, port: int) -> dict:
    return {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}


def _scenarios(setup, runs: Path) -> list[dict]:
    sc = [{"name": f"obj-{o}", "cfg": _cfg(setup, runs / o, objective=o)} for o in OBJECTIVES]
    sc += [
        {"name": "adpa-code", "cfg": _cfg(setup, runs / "adpa-code", objective="adpa", adpa_released_code=True)},
        {"name": "accum", "cfg": _cfg(setup, runs / "accum", batch_groups=1, grad_accum=2)},
        {"name": "resume", "cfg": _cfg(setup, runs / "resume", save_every=1), "stops": [2, None]},
        {"name": "lora", "cfg": _cfg(setup, runs / "lora", lora_r=4, lora_targets=["q_proj", "v_proj"],
                                     grad_checkpointing=True)},
        # stopped at the end of epoch 0 (5 groups a rank: one rank holds 6) and resumed
        {"name": "uneven", "cfg": _cfg(setup, runs / "uneven", store="pairs", batch_groups=1, max_steps=0,
                                       epochs=3, save_every=4), "stops": [5, None]},
        # FSDP2: stopped after step 2 and resumed from the DCP checkpoint
        {"name": "fsdp", "cfg": _cfg(setup, runs / "fsdp", fsdp=True, save_every=1), "stops": [2, None]},
        {"name": "fsdp-bf16", "cfg": _cfg(setup, runs / "fsdp-bf16", fsdp=True, bf16=True, max_steps=2)},
        {"name": "fsdp-tied-gc", "cfg": _cfg(setup, runs / "fsdp-tied-gc", fsdp=True, model=setup["tied"],
                                             grad_checkpointing=True, grad_accum=2, batch_groups=1)},
        # the kill test's run, uninterrupted; then killed (rank 1 dies as it starts step 4: last)
        {"name": "kill-ref", "cfg": _kill_cfg(setup, runs / "kill-ref")},
        {"name": "killed", "cfg": _kill_cfg(setup, runs / "killed"), "kill": {"rank": 1, "at": 3}},
    ]
    return sc


def _kill_cfg(setup, out) -> dict:
    return _cfg(setup, out, max_steps=6, batch_groups=1, save_every=2)


@pytest.fixture(scope="module")
def job(setup):
    """Run every scenario in one 2-rank gloo job; {name: [rank0, rank1] results}."""
    runs = setup["root"] / "runs"
    runs.mkdir()
    spec = {"out": str(runs), "scenarios": _scenarios(setup, runs)}
    (runs / "spec.json").write_text(json.dumps(spec))
    port = _free_port()
    logs = [(runs / f"rank{r}.log").open("w") for r in range(WORLD)]
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(runs / "spec.json")], env=_env(r, port),
                              stdout=logs[r], stderr=subprocess.STDOUT) for r in range(WORLD)]
    for r, p in enumerate(procs):
        p.wait(timeout=600)
        logs[r].close()
        expect = -signal.SIGKILL if r == 1 else 0  # rank 1 dies in the last scenario
        assert p.returncode == expect, f"rank {r}: exit {p.returncode}\n{(runs / f'rank{r}.log').read_text()[-4000:]}"
    res = [json.loads((runs / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return {name: [res[r].get(name) for r in range(WORLD)] for name in res[0]}, runs


def reference(cfg: TrainConfig, world: int = WORLD) -> dict[str, torch.Tensor]:
    """One process, gradient accumulation over the ranks' micro-batches in rank order: rank
    r's reader (rank r of `world`), each rank taking the per-epoch minimum of groups."""
    cpu = torch.device("cpu")
    set_seed(cfg.seed)
    model, tok = load_student(cfg, cpu)
    store = open_store(cfg.store[0])  # TrainConfig.store is a list (several teachers)
    fields = list(objective_fields(cfg))

    def budget(e):
        return min(len(StreamReader(store, fields=fields, seed=cfg.seed, epoch=e, rank=r, world_size=world))
                   for r in range(world))

    streams = [group_stream(StreamReader(store, fields=fields, seed=cfg.seed, rank=r, world_size=world), budget)
               for r in range(world)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt, precision = make_optimizer(cfg.optim_settings, params), Precision.for_run(cfg, cpu)
    sched = make_scheduler(cfg.schedule_settings, opt, cfg.max_steps)
    student = StudentForward(model, cfg.chunk_size)
    model.train()
    for step in range(cfg.max_steps):
        batches = [b for s in streams for b in next_batches(s, cfg, tok.pad_token_id, tuple(BETAS), cpu)[0]]
        train_step(student, opt, sched, params, batches, cfg, step, precision)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return {k: v.detach() for k, v in model.state_dict().items()}


def _exported(out) -> dict[str, torch.Tensor]:
    return load_file(str(Path(out) / "model" / "model.safetensors"))


def _max_rel(got: dict, ref: dict) -> float:
    """The largest relative error of any tensor, ||got - ref|| / ||ref||. (Element by element,
    AdamW's m/sqrt(v) magnifies float32 rounding where a gradient is ~0: grad_accum=2 x 2 ranks
    reaches 1.7e-6 of the tensor's largest entry there, against 2.4e-7 in norm.)"""
    return max(float((got[k] - ref[k]).norm() / ref[k].norm().clamp(min=1e-30)) for k in got)


@pytest.mark.parametrize("name", [f"obj-{o}" for o in OBJECTIVES] + ["adpa-code", "accum", "lora", "fsdp-tied-gc"])
def test_two_ranks_equal_one_process_accumulating_their_micro_batches(setup, job, name):
    """Every objective: loss = mean over (rank, micro-batch) of the micro-batch loss, so 2
    ranks x b equals one process accumulating the same 2 micro-batches of b (1e-6, fp32)."""
    results, runs = job
    spec = next(s for s in _scenarios(setup, runs) if s["name"] == name)
    cfg = TrainConfig(**spec["cfg"])
    r0, r1 = results[name]
    assert r0["steps"] == r1["steps"] == cfg.max_steps
    assert r0["loss"] == r1["loss"] and np.isfinite(r0["loss"])  # the logged loss is the global mean
    got, ref = _exported(cfg.out), reference(cfg)
    assert set(got) <= set(ref)
    assert _max_rel(got, ref) < 1e-6, name
    # and the run actually trained: the weights moved
    set_seed(cfg.seed)
    init = load_student(TrainConfig(**{**spec["cfg"], "lora_r": 0}), torch.device("cpu"))[0].state_dict()
    assert _max_rel(got, init) > 1e-4


def test_every_rank_takes_the_same_groups_per_epoch_and_the_same_steps(setup, job):
    results, runs = job
    r0, r1 = results["uneven"]
    store = open_store(setup["pairs"])
    budget = D.epoch_budget(store, ["topk_ids", "topk_logprobs"], 0, WORLD)
    lens = [[len(StreamReader(store, seed=0, epoch=e, rank=r, world_size=WORLD)) for r in range(WORLD)]
            for e in range(3)]
    assert any(a != b for a, b in lens), "the store must deal unequal counts for this test"
    assert [budget(e) for e in range(3)] == [min(x) for x in lens] == [5, 5, 5]
    assert r0["steps"] == r1["steps"] == sum(min(x) for x in lens)  # 3 epochs, 1 group a step
    assert len(r0["batches"]) == len(r1["batches"]) == r0["steps"]  # nobody ran an extra step
    start = 0
    for e in range(3):
        n = budget(e)
        a = [i for b in r0["batches"][start:start + n] for i in b]
        b = [i for b in r1["batches"][start:start + n] for i in b]
        # one record per pair per block: each example appears as chosen + rejected
        assert len(set(a)) == len(set(b)) == n and not set(a) & set(b), e
        start += n
    # every rank's saved reader position: all the groups it took, within the budgets
    state = torch.load(runs / "uneven" / "last" / "training_state.pt", weights_only=True)
    assert state["world_size"] == WORLD and len(state["ranks"]) == WORLD
    for s in state["ranks"]:
        e, consumed = s["reader"]["epoch"], s["reader"]["consumed"]
        assert sum(budget(i) for i in range(e)) + min(consumed, budget(e)) == r0["steps"]


def test_only_rank_zero_logs_and_each_step_once(setup, job):
    results, runs = job
    for name in ("resume", "fsdp"):
        steps = [json.loads(x)["step"] for x in (runs / name / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3], name
    assert [r["rank"] for r in results["obj-dckd"]] == [0, 1]
    cfg = (runs / "dckd" / "config.yaml").read_text()
    assert "world_size: 2" in cfg and "# effective batch: 4 groups" in cfg


def test_resume_same_world_size_is_exact(job):
    _, runs = job
    a, b = _exported(runs / "resume"), _exported(runs / "dckd")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_resume_with_another_world_size_is_refused(setup, job):
    _, runs = job
    cfg = TrainConfig(**_cfg(setup, runs / "resume", save_every=1))
    with pytest.raises(ValueError, match=r"saved by a 2-process run and this run has 1: resume with 2 processes"):
        train(cfg)


def test_lora_under_ddp_saves_a_peft_adapter(setup, job):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, runs = job
    base = AutoModelForCausalLM.from_pretrained(setup["model"])
    model = PeftModel.from_pretrained(base, str(runs / "lora" / "last"))
    lora = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert lora and any(float(v.abs().max()) > 0 for k, v in lora.items() if "lora_B" in k)
    merged = model.merge_and_unload().state_dict()
    got = _exported(runs / "lora")
    assert _max_rel({k: got[k] for k in merged}, merged) < 1e-6


def test_fsdp_equals_ddp_after_a_dcp_resume_and_exports_hf(setup, job):
    from transformers import AutoModelForCausalLM

    _, runs = job
    assert (runs / "fsdp" / "last" / "dcp" / ".metadata").exists()
    assert not (runs / "fsdp" / "last" / "model.safetensors").exists()  # sharded, not gathered
    fsdp, ddp = _exported(runs / "fsdp"), _exported(runs / "dckd")
    assert _max_rel(fsdp, ddp) < 1e-6
    AutoModelForCausalLM.from_pretrained(runs / "fsdp" / "model")
    # bf16 policy (bf16 gathered params, fp32 reduce): the first step's loss, before any
    # update, differs from fp32 by bf16 rounding only; master weights stay fp32
    first = [json.loads((runs / n / "metrics.jsonl").read_text().splitlines()[0])["loss"]
             for n in ("fsdp-bf16", "fsdp")]
    assert first[0] != first[1] and abs(first[0] - first[1]) < 2e-2 * abs(first[1])
    assert all(v.dtype == torch.float32 for v in _exported(runs / "fsdp-bf16").values())


def test_a_store_with_fewer_shards_than_ranks_is_refused(setup, tmp_path):
    tok = build_tokenizer()
    url = _write_store(str(tmp_path / "one"), tok, 2, 100, 0, [("chosen", 0), ("rejected", 0)])
    store = open_store(url)
    with pytest.raises(ValueError, match=r"has 1 shard\(s\) for 2 processes: .* launch at most 1"):
        D.check_budget(store, url, D.epoch_budget(store, None, 0, 2), 2)


def _args(cfg: dict) -> list[str]:
    args = []
    for k, v in cfg.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            args.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            args += [flag, str(v)]
    return args


def test_killed_rank_fails_the_job_naming_it_and_torchrun_resume_finishes_exactly(setup, job):
    """Rank 1 is SIGKILLed as it starts step 4 (checkpoint at step 2); rank 0 fails promptly
    naming it. `torchrun ... -m kdcache.cli train` with the same options then resumes and
    ends equal to the uninterrupted run, with one result line on stdout (rank 0's)."""
    results, runs = job
    error = results["killed"][0]["error"]
    assert error.startswith("rank 0: rank 1 stopped answering (killed"), error
    assert "run the same command again to resume" in error
    assert results["killed"][0]["seconds"] < 60  # not the 120 s collective timeout
    assert torch.load(runs / "killed" / "last" / "training_state.pt", weights_only=True)["step"] == 2

    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD),
              "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "kdcache.cli", "train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(launch + _args(_kill_cfg(setup, runs / "killed")), env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == [str(runs / "killed" / "model")]  # rank 0 prints the model dir
    assert "6 steps" in done.stderr
    # only rank 0 logs (info lines appear once, not once per rank)
    assert done.stderr.count("resumed ") == 1 and done.stderr.count("effective batch: 2 groups") == 1
    got, ref = _exported(runs / "killed"), _exported(runs / "kill-ref")
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    steps = [json.loads(x)["step"] for x in (runs / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


def test_cli_peer_failure_is_one_line_and_exit_1(monkeypatch):
    from typer.testing import CliRunner

    import kdcache.cli as cli
    from kdcache.train import trainer

    def lost(cfg):
        raise D.PeerFailure("rank 0: rank 1 stopped answering (killed, out of memory, crashed or hung)")

    monkeypatch.setattr(trainer, "train", lost)
    res = CliRunner().invoke(cli.app, ["train", "--model", "m", "--store", "s"])
    assert res.exit_code == 1
    assert res.output.strip() == "error: rank 0: rank 1 stopped answering (killed, out of memory, crashed or hung)"


@pytest.mark.parametrize("env_world,kw,msg", [
    (1, {"fsdp": True}, r"--fsdp shards the student across processes: launch with `torchrun"),
    (2, {"fsdp": True, "lora_r": 4}, r"--fsdp with --lora-r is not supported: .* DDP \(drop --fsdp\)"),
    (1, {"world_size": 2}, r"--world-size 2, but the launcher started 1 process\(es\)"),
    (1, {"dist_timeout_s": 0}, r"--dist-timeout-s 0: must be > 0"),
])
def test_distributed_options_are_refused_before_joining_a_group(setup, tmp_path, monkeypatch, env_world, kw, msg):
    monkeypatch.setenv("WORLD_SIZE", str(env_world))
    with pytest.raises(ValueError, match=msg):
        train(TrainConfig(**_cfg(setup, tmp_path / "x", **kw)))
    assert not torch.distributed.is_initialized() and not (tmp_path / "x").exists()
