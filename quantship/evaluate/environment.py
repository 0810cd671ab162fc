"""What machine and libraries produced a result (for reports)."""

from __future__ import annotations

import os
import platform
from typing import Any

from quantship.runtime.registry import tool_versions


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu_flags() -> str:
    """The CPU's instruction sets that decide int8 speed and even int8 results of some runtimes (ONNX Runtime's
    fused int8 kernels saturate on AVX2 without VNNI)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return " ".join(flag for flag in INT8_FLAGS if flag in have) or "none"
    except OSError:
        pass
    return "unknown"


def environment() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "libraries": {"python": platform.python_version(), **tool_versions()},
    }
