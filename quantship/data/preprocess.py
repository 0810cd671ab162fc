"""Image decoding and classification preprocessing, driven entirely by a :class:`PreprocessSpec`.

Every runtime is fed by this one function so that no two targets ever see differently prepared pixels.
"""

from __future__ import annotations

import contextlib
import functools
import os
import struct
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from quantship.config import (
    RESIZE_LONG_SIDE,
    CentreOffset,
    ChannelOrder,
    CropMode,
    Interpolation,
    Layout,
    PreprocessSpec,
    ResizeMode,
    max_image_pixels,
)
from quantship.errors import DataError
from quantship.lazy import lazy_import

_CV2_INTERP = {
    Interpolation.NEAREST: "INTER_NEAREST",
    Interpolation.BILINEAR: "INTER_LINEAR",
    Interpolation.BICUBIC: "INTER_CUBIC",
    Interpolation.AREA: "INTER_AREA",
}


@functools.cache
def _cv2():
    return lazy_import("cv2", "opencv-python-headless", "image decoding")


def _resize(img: np.ndarray, width: int, height: int, interpolation: Interpolation) -> np.ndarray:
    if interpolation is Interpolation.BILINEAR_ANTIALIAS:
        # Pillow itself: torchvision's reference evaluation resizes with it, and no OpenCV mode matches it
        # when shrinking (measured in quantship/models/mobilenet_v2_tv.py).
        pil = lazy_import("PIL.Image", "pillow", "antialiased bilinear resizing")
        return np.asarray(pil.fromarray(np.ascontiguousarray(img)).resize((width, height), pil.BILINEAR))
    cv2 = _cv2()
    return cv2.resize(img, (width, height), interpolation=getattr(cv2, _CV2_INTERP[interpolation]))


def decode_image(data: bytes, source: str = "image", order: ChannelOrder = ChannelOrder.RGB) -> np.ndarray:
    """Decode JPEG/PNG/... bytes to a uint8 array (H, W, 3) in ``order`` (RGB by default; BGR saves the
    conversion when the caller folds the channel order into normalisation).

    Raises:
        DataError: The bytes are not a readable image; a JPEG is truncated (no end-of-image marker) or its
            decoder reports corrupt data (a file cut short and given an end marker decodes with grey pixels and
            only a warning on the console); the image is larger than :func:`~quantship.config.max_image_pixels`.
    """
    cv2 = _cv2()
    if not data:
        raise DataError(f"{source}: empty file")
    is_jpeg = data[:2] == b"\xff\xd8"
    if is_jpeg and data.rfind(b"\xff\xd9") < 2:
        raise DataError(f"{source}: truncated JPEG (no end-of-image marker)")
    size = image_size(data)
    limit = max_image_pixels()
    if size is not None and size[0] * size[1] > limit:
        raise DataError(
            f"{source}: {size[0]}x{size[1]} pixels, more than the {limit} this reader decodes "
            "(QUANTSHIP_MAX_IMAGE_PIXELS raises the limit)"
        )
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:  # OpenCV's own size limit and other refusals are exceptions, not None
        raise DataError(f"{source}: not a readable image ({_first_line(exc)})") from None
    if img is None or img.size == 0:
        raise DataError(f"{source}: not a readable image")
    if is_jpeg and (_grey_corner(img) or _progressive(data)):
        # libjpeg fills what a cut-short scan lacks with uniform grey (128) and only warns on stderr; a grey
        # last pixel makes us decode once more while listening to that warning. A progressive JPEG cut short
        # shows its earlier, coarser scans instead of grey: it is always listened to.
        warning = _jpeg_warning(cv2, buf)
        if warning:
            raise DataError(f"{source}: corrupt JPEG (decoder: {warning})")
    if img.dtype != np.uint8:  # 16-bit PNG and the like
        img = (img / (np.iinfo(img.dtype).max / 255.0)).astype(np.uint8) if img.dtype.kind == "u" else None
        if img is None:
            raise DataError(f"{source}: unsupported pixel type")
    if img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=2)
    if img.shape[2] == 1:
        return np.repeat(img, 3, axis=2)
    bgr = order is ChannelOrder.BGR
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2BGR if bgr else cv2.COLOR_BGRA2RGB)
    return img if bgr else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header of a PNG, JPEG or BMP, read before decoding; None for other formats
    (OpenCV's own limit applies to those) or a header that does not say."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24 and data[12:16] == b"IHDR":
        w, h = struct.unpack(">II", data[16:24])
        return w, h
    if data[:2] == b"BM" and len(data) >= 26:
        w, h = struct.unpack("<ii", data[18:26])
        return abs(w), abs(h)
    frame = _jpeg_frame(data)
    return frame[:2] if frame is not None else None


_PROGRESSIVE_MARKERS = {0xC2, 0xC6, 0xCA, 0xCE}


def _progressive(data: bytes) -> bool:
    frame = _jpeg_frame(data)
    return frame is not None and frame[2] in _PROGRESSIVE_MARKERS


def _jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, start-of-frame marker) from a JPEG's frame header; None when there is none before the
    first scan."""
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 4 <= len(data):
            if data[i] != 0xFF:
                return None
            marker = data[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker in _SOF_MARKERS and i + 9 <= len(data):
                h, w = struct.unpack(">HH", data[i + 5 : i + 9])
                return w, h, marker
            if marker == 0xDA:  # start of scan before any frame header
                return None
            if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
                i += 2
                continue
            i += 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
    return None


def _grey_corner(img: np.ndarray) -> bool:
    corner = img[-1, -1]
    return bool(np.all(corner == 128))


_CAPTURE_LOCK = threading.Lock()
_JPEG_WARNINGS = ("Corrupt JPEG data", "Premature end of JPEG file")


def _jpeg_warning(cv2: Any, buf: np.ndarray) -> str | None:
    """Decode ``buf`` again with file descriptor 2 captured; return libjpeg's corrupt-data warning, if any.

    What other threads write to descriptor 2 meanwhile is passed on to where it was going.
    """
    with _CAPTURE_LOCK, tempfile.TemporaryFile() as capture:
        saved = os.dup(2)
        try:
            os.dup2(capture.fileno(), 2)
            try:
                cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
            except cv2.error:
                pass
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        text = capture.read()
    if text:
        with contextlib.suppress(OSError):
            os.write(2, text)
    for line in text.decode("utf-8", "replace").splitlines():
        if line.startswith(_JPEG_WARNINGS):
            return line.strip()
    return None


def _first_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1][:200] if lines else type(exc).__name__


def resize_shorter(img: np.ndarray, shorter: int, interpolation: Interpolation) -> np.ndarray:
    """Resize so that the shorter side is ``shorter`` pixels, keeping the aspect ratio; the longer side is
    ``int(shorter * long / short)`` (truncated, as torchvision's ``Resize(shorter)`` and timm do)."""
    h, w = img.shape[:2]
    short, long = min(h, w), max(h, w)
    other = max(shorter, int(shorter * long / short))
    new_w, new_h = (other, shorter) if w >= h else (shorter, other)
    if (new_h, new_w) == (h, w):
        return img
    return _resize(img, new_w, new_h, interpolation)


def centre_offset(margin: int, rule: CentreOffset) -> int:
    """Start of a centre crop with ``margin`` pixels to spare: ``margin // 2`` (TensorFlow) or torchvision's
    ``int(round(margin / 2))`` (half to even: 79.5 -> 80, 80.5 -> 80)."""
    return int(round(margin / 2.0)) if rule is CentreOffset.ROUND else margin // 2


def _crop(img: np.ndarray, top: int, left: int, size: tuple[int, int]) -> np.ndarray:
    return img[top : top + size[0], left : left + size[1]]


def crop_views(img: np.ndarray, spec: PreprocessSpec) -> list[np.ndarray]:
    """The crops of ``img`` the spec asks for (uint8, RGB): 1, 10 or 12 views."""
    ch, cw = spec.size
    if spec.resize is ResizeMode.STRETCH:
        return [_resize(img, cw, ch, spec.interpolation)]
    resized = resize_shorter(img, max(spec.resize_shorter, ch, cw), spec.interpolation)
    h, w = resized.shape[:2]
    centre = _crop(resized, centre_offset(h - ch, spec.centre), centre_offset(w - cw, spec.centre), spec.size)
    if spec.crops is CropMode.CENTER:
        return [centre]
    corners = [
        _crop(resized, 0, 0, spec.size),
        _crop(resized, 0, w - cw, spec.size),
        _crop(resized, h - ch, 0, spec.size),
        _crop(resized, h - ch, w - cw, spec.size),
        centre,
    ]
    views = corners + [v[:, ::-1] for v in corners]
    if spec.crops is CropMode.TWELVE:
        whole = _resize(img, cw, ch, spec.interpolation)
        views += [whole, whole[:, ::-1]]
    return views


def normalize(views: np.ndarray, spec: PreprocessSpec, input_order: ChannelOrder = ChannelOrder.RGB) -> np.ndarray:
    """(..., H, W, 3) uint8 in ``input_order`` -> float32 normalised, in the spec's channel order and layout."""
    mean, std = np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)
    if input_order is ChannelOrder.BGR:  # mean/std are given in RGB order
        mean, std = mean[::-1], std[::-1]
    x = views.astype(np.float32)
    x -= mean
    x *= np.float32(1.0) / std
    if input_order is not spec.channel_order:
        x = x[..., ::-1]
    if spec.layout is Layout.NCHW:
        x = np.moveaxis(x, -1, -3)
    return np.ascontiguousarray(x)


def preprocess_image(img: np.ndarray, spec: PreprocessSpec, input_order: ChannelOrder = ChannelOrder.RGB) -> np.ndarray:
    """uint8 image (RGB unless ``input_order`` says BGR) -> float32 array of shape (views, *input_shape)."""
    return normalize(np.stack(crop_views(img, spec)), spec, input_order)


def num_views(spec: PreprocessSpec) -> int:
    return {CropMode.CENTER: 1, CropMode.TEN: 10, CropMode.TWELVE: 12}[spec.crops]


def geometry(spec: PreprocessSpec) -> dict:
    """The part of a spec that decides the uint8 pixels of each view (resize, crop, interpolation, views);
    normalisation, channel order and layout are applied later, on the fly."""
    d = spec.to_dict()
    return {
        **{k: d[k] for k in ("size", "crop_pct", "interpolation", "crops", "resize", "centre")},
        "long_side": RESIZE_LONG_SIDE,
    }


def image_views(data: bytes, spec: PreprocessSpec, source: str = "image") -> np.ndarray:
    """Encoded image bytes -> the spec's views as one uint8 RGB array (views, H, W, 3).

    The image is decoded in OpenCV's native BGR, resized and cropped (channel order does not matter to
    either), and only the small crops are turned into RGB.

    Raises:
        DataError: The bytes are not a readable image.
    """
    views = np.stack(crop_views(decode_image(data, source, ChannelOrder.BGR), spec))
    return np.ascontiguousarray(views[..., ::-1])


@dataclass(frozen=True)
class InputEncoding:
    """How uint8 RGB pixels become a model's input tensor: the spec's normalisation, channel order and layout,
    then float32, or the integer type of a quantized input (scale, zero point).

    Normalisation and quantization are one table lookup per channel value (256 entries per channel, computed
    with the very operations of :func:`normalize` and the runners' ``quantize``, so the values are the same
    bit for bit), applied in one pass over the pixels.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channel_order: ChannelOrder
    layout: Layout
    dtype: str = "float32"
    scale: float | None = None
    zero_point: int | None = None

    @classmethod
    def of(
        cls, spec: PreprocessSpec, dtype: object = np.float32, scale: float | None = None, zero_point: int | None = None
    ) -> "InputEncoding":
        dt = np.dtype(dtype)
        quantized = dt.kind in "iu" and scale is not None
        return _encoding(
            cls,
            spec.mean,
            spec.std,
            spec.channel_order,
            spec.layout,
            dt.name if quantized else "float32",
            float(scale) if quantized else None,
            int(zero_point or 0) if quantized else None,
        )

    @property
    def quantized(self) -> bool:
        return self.scale is not None

    @functools.cached_property
    def table(self) -> np.ndarray:
        """(1, 256, 3): the input value of every channel value, channels in the model's order."""
        spec = PreprocessSpec(mean=self.mean, std=self.std, channel_order=self.channel_order)
        values = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
        x = normalize(values, spec, self.channel_order)  # values already in the model's channel order
        if self.quantized:
            info = np.iinfo(self.dtype)
            x = np.clip(np.round(x / self.scale) + self.zero_point, info.min, info.max).astype(self.dtype)
        return np.ascontiguousarray(x).reshape(1, 256, 3)

    @functools.cached_property
    def _lookup(self) -> tuple[str, np.ndarray]:
        """The cheapest exact way to apply the table: none (uint8 identity), a sign flip (int8 ``v - 128``),
        one table for every channel (treated as one channel: OpenCV's 1-channel lookup is vectorised), or one
        per channel."""
        t = self.table[0]
        same = bool((t == t[:, :1]).all())
        v = np.arange(256)
        if same and self.dtype == "uint8" and np.array_equal(t[:, 0], v):
            return "identity", t
        if same and self.dtype == "int8" and np.array_equal(t[:, 0], v - 128):
            return "flip", t
        return ("shared", np.ascontiguousarray(t[:, 0]).reshape(1, 256)) if same else ("per-channel", self.table)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 RGB pixels (..., H, W, 3), e.g. rows of a memory-mapped cache shard -> the model's input
        (float32 or integer), in its order and layout."""
        cv2 = _cv2()
        shape = pixels.shape
        x = np.ascontiguousarray(pixels)
        if self.channel_order is ChannelOrder.BGR:
            x = cv2.cvtColor(x.reshape(-1, shape[-2], 3), cv2.COLOR_RGB2BGR).reshape(shape)
        how, table = self._lookup
        if how == "flip":
            x = np.bitwise_xor(x, np.uint8(0x80)).view(np.int8)
        elif how == "shared":
            x = cv2.LUT(x.reshape(-1, shape[-2] * 3), table).reshape(shape)
        elif how == "per-channel":
            x = cv2.LUT(x.reshape(-1, shape[-2], 3), table).reshape(shape)
        if self.layout is Layout.NCHW:
            x = np.ascontiguousarray(np.moveaxis(x, -1, -3))
        return x


@functools.lru_cache(maxsize=64)
def _encoding(cls: type, *fields: Any) -> InputEncoding:
    """One instance per encoding, so its tables are computed once per process, not once per batch."""
    return cls(*fields)
