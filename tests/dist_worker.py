"""One rank of the 2-process gloo job that tests/test_distributed.py launches the way
torchrun or srun would (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment).

It joins the process group itself, so `train()` also runs inside a group it did not create,
then runs every scenario of the JSON spec in turn (one process start for all of them) and
writes what each rank saw to `<out>/rank<r>.json`: the result, and the example ids of every
micro-batch it trained on (to check the data split and the step agreement). A scenario with
"kill" must come last: one rank SIGKILLs itself mid-run and the other records the
PeerFailure it gets."""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

torch.set_num_threads(1)  # as in tests/conftest.py: the single-process references use 1 thread


def main(spec_path: str) -> None:
    from kdcache.train import trainer as T
    from kdcache.train.config import TrainConfig
    from kdcache.train.distributed import PeerFailure

    spec = json.loads(Path(spec_path).read_text())
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = dist.get_rank()
    seen: list[list[str]] = []
    real_next = T.next_batches

    def recording(groups, cfg, *args, **kwargs):
        batches, tokens = real_next(groups, cfg, *args, **kwargs)
        seen.append([e for b in batches for e in b.example_ids])
        return batches, tokens

    T.next_batches = recording
    results = {}
    real_step = T.train_step
    for sc in spec["scenarios"]:
        seen.clear()
        t0 = time.perf_counter()
        cfg = TrainConfig(**sc["cfg"])
        Path(spec["out"], f"rank{rank}.json").write_text(json.dumps(results))  # so far
        if "kill" in sc:  # {"rank": r, "at": n}: rank r SIGKILLs itself as it starts its n-th step
            def dying(*args, _kill=sc["kill"], calls=[0], **kwargs):  # noqa: B006 (a counter)
                if rank == _kill["rank"] and calls[0] == _kill["at"]:
                    os.kill(os.getpid(), signal.SIGKILL)
                calls[0] += 1
                return real_step(*args, **kwargs)

            T.train_step = dying
            try:
                T.train(cfg)
                results[sc["name"]] = {"error": None}
            except PeerFailure as e:
                results[sc["name"]] = {"error": str(e), "seconds": time.perf_counter() - t0}
            # the group lost a member: write what we saw and leave without tearing it down
            Path(spec["out"], f"rank{rank}.json").write_text(json.dumps(results))
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        res = None
        for stop in sc.get("stops", [None]):
            res = T.train(cfg, stop_after=stop)
        results[sc["name"]] = {"steps": res.steps, "tokens": res.tokens, "loss": res.final_loss,
                               "rank": res.rank, "batches": list(seen),
                               "seconds": time.perf_counter() - t0}
    Path(spec["out"], f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
