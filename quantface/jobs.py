"""The toolchain's jobs as library functions: restore, eval, demo. The CLI only builds their configs.

``evaluate`` degrades each HQ face with (seed, index), restores it through the pipeline, and
reports PSNR / SSIM of the restored face and of the degraded input (the bicubic-upsampled LQ) against
the HQ face, as means and per image. With the ``[faces]`` extra it adds, under ``faces``, the identity
and landmark distances of quantface.faces (to the GT, and to the FP model's output for a quantized
model), the fraction of images with a face found, the counts without one, and per-image values.
``evaluate_no_reference`` scores folders without GT (real low-quality faces): NIQE of the restored
faces and their identity / landmark distances to the FP model's output.

``restore`` restores whole photos: each face is found, aligned to the training faces' landmarks,
restored at the working size and pasted back under a feathered mask (quantface.faces); ``crop=True``
(``--crop``) restores the centre crop instead, as the phone app does.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from quantface import __version__
from quantface.config import SIZE_MULTIPLE, JsonConfig, check_int, check_size
from quantface.data import (LoadedImages, atomic_write_bytes, center_crop_resize, list_images, load_folder,
                            nothing_readable, read_image, shipped_faces, write_image)
from quantface.degradation import DegradationConfig, degrade
from quantface.errors import ConfigError, ImageError
from quantface.device import check_device_name, resolve_device
from quantface.metrics import psnr, ssim
from quantface.models import load_model
from quantface.paths import check_input_dir, check_input_file, check_output_dir, check_output_file
from quantface.pipeline import RestorationPipeline, TorchBackend


@dataclass
class ModelSpec(JsonConfig):
    """Which network to run: a model name, optionally a weights stem overriding the embedded one,
    optionally a calibration recipe turning it into the fake-quant model, or an exported ONNX graph
    run by ONNX Runtime instead of PyTorch. ``device`` is where a PyTorch model runs (an ONNX graph runs
    on ONNX Runtime's CPU provider)."""

    name: str = "reference"
    weights: str | None = None
    recipe: str | None = None
    onnx: str | None = None
    device: str = "auto"  # auto (CUDA when torch sees a GPU, else CPU) | cpu | cuda | cuda:N
    # With a recipe: also simulate the ort-cpu / qnn graphs' 8-bit requantized conv outputs (parity with them).
    requant_outputs: bool = False
    # ... or a qnn graph's integer node units: the recipe's quantizer points too (apply_recipe(points=True)).
    integer_units: bool = False

    def __post_init__(self) -> None:
        check_device_name(self.device)
        if self.recipe is not None and self.onnx is not None:
            raise ConfigError("give --recipe (the fake-quant PyTorch model) or --onnx (an exported graph), not both")

    def check(self) -> None:
        """The recipe folder and the ONNX file exist (their contents are checked when they load)."""
        if self.recipe is not None:
            check_input_dir(self.recipe, "recipe folder")
        if self.onnx is not None:
            check_input_file(self.onnx, "ONNX model")

    def fp_spec(self) -> "ModelSpec":
        """The same network in full precision (no recipe, no ONNX graph), on the same device."""
        return ModelSpec(name=self.name, weights=self.weights, device=self.device)

    @property
    def quantized(self) -> bool:
        return self.recipe is not None or self.onnx is not None

    def fp_model(self):
        return load_model(self.name, self.weights)

    def model(self):
        """The FP model, or the fake-quant model when a recipe is given."""
        fp = self.fp_model()
        if self.recipe is None:
            return fp
        from quantface.calibration.recipe import apply_recipe

        return apply_recipe(fp, self.recipe, requant_outputs=self.requant_outputs, points=self.integer_units)

    def pipeline(self, batch_size: int = 8, size: int | None = None) -> tuple[RestorationPipeline, int]:
        """The restoration pipeline for this model and the side it runs at: ``size`` if given (a positive
        multiple of 16), else the model's working size; an ONNX graph with a static input side runs at
        that side, which ``size`` must then equal. A graph without quantface metadata (not one of our
        exports) runs too, after one ``warning:`` line on stderr."""
        if self.onnx is not None:
            from quantface.export.api import OnnxBackend
            from quantface.export.save import foreign_graph

            backend = OnnxBackend(self.onnx)
            if note := backend.exact_qdq_note():
                print(note, file=sys.stderr)
            foreign = foreign_graph(self.onnx, backend.metadata)
            if foreign:
                print(f"warning: {foreign}; running it as an image-to-image graph (nothing checks what it computes)",
                      file=sys.stderr)
            side = backend.input_shape[-1]
            if isinstance(side, int):
                if side < SIZE_MULTIPLE or side % SIZE_MULTIPLE:
                    raise ConfigError(f"ONNX model {self.onnx} takes {side}x{side} images; the pipeline needs "
                                      f"a side that is a positive multiple of {SIZE_MULTIPLE}")
                if size is not None and size != side:
                    raise ConfigError(f"--size {size} does not match ONNX model {self.onnx}, whose input is "
                                      f"{side}x{side}; drop --size")
                return RestorationPipeline(backend, batch_size), side
            return RestorationPipeline(backend, batch_size), _resolve_size(size, self.fp_model().config.working_size)
        backend = self.torch_backend()
        return RestorationPipeline(backend, batch_size), _resolve_size(size, backend.module.config.working_size)

    def torch_backend(self) -> TorchBackend:
        """The PyTorch model (FP or fake-quant) as a pipeline backend on ``device``."""
        return TorchBackend(self.model(), resolve_device(self.device))


def _resolve_size(size: int | None, working_size: int) -> int:
    size = working_size if size is None else size
    check_size(size)
    return size


@dataclass
class EvalConfig(JsonConfig):
    data: str
    json_out: str | None = None
    model: ModelSpec = field(default_factory=ModelSpec)
    limit: int | None = None
    seed: int = 0
    size: int | None = None  # default: the model's working size
    second_stage: bool = False
    batch_size: int = 8
    faces: bool = True  # the face metrics, when the [faces] extra is installed
    no_reference: bool = False  # the folder has no GT: restore its images as they are, score NIQE

    def __post_init__(self) -> None:
        if self.no_reference and self.second_stage:
            raise ConfigError("--second-stage does not apply with --no-reference: nothing is degraded")
        if self.limit is not None:
            check_int(self.limit, "--limit")
        check_int(self.seed, "--seed", 0)
        check_size(self.size)
        check_int(self.batch_size, "batch size")

    def check(self) -> None:
        """Before any work: the inputs exist and the output can be written."""
        list_images(self.data)
        if self.json_out:
            check_output_file(self.json_out, "--json")
        self.model.check()
        if self.no_reference:
            from quantface import niqe

            reason = niqe.missing_reason()
            if reason:
                raise ConfigError(f"--no-reference scores NIQE, whose pristine model is missing: {reason}")


def _face_block(files: list[Path], restored: list[np.ndarray], gt: list[np.ndarray] | None,
                fp: list[np.ndarray] | None, wanted: bool) -> dict:
    """The ``faces`` field of an evaluation: face metrics with per-image values, or why they were skipped."""
    from quantface import faces

    reason = "not asked for" if not wanted else faces.missing_reason()
    if reason:
        return {"skipped": reason}
    scores = faces.face_scores(restored, gt=gt, fp=fp)
    scores["per_image"] = [{"file": p.name, **r} for p, r in zip(files, scores["per_image"])]
    return scores


def _degraded(cfg: EvalConfig, size: int) -> tuple[LoadedImages, list[np.ndarray]]:
    loaded = load_folder(cfg.data, size, cfg.limit)
    degradation = DegradationConfig(second_stage=cfg.second_stage)
    return loaded, [degrade(hq, cfg.seed, i, degradation)[0] for i, hq in enumerate(loaded.images)]


def fp_restorations(cfg: EvalConfig) -> list[np.ndarray]:
    """The FP model's restorations of ``cfg``'s degraded faces (with ``no_reference``, of its faces as they
    are) — what ``psnr_to_fp`` compares with. Pass
    them to ``evaluate(cfg', fp_out=...)`` to score several graphs of the same faces against one FP run."""
    cfg.check()
    pipeline, size = cfg.model.fp_spec().pipeline(cfg.batch_size, cfg.size)
    lqs = load_folder(cfg.data, size, cfg.limit).images if cfg.no_reference else _degraded(cfg, size)[1]
    return _timed_restore(pipeline, lqs, cfg.batch_size, "eval FP")[0]


def evaluate(cfg: EvalConfig, fp_out: list[np.ndarray] | None = None) -> dict:
    """Degrade, restore and score ``cfg.data``; writes ``cfg.json_out`` (atomically) when given.
    ``fp_out``: the FP model's restorations of the same faces (``fp_restorations``), else computed here.
    With ``cfg.no_reference`` this is ``evaluate_no_reference``."""
    if cfg.no_reference:
        return evaluate_no_reference(cfg, fp_out)
    cfg.check()
    pipeline, size = cfg.model.pipeline(cfg.batch_size, cfg.size)
    loaded, lqs = _degraded(cfg, size)
    degradation = DegradationConfig(second_stage=cfg.second_stage)
    restored, seconds = _timed_restore(pipeline, lqs, cfg.batch_size, "eval")
    per_image = [
        {"file": p.name, "psnr": psnr(out, hq), "ssim": ssim(out, hq), "psnr_lq": psnr(lq, hq), "ssim_lq": ssim(lq, hq)}
        for p, hq, lq, out in zip(loaded.paths, loaded.images, lqs, restored)
    ]
    keys = ["psnr", "ssim", "psnr_lq", "ssim_lq"]
    if cfg.model.quantized:  # a quantized model or an exported graph: also score it against FP
        if fp_out is None:
            fp_out, _ = _timed_restore(cfg.model.fp_spec().pipeline(cfg.batch_size)[0], lqs, cfg.batch_size, "eval FP")
        elif len(fp_out) != len(restored) or any(f.shape != o.shape for f, o in zip(fp_out, restored)):
            raise ConfigError(f"the FP restorations given ({len(fp_out)}) do not match the {len(restored)} faces evaluated")
        for r, out, ref in zip(per_image, restored, fp_out):
            r["psnr_to_fp"], r["ssim_to_fp"] = psnr(out, ref), ssim(out, ref)
        keys += ["psnr_to_fp", "ssim_to_fp"]
    face_block = _face_block(loaded.paths, restored, loaded.images, fp_out if cfg.model.quantized else None, cfg.faces)
    result = {
        "n": len(per_image),
        **{k: float(np.mean([r[k] for r in per_image])) for k in keys},
        "model": cfg.model.name,
        "weights": cfg.model.weights or "embedded",
        "recipe": cfg.model.recipe,
        "onnx": cfg.model.onnx,
        "data": str(cfg.data),
        "seed": cfg.seed,
        "size": size,
        "degradation": asdict(degradation),
        "skipped": loaded.skipped,
        "seconds_per_image": seconds / max(1, len(per_image)),
        "version": __version__,
        "per_image": per_image,
        "faces": face_block,
    }
    if cfg.json_out:
        atomic_write_bytes(cfg.json_out, (json.dumps(result, indent=2) + "\n").encode())
    return result


# NIQE's patches are 96 px: a 128² face has one, so restored faces are scored resized (bicubic) to the
# side of the usual real-LQ benchmarks, and so is the model's input, to compare at the same resolution.
NIQE_SIDE = 512


def _niqe_at_side(img: np.ndarray) -> float:
    from quantface.niqe import niqe

    return niqe(cv2.resize(img, (NIQE_SIDE, NIQE_SIDE), interpolation=cv2.INTER_CUBIC))


def evaluate_no_reference(cfg: EvalConfig, fp_out: list[np.ndarray] | None = None) -> dict:
    """Restore ``cfg.data`` as it is (real low-quality faces, no GT) and score NIQE (lower is better)
    of the restored faces and of the model's input, both at NIQE_SIDE; for a quantized model also the
    identity / landmark distances to the FP model's output (``fp_out``, else computed here)."""
    cfg.check()
    pipeline, size = cfg.model.pipeline(cfg.batch_size, cfg.size)
    loaded = load_folder(cfg.data, size, cfg.limit)
    restored, seconds = _timed_restore(pipeline, loaded.images, cfg.batch_size, "eval")
    if cfg.model.quantized and fp_out is None:
        fp_out, _ = _timed_restore(cfg.model.fp_spec().pipeline(cfg.batch_size, size)[0], loaded.images,
                                   cfg.batch_size, "eval FP")
    elif fp_out is not None and (len(fp_out) != len(restored) or any(f.shape != o.shape for f, o in zip(fp_out, restored))):
        raise ConfigError(f"the FP restorations given ({len(fp_out)}) do not match the {len(restored)} faces evaluated")
    t0 = time.perf_counter()
    per_image = [{"file": p.name, "niqe": _niqe_at_side(out), "niqe_lq": _niqe_at_side(lq)}
                 for p, lq, out in zip(loaded.paths, loaded.images, restored)]
    niqe_seconds = time.perf_counter() - t0
    face_block = (_face_block(loaded.paths, restored, None, fp_out, cfg.faces) if cfg.model.quantized
                  else {"skipped": "no GT and no FP reference (the FP model itself)"})
    result = {
        "n": len(per_image),
        "niqe": float(np.mean([r["niqe"] for r in per_image])),
        "niqe_lq": float(np.mean([r["niqe_lq"] for r in per_image])),
        "niqe_side": NIQE_SIDE,
        "model": cfg.model.name,
        "weights": cfg.model.weights or "embedded",
        "recipe": cfg.model.recipe,
        "onnx": cfg.model.onnx,
        "data": str(cfg.data),
        "no_reference": True,
        "size": size,
        "skipped": loaded.skipped,
        "seconds_per_image": seconds / max(1, len(per_image)),
        "niqe_seconds_per_image": niqe_seconds / max(1, 2 * len(per_image)),
        "version": __version__,
        "per_image": per_image,
        "faces": face_block,
    }
    if cfg.json_out:
        atomic_write_bytes(cfg.json_out, (json.dumps(result, indent=2) + "\n").encode())
    return result


def _timed_restore(pipeline: RestorationPipeline, lqs: list[np.ndarray], batch_size: int, desc: str
                   ) -> tuple[list[np.ndarray], float]:
    t0 = time.perf_counter()
    out: list[np.ndarray] = []
    for i in tqdm(range(0, len(lqs), batch_size), desc=desc, unit="batch", dynamic_ncols=True):
        out.extend(pipeline(lqs[i:i + batch_size]))
    return out, time.perf_counter() - t0


@dataclass
class RestoreConfig(JsonConfig):
    input: str
    output: str
    model: ModelSpec = field(default_factory=ModelSpec)
    size: int | None = None
    batch_size: int = 8
    crop: bool = False  # restore the centre crop at the working size (the phone app's contract), not the photo

    def __post_init__(self) -> None:
        check_size(self.size)
        check_int(self.batch_size, "batch size")

    def check(self) -> None:
        """Before any work: the input exists, the output folder can be written, no output would
        replace an input file."""
        files = list_images(self.input)
        check_output_dir(self.output, "--output")
        self.model.check()
        inputs = {f.resolve() for f in files}
        for f, name in output_names(files).items():
            if (Path(self.output) / name).resolve() in inputs:
                raise ConfigError(f"--output {self.output}: restoring {f} would overwrite the input file "
                                  f"{Path(self.output) / name}; choose another output folder")


def output_names(files: list[Path]) -> dict[Path, str]:
    """The PNG name each input gets: ``<stem>.png``, or ``<stem>_<ext>.png`` where several inputs share a
    stem (astronaut.png, astronaut.jpg → astronaut_png.png, astronaut_jpg.png); any name still taken gets
    ``_2``, ``_3``, ... so no two inputs write the same file."""
    stems: dict[str, int] = {}
    for f in files:
        stems[f.stem.lower()] = stems.get(f.stem.lower(), 0) + 1
    names: dict[Path, str] = {}
    taken: set[str] = set()
    for f in files:
        base = f.stem if stems[f.stem.lower()] == 1 else f"{f.stem}_{f.suffix.lstrip('.')}"
        name, k = f"{base}.png", 2
        while name.lower() in taken:
            name, k = f"{base}_{k}.png", k + 1
        taken.add(name.lower())
        names[f] = name
    return names


@dataclass
class RestoreReport:
    """What ``restore`` did: the files written, the unreadable inputs (one sentence each) and one
    note per photo where no face was found (its centre crop was restored instead)."""

    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    faces: int = 0  # faces restored and pasted back
    fallback: str | None = None  # why photos were restored as centre crops (no [faces] extra)


def _restore_photo(img: np.ndarray, pipeline: RestorationPipeline, size: int, analyzer) -> tuple[np.ndarray | None, int]:
    """``img`` with every face found restored in place, and how many; (None, 0) without a face."""
    from quantface import faces

    boxes, _ = analyzer.detect(img, verify=True)
    mats = [faces.alignment(analyzer.landmarks5(img, box), size) for box in boxes]
    if not mats:
        return None, 0
    restored = pipeline([faces.warp_face(img, m, size) for m in mats])
    out = img
    for face, m in zip(reversed(restored), reversed(mats)):  # the largest face last, on top
        out = faces.paste_face(out, face, m)
    return out, len(mats)


def restore(cfg: RestoreConfig) -> RestoreReport:
    """Restore a file or a folder of photos into ``cfg.output`` (PNG; names from ``output_names``).

    Each face found is aligned, restored at the working size and pasted back into the photo, written at
    its resolution; a photo without a face gets a note and its centre crop restored. With ``cfg.crop``,
    or without the [faces] extra (``fallback`` says so), each image is centre-cropped and resized to the
    working size, as the phone app does. Unreadable files are skipped."""
    cfg.check()
    pipeline, size = cfg.model.pipeline(cfg.batch_size, cfg.size)
    files = list_images(cfg.input)
    names = output_names(files)
    out_dir = Path(cfg.output)
    report = RestoreReport()
    analyzer = None
    if not cfg.crop:
        from quantface import faces

        report.fallback = faces.missing_reason()
        if report.fallback is None:
            analyzer = faces.shared_analyzer()
    for file in tqdm(files, desc="restore", unit="img", dynamic_ncols=True, disable=len(files) < 2):
        try:
            img = read_image(file)
        except ImageError as exc:
            report.skipped.append(str(exc))
            continue
        out = None
        if analyzer is not None:
            out, n = _restore_photo(img, pipeline, size, analyzer)
            report.faces += n
            if out is None:
                report.notes.append(f"no face found in {file}: restored its centre crop ({size}x{size}) instead")
        if out is None:
            out = pipeline([center_crop_resize(img, size)])[0]
        target = out_dir / names[file]
        write_image(target, out)
        report.written.append(target)
    if not report.written:
        raise ImageError(nothing_readable(cfg.input, report.skipped))
    return report


def make_grid(rows: list[list[np.ndarray | None]], labels: list[str], row_names: list[str] | None = None,
              cell: int = 160, empty: str = "") -> np.ndarray:
    """A labelled image grid (HWC uint8 RGB): one row per face, one column per label. A ``None`` cell
    stays grey with the ``empty`` text (e.g. no ground truth for a genuinely low-quality photo)."""
    header = 24
    h = header + cell * len(rows)
    w = cell * len(labels)
    grid = np.full((h, w, 3), 255, np.uint8)
    for c, label in enumerate(labels):
        cv2.putText(grid, label, (c * cell + 6, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            y0, x0 = header + r * cell, c * cell
            if img is None:
                grid[y0:y0 + cell, x0:x0 + cell] = 224
                cv2.putText(grid, empty, (x0 + 6, y0 + cell // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (64, 64, 64), 1,
                            cv2.LINE_AA)
                continue
            tile = cv2.resize(img, (cell, cell), interpolation=cv2.INTER_AREA if img.shape[0] > cell else cv2.INTER_CUBIC)
            grid[y0:y0 + cell, x0:x0 + cell] = tile
        if row_names:
            y = header + r * cell + cell - 8
            cv2.putText(grid, row_names[r], (6, y), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return grid


@dataclass
class DemoFaces:
    """The demo's inputs: the astronaut's face synthetically degraded with (seed, index 0), whose HQ
    crop is its ground truth, and genuinely low-resolution LFW photographs (25×25), which have none."""

    names: list[str]
    inputs: list[np.ndarray]
    ground_truth: list[np.ndarray | None]


DEMO_LFW_FACES = 5  # LFW faces the demo's grid shows (the first ones)


def demo_faces(size: int, seed: int) -> DemoFaces:
    faces, names = shipped_faces(size, lfw_count=DEMO_LFW_FACES)
    return DemoFaces(names, [degrade(faces[0], seed, 0)[0]] + faces[1:], [faces[0]] + [None] * (len(faces) - 1))


def comparison_grid(faces: DemoFaces, outputs: dict[str, list[np.ndarray]]) -> np.ndarray:
    """input | one column per model's outputs | GT (grey where the input is a genuine LQ photo)."""
    rows = [[lq, *(out[i] for out in outputs.values()), gt]
            for i, (lq, gt) in enumerate(zip(faces.inputs, faces.ground_truth))]
    return make_grid(rows, ["input", *outputs, "GT"], faces.names, empty="real LQ: no GT")


def psnr_to_gt(faces: DemoFaces, restored: list[np.ndarray]) -> dict[str, float]:
    """PSNR of each face that has a ground truth (the degraded astronaut) against it."""
    return {n: psnr(r, gt) for n, r, gt in zip(faces.names, restored, faces.ground_truth) if gt is not None}


@dataclass
class DemoConfig(JsonConfig):
    out: str = "quantface-demo"
    model: ModelSpec = field(default_factory=ModelSpec)
    seed: int = 0

    def __post_init__(self) -> None:
        check_int(self.seed, "--seed", 0)
        if self.model.quantized:
            raise ConfigError("demo --fp-only restores the shipped faces with the FP model; --recipe and --onnx "
                              "do not apply (quantface restore --recipe/--onnx runs those on your images)")

    def check(self) -> None:
        check_output_dir(self.out, "--out")
        self.model.check()


def demo(cfg: DemoConfig) -> dict:
    """Restore real faces shipped by scikit-image with the FP model and write a grid input | FP | GT.
    The astronaut's face is HQ, so it is degraded (seed, index 0) and scored; the LFW faces are
    genuinely low-resolution (25×25) and are restored as they are."""
    cfg.check()
    pipeline, size = cfg.model.pipeline()
    faces = demo_faces(size, cfg.seed)
    out = Path(cfg.out)
    restored = pipeline(faces.inputs)
    for name, lq, res in zip(faces.names, faces.inputs, restored):
        write_image(out / f"{name}_input.png", lq)
        write_image(out / f"{name}_restored.png", res)
    write_image(out / "grid.png", comparison_grid(faces, {"FP": restored}))
    astronaut = faces.ground_truth[0]
    summary = {
        "faces": faces.names,
        "astronaut_psnr_input": psnr(faces.inputs[0], astronaut),
        "astronaut_psnr_restored": psnr(restored[0], astronaut),
        "astronaut_ssim_input": ssim(faces.inputs[0], astronaut),
        "astronaut_ssim_restored": ssim(restored[0], astronaut),
        "grid": str(out / "grid.png"),
    }
    atomic_write_bytes(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary
