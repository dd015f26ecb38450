"""Our exported graphs beside ONNX Runtime's own one-call quantizers, measured in one run.

``deploy_bench(DeployBenchConfig(...))``:

1. exports the FP32 graph of the model (``quantface export --fp32``);
2. builds ONNX Runtime's peer graphs from it (``quantface.export.peers``), calibrated on the
   calibration faces exactly as ``quantface calibrate`` feeds them;
3. for every graph — FP32, the peers, and ours (given as paths) — measures on this machine:
   file bytes; latency, all graphs timed *interleaved* in one run with the same input and threads
   (``export.bench.compare_latency``); ONNX Runtime's profiler kernel time by part
   (``export.bench.kernel_time_by_part``); quality on held-out faces through ``quantface eval``'s own
   path (``jobs.evaluate`` with the graph as an ONNX backend: PSNR / SSIM to the HQ faces and to the
   FP model's output);
4. writes Markdown and JSON (atomically). Absolute times are this machine's; ratios are the result.

Qualcomm HTP placement is a column only where ``onnxruntime-qnn`` is installed and the placement
helper is available; otherwise the report says why it is absent.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from quantface import __version__
from quantface.config import JsonConfig
from quantface.data import atomic_write_bytes
from quantface.errors import ConfigError
from quantface.jobs import EvalConfig, ModelSpec, evaluate, fp_restorations

FP32 = "FP32"
BASELINE_PEER = "ort-static-minmax"  # the second speed reference: ORT's plain quantize_static


@dataclass
class GraphSpec(JsonConfig):
    """One of our exported graphs: a row name, its path, and (optionally) the recipe it was exported from."""

    name: str
    path: str
    recipe: str | None = None

    @classmethod
    def parse(cls, text: str) -> "GraphSpec":
        """``NAME=PATH[@RECIPE]``."""
        name, sep, rest = text.partition("=")
        path, _, recipe = rest.partition("@")
        if not sep or not name.strip() or not path:
            raise ConfigError(f"--graph {text!r} must look like NAME=PATH or NAME=PATH@RECIPE")
        return cls(name.strip(), path, recipe or None)


@dataclass
class DeployBenchConfig(JsonConfig):
    calib: str
    test: str
    graphs: list[GraphSpec] = field(default_factory=list)
    model: str = "reference"
    weights: str | None = None  # weights stem overriding the embedded model's
    peers: tuple[str, ...] = ("ort-static-minmax", "ort-static-percentile", "ort-qnn-a8w8", "ort-qnn-a16w8")
    calib_limit: int | None = 512
    calib_seed: int = 0  # degradation seed of the calibration faces (``quantface calibrate --seed``)
    test_limit: int | None = 300
    test_seed: int = 0  # degradation seed of the test faces (``quantface eval --seed``)
    threads: int = 2
    repeats: int = 30
    profile_runs: int = 20
    htp_faces: int = 2  # test faces each HTP graph runs on the emulated HTP for its HTP-vs-CPU-EP parity (0: none)
    reduce_range: bool | None = None  # None: quantize_static's CPU guidance for this machine
    workdir: str | None = None  # keep the FP32 and peer graphs here (default: a temporary folder)
    out: str | None = None  # Markdown
    json_out: str | None = None
    command: str = ""  # the command line that made the report, quoted in its header

    def __post_init__(self) -> None:
        from quantface.export.peers import get_peer

        self.graphs = [g if isinstance(g, GraphSpec) else GraphSpec.from_dict(g) for g in self.graphs]
        self.peers = tuple(self.peers)
        for name in self.peers:
            get_peer(name)
        if BASELINE_PEER not in self.peers:
            raise ConfigError(f"the peers must include {BASELINE_PEER}, the second speed reference")
        for label, n in (("--calib-limit", self.calib_limit), ("--test-limit", self.test_limit)):
            if n is not None and n < 1:
                raise ConfigError(f"{label} {n} must be at least 1")
        if min(self.threads, self.repeats, self.profile_runs) < 1:
            raise ConfigError("--threads, --repeats and --profile-runs must be positive")
        if isinstance(self.htp_faces, bool) or not isinstance(self.htp_faces, int) or self.htp_faces < 0:
            raise ConfigError(f"--htp-faces {self.htp_faces!r} must be a non-negative integer")
        names = [FP32, *self.peers, *(g.name for g in self.graphs)]
        if len(set(names)) != len(names):
            raise ConfigError(f"graph names must be unique (FP32 and the peer names are taken): {', '.join(names)}")
        for g in self.graphs:
            if not Path(g.path).is_file():
                raise ConfigError(f"--graph {g.name}: ONNX model {g.path} does not exist")


def _fmt_db(x: float | str) -> str:
    return f"{x:.2f} dB" if isinstance(x, float) else f"{x} dB"


def _finite(x: float) -> float | str:
    """PSNR of identical images is infinite: kept as the string "inf" so the JSON stays standard."""
    return x if math.isfinite(x) else "inf"


def _export_metadata(path: str) -> dict:
    """What our exporter recorded in a graph: profile, method and the recipe's sha256."""
    import onnx

    from quantface.export.save import read_metadata

    meta = read_metadata(onnx.load(path, load_external_data=False))
    return {k: meta.get(k, "") for k in ("profile", "method", "recipe_sha256")}


def _machine() -> str:
    """This machine in words: architecture, CPU count and model (Linux /proc/cpuinfo where readable)."""
    model = platform.processor()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {model or 'unknown CPU model'}"


def _htp_graph(row: dict) -> bool:
    """Whether a row's graph is meant for the HTP: a QNN peer, or one of ours with the ``qnn`` profile."""
    if row["kind"] == "peer":
        return row["settings"].get("target") == "qnn"
    return row["kind"] == "ours" and row["export"].get("profile") == "qnn"


def _htp_placement(rows: dict[str, dict], faces: np.ndarray) -> str:
    """Fills ``row['htp_placement']`` (the real QNN EP's node placement, emulated HTP) of every HTP graph, and
    its parity with the CPU EP on ``faces`` (LQ inputs, possibly none: the emulator takes about a minute a
    face); returns why placement was not measured, or ''."""
    if importlib.util.find_spec("onnxruntime_qnn") is None:
        return "onnxruntime-qnn is not installed on this machine"
    from quantface.export.api import OnnxBackend
    from quantface.export.qnn_ep import HtpBackend, placement
    from quantface.metrics import output_psnr
    from quantface.onnx_runtime import u8s8_saturates

    htp = [name for name, row in rows.items() if _htp_graph(row)]
    if not htp:
        return "no graph of this run is meant for the HTP"
    for name in htp:
        print(f"  HTP placement of {name}" + (f", {len(faces)} face(s) emulated" if len(faces) else ""), flush=True)
        p = placement(rows[name]["path"])
        rows[name]["htp_placement"] = {"soc": p.soc, "nodes_total": p.nodes_total, "nodes_on_qnn": p.nodes_on_qnn,
                                       "nodes_on_cpu": p.nodes_on_cpu, "qnn_partitions": p.qnn_partitions,
                                       "cpu_reasons": p.reasons()}
        if len(faces):
            t0 = time.perf_counter()
            on_htp = HtpBackend(rows[name]["path"])(faces)
            seconds = (time.perf_counter() - t0) / len(faces)
            on_cpu = OnnxBackend(rows[name]["path"], exact_qdq=u8s8_saturates())(faces)  # peers too
            rows[name]["htp_placement"].update(parity_faces=len(faces),
                                               psnr_htp_vs_cpu=_finite(output_psnr(on_htp, on_cpu)),
                                               max_abs_htp_vs_cpu=float(np.abs(on_htp - on_cpu).max()),
                                               emulated_seconds_per_face=seconds)
    return ""


def deploy_bench(cfg: DeployBenchConfig) -> dict:
    """Build, time and score every graph of ``cfg``; returns the report (and writes it where asked)."""
    from quantface.export import ExportConfig, export_onnx
    from quantface.export.bench import PARTS, compare_latency, kernel_time_by_part
    from quantface.export.peers import FaceCalibrationReader, build_peer, default_reduce_range, get_peer
    from quantface.onnx_runtime import cpu_has_vnni

    import onnxruntime

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="deploy_bench.") as tmp:
        work = Path(cfg.workdir or tmp)
        print(f"[1/5] exporting the FP32 graph ({cfg.model})", flush=True)
        fp32 = export_onnx(ExportConfig(model=cfg.model, weights=cfg.weights, recipe=None,
                                        out=str(work / "fp32.onnx"))).path
        rows: dict[str, dict] = {FP32: {"kind": "fp32", "path": str(fp32), "recipe": None}}

        print(f"[2/5] ONNX Runtime's peer quantizers, calibrated on {cfg.calib}", flush=True)
        reader = FaceCalibrationReader.from_faces(fp32, cfg.calib, cfg.calib_limit, cfg.calib_seed)
        reduce_range = default_reduce_range() if cfg.reduce_range is None else cfg.reduce_range
        for name in cfg.peers:
            print(f"  {name} ...", flush=True)
            peer = build_peer(fp32, get_peer(name), reader, work / f"{name}.onnx", reduce_range)
            print(f"  {name}: {peer.seconds:.0f} s", flush=True)
            rows[name] = {"kind": "peer", "path": str(peer.path), "recipe": None, "settings": peer.settings,
                          "build_seconds": peer.seconds}
        for g in cfg.graphs:
            rows[g.name] = {"kind": "ours", "path": g.path, "recipe": g.recipe, "export": _export_metadata(g.path)}

        print(f"[3/5] latency, {len(rows)} graphs interleaved, {cfg.threads} threads, {cfg.repeats} rounds", flush=True)
        timings = compare_latency({k: r["path"] for k, r in rows.items()}, threads=cfg.threads, repeats=cfg.repeats)
        print(f"[4/5] ONNX Runtime profiler, {cfg.profile_runs} runs per graph", flush=True)
        for name, row in rows.items():
            row["kernel_ms_by_part"] = kernel_time_by_part(row["path"], threads=cfg.threads, runs=cfg.profile_runs)

        print(f"[5/5] quality on {cfg.test} (quantface eval's pipeline)", flush=True)
        fp_spec = ModelSpec(name=cfg.model, weights=cfg.weights)
        fp_out = fp_restorations(EvalConfig(data=cfg.test, limit=cfg.test_limit, seed=cfg.test_seed, model=fp_spec))
        for name, row in rows.items():
            print(f"  {name}", flush=True)
            ev = evaluate(EvalConfig(data=cfg.test, limit=cfg.test_limit, seed=cfg.test_seed,
                                     model=dataclasses.replace(fp_spec, onnx=row["path"])), fp_out=fp_out)
            row["quality"] = {k: _finite(ev[k]) for k in ("psnr", "ssim", "psnr_to_fp", "ssim_to_fp")}
            row["test_faces"] = ev["n"]
            row["quality_lq"] = {"psnr": ev["psnr_lq"], "ssim": ev["ssim_lq"]}
        from quantface.data import load_folder
        from quantface.degradation import degrade
        from quantface.pipeline import images_to_tensor

        size = int(reader.inputs.shape[-1])
        hq = load_folder(cfg.test, size, cfg.htp_faces).images if cfg.htp_faces else []
        faces = images_to_tensor([degrade(h, cfg.test_seed, i)[0] for i, h in enumerate(hq)]).numpy() if hq \
            else np.zeros((0, 3, size, size), np.float32)
        placement_reason = _htp_placement(rows, faces)
        if cfg.workdir is None:  # the graphs are about to go: report them by name only
            for name, row in rows.items():
                if row["kind"] != "ours":
                    row["path"] = None

    fp_t, base_t = timings[FP32], timings[BASELINE_PEER]
    for name, row in rows.items():
        t = timings[name]
        row.update(file_bytes=t.file_bytes, size_vs_fp32=t.file_bytes / fp_t.file_bytes, median_ms=t.median_ms,
                   min_ms=t.min_ms, speedup_vs_fp32=fp_t.median_ms / t.median_ms,
                   speedup_vs_static_minmax=base_t.median_ms / t.median_ms)
    ref_quality = next(iter(rows.values()))["quality_lq"]
    result = {
        "command": cfg.command,
        "config": cfg.to_dict(),
        "machine": _machine(),
        "onnxruntime": onnxruntime.__version__,
        "tool_version": __version__,
        "threads": cfg.threads,
        "repeats": cfg.repeats,
        "input_shape": list(reader.inputs.shape[1:]),
        "calibration_faces": len(reader),
        "test_faces": next(iter(rows.values()))["test_faces"],
        "reduce_range": reduce_range,
        "cpu_has_vnni": cpu_has_vnni(),
        "reduce_range_source": "set by the caller" if cfg.reduce_range is not None else
                               "quantize_static's CPU guidance (x86 without VNNI: 7-bit weights)",
        "degraded_input_quality": ref_quality,
        "parts": list(PARTS),
        "htp_placement_reason": placement_reason,
        "seconds": time.perf_counter() - t_start,
        "graphs": rows,
    }
    if cfg.out:
        atomic_write_bytes(cfg.out, markdown(result).encode())
    if cfg.json_out:
        atomic_write_bytes(cfg.json_out, (json.dumps(result, indent=2) + "\n").encode())
    return result


def _db(x: float | str, digits: int = 2) -> str:
    return "identical" if x == "inf" else f"{x:.{digits}f}"


def markdown(r: dict) -> str:
    """The report as Markdown: one table of size, speed and quality, one of kernel time by part."""
    c = r["config"]
    rows = r["graphs"]
    lines = [
        "# Our graphs beside ONNX Runtime's own quantizers", "",
        f"Made by `{r['command'] or 'quantface.deploy_bench.deploy_bench'}` (quantface {r['tool_version']}, "
        f"ONNX Runtime {r['onnxruntime']}).", "",
        f"Latency: ONNX Runtime CPU EP, {r['threads']} threads, batch 1, input {r['input_shape']}, median of "
        f"{r['repeats']} runs of every graph **interleaved in one run** (same input, the order rotated each round). "
        f"Absolute milliseconds are this machine's ({r['machine']}, shared with other work); the ratios are the result. "
        f"Quality: {r['test_faces']} held-out faces of `{c['test']}` (degradation seed {c['test_seed']}) through "
        f"`quantface eval`'s pipeline with the graph on ONNX Runtime; \"to FP\" compares with the PyTorch FP model's "
        f"output on the same inputs. Degraded input: {r['degraded_input_quality']['psnr']:.2f} dB / "
        f"{r['degraded_input_quality']['ssim']:.4f}.", "",
        f"Peers: calibrated on {r['calibration_faces']} faces of `{c['calib']}` (degradation seed {c['calib_seed']}), "
        f"the inputs `quantface calibrate` uses; `reduce_range={r['reduce_range']}` for `quantize_static` "
        f"({r['reduce_range_source']}).", "",
        "| graph | kind | file | vs FP32 size | median latency | speed-up vs FP32 | vs ORT static MinMax | "
        "PSNR | SSIM | PSNR to FP | SSIM to FP |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in rows.items():
        q = m["quality"]
        lines.append(
            f"| {name} | {m['kind']} | {m['file_bytes'] / 1e6:.2f} MB | {m['size_vs_fp32']:.1%} | {m['median_ms']:.1f} ms | "
            f"**{m['speedup_vs_fp32']:.2f}×** | {m['speedup_vs_static_minmax']:.2f}× | {_db(q['psnr'])} | "
            f"{_db(q['ssim'], 4)} | {_db(q['psnr_to_fp'])} | {_db(q['ssim_to_fp'], 4)} |")
    lines += ["", "How each peer was made:", ""]
    for name, m in rows.items():
        if m["kind"] == "peer":
            s = m["settings"]
            lines.append(f"- `{name}`: {s['quantizer']} after {s['preprocess']}; {s['quant_format']}, activations "
                         f"{s['activation_type']}, weights {s['weight_type']} per channel, {s['calibrate_method']} "
                         f"calibration, {s.get('calibration_options', 'ORT defaults')}"
                         + (f", reduce_range={s['reduce_range']}" if "reduce_range" in s else "")
                         + f" ({m['build_seconds']:.0f} s to build).")
    ours = [(n, m) for n, m in rows.items() if m["kind"] == "ours"]
    if ours:
        lines += ["", "Ours (`quantface export --recipe RECIPE --profile PROFILE`): " + "; ".join(
            f"`{n}` = `{m['path']}` (profile `{m['export']['profile']}`, method {m['export']['method']}, recipe sha256 "
            f"{m['export']['recipe_sha256'][:12]}…" + (f", from `{m['recipe']}`" if m["recipe"] else "") + ")"
            for n, m in ours) + "."]
    names = list(rows)
    lines += ["", f"Where the time goes: ONNX Runtime's profiler, kernel time per run (mean of {c['profile_runs']} runs, "
              f"{r['threads']} threads, after ORT's fusions; wall time adds scheduling between nodes):", "",
              "| part | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for part in r["parts"]:
        lines.append(f"| {part} | " + " | ".join(f"{rows[n]['kernel_ms_by_part'][part]:.1f}" for n in names) + " |")
    lines.append("| total (ms) | " + " | ".join(f"{sum(rows[n]['kernel_ms_by_part'].values()):.1f}" for n in names) + " |")
    if r.get("cpu_has_vnni") is False:
        lines += ["", "This CPU has no VNNI instruction: ONNX Runtime's U8S8 integer kernels (QLinearConv, QGemm, ...) "
                  "can saturate their 16-bit intermediate sums on it. `quantize_static`'s guidance for such CPUs "
                  "(`reduce_range=True`, 7-bit weights) avoids that; CPU graphs with full-range 8-bit weights "
                  "made without it can lose quality here that comes from this CPU's kernels, not from the "
                  "quantization. Graphs meant for the HTP (our `qnn` profile in the quality columns, every HTP "
                  "graph in the HTP-vs-CPU column) are scored with ORT's QDQ fusions off "
                  "(`session.disable_quant_qdq`), as the HTP computes them; their CPU times are ORT's default."]
    placed = [(n, m["htp_placement"]) for n, m in rows.items() if m.get("htp_placement")]
    if placed:
        lines += ["", f"Qualcomm HTP placement (the real QNN EP, HTP emulated on this machine, SoC {placed[0][1]['soc']}):",
                  "", "| graph | nodes | on the HTP | on the CPU | HTP partitions | HTP vs CPU EP (PSNR, max-abs) | "
                  "CPU nodes' reasons |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for n, p in placed:
            why = "; ".join(f"{k} ({v})" for k, v in p["cpu_reasons"].items()) or "–"
            parity = (f"{_fmt_db(p['psnr_htp_vs_cpu'])}, {p['max_abs_htp_vs_cpu']:.3g} ({p['parity_faces']} faces)"
                      if "psnr_htp_vs_cpu" in p else "–")
            lines.append(f"| {n} | {p['nodes_total']} | {p['nodes_on_qnn']} | {p['nodes_on_cpu']} | "
                         f"{p['qnn_partitions']} | {parity} | {why} |")
    else:
        lines += ["", f"Qualcomm HTP placement: not measured — {r['htp_placement_reason']}."]
    return "\n".join(lines) + "\n"
