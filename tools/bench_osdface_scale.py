"""Scale benchmark: the full-size OSDFace pipeline (SD 2.1-base UNet + VAE + OSDFace's visual
representation embedder, ~979 M parameters, random weights) through calibration, export and ONNX
Runtime, with wall time, peak RAM and file sizes per stage. Not part of CI.

    python tools/bench_osdface_scale.py --table-only          # Params/Ops table (reference + full-size
                                                             # OSDFace counted on the meta device), seconds
    python tools/bench_osdface_scale.py --dry-run             # the whole pipeline on a tiny model, ~1-2 min
    python tools/bench_osdface_scale.py --work /data/bench    # the real thing: hours on 2 CPU cores

Stages (full run): write random SD 2.1-base + OSDFace checkpoints in their real layouts (diffusers
folders, LoRA safetensors, .pth/.ckpt; ~4 GB on disk under --work) → load them with the same loader as
``--model osdface`` → one FP forward at 512×512 (CUDA when available) → ``calibrate`` QuantFace
W4A4 on --images shipped faces with --steps QD-LoRA steps → ``export_onnx`` to the ``reference`` and
``ort-cpu`` profiles and the FP32 graph (the dynamo exporter, weights as external data) → ONNX
Runtime CPU latency at 512×512 of the three graphs, interleaved over --rounds rounds (each graph in a
process of its own, ``tools/time_graph.py``: one warm-up run, one timed run), as ratios to FP32. Peak RAM per stage is the
process's high-water mark (VmHWM, reset between stages through /proc/self/clear_refs; the lifetime
ru_maxrss where that is not available); the budget is 24 GB. The FP forward and calibration run on
--device (``auto``: a CUDA GPU when torch sees one, else the CPU; peak RAM is then host memory and the
GPU's peak is reported too); export traces on the CPU and ONNX Runtime runs its CPU provider.

Params / Ops follow the QuantFace paper's Table 2: parameters in M and operations in G (multiply-
accumulates of every conv, linear and attention matmul, counted by torch's FlopCounterMode at the
model's input size) for FP and for W<b>A<b>, "parameter-equivalent": a b-bit weight counts b/32 of an
FP32 one and an op on b-bit operands b/32 of an FP op (max of weight and activation bits); the
QD-LoRA branch (rank 2r, FP) is counted in full, norms, biases and the codebook stay FP.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantface.models.osdface import EmbedderConfig  # noqa: E402

# Stable Diffusion 2.1-base (stabilityai/stable-diffusion-2-1-base), unet/config.json and vae/config.json.
SD21_UNET = {
    "act_fn": "silu", "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": True,
}
SD21_VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4, "scaling_factor": 0.18215,
}
OSDFACE_EMBEDDER = EmbedderConfig()  # the defaults are OSDFace's vqvae_encoder + TwoLayerConv1x1(512, 1024)
FULL = dict(unet=SD21_UNET, vae=SD21_VAE, embedder=OSDFACE_EMBEDDER, size=512)

# --dry-run: the same structure, tiny (the test suite's model).
TINY = dict(
    unet=dict(sample_size=16, layers_per_block=1, block_out_channels=(16, 32), norm_num_groups=8,
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
              cross_attention_dim=16, attention_head_dim=4, use_linear_projection=True),
    vae=dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
             up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1, norm_num_groups=4,
             sample_size=32),
    embedder=EmbedderConfig(resolution=32, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(1,), z_channels=8,
                            n_embed=128, embed_dim=8, proj_hidden=4, context_dim=16),
    size=32)

RAM_BUDGET_GB = 24.0
BITS_ROWS = ((32, 32), (6, 6), (4, 4))


# ------------------------------------------------------------------------------- memory and time
def _reset_peak() -> bool:
    """Reset the process's RSS high-water mark (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_gb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KB on Linux


class Stages:
    def __init__(self):
        self.rows: list[dict] = []
        self.resettable = _reset_peak()

    @contextmanager
    def stage(self, name: str, **extra):
        gc.collect()
        _reset_peak()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        row = {"stage": name, **extra}
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            yield row
        finally:
            row["seconds"] = round(time.perf_counter() - t0, 1)
            row["peak_ram_gb"] = round(_peak_gb(), 2)
            if torch.cuda.is_available():
                row["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
            self.rows.append(row)
            print(f"   {row['seconds']} s, peak RAM {row['peak_ram_gb']} GB", flush=True)

    def markdown(self) -> str:
        lines = ["| stage | wall (s) | peak RAM (GB) | notes |", "| --- | --- | --- | --- |"]
        for r in self.rows:
            notes = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("stage", "seconds", "peak_ram_gb"))
            lines.append(f"| {r['stage']} | {r['seconds']} | {r['peak_ram_gb']} | {notes} |")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ Params / Ops
def _weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def complexity(model: nn.Module, size: int, rank: int, device: str = "cpu") -> dict:
    """Parameters and multiply-accumulates of ``model`` on one size×size image, split into what the
    quantizers act on (Conv2d / Linear weights and their MACs) and the rest; plus the parameters and
    MACs a rank-``rank`` low-rank branch per layer adds. Runs on the meta device when asked (no memory)."""
    from torch.utils.flop_counter import FlopCounterMode

    layers = _weight_layers(model)
    q_macs, branch_macs = {}, {}

    def hook(name):
        def fn(mod, args, out):
            w = mod.weight
            fan_in = w[0].numel()
            r = min(rank, w.shape[0], fan_in)
            positions = out.numel() // w.shape[0]
            q_macs[name] = q_macs.get(name, 0) + positions * w.shape[0] * fan_in
            branch_macs[name] = branch_macs.get(name, 0) + positions * (r * fan_in + w.shape[0] * r)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    x = torch.zeros(1, 3, size, size, device=device)  # a meta tensor on "meta": shapes only
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    q_params = sum(m.weight.numel() for m in layers.values())
    branch_params = sum(min(rank, m.weight.shape[0], m.weight[0].numel()) * (m.weight[0].numel() + m.weight.shape[0])
                        for m in layers.values())
    return {"params": sum(p.numel() for p in model.parameters()), "q_params": q_params,
            "branch_params": branch_params, "macs": counter.get_total_flops() // 2, "q_macs": sum(q_macs.values()),
            "branch_macs": sum(branch_macs.values()), "layers": len(layers), "size": size, "rank": rank}


def equivalent(c: dict, w_bits: int, a_bits: int) -> tuple[float, float]:
    """(params in M, ops in G) at W<w>A<a>, parameter-equivalent (see the module docstring)."""
    if w_bits >= 32:
        return c["params"] / 1e6, c["macs"] / 1e9
    params = c["params"] - c["q_params"] * (1 - w_bits / 32) + c["branch_params"]
    ops = c["macs"] - c["q_macs"] * (1 - max(w_bits, a_bits) / 32) + c["branch_macs"]
    return params / 1e6, ops / 1e9


def table(entries: list[tuple[str, dict]]) -> str:
    lines = ["| Model | Input | Bits | Params (M) | Ops (G) |", "| --- | --- | --- | --- | --- |"]
    for name, c in entries:
        p_fp, o_fp = equivalent(c, 32, 32)
        for i, (w, a) in enumerate(BITS_ROWS):
            p, o = equivalent(c, w, a)
            first = i == 0
            params = f"{p:.2f}" if first else f"{p:.2f} (−{100 * (1 - p / p_fp):.2f}%)"
            ops = f"{o:.2f}" if first else f"{o:.2f} (−{100 * (1 - o / o_fp):.2f}%)"
            size = f"{c['size']}×{c['size']}" if first else ""
            bits = "FP" if w >= 32 else f"W{w}A{a}"
            lines.append(f"| {name if first else ''} | {size} | {bits} | {params} | {ops} |")
    return "\n".join(lines)


def build_random(config: dict, device: str = "meta", alpha_bar: float = 0.1955):
    """The OSDFace restorer from config dicts with random weights (meta: shapes only, no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from quantface.models.osdface import OSDFaceSpec, PromptProjection, VisualEmbedder, assemble

    with torch.device(device):
        unet = UNet2DConditionModel(**config["unet"])
        vae = AutoencoderKL(**config["vae"])
        embedder, projection = VisualEmbedder(config["embedder"]), PromptProjection(config["embedder"])
        spec = OSDFaceSpec(sd_path="(random)", osdface_ckpt="(random)", working_size=config["size"],
                           embedder_resolution=config["embedder"].resolution, gradient_checkpointing=False)
        return assemble(unet, vae, embedder, projection, alpha_bar, spec)


def parts(model: nn.Module) -> dict[str, float]:
    return {name: sum(p.numel() for p in getattr(model, name).parameters()) / 1e6
            for name in ("unet", "vae", "embedder", "prompt_proj")}


def tables(rank: int, reference_size: int | None) -> tuple[str, dict]:
    from quantface.models import load_model

    ref = load_model("reference")
    c_ref = complexity(ref, reference_size or ref.config.working_size, rank)
    full = build_random(FULL, "meta")
    c_full = complexity(full, FULL["size"], rank, device="meta")
    text = table([("reference (embedded weights)", c_ref), ("OSDFace (SD 2.1-base + VRE)", c_full)])
    split = ", ".join(f"{k} {v:.2f} M" for k, v in parts(full).items())
    info = {"reference": c_ref, "osdface_full": c_full, "osdface_parts_m": parts(full)}
    return (f"{text}\n\nQD-LoRA branch rank {rank} (2r) counted in FP. Full-size parameters by part: {split}; "
            f"quantizable layers: reference {c_ref['layers']}, OSDFace {c_full['layers']}."), info


# --------------------------------------------------------------------------------------- pipeline
def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def time_interleaved(graphs: dict[str, Path], size: int, rounds: int, stages: Stages) -> dict:
    """ONNX Runtime CPU latency of each graph at size², interleaved: each round times every graph in
    turn, each in a process of its own (``tools/time_graph.py``: one warm-up run, one timed run). One
    process for all of them does not fit in 24 GB: its RSS does not come back down between full-size
    sessions (measured: killed at 24 GB on the third). Returns per-graph seconds (median over rounds)
    and the ratios FP32 time / graph time (> 1: faster than FP32), each round's ratio computed within it."""
    import subprocess
    import statistics

    script = Path(__file__).resolve().parent / "time_graph.py"
    times: dict[str, list[float]] = {name: [] for name in graphs}
    for k in range(rounds):
        for name, path in graphs.items():
            with stages.stage(f"onnxruntime {name} round {k + 1}", size=size) as row:
                done = subprocess.run([sys.executable, str(script), str(path), str(size)], check=True,
                                      capture_output=True, text=True)
                r = json.loads(done.stdout.strip().splitlines()[-1])
                row["inference_s"] = round(r["seconds"], 3)
                row["finite"] = r["finite"]
                row["timing_process_peak_gb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2, 2)
                times[name].append(r["seconds"])
    result = {"seconds": {n: statistics.median(t) for n, t in times.items()}, "rounds": rounds}
    if "fp32" in times:
        result["speed_vs_fp32"] = {n: statistics.median([f / g for f, g in zip(times["fp32"], t)])
                                   for n, t in times.items()}
    print("latency (ONNX Runtime CPU, interleaved, median of", rounds, "rounds): "
          + ", ".join(f"{n} {result['seconds'][n]:.1f} s" + (f" ({result['speed_vs_fp32'][n]:.2f}x FP32 speed)"
                                                              if "speed_vs_fp32" in result else "")
                      for n in graphs), flush=True)
    return result


def pipeline(args, config: dict, stages: Stages) -> dict:
    from quantface.calibration import CalibConfig, calibrate
    from quantface.export import ExportConfig, export_onnx
    from quantface.data import shipped_faces, write_image
    from quantface.device import resolve_device
    from quantface.models import load_model
    from quantface.models.osdface import osdface_weights
    from quantface.models.osdface_synthetic import write_checkpoints
    from quantface.pipeline import images_to_tensor

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_osdface_"))
    work.mkdir(parents=True, exist_ok=True)
    size = config["size"]
    out: dict = {"work": str(work)}
    try:
        sd, ckpt = work / "ckpt" / "sd", work / "ckpt" / "osdface"
        if (sd / "unet" / "config.json").is_file() and (ckpt / "associate_2.ckpt").is_file():
            print(f"== reusing the random checkpoints in {work / 'ckpt'}")
        else:
            with stages.stage("write random checkpoints") as row:
                sd, ckpt = write_checkpoints(work / "ckpt", config["unet"], config["vae"], config["embedder"], seed=0,
                                             lora_rank=args.lora_rank)
                row["disk_gb"] = round(_dir_bytes(work / "ckpt") / 1e9, 2)
        spec = osdface_weights(sd, ckpt, working_size=size, embedder_resolution=config["embedder"].resolution)
        faces, _ = shipped_faces(size)
        for i, face in enumerate(faces[: args.images]):
            write_image(work / "faces" / f"{i:03d}.png", face)

        device = str(resolve_device(args.device))
        with stages.stage("load + FP forward", device=device, size=size) as row:
            model = load_model("osdface", spec)
            out["params"] = sum(p.numel() for p in model.parameters())
            out["fp32_bytes"] = out["params"] * 4
            row["params_m"] = round(out["params"] / 1e6, 2)
            x = images_to_tensor(faces[:1]).to(device)
            model = model.to(device)
            with torch.inference_mode():
                t0 = time.perf_counter()
                model(x)
                row["forward_s"] = round(time.perf_counter() - t0, 1)
            del model, x
        if args.stop_after == "load":
            return out

        calib_size = args.calib_size or size
        with stages.stage("calibrate", method="quantface", bits=args.bits, images=args.images, steps=args.steps,
                          size=calib_size) as row:
            cfg = CalibConfig(method="quantface", bits=args.bits, data=str(work / "faces"), out=str(work / "recipe"),
                              model="osdface", weights=spec, size=calib_size, limit=args.images,
                              stat_images=args.images,
                              steps=args.steps, batch_size=1, rank=args.rank, device=device)
            result = calibrate(cfg)
            recipe = result.recipe
            row["recipe_mb"] = round(_dir_bytes(recipe) / 1e6, 1)
            del result
        if args.stop_after == "calibrate":
            return out

        graphs = {}
        with stages.stage("export fp32", exporter="dynamo") as row:
            path = work / "onnx" / "osdface_fp32.onnx"
            r = export_onnx(ExportConfig(model="osdface", weights=spec, out=str(path)))
            row["file_mb"] = round(r.bytes / 1e6, 1)
            row["external_data"] = path.with_name(path.name + ".data").is_file()
            out["fp32_onnx_bytes"] = r.bytes
            graphs["fp32"] = path
        for profile in ("reference", "ort-cpu"):
            path = work / "onnx" / f"osdface_{profile}.onnx"
            with stages.stage(f"export {profile}", exporter="dynamo") as row:
                r = export_onnx(ExportConfig(model="osdface", weights=spec, recipe=str(recipe), profile=profile,
                                             out=str(path)))
                row["file_mb"] = round(r.bytes / 1e6, 1)
                row["vs_fp32"] = f"{r.bytes / out['fp32_bytes']:.3f}x"
                out[f"{profile}_bytes"] = r.bytes
            graphs[profile] = path
        out["timing"] = time_interleaved(graphs, size, args.rounds, stages)
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table-only", action="store_true", help="only the Params/Ops table (no pipeline)")
    p.add_argument("--dry-run", action="store_true", help="run every stage on a tiny model (minutes)")
    p.add_argument("--instantiate", action="store_true",
                   help="with --table-only: also build the full-size model with random weights on the CPU (~4 GB)")
    p.add_argument("--work", default=None, help="folder for checkpoints, recipe and exports (kept, and its "
                                               "checkpoints reused by the next run); default: a temporary "
                                               "folder, removed at the end unless --keep")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--images", type=int, default=2, help="calibration images (shipped faces)")
    p.add_argument("--steps", type=int, default=4, help="QD-LoRA distillation steps")
    p.add_argument("--bits", default="W4A4")
    p.add_argument("--calib-size", type=int, default=None,
                   help="calibration image side (default: the working size, 512); a multiple of 64. Smaller "
                        "sizes cut the distillation's activation memory; the embedder always sees 512×512")
    p.add_argument("--rank", type=int, default=8, help="QuantFace r (branches merge to rank 2r)")
    p.add_argument("--lora-rank", type=int, default=16, help="rank of the random OSDFace LoRA (OSDFace: 16)")
    p.add_argument("--reference-size", type=int, default=None, help="input side for the reference model's row")
    p.add_argument("--device", default="auto", help="device of the FP forward and calibration stages: auto, cpu, "
                                                    "cuda or cuda:N (default auto: CUDA when available)")
    p.add_argument("--stop-after", default=None, choices=["load", "calibrate"],
                   help="end the pipeline after this stage (e.g. check the full-size load and FP forward)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds of the three graphs")
    p.add_argument("--json", default=None, help="write all numbers here")
    args = p.parse_args(argv)

    report: dict = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    text, info = tables(2 * args.rank, args.reference_size)
    report["tables"] = info
    print(text, flush=True)
    print(f"(tables: {time.perf_counter() - t0:.1f} s)")
    stages = Stages()
    if args.table_only:
        if args.instantiate:
            with stages.stage("instantiate full size (random, CPU)") as row:
                model = build_random(FULL, "cpu")
                row["params_m"] = round(sum(q.numel() for q in model.parameters()) / 1e6, 2)
                row["fp32_gb"] = round(sum(q.numel() * q.element_size() for q in model.parameters()) / 1e9, 2)
                del model
            print(stages.markdown())
    else:
        config = TINY if args.dry_run else FULL
        report["pipeline"] = pipeline(args, config, stages)
        print(stages.markdown())
        peak = max(r["peak_ram_gb"] for r in stages.rows)
        verdict = "within" if peak < RAM_BUDGET_GB else "OVER"
        print(f"peak RAM {peak:.2f} GB: {verdict} the {RAM_BUDGET_GB:.0f} GB budget"
              + ("" if stages.resettable else " (lifetime peak: per-stage reset unavailable)"))
    report["stages"] = stages.rows
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
