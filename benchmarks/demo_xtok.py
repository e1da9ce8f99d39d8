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
    ap.add_argument("--base", default="sft,dckd", help="same-tokenizer demo rows run beside (seed 0)")
    ap.add_argument("--assemble", action="store_true", help="only write the results table")
    ap.add_argument("--no-demo", action="store_true",
                    help="skip the seed-0 demo run (its stages must be done): only retrain the "
                         "xtok rows for the other seeds, e.g. one process per seed")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    if args.assemble:
        return assemble(args.out, args.quick, 0.0)
    rows_dir = args.out / "xtok-rows"
    if not args.no_demo:
        base = [m for m in args.base.split(",") if m]
        run_demo(args.out, args.quick, [*base, *XTOK_METHODS], seed=0)
    d = Demo(args.out, args.quick, 0)  # same data, teacher and stores (cache hits)
    teacher, ref = str(args.out / "runs" / "teacher-dpo" / "model"), str(args.out / "runs" / "teacher-sft" / "model")
    pref = d.precompute(data=str(d.data["pref"]), teacher=teacher, reference=ref)
    evals = d.precompute(data=str(d.data["eval"]), teacher=teacher, reference=ref)
    split0 = d.split_student(str(d.data["sft"]))
    rows_dir.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        if seed == 0:
            continue
        for m in XTOK_METHODS:
            model = xtok_row(d, m, split0, pref, d.steps["student"], name=f"{m}-seed{seed}", seed=seed)
            row = {"method": m, "seed": seed, **d.evaluate(model, evals, True)}
            (rows_dir / f"{m}-seed{seed}.json").write_text(json.dumps(row, indent=2) + "\n")
    assemble(args.out, args.quick, time.perf_counter() - t0)


def assemble(out_dir: Path, quick: bool, seconds: float) -> None:
    """The seed-0 demo rows (results.json) and every retrained row so far, as one table."""
    demo = out_dir / "results.json"  # absent while the seed-0 process is still running
    rows = [{"seed": 0, **r} for r in json.loads(demo.read_text())["rows"]] if demo.is_file() else []
    rows += [json.loads(p.read_text()) for p in sorted((out_dir / "xtok-rows").glob("*.json"))]
    rows.sort(key=lambda r: (r["method"], r["seed"]))
    out = {"seconds_this_process": seconds, "quick": quick, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    name = "demo_xtok_quick" if quick else "demo_xtok"
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = ["| method | seed | pref rate | ends </s> | reward acc | KL top-K | aligned fraction | mapped top-K mass |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    fmt = lambda v, f=".3f": "-" if v is None or v != v else format(v, f)  # noqa: E731
    for r in rows:
        lines.append(f"| {r['method']} | {r['seed']} | {fmt(r.get('reward_mean'))} | {fmt(r.get('eos_rate'))} | "
                     f"{fmt(r.get('reward_accuracy'))} | {fmt(r.get('kl_topk'))} | "
                     f"{fmt(r.get('aligned_fraction'))} | {fmt(r.get('mapped_topk_mass'), '.5f')} |")
    (RESULTS / f"{name}.md").write_text(
        "# Demo rows with a student of another tokenizer\n\n"
        f"`python benchmarks/demo_xtok.py{' --quick' if quick else ''}` on a shared 2-core CPU box "
        "(no GPU). Split-tokenizer rows sample up to 24 new tokens, the others 12 (the same budget "
        "in characters).\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
