"""The phone / browser pre- and post-processing contract, in Python: the reference that the Android
app (``android_demo/app/.../FaceContract.kt``) and the browser demo (``android_demo/web/contract.js``)
mirror step for step, with the same integer and float32 arithmetic and the same rounding.

From a decoded, upright RGB picture (any size, uint8) to the model input, and from the model output
to displayable pixels::

    1. crop     the largest centred square: side = min(w, h), left = (w - side) // 2,
                top = (h - side) // 2                                  (as quantface.data)
    2. resize   side × side → S × S (S = model.json "working_size") by exact area averaging:
                output pixel i covers source interval [i·side/S, (i+1)·side/S) on each axis;
                every source pixel weighs by its overlap with that square, computed in integers
                (units of 1/S pixel), and the weighted sum acc is divided by side², rounding half
                to even: q, r = divmod(acc, side²); q + 1 if 2r > side² or (2r = side² and q odd).
                Same filter up and down; no float arithmetic.
    3. input    NCHW float32, RGB order: x = float32(p) / 127.5f − 1f    (as quantface.pipeline)
    4. output   y = clamp(y, −1, 1); v = (y + 1f) · 127.5f in float32; rounded half to even;
                uint8 RGB, or opaque ARGB (0xFF << 24 | r << 16 | g << 8 | b) on Android
                                                                      (as quantface.pipeline)

Steps 1, 3 and 4 are identical to ``quantface restore`` (``quantface.data.center_crop_resize`` and
``quantface.pipeline``). Step 2 differs: ``restore`` resizes with OpenCV (``INTER_AREA`` down,
``INTER_CUBIC`` up), whose float arithmetic and vectorised paths cannot be reproduced exactly in
Kotlin and JavaScript; the exact integer area average can. Measured against OpenCV 5 on
scikit-image's photographs (``tests/test_package.py``): downscaling is bit-identical to
``INTER_AREA`` except at exactly 2× (OpenCV's 2× fast path rounds ties up: ≤ 1 level) and for rare
near-ties of OpenCV's float32 accumulation (1 pixel of 256², 1 level); upscaling
differs (area vs bicubic), which the app never needs for camera photos. So a photo whose crop is
downscaled restores bit-identically to ``quantface restore --onnx`` with the same ONNX Runtime
settings in the tested cases (a one-level input difference could move a 4-bit activation, so the
guarantee is for the shared steps 1, 3, 4; step 2 is ≤ 1 level from OpenCV when shrinking).

Pictures with an alpha channel are composited on white first, in integers:
``c' = (c·a + 255·(255 − a) + 127) // 255`` (Pillow's compositing in ``quantface.data`` may differ by
one level). The app also applies the JPEG's EXIF orientation before step 1 (``restore`` does not).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CONTRACT_VERSION = 1
LAYOUT = "NCHW"
INPUT_RANGE = (-1.0, 1.0)
_HALF = np.float32(127.5)
_ONE = np.float32(1.0)


@dataclass(frozen=True)
class CropBox:
    left: int
    top: int
    side: int


def crop_box(width: int, height: int) -> CropBox:
    """Step 1: the largest centred square of a width × height picture."""
    if width < 1 or height < 1:
        raise ValueError(f"empty picture ({width}×{height})")
    side = min(width, height)
    return CropBox((width - side) // 2, (height - side) // 2, side)


def area_weights(src: int, dst: int) -> np.ndarray:
    """(dst, src) int64: overlap, in units of 1/dst source pixel, of output cell i = [i·src, (i+1)·src)
    with source pixel k = [k·dst, (k+1)·dst); each row sums to ``src``."""
    i = np.arange(dst, dtype=np.int64)[:, None]
    k = np.arange(src, dtype=np.int64)[None, :]
    lo = np.maximum(i * src, k * dst)
    hi = np.minimum((i + 1) * src, (k + 1) * dst)
    return np.maximum(hi - lo, 0)


def resize_area(square: np.ndarray, size: int) -> np.ndarray:
    """Step 2: side × side × C uint8 → size × size × C uint8, exact integer area average."""
    side = square.shape[0]
    if square.shape[1] != side:
        raise ValueError(f"resize_area needs a square, got {square.shape[:2]}")
    if side == size:
        return np.ascontiguousarray(square)
    w = area_weights(side, size)
    px = square.astype(np.int64)
    rows = np.einsum("jk,ykc->yjc", w, px)  # horizontal pass, exact: ≤ 255·side
    acc = np.einsum("iy,yjc->ijc", w, rows)  # vertical pass, exact: ≤ 255·side²
    q, r = np.divmod(acc, side * side)
    up = (2 * r > side * side) | ((2 * r == side * side) & (q % 2 == 1))
    return (q + up).astype(np.uint8)


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """HWC RGBA uint8 → RGB uint8, alpha composited on white (integer, rounded)."""
    rgba = rgba.astype(np.int64)
    a = rgba[..., 3:4]
    return ((rgba[..., :3] * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def crop_resize(rgb: np.ndarray, size: int) -> np.ndarray:
    """Steps 1–2: HWC uint8 RGB (or RGBA) of any size → size × size × 3 uint8 (the 'before' image)."""
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4) or rgb.dtype != np.uint8:
        raise ValueError(f"expected an HWC uint8 RGB(A) picture, got {rgb.dtype} {rgb.shape}")
    if rgb.shape[2] == 4:
        rgb = composite_on_white(rgb)
    box = crop_box(rgb.shape[1], rgb.shape[0])
    square = rgb[box.top:box.top + box.side, box.left:box.left + box.side]
    return resize_area(square, size)


def to_input(rgb: np.ndarray) -> np.ndarray:
    """Step 3: S × S × 3 uint8 → (1, 3, S, S) float32 in [-1, 1]."""
    x = rgb.astype(np.float32) / _HALF - _ONE
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def to_rgb(output: np.ndarray) -> np.ndarray:
    """Step 4: (1, 3, S, S) (or (3, S, S)) float32 → S × S × 3 uint8 (clamp, ×127.5, half to even)."""
    y = np.asarray(output, dtype=np.float32)
    if y.ndim == 4:
        if y.shape[0] != 1:
            raise ValueError(f"expected one image, got batch {y.shape[0]}")
        y = y[0]
    v = (np.clip(y, np.float32(-1.0), _ONE) + _ONE) * _HALF
    return np.ascontiguousarray(np.rint(v).astype(np.uint8).transpose(1, 2, 0))


def to_argb(rgb: np.ndarray) -> np.ndarray:
    """S × S × 3 uint8 → S × S uint32 opaque ARGB, as Android's ``Bitmap.setPixels`` takes them."""
    c = rgb.astype(np.uint32)
    return (np.uint32(0xFF000000) | (c[..., 0] << 16) | (c[..., 1] << 8) | c[..., 2]).astype(np.uint32)


def restore(rgb: np.ndarray, run, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The whole contract around ``run`` ((1, 3, S, S) float32 → same shape, e.g. an ONNX Runtime
    session): returns (before, after), both S × S × 3 uint8."""
    before = crop_resize(rgb, size)
    return before, to_rgb(run(to_input(before)))


def ort_runner(session, input_name: str | None = None):
    """``run`` for :func:`restore` from an ``onnxruntime.InferenceSession``."""
    name = input_name or session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]
