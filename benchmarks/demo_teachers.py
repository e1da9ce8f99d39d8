"""The demo's several-teacher rows (issue 22 §3) with student training seeds 0, 1, 2.

Seed 0 is `kdcache demo --methods sft,kd,kd-teacher2,kd-2teachers`; seeds 1 and 2 retrain those
rows from the same student init, teachers, stores and evaluation (as README's noise band for
the other rows), so the spread between seeds is training noise only. Every store and run is
reused from the seed-0 demo directory (content-addressed stores, resumable runs).

    python benchmarks/demo_teachers.py --out /tmp/demo-teachers
writes results/demo_teachers.json (pref rate and the other eval columns per row and seed).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

ROWS = {"sft": ("sft", {}), "kd": ("kd", {}), "kd-teacher2": ("kd", {}), "kd-2teachers": ("kd", {"ensemble": True})}


def main() -> None:
    import torch

    from kdcache.demo import Demo, run_demo

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/demo-teachers"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "demo_teachers.json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    first = run_demo(args.out, methods=list(ROWS), seed=0)
    table = {r["method"]: {"0": r} for r in first["rows"]}
    d = Demo(args.out, False, 0)  # the same data, stores and evaluation sampling as seed 0
    torch.set_num_threads(1)
    runs = args.out / "runs"
    model = lambda name: str(runs / name / "model")  # noqa: E731
    teacher, ref, teacher2, ref2 = (model(n) for n in ("teacher-dpo", "teacher-sft", "teacher2-dpo", "teacher2-sft"))
    pref = d.precompute(data=str(d.data["pref"]), teacher=teacher, reference=ref)
    pref2 = d.precompute(data=str(d.data["pref"]), teacher=teacher2, reference=ref2)
    evals = d.precompute(data=str(d.data["eval"]), teacher=teacher, reference=ref)
    stores = {"sft": pref, "kd": pref, "kd-teacher2": pref2, "kd-2teachers": [pref, pref2]}
    for seed in (int(s) for s in args.seeds.split(",") if s.strip() and int(s) != 0):
        for m, (objective, kw) in ROWS.items():
            trained = d.train(f"{m}-seed{seed}", model("student-sft-init"), stores[m], objective,
                              d.steps["student"], seed=seed, **kw)
            table[m][str(seed)] = d.evaluate(trained, evals)
            print(m, seed, table[m][str(seed)]["reward_mean"], flush=True)
    result = {"machine": f"{platform.node()} ({platform.processor() or platform.machine()}), shared 2-core CPU box",
              "seconds": time.perf_counter() - t0, "rows": table}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2))
    for m, by_seed in table.items():
        print(m, " / ".join(f"{v['reward_mean']:.3f}" for _, v in sorted(by_seed.items())))


if __name__ == "__main__":
    main()
