"""Bad input never reaches a traceback (issue #19): a table of bad inputs to every command.

Each bad case runs ``quantface.cli.main`` in-process on a tiny model and asserts exit status 2,
exactly one ``error:`` line on stderr containing the expected sentence, no traceback, and no change
at all in the case's folder (no output, no temp file). Valid odd inputs assert exit 0 and a readable
output. Interrupted writes and file modes are checked at the end. Fixtures are built once per module.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image

from quantface import paths
from quantface.cli import main
from quantface.data import MAX_IMAGE_PIXELS, read_image, write_image
from tests.conftest import smooth_image, write_two_tiny_weights

SIZE = 32


# ------------------------------------------------------------------------------------ fixtures
def _png_header_only(path: Path, w: int, h: int) -> Path:
    """A PNG whose IHDR claims w×h pixels and that has no image data (Pillow opens it, reads the size)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return path


def _jpeg_claiming(path: Path, w: int, h: int) -> Path:
    """A small real JPEG whose SOF0 header is patched to claim w×h pixels (a decompression bomb)."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 80, 60)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", h, w)
    path.write_bytes(bytes(data))
    return path


def _neg_graph(path: Path, side: int, metadata: dict[str, str] | None = None) -> Path:
    """A well-formed ONNX graph that is not a restorer of ours: y = -x on a (1, 3, side, side) image."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, side, side])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, side, side])
    graph = helper.make_graph([helper.make_node("Neg", ["x"], ["y"])], "neg", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    for k, v in (metadata or {}).items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> SimpleNamespace:
    """Everything the cases read, built once: tiny weights (and other ones), faces, a recipe, an FP32
    export, foreign graphs, bad images, LPIPS files."""
    from quantface.calibration import CalibConfig, calibrate
    from quantface.export import ExportConfig, export_onnx

    root = tmp_path_factory.mktemp("bad_input")
    write_two_tiny_weights(root)
    rng = np.random.default_rng(0)
    for i in range(3):
        write_image(root / "faces" / f"{i:03d}.png", smooth_image(rng, 48)[:, :40])
    recipe = calibrate(CalibConfig(method="minmax", bits="W8A8", data=str(root / "faces"), out=str(root / "recipe"),
                                   weights=str(root / "weights" / "tiny"), size=SIZE, stat_images=2)).recipe
    export_onnx(ExportConfig(weights=str(root / "weights" / "tiny"), out=str(root / "fp32.onnx")))
    bad = root / "bad"
    bad.mkdir()
    (bad / "junk.jpg").write_bytes(b"this is not an image" * 5)
    (bad / "empty.png").write_bytes(b"")
    good = io.BytesIO()
    Image.fromarray(smooth_image(rng, 64)).save(good, "PNG")
    (bad / "truncated.png").write_bytes(good.getvalue()[:200])
    jpeg = io.BytesIO()
    Image.fromarray(smooth_image(rng, 64)).save(jpeg, "JPEG")
    (bad / "truncated.jpg").write_bytes(jpeg.getvalue()[:300])
    _jpeg_claiming(bad / "bomb.jpg", 14000, 14000)
    _png_header_only(bad / "huge.png", 9000, 9000)
    _png_header_only(bad / "at_limit.png", 8000, 8000)
    (bad / "notes.txt").write_text("no image here")
    lpips = root / "lpips"
    lpips.mkdir()
    torch.save({"features.0.weight": torch.zeros(1), "payload": print}, lpips / "pickled.pth")
    (lpips / "weights.bin").write_bytes(b"\0" * 64)
    (lpips / "truncated.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, lpips / "lin.pth")
    return SimpleNamespace(root=root, weights=root / "weights" / "tiny", other=root / "weights" / "other",
                           faces=root / "faces", recipe=recipe, onnx=root / "fp32.onnx",
                           neg=_neg_graph(root / "neg.onnx", SIZE), neg10=_neg_graph(root / "neg10.onnx", 10),
                           bad=bad, lpips=lpips)


def _snapshot(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` with a digest of its content (folders as 'dir')."""
    out = {}
    for p in sorted(folder.rglob("*")):
        out[str(p.relative_to(folder))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# --------------------------------------------------------------------------------------- setups
def _file(name: str, text: str = "keep me"):
    def make(tmp: Path, fx) -> None:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text(text)
    return make


def _dir(name: str, with_file: str | None = None):
    def make(tmp: Path, fx) -> None:
        (tmp / name).mkdir(parents=True, exist_ok=True)
        if with_file:
            (tmp / name / with_file).write_text("not a package file")
    return make


def _copy_bad(*names: str, folder: str = "in"):
    def make(tmp: Path, fx) -> None:
        (tmp / folder).mkdir(exist_ok=True)
        for n in names:
            (tmp / folder / n).write_bytes((fx.bad / n).read_bytes())
    return make


def _recipe_copy(edit=None, drop: str | None = None, corrupt_tensors: bool = False):
    """A copy of the fixture recipe at {tmp}/recipe, with recipe.json edited by ``edit(meta)``."""
    def make(tmp: Path, fx) -> None:
        dst = tmp / "recipe"
        dst.mkdir()
        for f in fx.recipe.iterdir():
            (dst / f.name).write_bytes(f.read_bytes())
        if edit is not None:
            meta = json.loads((dst / "recipe.json").read_text())
            edit(meta)
            (dst / "recipe.json").write_text(json.dumps(meta))
        if drop:
            (dst / drop).unlink()
        if corrupt_tensors:
            blob = (dst / "recipe.safetensors").read_bytes()
            (dst / "recipe.safetensors").write_bytes(blob[: len(blob) // 2])
    return make


def _first_layer(meta: dict) -> dict:
    return next(iter(meta["layers"].values()))


def _checkpoint(tmp: Path, fx) -> None:
    (tmp / ".recipe.distill_checkpoint.safetensors").write_bytes(b"garbage, not safetensors")


def _onnx_bytes(name: str, data: bytes):
    def make(tmp: Path, fx) -> None:
        (tmp / name).write_bytes(data)
    return make


# ---------------------------------------------------------------------------------------- cases
@dataclass
class Bad:
    id: str
    argv: str  # whitespace-separated; {tmp} is the case's folder, {fx.x} a fixture path
    message: str  # expected in the error line (formatted the same way)
    setup: object = None
    marks: tuple = ()


W = "--weights {fx.weights}"
R = f"restore {W} --input {{fx.faces}} --output {{tmp}}/out"
E = f"eval {W} --data {{fx.faces}} --json {{tmp}}/e.json"
C = f"calibrate {W} --method minmax --bits W8A8 --data {{fx.faces}} --out {{tmp}}/recipe --size 32 --stat-images 2"
X = f"export {W} --fp32 --out {{tmp}}/m.onnx"
V = (f"validate {W} --onnx {{fx.onnx}} --data {{fx.faces}} --limit 1 --repeats 1 --threads 1 "
     f"--json {{tmp}}/v.json")
P = "package --onnx {fx.onnx} --out {tmp}/pkg"
D = f"demo {W} --out {{tmp}}/demo"
LIMIT = f"above the {MAX_IMAGE_PIXELS // 1_000_000}-megapixel limit (MAX_IMAGE_PIXELS in quantface/data.py)"

BAD = [
    # ---- images
    Bad("restore-input-missing", f"restore {W} --input {{tmp}}/nothing --output {{tmp}}/out",
        "input path {tmp}/nothing does not exist"),
    Bad("restore-input-empty-folder", f"restore {W} --input {{tmp}}/in --output {{tmp}}/out",
        "folder {tmp}/in contains no images", _dir("in")),
    Bad("restore-input-only-text-files", f"restore {W} --input {{tmp}}/in --output {{tmp}}/out",
        "folder {tmp}/in contains no images", _copy_bad("notes.txt")),
    Bad("restore-junk-jpg", f"restore {W} --input {{tmp}}/in/junk.jpg --output {{tmp}}/out",
        "cannot read image {tmp}/in/junk.jpg: Pillow recognises no image format in it", _copy_bad("junk.jpg")),
    Bad("restore-empty-png", f"restore {W} --input {{tmp}}/in/empty.png --output {{tmp}}/out",
        "cannot read image {tmp}/in/empty.png: Pillow recognises no image format", _copy_bad("empty.png")),
    Bad("restore-truncated-png", f"restore {W} --input {{tmp}}/in/truncated.png --output {{tmp}}/out",
        "cannot read image {tmp}/in/truncated.png: ", _copy_bad("truncated.png")),
    Bad("restore-truncated-jpg", f"restore {W} --input {{tmp}}/in/truncated.jpg --output {{tmp}}/out",
        "cannot read image {tmp}/in/truncated.jpg: ", _copy_bad("truncated.jpg")),
    Bad("restore-folder-one-bad-names-file-and-reason", f"restore {W} --input {{tmp}}/in --output {{tmp}}/out",
        "no readable images in {tmp}/in: cannot read image {tmp}/in/junk.jpg: Pillow recognises no image format",
        _copy_bad("junk.jpg")),
    Bad("restore-folder-two-bad", f"restore {W} --input {{tmp}}/in --output {{tmp}}/out",
        "no readable images in {tmp}/in: 2 files failed to decode, the first: cannot read image {tmp}/in/empty.png",
        _copy_bad("junk.jpg", "empty.png")),
    Bad("restore-bomb-jpeg-14000", f"restore {W} --input {{tmp}}/in/bomb.jpg --output {{tmp}}/out",
        "image {tmp}/in/bomb.jpg is " + LIMIT, _copy_bad("bomb.jpg")),
    Bad("restore-huge-png-9000", f"restore {W} --input {{tmp}}/in/huge.png --output {{tmp}}/out",
        "image {tmp}/in/huge.png is 9000x9000 pixels, " + LIMIT, _copy_bad("huge.png")),
    Bad("restore-at-limit-is-read-then-fails-to-decode", f"restore {W} --input {{tmp}}/in/at_limit.png "
        "--output {tmp}/out", "cannot read image {tmp}/in/at_limit.png: ", _copy_bad("at_limit.png")),
    Bad("eval-data-missing", f"eval {W} --data {{tmp}}/nothing --json {{tmp}}/e.json",
        "input path {tmp}/nothing does not exist"),
    Bad("eval-one-bad-image", f"eval {W} --data {{tmp}}/in --json {{tmp}}/e.json",
        "no readable images in {tmp}/in: cannot read image {tmp}/in/truncated.png", _copy_bad("truncated.png")),
    Bad("eval-bomb", f"eval {W} --data {{tmp}}/in --json {{tmp}}/e.json",
        "no readable images in {tmp}/in: image {tmp}/in/bomb.jpg is " + LIMIT, _copy_bad("bomb.jpg")),
    Bad("calibrate-data-missing", C.replace("{fx.faces}", "{tmp}/nothing"), "input path {tmp}/nothing does not exist"),
    Bad("calibrate-data-all-bad", C.replace("{fx.faces}", "{tmp}/in"),
        "no readable images in {tmp}/in: 2 files failed to decode", _copy_bad("junk.jpg", "huge.png")),
    Bad("validate-data-missing", V.replace("--data {fx.faces}", "--data {tmp}/nothing"),
        "input path {tmp}/nothing does not exist"),
    Bad("validate-data-empty", V.replace("--data {fx.faces}", "--data {tmp}/in"),
        "folder {tmp}/in contains no images", _dir("in")),
    # ---- recipes
    Bad("restore-recipe-missing", R + " --recipe {tmp}/nope", "recipe folder {tmp}/nope does not exist"),
    Bad("restore-recipe-is-a-file", R + " --recipe {tmp}/r.json", "recipe folder {tmp}/r.json is not a folder",
        _file("r.json")),
    Bad("eval-recipe-no-json", E + " --recipe {tmp}/recipe", "recipe folder {tmp}/recipe has no recipe.json",
        _recipe_copy(drop="recipe.json")),
    Bad("eval-recipe-invalid-json", E + " --recipe {tmp}/recipe", "recipe file {tmp}/recipe/recipe.json is not valid JSON",
        lambda tmp, fx: (_recipe_copy()(tmp, fx), (tmp / "recipe" / "recipe.json").write_text("{not json"))),
    Bad("eval-recipe-wrong-format", E + " --recipe {tmp}/recipe", "{tmp}/recipe/recipe.json is not a QuantFace recipe",
        _recipe_copy(edit=lambda m: m.update(format="something-else"))),
    Bad("eval-recipe-wrong-version", E + " --recipe {tmp}/recipe", "has version 99; this tool reads versions 1, 2",
        _recipe_copy(edit=lambda m: m.update(version=99))),
    Bad("eval-recipe-no-tensors", E + " --recipe {tmp}/recipe", "recipe folder {tmp}/recipe has no recipe.safetensors",
        _recipe_copy(drop="recipe.safetensors")),
    Bad("eval-recipe-truncated-tensors", E + " --recipe {tmp}/recipe", "are truncated or modified (sha256 mismatch)",
        _recipe_copy(corrupt_tensors=True)),
    Bad("restore-recipe-other-weights", R.replace("{fx.weights}", "{fx.other}") + " --recipe {fx.recipe}",
        "was calibrated for other model weights"),
    Bad("export-recipe-missing-tensor", f"export {W} --recipe {{tmp}}/recipe --out {{tmp}}/m.onnx",
        "lacks tensor nope.weight_scale of layer",
        _recipe_copy(edit=lambda m: _first_layer(m).update(weight_scale="nope.weight_scale"))),
    Bad("export-recipe-missing", f"export {W} --recipe {{tmp}}/nope --out {{tmp}}/m.onnx",
        "recipe folder {tmp}/nope does not exist"),
    Bad("validate-recipe-missing", V + " --recipe {tmp}/nope", "recipe folder {tmp}/nope does not exist"),
    Bad("eval-recipe-and-onnx", E + " --recipe {fx.recipe} --onnx {fx.onnx}", "not both"),
    Bad("recipe-without-layers", E + " --recipe {tmp}/recipe", "layers",
        _recipe_copy(edit=lambda m: m.pop("layers"))),
    Bad("recipe-layer-without-weight-shape", E + " --recipe {tmp}/recipe", "weight_shape",
        _recipe_copy(edit=lambda m: _first_layer(m).pop("weight_shape"))),
    Bad("recipe-layers-as-list", E + " --recipe {tmp}/recipe", "layers",
        _recipe_copy(edit=lambda m: m.update(layers=list(m["layers"].values())))),
    # ---- ONNX files
    Bad("restore-onnx-missing", R + " --onnx {tmp}/no.onnx", "ONNX model {tmp}/no.onnx does not exist"),
    Bad("restore-onnx-is-a-folder", R + " --onnx {tmp}/d.onnx", "ONNX model {tmp}/d.onnx is not a file", _dir("d.onnx")),
    Bad("restore-onnx-junk", R + " --onnx {tmp}/j.onnx", "ONNX model {tmp}/j.onnx cannot be loaded by ONNX Runtime",
        _onnx_bytes("j.onnx", b"\x08\x07junk\xff" * 20)),
    Bad("eval-onnx-empty-file", E + " --onnx {tmp}/e.onnx", "ONNX model {tmp}/e.onnx cannot be loaded",
        _onnx_bytes("e.onnx", b"")),
    Bad("restore-onnx-10px-names-the-graph", R + " --onnx {fx.neg10}",
        "ONNX model {fx.neg10} takes 10x10 images; the pipeline needs a side that is a positive multiple of 16"),
    Bad("eval-onnx-10px-names-the-graph", E + " --onnx {fx.neg10}", "ONNX model {fx.neg10} takes 10x10 images"),
    Bad("restore-onnx-size-mismatch", R + " --onnx {fx.onnx} --size 64",
        "--size 64 does not match ONNX model {fx.onnx}, whose input is 32x32"),
    Bad("validate-onnx-missing", V.replace("--onnx {fx.onnx}", "--onnx {tmp}/no.onnx"),
        "ONNX model {tmp}/no.onnx does not exist"),
    Bad("validate-onnx-junk", V.replace("--onnx {fx.onnx}", "--onnx {tmp}/j.onnx"), "cannot be loaded by ONNX Runtime",
        _onnx_bytes("j.onnx", b"\x08\x07junk\xff" * 20)),
    Bad("validate-foreign-graph", V.replace("--onnx {fx.onnx}", "--onnx {fx.neg}"),
        "{fx.neg} has no quantface metadata: it is not a graph written by quantface export"),
    Bad("package-foreign-graph", P.replace("{fx.onnx}", "{fx.neg}"),
        "{fx.neg} has no quantface metadata: it is not a graph written by quantface export; only quantface's own"),
    Bad("package-foreign-graph-10px", P.replace("{fx.onnx}", "{fx.neg10}"), "{fx.neg10} has no quantface metadata"),
    Bad("package-onnx-missing", P.replace("{fx.onnx}", "{tmp}/no.onnx"), "ONNX model {tmp}/no.onnx does not exist"),
    Bad("package-onnx-junk", P.replace("{fx.onnx}", "{tmp}/j.onnx"), "{tmp}/j.onnx is not a readable ONNX model",
        _onnx_bytes("j.onnx", b"\x08\x07junk\xff" * 20)),
    Bad("package-onnx-empty", P.replace("{fx.onnx}", "{tmp}/e.onnx"), "{tmp}/e.onnx is not a readable ONNX model",
        _onnx_bytes("e.onnx", b"")),
    # ---- weights and checkpoints
    Bad("restore-weights-missing", R.replace("{fx.weights}", "{tmp}/w"), "model file {tmp}/w.json does not exist"),
    Bad("restore-weights-bad-json", R.replace("{fx.weights}", "{tmp}/w"), "model config {tmp}/w.json is invalid",
        lambda tmp, fx: ((tmp / "w.json").write_text("{oops"), (tmp / "w.safetensors").write_bytes(b"x"))),
    Bad("eval-weights-truncated", E.replace("{fx.weights}", "{tmp}/w"), "weights file {tmp}/w.safetensors is unreadable",
        lambda tmp, fx: ((tmp / "w.json").write_text(fx.weights.with_suffix(".json").read_text()),
                         (tmp / "w.safetensors").write_bytes(fx.weights.with_suffix(".safetensors").read_bytes()[:999]))),
    Bad("export-weights-missing", X.replace("{fx.weights}", "{tmp}/w"), "model file {tmp}/w.json does not exist"),
    Bad("calibrate-weights-missing", C.replace("{fx.weights}", "{tmp}/w"), "model file {tmp}/w.json does not exist"),
    Bad("restore-sd-path-without-osdface", R + " --sd-path {tmp}", "--sd-path and --osdface-ckpt only apply to"),
    Bad("restore-osdface-without-paths", f"restore --model osdface --input {{fx.faces}} --output {{tmp}}/out",
        "--model osdface needs both --sd-path and --osdface-ckpt"),
    Bad("calibrate-lpips-pickle", C + " --lpips-backbone {fx.lpips}/pickled.pth --lpips-lin {fx.lpips}/lin.pth",
        "LPIPS weights file {fx.lpips}/pickled.pth holds pickled objects other than tensors"),
    Bad("calibrate-lpips-missing", C + " --lpips-backbone {tmp}/no.pth --lpips-lin {fx.lpips}/lin.pth",
        "LPIPS weights file {tmp}/no.pth does not exist"),
    Bad("calibrate-lpips-extension", C + " --lpips-backbone {fx.lpips}/weights.bin --lpips-lin {fx.lpips}/lin.pth",
        "has an unsupported extension"),
    Bad("calibrate-lpips-truncated", C + " --lpips-backbone {fx.lpips}/truncated.safetensors --lpips-lin "
        "{fx.lpips}/lin.pth", "LPIPS weights file {fx.lpips}/truncated.safetensors is unreadable or truncated"),
    Bad("calibrate-lpips-without-lin", C + " --lpips-backbone {fx.lpips}/pickled.pth",
        "LPIPS needs both --lpips-backbone and --lpips-lin"),
    Bad("calibrate-branch-bits", C + " --branch-bits 9", "--branch-bits 9 must be a whole number of bits from 2 to 8"),
    Bad("calibrate-corrupt-checkpoint", C.replace("--method minmax", "--method quantface") + " --steps 1",
        "checkpoint {tmp}/.recipe.distill_checkpoint.safetensors is unreadable or truncated", _checkpoint),
    # ---- output paths
    Bad("restore-output-is-a-file", R, "--output {tmp}/out is an existing file; it must name a folder", _file("out")),
    Bad("restore-output-under-a-file", R.replace("{tmp}/out", "{tmp}/f/out"),
        "--output {tmp}/f/out lies under {tmp}/f, which is a file", _file("f")),
    Bad("restore-output-deep-under-a-file", R.replace("{tmp}/out", "{tmp}/f/a/b"),
        "--output {tmp}/f/a/b lies under {tmp}/f, which is a file", _file("f")),
    Bad("eval-json-is-a-folder", E, "--json {tmp}/e.json is an existing folder; it must name a file", _dir("e.json")),
    Bad("eval-json-under-a-file", E.replace("{tmp}/e.json", "{tmp}/f/e.json"),
        "--json {tmp}/f/e.json lies under {tmp}/f, which is a file", _file("f")),
    Bad("export-out-is-a-folder", X, "--out {tmp}/m.onnx is an existing folder; it must name a file", _dir("m.onnx")),
    Bad("export-out-under-a-file", X.replace("{tmp}/m.onnx", "{tmp}/f/m.onnx"),
        "--out {tmp}/f/m.onnx lies under {tmp}/f, which is a file", _file("f")),
    Bad("export-out-trailing-slash", X.replace("{tmp}/m.onnx", "{tmp}/d/"), "must name a file"),
    Bad("validate-json-is-a-folder", V, "--json {tmp}/v.json is an existing folder", _dir("v.json")),
    Bad("validate-json-under-a-file", V.replace("{tmp}/v.json", "{tmp}/f/v.json"),
        "--json {tmp}/f/v.json lies under {tmp}/f, which is a file", _file("f")),
    Bad("package-out-is-a-file", P, "--out {tmp}/pkg is an existing file; it must name a folder", _file("pkg")),
    Bad("package-out-under-a-file", P.replace("{tmp}/pkg", "{tmp}/f/pkg"),
        "--out {tmp}/f/pkg lies under {tmp}/f, which is a file", _file("f")),
    Bad("package-out-holds-other-files", P, "--out {tmp}/pkg holds files that are not part of a package (e.g. "
        "notes.txt)", _dir("pkg", "notes.txt")),
    Bad("calibrate-out-is-a-file", C, "--out {tmp}/recipe is an existing file", _file("recipe")),
    Bad("calibrate-out-folder-that-is-not-a-recipe", C, "--out {tmp}/recipe is a folder that holds no recipe.json",
        _dir("recipe", "thesis.tex")),
    Bad("calibrate-out-under-a-file", C.replace("{tmp}/recipe", "{tmp}/f/recipe"),
        "--out {tmp}/f/recipe lies under {tmp}/f, which is a file", _file("f")),
    Bad("demo-out-is-a-file", D + " --fp-only", "--out {tmp}/demo is an existing file", _file("demo")),
    Bad("demo-out-under-a-file", D.replace("{tmp}/demo", "{tmp}/f/demo") + " --steps 1",
        "--out {tmp}/f/demo lies under {tmp}/f, which is a file", _file("f")),
    # ---- numeric options
    Bad("restore-size-0", R + " --size 0", "--size 0 must be a positive multiple of 16"),
    Bad("restore-size-negative", R + " --size -16", "--size -16 must be a positive multiple of 16"),
    Bad("restore-size-50", R + " --size 50", "--size 50 must be a positive multiple of 16"),
    Bad("eval-size-0", E + " --size 0", "--size 0 must be a positive multiple of 16"),
    Bad("eval-limit-0", E + " --limit 0", "--limit 0 must be at least 1"),
    Bad("eval-seed-negative", E + " --seed -1", "--seed -1 must be at least 0"),
    Bad("calibrate-size-0", C.replace("--size 32", "--size 0"), "--size 0 must be a positive multiple of 16"),
    Bad("calibrate-size-40", C.replace("--size 32", "--size 40"), "--size 40 must be a positive multiple of 16"),
    Bad("calibrate-threads-negative", C + " --threads -1", "--threads -1 must be at least 1"),
    Bad("calibrate-threads-0", C + " --threads 0", "--threads 0 must be at least 1"),
    Bad("calibrate-limit-0", C + " --limit 0", "--limit 0 must be at least 1"),
    Bad("calibrate-steps-negative", C + " --steps -1", "--steps -1 must be non-negative"),
    Bad("calibrate-rank-0", C + " --rank 0", "--rank 0 must be at least 1"),
    Bad("calibrate-alpha-2", C + " --alpha 2", "--alpha 2.0 must be in [0, 1]"),
    Bad("calibrate-lr-0", C + " --lr 0", "--lr 0.0 must be positive"),
    Bad("calibrate-lr-nan", C + " --lr nan", "--lr nan must be positive"),
    Bad("calibrate-seed-negative", C + " --seed -3", "--seed -3 must be at least 0"),
    Bad("calibrate-bits-9", C.replace("W8A8", "W9A4"), "9"),
    Bad("calibrate-bits-garbage", C.replace("W8A8", "int4"), "--bits 'int4' is not one of the accepted forms: W<w>A<a>"),
    Bad("calibrate-batch-size-0", C + " --batch-size 0", "batch size and statistics images must be positive"),
    Bad("calibrate-stat-images-0", C.replace("--stat-images 2", "--stat-images 0"),
        "batch size and statistics images must be positive"),
    Bad("calibrate-mp-budget-0", C + " --mp-budget 0", "--mp-budget 0.0 must be a positive number"),
    Bad("calibrate-mp-candidates-garbage", C + " --mp-budget 4 --mp-candidates 3,x", "must be comma-separated bit"),
    Bad("calibrate-device-gpu", C + " --device gpu", "--device 'gpu' is not one of auto, cpu, cuda, cuda:N"),
    Bad("validate-limit-0", V.replace("--limit 1", "--limit 0"), "--limit 0 must be at least 1"),
    Bad("validate-threads-0", V.replace("--threads 1", "--threads 0"), "--threads and --repeats must be positive"),
    Bad("validate-repeats-0", V.replace("--repeats 1", "--repeats 0"), "--threads and --repeats must be positive"),
    Bad("export-size-0", X + " --size 0", "--size 0 must be a positive integer"),
    Bad("export-size-50", X + " --size 50", "--size 50 is not a multiple of 16"),
    Bad("export-batch-0", X + " --batch 0", "--batch 0 must be a positive integer"),
    Bad("demo-steps-negative", D + " --steps -5", "--steps -5 must be at least 0"),
    Bad("demo-threads-0", D + " --threads 0", "--threads 0 must be at least 1"),
    Bad("demo-calib-faces-0", D + " --calib-faces 0", "at least one calibration and one validation face"),
    Bad("demo-calib-faces-300", D + " --calib-faces 300", "must not exceed 200"),
    Bad("demo-seed-negative", D + " --fp-only --seed -1", "--seed -1 must be at least 0"),
]


def _fmt(text: str, tmp: Path, fx) -> str:
    return text.format(tmp=tmp, fx=fx)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in BAD])
def test_bad_input_is_one_error_line_and_writes_nothing(case: Bad, fx, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory either
    if case.setup:
        case.setup(tmp_path, fx)
    before, fixtures = _snapshot(tmp_path), _snapshot(fx.root)
    rc = main([_fmt(a, tmp_path, fx) for a in case.argv.split()])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2, err
    assert "Traceback" not in err and len(errors) == 1, err
    assert _fmt(case.message, tmp_path, fx) in errors[0], errors[0]
    assert _snapshot(tmp_path) == before  # no output, no temp file, inputs untouched
    assert _snapshot(fx.root) == fixtures


def test_the_table_is_large_enough():
    assert len(BAD) >= 80 and len({c.id for c in BAD}) == len(BAD)


# ----------------------------------------------------------------------------- valid odd inputs
def _odd_image(kind: str, path: Path, rng: np.random.Generator) -> None:
    rgb = smooth_image(rng, 40)
    if kind == "gray":
        Image.fromarray(rgb[:, :, 0]).save(path)
    elif kind == "rgba":
        Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 90, np.uint8)])).save(path)
    elif kind == "la":
        Image.fromarray(rgb[:, :, 0]).convert("LA").save(path)
    elif kind == "palette":
        Image.fromarray(rgb).convert("P").save(path)
    elif kind == "gray16":
        Image.fromarray((rgb[:, :, 0].astype(np.uint16) * 257)).save(path)
    elif kind == "cmyk":
        Image.fromarray(rgb).convert("CMYK").save(path, "JPEG")
    elif kind == "one-pixel":
        Image.new("RGB", (1, 1), (200, 10, 10)).save(path)
    elif kind == "wide":
        Image.fromarray(np.tile(rgb, (1, 8, 1))[:12]).save(path)
    elif kind == "gif-named-jpg":
        Image.fromarray(rgb).convert("P").save(path, "GIF")
    else:  # the suffix picks the format: tiff, bmp, webp, uppercase PNG
        Image.fromarray(rgb).save(path)


ODD = {"gray": "g.png", "rgba": "a.png", "la": "la.png", "palette": "p.png", "gray16": "g16.png", "cmyk": "c.jpg",
       "one-pixel": "one.png", "wide": "wide.png", "gif-named-jpg": "gif.jpg", "tiff": "t.tiff", "bmp": "b.bmp",
       "webp": "w.webp", "upper": "UP.PNG"}


@pytest.mark.parametrize("kind", list(ODD))
def test_odd_but_valid_images_restore(kind, fx, tmp_path, capsys):
    src = tmp_path / ODD[kind]
    _odd_image(kind, src, np.random.default_rng(3))
    assert main(["restore", "--weights", str(fx.weights), "--input", str(src), "--output", str(tmp_path / "out")]) == 0
    assert read_image(tmp_path / "out" / f"{src.stem}.png").shape == (SIZE, SIZE, 3)
    assert "error:" not in capsys.readouterr().err


def test_folder_with_one_bad_file_restores_the_rest(fx, tmp_path, capsys):
    _copy_bad("junk.jpg")(tmp_path, fx)
    write_image(tmp_path / "in" / "ok.png", smooth_image(np.random.default_rng(1), 40))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("kept")  # an existing output folder keeps its other files
    assert main(["restore", "--weights", str(fx.weights), "--input", str(tmp_path / "in"),
                 "--output", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mine.txt", "ok.png"]
    err = capsys.readouterr().err
    assert "skipped 1 unreadable file(s)" in err and "junk.jpg: Pillow recognises no image format" in err


@pytest.mark.parametrize("command", ["restore", "eval"])
def test_foreign_graph_runs_after_one_warning(command, fx, tmp_path, capsys):
    """restore / eval run any image-to-image graph; one without quantface metadata gets one warning line."""
    if command == "restore":
        argv = ["restore", "--onnx", str(fx.neg), "--input", str(fx.faces), "--output", str(tmp_path / "out")]
    else:
        argv = ["eval", "--weights", str(fx.weights), "--onnx", str(fx.neg), "--data", str(fx.faces),
                "--json", str(tmp_path / "e.json")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"{fx.neg} has no quantface metadata" in warnings[0], err
    if command == "restore":
        assert read_image(tmp_path / "out" / "000.png").shape == (SIZE, SIZE, 3)
    else:
        assert json.loads((tmp_path / "e.json").read_text())["n"] == 3


def test_our_export_runs_without_a_warning(fx, tmp_path, capsys):
    assert main(["restore", "--weights", str(fx.weights), "--onnx", str(fx.onnx), "--input", str(fx.faces),
                 "--output", str(tmp_path / "out"), "--size", "32"]) == 0
    assert "warning:" not in capsys.readouterr().err


def test_existing_json_is_replaced_and_stale_temps_are_cleaned(fx, tmp_path):
    """An interrupted earlier run left temps of the target's pattern: the next write removes them."""
    target = tmp_path / "e.json"
    target.write_text("old")
    (tmp_path / ".e.json.tmp-abc123").write_text("half")
    (tmp_path / ".e.json.tmp-dir").mkdir()
    (tmp_path / ".other.json.tmp-x").write_text("not ours")
    assert main(["eval", "--weights", str(fx.weights), "--data", str(fx.faces), "--limit", "1",
                 "--json", str(target)]) == 0
    assert json.loads(target.read_text())["n"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.json.tmp-x", "e.json"]


# -------------------------------------------------------------------------- interrupted writes
def test_interrupted_package_leaves_no_target_folder(fx, tmp_path, monkeypatch, capsys):
    """A kill while the package is built: the target folder never appears half-made."""
    import quantface.package as pkg

    def killed(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(pkg, "_install", killed)
    assert main(["package", "--onnx", str(fx.onnx), "--out", str(tmp_path / "pkg")]) == 130
    assert list(tmp_path.iterdir()) == []


def test_package_builds_beside_the_target_and_cleans_a_killed_run(fx, tmp_path, monkeypatch):
    import quantface.package as pkg

    stale = tmp_path / ".pkg.tmp-killed"  # what a SIGKILL during an earlier run leaves
    (stale / "work").mkdir(parents=True)
    seen = {}
    real = pkg.replace_dir

    def spy(tmp, target):
        seen["target_existed"] = Path(target).exists()
        seen["staged"] = sorted(p.name for p in Path(tmp).iterdir())
        return real(tmp, target)
    monkeypatch.setattr(pkg, "replace_dir", spy)
    assert main(["package", "--onnx", str(fx.onnx), "--out", str(tmp_path / "pkg"), "--format", "onnx"]) == 0
    assert seen == {"target_existed": False, "staged": ["model.json", "model.onnx", "required_operators.config"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]
    assert sorted(p.name for p in (tmp_path / "pkg").iterdir()) == ["model.json", "model.onnx",
                                                                    "required_operators.config"]


def test_package_into_a_folder_an_old_version_left_half_made(fx, tmp_path):
    """Earlier versions built inside --out: a kill left pkg/ holding only .package.*.tmp/. Packaging
    into it again works and leaves exactly the package."""
    (tmp_path / "pkg" / ".package.abc123.tmp" / "src").mkdir(parents=True)
    assert main(["package", "--onnx", str(fx.onnx), "--out", str(tmp_path / "pkg"), "--format", "onnx"]) == 0
    assert sorted(p.name for p in (tmp_path / "pkg").iterdir()) == ["model.json", "model.onnx",
                                                                    "required_operators.config"]


def test_interrupted_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "x.json"
    target.write_text("old")

    def killed(src, dst):
        raise KeyboardInterrupt
    monkeypatch.setattr(paths.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        paths.atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_temp_dir_and_replace_dir(tmp_path):
    target = tmp_path / "recipe"
    (tmp_path / ".recipe.tmp-stale").mkdir()
    (tmp_path / ".recipe.tmp-stale" / "recipe.json").write_text("half")
    tmp = paths.temp_dir(target)
    assert tmp.parent == tmp_path and tmp.name.startswith(".recipe.tmp-")
    assert sorted(p.name for p in tmp_path.iterdir()) == [tmp.name]  # the stale one is gone
    (tmp / "a").write_text("1")
    paths.replace_dir(tmp, target)
    assert [p.name for p in tmp_path.iterdir()] == ["recipe"] and (target / "a").read_text() == "1"
    # Replacing again: the old folder is renamed aside, the new one renamed in, then the old deleted.
    tmp2 = paths.temp_dir(target)
    (tmp2 / "b").write_text("2")
    paths.replace_dir(tmp2, target)
    assert sorted(p.name for p in target.iterdir()) == ["b"] and [p.name for p in tmp_path.iterdir()] == ["recipe"]


def test_replace_dir_puts_the_old_folder_back_when_the_rename_fails(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("old")
    tmp = paths.temp_dir(target)
    (tmp / "new").write_text("new")
    real, calls = os.replace, []

    def flaky(src, dst):
        calls.append(Path(src).name)
        if len(calls) == 2:  # the old folder moved aside; moving the new one in fails
            raise OSError("disk gone")
        return real(src, dst)
    monkeypatch.setattr(paths.os, "replace", flaky)
    with pytest.raises(OSError, match="disk gone"):
        paths.replace_dir(tmp, target)
    monkeypatch.undo()
    assert (target / "old").read_text() == "old"


# --------------------------------------------------------------------------------- file modes
@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def test_outputs_get_the_umask_mode_not_mkstemps_0600(fx, tmp_path, umask_027):
    """Restored PNGs, JSON and .onnx get 0666 less the umask. The export also replaces an existing
    file and removes the temp folder a killed export left."""
    mode = umask_027
    assert main(["restore", "--weights", str(fx.weights), "--input", str(fx.faces),
                 "--output", str(tmp_path / "out")]) == 0
    assert main(["eval", "--weights", str(fx.weights), "--data", str(fx.faces), "--limit", "1",
                 "--json", str(tmp_path / "e.json")]) == 0
    (tmp_path / "m.onnx").write_bytes(b"old")
    (tmp_path / ".m.onnx.tmp-killed").mkdir()
    (tmp_path / ".m.onnx.tmp-killed" / "m.onnx").write_bytes(b"partial")
    assert main(["export", "--weights", str(fx.weights), "--fp32", "--out", str(tmp_path / "m.onnx")]) == 0
    onnx.checker.check_model(onnx.load(str(tmp_path / "m.onnx")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.json", "m.onnx", "out"]
    files = [*(tmp_path / "out").iterdir(), tmp_path / "e.json", tmp_path / "m.onnx"]
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: oct(mode) for f in files}
    d = paths.temp_dir(tmp_path / "folder")
    assert d.stat().st_mode & 0o777 == 0o750


def test_check_output_paths_directly(tmp_path):
    from quantface.errors import ConfigError

    (tmp_path / "file").write_text("x")
    assert paths.check_output_file(tmp_path / "file", "--json") == tmp_path / "file"  # replaced atomically
    assert paths.check_output_dir(tmp_path / "new" / "deeper", "--out") == tmp_path / "new" / "deeper"
    for call, path in [(paths.check_output_file, tmp_path), (paths.check_output_file, tmp_path / "file" / "x"),
                       (paths.check_output_dir, tmp_path / "file"), (paths.check_output_dir, tmp_path / "file" / "d")]:
        with pytest.raises(ConfigError):
            call(path, "--out")
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_atomic_path_renames_on_success_and_removes_the_temp_on_failure(tmp_path, umask_027):
    target = tmp_path / "w.safetensors"
    with paths.atomic_path(target) as tmp:
        assert tmp.name.startswith(".w.safetensors.tmp-") and tmp.parent == tmp_path
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and target.stat().st_mode & 0o777 == umask_027
    with pytest.raises(RuntimeError):
        with paths.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer failed")
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
