"""``model.json``, what the Android app and the web page read from a package: its typed schema.

``ModelManifest`` (and the records inside it) is the one description of the file: ``quantface
package`` builds one and writes ``to_json()``; ``read_model_json`` reads a file back with every field
checked (names, types, schema version), so a package that drifts from the schema is one clear
sentence, not a key error in an app. The field order is the file's order.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from quantface import app_contract
from quantface.errors import QuantFaceError

MODEL_JSON = "model.json"
MODEL_JSON_SCHEMA = 1
FORMATS = ("ort", "onnx")  # what a package holds (``--format auto`` decides between them)

T = TypeVar("T")


class ModelJsonError(QuantFaceError):
    """A model.json that does not follow the schema."""


def _check(value: Any, hint: Any, where: str) -> Any:
    """``value`` (from JSON) as the type ``hint`` describes; ModelJsonError naming ``where`` if it is not."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _record(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            if arm is type(None) and value is None:
                return None
        return _check(value, next(a for a in args if a is not type(None)), where)
    if hint is Any:
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ModelJsonError(f"{where} must be a list, not {type(value).__name__}")
        return [_check(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ModelJsonError(f"{where} must be an object, not {type(value).__name__}")
        return {k: _check(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, hint)
    if not ok:
        raise ModelJsonError(f"{where} must be {hint.__name__}, not {type(value).__name__} ({value!r:.40})")
    return value


def _record(cls: type[T], raw: Any, where: str) -> T:
    if not isinstance(raw, dict):
        raise ModelJsonError(f"{where} must be an object, not {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(raw) - {f.name for f in fields})
    if unknown:
        raise ModelJsonError(f"{where} has an unknown field {unknown[0]!r}")
    values = {}
    for f in fields:
        if f.name not in raw:
            raise ModelJsonError(f"{where} has no field {f.name!r}")
        values[f.name] = _check(raw[f.name], hints[f.name], f"{where}.{f.name}")
    return cls(**values)


@dataclass(frozen=True)
class TensorInfo:
    """The image input or output: name, static shape (1, 3, S, S), layout, dtype, colour, value range."""

    name: str
    shape: list[int]
    layout: str = app_contract.LAYOUT
    dtype: str = "float32"
    color: str = "RGB"
    range: list[float] = field(default_factory=lambda: list(app_contract.INPUT_RANGE))


@dataclass(frozen=True)
class Contract:
    """The pre- and post-processing an app must do (``quantface/app_contract.py`` is the reference)."""

    version: int = app_contract.CONTRACT_VERSION
    crop: str = "largest centred square"
    resize: str = "exact integer area average, ties to even"
    normalize: str = "float32(p) / 127.5 - 1, NCHW, RGB"
    output: str = "clamp to [-1, 1], (y + 1) * 127.5 in float32, ties to even"
    reference: str = "quantface/app_contract.py"


@dataclass(frozen=True)
class Quantization:
    """Per-layer bits from the export's ``quantface.*`` metadata (``package.bits_summary``)."""

    method: str
    recipe_sha256: str
    rotation: bool
    summary: str  # e.g. "W4A4 (91 layers)", or "FP32"
    counts: dict[str, int]
    layers: dict[str, str]  # layer → "W<w>A<a>"
    constant_layers: list[str]


@dataclass(frozen=True)
class OrtCheck:
    """The .ort run next to its .onnx on a seeded input."""

    input: str
    ort_vs_onnx_max_abs: float


@dataclass(frozen=True)
class RuntimeInfo:
    onnxruntime: str  # the version that converted / checked the model
    optimization_style: str | None  # the converter's style for a .ort (Fixed | Runtime), None for a .onnx
    target_platform: str | None
    session_config: dict[str, str]
    check: OrtCheck | None  # written as {} for a .onnx

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["check"] = out["check"] or {}
        return out


@dataclass(frozen=True)
class QnnContextEntry:
    """One offline-compiled QNN HTP context in the package (model.json ``qnn_contexts``)."""

    soc: str
    marketing: str
    soc_model: int
    htp_arch: int
    model_file: str  # the EPContext model (*_ctx.onnx), what a QNN EP session loads
    model_sha256: str
    binary_file: str  # the context binary the EPContext model names
    binary_sha256: str
    binary_bytes: int
    compile_s: float
    check_max_abs: float  # |context model − plain graph| on the QNN HTP backend, check input

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SourceInfo:
    """The exported graph the package was made from."""

    file: str
    sha256: str
    tool_version: str  # quantface version that exported it


@dataclass(frozen=True)
class ModelManifest:
    """The whole of model.json."""

    schema: int
    model_file: str  # model.ort | model.onnx
    format: str  # ort | onnx
    format_reason: str
    bytes: int
    sha256: str
    profile: str
    working_size: int
    input: TensorInfo
    output: TensorInfo
    contract: Contract
    quantization: Quantization
    runtime: RuntimeInfo
    operators_config: str
    qnn_contexts: list[QnnContextEntry]
    source: SourceInfo
    tool_version: str  # quantface version that packaged it

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["runtime"] = self.runtime.to_json()
        return out

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2) + "\n"

    @classmethod
    def from_json(cls, raw: Any, where: str = MODEL_JSON) -> "ModelManifest":
        """The manifest ``raw`` (parsed JSON) describes, every field checked."""
        if isinstance(raw, dict) and raw.get("schema") != MODEL_JSON_SCHEMA:
            raise ModelJsonError(f"{where} has schema {raw.get('schema')!r}; this tool reads schema {MODEL_JSON_SCHEMA}")
        if isinstance(raw, dict) and isinstance(raw.get("runtime"), dict) and raw["runtime"].get("check") == {}:
            raw = {**raw, "runtime": {**raw["runtime"], "check": None}}
        manifest = _record(cls, raw, where)
        if manifest.format not in FORMATS:
            raise ModelJsonError(f"{where}.format {manifest.format!r} is not one of {', '.join(FORMATS)}")
        if manifest.model_file != f"model.{manifest.format}":
            raise ModelJsonError(f"{where}.model_file {manifest.model_file!r} does not match format {manifest.format}")
        return manifest


def read_model_json(path: str | Path) -> ModelManifest:
    """The ``model.json`` at ``path`` (a file, or a package folder), checked against the schema."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_JSON
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelJsonError(f"{path} is not a readable model.json ({type(exc).__name__})") from None
    return ModelManifest.from_json(raw, str(path))
