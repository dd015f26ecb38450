"""Record the quantizer points' ranges into recipes written before calibration recorded them.

    python tools/add_points.py recipes/quantface_w4a8_qnn [more recipe folders] [--data DIR]

Runs each recipe's fake-quant model on its own calibration images (the first ``stat_images`` of its
``calibration.data`` folder, or of ``--data``, degraded with its seed), its products computed as the
``qnn`` profile's integer node units compute them, and writes the (min, max) of every quantizer point
(``quantface.points``: the outputs of the model's norms, SiLU gates, residual adds, attention products)
into the ``points`` section of ``recipe.json`` (``calibration.run.observe_points``, what ``calibrate``
records itself). Tensors, bits and scales do not change: only ``quantface export --profile qnn`` of a
recipe whose layers are plain integer products uses the section (``export.integer_units``).
"""

from __future__ import annotations

import argparse

from quantface.calibration.run import add_points
from quantface.errors import exit_status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipes", nargs="+", help="recipe folders")
    parser.add_argument("--data", help="calibration faces folder (default: the one each recipe names)")
    a = parser.parse_args(argv)

    def job() -> None:
        for recipe in a.recipes:
            print(f"quantizer point ranges written to {add_points(recipe, a.data)}")

    return exit_status(job)


if __name__ == "__main__":
    raise SystemExit(main())
