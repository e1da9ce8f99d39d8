"""The demo's cross-tokenizer rows (METHODS §5) over training seeds 0, 1, 2.

`kdcache demo --methods sft,dckd,sft-xtok,kd-xtok,uld-xtok` at seed 0 gives the table's rows;
the same teacher, stores, split-tokenizer student and evaluation are then reused (stores are
content-addressed and finished runs are not re-run) and only the xtok rows are retrained with
training seeds 1 and 2. Writes benchmarks/results/demo_xtok.{json,md}.

    python benchmarks/demo_xtok.py --out kdcache-demo-xtok [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from kdcache.demo import XTOK_METHODS, Demo, run_demo, xtok_row

RESULTS = Path(__file__).parent / "results"
BASE = ("sft", "dckd")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("kdcache-demo-xtok"))
    ap.add_argument("--quick", action="store_true", help="the demo's quick sizes (smoke test)")
    ap.add_argument("--seeds", default="0,1,2", help="training seeds (0 = the demo's own rows)")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    first = run_demo(args.out, args.quick, [*BASE, *XTOK_METHODS], seed=0)
    rows = {(r["method"], 0): r for r in first["rows"]}
    d = Demo(args.out, args.quick, 0)  # same data, teacher and stores (cache hits)
    teacher, ref = str(args.out / "runs" / "teacher-dpo" / "model"), str(args.out / "runs" / "teacher-sft" / "model")
    pref = d.precompute(data=str(d.data["pref"]), teacher=teacher, reference=ref)
    evals = d.precompute(data=str(d.data["eval"]), teacher=teacher, reference=ref)
    split0 = d.split_student(str(d.data["sft"]))
    for seed in seeds:
        if seed == 0:
            continue
        for m in XTOK_METHODS:
            model = xtok_row(d, m, split0, pref, d.steps["student"], name=f"{m}-seed{seed}", seed=seed)
            rows[(m, seed)] = {"method": m, **d.evaluate(model, evals, True)}
    out = {"seconds": time.perf_counter() - t0, "quick": args.quick, "seeds": seeds,
           "rows": [{"seed": s, **r} for (_, s), r in sorted(rows.items(), key=lambda x: (x[0][0], x[0][1]))]}
    RESULTS.mkdir(exist_ok=True)
    name = "demo_xtok_quick" if args.quick else "demo_xtok"
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = ["| method | seed | pref rate | ends </s> | reward acc | KL top-K | aligned fraction | mapped top-K mass |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for r in out["rows"]:
        lines.append(f"| {r['method']} | {r['seed']} | {fmt(r.get('reward_mean'))} | {fmt(r.get('eos_rate'))} | "
                     f"{fmt(r.get('reward_accuracy'))} | {fmt(r.get('kl_topk'))} | "
                     f"{fmt(r.get('aligned_fraction'))} | {fmt(r.get('mapped_topk_mass'))} |")
    (RESULTS / f"{name}.md").write_text(
        f"# Demo rows with a student of another tokenizer (seeds {args.seeds})\n\n"
        f"`python benchmarks/demo_xtok.py{' --quick' if args.quick else ''}`: {out['seconds']:.0f} s "
        "on a shared 2-core CPU box (no GPU).\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
