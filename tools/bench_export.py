"""Size and speed of the exported graphs of one recipe, against the FP32 graph, in one run.

    python tools/bench_export.py --recipe recipes/quantface_w4a4 --threads 2 --out docs/export_bench.md

Exports four graphs of the same model and input size — FP32, the recipe's ``reference`` and
``ort-cpu`` profiles, and ``ort-cpu`` without its Hadamard nodes (same layout, rotation removed;
its outputs are wrong, it only times what the rotation costs) — then times them interleaved with
``export.bench.compare_latency`` (same input, same threads) and reports:

* size: ``reference`` bytes / FP32 bytes (the issue's bar: ≤ 15 %), with a breakdown of the
  ``reference`` file by kind of tensor;
* speed: FP32 latency / ``ort-cpu`` latency (bar: ≥ 2.5×);
* Hadamard share: (``ort-cpu`` − ``ort-cpu`` without rotation) / ``ort-cpu`` (bar: ≤ 3 %);
* where the time goes: ONNX Runtime's profiler on the FP32 and ``ort-cpu`` graphs, kernel time by
  part (``export.bench.kernel_time_by_part``), and the speed-up ``ort-cpu`` could reach if its
  rotations, low-rank branches and activation quantizers cost nothing.

Writes the Markdown table and the raw numbers as JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from collections import Counter
from pathlib import Path

import onnx
from onnx import numpy_helper

from quantface.export import ExportConfig, export_onnx
from quantface.export.bench import OVERHEAD_PARTS, PARTS, compare_latency, kernel_time_by_part
from quantface import __version__
from quantface.data import atomic_write_bytes
from quantface.errors import exit_status


def tensor_breakdown(path: Path) -> dict[str, int]:
    """Initializer bytes of an exported graph by kind (weight codes, low-rank, rotation, other)."""
    kinds: Counter = Counter()
    for t in onnx.load(str(path)).graph.initializer:
        n = t.name
        kind = ("weight codes" if n.endswith("weight_codes") or "weight_codes" in n else
                "low-rank factors" if ".lowrank_" in n else
                "Hadamard factors and signs" if n.startswith("hadamard.") or n.endswith(".hadamard_signs") else
                "scales, zero points, smoothing" if any(k in n for k in ("scale", "zero_point", "smooth")) else
                "other (norms, biases, constants)")
        kinds[kind] += len(t.raw_data) if t.raw_data else numpy_helper.to_array(t).nbytes
    return dict(kinds)


def publish(report: dict, text: str, out: str | None) -> None:
    """Print a benchmark's Markdown and, with ``out``, write it there and its raw numbers as JSON beside it."""
    print(text)
    if out:
        atomic_write_bytes(out, text.encode())
        atomic_write_bytes(Path(out).with_suffix(".json"), (json.dumps(report, indent=2) + "\n").encode())


def run(recipe: str, threads: int, repeats: int, size: int | None, workdir: Path) -> dict:
    variants = {
        "fp32": ExportConfig(recipe=None, out=str(workdir / "fp32.onnx"), size=size),
        "reference": ExportConfig(recipe=recipe, profile="reference", out=str(workdir / "reference.onnx"), size=size),
        "ort-cpu": ExportConfig(recipe=recipe, profile="ort-cpu", out=str(workdir / "ort_cpu.onnx"), size=size),
        "ort-cpu, no rotation": ExportConfig(recipe=recipe, profile="ort-cpu", rotation=False,
                                             out=str(workdir / "ort_cpu_norot.onnx"), size=size),
    }
    paths = {}
    for label, cfg in variants.items():
        paths[label] = export_onnx(cfg).path
        print(f"exported {label}: {paths[label]}")
    timings = compare_latency(paths, threads=threads, repeats=repeats)
    fp, ref, cpu, norot = (timings[k] for k in variants)
    parts = {k: kernel_time_by_part(paths[k], threads=threads) for k in ("fp32", "ort-cpu")}
    # Amdahl: with the rotations, low-rank branches and activation quantizers at zero cost, the
    # ort-cpu graph still runs its integer convs, layout changes and the float ops it shares with FP32.
    floor = sum(ms for part, ms in parts["ort-cpu"].items() if part not in OVERHEAD_PARTS)
    return {
        "recipe": recipe,
        "threads": threads,
        "repeats": repeats,
        "input_shape": [1, 3, size or "working size"],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "tool_version": __version__,
        "models": {k: {"median_ms": t.median_ms, "min_ms": t.min_ms, "file_bytes": t.file_bytes}
                   for k, t in timings.items()},
        "size_ratio_reference_vs_fp32": ref.file_bytes / fp.file_bytes,
        "speedup_ort_cpu_vs_fp32": fp.median_ms / cpu.median_ms,
        "speedup_reference_vs_fp32": fp.median_ms / ref.median_ms,
        "hadamard_share_ort_cpu": (cpu.median_ms - norot.median_ms) / cpu.median_ms,
        "reference_breakdown_bytes": tensor_breakdown(ref.path),
        "kernel_ms_by_part": parts,
        "speedup_bound_ort_cpu": sum(parts["fp32"].values()) / floor,
    }


def markdown(r: dict) -> str:
    lines = [f"# Exported graphs of `{r['recipe']}`", "",
             f"ONNX Runtime CPU EP, {r['threads']} threads, batch 1, median of {r['repeats']} interleaved runs "
             f"({r['machine']}); written by `tools/bench_export.py` (quantface {r['tool_version']}).", "",
             "| graph | file | median latency | vs FP32 |", "|---|---:|---:|---:|"]
    fp = r["models"]["fp32"]
    for k, m in r["models"].items():
        lines.append(f"| {k} | {m['file_bytes'] / 1e6:.2f} MB ({m['file_bytes'] / fp['file_bytes']:.1%}) | "
                     f"{m['median_ms']:.1f} ms | {fp['median_ms'] / m['median_ms']:.2f}× |")
    lines += ["", f"- size, `reference` / FP32: **{r['size_ratio_reference_vs_fp32']:.1%}** (bar ≤ 15 %)",
              f"- speed, FP32 / `ort-cpu`: **{r['speedup_ort_cpu_vs_fp32']:.2f}×** (bar ≥ 2.5×)",
              f"- Hadamard share of `ort-cpu` latency: **{r['hadamard_share_ort_cpu']:.1%}** (bar ≤ 3 %)", "",
              "`reference` file by kind of tensor:", "", "| tensors | bytes |", "|---|---:|"]
    for k, v in sorted(r["reference_breakdown_bytes"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {k} | {v / 1e6:.2f} MB |")
    parts = r["kernel_ms_by_part"]
    lines += ["", f"Where the time goes: ONNX Runtime's profiler, kernel time per run (mean of 20, {r['threads']} threads, "
              "after its fusions; wall time adds scheduling between nodes):", "",
              "| part | FP32 | ort-cpu |", "|---|---:|---:|"]
    for part in PARTS:
        lines.append(f"| {part} | {parts['fp32'][part]:.1f} ms | {parts['ort-cpu'][part]:.1f} ms |")
    lines.append(f"| total | {sum(parts['fp32'].values()):.1f} ms | {sum(parts['ort-cpu'].values()):.1f} ms |")
    lines += ["", f"Upper bound on the ort-cpu speed-up with free rotations, low-rank branches and activation "
              f"quantizers (FP32 total / ort-cpu's integer ops, float convs, layout and other float ops): "
              f"**{r['speedup_bound_ort_cpu']:.2f}×**."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--out", default=None, help="Markdown file to write (JSON beside it)")
    args = ap.parse_args(argv)

    def job() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            r = run(args.recipe, args.threads, args.repeats, args.size, Path(tmp))
        publish(r, markdown(r), args.out)

    return exit_status(job)


if __name__ == "__main__":
    raise SystemExit(main())
