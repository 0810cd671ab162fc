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
<= 0.8x onnx-fp32 (2 threads, batch 1), judged on the upper end of the ratio's interval. The ratio is the median
over rounds of (the model's p50 / fp32's p50 in the same round), every model timed in every round (order
alternating), with a distribution-free 95 % interval for that median (binomial order statistics). The load average
is printed with the figures.
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


def latency(models: dict[str, tuple[Path, tuple]], threads: int, rounds: int, per_round: int) -> dict[str, dict]:
    """Batch-1 latency, every model in each round (order alternating), p50 over all calls, and the median over
    rounds of the round's p50 / fp32's (cancels slow load drifts)."""
    from quantship.runtime.onnxruntime import make_session

    x = np.zeros((1, 224, 224, 3), np.float32)
    sessions = {}
    for name, (path, config) in models.items():
        s = make_session(path, threads, session_config=config)
        x = np.zeros([d if isinstance(d, int) else 1 for d in s.get_inputs()[0].shape], np.float32)
        sessions[name] = s
    feed_name = next(iter(sessions.values())).get_inputs()[0].name
    for s in sessions.values():
        for _ in range(10):
            s.run(None, {feed_name: x})
    times = {n: [] for n in sessions}
    per_round_p50 = {n: [] for n in sessions}
    names = list(sessions)
    for r in range(rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            t = []
            for _ in range(per_round):
                t0 = time.perf_counter()
                sessions[n].run(None, {feed_name: x})
                t.append((time.perf_counter() - t0) * 1e3)
            times[n] += t
            per_round_p50[n].append(float(np.median(t)))
    ref = np.array(per_round_p50["onnx-fp32"])
    out = {}
    for n in names:
        ratios = np.array(per_round_p50[n]) / ref
        lo, hi = median_interval(ratios)
        out[n] = {
            "p50_ms": float(np.median(times[n])),
            "ratio": float(np.median(ratios)),
            "ratio_lo": lo,
            "ratio_hi": hi,
            "calls": len(times[n]),
        }
    return out


def median_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Distribution-free interval for the median of ``values``: order statistics ``(j, n - 1 - j)`` with the largest
    ``j`` such that a Binomial(n, 1/2) falls in ``[j + 1, n - j - 1]`` with probability >= ``confidence``."""
    from math import comb

    v = np.sort(np.asarray(values, float))
    n = len(v)
    cdf = np.cumsum([comb(n, k) for k in range(n + 1)]) / 2.0**n
    j = 0
    while j + 1 < n - 1 - (j + 1) and 1 - 2 * cdf[j + 1] >= confidence:
        j += 1
    if 1 - 2 * cdf[j] < confidence:
        return float(v[0]), float(v[-1])
    return float(v[j]), float(v[n - 1 - j])


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
    p.add_argument("--rounds", type=int, default=20, help="latency rounds (20)")
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
        lat = latency({n: (r["path"], r["config"]) for n, r in rows.items()}, args.threads, args.rounds, args.per_round)
        for n, v in lat.items():
            rows[n].update(v)
        load = f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    else:
        load = "latency not measured"

    print(f"\nCPU: {cpu_description()}; {args.threads} threads, batch 1; {load}")
    head = f"{'model':44s}{'agree':>7s}{'fake-q':>8s}{'L1':>7s}{'p50 ms':>8s}{'vs fp32 [95% CI]':>21s}"
    head += "  int8 kernels ORT runs"
    print(head + "\n" + "-" * len(head))
    for name, r in rows.items():
        fake = f"{r['agree_fake']:8.3f}" if "agree_fake" in r else f"{'-':>8s}"
        lat_s = (
            f"{r['p50_ms']:8.2f}{r['ratio']:7.2f}x [{r['ratio_lo']:.2f}, {r['ratio_hi']:.2f}]"
            if "p50_ms" in r
            else f"{'-':>8s}{'-':>21s}"
        )
        print(f"{name:44s}{r['agree']:7.3f}{fake}{r['l1']:7.3f}{lat_s}  {r['kernels']}")
    saved = {n: {k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()} for n, r in rows.items()}
    (work / "int8_cpu.json").write_text(json.dumps({"cpu": cpu_description(), "load": load, "rows": saved}, indent=1))
    print(f"\nresults: {work / 'int8_cpu.json'}")


if __name__ == "__main__":
    main()
