"""Package structure: one importable package, imports pointing one way, a torch-free command line.

    core (quantface.*: quant, bits, hadamard, recipe, data, metrics, pipeline, models, ...)
      ├── quantface.calibration   (folder calibration/)
      └── quantface.export        (folder export/)          ← neither imports the other
            application (quantface.cli, chain, jobs, validate, package, model_json, app_contract, train)
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP = {"quantface.cli", "quantface.__main__", "quantface.chain", "quantface.jobs", "quantface.validate",
       "quantface.package", "quantface.model_json", "quantface.app_contract", "quantface.train",
       "quantface.deploy_bench"}
ALLOWED = {"core": {"core"}, "calibration": {"core", "calibration"}, "export": {"core", "export"},
           "app": {"core", "calibration", "export", "app"}}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in (("quantface", "quantface"), ("calibration", "quantface.calibration"),
                            ("export", "quantface.export")):
        for f in (ROOT / folder).rglob("*.py"):
            rel = f.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = f
    return out


def _layer(module: str) -> str:
    if module.startswith("quantface.calibration"):
        return "calibration"
    if module.startswith("quantface.export"):
        return "export"
    return "app" if module in APP else "core"


def _imports(path: Path, module: str) -> set[str]:
    """Every quantface module ``path`` imports, at top level or inside functions."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m == "quantface" or m.startswith("quantface.")}


def test_imports_point_one_way():
    modules = _modules()
    bad = []
    for module, path in modules.items():
        for target in _imports(path, module):
            if target not in modules and target.rpartition(".")[0] in modules:
                target = target.rpartition(".")[0]  # ``from pkg import name`` of a non-module name
            if target not in modules or target == "quantface":
                continue
            if _layer(target) not in ALLOWED[_layer(module)]:
                bad.append(f"{module} ({_layer(module)}) imports {target} ({_layer(target)})")
    assert not bad, "\n".join(bad)


def test_the_layer_check_catches_a_wrong_import(tmp_path):
    """The check above is not vacuous: an export module importing calibration is flagged."""
    f = tmp_path / "lower.py"
    f.write_text("def f():\n    from quantface.calibration.layers import QuantLayer\n")
    targets = _imports(f, "quantface.export.lower")
    assert any(_layer(t) == "calibration" for t in targets)
    assert "calibration" not in ALLOWED[_layer("quantface.export.lower")]


def test_folders_do_not_import_as_second_top_level_packages():
    for name in ("calibration", "export"):
        r = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode != 0 and f"import quantface.{name}" in r.stderr, r.stderr


def test_command_line_help_and_version_import_no_torch():
    code = ("import sys, contextlib, io\nfrom quantface.cli import build_parser\n"
            "for argv in (['--version'], ['--help'], ['calibrate', '--help'], ['export', '--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try:\n            build_parser().parse_args(argv)\n"
            "        except SystemExit:\n            pass\n"
            "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'cv2') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_the_bit_allocation_program_and_its_targets_import_no_torch():
    """The integer program (calibration.allocation) and the targets (calibration.targets) are plain
    Python: a program of hand-written options solves, and the targets price a layer, without torch."""
    code = ("import sys\nfrom types import SimpleNamespace\n"
            "from quantface.calibration.allocation import Option, allocate\n"
            "from quantface.calibration.targets import get_target\n"
            "sol = allocate({'a': [Option(3, 9.0, 3), Option(5, 1.0, 5)], 'b': [Option(3, 4.0, 3), Option(5, 0.0, 5)]}, 8)\n"
            "assert sol.choice == {'a': 1, 'b': 0}, sol.choice\n"
            "layer = SimpleNamespace(elements=100, macs=10, weights=50)\n"
            "assert get_target('qnn').cost(None).of(layer, 4, 16) == (25.0, 20.0)\n"
            "heavy = [m for m in ('torch', 'numpy') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_the_wheel_installs_exactly_one_top_level_package(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next(tmp_path.glob("quantface-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        top = next(n for n in names if n.endswith("top_level.txt"))
        assert z.read(top).decode().split() == ["quantface"]
    roots = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert roots == {"quantface"}
    assert "quantface/calibration/recipe.py" in names and "quantface/export/lower.py" in names
    assert "quantface/models/weights/reference.safetensors" in names
