"""``quantface`` command line: parse, build a typed config, call one library function.

User mistakes (bad paths, unreadable files, out-of-range options) print one ``error:`` line and exit
with status 2; nothing here is imported by library code.
"""

from __future__ import annotations

import argparse
import sys

from quantface import __version__
from quantface.device import HELP as DEVICE_HELP
from quantface.errors import ConfigError, QuantFaceError
from quantface.models import MODEL_NAMES
from quantface.verdict import MIN_PARITY_FP32, MIN_PARITY_QUANTIZED


def _add_model_args(p: argparse.ArgumentParser, onnx: bool = True) -> None:
    p.add_argument("--model", default="reference", choices=MODEL_NAMES, help="network to run (default: reference)")
    p.add_argument("--weights", default=None,
                   help="weights stem overriding the embedded ones: <stem>.safetensors + <stem>.json")
    p.add_argument("--recipe", default=None, help="calibration recipe folder: run the fake-quant model")
    p.add_argument("--device", default="auto", help=f"where the PyTorch model runs: {DEVICE_HELP}")
    _add_osdface_args(p)
    if onnx:
        p.add_argument("--onnx", default=None, help="exported ONNX graph: run it with ONNX Runtime (CPU)")


def _add_osdface_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sd-path", default=None,
                   help="--model osdface: Stable Diffusion 2.1-base folder, diffusers layout (unet/, vae/, scheduler/)")
    p.add_argument("--osdface-ckpt", default=None, help="--model osdface: OSDFace checkpoint folder "
                   "(pytorch_lora_weights.safetensors, embedding_change_weights.pth, associate_2.ckpt)")


def _weights(a: argparse.Namespace) -> str | None:
    """--weights, or for --model osdface the checkpoint spec built from --sd-path/--osdface-ckpt."""
    if a.model != "osdface":
        if a.sd_path or a.osdface_ckpt:
            raise ConfigError("--sd-path and --osdface-ckpt only apply to --model osdface")
        return a.weights
    if a.weights and (a.sd_path or a.osdface_ckpt):
        raise ConfigError("give --sd-path/--osdface-ckpt or a --weights JSON spec, not both")
    if a.weights:
        return a.weights
    if not (a.sd_path and a.osdface_ckpt):
        raise ConfigError("--model osdface needs both --sd-path and --osdface-ckpt")
    from quantface.models.osdface import osdface_weights

    return osdface_weights(a.sd_path, a.osdface_ckpt)


def _model_spec(a: argparse.Namespace):
    from quantface.jobs import ModelSpec

    onnx = None if a.command == "validate" else a.onnx  # validate's --onnx is the graph under test
    return ModelSpec(name=a.model, weights=_weights(a), recipe=a.recipe, onnx=onnx, device=a.device)


def _cmd_restore(a: argparse.Namespace) -> int:
    from quantface.jobs import RestoreConfig, restore

    r = restore(RestoreConfig(input=a.input, output=a.output, model=_model_spec(a), size=a.size, crop=a.crop))
    if r.fallback:
        print(f"note: restoring centre crops, as with --crop: finding faces in photos needs the [faces] extra: "
              f"{r.fallback}", file=sys.stderr)
    for note in r.notes:
        print(f"note: {note}", file=sys.stderr)
    faces = f" ({r.faces} face(s) restored in place)" if r.faces else ""
    print(f"restored {len(r.written)} image(s) into {a.output}{faces}")
    if r.skipped:
        print(f"skipped {len(r.skipped)} unreadable file(s):", file=sys.stderr)
        for s in r.skipped:
            print(f"  {s}", file=sys.stderr)
    return 0


def _cmd_eval(a: argparse.Namespace) -> int:
    from quantface.jobs import EvalConfig, evaluate

    cfg = EvalConfig(data=a.data, json_out=a.json, model=_model_spec(a), limit=a.limit, seed=a.seed, size=a.size,
                     second_stage=a.second_stage, faces=not a.no_face_metrics, no_reference=a.no_reference)
    r = evaluate(cfg)
    if cfg.no_reference:
        print(f"n={r['n']}  restored: NIQE {r['niqe']:.3f}   input: NIQE {r['niqe_lq']:.3f}  "
              f"(at {r['niqe_side']}x{r['niqe_side']}, lower is better)")
    else:
        print(f"n={r['n']}  restored: PSNR {r['psnr']:.2f} dB  SSIM {r['ssim']:.4f}   "
              f"degraded input: PSNR {r['psnr_lq']:.2f} dB  SSIM {r['ssim_lq']:.4f}")
    _print_faces(r["faces"])
    if r["skipped"]:
        print(f"skipped {len(r['skipped'])} unreadable file(s):", file=sys.stderr)
        for s in r["skipped"]:
            print(f"  {s}", file=sys.stderr)
    if "psnr_to_fp" in r:
        print(f"vs FP model: PSNR {r['psnr_to_fp']:.2f} dB  SSIM {r['ssim_to_fp']:.4f}")
    if a.json:
        print(f"wrote {a.json}")
    return 0


def _print_faces(f: dict) -> None:
    if "skipped" in f:
        print(f"face metrics skipped: {f['skipped']}")
        return

    def fmt(v, digits=3):
        return "-" if v is None else f"{v:.{digits}f}"

    for suffix, ref in (("", "GT"), ("_to_fp", "FP model")):
        if f"face_detected{suffix}" not in f:
            continue
        missing = f[f"faces_missing{suffix}"]
        print(f"faces vs {ref}: identity distance {fmt(f[f'identity_distance{suffix}'])}, landmark distance "
              f"{fmt(f[f'landmark_distance{suffix}'], 4)} (x inter-ocular); face found in both for "
              f"{f[f'face_detected{suffix}']:.0%}, none in {missing[next(iter(missing))]} reference / "
              f"{missing['restored']} restored image(s) ({f['face_seconds_per_image']:.3f} s a face)")


def _mp_args(a: argparse.Namespace) -> dict:
    """The adaptive bit-width options as CalibConfig fields (unset ones keep the config's defaults)."""
    from quantface.errors import ConfigError

    given = {k: v for k, v in [("mp_candidates", a.mp_candidates), ("mp_epsilon", a.mp_epsilon),
                               ("mp_metric", a.mp_metric), ("mp_sweep_images", a.mp_sweep_images),
                               ("mp_cost", a.mp_cost), ("target", a.target),
                               ("mp_latency_budget", a.mp_latency_budget)] if v is not None}
    from quantface.calibration.targets import get_target

    if a.mp_latency_budget is not None and a.target != "qnn":
        raise ConfigError("--mp-latency-budget applies to --target qnn")
    # --mp-sweep-images also sets the images a --rank-budget program measures its errors on.
    bit_only = {k: v for k, v in given.items() if not (k == "mp_sweep_images" and a.rank_budget != 1.0)}
    if a.mp_budget is None and bit_only and get_target(a.target).default_budget is None:
        flag = "--" + next(iter(bit_only)).replace("_", "-")
        raise ConfigError(f"{flag} only applies to adaptive bit widths; give --mp-budget too")
    if a.mp_candidates is not None:
        if get_target(a.target).candidates_refusal:
            raise ConfigError(get_target(a.target).candidates_refusal)
    if a.mp_candidates is not None:
        parts = [p.strip() for p in a.mp_candidates.split(",")]
        if not all(p.isdigit() for p in parts):
            raise ConfigError(f"--mp-candidates {a.mp_candidates!r} must be comma-separated bit widths, e.g. 3,4,5,6")
        given["mp_candidates"] = tuple(int(p) for p in parts)
    return {"mp_budget": a.mp_budget, **given}


def _cmd_calibrate(a: argparse.Namespace) -> int:
    from quantface.calibration import CalibConfig, calibrate

    cfg = CalibConfig(method=a.method, bits=a.bits, data=a.data, out=a.out, model=a.model, weights=_weights(a),
                      seed=a.seed, size=a.size, limit=a.limit, stat_images=a.stat_images, rank=a.rank, alpha=a.alpha,
                      rotate_min_channels=a.rotate_min_channels,
                      steps=a.steps, trq_steps=a.trq_steps, e2e_steps=a.e2e_steps, timestep_lr=a.timestep_lr,
                      lba_steps=a.lba_steps, lba_lr=a.lba_lr,
                      batch_size=a.batch_size, lr=a.lr, scale_lr=a.scale_lr, lora_lr=a.lora_lr,
                      fold_lowrank=a.fold_lowrank, reduce_range=a.reduce_range, branch_bits=a.branch_bits,
                      weight_rounding=a.weight_rounding,
                      lpips_backbone=a.lpips_backbone, lpips_lin=a.lpips_lin, lpips_net=a.lpips_net,
                      fp_layers=tuple(a.fp_layers), resume=not a.no_resume, threads=a.threads, device=a.device,
                      rank_budget=a.rank_budget, rank_cost=a.rank_cost, rank_error=a.rank_error,
                      rank_time_budget=a.rank_time_budget, rank_errors_from=a.rank_errors_from,
                      **_mp_args(a))
    calibrate(cfg)
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from quantface.jobs import DemoConfig, demo

    spec = _model_spec(a)
    if spec.quantized:  # the FP demo runs the FP model; the full demo calibrates its own recipe
        what = "--fp-only restores the shipped faces with the FP model" if a.fp_only else \
            "demo calibrates, exports and validates its own recipe"
        raise ConfigError(f"{what}; --recipe and --onnx do not apply to demo (quantface restore or eval "
                          f"--recipe/--onnx run a recipe or a graph)")
    if not a.fp_only:
        from quantface.chain import ChainConfig, run_chain

        s = run_chain(ChainConfig(out=a.out, model=spec, seed=a.seed, steps=a.steps, calib_faces=a.calib_faces,
                                  threads=a.threads, package=not a.no_package))
        return 0 if s["passed"] else 1  # the summary lines, printed last, say why
    s = demo(DemoConfig(out=a.out, model=spec, seed=a.seed))
    print(f"restored {len(s['faces'])} shipped faces ({', '.join(s['faces'])}) with the FP model")
    print(f"astronaut (synthetically degraded, seed {a.seed}): input PSNR {s['astronaut_psnr_input']:.2f} dB "
          f"SSIM {s['astronaut_ssim_input']:.4f} -> restored PSNR {s['astronaut_psnr_restored']:.2f} dB "
          f"SSIM {s['astronaut_ssim_restored']:.4f}")
    print(f"before/after grid: {s['grid']} (input | FP | GT)")
    return 0


def _cmd_export(a: argparse.Namespace) -> int:
    from quantface.export import ExportConfig, export_onnx

    if a.fp32 and a.recipe:
        print("error: --fp32 exports the unquantized model; drop --recipe or --fp32", file=sys.stderr)
        return 2
    if not a.fp32 and not a.recipe:
        print("error: give --recipe RECIPE_DIR (or --fp32 for the unquantized baseline graph)", file=sys.stderr)
        return 2
    r = export_onnx(ExportConfig(model=a.model, weights=_weights(a), recipe=a.recipe, profile=a.profile, out=a.out,
                                 size=a.size, batch=a.batch, rotation=not a.no_rotation, exporter=a.exporter))
    counts = ", ".join(f"{k} {v}" for k, v in sorted(r.node_counts.items()) if v)
    print(f"wrote {r.path} ({r.bytes / 1e6:.2f} MB, profile {a.profile if a.recipe else 'fp32'}): {counts}")
    return 0


def _cmd_validate(a: argparse.Namespace) -> int:
    from quantface.validate import ValidateConfig, validate

    r = validate(ValidateConfig(onnx=a.onnx, data=a.data, model=_model_spec(a), limit=a.limit, seed=a.seed,
                                threads=a.threads, repeats=a.repeats, json_out=a.json, ep=a.ep,
                                htp_limit=a.htp_limit, soc=a.soc, min_parity=a.min_parity))
    c = r["compared"]
    if c["recipe"]:
        print(f"compared: {c['profile']} graph {c['onnx']} with the fake-quant PyTorch model of recipe {c['recipe']} "
              f"(sha256 {c['recipe_sha256'][:12]}…, the graph's) on {c['fp_model']['name']} "
              f"({c['fp_model']['weights']} weights)")
    else:
        print(f"compared: FP32 graph {c['onnx']} with the FP PyTorch model {c['fp_model']['name']} "
              f"({c['fp_model']['weights']} weights)")
    print(f"parity ONNX vs PyTorch: PSNR {r['parity_psnr']:.2f} dB, max-abs {r['parity_max_abs']:.2e} (n={r['n']})")
    if "htp" in r:
        h = r["htp"]
        print(f"QNN HTP ({h['soc']}, emulated): {h['nodes_on_qnn']}/{h['nodes_total']} nodes on the HTP in "
              f"{h['qnn_partitions']} partition(s), {h['nodes_on_cpu']} on the CPU")
        for node in h["cpu_nodes"]:
            print(f"  cpu: {node['op_type']} {node['name']}: {node['reason'] or '(no reason logged)'}")
        print(f"parity HTP vs PyTorch: PSNR {h['parity_psnr_to_torch']:.2f} dB, max-abs "
              f"{h['parity_max_abs_to_torch']:.2e}; HTP vs CPU EP: PSNR {h['parity_psnr_to_cpu']:.2f} dB, max-abs "
              f"{h['parity_max_abs_to_cpu']:.2e} (n={h['n']}, {h['emulated_seconds_per_face']:.1f} s a face)")
    print(f"quality: PSNR {r['psnr']:.2f} dB SSIM {r['ssim']:.4f} to GT; PSNR {r['psnr_to_fp']:.2f} dB to FP")
    print(f"latency: {r['latency_ms_median']:.1f} ms median (batch {r['latency_batch']}, {r['threads']} threads); "
          f"size: {r['file_bytes'] / 1e6:.2f} MB")
    if a.json:
        print(f"wrote {a.json}")
    if not r["passed"]:
        saturated = r["saturating_w8a8_layers"]
        why = (f"; {len(saturated)} of its layers have full-range W8A8 codes, which this CPU's U8S8 integer kernels "
               f"saturate (x86 without VNNI): recalibrate with --reduce-range (7-bit weight codes) to run it exactly "
               f"here" if saturated else "")
        print(f"FAIL: parity {r['parity_psnr']:.2f} dB is below --min-parity {r['min_parity']:g} dB: the graph does "
              f"not compute what its PyTorch model does{why}", file=sys.stderr)
        return 1
    print(f"pass: parity {r['parity_psnr']:.2f} dB >= --min-parity {r['min_parity']:g} dB")
    return 0


def _cmd_package(a: argparse.Namespace) -> int:
    from quantface.package import PackageConfig, package

    socs = tuple(s for s in (a.qnn_context or "").split(",") if s.strip())
    if a.qnn_context is not None and not socs:
        raise ConfigError("--qnn-context needs at least one Snapdragon SoC, e.g. SM8650")
    r = package(PackageConfig(onnx=a.onnx, out=a.out, format=a.format, into_app=a.into_app, into_web=a.into_web,
                              qnn_context=socs))
    print(f"packaged {a.onnx} as {r.model} ({r.manifest.bytes / 1e6:.2f} MB, format {r.format}): {r.reason}")
    for c in r.manifest.qnn_contexts:
        print(f"QNN context for {c.soc} ({c.marketing}, soc_model {c.soc_model}, v{c.htp_arch}): "
              f"{c.model_file} + {c.binary_file} ({c.binary_bytes / 1e6:.2f} MB, compiled in "
              f"{c.compile_s:.1f} s; vs the plain graph on the HTP: max-abs {c.check_max_abs:.2e})")
    print(f"wrote {r.out / 'model.json'} and {r.out / 'required_operators.config'}")
    for target in r.copied_to:
        print(f"copied {r.model.name} + model.json into {target}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantface", description="QuantFace: low-bit one-step diffusion face "
                                     "restoration, from PyTorch calibration to a phone.")
    parser.add_argument("--version", action="version", version=f"quantface {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="main job on real faces shipped by scikit-image: restore, then calibrate (fast "
                                     "preset) → export → validate → package")
    _add_model_args(p)
    p.add_argument("--out", default="quantface-demo", help="output folder (default: quantface-demo)")
    p.add_argument("--seed", type=int, default=0, help="degradation seed")
    p.add_argument("--steps", type=int, default=40, help="distillation steps of the fast calibration preset")
    p.add_argument("--calib-faces", type=int, default=32, help="LFW faces used for calibration")
    p.add_argument("--threads", type=int, default=2, help="threads for calibration and ONNX Runtime")
    p.add_argument("--no-package", action="store_true", help="skip packaging for the Android app and the web demo")
    p.add_argument("--fp-only", action="store_true", help="only restore the shipped faces with the FP model")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("restore", help="restore a face image or a folder of them")
    _add_model_args(p)
    p.add_argument("--input", required=True, help="image file or folder")
    p.add_argument("--output", required=True, help="output folder (PNG files, same names)")
    p.add_argument("--size", type=int, default=None, help="working size in pixels (default: the model's)")
    p.add_argument("--crop", action="store_true",
                   help="restore the centre crop at the working size (as the phone app does) instead of finding "
                        "the faces in each photo and pasting them back (that needs quantface[faces])")
    p.set_defaults(func=_cmd_restore)

    p = sub.add_parser("eval", help="degrade HQ faces (seeded), restore them, report PSNR/SSIM")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="folder of high-quality faces")
    p.add_argument("--limit", type=int, default=None, help="use the first N images (sorted by name)")
    p.add_argument("--seed", type=int, default=0, help="degradation seed")
    p.add_argument("--size", type=int, default=None, help="working size in pixels (default: the model's)")
    p.add_argument("--second-stage", action="store_true", help="two-stage degradation")
    p.add_argument("--no-reference", action="store_true",
                   help="--data holds real low-quality faces without GT: restore them as they are and score NIQE "
                        "(and, for a quantized model, identity distance to the FP model's output); needs "
                        "quantface[faces]")
    p.add_argument("--no-face-metrics", action="store_true",
                   help="skip the identity / landmark metrics (quantface[faces]) even when installed")
    p.add_argument("--json", default=None, help="write the results here")
    p.set_defaults(func=_cmd_eval)

    from quantface.calibration import METHODS, CalibConfig
    from quantface.calibration.config import (BITS_FORMS, DEFAULT_EPSILON, FOLD_MIN_WEIGHT_BITS, FOLD_POLICIES, RANK_COSTS,
                                            RANK_ERRORS)
    from quantface.calibration.methods import DEFAULT_STEPS
    from quantface.calibration.targets import CPU_DEFAULT_BUDGET, QNN_DEFAULT_BUDGET, QNN_DEFAULT_LATENCY
    from quantface.config import SHIPPED_LFW

    d = CalibConfig()
    steps_by_refine: dict = {}
    for m in METHODS.values():
        steps_by_refine.setdefault(m.refine, []).append(m.name)
    steps_help = "; ".join(f"{DEFAULT_STEPS[r]} for {', '.join(names)}" for r, names in steps_by_refine.items() if r)
    p = sub.add_parser("calibrate", help="calibrate a quantized model and write its recipe")
    p.add_argument("--model", default="reference", choices=MODEL_NAMES, help="network to calibrate (default: %(default)s)")
    p.add_argument("--weights", default=None, help="weights stem overriding the embedded ones")
    _add_osdface_args(p)
    p.add_argument("--method", default=d.method, choices=list(METHODS), help="calibration method (default: %(default)s)")
    p.add_argument("--bits", default=d.bits, help=f"{BITS_FORMS}; any other form is refused (default: %(default)s)")
    p.add_argument("--data", default=d.data,
                   help=f"folder of HQ calibration faces (degraded with --seed), or {SHIPPED_LFW} for the 200 LFW "
                        f"faces scikit-image ships, as quantface demo uses (default: %(default)s, the data set "
                        f"beside a checkout)")
    p.add_argument("--out", required=True, help="recipe folder to write")
    p.add_argument("--steps", type=int, default=None,
                   help=f"refinement steps (default per method: {steps_help}; the others do not train)")
    from quantface.calibration.methods import E2E_STEPS, LBA_STEPS, TRQ_STEPS

    p.add_argument("--trq-steps", type=int, default=None,
                   help=f"qartsr: end-to-end steps of timestep retraining (default: {TRQ_STEPS})")
    p.add_argument("--e2e-steps", type=int, default=None,
                   help=f"qartsr: steps of the extended end-to-end stage (default: {E2E_STEPS})")
    p.add_argument("--timestep-lr", type=float, default=d.timestep_lr,
                   help="qartsr: learning rate of the tuned timestep, in timestep units (default: %(default)s)")
    p.add_argument("--lba-steps", type=int, default=None,
                   help=f"quantvsr: steps of the learnable-bias-alignment stage (default: {LBA_STEPS})")
    p.add_argument("--lba-lr", type=float, default=d.lba_lr,
                   help="quantvsr: learning rate of the aligned biases (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="degradation and initialisation seed (default: %(default)s)")
    p.add_argument("--size", type=int, default=None, help="working size (default: the model's)")
    p.add_argument("--limit", type=int, default=None, help="use the first N calibration images (default: all)")
    p.add_argument("--stat-images", type=int, default=d.stat_images,
                   help="images for statistics and ranges (default: %(default)s)")
    p.add_argument("--rank", type=int, default=d.rank,
                   help="low-rank r (QD-LoRA: r + r, merged to 2r; default: %(default)s)")
    p.add_argument("--alpha", type=float, default=d.alpha, help="smoothing migration strength (default: %(default)s)")
    p.add_argument("--rotate-min-channels", type=int, default=d.rotate_min_channels,
                   help="layers with fewer input channels are not rotated (default %(default)s: not the RGB input)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="distillation batch size (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr,
                   help="learning rate of the SVD-initialised low-rank branches (default: %(default)s)")
    p.add_argument("--lora-lr", type=float, default=d.lora_lr,
                   help="learning rate of the LoRA-initialised branches (zero-init up factor; default: %(default)s)")
    p.add_argument("--scale-lr", type=float, default=d.scale_lr,
                   help="learning rate of quantizer scales (default: %(default)s)")
    p.add_argument("--fold-lowrank", default=d.fold_lowrank, choices=list(FOLD_POLICIES),
                   help=f"fold the merged low-rank branch into the weight before its codes are fixed: auto = where "
                        f"weights have >= {FOLD_MIN_WEIGHT_BITS} bits (no float branch left; default), never, always")
    p.add_argument("--weight-rounding", default=None, choices=["nearest", "gptq"],
                   help="weight codes: round to nearest on the searched scales, or GPTQ (each layer's rounding errors "
                        "compensated under its input statistics; layers with no float branch left) (default: gptq "
                        "for quantface, nearest for the other methods)")
    p.add_argument("--reduce-range", action="store_true",
                   help="8-bit weights (--bits W8Ax, or the W8 layers of --target cpu) as 7-bit codes in their INT8 "
                        "container (ONNX Runtime's reduce_range): exact "
                        "ort-cpu results on x86 CPUs without VNNI, whose U8S8 kernels saturate with full-range "
                        "W8A8 codes; not needed on ARM, VNNI CPUs or the HTP")
    p.add_argument("--branch-bits", type=int, default=None,
                   help="low-rank branch factors on a symmetric integer grid of this many bits (2-8, one scale per "
                        "row), trained through it and stored as integer codes: an INT8 branch is half a float16 one "
                        "(default: float16 factors)")
    p.add_argument("--lpips-backbone", default=None, help="local LPIPS backbone weights (perceptual loss)")
    p.add_argument("--lpips-lin", default=None, help="local LPIPS linear-head weights")
    p.add_argument("--lpips-net", default=d.lpips_net, choices=["vgg", "alex"],
                   help="LPIPS backbone kind (default: %(default)s)")
    p.add_argument("--fp-layers", nargs="*", default=[],
                   help="glob patterns of layers kept in full precision (default: none)")
    p.add_argument("--no-resume", action="store_true", help="ignore an interrupted run's checkpoint")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default=d.device, help=f"where calibration runs: {DEVICE_HELP} (default: %(default)s)")
    g = p.add_argument_group("per-layer low-rank branch ranks (calibration.ranks)")
    g.add_argument("--rank-budget", type=float, default=d.rank_budget,
                   help="fraction of the uniform branches' cost (--rank-cost) shared among the layers by an integer "
                        "program, each layer's rank one of 0,2,4,8,16,32 below its size (default %(default)s: the "
                        "uniform rank, capped below each layer's size; quantvsr: its STCA ranks within the uniform "
                        "branches' total)")
    g.add_argument("--rank-cost", default=d.rank_cost, choices=list(RANK_COSTS),
                   help="branch cost: its parameters, its multiply-accumulates per image, both, its modelled ONNX "
                        "Runtime CPU time (calibration.ranks.BRANCH_TIME_MS), parameters and time (each within the "
                        "budget), or the bytes it adds to the reference export (factors at --branch-bits; a "
                        "full-precision layer's float32 weight; default: %(default)s)")
    g.add_argument("--rank-time-budget", type=float, default=None,
                   help="with --rank-cost time or params+time: the time constraint's own fraction of the uniform "
                        "branches' modelled time (default: --rank-budget's)")
    g.add_argument("--rank-error", default=d.rank_error, choices=list(RANK_ERRORS),
                   help="each layer's error at a candidate rank: the change of the model output's squared error to FP "
                        "with that layer alone at that rank, or the layer's own output error (default: %(default)s)")
    g.add_argument("--rank-errors-from", default=None, metavar="RECIPE",
                   help="reuse the per-layer rank errors an earlier --rank-budget calibration measured (its recipe "
                        "folder; every setting the errors depend on must match): sweep --rank-budget, --rank-cost "
                        "or --rank-time-budget without measuring again")
    g = p.add_argument_group("adaptive bit widths (QuantFace-MP, calibration.mixed)")
    g.add_argument("--mp-budget", type=float, default=None,
                   help="allocate activation bits per layer: mean activation bits (e.g. 4.0), or with "
                        "--target qnn / cpu a fraction in (0, 1] of the all-W8 weight bytes")
    g.add_argument("--mp-latency-budget", type=float, default=None,
                   help="--target qnn: the latency proxy's budget (MACs x activation bits / 8), a multiple >= 1 of its "
                        "value with every layer at --bits' activations (default %.2f)" % QNN_DEFAULT_LATENCY)
    g.add_argument("--mp-candidates", default=None,
                   help=f"activation bit widths to choose from (default: {','.join(map(str, d.mp_candidates))})")
    g.add_argument("--mp-epsilon", type=float, default=None,
                   help="sensitivity-sweep deviation threshold (default per metric: "
                        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_EPSILON.items()) + ")")
    g.add_argument("--mp-metric", default=None, choices=["ssim", "psnr", "lpips"],
                   help=f"sweep deviation from the FP output (default: {d.mp_metric})")
    g.add_argument("--mp-sweep-images", type=int, default=None,
                   help=f"calibration images of the sweep and the layer errors (default: {d.mp_sweep_images})")
    g.add_argument("--mp-cost", default=None, choices=["elements", "bops"],
                   help=f"layer cost: bits x input elements, or bits x weight bits x MACs (default: {d.mp_cost})")
    g.add_argument("--target", default=None, choices=["qnn", "cpu"],
                   help="hardware-aware options, no smoothing, rotation or branch (every node integer), errors measured "
                        "on the image: qnn (Qualcomm HTP, --profile qnn) W4/W8 x A8/A16 at or above --bits, cost in "
                        "weight bytes (default --mp-budget %.2f of all-W8) and a latency proxy; cpu (ONNX Runtime's "
                        "CPU kernels, --profile ort-cpu) W4/W8 weights under A8, cost in weight bytes (default "
                        "--mp-budget %.2f)" % (QNN_DEFAULT_BUDGET, CPU_DEFAULT_BUDGET))
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("export", help="export a recipe (or the FP model) as a QDQ ONNX graph")
    p.add_argument("--model", default="reference", choices=MODEL_NAMES, help="network to export (default: %(default)s)")
    p.add_argument("--weights", default=None, help="weights stem overriding the embedded ones")
    _add_osdface_args(p)
    p.add_argument("--recipe", default=None, help="calibration recipe folder (this or --fp32 is required)")
    p.add_argument("--fp32", action="store_true", help="export the unquantized baseline graph")
    p.add_argument("--profile", default="reference", choices=["reference", "ort-cpu", "qnn"],
                   help="with --recipe: reference (INT4/UINT4 containers where the bits fit: the exact, compact graph), "
                        "ort-cpu (INT8/UINT8, QLinearConv on ONNX Runtime's CPU EP) or qnn (Qualcomm HTP) "
                        "(default: %(default)s)")
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.add_argument("--size", type=int, default=None, help="static input side (default: the model's working size)")
    p.add_argument("--batch", type=int, default=1, help="static batch size (default: %(default)s)")
    p.add_argument("--no-rotation", action="store_true",
                   help="leave out the Hadamard nodes (wrong outputs; only to measure their cost)")
    p.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"],
                   help="torch.onnx exporter: dynamo (default; torch.export, weights over 2 GB) or torchscript "
                        "(deprecated by torch, kept to compare with)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("validate", help="ONNX Runtime vs PyTorch on real faces: parity, quality, latency, size",
                       description="Compare an exported graph with the PyTorch model it came from: a quantized graph "
                                   "with the fake-quant model of --recipe, which must be the recipe it was exported "
                                   "from (its sha256 is in the graph); an FP32 graph with the FP model.")
    _add_model_args(p, onnx=False)
    p.add_argument("--onnx", required=True, help="the exported ONNX graph to validate")
    p.add_argument("--data", required=True, help="folder of HQ faces (degraded with --seed)")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    p.add_argument("--repeats", type=int, default=10, help="timed runs for the latency median")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--ep", default="cpu", choices=["cpu", "qnn-htp"],
                   help="qnn-htp: also run Qualcomm's QNN HTP backend (emulated; needs quantface[qnn]): "
                        "node placement and parity")
    p.add_argument("--htp-limit", type=int, default=2,
                   help="faces run on the emulated HTP (default 2; 25-50 s each at 128 px)")
    p.add_argument("--soc", default="SM8650", help="--ep qnn-htp: Snapdragon SoC the HTP backend targets")
    p.add_argument("--min-parity", type=float, default=None, metavar="DB",
                   help=f"exit 1 when parity ONNX vs PyTorch (CPU EP) is below DB dB (default: "
                        f"{MIN_PARITY_QUANTIZED:g} for a quantized graph, {MIN_PARITY_FP32:g} for an FP32 graph)")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("package", help="package an exported ONNX graph for the Android app and the browser demo")
    p.add_argument("--onnx", required=True, help="the exported ONNX graph (quantface export, --batch 1)")
    p.add_argument("--out", required=True,
                   help="folder to write: model.ort|onnx, model.json, required_operators.config")
    p.add_argument("--format", default="auto", choices=["auto", "ort", "onnx"],
                   help="auto (default): ORT format unless the model holds 4-bit tensors, then .onnx")
    p.add_argument("--into-app", action="store_true", help="also copy model + model.json into android_demo's assets")
    p.add_argument("--into-web", action="store_true", help="also copy model + model.json into android_demo/web/model")
    p.add_argument("--qnn-context", default=None, metavar="SOC[,SOC]",
                   help="also compile QNN HTP context binaries for these Snapdragon SoCs (e.g. SM8650,SM8550; "
                        "needs quantface[qnn])")
    p.set_defaults(func=_cmd_package)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QuantFaceError as exc:
        from quantface.distributed import report_error

        report_error(str(exc))  # under torchrun, rank 0's line only: the job prints it once
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["build_parser", "main"]
