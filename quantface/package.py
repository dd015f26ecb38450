"""``quantface package``: an exported ONNX graph → a folder a phone app or a browser page loads.

The folder is built complete under a temporary name beside it (``.<name>.tmp-*``) and renamed into
place (``quantface.paths.replace_dir``), so it never exists half-made; a graph without ``quantface.*``
metadata (not written by ``quantface export``) is refused. It holds three files::

    model.ort | model.onnx        the network (format below)
    required_operators.config     the operators it needs, for a reduced-operator ONNX Runtime build
    model.json                    what the app reads: input / output names, shapes, layout, ranges,
                                  working size, profile, per-layer bits, sha256, versions, format

Format (``--format auto``, measured with ONNX Runtime 1.31.1 on the three export profiles):

    profile    auto → format  why
    ---------  -------------  -------------------------------------------------------------------
    reference  .onnx          INT4 weights / UINT4 activations: the ORT format has no 4-bit tensor
                              type. ORT's converter still writes a .ort, but ONNX Runtime refuses to
                              load it ("Unsupported tensor data type ... Invalid ORT format model").
    ort-cpu    .ort, Fixed    all optimisations applied at conversion for ARM CPUs (NCHWc excluded),
                              for the CPU and XNNPACK execution providers.
    qnn        .ort, Runtime  only basic optimisations baked in, so the QDQ node units stay intact
                              for compiling EPs (QNN, NNAPI); the saved runtime optimisations are
                              not replayed (ONNX Runtime 1.31.1 fails to load this model with
                              ``session.enable_saved_runtime_optimizations=1``), which costs nothing
                              measurable on the CPU EP.

``--format ort`` on a 4-bit model is an error; ``--format onnx`` always keeps the graph as exported.

``--qnn-context SOC[,SOC]`` (needs ``quantface[qnn]``) also compiles the exported graph offline for
each named Snapdragon SoC into an EPContext model + context binary (``export.qnn_ep.compile_context``:
``model_<SOC>_ctx.onnx`` and the ``.bin`` it names), loads each back in a QNN HTP session, runs it on
the check input next to the plain graph on the HTP, and lists it in model.json's ``qnn_contexts``
(``quantface.model_json.QnnContextEntry``: files, sha256s, SoC, compile time, the check's max-abs difference).
Every .ort is loaded back and run once on a seeded input next to its .onnx; the largest output
difference is recorded in model.json (it is of the order of the 4-bit activation step, like any
change of ONNX Runtime's optimisation level on these models; see android_demo/README.md).

The ``quantface::Hadamard`` rotation is a model-local ONNX function. No inlining is needed before
conversion: ONNX Runtime inlines model-local functions when it loads a model, so the converted .ort
holds only standard operators, and a kept .onnx is shipped byte-identical to the export (its sha256
traces it to the recipe). The operator list of a kept .onnx is computed on a copy inlined with
``onnx.inliner.inline_local_functions``, joined with what ORT's converter reports for its optimised
graph, so a reduced-operator build (without ``--minimal_build``, which loads only .ort) has every
kernel the model needs before and after optimisation.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import io
import json
import logging
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx.inliner
from onnx import TensorProto

from quantface import __version__
from quantface.config import JsonConfig
from quantface.errors import ConfigError, QuantFaceError
from quantface.model_json import (MODEL_JSON, MODEL_JSON_SCHEMA, Contract, ModelManifest, OrtCheck,
                                  QnnContextEntry, Quantization, RuntimeInfo, SourceInfo, TensorInfo)
from quantface.onnx_runtime import cpu_session
from quantface.paths import atomic_copy, atomic_write_bytes, check_output_dir, replace_dir, temp_dir

FORMATS = ("auto", "ort", "onnx")
OPS_CONFIG = "required_operators.config"
MODEL_STEM = "model"
FOUR_BIT = {TensorProto.INT4: "INT4", TensorProto.UINT4: "UINT4"}
REPO = Path(__file__).resolve().parents[1]
APP_ASSETS = Path("android_demo/app/src/main/assets")
WEB_MODEL_DIR = Path("android_demo/web/model")
# The app in the repo ships without a model (the asset folders are gitignored); one copied in by
# hand must stay below this, and tests/test_package.py checks every file under android_demo/.
MAX_APP_MODEL_BYTES = 20 * 1024 * 1024
# Per profile: ORT converter optimisation style (see the module docstring).
OPTIMIZATION_STYLE = {"ort-cpu": "Fixed", "qnn": "Runtime"}
TARGET_PLATFORM = "arm"
CHECK_SEED = 0
PACKAGE_FILES = (f"{MODEL_STEM}.onnx", f"{MODEL_STEM}.ort", MODEL_JSON, OPS_CONFIG)
LEGACY_TEMP = ".package.*.tmp"  # work folders earlier versions built inside --out (gone with the old folder)


class PackageError(QuantFaceError):
    """The ONNX file cannot be packaged as asked (missing, unreadable, unsuitable for the app)."""


@dataclass
class PackageConfig(JsonConfig):
    """What to package and where. ``app_assets`` / ``web_model_dir`` default to the demo folders of
    this checkout (android_demo/app/src/main/assets, android_demo/web/model)."""

    onnx: str
    out: str
    format: str = "auto"  # auto | ort | onnx
    into_app: bool = False
    into_web: bool = False
    app_assets: str | None = None
    web_model_dir: str | None = None
    qnn_context: tuple[str, ...] = ()  # Snapdragon SoCs (export.qnn_ep.SOCS) to compile contexts for

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"--format {self.format!r} must be one of {', '.join(FORMATS)}")
        if not self.out:
            raise ConfigError("--out must name a folder")
        if self.qnn_context:
            from quantface.export.qnn_ep import get_target

            self.qnn_context = tuple(dict.fromkeys(get_target(s).soc for s in self.qnn_context))  # ConfigError if unknown

    def check(self) -> None:
        """Before any work: ``out`` is new, empty or an earlier package (whose files it replaces)."""
        out = check_output_dir(self.out, "--out")
        if out.is_dir():
            others = sorted(p.name for p in out.iterdir() if p.name not in PACKAGE_FILES
                            and not fnmatch.fnmatch(p.name, LEGACY_TEMP) and not _is_context_file(p.name))
            if others:
                raise PackageError(f"--out {out} holds files that are not part of a package (e.g. {others[0]}); "
                                   f"give a new or empty folder, or an earlier package folder")
        for flag, given in (("--into-app", self.app_assets), ("--into-web", self.web_model_dir)):
            if given:
                check_output_dir(given, flag)


def _is_context_file(name: str) -> bool:
    """A QNN context model or binary an earlier ``--qnn-context`` package holds."""
    return name.startswith(f"{MODEL_STEM}_") and (name.endswith("_ctx.onnx") or name.endswith(".bin"))


@dataclass
class PackageResult:
    out: Path
    model: Path  # the packaged model file inside ``out``
    format: str  # "ort" or "onnx"
    reason: str
    manifest: ModelManifest  # what model.json holds
    copied_to: list[Path] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ reading
def _load(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise PackageError(f"ONNX model {path} does not exist")
    if not path.is_file():
        raise PackageError(f"--onnx {path} is not a file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise PackageError(f"{path} is not a readable ONNX model ({type(exc).__name__})") from None
    if not model.graph.node:
        raise PackageError(f"{path} is not a readable ONNX model (it has no graph)")
    if any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer):
        raise PackageError(f"{path} keeps tensors in external data files, which the phone formats cannot hold")
    return model


def _static_shape(value: onnx.ValueInfoProto) -> list[int] | None:
    dims = value.type.tensor_type.shape.dim
    if not dims or any(not d.HasField("dim_value") for d in dims):
        return None
    return [int(d.dim_value) for d in dims]


def _io(model: onnx.ModelProto, path: Path) -> tuple[TensorInfo, TensorInfo]:
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise PackageError(f"{path} must have one image input and one output, not "
                           f"{len(inputs)} and {len(model.graph.output)}")
    inp, out = inputs[0], model.graph.output[0]
    shape = _static_shape(inp)
    if (inp.type.tensor_type.elem_type != TensorProto.FLOAT or shape is None or len(shape) != 4
            or shape[0] != 1 or shape[1] != 3 or shape[2] != shape[3]):
        raise PackageError(f"{path}: input {inp.name!r} must be float32 of static shape (1, 3, S, S); "
                           f"export with --batch 1")
    out_shape = _static_shape(out)
    if out.type.tensor_type.elem_type != TensorProto.FLOAT or out_shape != shape:
        raise PackageError(f"{path}: output {out.name!r} must be float32 of the input's shape {shape}")
    return TensorInfo(inp.name, shape), TensorInfo(out.name, list(shape))


def four_bit_tensors(model: onnx.ModelProto) -> list[str]:
    """Names of the 4-bit (INT4 / UINT4) tensors and values of ``model``, functions included."""
    found: list[str] = []
    graph = model.graph
    found += [t.name for t in graph.initializer if t.data_type in FOUR_BIT]
    for v in [*graph.value_info, *graph.input, *graph.output]:
        if v.type.tensor_type.elem_type in FOUR_BIT:
            found.append(v.name)
    for node in [*graph.node, *(n for f in model.functions for n in f.node)]:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type in FOUR_BIT:
                found.append(f"{node.name or node.op_type}.{a.name}")
            elif a.name == "output_dtype" and a.i in FOUR_BIT:
                found.append(node.output[0] if node.output else node.name)
    return list(dict.fromkeys(found))


def _metadata(model: onnx.ModelProto) -> dict[str, object]:
    """The export's ``quantface.*`` metadata, JSON values decoded."""
    from quantface.export.save import read_metadata

    out: dict[str, object] = {}
    for key, value in read_metadata(model).items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def bits_summary(meta: dict[str, object]) -> Quantization:
    """Per-layer bits from the export's ``quantface.layer_bits`` / ``constant_layers`` metadata."""
    layers = meta.get("layer_bits") or {}
    constant = sorted(meta.get("constant_layers") or [])
    per_layer = {n: f"W{e['weight_bits']}A{e['act_bits']}" for n, e in sorted(layers.items())}
    counts = Counter(per_layer.values())
    text = ", ".join(f"{k} ({v} layer{'s' if v > 1 else ''})" for k, v in sorted(counts.items())) or "FP32"
    return Quantization(method=meta.get("method", "unknown"), recipe_sha256=meta.get("recipe_sha256", ""),
                        rotation=meta.get("rotation", False), summary=text, counts=dict(sorted(counts.items())),
                        layers=per_layer, constant_layers=constant)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------- ONNX Runtime side
def _ort():
    import onnxruntime as ort

    return ort


def _session(path: Path):
    return cpu_session(path, 1)


def _convert(source: Path, model: onnx.ModelProto, work: Path, style: str) -> tuple[Path, Path]:
    """ONNX Runtime's own converter on a copy of ``source`` (``model``, its INT4-stored codes unpacked to
    the INT8 initializers ONNX Runtime makes of them: the ORT format has no 4-bit type):
    (the .ort, its operator config)."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    from quantface.export.fold import int4_storage, unpack_int4_storage

    src = work / "src" / f"{MODEL_STEM}.onnx"
    src.parent.mkdir(parents=True)
    if int4_storage(model):
        onnx.save(unpack_int4_storage(model), str(src))
    else:
        shutil.copyfile(source, src)
    quiet = logging.getLogger("ort_format_model.utils")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            convert_onnx_models_to_ort(src, output_dir=work / "ort", optimization_styles=[OptimizationStyle[style]],
                                       target_platform=TARGET_PLATFORM)
    finally:
        quiet.setLevel(level)
    orts = sorted((work / "ort").glob("*.ort"))
    configs = sorted((work / "ort").glob("*.config"))
    if len(orts) != 1 or len(configs) != 1:
        raise RuntimeError(f"ONNX Runtime's converter wrote {[p.name for p in orts + configs]}")
    return orts[0], configs[0]


def _parse_ops(text: str) -> dict[tuple[str, int], set[str]]:
    ops: dict[tuple[str, int], set[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        domain, opset, names = line.split(";")[:3]
        ops.setdefault((domain, int(opset)), set()).update(n for n in names.split(",") if n)
    return ops


def onnx_ops(model: onnx.ModelProto) -> dict[tuple[str, int], set[str]]:
    """(domain, since-version) → op types of ``model`` with its local functions inlined."""
    inlined = onnx.inliner.inline_local_functions(model) if model.functions else model
    opsets = {o.domain or "ai.onnx": o.version for o in inlined.opset_import}
    ops: dict[tuple[str, int], set[str]] = {}
    for node in inlined.graph.node:
        domain = node.domain or "ai.onnx"
        version = opsets.get(domain, 1)
        try:
            schema_domain = "" if domain == "ai.onnx" else domain
            version = onnx.defs.get_schema(node.op_type, version, schema_domain).since_version
        except onnx.defs.SchemaError:
            pass
        ops.setdefault((domain, version), set()).add(node.op_type)
    return ops


def _ops_text(ops: dict[tuple[str, int], set[str]], header: list[str]) -> str:
    lines = [f"# {h}" for h in header]
    lines += [f"{d};{v};{','.join(sorted(n))}" for (d, v), n in sorted(ops.items())]
    return "\n".join(lines) + "\n"


def _check_input(shape: list[int]) -> np.ndarray:
    return np.random.default_rng(CHECK_SEED).uniform(-1, 1, shape).astype(np.float32)


# ---------------------------------------------------------------------------------------- package
def _decide(cfg: PackageConfig, src: Path, four_bit: list[str]) -> tuple[str, str]:
    if cfg.format == "onnx":
        return "onnx", "kept as .onnx because --format onnx was asked for"
    if four_bit:
        example = four_bit[0]
        if cfg.format == "ort":
            raise PackageError(f"--format ort cannot package {src.name}: it holds 4-bit (INT4/UINT4) tensors such "
                               f"as {example!r}, which the ORT format cannot store; use --format auto or onnx, "
                               f"or export with --profile ort-cpu")
        return "onnx", (f"kept as .onnx: the model holds {len(four_bit)} 4-bit (INT4/UINT4) tensors (e.g. "
                        f"{example!r}) and the ORT format has no 4-bit tensor type (ONNX Runtime rejects such "
                        f"a .ort as an invalid ORT format model)")
    return "ort", ""


@dataclass
class _Source:
    """The graph to package, read and checked: its file, its model, its image input / output, its
    export metadata, and the format ``--format`` and its 4-bit tensors decide before any conversion."""

    path: Path
    model: onnx.ModelProto
    input: TensorInfo
    output: TensorInfo
    meta: dict[str, object]
    profile: str
    fmt: str
    reason: str


def _read_source(cfg: PackageConfig) -> _Source:
    from quantface.export.save import foreign_graph

    src = Path(cfg.onnx)
    model = _load(src)
    foreign = foreign_graph(src, (p.key for p in model.metadata_props))
    if foreign:
        raise PackageError(f"{foreign}; only quantface's own exports are packaged for the apps")
    inp, outp = _io(model, src)
    meta = _metadata(model)
    from quantface.export.fold import int4_storage

    stored = int4_storage(model)  # INT4-stored INT8 codes: unpacked for the ORT format (``_convert``)
    fmt, reason = _decide(cfg, src, [n for n in four_bit_tensors(model) if n not in stored])
    return _Source(src, model, inp, outp, meta, str(meta.get("profile", "unknown")), fmt, reason)


@dataclass
class _Converted:
    """ORT's converter on the source and the check of its .ort against the .onnx: the final format."""

    fmt: str
    reason: str
    style: str
    ort: Path | None  # the converted model (None when the converter failed)
    tool_config: Path | None  # the converter's operator config
    convert_error: str
    check: OrtCheck | None
    x: np.ndarray  # the check input


def _convert_and_check(cfg: PackageConfig, source: _Source, work: Path) -> _Converted:
    """Convert to .ort, run the .onnx (and the .ort where it is kept) on the seeded check input; a
    .ort that does not load back is kept as .onnx unless ``--format ort`` asked for it."""
    ort = _ort()
    style = OPTIMIZATION_STYLE.get(source.profile, "Fixed")
    src, fmt, reason = source.path, source.fmt, source.reason
    try:
        converted, tool_config = _convert(src, source.model, work, style)
        convert_error = ""
    except Exception as exc:  # the converter's own exceptions (ORT pybind errors, RuntimeError)
        converted = tool_config = None
        convert_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    name = source.input.name
    x = _check_input(source.input.shape)
    try:
        y_onnx = _session(src).run(None, {name: x})[0]
    except Exception as exc:  # onnxruntime's pybind error types
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PackageError(f"ONNX Runtime cannot run {src}: {why}") from None
    check = None
    if fmt == "ort":
        try:
            if converted is None:
                raise RuntimeError(f"the converter failed: {convert_error}")
            y_ort = _session(converted).run(None, {name: x})[0]
            check = OrtCheck(f"uniform [-1, 1], numpy seed {CHECK_SEED}", float(np.max(np.abs(y_ort - y_onnx))))
            reason = (f"converted to .ort with ONNX Runtime {ort.__version__}'s convert_onnx_models_to_ort "
                      f"(optimization style {style}, target {TARGET_PLATFORM}"
                      f"{'; QDQ node units kept for the QNN / NNAPI EPs' if style == 'Runtime' else ''}): "
                      f"no 4-bit tensors, and it loads and runs in ONNX Runtime")
        except Exception as exc:
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if cfg.format == "ort":
                raise PackageError(f"ONNX Runtime cannot use {src.name} as an ORT format model: {why}") from None
            fmt, reason = "onnx", f"kept as .onnx: the ORT format conversion did not load back ({why})"
    return _Converted(fmt, reason, style, converted, tool_config, convert_error, check, x)


def _operators_config(source: _Source, conv: _Converted) -> bytes:
    """required_operators.config: what ORT's converter reports for the optimised graph, plus (for a
    kept .onnx) the graph's own operators with local functions inlined."""
    ort, fmt, style = _ort(), conv.fmt, conv.style
    ops = _parse_ops(conv.tool_config.read_text()) if conv.tool_config is not None else {}
    if fmt == "onnx":
        for key, names in onnx_ops(source.model).items():
            ops.setdefault(key, set()).update(names)
    header = [f"ONNX Runtime operators needed by {MODEL_STEM}.{fmt} (quantface package {__version__}, "
              f"profile {source.profile}).",
              (f"From ONNX Runtime {ort.__version__}'s convert_onnx_models_to_ort (optimization style {style}, "
               f"target {TARGET_PLATFORM})" + (" joined with the graph's own operators, functions inlined."
                                                if fmt == "onnx" else ".")
               if conv.tool_config is not None else
               f"The graph's own operators, functions inlined (ONNX Runtime's converter failed: {conv.convert_error})."),
              "Use: build.py --include_ops_by_config required_operators.config"
              + (" --minimal_build (this model is ORT format)." if fmt == "ort"
                 else " (no --minimal_build: that loads only ORT format models).")]
    return _ops_text(ops, header).encode()


def _manifest(source: _Source, conv: _Converted, staged: Path, contexts: list[QnnContextEntry]) -> ModelManifest:
    fmt = conv.fmt
    return ModelManifest(
        schema=MODEL_JSON_SCHEMA, model_file=staged.name, format=fmt, format_reason=conv.reason,
        bytes=staged.stat().st_size, sha256=sha256_file(staged), profile=source.profile,
        working_size=source.input.shape[-1], input=source.input, output=source.output, contract=Contract(),
        quantization=bits_summary(source.meta),
        runtime=RuntimeInfo(onnxruntime=_ort().__version__, optimization_style=conv.style if fmt == "ort" else None,
                            target_platform=TARGET_PLATFORM if fmt == "ort" else None, session_config={},
                            check=conv.check),
        operators_config=OPS_CONFIG, qnn_contexts=contexts,
        source=SourceInfo(source.path.name, sha256_file(source.path), str(source.meta.get("tool_version", ""))),
        tool_version=__version__)


def package(cfg: PackageConfig) -> PackageResult:
    """Package ``cfg.onnx`` into ``cfg.out`` (and copy it into the demo folders when asked)."""
    cfg.check()
    source = _read_source(cfg)
    out = Path(cfg.out)
    targets = [_demo_dir(cfg.app_assets, APP_ASSETS, "--into-app")] if cfg.into_app else []
    targets += [_demo_dir(cfg.web_model_dir, WEB_MODEL_DIR, "--into-web")] if cfg.into_web else []
    staging = temp_dir(out)  # the whole package folder, renamed onto ``out`` once complete
    work = Path(tempfile.mkdtemp(prefix="work.", dir=staging))
    try:
        conv = _convert_and_check(cfg, source, work)
        ops = _operators_config(source, conv)
        staged = work / f"{MODEL_STEM}.{conv.fmt}"
        shutil.copyfile(conv.ort if conv.fmt == "ort" else source.path, staged)
        contexts, context_files = _qnn_contexts(source.path, work / "qnn", cfg.qnn_context, source.input.name, conv.x)
        manifest = _manifest(source, conv, staged, contexts)
        shutil.rmtree(work / "src", ignore_errors=True)
        shutil.rmtree(work / "ort", ignore_errors=True)
        _install(staging, staged, ops, manifest, context_files)
        shutil.rmtree(work)
        replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result = PackageResult(out, out / manifest.model_file, conv.fmt, conv.reason, manifest)
    for target in targets:
        _install(target, out / manifest.model_file, None, manifest, [out / f.name for f in context_files])
        result.copied_to.append(target)
    return result


def _qnn_contexts(src: Path, work: Path, socs: tuple[str, ...], input_name: str, x: np.ndarray
                  ) -> tuple[list[QnnContextEntry], list[Path]]:
    """Compile ``src`` for each SoC, load each context back on the HTP and compare it with the plain
    graph there (``export.qnn_ep``); the entries and the files to install."""
    if not socs:
        return [], []
    from quantface.export.qnn_ep import compile_context, get_target, open_htp_session

    entries, files = [], []
    for soc in socs:
        target = get_target(soc)
        ctx = compile_context(src, work / f"{MODEL_STEM}_{target.soc}_ctx.onnx", target)
        plain = open_htp_session(src, target).run(None, {input_name: x})[0]
        loaded = open_htp_session(ctx.onnx, target, cpu_fallback=False).run(None, {input_name: x})[0]
        entries.append(QnnContextEntry(
            target.soc, target.marketing, target.soc_model, target.htp_arch, ctx.onnx.name, sha256_file(ctx.onnx),
            ctx.binary.name, sha256_file(ctx.binary), ctx.bytes, round(ctx.compile_s, 3),
            float(np.max(np.abs(loaded - plain)))))
        files += [ctx.onnx, ctx.binary]
    return entries, files


def _demo_dir(given: str | None, default: Path, flag: str) -> Path:
    if given:
        return Path(given)
    if not (REPO / "android_demo").is_dir():
        raise PackageError(f"{flag} needs this repository's android_demo/ folder next to quantface/, "
                           f"which {REPO} does not have")
    return REPO / default


def _install(folder: Path, model_file: Path, ops: bytes | None, manifest: ModelManifest, extras: list[Path] = ()
             ) -> None:
    """Put the model, the ``extras`` (QNN contexts) and the operator config into ``folder``
    atomically, model.json last; drop a model of the other format and QNN context files left there by
    an earlier run (an app would otherwise ship contexts its model.json no longer lists)."""
    folder.mkdir(parents=True, exist_ok=True)
    name = manifest.model_file
    for extra in extras:
        atomic_copy(extra, folder / extra.name)
    atomic_copy(model_file, folder / name)
    if ops is not None:
        atomic_write_bytes(folder / OPS_CONFIG, ops)
    for stale in (f"{MODEL_STEM}.onnx", f"{MODEL_STEM}.ort"):
        if stale != name:
            (folder / stale).unlink(missing_ok=True)
    listed = {f for c in manifest.qnn_contexts for f in (c.model_file, c.binary_file)}
    for old in folder.iterdir():
        if _is_context_file(old.name) and old.name not in listed and old.is_file():
            old.unlink()
    atomic_write_bytes(folder / MODEL_JSON, manifest.dumps().encode())
