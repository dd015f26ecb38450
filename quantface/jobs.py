"""The toolchain's jobs as library functions: restore, eval, demo. The CLI only builds their configs.

``evaluate`` degrades each HQ face with (seed, index), restores it through the pipeline, and
reports PSNR / SSIM of the restored face and of the degraded input (the bicubic-upsampled LQ) against
the HQ face, as means and per image.
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

        return apply_recipe(fp, self.recipe, requant_outputs=self.requant_outputs)

    def pipeline(self, batch_size: int = 8, size: int | None = None) -> tuple[RestorationPipeline, int]:
        """The restoration pipeline for this model and the side it runs at: ``size`` if given (a positive
        multiple of 16), else the model's working size; an ONNX graph with a static input side runs at
        that side, which ``size`` must then equal. A graph without quantface metadata (not one of our
        exports) runs too, after one ``warning:`` line on stderr."""
        if self.onnx is not None:
            from quantface.export.api import OnnxBackend
            from quantface.export.save import foreign_graph

            backend = OnnxBackend(self.onnx)
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

    def __post_init__(self) -> None:
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


def _degraded(cfg: EvalConfig, size: int) -> tuple[LoadedImages, list[np.ndarray]]:
    loaded = load_folder(cfg.data, size, cfg.limit)
    degradation = DegradationConfig(second_stage=cfg.second_stage)
    return loaded, [degrade(hq, cfg.seed, i, degradation)[0] for i, hq in enumerate(loaded.images)]


def fp_restorations(cfg: EvalConfig) -> list[np.ndarray]:
    """The FP model's restorations of ``cfg``'s degraded faces — what ``psnr_to_fp`` compares with. Pass
    them to ``evaluate(cfg', fp_out=...)`` to score several graphs of the same faces against one FP run."""
    cfg.check()
    pipeline, size = cfg.model.fp_spec().pipeline(cfg.batch_size, cfg.size)
    _, lqs = _degraded(cfg, size)
    return _timed_restore(pipeline, lqs, cfg.batch_size, "eval FP")[0]


def evaluate(cfg: EvalConfig, fp_out: list[np.ndarray] | None = None) -> dict:
    """Degrade, restore and score ``cfg.data``; writes ``cfg.json_out`` (atomically) when given.
    ``fp_out``: the FP model's restorations of the same faces (``fp_restorations``), else computed here."""
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

    def __post_init__(self) -> None:
        check_size(self.size)
        check_int(self.batch_size, "batch size")

    def check(self) -> None:
        """Before any work: the input exists and the output folder can be written."""
        list_images(self.input)
        check_output_dir(self.output, "--output")
        self.model.check()


def restore(cfg: RestoreConfig) -> tuple[list[Path], list[str]]:
    """Restore a file or a folder of faces into ``cfg.output`` (PNG, same stems).

    Each face is centre-cropped and resized to the working size first. Unreadable files are skipped;
    returns (written files, skip messages)."""
    cfg.check()
    pipeline, size = cfg.model.pipeline(cfg.batch_size, cfg.size)
    files = list_images(cfg.input)
    out_dir = Path(cfg.output)
    written, skipped = [], []
    for file in tqdm(files, desc="restore", unit="img", dynamic_ncols=True, disable=len(files) < 2):
        try:
            lq = center_crop_resize(read_image(file), size)
        except ImageError as exc:
            skipped.append(str(exc))
            continue
        target = out_dir / f"{file.stem}.png"
        write_image(target, pipeline([lq])[0])
        written.append(target)
    if not written:
        raise ImageError(nothing_readable(cfg.input, skipped))
    return written, skipped


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
