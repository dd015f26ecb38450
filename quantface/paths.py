"""Where outputs go: output-path checks, atomic writes of files and folders, recognisable temp names.

Every command checks its output paths with ``check_output_file`` / ``check_output_dir`` before any
work starts, so a bad ``--out`` / ``--output`` / ``--json`` is one ``ConfigError`` sentence, not a
traceback after minutes of compute.

Writes are atomic. A file is written under a temporary name beside its target, then renamed over it
(``atomic_write_bytes``, ``atomic_copy``, ``atomic_path`` for writers that take a file name); a folder is built complete under a temporary name beside
its target, then swapped in (``temp_dir`` + ``replace_dir``), so the target never exists half-made.
Every temporary name has the form ``.<target name>.tmp-<random>`` (``TEMP_MARKER``): a run killed
halfway leaves only such names, and the next write to the same target removes them
(``clean_stale_temps``). Written files get the usual mode of a new file (0666 less the umask), not
``mkstemp``'s 0600; folders 0777 less the umask.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from quantface.errors import ConfigError

TEMP_MARKER = ".tmp-"


def temp_prefix(target: str | Path) -> str:
    """The prefix of every temporary name made for ``target``: ``.<name>.tmp-``."""
    return f".{Path(target).name}{TEMP_MARKER}"


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 less the umask."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode ``mkdir`` gives a new folder: 0777 less the umask."""
    return 0o777 & ~_umask()


# ------------------------------------------------------------------------------------------ checks
def _first_existing_ancestor(path: Path, flag: str) -> Path:
    """The nearest existing ancestor of ``path``; a ``ConfigError`` if it is not a writable folder."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path} lies under {parent}, which is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path} cannot be created: folder {parent} is not writable")
    return parent


def check_output_file(path: str | Path, flag: str) -> Path:
    """``path`` can be written as a file: not an existing folder, not under a file, in a writable
    place. An existing file is fine (it is replaced atomically)."""
    path = Path(path)
    if not str(path) or str(path).endswith(("/", "\\")):
        raise ConfigError(f"{flag} {str(path)!r} must name a file")
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is an existing folder; it must name a file")
    if path.exists() and not path.is_file():
        raise ConfigError(f"{flag} {path} exists and is not a regular file")
    _first_existing_ancestor(path, flag)
    if path.exists() and not os.access(path.parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path} cannot be replaced: folder {path.parent} is not writable")
    return path


def check_output_dir(path: str | Path, flag: str) -> Path:
    """``path`` can be used as an output folder: an existing folder, or creatable (not a file, not
    under a file, in a writable place)."""
    path = Path(path)
    if not str(path):
        raise ConfigError(f"{flag} must name a folder")
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{flag} {path} is an existing file; it must name a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{flag} {path} is not a writable folder")
        return path
    _first_existing_ancestor(path, flag)
    return path


def check_input_file(path: str | Path, what: str) -> Path:
    """``path`` is an existing regular file, else one sentence naming it as ``what``."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{what} {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"{what} {path} is not a file")
    return path


def check_input_dir(path: str | Path, what: str, needs: tuple[str, ...] = ()) -> Path:
    """``path`` is an existing folder holding the files ``needs``, else one sentence naming it."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise ConfigError(f"{what} {path} is not a folder")
    for name in needs:
        if not (path / name).is_file():
            raise ConfigError(f"{what} {path} has no {name}")
    return path


# ---------------------------------------------------------------------------------- temp handling
def clean_stale_temps(target: str | Path) -> list[Path]:
    """Remove what an interrupted earlier write to ``target`` left beside it (``.<name>.tmp-*``);
    returns what was removed."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    removed = []
    for stale in target.parent.glob(f"{_glob_escape(temp_prefix(target))}*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


def _glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def temp_dir(target: str | Path) -> Path:
    """A new empty folder ``.<name>.tmp-<random>`` beside ``target`` (parents created, stale temps
    of ``target`` removed first), with the usual folder mode; build the target's content in it and
    ``replace_dir`` it into place."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target), dir=target.parent))
    os.chmod(tmp, dir_mode())
    return tmp


def replace_dir(tmp: str | Path, target: str | Path) -> Path:
    """Move the complete folder ``tmp`` to ``target``. An existing ``target`` is renamed aside first
    (to a temp name), the new folder renamed in, and only then the old one deleted: at every moment
    ``target`` is either the old complete folder or the new one."""
    tmp, target = Path(tmp), Path(target)
    old = None
    if target.exists() or target.is_symlink():
        if not target.is_dir() or target.is_symlink():
            raise ConfigError(f"{target} exists and is not a folder")
        old = Path(tempfile.mkdtemp(prefix=temp_prefix(target), dir=target.parent))
        os.replace(target, old)  # renaming a folder onto an empty folder replaces it (POSIX)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


# -------------------------------------------------------------------------------- atomic writers
def _atomic_file(path: Path, fill) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            fill(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """For writers that take a file name (safetensors, onnx): yields a temporary path beside ``path``;
    what was written there is renamed onto ``path`` when the block ends, and removed if it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and an atomic rename."""
    _atomic_file(Path(path), lambda f: f.write(data))


def atomic_copy(src: str | Path, path: str | Path) -> None:
    """Copy the file ``src`` to ``path`` atomically (temporary file beside ``path``, then rename)."""
    def fill(f):
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f, 1 << 20)
    _atomic_file(Path(path), fill)


__all__ = ["TEMP_MARKER", "atomic_copy", "atomic_path", "atomic_write_bytes", "check_input_dir", "check_input_file",
           "check_output_dir", "check_output_file",
           "clean_stale_temps", "dir_mode", "file_mode", "replace_dir", "temp_dir", "temp_prefix"]
