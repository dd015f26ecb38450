"""The main job end to end on the embedded default: calibrate → export → validate → package.

``quantface demo`` runs it on real faces that scikit-image ships (no ``../shared`` needed):

1. restore the shipped faces with the FP model (``jobs.demo``, a first look in ``<out>/fp``);
2. calibrate the model with a fast preset (QuantFace W4A4, few images and distillation steps) on
   LFW faces, degraded with the seed; the first LFW faces (those the grid shows) and the astronaut are
   kept for validation, so calibration never sees them;
3. export the FP32 graph and the recipe's ``reference`` and ``ort-cpu`` profiles;
4. validate the ``ort-cpu`` graph against the PyTorch fake-quant model on the held-out faces (parity
   with a pass/fail bar, quality vs the FP model), time the graphs against FP32 in one run, and write
   the grid input | FP | W4A4 (PyTorch) | ORT graph | GT of the shipped faces (``<out>/grid.png``);
5. package the ``ort-cpu`` graph for the Android app and the browser demo (``quantface.package``),
   copying it into ``android_demo``'s assets when run from a checkout of the repository.

The summary lines are the last lines printed. The fast preset trades quality for time (its time is in the
README); ``quantface calibrate`` with the defaults on real calibration faces is what the results table uses.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from quantface.config import JsonConfig, check_int
from quantface.data import atomic_write_bytes, shipped_faces, write_image
from quantface.errors import ConfigError
from quantface.metrics import psnr
from quantface.jobs import DEMO_LFW_FACES, DemoConfig, ModelSpec, comparison_grid, demo, demo_faces, psnr_to_gt


@dataclass
class ChainConfig(JsonConfig):
    out: str = "quantface-demo"
    model: ModelSpec = field(default_factory=ModelSpec)
    seed: int = 0
    method: str = "quantface"
    bits: str = "W4A4"
    validate_faces: int = 8  # LFW faces 0..n-1 (and the astronaut) validate; the next ``calib_faces`` calibrate
    calib_faces: int = 32
    steps: int = 40  # distillation steps of the fast preset
    threads: int = 2
    repeats: int = 10
    package: bool = True
    repo: str = "."  # a checkout of the repository: packaged models are copied into its demo apps

    def __post_init__(self) -> None:
        if self.calib_faces < 1 or self.validate_faces < 1:
            raise ConfigError("the demo needs at least one calibration and one validation face")
        if self.validate_faces < DEMO_LFW_FACES:
            raise ConfigError(f"the demo validates on at least the {DEMO_LFW_FACES} LFW faces its grid shows (held out "
                              f"of calibration); validate_faces {self.validate_faces} is fewer")
        if self.calib_faces + self.validate_faces > 200:
            raise ConfigError("scikit-image ships 200 LFW faces: calibration + validation faces must not exceed 200")
        check_int(self.steps, "--steps", 0)
        check_int(self.threads, "--threads")
        check_int(self.repeats, "repeats")
        check_int(self.seed, "--seed", 0)
        if self.model.quantized:
            raise ConfigError("demo calibrates, exports and validates its own recipe; --recipe and --onnx do not "
                              "apply (quantface restore/eval --recipe/--onnx run those)")
        self.calib_config()  # the calibration's own option checks, before anything is written

    def calib_config(self) -> "CalibConfig":
        """The fast preset's calibration of faces in ``<out>/faces/calibration`` into ``<out>/recipe``."""
        from quantface.calibration import CalibConfig

        out = Path(self.out)
        return CalibConfig(method=self.method, bits=self.bits, data=str(out / "faces" / "calibration"),
                           out=str(out / "recipe"), weights=self.model.weights, seed=self.seed, steps=self.steps,
                           stat_images=min(16, self.calib_faces), resume=False, threads=self.threads,
                           device=self.model.device)

    def check(self) -> None:
        """Before any work: the output folder can be written and the model's files exist."""
        from quantface.paths import check_output_dir

        check_output_dir(self.out, "--out")
        self.model.check()


def _step(label: str) -> float:
    print(f"\n== {label}", flush=True)
    return time.perf_counter()


def run_chain(cfg: ChainConfig) -> dict:
    """Run the chain; returns (and writes to ``<out>/summary.json``) every number it printed."""
    from quantface.calibration import calibrate
    from quantface.export import ExportConfig, export_onnx
    from quantface.export.bench import compare_latency
    from quantface.validate import ValidateConfig, validate

    cfg.check()
    out = Path(cfg.out)
    summary: dict = {"config": asdict(cfg), "seconds": {}}

    t = _step("1/5 restore shipped faces with the FP model")
    summary["fp_demo"] = demo(DemoConfig(out=str(out / "fp"), model=cfg.model, seed=cfg.seed))
    summary["seconds"]["fp_demo"] = time.perf_counter() - t

    size = cfg.model.fp_model().config.working_size
    faces, names = shipped_faces(size, lfw_count=cfg.calib_faces + cfg.validate_faces)
    calib_dir, val_dir = out / "faces" / "calibration", out / "faces" / "validation"
    for i, (face, name) in enumerate(zip(faces, names)):
        # index 0 is the astronaut; the first LFW faces, which the grid shows, are held out too
        target = calib_dir if i > cfg.validate_faces else val_dir
        write_image(target / f"{name}.png", face)

    t = _step(f"2/5 calibrate {cfg.method} {cfg.bits} (fast preset: {cfg.calib_faces} faces, {cfg.steps} steps)")
    recipe = out / "recipe"
    calib = calibrate(cfg.calib_config())
    summary["seconds"]["calibrate"] = time.perf_counter() - t

    t = _step("3/5 export FP32 and the reference / ort-cpu profiles")
    graphs = {}
    for label, recipe_dir, profile in (("fp32", None, "reference"), ("reference", recipe, "reference"),
                                       ("ort-cpu", recipe, "ort-cpu")):
        res = export_onnx(ExportConfig(weights=cfg.model.weights, recipe=str(recipe_dir) if recipe_dir else None,
                                       profile=profile, out=str(out / "onnx" / f"{label.replace('-', '_')}.onnx")))
        graphs[label] = res.path
        print(f"wrote {res.path} ({res.bytes / 1e6:.2f} MB)")
    summary["seconds"]["export"] = time.perf_counter() - t

    t = _step("4/5 validate the ort-cpu graph against PyTorch, time it against FP32, write the grid")
    spec = ModelSpec(name=cfg.model.name, weights=cfg.model.weights, recipe=str(calib.recipe), device=cfg.model.device)
    v = validate(ValidateConfig(onnx=str(graphs["ort-cpu"]), data=str(val_dir), model=spec, limit=None,
                                seed=cfg.seed, threads=cfg.threads, repeats=cfg.repeats,
                                json_out=str(out / "validate.json")))
    timings = compare_latency(graphs, threads=cfg.threads, repeats=cfg.repeats, progress=True)
    fp = timings["fp32"]
    summary["validate"] = {k: v[k] for k in ("n", "parity_psnr", "parity_max_abs", "min_parity", "passed", "psnr",
                                             "psnr_to_fp", "ssim_to_fp", "torch_psnr")}
    summary["graphs"] = {k: {"file_bytes": tm.file_bytes, "median_ms": tm.median_ms,
                             "size_vs_fp32": tm.file_bytes / fp.file_bytes, "speedup_vs_fp32": fp.median_ms / tm.median_ms}
                         for k, tm in timings.items()}
    summary["grid"] = _grid(cfg, spec, graphs["ort-cpu"], size, out / "grid.png")
    summary["seconds"]["validate"] = time.perf_counter() - t

    if cfg.package:
        t = _step("5/5 package the ort-cpu graph for the Android app and the browser demo")
        summary["package"] = _package(graphs["ort-cpu"], out / "package", Path(cfg.repo))
        summary["seconds"]["package"] = time.perf_counter() - t

    verdict = "pass" if v["passed"] else "FAIL"
    g = summary["grid"]
    lines = [
        f"parity  ort-cpu ONNX vs PyTorch fake-quant on {v['n']} held-out faces: PSNR {v['parity_psnr']:.1f} dB "
        f"(bar {v['min_parity']:g} dB: {verdict}), max |Δ| {v['parity_max_abs']:.2e}",
        f"quality {cfg.method} {cfg.bits} (fast preset) vs FP model: PSNR {v['psnr_to_fp']:.2f} dB, SSIM {v['ssim_to_fp']:.4f}",
        "size    " + ", ".join(f"{k} {g_['file_bytes'] / 1e6:.2f} MB ({g_['size_vs_fp32']:.0%} of FP32)"
                               for k, g_ in summary["graphs"].items() if k != "fp32"),
        f"speed   ({cfg.threads} threads, median of {cfg.repeats}) FP32 {fp.median_ms:.0f} ms; "
        + ", ".join(f"{k} {g_['median_ms']:.0f} ms ({g_['speedup_vs_fp32']:.2f}× FP32)"
                    for k, g_ in summary["graphs"].items() if k != "fp32"),
        f"faces   astronaut (synthetically degraded, seed {cfg.seed}) PSNR to GT: input {g['psnr_input']:.2f} dB, "
        + ", ".join(f"{k} {p:.2f} dB" for k, p in g["astronaut_psnr"].items()),
        f"before/after grid: {g['path']} (input | {' | '.join(g['columns'])} | GT)",
    ]
    summary["lines"] = lines
    atomic_write_bytes(out / "summary.json", (json.dumps(summary, indent=2, default=str) + "\n").encode())
    print("\n" + "\n".join(lines), flush=True)
    return summary


def _grid(cfg: ChainConfig, spec: ModelSpec, onnx_path: Path, size: int, path: Path) -> dict:
    """The shipped faces restored by the FP model, the recipe's fake-quant model and the exported graph."""
    faces = demo_faces(size, cfg.seed)
    models = {"FP": spec.fp_spec(), f"{cfg.bits} (PyTorch)": spec,
              "ORT graph": ModelSpec(name=spec.name, weights=spec.weights, onnx=str(onnx_path))}
    outputs = {label: m.pipeline()[0](faces.inputs) for label, m in models.items()}
    write_image(path, comparison_grid(faces, outputs))
    return {"path": str(path), "columns": list(outputs), "faces": faces.names,
            "psnr_input": psnr(faces.inputs[0], faces.ground_truth[0]),
            "astronaut_psnr": {label: psnr_to_gt(faces, o)["astronaut"] for label, o in outputs.items()}}


def _package(onnx_path: Path, out: Path, repo: Path) -> dict:
    """Package for the apps; copied into the repository's app folders when ``repo`` is a checkout."""
    from quantface.package import PackageConfig, package

    app, web = repo / "android_demo" / "app" / "src" / "main" / "assets", repo / "android_demo" / "web"
    in_repo = app.is_dir() and web.is_dir()
    r = package(PackageConfig(onnx=str(onnx_path), out=str(out), into_app=in_repo, into_web=in_repo,
                              app_assets=str(app) if in_repo else None,
                              web_model_dir=str(web / "model") if in_repo else None))
    print(f"packaged {r.model} ({r.format}: {r.reason})")
    for d in r.copied_to:
        print(f"copied into {d}")
    return {"model": str(r.model), "format": r.format, "reason": r.reason, "copied_to": [str(d) for d in r.copied_to]}
