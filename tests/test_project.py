"""Project-level contracts: README's commands, CI, requirements, import hygiene."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(?:bash|sh)\n(.+?)\n```", section, flags=re.S)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    assert "quantface demo" in commands[0]
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci


def test_requirements_pin_cpu_torch_and_no_torchvision():
    req = (ROOT / "requirements.txt").read_text()
    assert re.search(r"^torch==2\.13\.0$", req, flags=re.M)
    assert "torchvision" not in req and "torchvision" not in (ROOT / "pyproject.toml").read_text()


def test_import_has_no_side_effects():
    code = ("import torch; n = torch.get_num_threads(); import quantface, quantface.models, quantface.jobs; "
            "assert torch.get_num_threads() == n; import sys; assert 'onnxruntime' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_committed_weights_are_small():
    for f in (ROOT / "quantface" / "models" / "weights").iterdir():
        assert f.stat().st_size <= 40 * 1024 * 1024, f
