"""What a hostile store costs a reader (issue 19): peak memory and CPU time of `inspect`,
`store verify` and a full read on sealed, self-consistent hostile stores, against the
honest store they were made from, each in a fresh process under an address-space cap.

The stores are those of tests/hostile_stores.py (every checksum recomputed, so only the
reader's own bounds can refuse them).  Each (case, operation) runs in a child process with
`resource.setrlimit(RLIMIT_AS, --cap-gib)` and a wall-clock timeout; the child reports its
peak RSS above the RSS it had after its imports, and the CPU time of the operation alone.
Ratios are hostile / honest for the same operation.

`--baseline PATH` also runs every case with the kdcache found under PATH (e.g. an export
of the code before this change: `git archive <commit> | tar -x -C PATH/kdcache`), to show
what the same stores cost there; and times the honest read path of both trees on one larger
honest store, alternating repetitions, to show the bounds do not slow honest reads.

    python benchmarks/bench_hostile.py [--cap-gib 2] [--baseline /tmp/kdbase/] [--reps 5]

Writes benchmarks/results/hostile.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from hostile_stores import CASES, build, build_honest  # noqa: E402

OPS = ("inspect", "verify", "read")

CHILD = r"""
import json, os, resource, sys, time
cap, op, url = int(sys.argv[1]), sys.argv[2], sys.argv[3]
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
def status_kb(key):
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith(key + ":"))
import kdcache.store
from kdcache.store import open_store, summarize
from kdcache.store.verify import verify
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS: the operation's own peak
base = status_kb("VmRSS")
t0 = time.process_time(); w0 = time.perf_counter()
out = {"ok": True}
try:
    if op == "inspect":
        summarize(open_store(url))
    elif op == "verify":
        out["problems"] = len(verify(url))
    elif op == "read":
        n = 0
        for _ in open_store(url):
            n += 1
        out["records"] = n
    elif op == "speed":  # honest read path: every shard decoded, all fields, 3 passes
        st = open_store(url)
        times = []
        for _ in range(3):
            a = time.perf_counter()
            for s in range(len(st.shards)):
                st._cache = None
                st.load_shard(s)
            times.append(time.perf_counter() - a)
        out["read_s"] = min(times)
except BaseException as e:  # noqa: BLE001 - report what it was
    msg = (str(e).splitlines() or [""])[0].replace(url, "STORE")
    out = {"ok": False, "error": f"{type(e).__name__}: {msg[:400]}"}
out["cpu_s"] = time.process_time() - t0
out["wall_s"] = time.perf_counter() - w0
out["peak_above_import_mb"] = max(0, status_kb("VmHWM") - base) / 1024
out["peak_rss_mb"] = status_kb("VmHWM") / 1024
print(json.dumps(out))
"""


def run_child(op: str, url: str, cap: int, pythonpath: str, timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    t = time.perf_counter()
    try:
        res = subprocess.run([sys.executable, "-c", CHILD, str(cap), op, url],
                             capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s (hangs)",
                "wall_s": time.perf_counter() - t}
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = (res.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
        return {"ok": False, "error": f"child died (rc {res.returncode}): {tail}",
                "wall_s": time.perf_counter() - t}
    return json.loads(lines[-1])


def store_bytes(url: str) -> int:
    m = json.loads((Path(url) / "manifest.json").read_text())
    return int(m["totals"]["n_bytes"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cap-gib", type=float, default=2.0,
                    help="address-space cap of each child process in GiB (default 2)")
    ap.add_argument("--timeout", type=float, default=30.0,
                    help="seconds before a child counts as hanging (default 30)")
    ap.add_argument("--baseline", default=None,
                    help="PYTHONPATH holding another kdcache to compare (default: none)")
    ap.add_argument("--reps", type=int, default=5,
                    help="alternating repetitions of the honest read-speed comparison "
                         "(default 5; needs --baseline)")
    ap.add_argument("--cases", default=",".join(CASES),
                    help="comma-separated cases (default: all)")
    ap.add_argument("--out", default=str(HERE / "results" / "hostile"),
                    help="output path without extension (default benchmarks/results/hostile)")
    args = ap.parse_args()
    cap = int(args.cap_gib * (1 << 30))
    ours = os.environ.get("PYTHONPATH", "")
    trees = {"ours": ours} | ({"baseline": args.baseline} if args.baseline else {})
    result: dict = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                               f"{os.cpu_count()} cores (shared)",
                    "cap_gib": args.cap_gib, "timeout_s": args.timeout, "cases": {}}
    with tempfile.TemporaryDirectory(prefix="kdcache-hostile-") as tmp:
        tmp_p = Path(tmp)
        honest = build_honest(tmp_p / "honest" / "s")
        result["honest_bytes"] = store_bytes(honest)
        result["honest"] = {t: {op: run_child(op, honest, cap, path, args.timeout)
                                for op in OPS} for t, path in trees.items()}
        for name in args.cases.split(","):
            url, text, _ = build(name, tmp_p / name)
            row: dict = {"expected": text, "bytes_on_disk": _du(Path(url))}
            for t, path in trees.items():
                row[t] = {op: run_child(op, url, cap, path, args.timeout) for op in OPS}
            result["cases"][name] = row
            print(name, json.dumps({op: _brief(row["ours"][op]) for op in OPS}), file=sys.stderr)
        if args.baseline:
            big = build_honest(tmp_p / "big" / "s", n_groups=6000, seed=1, shard_records=2048,
                               max_t=256)
            speed: dict = {"ours": [], "baseline": []}
            for _ in range(args.reps):
                for t in ("ours", "baseline"):
                    got = run_child("speed", big, cap, trees[t], 600)
                    speed[t].append(got.get("read_s"))
            result["honest_read_speed"] = {
                "store_bytes": store_bytes(big), "reps": args.reps, "seconds": speed,
                "median_ratio_ours_over_baseline":
                    statistics.median(speed["ours"]) / statistics.median(speed["baseline"])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result) + "\n")
    print(markdown(result))


def _du(p: Path) -> int:
    total = 0
    for f in p.rglob("*"):
        if f.is_file() and not f.is_symlink():
            total += f.stat().st_size
    return total


def _brief(r: dict) -> str:
    return "ok" if r.get("ok") else r.get("error", "?")[:60]


def _ratio(a: dict, b: dict, key: str) -> str:
    x, y = a.get(key), b.get(key)
    if x is None or y is None:
        return "-"
    return f"{x / max(y, 1e-9):.2f}" if key == "cpu_s" else f"{(x + 1) / (y + 1):.2f}"


def markdown(r: dict) -> str:
    lines = [
        "# Hostile stores: what a reader pays (benchmarks/bench_hostile.py)",
        "",
        f"Machine: {r['machine']}. Each cell is a fresh process under a {r['cap_gib']} GiB "
        f"address-space cap (RLIMIT_AS), {r['timeout_s']:.0f} s timeout. Honest store: "
        f"{r['honest_bytes'] / 1024:.0f} KiB (one shard); every hostile store is that store "
        f"edited and re-sealed (tests/hostile_stores.py). Peak = peak RSS above the RSS after "
        f"imports, MiB; CPU = CPU seconds of the operation; ratio = hostile / honest "
        f"(RSS ratios on MiB + 1).",
        "",
        "Honest store (ours): " + ", ".join(
            f"{op} {r['honest']['ours'][op].get('peak_above_import_mb', 0):.1f} MiB / "
            f"{r['honest']['ours'][op].get('cpu_s', 0):.3f} s" for op in OPS),
        "",
        "| case | op | outcome (ours) | peak MiB | CPU s | RSS ratio | CPU ratio |"
        + (" baseline outcome | baseline peak MiB | baseline CPU s |" if "baseline" in
           r["honest"] else ""),
        "|---|---|---|---|---|---|---|" + ("---|---|---|" if "baseline" in r["honest"] else ""),
    ]
    for name, row in r["cases"].items():
        for op in OPS:
            a, h = row["ours"][op], r["honest"]["ours"][op]
            cell = (f"| {name} | {op} | {_outcome(a)} | "
                    f"{a.get('peak_above_import_mb', float('nan')):.1f} | "
                    f"{a.get('cpu_s', float('nan')):.3f} | "
                    f"{_ratio(a, h, 'peak_above_import_mb')} | {_ratio(a, h, 'cpu_s')} |")
            if "baseline" in row:
                b = row["baseline"][op]
                cell += (f" {_outcome(b)} | {b.get('peak_above_import_mb', float('nan')):.1f} | "
                         f"{b.get('cpu_s', float('nan')):.3f} |")
            lines.append(cell)
    sp = r.get("honest_read_speed")
    if sp:
        lines += ["", f"Honest read path (every shard of a {sp['store_bytes'] / 2**20:.1f} MiB "
                      f"store decoded, all fields, best of 3 passes per process; {sp['reps']} "
                      f"processes per tree, alternating): ours "
                      f"{[round(x, 4) for x in sp['seconds']['ours']]} s, baseline "
                      f"{[round(x, 4) for x in sp['seconds']['baseline']]} s; median ratio "
                      f"ours / baseline = {sp['median_ratio_ours_over_baseline']:.3f}."]
    return "\n".join(lines)


def _outcome(a: dict) -> str:
    if a.get("ok"):
        return "ok" + (f" ({a['problems']} problems)" if a.get("problems") else "")
    err = a.get("error", "?").replace("|", "/")
    err = err.split(": run `kdcache")[0].split(": kdcache ")[0]  # drop the fix: keep the what
    return "refused: " + err[:160]


if __name__ == "__main__":
    main()
