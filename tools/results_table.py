"""Evaluate the FP model and every committed recipe on the test faces; write the paper-style table.

    python tools/results_table.py --recipes recipes --data ../shared/data/faces_hq/test --out docs/results.md

Each recipe is run through ``quantface eval`` (same degradation seed for all), so every row sees the
same degraded inputs. Writes the Markdown table and, beside it, the raw numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from quantface.data import atomic_write_bytes
from quantface.errors import exit_status
from quantface.jobs import EvalConfig, ModelSpec, evaluate

ORDER = ["minmax", "smoothquant", "hadamard", "svdquant", "efficientdm", "passionsr", "quantface"]
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


def build_table(recipes: Path, data: str, limit: int | None, seed: int) -> dict:
    rows = []
    fp = evaluate(EvalConfig(data=data, limit=limit, seed=seed))
    rows.append({"name": "FP", "bits": "W32A32", "psnr": fp["psnr"], "ssim": fp["ssim"], "psnr_to_fp": None,
                 "ssim_to_fp": None, "calib_seconds": None, "steps": None})
    metas = []
    for d in sorted(p for p in recipes.iterdir() if (p / "recipe.json").is_file()):
        metas.append((json.loads((d / "recipe.json").read_text()), d))
    for meta, d in sorted(metas, key=lambda m: _sort_key(m[0])):
        r = evaluate(EvalConfig(data=data, limit=limit, seed=seed, model=ModelSpec(recipe=str(d))))
        name, bits = _label(meta)
        rows.append({"name": name, "recipe": d.name, "bits": bits, "psnr": r["psnr"],
                     "ssim": r["ssim"], "psnr_to_fp": r["psnr_to_fp"], "ssim_to_fp": r["ssim_to_fp"],
                     "calib_seconds": meta["stats"].get("calibration_seconds"),
                     "steps": meta["stats"].get("steps") or None})  # 0: no training
        print(f"{d.name}: PSNR {r['psnr']:.2f} SSIM {r['ssim']:.4f} to-FP {r['psnr_to_fp']:.2f}")
    return {"n": fp["n"], "data": data, "seed": seed, "psnr_lq": fp["psnr_lq"], "ssim_lq": fp["ssim_lq"], "rows": rows}


def to_markdown(t: dict) -> str:
    def f(v, digits):
        return "–" if v is None else f"{v:.{digits}f}"

    lines = [
        "# Results: the reference model quantized by every method",
        "",
        f"`tools/results_table.py` on {t['n']} test faces (`{t['data']}`, degradation seed {t['seed']}, "
        "128×128). To GT: against the HQ face; to FP: against the full-precision model's output.",
        "",
        "| Method | Bits | PSNR ↑ | SSIM ↑ | PSNR to FP ↑ | SSIM to FP ↑ | training steps | calibration (s) "
        "| recipe |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| degraded input | – | {t['psnr_lq']:.2f} | {t['ssim_lq']:.4f} | – | – | – | – | – |",
    ]
    for r in t["rows"]:
        lines.append(f"| {r['name']} | {r['bits']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {f(r['psnr_to_fp'], 2)} | "
                     f"{f(r['ssim_to_fp'], 4)} | {r['steps'] or '–'} | {f(r['calib_seconds'], 0)} | "
                     f"{r.get('recipe', '–')} |")
    lines += ["", "Training steps: distillation steps on batches of calibration images (QuantFace, EfficientDM); "
              "PassionSR's are optimiser steps per layer (module-wise); 0 or – means no training."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default="recipes", help="folder of recipe folders")
    p.add_argument("--data", default="../shared/data/faces_hq/test")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/results.md")
    a = p.parse_args(argv)
    return exit_status(lambda: write_table(build_table(Path(a.recipes), a.data, a.limit, a.seed), Path(a.out)))


def write_table(table: dict, out: Path) -> None:
    atomic_write_bytes(out, to_markdown(table).encode())
    atomic_write_bytes(out.with_suffix(".json"), (json.dumps(table, indent=1) + "\n").encode())
    print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    raise SystemExit(main())
