"""``quantface validate``: an exported graph against the PyTorch model it came from, on real faces.

ONNX Runtime (CPU EP) and the PyTorch model (the fake-quant model of the recipe — simulating the
``ort-cpu`` / ``qnn`` graph's 8-bit requantized convolution outputs when it has them — or the FP model
for an FP32 graph) restore the same degraded faces through the same ``RestorationPipeline`` code. Reported:
parity between the two (PSNR over the whole set of float outputs mapped to [0, 1], capped at 200 dB
for identical outputs, and max-abs), quality of the ONNX output against the HQ faces and against the
FP model, latency (median of repeated single-batch runs, threads stated) and file size.

``ep="qnn-htp"`` also runs the graph on Qualcomm's QNN HTP backend (``export.qnn_ep``, emulated on
x86: 25–50 s a 128² face, so only the first ``htp_limit`` faces) and reports where the EP placed each
node and the HTP's parity with the PyTorch simulation and with the CPU EP on those faces.

What the graph is compared with is decided by the graph, before any work: a quantized graph stores the
sha256 of the recipe it was exported from, so it needs ``--recipe`` and exactly that recipe (its
fake-quant model is what the graph should compute; comparing with the FP model instead would mix
quantization error into "parity"); an FP32 graph stores none and is compared with the FP model. The
verdict: parity (CPU EP vs PyTorch) at least ``min_parity`` dB — by default ``quantface.verdict``'s bars
(40 dB for quantized graphs, 80 dB for FP32 ones); the report says what was compared and the verdict.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from quantface.export.api import OnnxBackend
from quantface.export.errors import ExportError
from quantface.export.save import file_bytes, foreign_graph
from quantface import __version__
from quantface.config import JsonConfig, check_int
from quantface.data import atomic_write_bytes, list_images, load_folder
from quantface.degradation import degrade
from quantface.errors import ConfigError
from quantface.jobs import ModelSpec
from quantface.metrics import PSNR_CAP, output_psnr, psnr, ssim
from quantface.paths import check_input_file, check_output_file
from quantface.pipeline import RestorationPipeline, images_to_tensor
from quantface.verdict import default_min_parity

EPS = ("cpu", "qnn-htp")


class _Recording:
    """Wraps a backend and keeps its raw float outputs, so parity is measured before uint8 rounding."""

    def __init__(self, backend):
        self.backend, self.outputs = backend, []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        out = self.backend(batch)
        self.outputs.append(np.asarray(out, dtype=np.float64))
        return out


@dataclass
class ValidateConfig(JsonConfig):
    onnx: str
    data: str
    model: ModelSpec = field(default_factory=ModelSpec)
    limit: int | None = 20
    seed: int = 0
    threads: int = 2
    repeats: int = 10
    json_out: str | None = None
    ep: str = "cpu"  # cpu | qnn-htp (also the QNN HTP backend, on the first htp_limit faces)
    htp_limit: int = 2
    soc: str = "SM8650"  # the HTP the QNN backend emulates (export.qnn_ep.SOCS)
    # Parity bar in dB; None: quantface.verdict's default for the graph's kind (quantized or FP32).
    min_parity: float | None = None

    def __post_init__(self) -> None:
        if self.min_parity is not None and not (isinstance(self.min_parity, (int, float))
                                                and 0 <= self.min_parity <= PSNR_CAP):
            raise ConfigError(f"--min-parity {self.min_parity} must be a PSNR in dB between 0 and {PSNR_CAP:g}")
        if self.threads < 1 or self.repeats < 1:
            raise ConfigError("--threads and --repeats must be positive")
        if self.ep not in EPS:
            raise ConfigError(f"unknown --ep {self.ep!r}; available: {', '.join(EPS)}")
        check_int(self.htp_limit, "--htp-limit")
        if self.limit is not None:
            check_int(self.limit, "--limit")
        check_int(self.seed, "--seed", 0)
        if self.model.onnx is not None:
            raise ConfigError("validate takes the graph under test as --onnx and compares it with the PyTorch model")

    def check(self) -> None:
        """Before any work: the graph and the faces exist, the report can be written."""
        check_input_file(self.onnx, "ONNX model")
        list_images(self.data)
        if self.json_out:
            check_output_file(self.json_out, "--json")
        self.model.check()


def _compared(cfg: ValidateConfig, metadata: dict[str, str]) -> dict:
    """What the graph is compared with, from its metadata and ``cfg.model``; ConfigError (before any
    model runs) when the recipe is missing, not the graph's, or given for an FP32 graph."""
    graph_sha = metadata.get("quantface.recipe_sha256", "")
    recipe = cfg.model.recipe
    if graph_sha and recipe is None:
        raise ConfigError(f"{cfg.onnx} is a quantized graph (exported from the recipe with sha256 {graph_sha[:12]}…); "
                          f"give that recipe as --recipe RECIPE_DIR: validate compares a graph with the fake-quant "
                          f"model it was exported from")
    if not graph_sha and recipe is not None:
        raise ConfigError(f"{cfg.onnx} is an FP32 graph (no recipe); drop --recipe {recipe} to compare it with the "
                          f"FP model")
    recipe_sha = None
    if recipe is not None:
        from quantface.recipe import read_recipe

        recipe_sha = read_recipe(recipe).sha256
        if recipe_sha != graph_sha:
            raise ConfigError(f"recipe {recipe} (sha256 {recipe_sha[:12]}…) is not the one {cfg.onnx} was exported "
                              f"from (sha256 {graph_sha[:12]}…)")
    quantized = bool(graph_sha)
    return {
        "onnx": str(cfg.onnx),
        "profile": metadata.get("quantface.profile", "") if quantized else "fp32",
        "method": metadata.get("quantface.method", ""),
        "pytorch_model": "fake-quant model of the recipe" if quantized else "FP model",
        "recipe": None if recipe is None else str(recipe),
        "recipe_sha256": recipe_sha,
        "graph_recipe_sha256": graph_sha or None,
        "fp_model": {"name": cfg.model.name, "weights": cfg.model.weights or "embedded"},
        "min_parity": cfg.min_parity if cfg.min_parity is not None else default_min_parity(quantized),
    }


def _restore(backend, lqs: list, batch: int, desc: str) -> list:
    """The pipeline over ``lqs`` with a progress bar (stderr), one graph batch at a time."""
    pipeline, out = RestorationPipeline(backend, batch), []
    for i in tqdm(range(0, len(lqs), batch), desc=desc, unit="face" if batch == 1 else "batch", dynamic_ncols=True):
        out.extend(pipeline(lqs[i:i + batch]))
    return out


def _htp_part(cfg: ValidateConfig, lqs: list, batch: int, cpu: np.ndarray, torch_out: np.ndarray) -> dict:
    """The QNN HTP backend on the first ``cfg.htp_limit`` faces: placement and parity (the CPU EP's
    and PyTorch's outputs on those faces are the first rows of the full run's)."""
    from quantface.export.qnn_ep import HtpBackend, get_target, placement

    target = get_target(cfg.soc)
    where = placement(cfg.onnx, target)
    htp_rec = _Recording(HtpBackend(cfg.onnx, target, threads=cfg.threads))
    n = min(cfg.htp_limit, len(lqs))
    t0 = time.perf_counter()
    RestorationPipeline(htp_rec, batch)(lqs[:n])
    seconds = time.perf_counter() - t0
    h = np.concatenate(htp_rec.outputs)[:n]
    return {
        "soc": target.soc, "soc_model": target.soc_model, "htp_arch": target.htp_arch, "n": n,
        **where.to_dict(),
        "parity_psnr_to_torch": output_psnr(h, torch_out[:n]),
        "parity_max_abs_to_torch": float(np.abs(h - torch_out[:n]).max()),
        "parity_psnr_to_cpu": output_psnr(h, cpu[:n]),
        "parity_max_abs_to_cpu": float(np.abs(h - cpu[:n]).max()),
        "emulated_seconds_per_face": seconds / n,
    }


def saturating_layers(backend: OnnxBackend) -> list[str]:
    """The layers of a graph that ONNX Runtime's fused U8S8 kernels saturate on this CPU: full-range 8-bit
    weights on 8-bit inputs (7-bit codes, ``--reduce-range``, are exact), in a session with the fusions on,
    on an x86 CPU without VNNI (``quantface.onnx_runtime``). Empty everywhere else."""
    from quantface.onnx_runtime import u8s8_saturates

    if backend.exact_qdq or not u8s8_saturates():
        return []
    bits = json.loads(backend.metadata.get("quantface.layer_bits", "{}"))
    return sorted(n for n, e in bits.items() if (e["weight_bits"], e["act_bits"]) == (8, 8))


def validate(cfg: ValidateConfig) -> dict:
    if cfg.ep == "qnn-htp":  # fail before the slow CPU and PyTorch runs
        from quantface.export.qnn_ep import get_target, require_qnn

        require_qnn()
        get_target(cfg.soc)
    cfg.check()
    onnx_backend = OnnxBackend(cfg.onnx, threads=cfg.threads)
    foreign = foreign_graph(cfg.onnx, onnx_backend.metadata)
    if foreign:  # nothing to compare it with: validate compares our exports with their PyTorch model
        raise ExportError(foreign)
    compared = _compared(cfg, onnx_backend.metadata)
    compared["cpu_qdq_fusions_off"] = onnx_backend.exact_qdq  # OnnxBackend: a qnn graph on a saturating CPU
    if note := onnx_backend.exact_qdq_note():
        print(note, file=sys.stderr)
    shape = onnx_backend.input_shape
    size = shape[-1] if isinstance(shape[-1], int) else cfg.model.fp_model().config.working_size
    batch = shape[0] if isinstance(shape[0], int) else 1
    loaded = load_folder(cfg.data, size, cfg.limit)
    lqs = [degrade(hq, cfg.seed, i)[0] for i, hq in enumerate(loaded.images)]

    # The PyTorch side simulates what the graph computes: requantized conv outputs (ort-cpu, qnn) too.
    requantized = json.loads(onnx_backend.metadata.get("quantface.requantized_layers", "[]"))
    units = bool(json.loads(onnx_backend.metadata.get("quantface.integer_units", "false")))
    torch_spec = dataclasses.replace(cfg.model, requant_outputs=bool(requantized), integer_units=units)
    compared["requantized_outputs_simulated"] = bool(requantized)
    compared["integer_units_simulated"] = units  # the recipe's quantizer points (export.integer_units)
    onnx_rec, torch_rec = _Recording(onnx_backend), _Recording(torch_spec.torch_backend())
    onnx_out = _restore(onnx_rec, lqs, batch, "validate: ONNX Runtime")
    torch_out = _restore(torch_rec, lqs, batch, "validate: PyTorch " + ("fake-quant" if cfg.model.recipe else "FP"))
    if cfg.model.recipe is None:  # an FP32 graph: the PyTorch model under comparison is the FP model
        fp_out = torch_out
    else:
        fp_out = _restore(cfg.model.fp_spec().torch_backend(), lqs, batch, "validate: PyTorch FP (quality to FP)")
    a, b = np.concatenate(onnx_rec.outputs), np.concatenate(torch_rec.outputs)

    one = images_to_tensor(lqs[:1] * batch).numpy()
    onnx_backend(one)  # warm-up
    times = []
    for _ in tqdm(range(cfg.repeats), desc="validate: latency", unit="run", dynamic_ncols=True):
        t0 = time.perf_counter()
        onnx_backend(one)
        times.append(time.perf_counter() - t0)

    parity = output_psnr(a, b)
    result = {
        "onnx": str(cfg.onnx),
        "recipe": cfg.model.recipe,
        "compared": {**compared, "data": str(cfg.data), "seed": cfg.seed},
        "min_parity": compared["min_parity"],
        "passed": bool(parity >= compared["min_parity"]),
        "metadata": {k: v for k, v in onnx_backend.metadata.items() if k != "quantface.layer_bits"},
        "n": len(lqs),
        "size": size,
        "parity_psnr": parity,
        "parity_max_abs": float(np.abs(a - b).max()),
        "psnr": float(np.mean([psnr(o, h) for o, h in zip(onnx_out, loaded.images)])),
        "ssim": float(np.mean([ssim(o, h) for o, h in zip(onnx_out, loaded.images)])),
        "psnr_to_fp": float(np.mean([psnr(o, f) for o, f in zip(onnx_out, fp_out)])),
        "ssim_to_fp": float(np.mean([ssim(o, f) for o, f in zip(onnx_out, fp_out)])),
        "torch_psnr": float(np.mean([psnr(o, h) for o, h in zip(torch_out, loaded.images)])),
        "latency_ms_median": 1000 * statistics.median(times),
        "latency_batch": batch,
        "threads": cfg.threads,
        "file_bytes": file_bytes(cfg.onnx),
        "skipped": loaded.skipped,
        "tool_version": __version__,
    }
    result["saturating_w8a8_layers"] = saturating_layers(onnx_backend)
    if cfg.ep == "qnn-htp":
        result["htp"] = _htp_part(cfg, lqs, batch, a, b)
    if cfg.json_out:
        atomic_write_bytes(cfg.json_out, (json.dumps(result, indent=2) + "\n").encode())
    return result
