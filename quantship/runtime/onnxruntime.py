"""ONNX Runtime runner: CPU by default; CUDA / TensorRT execution providers when present and asked for."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from quantship.errors import RuntimeBackendError
from quantship.lazy import lazy_import
from quantship.runtime.base import Runner, TensorMeta

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
}
PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


class OnnxRunner(Runner):
    """Runs an ``.onnx`` file with ``onnxruntime.InferenceSession``.

    Args:
        path: The model file.
        providers: Execution providers in priority order (``cpu``, ``cuda``, ``tensorrt`` or full names).
            A provider asked for but not present in this onnxruntime build is an error, never a silent
            fallback.
        num_threads: Intra-op threads (None: onnxruntime's default).
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] = ("cpu",), num_threads: int | None = None, name: str | None = None):
        super().__init__(name or Path(path).stem)
        self.path = Path(path)
        self.providers = [PROVIDER_ALIASES.get(p.lower(), p) for p in providers]
        self.num_threads = num_threads
        self._session = None

    def activate_impl(self) -> None:
        ort = lazy_import("onnxruntime", purpose="running ONNX models")
        if not self.path.is_file():
            raise RuntimeBackendError(f"ONNX model not found: {self.path}")
        available = ort.get_available_providers()
        missing = [p for p in self.providers if p not in available]
        if missing:
            raise RuntimeBackendError(
                f"ONNX Runtime execution provider(s) {missing} are not available in this onnxruntime build "
                f"(available: {available}); install onnxruntime-gpu for CUDA/TensorRT"
            )
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if self.num_threads:
            opts.intra_op_num_threads = self.num_threads
            opts.inter_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(str(self.path), sess_options=opts, providers=self.providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise RuntimeBackendError(f"{self.path}: ONNX Runtime cannot load the model ({str(exc).strip().splitlines()[0][:400]})") from None

    def infer_impl(self, feed: dict[str, np.ndarray], raw: bool) -> dict[str, np.ndarray]:
        names = [o.name for o in self._session.get_outputs()]
        try:
            outs = self._time_runtime(self._session.run, names, feed)
        except Exception as exc:  # noqa: BLE001
            raise RuntimeBackendError(f"{self.name}: inference failed: {str(exc).strip().splitlines()[0][:400]}") from None
        return dict(zip(names, outs))

    def deactivate_impl(self) -> None:
        self._session = None

    def _meta(self, items) -> list[TensorMeta]:
        return [
            TensorMeta(i.name, tuple(d if isinstance(d, int) else None for d in i.shape), np.dtype(_ORT_TYPES.get(i.type, np.float32)))
            for i in items
        ]

    def input_metadata(self) -> list[TensorMeta]:
        if self._session is None:
            raise RuntimeBackendError(f"{self.name}: activate() the runner before asking for its metadata")
        return self._meta(self._session.get_inputs())

    def output_metadata(self) -> list[TensorMeta]:
        if self._session is None:
            raise RuntimeBackendError(f"{self.name}: activate() the runner before asking for its metadata")
        return self._meta(self._session.get_outputs())

    @property
    def active_providers(self) -> list[str]:
        return list(self._session.get_providers()) if self._session else []
