"""Calibrate the committed recipe set: QuantFace at W6A6, W4A6, W4A4 and every baseline at W4A4.

    python tools/calibrate_all.py --data ../shared/data/faces_hq/calib --out recipes

Every run uses the same calibration images, seed, step budget (``--steps`` for the methods that
train) and learning rates (CalibConfig's defaults: ``--lr`` 1e-5, ``--lora-lr`` 1e-3, ``--scale-lr`` 1e-4).
Each recipe records its own configuration and calibration time.
Existing recipe folders are skipped unless ``--force``; then run ``tools/results_table.py`` for the table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from quantface.calibration import METHODS, CalibConfig, calibrate
from quantface.errors import exit_status

RUNS = [("quantface", "W6A6"), ("quantface", "W4A6"), ("quantface", "W4A4")] + [
    (m, "W4A4") for m in METHODS if m != "quantface"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/faces_hq/calib")
    p.add_argument("--out", default="recipes")
    p.add_argument("--steps", type=int, default=None, help="refinement steps (default per method)")
    p.add_argument("--lr", type=float, default=CalibConfig.lr, help="SVD-initialised branches")
    p.add_argument("--lora-lr", type=float, default=CalibConfig.lora_lr, help="LoRA-initialised branches")
    p.add_argument("--scale-lr", type=float, default=CalibConfig.scale_lr, help="quantizer scales")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", default=None, help="run only these recipe names, e.g. quantface_w4a4")
    p.add_argument("--force", action="store_true", help="recalibrate existing recipes")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    for method, bits in RUNS:
        name = f"{method}_{bits.lower()}"
        out = Path(a.out) / name
        if a.only is not None and name not in a.only:
            continue
        if (out / "recipe.json").exists() and not a.force:
            print(f"{name}: exists, skipped")
            continue
        cfg = CalibConfig(method=method, bits=bits, data=a.data, out=str(out), seed=a.seed, steps=a.steps, lr=a.lr,
                          lora_lr=a.lora_lr, scale_lr=a.scale_lr)
        if exit_status(lambda: calibrate(cfg)):
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
