"""The main job end to end on the embedded default: calibrate → export → validate → package.

``quantface demo`` runs it on real faces that scikit-image ships (no ``../shared`` needed):

1. restore the shipped faces with the FP model (``jobs.demo``, a first look in ``<out>/fp``);
2. calibrate the model with a fast preset (QuantFace W4A4, few images and distillation steps) on
   LFW faces, degraded with the seed; the first LFW faces (those the grid shows) and the astronaut are
   kept for validation, so calibration never sees them;
   and QuantFace W8A8 (``cpu_bits``, ``cpu_steps`` distillation steps: the CPU deployment graph);
3. export the FP32 graph, the W4A4 recipe's ``reference`` and ``ort-cpu`` profiles and the W8A8
   recipe's ``ort-cpu`` one, and build ONNX Runtime's own ``quantize_static`` (MinMax) graph from the
   FP32 one, calibrated on the same faces (``export.peers``);
4. validate the ``ort-cpu`` graphs against the PyTorch fake-quant models on the held-out faces (parity
   with a pass/fail bar, quality vs the FP model), score ``quantize_static``'s graph on the same faces,
   time every graph against FP32 in one interleaved run, and write the grid input | FP | W4A4
   (PyTorch) | ORT graph | GT of the shipped faces (``<out>/grid.png``);
5. package the ``ort-cpu`` graph for the Android app and the browser demo (``quantface.package``),
   copying it into ``android_demo``'s assets when run from a checkout of the repository.

The summary lines are the last lines printed. The fast preset trades quality for time (its time is in the
README); ``quantface calibrate`` with the defaults on real calibration faces is what the results table uses.
"""

from __future__ import annotations

import dataclasses
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
    cpu_bits: str = "W8A8"  # the CPU deployment recipe, compared with ONNX Runtime's quantize_static
    cpu_steps: int = 0  # its distillation steps (0: ranges from the calibration faces only)
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
        check_int(self.cpu_steps, "cpu_steps", 0)
        check_int(self.threads, "--threads")
        check_int(self.repeats, "repeats")
        check_int(self.seed, "--seed", 0)
        if self.model.quantized:
            raise ConfigError("demo calibrates, exports and validates its own recipe; --recipe and --onnx do not "
                              "apply (quantface restore/eval --recipe/--onnx run those)")
        self.calib_config()  # the calibrations' own option checks, before anything is written
        self.calib_config(cpu=True)

    def calib_config(self, cpu: bool = False) -> "CalibConfig":
        """The fast preset's calibration of faces in ``<out>/faces/calibration`` into ``<out>/recipe``
        (``cpu``: the CPU recipe, ``cpu_bits`` with ``cpu_steps``, into ``<out>/recipe_cpu``)."""
        from quantface.calibration import CalibConfig

        out = Path(self.out)
        from quantface.export.peers import default_reduce_range

        # This machine runs and validates the CPU graph: 7-bit weight codes where its CPU needs them
        # (x86 without VNNI, as quantize_static's own guidance; calibration.config.REDUCED_WEIGHT_BITS).
        reduce = cpu and self.cpu_bits.startswith("W8A") and default_reduce_range()
        return CalibConfig(method=self.method, bits=self.cpu_bits if cpu else self.bits, reduce_range=reduce,
                           data=str(out / "faces" / "calibration"), out=str(out / ("recipe_cpu" if cpu else "recipe")),
                           weights=self.model.weights, seed=self.seed, steps=self.cpu_steps if cpu else self.steps,
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
    from quantface.export.peers import FaceCalibrationReader, build_peer, get_peer
    from quantface.jobs import EvalConfig, evaluate, fp_restorations
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

    t = _step(f"2/5 calibrate {cfg.method} {cfg.bits} (fast preset: {cfg.calib_faces} faces, {cfg.steps} steps) "
              f"and {cfg.cpu_bits} ({cfg.cpu_steps} steps)")
    recipe, cpu_recipe = out / "recipe", out / "recipe_cpu"
    calib = calibrate(cfg.calib_config())
    calibrate(cfg.calib_config(cpu=True))
    summary["seconds"]["calibrate"] = time.perf_counter() - t

    cpu_label = f"{cfg.cpu_bits} ort-cpu"
    t = _step(f"3/5 export FP32, {cfg.bits} reference / ort-cpu, {cpu_label}; ONNX Runtime's quantize_static")
    graphs = {}
    for label, recipe_dir, profile in (("fp32", None, "reference"), ("reference", recipe, "reference"),
                                       ("ort-cpu", recipe, "ort-cpu"), (cpu_label, cpu_recipe, "ort-cpu")):
        name = label.replace("-", "_").replace(" ", "_").lower()
        res = export_onnx(ExportConfig(weights=cfg.model.weights, recipe=str(recipe_dir) if recipe_dir else None,
                                       profile=profile, out=str(out / "onnx" / f"{name}.onnx")))
        graphs[label] = res.path
        print(f"wrote {res.path} ({res.bytes / 1e6:.2f} MB)")
    peer = get_peer("ort-static-minmax")
    reader = FaceCalibrationReader.from_faces(graphs["fp32"], str(calib_dir), None, cfg.seed)
    built = build_peer(graphs["fp32"], peer, reader, out / "onnx" / "quantize_static.onnx")
    graphs["quantize_static"] = built.path
    print(f"wrote {built.path} (ONNX Runtime quantize_static, MinMax, {len(reader)} faces, "
          f"reduce_range={built.settings['reduce_range']})")
    summary["seconds"]["export"] = time.perf_counter() - t

    t = _step("4/5 validate the ort-cpu graphs against PyTorch, time every graph against FP32, write the grid")
    spec = ModelSpec(name=cfg.model.name, weights=cfg.model.weights, recipe=str(calib.recipe), device=cfg.model.device)
    v = validate(ValidateConfig(onnx=str(graphs["ort-cpu"]), data=str(val_dir), model=spec, limit=None,
                                seed=cfg.seed, threads=cfg.threads, repeats=cfg.repeats,
                                json_out=str(out / "validate.json")))
    cpu_spec = ModelSpec(name=cfg.model.name, weights=cfg.model.weights, recipe=str(cpu_recipe), device=cfg.model.device)
    v_cpu = validate(ValidateConfig(onnx=str(graphs[cpu_label]), data=str(val_dir), model=cpu_spec, limit=None,
                                    seed=cfg.seed, threads=cfg.threads, repeats=1,
                                    json_out=str(out / "validate_cpu.json")))
    fp_eval = EvalConfig(data=str(val_dir), seed=cfg.seed, model=spec.fp_spec())
    peer_eval = evaluate(dataclasses.replace(fp_eval, model=dataclasses.replace(spec.fp_spec(),
                                                                              onnx=str(graphs["quantize_static"]))),
                         fp_out=fp_restorations(fp_eval))
    timings = compare_latency(graphs, threads=cfg.threads, repeats=cfg.repeats, progress=True)
    fp = timings["fp32"]
    summary["validate"] = {k: v[k] for k in ("n", "parity_psnr", "parity_max_abs", "min_parity", "passed", "psnr",
                                             "psnr_to_fp", "ssim_to_fp", "torch_psnr")}
    summary["validate_cpu"] = {k: v_cpu[k] for k in summary["validate"]}
    summary["passed"] = bool(v["passed"] and v_cpu["passed"])
    summary["quantize_static"] = {"psnr_to_fp": peer_eval["psnr_to_fp"], "ssim_to_fp": peer_eval["ssim_to_fp"],
                                  "settings": built.settings}
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
    mine, theirs = summary["graphs"][cpu_label], summary["graphs"]["quantize_static"]
    lines = [
        f"parity  ort-cpu ONNX vs PyTorch fake-quant on {v['n']} held-out faces: PSNR {v['parity_psnr']:.1f} dB "
        f"(bar {v['min_parity']:g} dB: {verdict}), max |Δ| {v['parity_max_abs']:.2e}",
        f"quality {cfg.method} {cfg.bits} (fast preset) vs FP model: PSNR {v['psnr_to_fp']:.2f} dB, SSIM {v['ssim_to_fp']:.4f}",
        "size    " + ", ".join(f"{k} {g_['file_bytes'] / 1e6:.2f} MB ({g_['size_vs_fp32']:.0%} of FP32)"
                               for k, g_ in summary["graphs"].items() if k != "fp32"),
        f"speed   ({cfg.threads} threads, median of {cfg.repeats}) FP32 {fp.median_ms:.0f} ms; "
        + ", ".join(f"{k} {g_['median_ms']:.0f} ms ({g_['speedup_vs_fp32']:.2f}× FP32)"
                    for k, g_ in summary["graphs"].items() if k != "fp32"),
        f"cpu     {cpu_label} vs ONNX Runtime quantize_static (MinMax, same {len(reader)} faces): speed "
        f"{mine['speedup_vs_fp32']:.2f}× vs {theirs['speedup_vs_fp32']:.2f}× FP32 (latency "
        f"{mine['median_ms'] / theirs['median_ms']:.2f}× quantize_static's), size {mine['file_bytes'] / 1e6:.2f} vs "
        f"{theirs['file_bytes'] / 1e6:.2f} MB, PSNR to FP {v_cpu['psnr_to_fp']:.2f} vs "
        f"{summary['quantize_static']['psnr_to_fp']:.2f} dB (parity {v_cpu['parity_psnr']:.1f} dB: "
        f"{'pass' if v_cpu['passed'] else 'FAIL'}"
        + (", 7-bit weight codes for this CPU without VNNI)" if cfg.calib_config(cpu=True).reduce_range else ")"),
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
