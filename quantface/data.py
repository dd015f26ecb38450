"""Face images in and out: folder listing, robust decoding, centre crop + resize, shipped faces.

Images are handled as HWC uint8 RGB numpy arrays everywhere outside the model. Any mode Pillow can
open is converted: grayscale, RGBA / LA (alpha composited on white), palette, CMYK, and 16-bit
grayscale (scaled, not truncated). A file that cannot be decoded raises ``ImageError`` with one
sentence naming the file and the reason; ``load_folder`` skips such files, counts them and reports
them at the end. An image of more than ``MAX_IMAGE_PIXELS`` (64 megapixels, e.g. 8000×8000) is
refused before it is decoded: faces are resized to a few hundred pixels anyway, and a larger file is
more likely a decompression bomb than a photograph.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from quantface.config import SHIPPED_LFW
from quantface.errors import ImageError
from quantface.paths import atomic_write_bytes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
# The largest image read_image decodes (width × height). Below Pillow's own decompression-bomb
# warning (89.5 MP), so every image Pillow would warn about or refuse gets this one sentence instead.
MAX_IMAGE_PIXELS = 64_000_000


def list_images(path: str | Path) -> list[Path]:
    """The image files of a folder (sorted by name), or ``[path]`` for a single file."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ImageError(f"input path {path} does not exist")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ImageError(f"folder {path} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def to_rgb_uint8(img: Image.Image) -> np.ndarray:
    """Convert any Pillow image to an HWC uint8 RGB array."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        gray = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode == "F":
        gray = np.clip(np.round(np.asarray(img, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def read_image(path: str | Path) -> np.ndarray:
    """Decode one image file to HWC uint8 RGB, or raise ``ImageError`` naming the file."""
    path = Path(path)
    limit = f"above the {MAX_IMAGE_PIXELS // 1_000_000}-megapixel limit (MAX_IMAGE_PIXELS in quantface/data.py)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise ImageError(f"image {path} is {w}x{h} pixels, {limit}")
                img.load()
                return to_rgb_uint8(img)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"image file {path} does not exist") from None
    except IsADirectoryError:
        raise ImageError(f"image file {path} is a folder") from None
    except UnidentifiedImageError:
        raise ImageError(f"cannot read image {path}: Pillow recognises no image format in it") from None
    except Image.DecompressionBombError:  # Pillow refuses above 2 × its own limit before we see the size
        raise ImageError(f"image {path} is {limit}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"cannot read image {path}: {exc}") from None


def center_crop_resize(img: np.ndarray, size: int) -> np.ndarray:
    """Largest centred square, resized to ``size``×``size`` (area filter down, bicubic up)."""
    h, w = img.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = img[top:top + side, left:left + side]
    if side == size:
        return np.ascontiguousarray(square)
    interp = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
    return cv2.resize(square, (size, size), interpolation=interp)


@dataclass
class LoadedImages:
    """Images loaded from a folder, the files they came from, and the files that were skipped."""

    images: list[np.ndarray] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # one error sentence per unreadable file

    def report(self) -> str:
        if not self.skipped:
            return ""
        lines = [f"skipped {len(self.skipped)} unreadable file(s):"] + [f"  {s}" for s in self.skipped]
        return "\n".join(lines)


def load_folder(path: str | Path, size: int, limit: int | None = None) -> LoadedImages:
    """Load up to ``limit`` images from a file or folder, centre-cropped and resized to ``size``.

    Unreadable files are skipped and listed in ``skipped``; if nothing at all could be read the
    call raises ``ImageError``.
    """
    out = LoadedImages()
    for file in list_images(path):
        if limit is not None and len(out.images) >= limit:
            break
        try:
            out.images.append(center_crop_resize(read_image(file), size))
            out.paths.append(file)
        except ImageError as exc:
            out.skipped.append(str(exc))
    if not out.images:
        raise ImageError(nothing_readable(path, out.skipped))
    return out


def nothing_readable(path: str | Path, skipped: list[str]) -> str:
    """The sentence for a file or folder none of whose images could be read: each names the file
    and the reason (for several files, their count and the first one's reason)."""
    if Path(path).is_file():
        return skipped[0]
    if len(skipped) == 1:
        return f"no readable images in {path}: {skipped[0]}"
    return f"no readable images in {path}: {len(skipped)} files failed to decode, the first: {skipped[0]}"


# The astronaut photograph's face region (x0, y0, x1, y1): a CelebA-HQ-like crop with hair and chin.
ASTRONAUT_FACE_BOX = (125, 10, 325, 210)


LFW_SHIPPED_COUNT = 200


def shipped_lfw_faces(size: int, limit: int | None = None) -> list[np.ndarray]:
    """The first ``limit`` (default all 200) LFW faces scikit-image ships, at ``size`` (``SHIPPED_LFW``)."""
    count = LFW_SHIPPED_COUNT if limit is None else min(limit, LFW_SHIPPED_COUNT)
    return shipped_faces(size, lfw_count=count)[0][1:]


def shipped_faces(size: int, lfw_count: int = 5) -> tuple[list[np.ndarray], list[str]]:
    """Real face photographs that scikit-image ships (no download): the astronaut's face, cropped,
    and the first ``lfw_count`` 25×25 Labeled Faces in the Wild images, upsampled bicubically."""
    from skimage import data as skdata

    x0, y0, x1, y1 = ASTRONAUT_FACE_BOX
    faces = [center_crop_resize(skdata.astronaut()[y0:y1, x0:x1], size)]
    names = ["astronaut"]
    lfw = skdata.lfw_subset()  # (200, 25, 25) float in [0, 1], grayscale
    for i in range(min(lfw_count, len(lfw))):
        gray = np.clip(np.round(lfw[i] * 255.0), 0, 255).astype(np.uint8)
        faces.append(center_crop_resize(np.repeat(gray[:, :, None], 3, axis=2), size))
        names.append(f"lfw_{i:03d}")
    return faces, names


def write_image(path: str | Path, img: np.ndarray) -> None:
    """Save an HWC uint8 RGB array; the format follows the suffix (png, jpg, webp). Atomic."""
    path = Path(path)
    ext = path.suffix.lower() or ".png"
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(img[:, :, ::-1]))
    if not ok:
        raise ImageError(f"cannot encode an image as {ext} for {path}")
    atomic_write_bytes(path, buf.tobytes())
