"""Face metrics (quantface.faces), NIQE (quantface.niqe) and face-aware restore, on real faces that
scikit-image ships. The analysis tests need the [faces] extra (in the test extra; CI installs it)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from skimage import data as skdata

from quantface import faces
from quantface.cli import main
from quantface.data import ASTRONAUT_FACE_BOX, center_crop_resize, read_image, write_image
from tests.conftest import smooth_image

needs_faces = pytest.mark.skipif(faces.missing_reason() is not None, reason=str(faces.missing_reason()))

# The 68-point (iBUG 300-W) index of each landmark's mirror image: jaw, brows, nose, eyes, mouth.
MIRROR_68 = (list(range(16, -1, -1)) + list(range(26, 16, -1)) + [27, 28, 29, 30] + [35, 34, 33, 32, 31]
             + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40] + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55]
             + [64, 63, 62, 61, 60, 67, 66, 65])


def astronaut_face(size: int = 128) -> np.ndarray:
    x0, y0, x1, y1 = ASTRONAUT_FACE_BOX
    return center_crop_resize(skdata.astronaut()[y0:y1, x0:x1], size)


def test_mirror_table_is_a_mirror():
    assert sorted(MIRROR_68) == list(range(68))
    assert all(MIRROR_68[MIRROR_68[i]] == i for i in range(68))


@needs_faces
def test_identical_images_give_distance_zero():
    face = astronaut_face()
    s = faces.face_scores([face], gt=[face.copy()], fp=[face.copy()], analyzer=faces.FaceAnalyzer())
    for suffix in ("", "_to_fp"):
        assert s[f"identity_distance{suffix}"] == 0.0 and s[f"landmark_distance{suffix}"] == 0.0
        assert s[f"face_detected{suffix}"] == 1.0
    f = s["per_image"][0]
    assert f["identity_distance"] == 0.0 and f["face_detected"] is True


@needs_faces
def test_a_mirrored_face_moves_the_landmarks_by_the_mirror_distance():
    """The mirrored face's landmarks are the original's reflected (x → W-1-x, left/right swapped), so
    its landmark distance to the original is predicted by the original's own landmarks."""
    face = astronaut_face()
    analyzer = faces.FaceAnalyzer()
    ref = analyzer.analyse(face)
    mirrored = analyzer.analyse(np.ascontiguousarray(face[:, ::-1]), ref.detector)
    assert ref is not None and mirrored is not None
    reflected = ref.landmarks68[MIRROR_68].copy()
    reflected[:, 0] = face.shape[1] - 1 - reflected[:, 0]
    predicted = float(np.linalg.norm(ref.landmarks68 - reflected, axis=1).mean() / ref.inter_ocular)
    measured = faces.landmark_distance(ref, mirrored)
    assert predicted > 0.05  # the astronaut's face is not symmetric: the check has something to measure
    assert measured == pytest.approx(predicted, rel=0.15)
    # and point by point the mirrored face's landmarks sit where the reflection puts them (1.4% of the
    # inter-ocular distance measured; dlib's predictor is not exactly mirror-symmetric)
    assert np.linalg.norm(mirrored.landmarks68 - reflected, axis=1).mean() / ref.inter_ocular < 0.03
    assert 0.0 < faces.identity_distance(ref, mirrored) < faces.EMBEDDING_THRESHOLD  # the same person


@needs_faces
def test_images_without_faces_are_counted_and_left_out_of_the_means():
    face, flat = astronaut_face(), np.full((128, 128, 3), 128, np.uint8)
    noise = smooth_image(np.random.default_rng(0), 128)
    # GT: face, flat (no face), face; restored: face, face, noise (lost the face)
    s = faces.face_scores([face, face, noise], gt=[face, flat, face], analyzer=faces.FaceAnalyzer())
    assert s["faces_missing"] == {"gt": 1, "restored": 1}
    assert s["face_detected"] == pytest.approx(1 / 3)
    assert s["identity_distance"] == 0.0 and s["landmark_distance"] == 0.0  # only the first pair counts
    assert [r["face_detected"] for r in s["per_image"]] == [True, False, False]
    assert s["per_image"][1]["identity_distance"] is None


@needs_faces
def test_face_metrics_are_repeatable_and_cached():
    face = astronaut_face()
    blurred = center_crop_resize(np.ascontiguousarray(skdata.astronaut()[10:210:2, 125:325:2]), 128)
    runs = [faces.face_scores([blurred], gt=[face], analyzer=faces.FaceAnalyzer()) for _ in range(2)]
    assert runs[0]["per_image"] == runs[1]["per_image"]
    assert 0 < runs[0]["identity_distance"] < faces.EMBEDDING_THRESHOLD
    analyzer = faces.FaceAnalyzer()
    faces.face_scores([blurred], gt=[face], analyzer=analyzer)
    spent = analyzer.seconds
    again = faces.face_scores([blurred], gt=[face.copy()], analyzer=analyzer)  # same pixels: all cached
    assert analyzer.seconds == spent and again["face_seconds_per_image"] == 0.0


@needs_faces
def test_eval_reports_face_metrics_beside_psnr(image_folder, tiny_weights, tmp_path, capsys):
    write_image(image_folder / "astronaut.png", astronaut_face(128))
    out = tmp_path / "e.json"
    assert main(["eval", "--weights", str(tiny_weights), "--data", str(image_folder), "--size", "128",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    f = r["faces"]
    assert len(f["per_image"]) == r["n"] == 6 and f["per_image"][-1]["file"] == "astronaut.png"
    assert f["faces_missing"]["gt"] == 5  # the smooth random images; the astronaut's face is found
    assert f["faces_missing"]["restored"] + round(f["face_detected"] * 6) == 1
    assert "faces vs GT: identity distance" in capsys.readouterr().out
    assert "psnr" in r and set(r["per_image"][0]) == {"file", "psnr", "ssim", "psnr_lq", "ssim_lq"}


def test_eval_without_the_extra_says_so_in_one_line(image_folder, tiny_weights, monkeypatch, capsys):
    monkeypatch.setattr(faces, "missing_reason", lambda: "dlib is not installed (pip install 'quantface[faces]')")
    assert main(["eval", "--weights", str(tiny_weights), "--data", str(image_folder), "--size", "32"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "face" in line]
    assert lines == ["face metrics skipped: dlib is not installed (pip install 'quantface[faces]')"]


# ------------------------------------------------------------------------------------------- NIQE
from quantface import niqe as niqe_mod  # noqa: E402
needs_niqe = pytest.mark.skipif(niqe_mod.missing_reason() is not None, reason=str(niqe_mod.missing_reason()))


@needs_niqe
def test_niqe_matches_scikit_video_and_rises_with_blur(monkeypatch):
    """Against scikit-video's own NIQE (the code its pristine model was fitted with), after restoring
    the two NumPy / SciPy names it needs: np.int and scipy.misc.imresize (PIL bicubic, mode F)."""
    import cv2
    import scipy
    import scipy.misc
    from PIL import Image

    def imresize(arr, size, interp="bicubic", mode=None):
        im = Image.fromarray(np.asarray(arr, np.float32), mode="F")
        return np.asarray(im.resize((int(im.size[0] * size), int(im.size[1] * size)), Image.BICUBIC))

    monkeypatch.setattr(np, "int", int, raising=False)
    monkeypatch.setattr(scipy.misc, "imresize", imresize, raising=False)
    from skvideo.measure import niqe as skvideo_niqe

    photo = skdata.astronaut()
    blurred = cv2.GaussianBlur(photo, (0, 0), 3)
    for img in (photo, blurred, photo[:300, 50:400], skdata.coffee()):
        theirs = float(skvideo_niqe(niqe_mod.luminance(img))[0])
        assert niqe_mod.niqe(img) == pytest.approx(theirs, abs=1e-4)  # 1e-6 measured (float32 sums)
    assert niqe_mod.niqe(blurred) > niqe_mod.niqe(photo) + 3


@needs_niqe
def test_eval_no_reference_scores_niqe(image_folder, tiny_weights, tmp_path, capsys):
    out = tmp_path / "nr.json"
    assert main(["eval", "--no-reference", "--weights", str(tiny_weights), "--data", str(image_folder),
                 "--size", "32", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["no_reference"] and r["n"] == 5 and len(r["per_image"]) == 5
    assert r["niqe"] == pytest.approx(np.mean([p["niqe"] for p in r["per_image"]])) and r["niqe"] > 0
    assert "psnr" not in r
    assert "NIQE" in capsys.readouterr().out


def test_no_reference_fp_restorations_are_of_the_faces_as_they_are(image_folder, tiny_weights):
    """What a results table scores recipes against on folders without GT: nothing degraded first."""
    from quantface.data import load_folder
    from quantface.jobs import EvalConfig, ModelSpec, fp_restorations

    cfg = EvalConfig(data=str(image_folder), model=ModelSpec(weights=str(tiny_weights)), size=32, no_reference=True)
    pipeline, _ = cfg.model.pipeline(size=32)
    expected = pipeline(load_folder(image_folder, 32).images)
    assert all(np.array_equal(a, b) for a, b in zip(fp_restorations(cfg), expected))


def test_no_reference_with_second_stage_is_one_line(image_folder, capsys):
    assert main(["eval", "--no-reference", "--second-stage", "--data", str(image_folder)]) == 2
    assert capsys.readouterr().err.strip() == ("error: --second-stage does not apply with --no-reference: nothing "
                                               "is degraded")


# ---------------------------------------------------------------------------------------- restore
def _restore(weights, src, out, *extra):
    return main(["restore", "--weights", str(weights), "--input", str(src), "--output", str(out), *extra])


@pytest.mark.parametrize("crop", [True, False])
def test_restore_never_overwrites_inputs_that_share_a_stem(tiny_weights, tmp_path, crop):
    """astronaut.png and astronaut.jpg are two photos: two outputs (one file on 2b7229a)."""
    rng = np.random.default_rng(0)
    write_image(tmp_path / "in" / "astronaut.png", smooth_image(rng, 48))
    write_image(tmp_path / "in" / "astronaut.jpg", smooth_image(rng, 48))
    write_image(tmp_path / "in" / "other.png", smooth_image(rng, 48))
    assert _restore(tiny_weights, tmp_path / "in", tmp_path / "out", *(["--crop"] if crop else [])) == 0
    outs = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert outs == ["astronaut_jpg.png", "astronaut_png.png", "other.png"]
    a, b = (read_image(tmp_path / "out" / n) for n in outs[:2])
    assert not np.array_equal(a, b)


def test_output_names_stay_unique():
    from pathlib import Path

    from quantface.jobs import output_names

    files = [Path(n) for n in ("a.png", "a.PNG", "a.jpg", "a_jpg.png", "b.webp")]
    names = output_names(files)
    assert len(set(n.lower() for n in names.values())) == 5 and names[Path("b.webp")] == "b.png"


def test_restore_into_its_input_folder_is_refused(tiny_weights, tmp_path, capsys):
    src = tmp_path / "in" / "face.png"
    write_image(src, smooth_image(np.random.default_rng(0), 48))
    before = src.read_bytes()
    assert _restore(tiny_weights, tmp_path / "in", tmp_path / "in", "--crop") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --output") and "would overwrite the input file" in err and "\n" not in err
    assert src.read_bytes() == before


@needs_faces
def test_restore_pastes_faces_back_into_the_whole_photo(tiny_weights, tmp_path, capsys):
    photo = skdata.astronaut()
    write_image(tmp_path / "in" / "astronaut.png", photo)
    write_image(tmp_path / "in" / "noface.png", smooth_image(np.random.default_rng(1), 48))
    assert _restore(tiny_weights, tmp_path / "in", tmp_path / "out") == 0
    cap = capsys.readouterr()
    out = read_image(tmp_path / "out" / "astronaut.png")
    assert out.shape == photo.shape  # the whole photo, at its resolution
    diff = np.abs(out.astype(int) - photo).max(axis=2)
    assert diff[100:150, 200:260].mean() > 5  # the face (eyes, nose) was replaced by the restoration
    assert (diff[:, 400:] == 0).all() and (diff[300:] == 0).all()  # far from the face: untouched
    assert "(1 face(s) restored in place)" in cap.out
    notes = [line for line in cap.err.splitlines() if line.startswith("note:")]
    assert notes == [f"note: no face found in {tmp_path / 'in' / 'noface.png'}: restored its centre crop (32x32) "
                     "instead"]
    assert read_image(tmp_path / "out" / "noface.png").shape == (32, 32, 3)


def test_restore_crop_keeps_the_centre_crop(tiny_weights, tmp_path):
    write_image(tmp_path / "in" / "astronaut.png", skdata.astronaut())
    assert _restore(tiny_weights, tmp_path / "in", tmp_path / "out", "--crop") == 0
    assert read_image(tmp_path / "out" / "astronaut.png").shape == (32, 32, 3)


def test_restore_without_the_extra_falls_back_to_crops_in_one_line(tiny_weights, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(faces, "missing_reason", lambda: "dlib is not installed (pip install 'quantface[faces]')")
    write_image(tmp_path / "in" / "astronaut.png", skdata.astronaut())
    assert _restore(tiny_weights, tmp_path / "in", tmp_path / "out") == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == ["note: restoring centre crops, as with --crop: finding faces in photos needs the [faces] "
                     "extra: dlib is not installed (pip install 'quantface[faces]')"]
    assert read_image(tmp_path / "out" / "astronaut.png").shape == (32, 32, 3)


@needs_faces
def test_alignment_puts_the_landmarks_on_the_template():
    photo = skdata.astronaut()
    analyzer = faces.FaceAnalyzer()
    boxes, _ = analyzer.detect(photo, verify=True)
    assert len(boxes) == 1  # the astronaut, not the patch on her suit (a HOG false positive)
    lm = analyzer.landmarks5(photo, boxes[0])
    import cv2

    target = faces.FACE_TEMPLATE_5 * 128
    m = faces.alignment(lm, 128)
    err = np.linalg.norm(lm @ m[:, :2].T + m[:, 2] - target, axis=1)
    assert err.max() < 10 and err.mean() < 5  # pixels at 128: her pose is not the mean pose (8.1, 4.4)
    lmeds, _ = cv2.estimateAffinePartial2D(lm.astype(np.float32), target.astype(np.float32), method=cv2.LMEDS)
    assert (err ** 2).sum() <= (np.linalg.norm(lm @ lmeds[:, :2].T + lmeds[:, 2] - target, axis=1) ** 2).sum()
    crop = faces.warp_face(photo, m, 128)
    again = analyzer.landmarks5(crop, analyzer.detect(crop)[0][0])
    assert np.linalg.norm(again - target, axis=1).max() < 10


def test_results_table_has_the_face_columns_and_the_real_lq_table():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("results_table", Path(__file__).parents[1] / "tools" / "results_table.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    fp = {"name": "FP", "bits": "W32A32", "psnr": 23.4, "ssim": 0.68, "psnr_to_fp": None, "ssim_to_fp": None,
          "calib_seconds": None, "steps": None, "identity_distance": 0.65, "landmark_distance": 0.051}
    q = {**fp, "name": "quantface", "bits": "W4A4", "recipe": "quantface_w4a4", "psnr_to_fp": 41.5, "ssim_to_fp": 0.99,
         "identity_distance_to_fp": 0.09, "landmark_distance_to_fp": 0.017}
    lq = {"n": 29, "data": "lq", "niqe_lq": 17.1, "niqe_side": 512,
          "rows": [{"name": "FP", "bits": "W32A32", "niqe": 16.0, "identity_distance_to_fp": None,
                    "landmark_distance_to_fp": None, "face_detected_to_fp": None},
                   {"name": "quantface", "bits": "W4A4", "recipe": "quantface_w4a4", "niqe": 16.2,
                    "identity_distance_to_fp": 0.092, "landmark_distance_to_fp": 0.0171, "face_detected_to_fp": 0.9}]}
    t = {"n": 300, "data": "test", "seed": 0, "psnr_lq": 21.7, "ssim_lq": 0.58, "faces_missing": {"gt": 4, "restored": 0},
         "face_metrics_skipped": None, "rows": [fp, q], "lq_real": lq}
    md = tool.to_markdown(t)
    assert "| Identity ↓ | Identity to FP ↓ | LMD ↓ | LMD to FP ↓ |" in md
    assert "| quantface | W4A4 | 23.40 | 0.6800 | 41.50 | 0.9900 | 0.650 | 0.090 | 0.0510 | 0.0170 |" in md
    assert "## Real low-quality faces" in md and "| quantface | W4A4 | 16.200 | 0.092 | 0.0171 | 90% |" in md
    t.pop("lq_real")
    plain = tool.to_markdown({**t, "face_metrics_skipped": "dlib is not installed"})
    assert "Identity" not in plain and "Real low-quality" not in plain
