"""Face analysis with dlib (the optional ``[faces]`` extra): detection, 5- and 68-point landmarks, the
128-d face embedding, and the face metrics built on them; also the face alignment and paste-back that
``quantface restore`` uses on whole photographs.

The networks are dlib's, with the weights that the ``face-recognition-models`` package installs (no
download at run time): the CNN (MMOD) and HOG face detectors, the 5- and 68-point shape predictors and
the ResNet face-recognition model (same person below a distance of about 0.6).

Metrics (``face_scores``):

* ``identity_distance``: Euclidean distance between the 128-d embeddings of two faces (0 for the same
  image; dlib's same-person threshold is 0.6).
* ``landmark_distance``: mean distance of the 68 landmarks of two faces, divided by the inter-ocular
  distance of the first (the centres of its eyes, points 36-41 and 42-47).

Which detector: the CNN detector finds faces on 128×128 crops that the HOG detector misses (29/30 vs
25/30 on held-out test faces, measured here), but is 5-20× slower (0.15 s against 0.01-0.03 s a crop on
one core), so the HOG detector runs first and the CNN one only where it finds nothing. The reference image's detector is then used for the images compared with it, so
both sides' landmarks come from boxes of the same detector. Images are padded by a quarter of their
side before detection: faces that fill a tight crop touch the border, where the detectors miss them.

Everything is deterministic (no jitter); analyses are cached by image content, so the GT faces of an
evaluation (and the FP model's outputs, which every recipe is compared with) are analysed once per
process.
"""

from __future__ import annotations

import hashlib
import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from quantface.errors import QuantFaceError

INSTALL_HINT = "pip install 'quantface[faces]'"
EMBEDDING_THRESHOLD = 0.6  # dlib's same-person distance
LEFT_EYE, RIGHT_EYE = slice(36, 42), slice(42, 48)  # the 68-point (iBUG 300-W) eye contours
MIN_FACE_SIDE = 32  # images narrower than this hold no face the detectors can find

# Mean 5-point landmarks (dlib's 5-point predictor: two corners of each eye, the base of the nose) of
# the training faces at 128×128, as fractions of the side: what the embedded model was trained on.
# Measured by tools/face_template.py on 300 of faces_hq/train; restore aligns faces in photos to these.
# (254 of 300 faces found; spread 3-6 px per coordinate.)
FACE_TEMPLATE_5 = np.array([[0.6976, 0.3141], [0.5911, 0.3198], [0.3917, 0.3220], [0.4644, 0.3227],
                            [0.4699, 0.5610]])


class FacesUnavailable(QuantFaceError):
    """The ``[faces]`` extra (dlib, its model files) is not installed."""


def missing_reason() -> str | None:
    """Why the face analysis cannot run here (one phrase), or None when it can. Imports nothing."""
    if importlib.util.find_spec("dlib") is None:
        return f"dlib is not installed ({INSTALL_HINT})"
    if _models_dir() is None:
        return f"face-recognition-models (dlib's model files) is not installed ({INSTALL_HINT})"
    return None


def _models_dir() -> Path | None:
    # face_recognition_models' __init__ imports pkg_resources (gone from recent setuptools): find its
    # folder without importing it.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    return folder if (folder / "dlib_face_recognition_resnet_model_v1.dat").is_file() else None


@dataclass(frozen=True)
class Face:
    """One analysed face: its box (left, top, right, bottom) in the image, the detector that found it
    ('hog' or 'cnn'), 5- and 68-point landmarks ((5, 2) and (68, 2) arrays of x, y) and its embedding."""

    box: tuple[int, int, int, int]
    detector: str
    landmarks5: np.ndarray
    landmarks68: np.ndarray
    embedding: np.ndarray

    @property
    def inter_ocular(self) -> float:
        return float(np.linalg.norm(self.landmarks68[LEFT_EYE].mean(0) - self.landmarks68[RIGHT_EYE].mean(0)))


def identity_distance(a: Face, b: Face) -> float:
    """Distance between the two faces' embeddings (0: same image; < 0.6: same person for dlib)."""
    return float(np.linalg.norm(a.embedding - b.embedding))


def landmark_distance(ref: Face, other: Face) -> float:
    """Mean distance of the 68 landmarks, in units of ``ref``'s inter-ocular distance."""
    return float(np.linalg.norm(ref.landmarks68 - other.landmarks68, axis=1).mean() / ref.inter_ocular)


class FaceAnalyzer:
    """dlib's detectors, shape predictors and face embedding, loaded once; ``analyse`` caches by image."""

    def __init__(self, max_detect_side: int = 800):
        reason = missing_reason()
        if reason:
            raise FacesUnavailable(f"face analysis needs the [faces] extra: {reason}")
        import dlib

        models = _models_dir()
        self._dlib = dlib
        self.hog = dlib.get_frontal_face_detector()
        self.cnn = dlib.cnn_face_detection_model_v1(str(models / "mmod_human_face_detector.dat"))
        self.sp5 = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
        self.sp68 = dlib.shape_predictor(str(models / "shape_predictor_68_face_landmarks.dat"))
        self.encoder = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))
        self.max_detect_side = max_detect_side
        self._cache: dict[tuple, Face | None] = {}
        self.seconds = 0.0  # time spent analysing (cache misses), for timing reports

    # ------------------------------------------------------------------------------------- detection
    def detect(self, img: np.ndarray, detector: str | None = None, verify: bool = False
               ) -> tuple[list[tuple[int, int, int, int]], str]:
        """Face boxes (left, top, right, bottom) in ``img`` (HWC uint8 RGB), largest first, and the
        detector that found them: ``detector`` if given, else HOG, then the CNN where HOG finds none.
        ``verify``: keep only HOG boxes that the CNN detector confirms on a crop around them (photos,
        where HOG's false positives on clothes or backgrounds would be "restored" too)."""
        h, w = img.shape[:2]
        used = detector or "hog"
        if min(h, w) < MIN_FACE_SIDE:  # no face fits (and dlib's CNN refuses images below its filter size)
            return [], used
        scale = min(1.0, self.max_detect_side / max(h, w))
        small = img if scale == 1.0 else cv2.resize(img, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        pad = max(small.shape[:2]) // 4
        padded = np.ascontiguousarray(cv2.copyMakeBorder(small, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0))
        boxes: list[tuple[int, int, int, int]] = []
        if used == "hog":
            upsample = 1 if max(small.shape[:2]) <= 320 else 0  # small images: faces down to ~40 px
            boxes = [(r.left(), r.top(), r.right(), r.bottom()) for r in self.hog(padded, upsample)]
            if verify:
                boxes = [b for b in boxes if self._cnn_confirms(padded, b)]
        if used == "cnn" or (not boxes and detector is None):
            used = "cnn"
            boxes = self._cnn_boxes(padded)
        boxes.sort(key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))
        return [tuple(int(round((v - pad) / scale)) for v in b) for b in boxes], used

    def _cnn_boxes(self, img: np.ndarray, side: int = 640) -> list[tuple[int, int, int, int]]:
        """CNN detections, run at most ``side`` pixels on a side (its cost grows with the area)."""
        f = min(1.0, side / max(img.shape[:2]))
        small = img if f == 1.0 else cv2.resize(img, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
        return [tuple(int(round(v / f)) for v in (d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom()))
                for d in self.cnn(np.ascontiguousarray(small), 0)]

    def _cnn_confirms(self, img: np.ndarray, box: tuple[int, int, int, int]) -> bool:
        l, t, r, b = box
        side = max(r - l, b - t)
        cx, cy = (l + r) / 2, (t + b) / 2
        x0, y0 = max(0, int(cx - side)), max(0, int(cy - side))
        crop = img[y0:int(cy + side), x0:int(cx + side)]
        f = 200 / max(crop.shape[:2])
        crop = np.ascontiguousarray(cv2.resize(crop, None, fx=f, fy=f, interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR))
        return any(_overlap(box, tuple(v / f + o for v, o in zip((d.rect.left(), d.rect.top(), d.rect.right(),
                                                                  d.rect.bottom()), (x0, y0, x0, y0)))) > 0.3
                   for d in self.cnn(crop, 0))

    def _rect(self, box):
        return self._dlib.rectangle(*box)

    def landmarks5(self, img: np.ndarray, box) -> np.ndarray:
        return np.array([(p.x, p.y) for p in self.sp5(img, self._rect(box)).parts()], np.float64)

    # -------------------------------------------------------------------------------------- analysis
    def analyse(self, img: np.ndarray, detector: str | None = None) -> Face | None:
        """The largest face of ``img`` with its landmarks and embedding, or None when none is found.
        ``detector``: use only this one ('hog' or 'cnn'), e.g. the one that found the reference face."""
        img = np.ascontiguousarray(img, dtype=np.uint8)
        key = (hashlib.blake2b(img.tobytes(), digest_size=16).digest(), img.shape, detector)
        if key in self._cache:
            return self._cache[key]
        t0 = time.perf_counter()
        boxes, used = self.detect(img, detector)
        face = None
        if boxes:
            rect = self._rect(boxes[0])
            shape5 = self.sp5(img, rect)
            shape68 = self.sp68(img, rect)
            face = Face(box=boxes[0], detector=used,
                        landmarks5=np.array([(p.x, p.y) for p in shape5.parts()], np.float64),
                        landmarks68=np.array([(p.x, p.y) for p in shape68.parts()], np.float64),
                        embedding=np.array(self.encoder.compute_face_descriptor(img, shape5), np.float64))
        self.seconds += time.perf_counter() - t0
        self._cache[key] = face
        if detector is None and face is not None:  # the same face, asked for by its detector, is a hit too
            self._cache[key[:2] + (used,)] = face
        return face


def _overlap(a, b) -> float:
    """Intersection over union of two (left, top, right, bottom) boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


_SHARED: FaceAnalyzer | None = None


def shared_analyzer() -> FaceAnalyzer:
    """One analyser per process (its cache serves every evaluation in it, e.g. a results table)."""
    global _SHARED
    if _SHARED is None:
        _SHARED = FaceAnalyzer()
    return _SHARED


# ---------------------------------------------------------------------------------------- metrics
def _pair(analyzer: FaceAnalyzer, ref_img: np.ndarray, img: np.ndarray) -> tuple[Face | None, Face | None]:
    ref = analyzer.analyse(ref_img)
    return ref, (analyzer.analyse(img, ref.detector) if ref is not None else None)


def face_scores(restored: list[np.ndarray], gt: list[np.ndarray] | None = None, fp: list[np.ndarray] | None = None,
                analyzer: FaceAnalyzer | None = None) -> dict:
    """Identity and landmark distances of ``restored`` faces to the ``gt`` faces and/or to the FP model's
    outputs ``fp`` (same order). Images where either side has no face are counted and left out of the
    means. Returns {"per_image": [...], summary fields...}; seconds_per_image counts only the analysis
    done here (cached faces cost nothing)."""
    analyzer = analyzer or shared_analyzer()
    t0 = analyzer.seconds
    per_image: list[dict] = [{} for _ in restored]
    summary: dict = {}
    for ref_name, refs, suffix in (("gt", gt, ""), ("fp", fp, "_to_fp")):
        if refs is None:
            continue
        if len(refs) != len(restored):
            raise ValueError(f"{len(refs)} {ref_name} images for {len(restored)} restored ones")
        no_ref = no_out = 0
        ids, lms = [], []
        for r, ref_img, img in zip(per_image, refs, restored):
            ref, out = _pair(analyzer, ref_img, img)
            no_ref += ref is None
            no_out += ref is not None and out is None
            found = ref is not None and out is not None
            r[f"face_detected{suffix}"] = found
            r[f"identity_distance{suffix}"] = identity_distance(ref, out) if found else None
            r[f"landmark_distance{suffix}"] = landmark_distance(ref, out) if found else None
            if found:
                ids.append(r[f"identity_distance{suffix}"])
                lms.append(r[f"landmark_distance{suffix}"])
        summary[f"face_detected{suffix}"] = len(ids) / max(1, len(restored))
        summary[f"identity_distance{suffix}"] = float(np.mean(ids)) if ids else None
        summary[f"landmark_distance{suffix}"] = float(np.mean(lms)) if lms else None
        summary[f"faces_missing{suffix}"] = {ref_name: no_ref, "restored": no_out}
    summary["face_seconds_per_image"] = (analyzer.seconds - t0) / max(1, len(restored))
    return {**summary, "per_image": per_image}


# ------------------------------------------------------------------------------ align / paste back
def alignment(landmarks5: np.ndarray, size: int) -> np.ndarray:
    """The 2×3 similarity transform (rotation, uniform scale, shift) taking a face's 5 landmarks onto
    ``FACE_TEMPLATE_5`` at ``size`` with the least squared error over all five points."""
    src = np.asarray(landmarks5, np.float64)
    dst = FACE_TEMPLATE_5 * size
    zs = (src - src.mean(0)) @ np.array([1, 1j])
    zd = (dst - dst.mean(0)) @ np.array([1, 1j])
    if not np.any(np.abs(zs) > 0):
        raise ValueError("degenerate face landmarks")
    a = np.vdot(zs, zd) / np.vdot(zs, zs).real  # complex scale-rotation: least squares
    rot = np.array([[a.real, -a.imag], [a.imag, a.real]])
    return np.hstack([rot, (dst.mean(0) - rot @ src.mean(0))[:, None]])


def _scale(m: np.ndarray) -> float:
    return float(np.sqrt(abs(np.linalg.det(m[:, :2]))))


def warp_face(img: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    """The aligned ``size``×``size`` face crop of ``img`` under ``m``; a large face is warped at an
    integer multiple of ``size`` and area-averaged down (no aliasing)."""
    k = max(1, int(np.ceil(1.0 / _scale(m) - 1e-6)))
    big = cv2.warpAffine(img, m * np.array([[k], [k]]), (size * k, size * k), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REFLECT101)
    return big if k == 1 else cv2.resize(big, (size, size), interpolation=cv2.INTER_AREA)


def paste_face(photo: np.ndarray, face: np.ndarray, m: np.ndarray, feather: float = 0.1) -> np.ndarray:
    """``photo`` with the restored aligned ``face`` warped back (inverse of ``m``) under a feathered
    mask: 1 inside, falling smoothly to 0 over ``feather`` × the side at the crop's edges."""
    size = face.shape[0]
    scale = _scale(m)  # crop pixels per photo pixel
    src = face
    if scale > 1.0:  # the crop shrinks back into the photo: blur first so the warp does not alias
        src = cv2.GaussianBlur(face, (0, 0), 0.5 * scale)
    ramp = np.clip((np.minimum(np.arange(size), np.arange(size)[::-1]) + 0.5) / (feather * size), 0, 1)
    ramp = ramp * ramp * (3 - 2 * ramp)  # smoothstep
    mask = np.outer(ramp, ramp).astype(np.float32)
    h, w = photo.shape[:2]
    inv = cv2.invertAffineTransform(m)
    back = cv2.warpAffine(src, inv, (w, h), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
    alpha = cv2.warpAffine(mask, inv, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    alpha = alpha[:, :, None]
    out = photo.astype(np.float32) * (1 - alpha) + back.astype(np.float32) * alpha
    return np.clip(np.round(out), 0, 255).astype(np.uint8)
