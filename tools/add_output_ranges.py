"""Record output ranges into recipes written before calibration recorded them.

    python tools/add_output_ranges.py recipes/quantface_w4a4 [more recipe folders] [--data DIR]

Runs each recipe's fake-quant model on its own calibration images (the first ``stat_images`` of its
``calibration.data`` folder, or of ``--data``, degraded with its seed) and writes, per layer, the
(min, max) of the quantized product into ``recipe.json`` (stage 8 of ``calibration.run``; the
``ort-cpu`` export requantizes convolution outputs over it). Tensors, bits and scales do not change,
so the fake-quant model, and every number measured with it, stays the same.
"""

from __future__ import annotations

import argparse

from quantface.calibration.run import add_output_ranges
from quantface.errors import exit_status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipes", nargs="+", help="recipe folders")
    parser.add_argument("--data", help="calibration faces folder (default: the one each recipe names)")
    a = parser.parse_args(argv)

    def job() -> None:
        for recipe in a.recipes:
            print(f"output ranges written to {add_output_ranges(recipe, a.data)}")

    return exit_status(job)


if __name__ == "__main__":
    raise SystemExit(main())
