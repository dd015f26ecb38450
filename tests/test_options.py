"""What a newcomer reads before running anything: ``calibrate`` / ``export --help`` show every default,
``--bits`` accepts exactly the forms its help and the README describe, ``calibrate`` without data says
where faces can come from (and runs on the LFW faces scikit-image ships), and the README's set-up says
how to get PyTorch's CPU build in its two commands."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from quantface.calibration.config import parse_bits
from quantface.calibration.methods import DEFAULT_STEPS
from quantface.cli import build_parser, main
from quantface.config import SHIPPED_LFW
from quantface.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _help(action: argparse.Action) -> str:
    text = action.help or ""
    return text % {**vars(action), "prog": "quantface"} if "%(" in text else text


@pytest.mark.parametrize("command", ["calibrate", "export"])
def test_help_shows_every_default(command):
    missing = []
    for action in _subparser(command)._actions:
        if action.required or isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction)):
            continue
        text = _help(action)
        if action.default not in (None, []) and not ("default" in text and str(action.default) in text):
            missing.append(f"{action.option_strings[0]} (default {action.default!r}): {text!r}")
    assert not missing, missing


def test_calibrate_help_names_the_steps_of_each_method():
    text = _help(next(a for a in _subparser("calibrate")._actions if "--steps" in a.option_strings))
    assert all(str(n) in text for n in DEFAULT_STEPS.values()) and "default per method" in text


def test_bits_accepts_exactly_the_documented_forms():
    accepted = set()
    for w in range(0, 20):
        for a in range(0, 20):
            try:
                accepted.add(parse_bits(f"W{w}A{a}"))
            except ConfigError:
                pass
    assert accepted == {(w, a) for w in range(2, 9) for a in [*range(2, 9), 16]}
    text = _help(next(a for a in _subparser("calibrate")._actions if "--bits" in a.option_strings))
    assert "w in 2..8" in text and "a in 2..8 or 16" in text and "refused" in text
    assert re.search(r"\| `W<w>A<a>` \| 2\.\.8 bits .*\| 2\.\.8 bits", README)
    assert re.search(r"\| `W<w>A16` \| 2\.\.8 bits \| 16 bits", README) and "Any other form is refused" in README


def test_calibrate_without_data_says_where_faces_come_from(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ../shared beside it
    assert main(["calibrate", "--out", "r"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: input path ../shared/data/faces_hq/calib does not exist")
    assert f"--data {SHIPPED_LFW}" in err and "scikit-image" in err and "--data DIR" in err
    assert not (tmp_path / "r").exists()


def test_calibrate_runs_on_the_shipped_lfw_faces(tiny_weights, tmp_path):
    out = tmp_path / "recipe"
    assert main(["calibrate", "--weights", str(tiny_weights), "--method", "minmax", "--bits", "W8A8", "--data",
                 SHIPPED_LFW, "--limit", "3", "--stat-images", "2", "--size", "32", "--out", str(out)]) == 0
    meta = json.loads((out / "recipe.json").read_text())
    assert meta["calibration"]["data"] == SHIPPED_LFW and meta["stats"]["images"] == 3


def _setup_section() -> str:
    return README.split("## Set up", 1)[1].split("\n## ", 1)[0]


def test_readme_setup_says_how_to_get_the_cpu_build_in_two_commands():
    setup = _setup_section()
    commands = re.findall(r"```bash\n(.*?)```", setup, re.S)
    assert len(commands) == 2 and all(len(c.strip().splitlines()) == 1 for c in commands)
    assert commands[0].strip() == "pip install -r requirements.txt -e . && quantface demo"
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in setup  # the CPU wheels, as a remark
    assert "CUDA" in setup
