"""Q/DQ laid out for ONNX Runtime's fused int8 CPU kernels: the ``ort-int8-<method>`` model.

TensorRT-style placement (:mod:`quantship.convert.qdq`: Q/DQ at op inputs only, symmetric int8) leaves ORT
almost nothing to fuse. ORT (CPU provider, default optimization level) replaces a Q/DQ group with one integer
kernel only when it fits that kernel:

* Conv: ``DQ(x: uint8) + DQ(w) [+ DQ(bias: int32, scale s_x * s_w)] -> Conv -> Q(y: uint8)`` becomes
  ``QLinearConv`` (int8 *activations* fuse only where ORT allows int8, never on x86: they must be uint8);
* a Relu/Clip between the Conv and its Q is removed when the Q range lies inside the clip range, so the Q goes
  after the ReLU6 with zero point 0 and ``scale * 255 <= 6`` (ORT's ``ClipQuantFusion`` test, see
  :func:`uint8_params`);
* ``DQ + DQ -> Add -> Q`` becomes ``QLinearAdd``, pooling likewise ``QLinearGlobalAveragePool``; Squeeze,
  Reshape, Transpose between Q/DQ pairs with equal parameters run on uint8;
* ``DQ(x) + DQ(W) [+ DQ(bias)] -> Gemm`` with a float output becomes ``QGemm``.

So: batch norms that tf2onnx leaves after depthwise convolutions (``Mul`` + ``Add``) are folded into the Conv
first, ``MatMul + Add(bias)`` becomes ``Gemm``, a zero ``Pad`` before a Conv goes into its ``pads`` (ORT's
PadFusion, which Q/DQ nodes between them would block); activations are uint8, asymmetric, per tensor; weights symmetric
per output channel. Which weight type keeps every CPU exact matters (MLAS source, ``qlinearconv.cc``,
``convsym.cpp`` and the ``QgemmU8S8Kernel*``/``ConvSymKernel*`` kernels): on x86 CPUs without VNNI the u8 x s8
kernels multiply two adjacent elements of the reduction dimension and add the two products in a *saturating
16-bit* lane (``vpmaddubsw``), and 2 * 255 * 127 > 32767. Which two elements are adjacent is fixed by how MLAS packs
the weights: ``QLinearConv`` reorders a filter to ``(kernel position, input channel)`` order (``ReorderFilter``, and
``MlasConvSymPackW`` packs 4 input channels per kernel position), ``QGemm`` reduces along K; a pair is elements
``(2j, 2j + 1)`` of that order (:func:`kernel_order`). A pair of int8 weights ``(q0, q1)`` can saturate only when
both have the same sign and ``|q0| + |q1| > 128`` (255 * 128 = 32640 fits). Hence, by default:

* regular and pointwise Conv, Gemm: **int8** weights, zero point 0 (:attr:`WeightType.INT8_PAIRS`): each output
  channel keeps the full int8 scale ``amax / 127`` unless one of its kernel pairs could pass 128; only then is that
  channel's scale raised, just enough that no pair can (at worst to ``amax / 64``, ORT's ``reduce_range``). ORT's
  fast u8 x s8 kernels run everywhere and no CPU saturates; which layers and channels were limited, and why, is in
  the report (:class:`LayerLayout`) and the artifact's manifest;
* **uint8** weights (:attr:`WeightType.UINT8`, the layout before): ``q = round(w / s) + 128`` with zero point 128 on
  every channel, run by MLAS's slower widening U8U8 kernels (what ``session.x64quantprecision=1`` does at load time);
* depthwise Conv: **int8** weights (zero point 0): MLAS's depthwise kernels never sum two products in 16 bits;
* bias: int32 ``round(b / (s_x * s_w))``; the weight scale of a channel is floored at ``|b| / (s_x * 2**30)`` so
  a dead channel (weights ~0, bias not, as batch-norm folding leaves) never overflows int32.
"""

from __future__ import annotations

import enum
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from quantship.convert.qdq import with_nodes
from quantship.errors import CalibrationError
from quantship.lazy import lazy_import

ACT_OPS = {"Relu", "Clip"}  # absorbed into the integer op before them when the uint8 range fits inside them
PASS_THROUGH = {"Squeeze", "Unsqueeze", "Reshape", "Flatten", "Transpose"}  # uint8 in -> uint8 out, same params
POOL_OPS = {"GlobalAveragePool", "AveragePool"}
WEIGHTED = {"Conv", "MatMul", "Gemm"}
INT32_MAX = 2**31 - 1
FLT_EPSILON = np.float32(np.finfo(np.float32).eps)


class WeightType(str, enum.Enum):
    """How the weights of one kind of layer are stored."""

    UINT8 = "uint8"  # q + 128, zero point 128: exact on every x86 CPU (U8U8 kernels)
    INT8 = "int8"  # zero point 0: saturates on x86 without VNNI, except in depthwise kernels
    INT8_7BIT = "int8_7bit"  # q in [-64, 64] (ORT's reduce_range): never saturates, one bit lost
    INT8_PAIRS = "int8_pairs"  # int8, a channel's scale raised only where one of its kernel pairs could saturate


PAIR_LIMIT = 32767 // 255  # 128: the largest |q0| + |q1| of a same-sign pair whose products fit 16 bits at u8 = 255


@dataclass(frozen=True)
class OrtWeights:
    """Weight types per layer kind (the default is exact on every x86 CPU under default session options)."""

    pointwise: WeightType = WeightType.INT8_PAIRS  # every Conv that is not depthwise
    depthwise: WeightType = WeightType.INT8
    gemm: WeightType = WeightType.INT8_PAIRS

    def __post_init__(self) -> None:
        for name in ("pointwise", "depthwise", "gemm"):
            object.__setattr__(self, name, WeightType(getattr(self, name)))

    def describe(self) -> dict[str, str]:
        return {"conv": self.pointwise.value, "depthwise_conv": self.depthwise.value, "gemm": self.gemm.value}

    @property
    def exact_without_vnni(self) -> bool:
        """Whether no kernel can saturate on an x86 CPU without VNNI (full int8 is safe in depthwise kernels
        only; :attr:`WeightType.INT8_PAIRS` is safe everywhere)."""
        return WeightType.INT8 not in (self.pointwise, self.gemm)


@dataclass
class OrtQdqReport:
    """What :func:`insert_ort_qdq` did."""

    quantized: list[str] = field(default_factory=list)
    float_nodes: list[tuple[str, str]] = field(default_factory=list)
    folded_bn: int = 0
    gemm_fused: int = 0
    missing_ranges: list[str] = field(default_factory=list)
    bias_clipped: list[str] = field(default_factory=list)
    weight_types: Counter = field(default_factory=Counter)
    qdq_tensors: int = 0
    layers: list[LayerLayout] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [
            f"{len(self.quantized)} nodes quantized, {self.qdq_tensors} uint8 activation tensors, "
            f"{self.folded_bn} Mul/Add folded into Conv, {self.gemm_fused} MatMul+Add made Gemm; weights: "
            + ", ".join(f"{k} x{n}" for k, n in sorted(self.weight_types.items()))
        ]
        if self.float_nodes:
            ops = Counter(op for op, _ in self.float_nodes)
            out.append("left in float: " + ", ".join(f"{op} x{n}" for op, n in sorted(ops.items())))
        if self.missing_ranges:
            out.append(
                f"{len(self.missing_ranges)} tensor(s) without a range left float, e.g. {self.missing_ranges[0]}"
            )
        if self.bias_clipped:
            out.append(f"{len(self.bias_clipped)} int32 bias(es) clipped, e.g. {self.bias_clipped[0]}")
        limited = [la for la in self.layers if la.limited]
        if limited:
            chans = sum(la.limited for la in limited)
            out.append(
                f"{len(limited)} layer(s) with {chans} channel(s) held below the u8 x s8 pair limit, e.g. "
                f"{limited[0].why}"
            )
        return out


@dataclass
class LayerLayout:
    """How one weighted layer's weights were stored, and why (one row of the artifact manifest's ``layers``)."""

    node: str
    kind: str  # conv, depthwise, gemm
    weight_type: str
    channels: int
    limited: int = 0  # channels whose scale was raised so that no kernel pair can saturate
    min_levels: int = 127  # the fewest int8 levels a limited channel of this layer kept (amax / scale)
    worst_pair: int = 0  # the largest same-sign |q0| + |q1| of a kernel pair at the full int8 scale
    why: str = ""
    # Channels whose weights already sat on their full int8 grid (AdaRound's integers, written back as s * q):
    grid_channels: int = 0
    grid_kept: int = 0  # ... kept exactly
    grid_nudged: int = 0  # ... kept at the full scale with some pairs' smaller weight moved <= GRID_NUDGE levels
    grid_weights_moved: int = 0  # weights moved by that nudge
    grid_lost: int = 0  # ... whose scale had to be raised: re-rounded to nearest on the coarser grid

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ---------------------------------------------------------------------------------------------- graph helpers


def _consumers(nodes: Iterable[Any]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for n in nodes:
        for i in n.input:
            if i:
                out.setdefault(i, []).append(n)
    return out


def _const(model: Any, name: str) -> np.ndarray | None:
    from onnx import numpy_helper

    for i in model.graph.initializer:
        if i.name == name:
            return numpy_helper.to_array(i)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name and n.attribute and n.attribute[0].name == "value":
            return numpy_helper.to_array(n.attribute[0].t)
    return None


def clip_bounds(model: Any, node: Any) -> tuple[float, float] | None:
    """(min, max) of a Relu or of a Clip with constant bounds, else None."""
    if node.op_type == "Relu":
        return 0.0, math.inf
    if node.op_type != "Clip":
        return None
    lo, hi = -math.inf, math.inf
    for a in node.attribute:  # opset < 11
        if a.name == "min":
            lo = a.f
        elif a.name == "max":
            hi = a.f
    for idx in (1, 2):
        if len(node.input) > idx and node.input[idx]:
            v = _const(model, node.input[idx])
            if v is None:
                return None
            lo, hi = (float(v), hi) if idx == 1 else (lo, float(v))
    return lo, hi


def _copy(model: Any) -> Any:
    onnx = lazy_import("onnx")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def _channel_vector(c: np.ndarray, cout: int) -> np.ndarray | None:
    if c.size == 1:
        return np.full(cout, float(c.reshape(-1)[0]), np.float32)
    if c.size == cout and c.ndim >= 3 and c.shape[-3] == cout and all(d == 1 for d in c.shape[-2:]):
        return c.reshape(-1).astype(np.float32)  # (1, C, 1, 1) or (C, 1, 1): an NCHW per-channel constant
    return None


def fold_batchnorm(model: Any) -> tuple[Any, int]:
    """Fold ``Conv -> Mul(const) -> Add(const)`` chains into the Conv's weight and bias.

    The Conv takes over the output name of the last node folded into it, so statistics collected on the unfolded
    model (keyed by tensor name) apply to the folded one. Returns (model, number of Mul/Add nodes folded).
    """
    from onnx import numpy_helper

    m = _copy(model)
    graph_outputs = {o.name for o in m.graph.output}
    folded = 0
    while True:
        inits = {i.name: i for i in m.graph.initializer}
        cons = _consumers(m.graph.node)
        target = None
        for conv in m.graph.node:
            if conv.op_type != "Conv" or len(conv.input) < 2 or conv.input[1] not in inits:
                continue
            y = conv.output[0]
            users = cons.get(y, [])
            if y in graph_outputs or len(users) != 1 or users[0].op_type not in ("Mul", "Add"):
                continue
            nxt = users[0]
            if len(nxt.input) != 2:
                continue
            c = _const(m, nxt.input[1] if nxt.input[0] == y else nxt.input[0])
            w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float32)
            cv = _channel_vector(c, w.shape[0]) if c is not None else None
            if cv is not None:
                target = (conv, nxt, w, cv)
                break
        if target is None:
            break
        conv, nxt, w, cv = target
        has_b = len(conv.input) > 2 and conv.input[2]
        b = (
            numpy_helper.to_array(inits[conv.input[2]]).astype(np.float32)
            if has_b
            else np.zeros(w.shape[0], np.float32)
        )
        if nxt.op_type == "Mul":
            w, b = w * cv.reshape(-1, *([1] * (w.ndim - 1))), b * cv
        else:
            b = b + cv
        wn, bn = f"{conv.name}_w_fold{folded}", f"{conv.name}_b_fold{folded}"
        m.graph.initializer.extend([numpy_helper.from_array(w, wn), numpy_helper.from_array(b.astype(np.float32), bn)])
        x = conv.input[0]
        del conv.input[:]
        conv.input.extend([x, wn, bn])
        conv.output[0] = nxt.output[0]
        m.graph.node.remove(nxt)
        folded += 1
    _drop_unused_initializers(m)
    return m, folded


def fuse_matmul_add(model: Any) -> tuple[Any, int]:
    """``MatMul(x, W) -> Add(bias)`` => ``Gemm(x, W, bias)`` keeping the Add's output name. ORT would otherwise
    make a float Gemm of them before its Q/DQ fusions run (and a float bias blocks ``QGemm``)."""
    from onnx import helper, numpy_helper

    m = _copy(model)
    inits = {i.name: i for i in m.graph.initializer}
    graph_outputs = {o.name for o in m.graph.output}
    cons = _consumers(m.graph.node)
    count = 0
    for mm in list(m.graph.node):
        if mm.op_type != "MatMul" or mm.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[mm.input[1]])
        users = cons.get(mm.output[0], [])
        if w.ndim != 2 or len(users) != 1 or users[0].op_type != "Add" or mm.output[0] in graph_outputs:
            continue
        add = users[0]
        b = _const(m, add.input[1] if add.input[0] == mm.output[0] else add.input[0])
        if b is None or b.size != w.shape[1]:
            continue
        bias = f"{mm.name}_gemm_bias"
        m.graph.initializer.append(numpy_helper.from_array(b.reshape(-1).astype(np.float32), bias))
        gemm = helper.make_node("Gemm", [mm.input[0], mm.input[1], bias], [add.output[0]], name=mm.name)
        idx = list(m.graph.node).index(mm)
        m.graph.node.remove(mm)
        m.graph.node.insert(idx, gemm)
        m.graph.node.remove(add)
        count += 1
    _drop_unused_initializers(m)
    return m, count


def fold_pad(model: Any) -> tuple[Any, int]:
    """Fold ``Pad(constant 0, spatial axes only) -> Conv`` into the Conv's ``pads`` (ORT's own ``PadFusion``).

    ORT fuses such a Pad on the float model, but not once Q/DQ nodes sit between the Pad and the Conv: the Pad then
    runs in float between a DequantizeLinear and a QuantizeLinear (on MobileNetV2's four stride-2 depthwise inputs:
    about a fifth of the int8 model's time). A QLinearConv pads with the input's zero point, i.e. with real 0.
    Returns (model, Pads folded).
    """
    from onnx import helper

    m = _copy(model)
    graph_outputs = {o.name for o in m.graph.output}
    cons = _consumers(m.graph.node)
    folded = 0
    for pad in list(m.graph.node):
        if pad.op_type != "Pad" or pad.output[0] in graph_outputs or len(pad.input) < 2 or len(pad.input) > 3:
            continue
        mode = next((helper.get_attribute_value(a) for a in pad.attribute if a.name == "mode"), b"constant")
        pads = _const(m, pad.input[1])
        value = _const(m, pad.input[2]) if len(pad.input) == 3 and pad.input[2] else np.zeros(1)
        users = cons.get(pad.output[0], [])
        if mode not in (b"constant", "constant") or pads is None or value is None or np.any(value != 0):
            continue
        pads = pads.astype(np.int64).reshape(-1)
        if pads.size != 8 or np.any(pads < 0) or np.any(pads[[0, 1, 4, 5]] != 0) or not users:
            continue
        if not all(u.op_type == "Conv" and list(u.input).index(pad.output[0]) == 0 for u in users):
            continue
        if any(helper.get_attribute_value(a) not in (b"NOTSET", "NOTSET") for u in users for a in u.attribute
               if a.name == "auto_pad"):  # fmt: skip
            continue
        for conv in users:
            old = next((list(a.ints) for a in conv.attribute if a.name == "pads"), [0, 0, 0, 0])
            new = [int(old[0] + pads[2]), int(old[1] + pads[3]), int(old[2] + pads[6]), int(old[3] + pads[7])]
            keep = [a for a in conv.attribute if a.name != "pads"]
            del conv.attribute[:]
            conv.attribute.extend([*keep, helper.make_attribute("pads", new)])
            conv.input[0] = pad.input[0]
        m.graph.node.remove(pad)
        folded += 1
    _drop_unused_initializers(m)
    return m, folded


def _drop_unused_initializers(m: Any) -> None:
    used = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
    keep = [i for i in m.graph.initializer if i.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)


def prepare_for_ort(model: Any) -> tuple[Any, int, int]:
    """Batch norms folded, ``MatMul + Add`` made ``Gemm`` and zero ``Pad`` folded into the Conv after it: (model,
    Mul/Add folded, Gemms made)."""
    m, folded = fold_batchnorm(model)
    m, gemms = fuse_matmul_add(m)
    m, _ = fold_pad(m)
    return m, folded, gemms


# ---------------------------------------------------------------------------------------- quantization params


def uint8_params(lo: float, hi: float, clip_hi: float | None = None) -> tuple[np.float32, np.uint8]:
    """Asymmetric uint8 (scale, zero point) covering [lo, hi] (widened to include 0).

    With ``clip_hi`` (the max of a ReLU6/Clip just before the Q) and a zero point of 0, the scale is nudged down by
    ulps until ``float32(scale) * 255 <= clip_hi + FLT_EPSILON``: the exact test ORT makes before it removes the
    Clip (``clip_quantizelinear.cc``); otherwise the Clip stays and the Conv does not fuse.
    """
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = np.float32((hi - lo) / 255.0)
    if not scale > 0:
        scale = np.float32(1.0)
    zp = int(np.clip(round(-lo / float(scale)), 0, 255))
    if clip_hi is not None and zp == 0 and math.isfinite(clip_hi):
        while np.float32(scale * np.float32(255.0)) > np.float32(clip_hi) + FLT_EPSILON:
            scale = np.nextafter(scale, np.float32(0))
    return np.float32(scale), np.uint8(zp)


def activation_range(stats: Any, amax: float | None, clip: tuple[float, float] | None) -> tuple[float, float] | None:
    """[lo, hi] of a tensor: its observed min/max, clipped to the calibrated |x| bound ``amax`` (when given) and
    to the bounds of the ReLU/Clip that produced it; None for a tensor that was always zero."""
    lo, hi = float(stats.min), float(stats.max)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    if amax is not None and amax > 0:
        lo, hi = max(lo, -amax), min(hi, amax)
    if clip is not None:
        lo, hi = max(lo, clip[0]), min(hi, clip[1])
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    return (lo, hi) if hi > lo else None


def kernel_order(node: Any, w: np.ndarray) -> np.ndarray:
    """Weights of a Conv/Gemm/MatMul as ``(output channel, K)`` in the order MLAS reduces over K.

    ``QLinearConv`` reorders an ``(M, C/group, kH, kW)`` filter to kernel position major, input channel minor
    (``ReorderFilter``; ``MlasConvSymPackW`` packs 4 input channels per kernel position, the same pairs when C is
    even, and only used when C % 4 == 0); ``QGemm``/``MatMulInteger`` reduce along K. The u8 x s8 kernels without
    VNNI add the products of elements ``(2j, 2j + 1)`` of each row in 16 bits.
    """
    if node.op_type == "Conv":
        return np.moveaxis(w, 1, -1).reshape(w.shape[0], -1)
    axis = _weight_axis(node, w)
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)


def pair_sums(q: np.ndarray) -> np.ndarray:
    """Per row of ``q`` (output channel, K) in kernel order: the largest ``|q0| + |q1|`` over the pairs
    ``(2j, 2j + 1)`` whose two weights have the same sign (a mixed-sign pair never passes 255 * 128)."""
    q = q.astype(np.int32)
    if q.shape[1] % 2:
        q = np.concatenate([q, np.zeros((q.shape[0], 1), np.int32)], axis=1)
    a, b = q[:, 0::2], q[:, 1::2]
    same = (a * b) > 0
    return np.where(same, np.abs(a) + np.abs(b), 0).max(axis=1, initial=0)


def pair_safe_scale(wk: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Per-channel scales, raised (only on the channels that need it, as little as possible) so that no same-sign
    kernel pair of the rounded weights passes :data:`PAIR_LIMIT`.

    Args:
        wk: Float weights ``(channel, K)`` in kernel order (:func:`kernel_order`).
        scale: The full int8 scales (``amax / 127``, floored).
    """
    scale = scale.astype(np.float32).copy()
    wk = wk.astype(np.float32)
    a, b = wk[:, 0::2], wk[:, 1::2]
    if a.shape[1] != b.shape[1]:
        b = np.concatenate([b, np.zeros((b.shape[0], 1), np.float32)], axis=1)
    pair = np.where(a * b > 0, np.abs(a) + np.abs(b), 0).max(axis=1, initial=0)

    def over() -> np.ndarray:
        q = np.clip(np.round(wk / scale[:, None]), -127, 127)
        return pair_sums(q) > PAIR_LIMIT

    # |q0| + |q1| <= pair / s + 1 after rounding: pair / 128 is tried first, pair / 127 always fits.
    for denom in (PAIR_LIMIT, PAIR_LIMIT - 0.5, PAIR_LIMIT - 1):
        bad = over()
        if not bad.any():
            break
        scale[bad] = np.maximum(scale[bad], (pair[bad] / denom).astype(np.float32))
    while (bad := over()).any():  # float32 rounding of the scale itself: one ulp at a time
        scale[bad] = np.nextafter(scale[bad], np.float32(np.inf))
    return scale


GRID_NUDGE = 2  # at most this many levels over the pair limit are taken off a pair instead of raising the scale
GRID_TOLERANCE = 1e-3  # |w / s - round(w / s)| below this for every weight: the channel is on its int8 grid


@dataclass
class GridKeep:
    """What :func:`keep_grid_integers` did to one layer's channels that sat on their int8 grid."""

    channels: int = 0
    nudged: int = 0
    weights_moved: int = 0
    lost: int = 0


def full_int8_scale(rows: np.ndarray, min_scale: np.ndarray | float = 0.0) -> np.ndarray:
    """Per row (output channel) of ``rows``: ``max |w| / 127``, floored at ``min_scale`` (1.0 for an all-zero row)."""
    amax = np.abs(rows).max(axis=1, initial=0.0)
    return np.maximum(np.where(amax > 0, amax / 127, 1.0), min_scale).astype(np.float32)


def on_int8_grid(rows: np.ndarray, min_scale: np.ndarray | float = 0.0) -> np.ndarray:
    """Per row (output channel): whether every weight is ``s * q`` with ``s`` the row's full int8 scale (AdaRound's
    integers written back), within :data:`GRID_TOLERANCE` of a level."""
    rows = rows.astype(np.float32)
    qf = rows / full_int8_scale(rows, min_scale)[:, None]
    return np.all(np.abs(qf - np.round(qf)) < GRID_TOLERANCE, axis=1) & (np.abs(rows).max(axis=1, initial=0.0) > 0)


def keep_grid_integers(rows: np.ndarray, min_scale: np.ndarray | float = 0.0) -> tuple[np.ndarray, GridKeep]:
    """Weights already on their full int8 grid (AdaRound's integers) kept at that grid where the pair limit allows.

    A channel (row, in kernel order) whose every weight is ``s * q`` with ``s`` its full int8 scale keeps its
    integers when no same-sign kernel pair passes :data:`PAIR_LIMIT`. When pairs pass it by at most
    :data:`GRID_NUDGE` levels (AdaRound rounds each weight up or down, so it can push a pair 1-2 levels over where
    nearest rounding would not), the smaller weight of each such pair is moved toward zero by the excess instead
    of raising the whole channel's scale (which would re-round every weight of the channel to nearest on a coarser
    grid and lose AdaRound's choices). The channel's largest weight is never moved, so its scale stays. Channels
    further over are left to :func:`pair_safe_scale` and counted as lost.

    Returns:
        The rows with the nudged weights (``s * q'``, float32) and what was kept.
    """
    rows = rows.astype(np.float32)
    scale = full_int8_scale(rows, min_scale)
    q = np.round(rows / scale[:, None])
    on_grid = on_int8_grid(rows, min_scale)
    report = GridKeep(channels=int(on_grid.sum()))
    if not on_grid.any():
        return rows, report
    qi = q.astype(np.int32)
    if qi.shape[1] % 2:
        qi = np.concatenate([qi, np.zeros((qi.shape[0], 1), np.int32)], axis=1)
    a, b = qi[:, 0::2], qi[:, 1::2]
    excess = np.where(a * b > 0, np.abs(a) + np.abs(b) - PAIR_LIMIT, 0)
    worst = excess.max(axis=1, initial=0)
    nudge = on_grid & (worst > 0) & (worst <= GRID_NUDGE)
    report.lost = int((on_grid & (worst > GRID_NUDGE)).sum())
    if nudge.any():
        over = (excess > 0) & nudge[:, None]
        small_is_a = np.abs(a) <= np.abs(b)
        # Move the smaller weight of each pair toward zero by the excess (its sign kept: it is at least excess).
        a = np.where(over & small_is_a, a - np.sign(a) * excess, a)
        b = np.where(over & ~small_is_a, b - np.sign(b) * excess, b)
        moved = np.empty_like(qi)
        moved[:, 0::2], moved[:, 1::2] = a, b
        moved = moved[:, : rows.shape[1]]
        report.nudged = int(nudge.sum())
        report.weights_moved = int(over.sum())
        rows = np.where(nudge[:, None], moved.astype(np.float32) * scale[:, None], rows).astype(np.float32)
    return rows, report


def kernel_unorder(node: Any, rows: np.ndarray, like: np.ndarray) -> np.ndarray:
    """The inverse of :func:`kernel_order`: ``rows`` back in the layout of the weight ``like``."""
    if node.op_type == "Conv":
        m, c = like.shape[0], like.shape[1]
        return np.moveaxis(rows.reshape(m, *like.shape[2:], c), -1, 1)
    axis = _weight_axis(node, like)
    return np.moveaxis(rows.reshape(np.moveaxis(like, axis, 0).shape), 0, axis)


def quantize_weight(
    w: np.ndarray,
    axis: int,
    weight_type: WeightType,
    min_scale: np.ndarray | float = 0.0,
    kernel_rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric per-channel weights -> (q, scale, zero point) in ``weight_type``.

    ``min_scale`` (per channel or scalar) floors the scale: see the module docstring on int32 biases.
    ``kernel_rows`` (``w`` in kernel order, :func:`kernel_order`) is needed by :attr:`WeightType.INT8_PAIRS`.
    """
    qmax = 64 if weight_type is WeightType.INT8_7BIT else 127
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    amax = np.abs(moved).max(axis=1)
    scale = np.maximum(np.where(amax > 0, amax / qmax, 1.0), min_scale).astype(np.float32)
    if weight_type is WeightType.INT8_PAIRS:
        if kernel_rows is None:
            raise CalibrationError("int8_pairs weights need the weights in kernel order (kernel_rows)")
        scale = pair_safe_scale(kernel_rows, scale)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -qmax, qmax)
    if weight_type is WeightType.UINT8:
        return (q + 128).astype(np.uint8), scale, np.full(scale.shape, 128, np.uint8)
    return q.astype(np.int8), scale, np.zeros(scale.shape, np.int8)


def mlas_u8s8_accumulate(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` as MLAS's u8 x s8 kernels compute it on x86 without VNNI (exact numpy emulation).

    ``vpmaddubsw`` multiplies elements ``2j`` and ``2j + 1`` of the reduction dimension and adds the two products
    with *signed 16-bit saturation*; ``vpmaddwd`` then widens to 32 bits, where the rest of the sum is exact.

    Args:
        a: uint8 activations ``(M, K)`` (zero point not subtracted: MLAS corrects it afterwards, exactly).
        b: int8 weights ``(K, N)`` in kernel order.

    Returns:
        int32 ``(M, N)``; equal to ``a.astype(int32) @ b.astype(int32)`` exactly when no pair saturated.
    """
    a = a.astype(np.int32)
    b = b.astype(np.int32)
    if a.shape[1] % 2:
        a = np.concatenate([a, np.zeros((a.shape[0], 1), np.int32)], axis=1)
        b = np.concatenate([b, np.zeros((1, b.shape[1]), np.int32)], axis=0)
    acc = np.zeros((a.shape[0], b.shape[1]), np.int64)
    for j in range(0, a.shape[1], 2):
        pair = a[:, j : j + 1] * b[j] + a[:, j + 1 : j + 2] * b[j + 1]
        acc += np.clip(pair, -32768, 32767)
    return acc.astype(np.int32)


def _weight_axis(node: Any, w: np.ndarray) -> int:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if next((a.i for a in node.attribute if a.name == "transB"), 0) else 1
    return w.ndim - 1  # MatMul (K, N)


def is_depthwise(node: Any, w: np.ndarray) -> bool:
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    return node.op_type == "Conv" and group > 1 and w.shape[1] == 1 and w.shape[0] == group


# -------------------------------------------------------------------------------------------------- planning


@dataclass
class _Plan:
    """Which nodes become integer ops (and which of their inputs are quantized), and which op outputs get a Q."""

    model: Any
    node_inputs: dict[str, list[int]]
    outputs: dict[str, str]  # node name -> the tensor its Q goes on (its output, or the ReLU/Clip's after it)
    clips: dict[str, tuple[float, float]]  # tensor -> bounds of the ReLU/Clip that produced it
    pass_through: dict[str, str]  # tensor -> its input, for Squeeze/Reshape/... between quantized tensors


def _plan(m: Any, exclude: set[str]) -> _Plan:
    inits = {i.name for i in m.graph.initializer}
    nodes = list(m.graph.node)
    cons = _consumers(nodes)
    prod = {o: n for n in nodes for o in n.output}
    graph_inputs = {i.name for i in m.graph.input if i.name not in inits}
    graph_outputs = {o.name for o in m.graph.output}

    def is_act(t: str) -> bool:
        return bool(t) and t not in inits and (t in prod or t in graph_inputs)

    node_inputs: dict[str, list[int]] = {}
    for n in nodes:
        if n.name in exclude:
            continue
        weighted = len(n.input) > 1 and n.input[1] in inits and is_act(n.input[0])
        if n.op_type == "Conv" and weighted:
            node_inputs[n.name] = [0]
        elif n.op_type in ("MatMul", "Gemm") and weighted and _const(m, n.input[1]).ndim == 2:
            node_inputs[n.name] = [0]
        elif n.op_type == "Add" and len(n.input) == 2 and all(is_act(t) for t in n.input):
            node_inputs[n.name] = [0, 1]
        elif n.op_type in POOL_OPS and is_act(n.input[0]):
            node_inputs[n.name] = [0]
    outputs: dict[str, str] = {}
    clips: dict[str, tuple[float, float]] = {}
    for n in nodes:
        if n.op_type in ACT_OPS and (b := clip_bounds(m, n)) is not None:
            clips[n.output[0]] = b
        if n.name not in node_inputs or n.op_type in ("MatMul", "Gemm"):
            continue  # weighted heads keep a float output (QGemm / MatMulIntegerToFloat)
        y = n.output[0]
        users = cons.get(y, [])
        if len(users) == 1 and users[0].op_type in ACT_OPS and y not in graph_outputs and clip_bounds(m, users[0]):
            y = users[0].output[0]  # the Q after the ReLU/ReLU6: ORT removes the Clip and fuses Conv -> Q
        outputs[n.name] = y
    pass_through = {
        n.output[0]: n.input[0] for n in nodes if n.op_type in PASS_THROUGH and n.input and is_act(n.input[0])
    }
    return _Plan(m, node_inputs, outputs, clips, pass_through)


def ort_tensors(model: Any) -> list[str]:
    """The tensors (names of ``model``, before any folding) whose statistics :func:`insert_ort_qdq` reads."""
    m, _, _ = prepare_for_ort(model)
    plan = _plan(m, set())
    names: list[str] = []
    for n in m.graph.node:
        for i in plan.node_inputs.get(n.name, []):
            names.append(n.input[i])
        if n.name in plan.outputs:
            names.append(plan.outputs[n.name])
    out: list[str] = []
    for t in names:
        while t in plan.pass_through:  # equal parameters: the range is the input's
            t = plan.pass_through[t]
        if t not in out:
            out.append(t)
    return out


# ------------------------------------------------------------------------------------------------------ pass


@dataclass
class _ActivationParams:
    """The uint8 (scale, zero point) of each activation tensor that gets a Q, worked out on first use."""

    plan: _Plan
    stats: dict[str, Any]
    amax: dict[str, float]
    report: OrtQdqReport
    params: dict[str, tuple[np.float32, np.uint8]] = field(default_factory=dict)

    def ensure(self, t: str) -> bool:
        """Whether ``t`` is quantized, its parameters set now if need be; a tensor without a range is reported."""
        act, plan = self.params, self.plan
        if t in act:
            return True
        if t in plan.pass_through and self.ensure(plan.pass_through[t]):
            act[t] = act[plan.pass_through[t]]  # ORT drops DQ -> op -> Q and runs the op on uint8
            return True
        clip = plan.clips.get(t)
        s = self.stats.get(t)
        r = activation_range(s, self.amax.get(t), clip) if s is not None else None
        if r is None:
            if t not in self.report.missing_ranges:
                self.report.missing_ranges.append(t)
            return False
        act[t] = uint8_params(*r, clip_hi=clip[1] if clip is not None and r[0] == 0.0 else None)
        return True

    def quantized_nodes(self, m: Any) -> dict[str, bool]:
        """Planned node -> whether it becomes an integer op (every quantized input has a range); the tensor its Q
        goes on gets parameters too."""
        plan = self.plan
        quantized: dict[str, bool] = {}
        for n in m.graph.node:
            if n.name in plan.node_inputs:
                quantized[n.name] = all(self.ensure(n.input[i]) for i in plan.node_inputs[n.name])
                if quantized[n.name] and n.name in plan.outputs:
                    self.ensure(plan.outputs[n.name])
        return quantized


def layer_layout(
    node: str,
    kind: str,
    wt: WeightType,
    w: np.ndarray,
    axis: int,
    rows: np.ndarray,
    scale: np.ndarray,
    min_scale: np.ndarray | float,
    grid: GridKeep | None = None,
) -> LayerLayout:
    """What one layer's weights became and why (see :class:`LayerLayout`); ``grid``: what
    :func:`keep_grid_integers` kept of weights that were already on their int8 grid (AdaRound's)."""
    amax = np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(axis=1)
    full = np.maximum(np.where(amax > 0, amax / 127, 1.0), min_scale).astype(np.float32)
    full_pairs = pair_sums(np.clip(np.round(rows / full[:, None]), -127, 127))
    worst = 0 if kind == "depthwise" else int(full_pairs.max(initial=0))  # depthwise kernels sum no pairs
    raised = scale > full
    levels = amax[raised] / scale[raised] if raised.any() else np.array([64 if wt is WeightType.INT8_7BIT else 127])
    out = LayerLayout(node, kind, wt.value, int(scale.size), worst_pair=worst, min_levels=int(levels.min() + 1e-3))
    if wt is WeightType.INT8_PAIRS:
        out.limited = int(raised.sum())
        if out.limited:
            c = int(np.argmax(full_pairs))
            out.why = (
                f"{node}: {out.limited} of {out.channels} channels held below the pair limit (largest same-sign "
                f"kernel pair {worst} > {PAIR_LIMIT} levels, channel {c}; fewest levels kept {out.min_levels})"
            )
        else:
            out.why = f"{node}: full int8, no same-sign kernel pair passes {PAIR_LIMIT} levels (largest {worst})"
    elif wt is WeightType.INT8:
        out.why = (
            f"{node}: full int8, depthwise kernels add no two products in 16 bits"
            if kind == "depthwise"
            else f"{node}: full int8 as asked (largest same-sign kernel pair {worst}: saturates without VNNI if > "
            f"{PAIR_LIMIT})"
        )
    elif wt is WeightType.INT8_7BIT:
        out.why = f"{node}: 7-bit int8 as asked (reduce_range)"
    else:
        out.why = f"{node}: uint8 as asked (MLAS U8U8 kernels widen to 16 bits before adding)"
    if grid is not None and grid.channels:
        out.grid_channels, out.grid_nudged, out.grid_weights_moved = grid.channels, grid.nudged, grid.weights_moved
        out.grid_lost = grid.lost
        out.grid_kept = grid.channels - grid.nudged - grid.lost
        out.why += (
            f"; weights on their int8 grid (AdaRound's integers) in {grid.channels} channels: {out.grid_kept} kept "
            f"exactly, {grid.nudged} kept with {grid.weights_moved} weight(s) moved <= {GRID_NUDGE} levels to fit "
            f"the pair limit, {grid.lost} re-rounded on a raised scale (a pair over the limit by more than "
            f"{GRID_NUDGE})"
        )
    return out


class _OrtQdqWriter:
    """Builds the nodes and new initializers of the ORT layout: a Q after each quantized tensor, one DQ per reader,
    and DQs of quantized weights and int32 biases."""

    def __init__(
        self,
        act: dict[str, tuple[np.float32, np.uint8]],
        inits: dict[str, Any],
        weights: OrtWeights,
        report: OrtQdqReport,
    ):
        self.act, self.inits, self.weights, self.report = act, inits, weights, report
        self.nodes: list[Any] = []
        self.new_inits: list[Any] = []
        self._made: set[str] = set()
        self._dq_count: Counter = Counter()

    def _params(self, t: str) -> tuple[str, str]:
        """Names of the scale and zero point initializers of activation ``t``, made on first use."""
        from onnx import numpy_helper

        sn, zn = f"{t}_scale", f"{t}_zero_point"
        if sn not in self._made:
            s, z = self.act[t]
            self.new_inits.extend(
                [
                    numpy_helper.from_array(np.array(s, np.float32), sn),
                    numpy_helper.from_array(np.array(z, np.uint8), zn),
                ]
            )
            self._made.add(sn)
        return sn, zn

    def emit_q(self, t: str) -> None:
        """Append the QuantizeLinear of activation ``t``."""
        from onnx import helper

        sn, zn = self._params(t)
        self.nodes.append(
            helper.make_node("QuantizeLinear", [t, sn, zn], [f"{t}_quantized"], name=f"{t}_QuantizeLinear")
        )

    def emit_dq(self, t: str) -> str:
        """Append a new DequantizeLinear of ``t`` (every consumer reads it through its own) and return its output."""
        from onnx import helper

        sn, zn = self._params(t)
        k = self._dq_count[t]
        self._dq_count[t] += 1
        out = f"{t}_DequantizeLinear_Output_{k}"
        self.nodes.append(
            helper.make_node("DequantizeLinear", [f"{t}_quantized", sn, zn], [out], name=f"{t}_DequantizeLinear_{k}")
        )
        return out

    def _weight_type(self, node: Any, w: np.ndarray) -> tuple[WeightType, str]:
        """The weight type of a weighted node and the layer kind it is counted under."""
        if node.op_type != "Conv":
            return self.weights.gemm, "gemm"
        if is_depthwise(node, w):
            return self.weights.depthwise, "depthwise"
        return self.weights.pointwise, "conv"

    def weight_dq(self, node: Any, name: str, min_scale: np.ndarray | float) -> tuple[str, np.ndarray]:
        """Quantize weight ``name`` of ``node`` per channel; (the output of its DequantizeLinear, its scales)."""
        from onnx import helper, numpy_helper

        w = numpy_helper.to_array(self.inits[name]).astype(np.float32)
        axis = _weight_axis(node, w)
        wt, kind = self._weight_type(node, w)
        self.report.weight_types[f"{kind} {wt.value}"] += 1
        rows = kernel_order(node, w)
        grid = GridKeep()
        if wt is WeightType.INT8_PAIRS:  # AdaRound's integers kept where the pair limit allows (keep_grid_integers)
            rows, grid = keep_grid_integers(rows, min_scale)
            if grid.nudged:
                w = kernel_unorder(node, rows, w)
        else:  # full int8 and uint8 (q + 128) keep the grid's integers; 7-bit weights re-round every channel
            grid.channels = int(on_int8_grid(rows, min_scale).sum())
            grid.lost = grid.channels if wt is WeightType.INT8_7BIT else 0
        q, scale, zp = quantize_weight(w, axis, wt, min_scale, rows)
        self.report.layers.append(layer_layout(node.name, kind, wt, w, axis, rows, scale, min_scale, grid))
        base = f"{node.name}_{name}"
        qn, sn, zn, out = f"{base}_wq", f"{base}_wscale", f"{base}_wzp", f"{base}_wdq"
        self.new_inits.extend(
            [numpy_helper.from_array(q, qn), numpy_helper.from_array(scale, sn), numpy_helper.from_array(zp, zn)]
        )
        self.nodes.append(helper.make_node("DequantizeLinear", [qn, sn, zn], [out], name=f"{base}_wDQ", axis=axis))
        return out, scale

    def bias_dq(self, node: Any, name: str, s_x: np.float32, s_w: np.ndarray) -> str:
        """Quantize bias ``name`` to int32 at scale ``s_x * s_w`` (clipped, and reported, where it overflows);
        the output of its DequantizeLinear."""
        from onnx import helper, numpy_helper

        b = numpy_helper.to_array(self.inits[name]).astype(np.float64)
        s_b = (np.float64(s_x) * s_w.astype(np.float64)).astype(np.float32)
        q = np.round(b / s_b.astype(np.float64))
        if np.abs(q).max() > INT32_MAX:
            self.report.bias_clipped.append(node.name)
        q = np.clip(q, -INT32_MAX, INT32_MAX).astype(np.int32)
        base = f"{node.name}_{name}"
        qn, sn, zn, out = f"{base}_bq", f"{base}_bscale", f"{base}_bzp", f"{base}_bdq"
        zeros = np.zeros(s_b.shape, np.int32)
        self.new_inits.extend(
            [numpy_helper.from_array(q, qn), numpy_helper.from_array(s_b, sn), numpy_helper.from_array(zeros, zn)]
        )
        self.nodes.append(helper.make_node("DequantizeLinear", [qn, sn, zn], [out], name=f"{base}_bDQ", axis=0))
        return out

    def quantize_weighted(self, n: Any, nc: Any) -> None:
        """Point the copy ``nc`` of weighted node ``n`` at its quantized weight (and int32 bias, whose size floors
        the weight scales)."""
        from onnx import numpy_helper

        s_x = self.act[n.input[0]][0]
        has_bias = len(n.input) > 2 and n.input[2] in self.inits
        min_scale: np.ndarray | float = 0.0
        if has_bias:
            min_scale = np.abs(numpy_helper.to_array(self.inits[n.input[2]]).astype(np.float64)) / (
                float(s_x) * 2.0**30
            )
        nc.input[1], s_w = self.weight_dq(n, n.input[1], min_scale)
        if has_bias:
            nc.input[2] = self.bias_dq(n, n.input[2], s_x, s_w)

    def add_node(self, n: Any, quantized: bool) -> None:
        """Append a copy of ``n`` reading quantized tensors through DQs (integer op or float, as reported), then
        the Qs of its quantized outputs."""
        onnx = lazy_import("onnx")

        nc = onnx.NodeProto()
        nc.CopyFrom(n)
        for i, t in enumerate(n.input):
            if t in self.act:
                nc.input[i] = self.emit_dq(t)
        if quantized:
            if n.op_type in WEIGHTED:
                self.quantize_weighted(n, nc)
            self.report.quantized.append(n.name)
        elif n.op_type not in ACT_OPS | PASS_THROUGH | {"Constant"}:
            self.report.float_nodes.append((n.op_type, n.name))
        self.nodes.append(nc)
        for o in n.output:
            if o in self.act:
                self.emit_q(o)


def insert_ort_qdq(
    model: Any,
    stats: dict[str, Any],
    amax: dict[str, float] | None = None,
    weights: OrtWeights = OrtWeights(),
    exclude: Iterable[str] = (),
) -> tuple[Any, OrtQdqReport]:
    """A copy of ``model`` with Q/DQ laid out for ORT's fused uint8 CPU kernels, and a report.

    Args:
        model: Float ``onnx.ModelProto`` (opset >= 13), e.g. a tf2onnx export.
        stats: Tensor name -> :class:`~quantship.calibrate.histogram.TensorStats` (``min``/``max``), collected on
            ``model`` (at least on :func:`ort_tensors`).
        amax: Calibrated |x| bound per tensor (a calibrator's ranges); clips [min, max] to [-amax, amax].
        weights: Weight types per layer kind.
        exclude: Node names kept in float.

    Raises:
        CalibrationError: The model's opset is below 13 (per-channel DequantizeLinear).
    """
    lazy_import("onnx")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise CalibrationError(f"the ORT int8 layout needs ONNX opset >= 13 (per-channel Q/DQ), the model has {opset}")
    report = OrtQdqReport()
    m, report.folded_bn, report.gemm_fused = prepare_for_ort(model)
    plan = _plan(m, set(exclude))
    act = _ActivationParams(plan, stats, amax or {}, report)
    quantized = act.quantized_nodes(m)
    writer = _OrtQdqWriter(act.params, {i.name: i for i in m.graph.initializer}, weights, report)
    for t in m.graph.input:
        if t.name in act.params:
            writer.emit_q(t.name)
    for n in m.graph.node:
        writer.add_node(n, bool(quantized.get(n.name)))
    report.qdq_tensors = len(act.params)
    return with_nodes(m, writer.nodes, writer.new_inits), report


def artifact_weight_types(model: Any) -> dict[str, list[str]]:
    """Element types of the quantized weights in a Q/DQ model, per op type of the consumer of their
    DequantizeLinear (``{"Conv": ["uint8", "int8"], "Gemm": ["uint8"]}``): read back from the file itself."""
    onnx = lazy_import("onnx")
    inits = {i.name: i for i in model.graph.initializer}
    cons = _consumers(model.graph.node)
    out: dict[str, set[str]] = {}
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits:
            continue
        for user in cons.get(n.output[0], []):
            if user.op_type in WEIGHTED and list(user.input).index(n.output[0]) == 1:
                dtype = onnx.helper.tensor_dtype_to_np_dtype(inits[n.input[0]].data_type)
                out.setdefault(user.op_type, set()).add(np.dtype(dtype).name)
    return {k: sorted(v) for k, v in out.items()}
