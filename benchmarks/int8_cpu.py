"""ONNX Runtime int8 on the CPU: quantship's ``ort-int8-<method>`` vs ``onnx-fp32`` vs ORT's own ``quantize_static``.

On the same images, per model: top-1 agreement with the fp32 ONNX model (and the mean L1 distance of the
probability vectors), the fused int8 kernels ORT runs, and batch-1 latency at ORT's *default* session options (what
a user's application opens the file with), interleaved with fp32 so that load drifts hit every model alike.

    python benchmarks/int8_cpu.py                              # EfficientNet-Lite0, photo crops
    python benchmarks/int8_cpu.py --data imagenet:/data/val    # real images instead of photo crops
    python benchmarks/int8_cpu.py --ort-entropy                # also ORT's Entropy (<= 60 calibration images)
    python benchmarks/int8_cpu.py --smoke                      # tiny random model, 4 images: runs in seconds

Models compared:
* ``ort-int8-<method>``: quantship's layout for ORT's fused kernels (uint8 activations, int8 weights held below
  the u8 x s8 pair limit channel by channel, :mod:`quantship.convert.ort_layout`), one statistics pass for all
  methods; also run as fake-quant (``session.disable_quant_qdq``) for the "agreement within 1 point of its
  fake-quant" check;
* ``ort-int8-<method> [uint8 w]`` / ``[7-bit w]``: the same calibration with the previous layout's uint8
  pointwise/Gemm weights (MLAS's widening U8U8 kernels) and with every pointwise/Gemm weight held to 7 bits
  (ORT's ``reduce_range``), for comparison;
* ``ort-qs[-pre]``: ``onnxruntime.quantization.quantize_static`` (QDQ, per-channel int8 weights, uint8 activations,
  Softmax left float, MinMax), with ``-pre`` after ``quant_pre_process`` (which folds the batch norms ORT cannot
  fuse otherwise); at default options (its u8 x s8 kernels saturate on x86 without VNNI) and with
  ``session.x64quantprecision=1`` (ORT's documented fix: weights made uint8 at load time).

Targets (issue 28): on a CPU without VNNI, agreement within 1 point of the same model run as fake-quant and latency
<= 0.8x onnx-fp32 (2 threads, batch 1), judged on the upper end of the ratio's interval. Timing goes through
quantship's own interleaved bench (``bench.latency_pass``, issue 23): one worker process per model, every model timed
in every round, the order rotated; ``--processes N`` repeats that run in fresh processes (a session's memory placement
moves one model's time by up to ~20 % on this VM). The ratio is the median over every round of every repeat of (the
model's p50 / fp32's p50 in the same round), with a distribution-free 95 % interval for that median (binomial order
statistics); each repeat's own ratio is printed beside it, with fp32's p50 per repeat (the VM's speed state: fp32
MobileNetV2 takes ~8 ms in the fast one, 17-26 ms in the slow ones) and the bench's stability flags.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent))
FAKE_QUANT = (("session.disable_quant_qdq", "1"),)
X64 = (("session.x64quantprecision", "1"),)


def cpu_description() -> str:
    from quantship.evaluate.environment import cpu_flags, cpu_model

    return f"{cpu_model()} ({os.cpu_count()} cores; flags: {cpu_flags()})"


def prepare(args, work: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """The fp32 ONNX export and preprocessed calibration / evaluation arrays."""
    from smoke import load

    from quantship.convert.onnx import convert_to_onnx

    loaded = load(args.model, args.weights)
    art = convert_to_onnx(loaded.model, work / "fp32.onnx", log_path=work / "convert.log")
    if args.data:
        from quantship.data.datasets import iter_batches, load_dataset, split_calibration

        ds = load_dataset(args.data)
        calib, ev = split_calibration(ds, args.calib_images, limit=args.eval_images, seed=0)
        cal = np.concatenate([b.inputs[:, 0] for b in iter_batches(calib, loaded.preprocess, 32)])
        evx = np.concatenate([b.inputs[:, 0] for b in iter_batches(ev, loaded.preprocess, 32)])
    else:
        from calibration import photo_crops  # benchmarks/calibration.py, beside this file

        from quantship.data.preprocess import normalize

        size = loaded.preprocess.size[0]
        cal = normalize(photo_crops(args.calib_images, size, seed=11), loaded.preprocess)
        evx = normalize(photo_crops(args.eval_images, size, seed=12), loaded.preprocess)
    return art.path, cal.astype(np.float32), evx.astype(np.float32)


def layouts(names: list[str]) -> dict[str, object]:
    """Weight layouts to build per method: ``pairs`` (the default), ``uint8`` (the previous default), ``7bit``."""
    from quantship.convert.ort_layout import OrtWeights, WeightType

    known = {
        "pairs": ("", OrtWeights()),
        "uint8": (" [uint8 w]", OrtWeights(pointwise=WeightType.UINT8, gemm=WeightType.UINT8)),
        "7bit": (" [7-bit w]", OrtWeights(pointwise=WeightType.INT8_7BIT, gemm=WeightType.INT8_7BIT)),
    }
    unknown = [n for n in names if n not in known]
    if unknown:
        sys.exit(f"--layouts: unknown {unknown}; choose from {sorted(known)}")
    return {known[n][0]: known[n][1] for n in names}


def build_ours(
    fp32: Path, cal: np.ndarray, methods: list[str], work: Path, threads: int, weight_layouts: dict
) -> dict[str, Path]:
    from quantship.calibrate.api import calibrate
    from quantship.convert.calibrated import collect_statistics, write_ort_model

    t = time.perf_counter()
    collector = collect_statistics(fp32, (cal[i : i + 8] for i in range(0, len(cal), 8)), scope="qdq", threads=threads)
    out = {}
    for method in methods:
        result = calibrate(collector, method)
        for tag, weights in weight_layouts.items():
            path = work / f"ort-int8-{method}{tag.strip().replace(' ', '-').strip('[]')}.onnx"
            report = write_ort_model(result, fp32, path, {"target": f"ort-int8-{method}"}, weights)
            out[f"ort-int8-{method}{tag}"] = path
            limited = [la for la in report.layers if la.limited]
            if limited:
                print(
                    f"  ort-int8-{method}{tag}: {len(limited)} of {len(report.layers)} weighted layers have channels "
                    f"held below the pair limit ({sum(la.limited for la in limited)} channels; fewest levels "
                    f"{min(la.min_levels for la in limited)})",
                    flush=True,
                )
    print(f"quantship: one statistics pass + {len(out)} layouts in {time.perf_counter() - t:.1f} s", flush=True)
    return out


def build_ort(fp32: Path, cal: np.ndarray, work: Path, entropy: bool) -> dict[str, Path]:
    """ORT's quantize_static, with and without quant_pre_process (MinMax; Entropy when asked)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):  # one image per batch: ORT's histogram collector needs equal batches
        def __init__(self):
            self.i = 0

        def get_next(self):
            if self.i >= len(cal):
                return None
            self.i += 1
            return {"input": cal[self.i - 1 : self.i]}

    pre = work / "fp32-pre.onnx"
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    out = {}
    methods = [("minmax", CalibrationMethod.MinMax)] + ([("entropy", CalibrationMethod.Entropy)] if entropy else [])
    for source, tag in ((pre, "-pre"), (fp32, "")):
        softmax = [n.name for n in onnx.load(str(source)).graph.node if n.op_type == "Softmax"]
        for name, method in methods:
            path = work / f"ort-qs{tag}-{name}.onnx"
            t = time.perf_counter()
            quantize_static(
                str(source),
                str(path),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=method,
                nodes_to_exclude=softmax,
            )
            out[f"ort-qs{tag}-{name}"] = path
            print(f"ORT quantize_static{tag} {name}: {time.perf_counter() - t:.1f} s", flush=True)
    return out


def outputs(path: Path, x: np.ndarray, config=(), threads: int = 2) -> np.ndarray:
    from quantship.runtime.onnxruntime import make_session

    s = make_session(path, threads, session_config=config)
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i : i + 16]})[0] for i in range(0, len(x), 16)])


def kernels(path: Path, config=()) -> str:
    from quantship.runtime.onnxruntime import fused_int8_ops, optimized_graph

    graph = optimized_graph(path, config)
    ops = Counter(op.split(":")[0] for op in fused_int8_ops(graph))
    floats = sum(n.op_type in ("Conv", "FusedConv", "Gemm", "MatMul", "FusedGemm") for n in graph.graph.node)
    return ", ".join(f"{k} {n}" for k, n in sorted(ops.items())) + f"; float Conv/Gemm {floats}"


def latency(
    models: dict[str, tuple[Path, tuple]], threads: int, stop, per_round: int, processes: int
) -> tuple[dict[str, dict], list[str]]:
    """Batch-1 latency through quantship's interleaved bench (``quantship.evaluate.bench.latency_pass``: one worker
    process per model, every model in every round, the order rotated), ``processes`` times over, each time in fresh
    processes (a session's memory placement moves a model's time by up to ~20 % on this VM: one process pair says
    little). Per model: the ratio to ``onnx-fp32`` pooled over every round of every repeat (median of the per-round
    p50 ratios, distribution-free 95 % interval), the median of each repeat's own ratio, and the state the VM was
    in (fp32's p50; the bench's speed-switch and load checks)."""
    from quantship.evaluate.bench import latency_pass
    from quantship.evaluate.stability import median_interval, speed_switch

    files = [(name, str(path), config) for name, (path, config) in models.items()]
    per_round_ratios: dict[str, list[float]] = {n: [] for n in models}
    repeat_ratios: dict[str, list[float]] = {n: [] for n in models}
    p50s: dict[str, list[float]] = {n: [] for n in models}
    states: list[str] = []  # per pooled round: the VM's speed state (fp32's round p50 against the switch's midpoint)
    fp32_round_ms: list[float] = []
    notes = []
    for k in range(processes):
        lines: list[str] = []
        rows = latency_pass(files, threads, stop, lines, per_round, reference="onnx-fp32")
        ref = np.array(rows["onnx-fp32"]["round_p50_ms"])
        switch = speed_switch(ref)
        mid = (switch.fast_ms + switch.slow_ms) / 2 if switch else None
        states += ["one" if mid is None else ("fast" if v < mid else "slow") for v in ref]
        fp32_round_ms += list(ref)
        for n, row in rows.items():
            per_round_ratios[n] += list(np.array(row["round_p50_ms"]) / ref)
            repeat_ratios[n].append(float(row.get("ratio_to_reference", 1.0)))
            p50s[n].append(float(row["latency_ms_p50"]))
        fp32 = rows["onnx-fp32"]
        unstable = sum(r.get("stable") is False for r in rows.values())
        notes.append(
            f"process set {k + 1}/{processes}: {fp32['rounds']} rounds, fp32 p50 {fp32['latency_ms_p50']:.2f} ms, "
            f"load {fp32.get('load_average_before') or 0:.1f}"
            + (f"; {unstable} of {len(rows)} models flagged unstable" if unstable else "")
            + (f" (fp32: {fp32['unstable_reason']})" if fp32.get("stable") is False else "")
        )
        print("  " + notes[-1], flush=True)
    # The rounds of each speed state, and fp32's p50 in them: the same for every model.
    fp32_ms = np.array(fp32_round_ms)
    picks = {
        state: (pick, float(np.median(fp32_ms[pick])))
        for state in ("fast", "slow", "one")
        if (pick := np.array([x == state for x in states], bool)).sum() >= 6  # 95 % coverage needs 6 rounds
    }
    out = {}
    for n in models:
        r = np.array(per_round_ratios[n])
        lo, hi, coverage = median_interval(r)
        out[n] = {
            "p50_ms": float(np.median(p50s[n])),
            "ratio": float(np.median(r)),
            "ratio_lo": lo,
            "ratio_hi": hi,
            "rounds": int(r.size),
            "ratio_per_process_set": repeat_ratios[n],
            "p50_ms_per_process_set": p50s[n],
        }
        for state, (pick, state_fp32_ms) in picks.items():
            lo, hi, _ = median_interval(r[pick])
            out[n][f"state_{state}"] = [float(np.median(r[pick])), lo, hi, int(pick.sum()), state_fp32_ms]
    return out, notes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--weights", default="pretrained")
    p.add_argument("--data", help="KIND:PATH of real images (default: crops of scikit-image photos)")
    p.add_argument("--calib-images", type=int, default=60, help="calibration images (60; ORT's Entropy needs <= 60)")
    p.add_argument("--eval-images", type=int, default=240, help="images for the agreement check (240)")
    p.add_argument("--methods", default="max,entropy,percentile,mse", help="quantship calibrators")
    p.add_argument("--ort-entropy", action="store_true", help="also ORT's Entropy calibration (memory: ~85 MB/image)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of every session (2)")
    p.add_argument("--rounds", type=int, default=20, help="latency rounds at least, per process set (20)")
    p.add_argument("--seconds", type=float, default=60.0, help="timing seconds at most, per process set (60)")
    p.add_argument("--processes", type=int, default=1, help="process sets: the interleaved run repeated (1)")
    p.add_argument("--per-round", type=int, default=10, help="calls per model per round (10)")
    p.add_argument("--layouts", default="pairs,uint8,7bit", help="quantship weight layouts: pairs,uint8,7bit")
    p.add_argument("--no-latency", action="store_true")
    p.add_argument("--work", help="working folder (default: a temporary one)")
    p.add_argument("--smoke", action="store_true", help="tiny random model, 4 images: checks the script runs")
    args = p.parse_args()
    if args.smoke:
        from smoke import tiny_model

        args.work = args.work or tempfile.mkdtemp(prefix="quantship-int8cpu-smoke-")
        args.model, args.weights = tiny_model(Path(args.work)), None
        args.calib_images, args.eval_images, args.methods, args.rounds, args.per_round = 4, 4, "max,entropy", 2, 2
        args.seconds, args.processes = 2.0, 2
    if args.ort_entropy and args.calib_images > 60:
        sys.exit("ORT's Entropy keeps every intermediate output of every image: use --calib-images 60 or fewer")

    import onnxruntime

    work = Path(args.work or tempfile.mkdtemp(prefix="quantship-int8cpu-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_description()}; onnxruntime {onnxruntime.__version__}; load average {os.getloadavg()[0]:.1f}")
    print(
        f"model {args.model} ({args.weights}), {args.calib_images} calibration / {args.eval_images} evaluation "
        f"images ({args.data or 'crops of scikit-image photos'}); work dir {work}",
        flush=True,
    )
    fp32, cal, evx = prepare(args, work)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    weight_layouts = layouts([x.strip() for x in args.layouts.split(",") if x.strip()])
    ours = build_ours(fp32, cal, methods, work, args.threads, weight_layouts)
    theirs = build_ort(fp32, cal, work, args.ort_entropy)

    ref = outputs(fp32, evx, threads=args.threads)
    top = ref.argmax(1)
    rows: dict[str, dict] = {"onnx-fp32": {"agree": 1.0, "l1": 0.0, "kernels": "-", "path": fp32, "config": ()}}
    runs = [(n, p, ()) for n, p in ours.items()]
    runs += [(n, p, ()) for n, p in theirs.items()] + [(f"{n} +x64quantprecision", p, X64) for n, p in theirs.items()]
    for name, path, config in runs:
        y = outputs(path, evx, config, args.threads)
        fake = outputs(path, evx, FAKE_QUANT, args.threads)
        rows[name] = {
            "agree": float(np.mean(y.argmax(1) == top)),
            "agree_fake": float(np.mean(fake.argmax(1) == top)),
            "l1": float(np.abs(y - ref).sum(1).mean()),
            "kernels": kernels(path, config),
            "path": path,
            "config": config,
        }
        print(
            f"  {name}: agreement {rows[name]['agree']:.3f} (as fake-quant {rows[name]['agree_fake']:.3f})", flush=True
        )

    if not args.no_latency:
        load_before = os.getloadavg()[0]
        from quantship.evaluate.stability import StopRule

        # Precision 0.001: the run goes on to --seconds, so every process set gives the rounds it can.
        stop = StopRule(ratio_precision=0.001, min_rounds=max(2, args.rounds), max_seconds=args.seconds)
        models = {n: (r["path"], r["config"]) for n, r in rows.items()}
        lat, notes = latency(models, args.threads, stop, args.per_round, args.processes)
        for n, v in lat.items():
            rows[n].update(v)
        load = f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
        load += "".join(f"\n  {line}" for line in notes)
    else:
        load = "latency not measured"

    print(f"\nCPU: {cpu_description()}; {args.threads} threads, batch 1; {load}")
    head = f"{'model':44s}{'agree':>7s}{'fake-q':>8s}{'L1':>7s}{'p50 ms':>8s}{'vs fp32 [95% CI]':>24s}"
    head += f"{'per process set':>20s}  int8 kernels ORT runs"
    print(head + "\n" + "-" * len(head))
    for name, r in rows.items():
        fake = f"{r['agree_fake']:8.3f}" if "agree_fake" in r else f"{'-':>8s}"
        lat_s = (
            f"{r['p50_ms']:8.2f}{r['ratio']:7.3f}x [{r['ratio_lo']:.3f}, {r['ratio_hi']:.3f}]"
            + f"{' '.join(f'{v:.2f}' for v in r['ratio_per_process_set']):>20s}"
            if "p50_ms" in r
            else f"{'-':>8s}{'-':>24s}{'-':>20s}"
        )
        print(f"{name:44s}{r['agree']:7.3f}{fake}{r['l1']:7.3f}{lat_s}  {r['kernels']}")
    state_rows = [(n, r) for n, r in rows.items() if any(k.startswith("state_") for k in r)]
    if state_rows:
        print("\nThe same rounds by the VM's speed state (fp32's round p50 on either side of the switch's midpoint):")
        for name, r in state_rows:
            cells = [
                f"{st}: {v[0]:.3f}x [{v[1]:.3f}, {v[2]:.3f}] in {v[3]} rounds (fp32 {v[4]:.1f} ms)"
                for st in ("fast", "slow", "one")
                if (v := r.get(f"state_{st}"))
            ]
            print(f"  {name:44s}" + "; ".join(cells))
    saved = {n: {k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()} for n, r in rows.items()}
    (work / "int8_cpu.json").write_text(json.dumps({"cpu": cpu_description(), "load": load, "rows": saved}, indent=1))
    print(f"\nresults: {work / 'int8_cpu.json'}")


if __name__ == "__main__":
    main()
