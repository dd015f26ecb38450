"""The README's real-photo before/after (docs/restore_photo.png): scikit-image's astronaut photograph,
degraded (blur, 6× downscale, noise, JPEG), restored by ``quantface restore`` (face found, aligned,
restored at 128×128, pasted back into the whole 512×512 photo), with the face region's PSNR / SSIM
against the clean photo before and after.

    python tools/readme_photo.py --out docs/restore_photo.png
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from skimage import data as skdata

from quantface.data import read_image, write_image
from quantface.jobs import RestoreConfig, restore
from quantface.metrics import psnr, ssim
from quantface.paths import atomic_path

FACE = (slice(40, 232), slice(130, 322))  # the astronaut's face and hair in the 512×512 photo


def degrade_photo(img: np.ndarray, seed: int = 0) -> np.ndarray:
    """Gaussian blur σ 4, 6× area downscale and bicubic back, noise σ 12/255, JPEG quality 50."""
    rng = np.random.default_rng(seed)
    h, w = img.shape[:2]
    x = cv2.GaussianBlur(img, (0, 0), 4.0)
    x = cv2.resize(cv2.resize(x, (w // 6, h // 6), interpolation=cv2.INTER_AREA), (w, h), interpolation=cv2.INTER_CUBIC)
    x = np.clip(x + rng.normal(0, 12, x.shape), 0, 255).astype(np.uint8)
    _, buf = cv2.imencode(".jpg", np.ascontiguousarray(x[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 50])
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1]


def _label(img: np.ndarray, text: str) -> np.ndarray:
    img = img.copy()
    (w, h), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
    img[: h + 12, : w + 12] = 0
    cv2.putText(img, text, (6, h + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    return img


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/restore_photo.png")
    a = p.parse_args(argv)
    clean = skdata.astronaut()
    lq = degrade_photo(clean)
    with tempfile.TemporaryDirectory() as tmp:
        write_image(Path(tmp) / "in" / "astronaut.png", lq)
        report = restore(RestoreConfig(input=str(Path(tmp) / "in"), output=str(Path(tmp) / "out")))
        if report.faces != 1:
            raise SystemExit(f"expected one face restored, got {report.faces} ({report.fallback or report.notes})")
        out = read_image(Path(tmp) / "out" / "astronaut.png")
    print(f"face region PSNR {psnr(lq[FACE], clean[FACE]):.2f} -> {psnr(out[FACE], clean[FACE]):.2f} dB, "
          f"SSIM {ssim(lq[FACE], clean[FACE]):.3f} -> {ssim(out[FACE], clean[FACE]):.3f} (vs the clean photo)")
    side = 320
    full = [cv2.resize(x, (side, side), interpolation=cv2.INTER_AREA) for x in (lq, out)]
    zoom = [cv2.resize(x[FACE], (side, side), interpolation=cv2.INTER_CUBIC) for x in (lq, out)]
    grid = np.concatenate([np.concatenate([_label(full[0], "degraded photo"), _label(full[1], "restored photo")], 1),
                           np.concatenate([_label(zoom[0], "degraded (face)"), _label(zoom[1], "restored (face)")], 1)])
    with atomic_path(a.out) as tmp:
        Image.fromarray(grid).quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            tmp, format="PNG", optimize=True)
    print(f"wrote {a.out} ({Path(a.out).stat().st_size / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
