"""TensorRT engines built ON the device (``convert --remote``, and ``bench``/``eval --remote`` of ``trt-*``
targets): the ONNX (or Q/DQ ONNX) file is made here, the engine is built there with the device's GPU and TensorRT,
and engine + manifest come back. An engine is only valid on the TensorRT version and GPU model it was built with.

The build plan (flags, ONNX input, int8 source) is the local builder's own :func:`~quantship.convert.tensorrt.
plan_build`, decided for the device's TensorRT version; implicit int8 (``trt-int8-entropy``/``-max``) reads the
calibration cache made here from this machine's calibration images, so no image goes to the device.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Iterable

from quantship.calibrate.trt_calibrator import TRT_CALIBRATORS
from quantship.convert.artifact import write_artifact
from quantship.convert.tensorrt import engine_manifest, onnx_fp16, plan_build
from quantship.errors import RemoteError
from quantship.fileio import sha256_json
from quantship.manifest import Artifact, load_reusable
from quantship.trt_util import TrtVersion


class RemoteEngineBuilder:
    """Builds engines on the device of an open :class:`~quantship.remote.host.DeviceSession` (the
    ``engine_builder`` of a :class:`~quantship.targets.BuildContext`)."""

    def __init__(self, session: Any):
        self.session = session

    @property
    def tensorrt_version(self) -> str:
        """The device's TensorRT version.

        Raises:
            RemoteError: No TensorRT (or no GPU) on the device.
        """
        env = self.session.environment
        if not env.get("tensorrt"):
            raise RemoteError(
                f"{self.session.url}: no TensorRT on the device for the trt-* targets (on a Jetson: JetPack's "
                "python3-libnvinfer; elsewhere: pip install tensorrt cuda-python, with the NVIDIA driver)"
            )
        if not env.get("gpu"):
            raise RemoteError(
                f"{self.session.url}: TensorRT {env['tensorrt']} is there but no GPU answers (cuda-python missing or "
                "the driver not loaded): pip install cuda-python on the device"
            )
        return str(env["tensorrt"])

    def environment(self) -> dict[str, Any]:
        env = self.session.environment
        return {"tensorrt": env["tensorrt"], "gpu": env.get("gpu"), "compute_capability": env.get("compute_capability")}

    def build_engine(
        self,
        onnx_path: str | Path,
        spec: Any,
        out_path: str | Path,
        calibration_feed: Iterable | None = None,
        manifest: dict[str, Any] | None = None,
    ) -> Artifact:
        """Build ``spec``'s engine from ``onnx_path`` on the device and write it (with its manifest) at
        ``out_path``; reused when the manifest (device TensorRT and GPU included) matches.

        Raises:
            RemoteError: No TensorRT or GPU on the device, the device's disk full, the connection lost.
            RuntimeBackendError: TensorRT on the device rejected the model or failed to build (its reason).
        """

        onnx_path, out_path = Path(onnx_path), Path(out_path)
        version = TrtVersion.parse(self.tensorrt_version)
        cache = spec.calibration_cache if spec.implicit_int8 else None
        have_cache = bool(cache and Path(cache).is_file())
        # A cache handed to TensorRT's calibrator replaces the calibration pass: the plan of a build with data.
        plan = plan_build(spec, version, have_cache, have_cache)
        full = engine_manifest(spec, plan, self.environment(), onnx_path, manifest or {})
        full["built_on"] = self.session.url
        build_key = sha256_json(full)
        if (existing := load_reusable(out_path, build_key)) is not None:
            return existing
        with tempfile.TemporaryDirectory(prefix="quantship-remote-trt-") as tmp:
            source = (
                onnx_fp16(onnx_path, Path(tmp) / f"{onnx_path.stem}-fp16.onnx")
                if plan.onnx_input == "fp16"
                else onnx_path
            )
            remote_onnx, _ = self.session.put(source)
            remote_cache = self.session.put(cache)[0] if have_cache else None
        remote_engine = f"{self.session.folder}/{build_key[:16]}.engine"
        process = self.session.process()
        try:
            answer, _ = process.request(
                "build_engine",
                onnx=remote_onnx,
                out=remote_engine,
                network_flags=list(plan.network_flags),
                builder_flags=list(plan.builder_flags),
                workspace_mb=spec.workspace_mb,
                batch=[spec.batch.min, spec.batch.opt, spec.batch.max],
                calibration_cache=remote_cache,
                calibrator=TRT_CALIBRATORS.get(spec.calibration) if remote_cache else None,
                calibration_batch=spec.calibration_batch,
            )
        finally:
            process.close()
        built = answer["environment"]
        if built.get("tensorrt") != full["environment"]["tensorrt"] or built.get("gpu") != full["environment"]["gpu"]:
            raise RemoteError(f"{self.session.url}: the device changed during the build ({built})")
        self.session.transport.download(remote_engine, out_path)
        return write_artifact(out_path, None, {**full, "build_key": build_key})
