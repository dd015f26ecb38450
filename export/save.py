"""Finishing passes and writing: metadata, the ONNX checker, and an atomic save.

Writing is atomic: the model (and, above 2 GB, its external data file ``<name>.data``) is written
into a temporary folder next to the destination (``quantface.paths.temp_dir``: ``.<name>.tmp-*``,
removed by the next write if a run is killed), checked there, then moved into place with
``os.replace`` — data first, model last — so a reader never sees a partial file and a failure
leaves nothing behind.

A graph is one of ours when it carries ``quantface.*`` metadata (``add_metadata``); ``foreign_graph``
gives the sentence for one that does not.

External data: every initializer of 1 KB or more goes to ``<name>.data``, one after another, from
memory or — for initializers that are already references into another file (the trace of a graph of
2 GB or more, ``export.trace``) — copied from that file in chunks, so no protobuf of 2 GB or more is
serialised or held in memory.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import onnx
from onnx import external_data_helper

from quantface.export.errors import ExportError
from quantface.paths import check_output_file, file_mode, temp_dir

# Protobuf cannot serialise a message of 2 GiB or more; above this the tensors go to external data.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**24  # with a margin for the graph structure itself
EXTERNAL_MIN_BYTES = 1024  # initializers below this stay inside the model file
COPY_CHUNK = 1 << 24
METADATA_PREFIX = "quantface."


def add_metadata(model: onnx.ModelProto, entries: dict[str, object]) -> onnx.ModelProto:
    """Requires: nothing. Ensures: ``metadata_props`` hold ``quantface.<key>`` for every entry
    (strings as they are, anything else as JSON), replacing earlier values of those keys."""
    props = {p.key: p.value for p in model.metadata_props}
    for key, value in entries.items():
        props[METADATA_PREFIX + key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    return model


def read_metadata(model: onnx.ModelProto) -> dict[str, str]:
    """The ``quantface.*`` metadata of a model, prefix stripped."""
    n = len(METADATA_PREFIX)
    return {p.key[n:]: p.value for p in model.metadata_props if p.key.startswith(METADATA_PREFIX)}


def foreign_graph(path: str | Path, metadata_keys: Iterable[str]) -> str | None:
    """None for a graph with ``quantface.*`` metadata; else the sentence saying it has none."""
    if any(k.startswith(METADATA_PREFIX) for k in metadata_keys):
        return None
    return f"{path} has no quantface metadata: it is not a graph written by quantface export"


def external_length(tensor: onnx.TensorProto, base_dir: str | Path | None) -> int:
    """Bytes of an initializer stored as external data (relative to ``base_dir``)."""
    info = external_data_helper.ExternalDataInfo(tensor)
    if info.length is not None:
        return info.length
    if base_dir is None:
        raise ExportError(f"initializer {tensor.name} is external data but no folder to read it from was given")
    return (Path(base_dir) / info.location).stat().st_size - (info.offset or 0)


def tensor_bytes(model: onnx.ModelProto, base_dir: str | Path | None = None) -> int:
    """Bytes of initializer data, in memory or external (computed without serialising, which fails
    above 2 GiB)."""
    total = 0
    for t in model.graph.initializer:
        if external_data_helper.uses_external_data(t):
            total += external_length(t, base_dir)
        else:
            total += len(t.raw_data) or t.ByteSize()
    return total


def read_external(tensor: onnx.TensorProto, base_dir: str | Path) -> None:
    """Load an initializer's external data (relative to ``base_dir``) into the tensor itself."""
    if base_dir is None:
        raise ExportError(f"initializer {tensor.name} is external data but no folder to read it from was given")
    external_data_helper.load_external_data_for_tensor(tensor, str(base_dir))
    tensor.data_location = onnx.TensorProto.DEFAULT
    del tensor.external_data[:]


def _write_external(model: onnx.ModelProto, data_path: Path, base_dir: str | Path | None) -> None:
    """Move every initializer of ``EXTERNAL_MIN_BYTES`` or more into ``data_path`` (see the module
    docstring); the model's tensors then reference it."""
    offset = 0
    with open(data_path, "wb") as out:
        for t in model.graph.initializer:
            if external_data_helper.uses_external_data(t):
                info = external_data_helper.ExternalDataInfo(t)
                length = external_length(t, base_dir)
                with open(Path(base_dir) / info.location, "rb") as src:
                    src.seek(info.offset or 0)
                    left = length
                    while left:
                        chunk = src.read(min(left, COPY_CHUNK))
                        if not chunk:
                            raise ExportError(f"the external data of initializer {t.name} is truncated")
                        out.write(chunk)
                        left -= len(chunk)
            elif t.HasField("raw_data") and len(t.raw_data) >= EXTERNAL_MIN_BYTES:
                length = len(t.raw_data)
                out.write(t.raw_data)
                t.ClearField("raw_data")
            else:
                continue
            del t.external_data[:]
            for key, value in (("location", data_path.name), ("offset", str(offset)), ("length", str(length))):
                t.external_data.add(key=key, value=value)
            t.data_location = onnx.TensorProto.EXTERNAL
            offset += length
    if not offset:
        data_path.unlink()


def file_bytes(path: str | Path) -> int:
    """Bytes of a saved model on disk: the file plus its external data file, if it has one."""
    path = Path(path)
    data = path.parent / (path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def save_atomic(model: onnx.ModelProto, path: str | Path, base_dir: str | Path | None = None) -> int:
    """Check (``onnx.checker``, ``full_check=True``) and write ``model`` to ``path`` atomically;
    returns the bytes written (model plus external data). Initializers stored as external data are
    read relative to ``base_dir``; the written model no longer refers to it."""
    path = check_output_file(path, "--out")
    external = tensor_bytes(model, base_dir) >= EXTERNAL_DATA_THRESHOLD or \
        any(external_data_helper.uses_external_data(t) for t in model.graph.initializer)
    data_name = path.name + ".data"
    tmp = temp_dir(path)
    try:
        target = tmp / path.name
        if external:
            _write_external(model, tmp / data_name, base_dir)
            onnx.save_model(model, str(target))
            onnx.checker.check_model(str(target), full_check=True)
        else:
            onnx.checker.check_model(model, full_check=True)
            onnx.save_model(model, str(target))
        written = sum(f.stat().st_size for f in tmp.iterdir())
        for f in tmp.iterdir():
            os.chmod(f, file_mode())
        if (tmp / data_name).exists():  # absent when no tensor reached size_threshold
            os.replace(tmp / data_name, path.parent / data_name)
        os.replace(target, path)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the exported graph fails the ONNX checker: {str(exc).splitlines()[0]}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written
