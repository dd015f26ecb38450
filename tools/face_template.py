"""Measure FACE_TEMPLATE_5 (quantface/faces.py): the mean 5-point dlib landmarks of training faces at the
model's working size, as fractions of the side. Restore aligns the faces of a photo to this template, so
they reach the model placed as its training faces were.

    python tools/face_template.py --data ../shared/data/faces_hq/train --limit 300
"""

from __future__ import annotations

import argparse

import numpy as np

from quantface.data import load_folder
from quantface.faces import FaceAnalyzer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/faces_hq/train")
    p.add_argument("--limit", type=int, default=300)
    p.add_argument("--size", type=int, default=128)
    a = p.parse_args(argv)
    analyzer = FaceAnalyzer()
    faces = load_folder(a.data, a.size, a.limit).images
    points = [f.landmarks5 for f in map(analyzer.analyse, faces) if f is not None]
    pts = np.array(points) / a.size
    print(f"{len(points)}/{len(faces)} faces found; mean 5-point landmarks / side:")
    print(np.array2string(pts.mean(0), precision=4, separator=", "))
    print(f"std (pixels): {np.array2string(pts.std(0) * a.size, precision=2, separator=', ')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
