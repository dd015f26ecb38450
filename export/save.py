"""Finishing passes and writing: metadata, the ONNX checker, and an atomic save.

Writing is atomic: the model (and, above 2 GB, its external data file ``<name>.data``) is written
into a temporary folder next to the destination (``quantface.paths.temp_dir``: ``.<name>.tmp-*``,
removed by the next write if a run is killed), checked there, then moved into place with
``os.replace`` — data first, model last — so a reader never sees a partial file and a failure
leaves nothing behind.

A graph is one of ours when it carries ``quantface.*`` metadata (``add_metadata``); ``foreign_graph``
gives the sentence for one that does not.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import onnx

from quantface.export.errors import ExportError
from quantface.paths import check_output_file, file_mode, temp_dir

# Protobuf cannot serialise a message of 2 GiB or more; above this the tensors go to external data.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**24  # with a margin for the graph structure itself
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


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of initializer data (computed without serialising, which fails above 2 GiB)."""
    total = 0
    for t in model.graph.initializer:
        total += len(t.raw_data) or t.ByteSize()
    return total


def file_bytes(path: str | Path) -> int:
    """Bytes of a saved model on disk: the file plus its external data file, if it has one."""
    path = Path(path)
    data = path.parent / (path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def save_atomic(model: onnx.ModelProto, path: str | Path) -> int:
    """Check (``onnx.checker``, ``full_check=True``) and write ``model`` to ``path`` atomically;
    returns the bytes written (model plus external data)."""
    path = check_output_file(path, "--out")
    external = tensor_bytes(model) >= EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    tmp = temp_dir(path)
    try:
        target = tmp / path.name
        if external:
            onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
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
