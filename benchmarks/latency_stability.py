"""Can a user trust `quantship bench`'s comparisons on a noisy machine? (issue 23)

EfficientNet-Lite0 tflite-fp32 and tflite-int8 (pretrained weights, calibrated on the demo photos), or the two
files given with --fp32 / --int8. Every bench run is `python -m quantship bench` in its own process, as a user
runs it (interleaved rounds, order rotated, ratio to the reference with a 95 % bootstrap interval):

(a) the fp32 file against an identical copy of itself, --repeats times: the ratio's interval should contain 1.0
    in at least 19 of 20 repeats, with a half-width <= 3 %;
(b) fp32 vs int8 in --processes separate bench processes: the ratio should move less than +-3 % between
    processes while the absolute p50 may move by half;
(c) fp32 vs int8 with a busy loop started on core 0 halfway through the run: what the instability detector says.

    python benchmarks/latency_stability.py                 # full: 20 repeats, 5 processes
    python benchmarks/latency_stability.py --smoke         # tiny random model, 1 repeat, 1 process: seconds
    python benchmarks/latency_stability.py --fp32 a.tflite --int8 b.tflite --work /tmp/ls

The load average is printed with the figures: on a shared machine they say what the bench does under that load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/smoke.py


def build(work: Path, threads: int, smoke: bool = False) -> dict[str, str]:
    """EfficientNet-Lite0 tflite-fp32 and tflite-int8 (reused from ``work`` when already built); smoke: the tiny
    random model's, calibrated on 4 photos."""
    from smoke import demo_artifacts  # benchmarks/smoke.py, beside this file

    return demo_artifacts(work, "tflite-fp32,tflite-int8", threads, smoke)


def bench(files: list[str], out: Path, args, *extra: str) -> dict[str, dict]:
    """One `quantship bench` process over ``files``: its rows by target."""
    cmd = [sys.executable, "-m", "quantship", "bench", "--out", str(out), "-q"]
    cmd += [x for f in files for x in ("--artifact", f)]
    cmd += ["--threads", str(args.threads), "--warmup", str(args.warmup), "--min-queries", "100", "--min-seconds"]
    cmd += [str(min(1.0, args.max_seconds / 2))]
    cmd += ["--min-rounds", "10", "--max-seconds", str(args.max_seconds), "--queries-per-round", str(args.per_round)]
    cmd += extra
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"bench failed ({res.returncode}): {res.stderr.strip()[-500:]}")
    rows = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    return {r["target"]: r for r in rows}


def load() -> float:
    return os.getloadavg()[0]


def part_a(files: dict[str, str], work: Path, args) -> dict:
    copy = work / "copy-of-fp32.tflite"
    shutil.copy(files["tflite-fp32"], copy)
    results = []
    for i in range(args.repeats):
        rows = bench([files["tflite-fp32"], str(copy)], work / f"a{i}", args, "--reference", files["tflite-fp32"])
        r = rows[copy.stem]
        hit = r["ratio_ci_low"] <= 1.0 <= r["ratio_ci_high"]
        results.append(
            dict(
                ratio=r["ratio_to_reference"],
                low=r["ratio_ci_low"],
                high=r["ratio_ci_high"],
                half_width=r["ratio_half_width"],
                contains_one=hit,
                rounds=r["rounds"],
                stopped_by=r["stopped_by"],
                p50=r["latency_ms_p50"],
                load=r.get("load_average_after"),
            )
        )
        print(
            f"(a) {i + 1:2d}/{args.repeats}: copy/original {r['ratio_to_reference']:.3f} "
            f"[{r['ratio_ci_low']:.3f}, {r['ratio_ci_high']:.3f}] (+-{100 * r['ratio_half_width']:.1f} %), "
            f"{'contains' if hit else 'MISSES'} 1.0; {r['rounds']} rounds, stopped by {r['stopped_by']}; "
            f"p50 {r['latency_ms_p50']:.2f} ms; load {load():.1f}",
            flush=True,
        )
    hits = sum(x["contains_one"] for x in results)
    widths = [x["half_width"] for x in results]
    summary = (
        f"(a) identical copy: interval contains 1.0 in {hits}/{len(results)} repeats (target >= 19/20); "
        f"half-width median +-{100 * np.median(widths):.1f} %, max +-{100 * max(widths):.1f} % (target <= 3 %)"
    )
    return {"repeats": results, "summary": summary}


def part_b(files: dict[str, str], work: Path, args) -> dict:
    results = []
    for i in range(args.processes):
        rows = bench([files["tflite-fp32"], files["tflite-int8"]], work / f"b{i}", args)
        fp32 = next(r for r in rows.values() if "fp32" in r["target"])
        int8 = next(r for r in rows.values() if "int8" in r["target"])
        results.append(
            dict(
                ratio=int8["ratio_to_reference"],
                low=int8["ratio_ci_low"],
                high=int8["ratio_ci_high"],
                p50_fp32=fp32["latency_ms_p50"],
                p50_int8=int8["latency_ms_p50"],
                rounds=int8["rounds"],
                stopped_by=int8["stopped_by"],
            )
        )
        print(
            f"(b) process {i + 1}/{args.processes}: int8/fp32 {int8['ratio_to_reference']:.3f} "
            f"[{int8['ratio_ci_low']:.3f}, {int8['ratio_ci_high']:.3f}]; p50 fp32 {fp32['latency_ms_p50']:.2f} ms, "
            f"int8 {int8['latency_ms_p50']:.2f} ms; {int8['rounds']} rounds; load {load():.1f}",
            flush=True,
        )
    ratios = np.array([x["ratio"] for x in results])
    p50 = np.array([x["p50_fp32"] for x in results])
    ratio_move = 100 * np.max(np.abs(ratios / np.median(ratios) - 1))
    p50_move = 100 * np.max(np.abs(p50 / np.median(p50) - 1))
    summary = (
        f"(b) {len(results)} processes: int8/fp32 ratio {ratios.min():.3f}-{ratios.max():.3f}, moves at most "
        f"+-{ratio_move:.1f} % from its median (target < 3 %); fp32 p50 {p50.min():.2f}-{p50.max():.2f} ms, "
        f"moves +-{p50_move:.1f} %"
    )
    return {"processes": results, "summary": summary}


def part_c(files: dict[str, str], work: Path, args) -> dict:
    """A busy loop pinned to core 0 starts halfway through a run that lasts --max-seconds."""
    out = work / "c"
    cmd = [sys.executable, "-m", "quantship", "bench", "--out", str(out), "-q", "--threads", str(args.threads)]
    cmd += ["--artifact", files["tflite-fp32"], "--artifact", files["tflite-int8"], "--warmup", str(args.warmup)]
    cmd += ["--min-rounds", "10", "--max-seconds", str(args.max_seconds), "--ratio-precision", "0.0001"]
    cmd += ["--queries-per-round", str(args.per_round)]
    bench_proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(args.startup + args.max_seconds / 2)  # start-up (processes, models, warm-up), then half the rounds
    busy = subprocess.Popen(
        [sys.executable, "-c", "import os; os.sched_setaffinity(0, {0})\nwhile True: pass"],
    )
    try:
        stdout, stderr = bench_proc.communicate(timeout=args.max_seconds * 4 + 120)
    finally:
        busy.kill()
        busy.wait()
    if bench_proc.returncode != 0:
        raise SystemExit(f"bench failed: {stderr.strip()[-500:]}")
    rows = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    for r in rows:
        medians = ", ".join(f"{v:.1f}" for v in r["round_p50_ms"])
        print(
            f"(c) {r['target']}: stable {r['stable']}; {r['unstable_reason']}; ratio {r['ratio_to_reference']:.3f} "
            f"[{r['ratio_ci_low']:.3f}, {r['ratio_ci_high']:.3f}]; per-round p50s: {medians}",
            flush=True,
        )
    warnings = [ln for ln in stdout.splitlines() if ln.startswith("warning:") or ln.startswith("note:")]
    flagged = [r["target"] for r in rows if not r["stable"]]
    summary = f"(c) busy loop on core 0 from halfway: flagged {flagged or 'nothing'}; " + " | ".join(
        f"{r['target']}: {r['unstable_reason'] or 'stable'}" for r in rows
    )
    return {"rows": rows, "warnings": warnings, "summary": summary}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fp32", help="an fp32 .tflite file (default: EfficientNet-Lite0 built here)")
    p.add_argument("--int8", help="an int8 .tflite file of the same model")
    p.add_argument("--repeats", type=int, default=20, help="(a) repeats (20)")
    p.add_argument("--processes", type=int, default=5, help="(b) separate bench processes (5)")
    p.add_argument("--max-seconds", type=float, default=30.0, help="each bench run's --max-seconds (30)")
    p.add_argument("--threads", type=int, default=1, help="threads of each configuration (1)")
    p.add_argument("--per-round", type=int, default=20, help="queries per configuration per round (20)")
    p.add_argument("--parts", default="abc", help="which of a, b, c to run (abc)")
    p.add_argument("--smoke", action="store_true", help="tiny random model, 1 repeat, 1 process, 2 s runs (seconds)")
    p.add_argument("--work", help="working folder (default: a temporary one; built models are reused from it)")
    args = p.parse_args()
    args.warmup, args.startup = 0.5, 5.0  # warm-up per configuration; seconds a bench takes to start timing
    if args.smoke:
        args.repeats, args.processes, args.max_seconds, args.per_round = 1, 1, 2.0, 5
        args.warmup, args.startup = 0.1, 2.0
    if bool(args.fp32) != bool(args.int8):
        sys.exit("give both --fp32 and --int8, or neither")

    from quantship.evaluate.environment import cpu_flags, cpu_model

    work = Path(args.work or tempfile.mkdtemp(prefix="quantship-stability-"))
    work.mkdir(parents=True, exist_ok=True)
    head = f"CPU {cpu_model()} ({os.cpu_count()} cores; {cpu_flags()}); load average {load():.1f}"
    print(head, flush=True)
    if args.fp32:
        files = {"tflite-fp32": args.fp32, "tflite-int8": args.int8}
    else:
        files = build(work, args.threads, args.smoke)
    started = time.time()
    results = {}
    for part, fn in (("a", part_a), ("b", part_b), ("c", part_c)):
        if part in args.parts:
            results[part] = fn(files, work, args)
    print(f"\n{head.split(';')[0]}; {args.threads} thread(s); load average now {load():.1f}")
    print(f"settings: --max-seconds {args.max_seconds:g}, --min-rounds 10, {args.per_round} queries per round; {work}")
    for part in results.values():
        print(part["summary"])
    print(f"total {time.time() - started:.0f} s")
    saved = {"cpu": head, "settings": vars(args), "results": results}
    (work / "latency_stability.json").write_text(json.dumps(saved, indent=1, default=str))
    print(f"results: {work / 'latency_stability.json'}")


if __name__ == "__main__":
    main()
