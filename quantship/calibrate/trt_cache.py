"""TensorRT calibration cache (text format of TensorRT <= 10, also read by ONNX Runtime's TensorRT EP).

First line ``TRT-<version>-<Algorithm>``; then ``<tensor name>: <8 hex digits>``, the big-endian IEEE-754
bits of the float32 scale (dynamic range = scale * 127).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

from quantship.errors import CalibrationError
from quantship.fileio import write_text_atomic

DEFAULT_TRT_VERSION = "100161"  # the header TensorRT 10 writes (see shared/ANCHORS.md)
ALGORITHMS = ("EntropyCalibration2", "EntropyCalibration", "MinMaxCalibration", "LegacyCalibration")
_HEADER = re.compile(r"^TRT-(\d+)-(\w+)$")


@dataclass
class CalibrationCache:
    algorithm: str
    scales: dict[str, float]
    version: str = DEFAULT_TRT_VERSION

    def dynamic_ranges(self) -> dict[str, float]:
        return {k: v * 127.0 for k, v in self.scales.items()}

    def to_text(self) -> str:
        lines = [f"TRT-{self.version}-{self.algorithm}"]
        lines += [f"{name}: {struct.pack('>f', scale).hex()}" for name, scale in self.scales.items()]
        return "\n".join(lines) + "\n"

    def to_bytes(self) -> bytes:
        return self.to_text().encode()

    @classmethod
    def from_amax(
        cls, amax: dict[str, float], algorithm: str, version: str = DEFAULT_TRT_VERSION
    ) -> "CalibrationCache":
        return cls(
            algorithm,
            {k: float(struct.unpack(">f", struct.pack(">f", v / 127.0))[0]) for k, v in amax.items()},
            version,
        )

    @classmethod
    def parse(cls, text: str, source: str = "cache") -> "CalibrationCache":
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if not lines:
            raise CalibrationError(f"{source}: empty calibration cache")
        m = _HEADER.match(lines[0].strip())
        if not m:
            raise CalibrationError(f"{source}:1: expected a 'TRT-<version>-<Algorithm>' header, got '{lines[0][:80]}'")
        scales = {}
        for n, line in enumerate(lines[1:], 2):
            name, sep, hexval = line.rpartition(":")
            hexval = hexval.strip()
            if not sep or not re.fullmatch(r"[0-9a-fA-F]{8}", hexval):
                raise CalibrationError(f"{source}:{n}: expected '<tensor>: <8 hex digits>', got '{line[:80]}'")
            scales[name] = struct.unpack(">f", bytes.fromhex(hexval))[0]
        return cls(m.group(2), scales, m.group(1))


def write_cache(path: str | Path, cache: CalibrationCache) -> Path:
    return write_text_atomic(path, cache.to_text())


def read_cache(path: str | Path) -> CalibrationCache:
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration cache not found: {path}")
    try:
        text = path.read_text(encoding="ascii")
    except UnicodeDecodeError:
        raise CalibrationError(f"{path}: not a text calibration cache (binary content)") from None
    return CalibrationCache.parse(text, str(path))
