"""Per-layer branch ranks against uniform ranks: graph bytes, branch kernel time and latency, in one run.

    python tools/bench_ranks.py --recipe recipes/quantface_w4a4_r050 --baseline recipes/quantface_w4a4 \
        --threads 2 --out docs/rank_bench.md

Exports the FP32 graph and, for both recipes, the ``reference`` and ``ort-cpu`` profiles, then:

* bytes: each ``reference`` file / the FP32 file (issue #18's bar: ≤ 15 % at ``--rank-budget 0.5``),
  with the ``reference`` files broken down by kind of tensor (``bench_export.tensor_breakdown``);
* branch kernel time: ONNX Runtime's profiler on the two ``ort-cpu`` graphs, ``--rounds`` rounds
  that alternate the graphs (``--runs`` inferences each, same input, same threads), kernel time by
  part (``export.bench.kernel_time_by_part``); the bar is the low-rank part ≤ half the baseline's.
  Layers a rank allocation left in full precision carry no branch but run as float convolutions,
  so that part is reported beside it, and so is the total;
* latency: FP32 and both ``ort-cpu`` graphs timed interleaved (``export.bench.compare_latency``).

Also lists the layers whose branches take the most kernel time in the baseline, with the rank the
recipe gave them. Writes the Markdown table and the raw numbers as JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_export import publish, tensor_breakdown  # noqa: E402

from quantface import __version__  # noqa: E402
from quantface.errors import ConfigError, exit_status  # noqa: E402
from quantface.export import ExportConfig, export_onnx  # noqa: E402
from quantface.export.bench import PARTS, compare_latency, profile_kernel_time  # noqa: E402

BRANCH, FLOAT_CONV = PARTS[3], PARTS[2]


def layer_ranks(recipe_dir: str) -> dict[str, int]:
    """Each quantized layer's branch rank in a recipe (0: no branch); full-precision layers are absent."""
    layers = json.loads(Path(recipe_dir, "recipe.json").read_text())["layers"]
    return {name: int(entry.get("lowrank_rank") or 0) for name, entry in layers.items()}


def run(recipe: str, baseline: str, threads: int, runs: int, rounds: int, repeats: int, size: int | None,
        workdir: Path) -> dict:
    for path in (recipe, baseline):
        if not Path(path, "recipe.json").is_file():
            raise ConfigError(f"--recipe/--baseline {path!r} is not a recipe folder (no recipe.json)")
    graphs = {"fp32": ExportConfig(recipe=None, out=str(workdir / "fp32.onnx"), size=size)}
    for tag, r in (("baseline", baseline), ("recipe", recipe)):
        for profile in ("reference", "ort-cpu"):
            graphs[f"{tag} {profile}"] = ExportConfig(recipe=r, profile=profile, size=size,
                                                      out=str(workdir / f"{tag}_{profile}.onnx"))
    paths = {}
    for label, cfg in graphs.items():
        paths[label] = export_onnx(cfg).path
        print(f"exported {label}: {paths[label]}", flush=True)
    sizes = {label: os.path.getsize(p) for label, p in paths.items()}

    cpu = ("baseline ort-cpu", "recipe ort-cpu")
    parts: dict[str, list[dict[str, float]]] = {k: [] for k in cpu}
    per_layer: dict[str, dict[str, list[float]]] = {k: defaultdict(list) for k in cpu}
    for i in range(rounds):
        for k in (cpu if i % 2 == 0 else cpu[::-1]):
            by_part, by_layer = profile_kernel_time(paths[k], threads=threads, runs=runs)
            parts[k].append(by_part)
            for layer, ms in by_layer.items():
                per_layer[k][layer].append(ms)
        print(f"profiled round {i + 1}/{rounds}", flush=True)
    mean_parts = {k: {p: statistics.mean(r[p] for r in parts[k]) for p in PARTS} for k in cpu}
    latency = compare_latency({k: paths[k] for k in ("fp32",) + cpu}, threads=threads, repeats=repeats)
    ranks = {"baseline": layer_ranks(baseline), "recipe": layer_ranks(recipe)}
    base_layers = {layer: statistics.mean(v) for layer, v in per_layer["baseline ort-cpu"].items()}
    rec_layers = {layer: statistics.mean(v) for layer, v in per_layer["recipe ort-cpu"].items()}
    return {
        "recipe": recipe, "baseline": baseline, "threads": threads, "runs": runs, "rounds": rounds,
        "repeats": repeats, "input_size": size, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "tool_version": __version__,
        "file_bytes": sizes,
        "reference_vs_fp32": {tag: sizes[f"{tag} reference"] / sizes["fp32"] for tag in ("baseline", "recipe")},
        "reference_breakdown_bytes": {tag: tensor_breakdown(paths[f"{tag} reference"]) for tag in ("baseline", "recipe")},
        "kernel_ms_by_part": mean_parts,
        "kernel_ms_by_part_rounds": parts,
        "branch_ratio": mean_parts["recipe ort-cpu"][BRANCH] / mean_parts["baseline ort-cpu"][BRANCH],
        # Round i profiles the two graphs back to back, so the machine's drift between rounds cancels in its ratio.
        "branch_ratio_rounds": [c[BRANCH] / b[BRANCH] if b[BRANCH] else None
                                for b, c in zip(parts["baseline ort-cpu"], parts["recipe ort-cpu"])],
        "latency_ms": {k: {"median_ms": t.median_ms, "min_ms": t.min_ms} for k, t in latency.items()},
        "branch_ms_by_layer": {"baseline": base_layers, "recipe": rec_layers},
        "ranks": ranks,
    }


def markdown(r: dict) -> str:
    mp, lat, sz = r["kernel_ms_by_part"], r["latency_ms"], r["file_bytes"]
    b, c = "baseline ort-cpu", "recipe ort-cpu"
    lines = [f"# Per-layer branch ranks: `{r['recipe']}` against `{r['baseline']}`", "",
             f"ONNX Runtime CPU EP, {r['threads']} threads, batch 1 ({r['machine']}); written by "
             f"`tools/bench_ranks.py` (quantface {r['tool_version']}). Kernel times: ORT's profiler, mean of "
             f"{r['rounds']} alternated rounds × {r['runs']} runs; latency: median of {r['repeats']} interleaved runs.", "",
             "| | baseline | recipe | recipe / baseline |", "|---|---:|---:|---:|"]
    ref_b, ref_r = sz["baseline reference"], sz["recipe reference"]
    lines.append(f"| `reference` graph / FP32 graph bytes | {r['reference_vs_fp32']['baseline']:.1%} ({ref_b / 1e6:.2f} MB) | "
                 f"{r['reference_vs_fp32']['recipe']:.1%} ({ref_r / 1e6:.2f} MB) | {ref_r / ref_b:.3f} |")
    lines.append(f"| `ort-cpu` graph bytes | {sz[b] / 1e6:.2f} MB | {sz[c] / 1e6:.2f} MB | {sz[c] / sz[b]:.3f} |")
    for part in (BRANCH, FLOAT_CONV):
        lines.append(f"| `ort-cpu` {part} kernel time | {mp[b][part]:.2f} ms | {mp[c][part]:.2f} ms | "
                     f"{mp[c][part] / mp[b][part]:.3f} |" if mp[b][part] else
                     f"| `ort-cpu` {part} kernel time | {mp[b][part]:.2f} ms | {mp[c][part]:.2f} ms | – |")
    tb, tc = sum(mp[b].values()), sum(mp[c].values())
    lines.append(f"| `ort-cpu` total kernel time | {tb:.1f} ms | {tc:.1f} ms | {tc / tb:.3f} |")
    lines.append(f"| `ort-cpu` latency (FP32: {lat['fp32']['median_ms']:.1f} ms) | {lat[b]['median_ms']:.1f} ms | "
                 f"{lat[c]['median_ms']:.1f} ms | {lat[c]['median_ms'] / lat[b]['median_ms']:.3f} |")
    rounds_b = [x[BRANCH] for x in r["kernel_ms_by_part_rounds"][b]]
    rounds_c = [x[BRANCH] for x in r["kernel_ms_by_part_rounds"][c]]
    ratios = [x for x in r["branch_ratio_rounds"] if x is not None]
    spread = (f" Recipe / baseline within each round: median {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f})." if ratios else "")
    lines += ["", f"Branch kernel time per round (ms): baseline {', '.join(f'{x:.2f}' for x in rounds_b)}; "
              f"recipe {', '.join(f'{x:.2f}' for x in rounds_c)}.{spread}", "",
              "Kernel time by part (ms):", "", "| part | baseline | recipe |", "|---|---:|---:|"]
    for part in PARTS:
        lines.append(f"| {part} | {mp[b][part]:.2f} | {mp[c][part]:.2f} |")
    lines += ["", "`reference` files by kind of tensor (MB):", "", "| tensors | baseline | recipe |", "|---|---:|---:|"]
    bd = r["reference_breakdown_bytes"]
    for kind in sorted(bd["baseline"], key=lambda k: -bd["baseline"][k]):
        lines.append(f"| {kind} | {bd['baseline'][kind] / 1e6:.3f} | {bd['recipe'].get(kind, 0) / 1e6:.3f} |")
    lines += ["", "The baseline's 12 costliest branches and what the recipe did with them (FP: left in full precision):", "",
              "| layer | baseline rank | baseline ms | recipe rank | recipe ms |", "|---|---:|---:|---:|---:|"]
    base, rec = r["branch_ms_by_layer"]["baseline"], r["branch_ms_by_layer"]["recipe"]
    for layer in sorted(base, key=lambda k: -base[k])[:12]:
        rank = r["ranks"]["recipe"].get(layer, "FP")
        lines.append(f"| {layer} | {r['ranks']['baseline'].get(layer, 'FP')} | {base[layer]:.2f} | {rank} | "
                     f"{rec.get(layer, 0.0):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", required=True, help="recipe with per-layer ranks")
    ap.add_argument("--baseline", required=True, help="recipe to compare with (uniform ranks)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=10, help="inferences per profiled session")
    ap.add_argument("--rounds", type=int, default=10,
                    help="alternated profiling rounds per graph (the machine's speed drifts: 4 rounds gave ratios "
                         "0.39-0.50 for the same two graphs)")
    ap.add_argument("--repeats", type=int, default=30, help="interleaved latency runs")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--out", default=None, help="Markdown file to write (JSON beside it)")
    args = ap.parse_args(argv)

    def job() -> None:
        if min(args.threads, args.runs, args.rounds, args.repeats) < 1:
            raise ConfigError("--threads, --runs, --rounds and --repeats must be positive")
        with tempfile.TemporaryDirectory() as tmp:
            r = run(args.recipe, args.baseline, args.threads, args.runs, args.rounds, args.repeats, args.size, Path(tmp))
        publish(r, markdown(r), args.out)

    return exit_status(job)


if __name__ == "__main__":
    raise SystemExit(main())
