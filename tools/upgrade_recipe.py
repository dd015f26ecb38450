"""Rewrite version-1 recipes as version 2, which store each rotation's random signs.

    python tools/upgrade_recipe.py recipes/*/

Version-1 recipes stored only each rotation's seed, and their reader regenerates the signs with
``numpy.random.default_rng(seed)``, a stream NumPy does not promise to keep across versions. This
reads each recipe with that reader (so run it with the NumPy the recipe was made with, or check the
result against an export made before) and writes it back with the signs as a tensor; every other
tensor, field and file is kept (``quantface.recipe.upgrade_recipe``).
"""

from __future__ import annotations

import argparse

from quantface.errors import exit_status
from quantface.recipe import upgrade_recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipes", nargs="+", help="recipe folders")
    a = parser.parse_args(argv)

    def job() -> None:
        for recipe in a.recipes:
            print(f"{recipe}: {'upgraded to version 2' if upgrade_recipe(recipe) else 'already version 2'}")

    return exit_status(job)


if __name__ == "__main__":
    raise SystemExit(main())
