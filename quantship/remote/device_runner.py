"""quantship's device runner: ONE self-contained file copied to the device and run there by ``quantship ...
--remote``. It needs Python >= 3.10, numpy and the runtime of the artifact (ai-edge-litert or tflite-runtime,
onnxruntime, tensorrt with cuda-python); it imports nothing of quantship and no TensorFlow.

Protocol (stdin -> stdout, one request, one answer): a JSON object on one line, followed by the raw bytes
(C order) of each tensor its ``tensors`` list declares (``name``, ``dtype``, ``shape``), back to back. Answers
have ``ok`` true (and their own ``tensors``) or false with ``error`` and ``kind``. Commands: ``hello``, ``load``,
``infer``, ``time``, ``conversion``, ``rusage``, ``build_engine``, ``bye``.

Each runtime is driven as quantship's local runner drives it (same interpreter/session options, same integer
(de)quantization, same timed call), so a row measured here compares with a row measured on the host.
"""

import ctypes
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
from importlib import metadata

try:
    import numpy as np
except ImportError:  # said in the answer to the first request, with the package to install
    np = None

PROTOCOL = 1


class Refused(Exception):
    """An error answered to the host (``kind`` says which: missing, load, input, build, engine, disk)."""

    def __init__(self, message, kind="error", package=None):
        super().__init__(message)
        self.kind = kind
        self.package = package


def _need(module, package, purpose):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:
        raise Refused(
            f"{purpose} needs the Python module '{module}' on the device ({exc}); install it there: "
            f"pip install {package}",
            "missing",
            package,
        ) from None


# ---------------------------------------------------------------------------------------------------- tensors
class Meta:
    def __init__(self, name, shape, dtype, scale=None, zero_point=None):
        self.name = name
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.scale = scale
        self.zero_point = zero_point

    @property
    def quantized(self):
        return self.scale is not None and self.dtype.kind in "iu"

    def as_json(self):
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype.name,
            "scale": self.scale,
            "zero_point": self.zero_point,
        }


def quantize(x, m):
    info = np.iinfo(m.dtype)
    q = np.round(x / m.scale) + m.zero_point
    return np.clip(q, info.min, info.max).astype(m.dtype)


def dequantize(q, m):
    return ((q.astype(np.float32) - np.float32(m.zero_point)) * np.float32(m.scale)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------- runners
class Runner:
    """The same call quantship's ``Runner.infer`` makes: feed checks and conversions inside the timed query."""

    def __init__(self):
        self.last_query_time = None
        self.last_inference_time = None
        self.last_timings = {}
        self._runtime_seconds = None

    def _time_runtime(self, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        self._runtime_seconds = time.perf_counter() - start
        return result

    def infer(self, feed, raw=False):
        start = time.perf_counter()
        checked = {}
        for m in self.inputs:
            if m.name not in feed:
                raise Refused(f"missing input '{m.name}'", "input")
            x = np.asarray(feed[m.name])
            fixed = [(i, d) for i, d in enumerate(m.shape) if d is not None and i > 0]
            if x.ndim != len(m.shape) or any(x.shape[i] != d for i, d in fixed):
                raise Refused(f"wrong shape for input '{m.name}': got {tuple(x.shape)}, expected {m.shape}", "input")
            if not raw and x.dtype != np.float32:
                x = x.astype(np.float32)
            checked[m.name] = x
        self._runtime_seconds = None
        out = self.infer_impl(checked, raw)
        wall = time.perf_counter() - start
        self.last_query_time = wall
        self.last_inference_time = self._runtime_seconds if self._runtime_seconds is not None else wall
        return out

    def close(self):
        pass


def _litert():
    try:
        from ai_edge_litert import interpreter

        return interpreter, "ai-edge-litert"
    except ImportError:
        pass
    try:
        from tflite_runtime import interpreter

        return interpreter, "tflite-runtime"
    except ImportError:
        raise Refused(
            "a .tflite model needs LiteRT on the device; install it there: pip install ai-edge-litert "
            "(or tflite-runtime)",
            "missing",
            "ai-edge-litert",
        ) from None


def _tflite_meta(d):
    shape = [int(v) for v in d.get("shape_signature", d["shape"])]
    scale, zp = d.get("quantization", (0.0, 0))
    q = scale != 0.0
    return Meta(
        d["name"],
        [None if v < 0 else v for v in shape],
        d["dtype"],
        float(scale) if q else None,
        int(zp) if q else None,
    )


class TfliteRunner(Runner):
    def __init__(self, path, threads=None, use_xnnpack=True):
        super().__init__()
        lite, _ = _litert()
        kind = getattr(lite, "OpResolverType", None)
        kwargs = {"model_path": path, "num_threads": threads}
        if kind is not None:
            kwargs["experimental_op_resolver_type"] = (
                kind.AUTO if use_xnnpack else kind.BUILTIN_WITHOUT_DEFAULT_DELEGATES
            )
        try:
            self._interp = lite.Interpreter(**kwargs)
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise Refused(f"not a loadable TFLite model ({str(exc).strip()})", "load") from None
        self._batch = None
        self._in = [(d["index"], d["dtype"], _tflite_meta(d)) for d in self._interp.get_input_details()]
        self._out = [(d["index"], _tflite_meta(d)) for d in self._interp.get_output_details()]
        self.inputs = [m for _, _, m in self._in]
        self.outputs = [m for _, m in self._out]

    def _ensure_batch(self, batch):
        if batch == self._batch:
            return
        for d in self._interp.get_input_details():
            shape = list(d["shape"])
            if shape[0] != batch:
                shape[0] = batch
                self._interp.resize_tensor_input(d["index"], shape, strict=False)
        self._interp.allocate_tensors()
        self._batch = batch

    def execution_details(self, feed=None):
        """quantship's ``delegate_coverage``: the nodes the delegate (XNNPACK) took, read from the node list."""
        ops = self._interp._get_ops_details()
        delegates = [op for op in ops if op["op_name"] == "DELEGATE"]
        originals = [op for op in ops if op["op_name"] != "DELEGATE"]
        producer = {int(t): op["index"] for op in originals for t in op["outputs"] if t >= 0}
        by_index = {op["index"]: op for op in originals}
        replaced = set()
        for d in delegates:
            stop = {int(t) for t in d["inputs"]}
            todo = [int(t) for t in d["outputs"]]
            while todo:
                t = todo.pop()
                node = producer.get(t)
                if t in stop or node is None or node in replaced:
                    continue
                replaced.add(node)
                todo += [int(x) for x in by_index[node]["inputs"] if x >= 0]
        return {"delegated_nodes": len(replaced), "total_nodes": len(originals), "delegate_partitions": len(delegates)}

    def infer_impl(self, feed, raw):
        interp = self._interp
        self._ensure_batch(next(iter(feed.values())).shape[0])
        for index, dtype, m in self._in:
            x = feed[m.name]
            if not raw and m.quantized:
                x = quantize(x, m)
            interp.set_tensor(index, np.ascontiguousarray(x.astype(dtype, copy=False)))
        self._time_runtime(interp.invoke)
        out = {}
        for index, m in self._out:
            y = interp.get_tensor(index)
            out[m.name] = y if raw or not m.quantized else dequantize(y, m)
        return out


_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
}
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


FUSED_INT8_OPS = frozenset(
    {
        "QLinearConv",
        "QLinearMatMul",
        "QLinearAdd",
        "QLinearMul",
        "QLinearAveragePool",
        "QLinearGlobalAveragePool",
        "QLinearSigmoid",
        "QLinearLeakyRelu",
        "QLinearConcat",
        "QLinearSoftmax",
        "QGemm",
        "ConvInteger",
        "MatMulInteger",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
        "NhwcQLinearConv",
    }
)


class OnnxRunner(Runner):
    def __init__(self, path, threads=None, providers=("cpu",), session_config=()):
        super().__init__()
        self._args = (path, threads, providers, session_config)
        self._session = self._make(path, threads, providers, session_config)
        self.providers = list(self._session.get_providers())
        self.inputs = self._meta(self._session.get_inputs())
        self.outputs = self._meta(self._session.get_outputs())
        self._names = [m.name for m in self.outputs]

    @staticmethod
    def _make(path, threads, providers, session_config, profile_prefix=None):
        ort = _need("onnxruntime", "onnxruntime", "an .onnx model")
        names = [_PROVIDERS.get(p.strip().lower(), p.strip()) for p in providers if p.strip()]
        available = ort.get_available_providers()
        missing = [p for p in names if p not in available]
        if missing:
            raise Refused(
                f"ONNX Runtime execution provider(s) {missing} are not available on the device (available: "
                f"{available}); install onnxruntime-gpu there for CUDA/TensorRT",
                "load",
            )
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        for key, value in session_config:
            opts.add_session_config_entry(key, str(value))
        if profile_prefix is not None:
            opts.enable_profiling = True
            opts.profile_file_prefix = profile_prefix
        try:
            return ort.InferenceSession(path, sess_options=opts, providers=names)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            first = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else type(exc).__name__
            raise Refused(f"ONNX Runtime {ort.__version__} cannot load the model ({first})", "load") from None

    def execution_details(self, feed=None):
        """quantship's ``executed_kernels``: the kernel types a profiled session with the same options runs."""
        if feed is None:
            return {}

        tmp = tempfile.mkdtemp(prefix="profile-", dir=".")
        try:
            session = self._make(*self._args, profile_prefix=os.path.join(tmp, "profile"))
            session.run(None, feed)
            with open(session.end_profiling()) as f:
                events = json.load(f)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        counts = {}
        for e in events:
            args = e.get("args") or {}
            if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time") and "op_name" in args:
                provider = str(args.get("provider", "")).replace("ExecutionProvider", "")
                key = f"{args['op_name']}@{provider}" if provider else args["op_name"]
                counts[key] = counts.get(key, 0) + 1
        kernels = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        int8 = sum(n for k, n in kernels.items() if k.split("@")[0] in FUSED_INT8_OPS)
        return {"ort_kernels": kernels, "ort_int8_kernels": int8}

    @staticmethod
    def _meta(items):
        return [
            Meta(i.name, [d if isinstance(d, int) else None for d in i.shape], _ORT_TYPES.get(i.type, "float32"))
            for i in items
        ]

    def infer_impl(self, feed, raw):
        try:
            outs = self._time_runtime(self._session.run, self._names, feed)
        except Exception as exc:  # noqa: BLE001
            raise Refused(f"inference failed: {str(exc).strip().splitlines()[0][:400]}", "input") from None
        return dict(zip(self._names, outs))


# ---------------------------------------------------------------------------------------------------- TensorRT
def _tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise Refused(
            "a TensorRT engine needs TensorRT on the device (on a Jetson: JetPack's python3-libnvinfer; elsewhere: "
            "pip install tensorrt)",
            "missing",
            "tensorrt",
        ) from None
    return trt


def _cudart():
    try:
        from cuda.bindings import runtime

        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart

        return cudart
    except ImportError:
        raise Refused(
            "a TensorRT engine needs cuda-python on the device for its GPU buffers: pip install cuda-python",
            "missing",
            "cuda-python",
        ) from None


def _check(result, what):
    rt = _cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != rt.cudaError_t.cudaSuccess:
        raise Refused(f"CUDA error in {what}: {err}", "load")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def gpu_info():
    """GPU name and compute capability, or {} without a usable GPU / cuda-python."""
    try:
        rt = _cudart()
        if not _check(rt.cudaGetDeviceCount(), "cudaGetDeviceCount"):
            return {}
        prop = _check(rt.cudaGetDeviceProperties(0), "cudaGetDeviceProperties")
    except Refused:
        return {}
    name = prop.name.decode(errors="replace").rstrip("\x00") if isinstance(prop.name, bytes) else str(prop.name)
    return {"gpu": name, "compute_capability": f"{prop.major}.{prop.minor}"}


def engine_check(manifest, env):
    """Why an engine built elsewhere cannot run here (TensorRT version, GPU, compute capability), or None."""
    built = manifest.get("environment") or {}
    problems = []
    for key, label in (("tensorrt", "TensorRT"), ("compute_capability", "compute capability"), ("gpu", "GPU")):
        if built.get(key) and built[key] != env.get(key):
            problems.append(f"{label} {built[key]} (this device: {env.get(key)})")
    return "; ".join(problems) or None


class _Logger:
    def __new__(cls, trt, sink):
        class L(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)

            def log(self, severity, msg):
                if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                    sink.append(msg)

        return L()


class TrtRunner(Runner):
    """H2D + execute_async_v3 + D2H on one stream, synchronised (the local TrtRunner's timed call)."""

    def __init__(self, path, manifest_path=None):
        super().__init__()
        trt = _tensorrt()
        rt = _cudart()
        env = {"tensorrt": trt.__version__, **gpu_info()}
        if manifest_path and os.path.isfile(manifest_path):
            with open(manifest_path) as f:
                problem = engine_check(json.load(f), env)
            if problem:
                raise Refused(
                    f"built with {problem}; TensorRT engines only run on the TensorRT version and GPU model they were "
                    "built with: build it on this device (quantship convert --remote ... --targets trt-...)",
                    "engine",
                )
        self._errors = []
        self._runtime = trt.Runtime(_Logger(trt, self._errors))
        with open(path, "rb") as f:
            self._engine = self._runtime.deserialize_cuda_engine(f.read())
        if self._engine is None:
            raise Refused(
                f"TensorRT {trt.__version__} cannot load this engine "
                f"({'; '.join(self._errors[-2:]) or 'built elsewhere'})",
                "engine",
            )
        self._context = self._engine.create_execution_context()
        engine = self._engine
        self._io = []
        batch_max = 1
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            shape = tuple(engine.get_tensor_shape(name))
            if is_input and any(d < 0 for d in shape):
                max_shape = tuple(engine.get_tensor_profile_shape(name, 0)[2])
                batch_max = max(batch_max, max_shape[0])
            else:
                max_shape = shape
            self._io.append([name, is_input, shape, max_shape, np.dtype(trt.nptype(engine.get_tensor_dtype(name)))])
        for t in self._io:
            if not t[1]:
                t[3] = tuple(batch_max if (i == 0 and d < 0) else d for i, d in enumerate(t[2]))
        self._bufs = {}
        for name, _, _, max_shape, dtype in self._io:
            nbytes = max(1, int(np.prod(max_shape)) * dtype.itemsize)
            host_ptr = _check(rt.cudaMallocHost(nbytes), "cudaMallocHost")
            dev_ptr = _check(rt.cudaMalloc(nbytes), "cudaMalloc")

            arr = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(int(host_ptr))).view(dtype)
            self._bufs[name] = (host_ptr, dev_ptr, arr, nbytes)
            self._context.set_tensor_address(name, int(dev_ptr))
        self._stream = _check(rt.cudaStreamCreate(), "cudaStreamCreate")
        self._events = [_check(rt.cudaEventCreate(), "cudaEventCreate") for _ in range(4)]
        self.inputs = [Meta(t[0], [None if d < 0 else d for d in t[2]], t[4]) for t in self._io if t[1]]
        self.outputs = [Meta(t[0], [None if d < 0 else d for d in t[2]], t[4]) for t in self._io if not t[1]]

    def infer_impl(self, feed, raw):
        rt = _cudart()
        h2d, d2h = rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, is_input, shape, max_shape, dtype in self._io:
            if not is_input:
                continue
            x = np.ascontiguousarray(feed[name], dtype=dtype)
            host_ptr, dev_ptr, arr, nbytes = self._bufs[name]
            if x.nbytes > nbytes:
                raise Refused(f"input '{name}' of shape {x.shape} exceeds the engine's profile {max_shape}", "input")
            if any(d < 0 for d in shape) and not self._context.set_input_shape(name, x.shape):
                raise Refused(f"shape {x.shape} is outside the engine's profile for '{name}'", "input")
            arr[: x.size] = x.ravel()
        ev = self._events
        t0 = time.perf_counter()
        _check(rt.cudaEventRecord(ev[0], self._stream), "cudaEventRecord")
        for name, is_input, _, _, dtype in self._io:
            if is_input:
                host_ptr, dev_ptr, _, _ = self._bufs[name]
                n = int(np.prod(self._context.get_tensor_shape(name))) * dtype.itemsize
                _check(rt.cudaMemcpyAsync(dev_ptr, host_ptr, n, h2d, self._stream), "cudaMemcpyAsync H2D")
        _check(rt.cudaEventRecord(ev[1], self._stream), "cudaEventRecord")
        if not self._context.execute_async_v3(int(self._stream)):
            raise Refused(f"TensorRT execution failed ({'; '.join(self._errors[-2:])})", "input")
        _check(rt.cudaEventRecord(ev[2], self._stream), "cudaEventRecord")
        shapes = {}
        for name, is_input, _, _, dtype in self._io:
            if not is_input:
                host_ptr, dev_ptr, _, _ = self._bufs[name]
                shapes[name] = tuple(self._context.get_tensor_shape(name))
                n = int(np.prod(shapes[name])) * dtype.itemsize
                _check(rt.cudaMemcpyAsync(host_ptr, dev_ptr, n, d2h, self._stream), "cudaMemcpyAsync D2H")
        _check(rt.cudaEventRecord(ev[3], self._stream), "cudaEventRecord")
        _check(rt.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        self._runtime_seconds = time.perf_counter() - t0
        self.last_timings = {
            "h2d_ms": _check(rt.cudaEventElapsedTime(ev[0], ev[1]), "cudaEventElapsedTime"),
            "compute_ms": _check(rt.cudaEventElapsedTime(ev[1], ev[2]), "cudaEventElapsedTime"),
            "d2h_ms": _check(rt.cudaEventElapsedTime(ev[2], ev[3]), "cudaEventElapsedTime"),
        }
        out = {}
        for name, shape in shapes.items():
            y = self._bufs[name][2][: int(np.prod(shape))].reshape(shape).copy()
            out[name] = y if raw or y.dtype == np.float32 else y.astype(np.float32)
        return out

    def close(self):
        rt = _cudart()
        for host_ptr, dev_ptr, _, _ in self._bufs.values():
            rt.cudaFreeHost(host_ptr)
            rt.cudaFree(dev_ptr)
        for ev in self._events:
            rt.cudaEventDestroy(ev)
        rt.cudaStreamDestroy(self._stream)
        self._context = self._engine = self._runtime = None


def build_engine(req):
    """Build a TensorRT engine from an ONNX file on this device, as the host's plan says (flags by name); an
    implicit-int8 plan reads the host's calibration cache (no images come to the device)."""
    trt = _tensorrt()
    errors = []
    logger = _Logger(trt, errors)
    builder = trt.Builder(logger)
    flags = 0
    for name in req.get("network_flags", []):
        member = getattr(trt.NetworkDefinitionCreationFlag, name, None)
        if member is not None:
            flags |= 1 << int(member)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(req["onnx"]):
        errs = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise Refused(f"TensorRT's ONNX parser rejected the model: {'; '.join(errs) or 'unknown error'}", "build")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(req["workspace_mb"]) << 20)
    for name in req.get("builder_flags", []):
        config.set_flag(getattr(trt.BuilderFlag, name))
    bmin, bopt, bmax = req["batch"]
    profile = builder.create_optimization_profile()
    dynamic = False
    for i in range(network.num_inputs):
        t = network.get_input(i)
        shape = tuple(t.shape)
        if shape[0] < 0:
            dynamic = True
            rest = shape[1:]
            profile.set_shape(t.name, (bmin, *rest), (bopt, *rest), (bmax, *rest))
    if dynamic:
        config.add_optimization_profile(profile)
    calibrator = None
    if req.get("calibration_cache"):
        with open(req["calibration_cache"], "rb") as f:
            blob = f.read()
        base = (
            trt.IInt8EntropyCalibrator2
            if req.get("calibrator") != "IInt8MinMaxCalibrator"
            else trt.IInt8MinMaxCalibrator
        )

        class CacheOnly(base):
            """A calibrator that hands TensorRT the host's cache and no batches: TensorRT then skips calibration."""

            def __init__(self):
                base.__init__(self)

            def get_batch_size(self):
                return int(req.get("calibration_batch", 8))

            def get_batch(self, names):
                return None

            def read_calibration_cache(self):
                return blob

            def write_calibration_cache(self, cache):
                pass

        calibrator = CacheOnly()
        config.int8_calibrator = calibrator
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise Refused(f"TensorRT failed to build the engine: {'; '.join(errors[-3:]) or 'see the device log'}", "build")
    tmp = req["out"] + ".part"
    _write(tmp, bytes(serialized))
    os.replace(tmp, req["out"])
    return {"environment": {"tensorrt": trt.__version__, **gpu_info()}, "size_bytes": os.path.getsize(req["out"])}


def _write(path, data):
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as exc:
        raise Refused(f"cannot write {os.path.basename(path)} on the device: {exc.strerror}", "disk") from None


# ---------------------------------------------------------------------------------------------------- environment
def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def environment():
    """What the rows record about the device: the keys of quantship's environment.json plus machine details."""
    cpu, flags = platform.processor() or platform.machine(), "unknown"
    text = _read("/proc/cpuinfo") or ""
    for line in text.splitlines():
        low = line.lower()
        if low.startswith("model name") or (low.startswith("hardware") and cpu == platform.machine()):
            cpu = line.split(":", 1)[1].strip()
        if line.startswith("flags") or line.startswith("Features"):
            have = set(line.split(":", 1)[1].split())
            wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm", "sve")
            flags = " ".join(f for f in wanted if f in have) or "none"
    model = _read("/proc/device-tree/model")
    if model:
        cpu = f"{cpu} ({model.rstrip(chr(0))})"
    libraries = {"python": platform.python_version()}
    for module, dist in (
        ("numpy", "numpy"),
        ("ai_edge_litert", "ai-edge-litert"),
        ("tflite_runtime", "tflite-runtime"),
        ("onnxruntime", "onnxruntime"),
        ("tensorrt", "tensorrt"),
    ):
        try:
            libraries[dist] = metadata.version(dist)
        except Exception:  # noqa: BLE001 - not installed as a distribution (JetPack's apt packages)
            mod = sys.modules.get(module)
            if mod is not None and getattr(mod, "__version__", None):
                libraries[dist] = mod.__version__
    governor = _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    freq = _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq")
    env = {
        "cpu": cpu,
        "cpu_flags": flags,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "libraries": libraries,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_governor": governor,
        "cpu_frequency_mhz": round(int(freq) / 1000.0, 1) if freq and freq.isdigit() else None,
        "protocol": PROTOCOL,
        "pid": os.getpid(),
    }
    try:
        import tensorrt as trt

        env["tensorrt"] = trt.__version__
        env.update(gpu_info())
    except ImportError:
        pass
    return env


def load_average():
    try:
        return float(os.getloadavg()[0])
    except (OSError, AttributeError):
        return None


def cpu_mhz(cores=None):
    """Mean current frequency (MHz) of ``cores`` from cpufreq, else ``/proc/cpuinfo``; None when unreadable."""
    values = []
    for core in cores if cores is not None else range(os.cpu_count() or 1):
        text = _read(f"/sys/devices/system/cpu/cpu{core}/cpufreq/scaling_cur_freq")
        if not text or not text.isdigit():
            values = []
            break
        values.append(int(text) / 1e3)
    if not values:
        mhz, core = {}, None
        for line in (_read("/proc/cpuinfo") or "").splitlines():
            if line.startswith("processor"):
                core = int(line.split(":")[1])
            elif line.startswith("cpu MHz") and core is not None:
                mhz[core] = float(line.split(":")[1])
        values = [v for c, v in mhz.items() if cores is None or c in cores]
    return float(sum(values) / len(values)) if values else None


def machine_state(cores=None):
    return {"load_average": load_average(), "cpu_mhz": cpu_mhz(cores)}


def _other_threads_running():
    me = str(threading.get_native_id())
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return False
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if tid != me and state == "R":
            return True
    return False


def settle_threads(window=0.012, limit=0.5):
    """quantship.evaluate.stability.settle_threads: wait until this process's threads stop using the CPU (a
    runtime's thread pool spins for tens of ms after its last call, taking cores from the next configuration's
    round); (seconds waited, whether they went idle within ``limit``)."""
    start = time.perf_counter()
    before = time.process_time()
    while True:
        time.sleep(window)
        now, waited = time.process_time(), time.perf_counter() - start
        if now - before < window / 10 and not _other_threads_running():
            return waited, True
        if waited >= limit:
            return waited, False
        before = now


def peak_rss_mb():
    """This process's own peak resident memory (VmHWM), as quantship's local bench reads it."""
    for line in (_read("/proc/self/status") or "").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------------------------------------------- server
def sample_set(runner, count, batch, seed=0):
    """quantship's ``sample_set``: the same seeded float samples, made here instead of sent."""
    rng = np.random.default_rng(seed)
    n = max(count, batch)
    n -= n % batch
    arrays = {}
    for m in runner.inputs:
        shape = (n, *[d if d is not None else 1 for d in m.shape[1:]])
        arrays[m.name] = rng.uniform(-1, 1, shape).astype(np.float32)
    return [{k: v[i : i + batch] for k, v in arrays.items()} for i in range(0, n, batch)]


def native_feed(runner, feed):
    out = {}
    for m in runner.inputs:
        x = np.asarray(feed[m.name])
        out[m.name] = np.ascontiguousarray(quantize(x, m) if m.quantized else x.astype(m.dtype, copy=False))
    return out


class Server:
    def __init__(self, rfile, wfile):
        self.rfile = rfile
        self.wfile = wfile
        self.runner = None

    def read(self):
        line = self.rfile.readline()
        if not line:
            return None, {}
        req = json.loads(line)
        tensors = {}
        for t in req.get("tensors", []):
            dtype = np.dtype(t["dtype"])
            n = int(np.prod(t["shape"], dtype=np.int64)) * dtype.itemsize
            data = self.rfile.read(n)
            if len(data) != n:
                return None, {}
            tensors[t["name"]] = np.frombuffer(data, dtype=dtype).reshape(t["shape"])
        return req, tensors

    def answer(self, obj, tensors=None):
        items = list((tensors or {}).items())
        obj = dict(obj, tensors=[{"name": k, "dtype": v.dtype.name, "shape": list(v.shape)} for k, v in items])
        parts = [json.dumps(obj).encode() + b"\n"]
        parts += [np.ascontiguousarray(v).tobytes() for _, v in items]
        self.wfile.write(b"".join(parts))
        self.wfile.flush()

    def handle(self, req, tensors):
        cmd = req.get("cmd")
        if np is None:
            raise Refused("quantship's device runner needs numpy on the device: pip install numpy", "missing", "numpy")
        if cmd == "hello":
            return {"environment": environment()}, None
        if cmd == "load":
            return self.load(req), None
        if cmd in ("infer", "time", "conversion") and self.runner is None:
            raise Refused("load a model first", "error")
        if cmd == "infer":
            out = self.runner.infer(tensors, bool(req.get("raw")))
            r = self.runner
            return {"query_s": r.last_query_time, "runtime_s": r.last_inference_time, "timings": r.last_timings}, out
        if cmd == "time":
            return self.time(req), None
        if cmd == "conversion":
            return self.conversion(), None
        if cmd == "rusage":
            return {"peak_rss_mb": peak_rss_mb()}, None
        if cmd == "build_engine":
            return build_engine(req), None
        if cmd in ("bench_start", "round", "bench_finish") and self.runner is None:
            raise Refused("load a model first", "error")
        if cmd == "bench_start":
            return self.bench_start(req), None
        if cmd == "round":
            return {"query_ms": self.round(int(req["queries"]))}, None
        if cmd == "bench_finish":
            return self.bench_finish(req), None
        raise Refused(f"unknown command {cmd!r}", "error")

    def load(self, req):
        if req.get("cores"):
            os.sched_setaffinity(0, set(req["cores"]))
        path = req["path"]
        if not os.path.isfile(path):
            raise Refused(f"{os.path.basename(path)}: not on the device", "load")
        if self.runner is not None:
            self.runner.close()
            self.runner = None
        t0 = time.perf_counter()
        runtime = req["runtime"]
        if runtime == "tflite":
            runner = TfliteRunner(path, req.get("threads"), req.get("use_xnnpack", True))
        elif runtime == "onnx":
            runner = OnnxRunner(
                path, req.get("threads"), req.get("providers") or ("cpu",), req.get("session_config") or ()
            )
        elif runtime == "trt":
            runner = TrtRunner(path, req.get("manifest"))
        else:
            raise Refused(f"the device runner does not run '{runtime}' models", "load")
        init_ms = (time.perf_counter() - t0) * 1e3
        self.runner = runner
        return {
            "init_ms": init_ms,
            "inputs": [m.as_json() for m in runner.inputs],
            "outputs": [m.as_json() for m in runner.outputs],
            "providers": getattr(runner, "providers", None),
            "file_size_bytes": os.path.getsize(path),
        }

    def time(self, req):
        """quantship's ``time_runner`` on the device: warm-up, then timed queries over a preloaded sample set."""
        runner = self.runner
        raw = bool(req.get("raw"))
        feeds = sample_set(runner, int(req.get("samples", 64)), int(req.get("batch", 1)), int(req.get("seed", 0)))
        if raw:
            feeds = [native_feed(runner, f) for f in feeds]
        i = 0
        end = time.perf_counter() + float(req.get("warmup_seconds", 0.0))
        for _ in range(int(req.get("warmup_calls", 1))):
            runner.infer(feeds[i % len(feeds)], raw)
            i += 1
        while time.perf_counter() < end:
            runner.infer(feeds[i % len(feeds)], raw)
            i += 1
        query, runtime, phases = [], [], {}
        min_iters, min_seconds = int(req.get("min_iters", 20)), float(req.get("min_seconds", 0.0))
        start = time.perf_counter()
        while len(query) < min_iters or time.perf_counter() - start < min_seconds:
            runner.infer(feeds[i % len(feeds)], raw)
            i += 1
            query.append(runner.last_query_time * 1e3)
            runtime.append(runner.last_inference_time * 1e3)
            for k, v in (runner.last_timings or {}).items():
                phases.setdefault(k, []).append(v)
        return {"query_ms": query, "runtime_ms": runtime, "phases": phases}

    # -- the interleaved bench: quantship's ConfigSession, on the device ----------------------------------
    def bench_start(self, req):
        """First inference on its own, warm-up, and the machine's state before the rounds."""
        runner, raw = self.runner, bool(req.get("raw"))
        cores = req.get("cores")
        before = machine_state(cores)
        self._feeds = sample_set(runner, int(req.get("samples", 64)), int(req["batch"]))
        if raw:
            self._feeds = [native_feed(runner, f) for f in self._feeds]
        self._raw, self._next, self._runtime_ms, self._phases, self._settles = raw, 0, [], {}, []
        runner.infer(self._feeds[0], raw)
        first = runner.last_query_time * 1e3
        end = time.perf_counter() + float(req.get("warmup_seconds", 0.0))
        warmup = 0
        while warmup < 5 or time.perf_counter() < end:
            self._infer_next()
            warmup += 1
        return {
            "first_inference_ms": first,
            "warmup_queries": warmup,
            "cores_in_use": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "load_average_before": before["load_average"],
            "cpu_mhz_before": before["cpu_mhz"],
            **self.conversion(),
        }

    def _infer_next(self):
        feed = self._feeds[self._next % len(self._feeds)]
        self._next += 1
        self.runner.infer(feed, self._raw)

    def round(self, queries):
        runner, out = self.runner, []
        for _ in range(queries):
            self._infer_next()
            out.append(runner.last_query_time * 1e3)
            self._runtime_ms.append(runner.last_inference_time * 1e3)
            for k, v in (runner.last_timings or {}).items():
                self._phases.setdefault(k, []).append(v)
        self._settles.append(settle_threads())  # the next configuration's round starts on idle cores
        return out

    def bench_finish(self, req):
        """After the last round: the machine's state, the runtime's own times, throughput at the other batch
        sizes (plain timing), this process's peak memory."""
        after = machine_state(req.get("cores"))
        out = {
            "load_average_after": after["load_average"],
            "cpu_mhz_after": after["cpu_mhz"],
            "runtime_ms": self._runtime_ms,
            "settle_ms": [w * 1e3 for w, _ in self._settles],
            "settled": [ok for _, ok in self._settles],
            "phases": {k: float(np.mean(v)) for k, v in self._phases.items()},
            "throughput": {},
        }
        for b in req.get("other_batches", []):
            t = self.time(dict(req, batch=b, warmup_calls=1))
            out["throughput"][str(b)] = b * len(t["query_ms"]) / (sum(t["query_ms"]) / 1e3)
        out["peak_rss_mb"] = peak_rss_mb()  # before the profiled session below adds its own memory
        details = getattr(self.runner, "execution_details", None)
        out["details"] = details(sample_set(self.runner, 1, 1)[0]) if details else {}
        return out

    def conversion(self, repeats=20):
        runner = self.runner
        if not any(m.quantized for m in runner.inputs):
            return {"input_conversion_ms": None}
        feed = sample_set(runner, 1, 1)[0]
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            native_feed(runner, feed)
            times.append(time.perf_counter() - t)
        return {"input_conversion_ms": float(np.median(times)) * 1e3}

    def serve(self):
        while True:
            try:
                req, tensors = self.read()
            except (ValueError, KeyError) as exc:
                self.answer({"ok": False, "error": f"malformed request: {exc}", "kind": "error"})
                return 2
            if req is None or req.get("cmd") == "bye":
                if req is not None:
                    self.answer({"ok": True})
                return 0
            try:
                result, out = self.handle(req, tensors)
                self.answer({"ok": True, **result}, out)
            except Refused as exc:
                self.answer({"ok": False, "error": str(exc), "kind": exc.kind, "package": exc.package})
            except OSError as exc:
                kind = "disk" if exc.errno in (28, 122) else "error"
                self.answer({"ok": False, "error": f"{type(exc).__name__}: {exc}", "kind": kind})
            except Exception as exc:  # noqa: BLE001 - reported to the host, which says which command failed
                self.answer({"ok": False, "error": f"{type(exc).__name__}: {exc}", "kind": "error"})


def main():
    if sys.version_info < (3, 10):
        sys.stdout.write(
            json.dumps(
                {
                    "ok": False,
                    "error": f"Python {platform.python_version()} on the device; "
                    "quantship's runner needs Python >= 3.10",
                    "kind": "missing",
                }
            )
            + "\n"
        )
        return 2
    # Native libraries may print on fd 1: the protocol gets its own copy of it, fd 1 goes to stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    rfile = sys.stdin.buffer
    if len(sys.argv) > 1:  # a pid file beside the runner: the host's sweep of a killed run finds it
        with open(sys.argv[1], "w") as f:
            f.write(str(os.getpid()))
    return Server(rfile, out).serve()


if __name__ == "__main__":
    sys.exit(main())
