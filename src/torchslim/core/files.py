"""Files: atomic writes, and the table of model file formats chosen by suffix.

Each format (``.safetensors`` model files, ``.tslim`` compressed files, ``.onnx`` engine files) registers how to
save a model to that suffix and how to load it back; ``torchslim.save`` / ``torchslim.load`` and ``Result.save``
pick the format from the suffix, so no part of the core names a technique or a format.

Example:
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "note.txt")
    >>> write_atomic(path, b"hello")
    >>> open(path, "rb").read()
    b'hello'
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torchslim.core.errors import TorchslimError
from torchslim.core.registry import Registry


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    A crash leaves either the old file or the new one, never a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes 0600; a finished file gets the usual permissions
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def check_writable(path: str | os.PathLike[str], folder: bool = False) -> None:
    """An error now, before any work, when the file (or, with ``folder``, the folder) ``path`` could not be written:
    its nearest existing folder is not a writable folder, or a file is asked for where a folder stands."""
    path = Path(path)
    if not folder and path.is_dir():
        raise TorchslimError(f"{path} is a folder; cannot write a file there")
    ancestor = path.parent if not path.is_dir() else path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise TorchslimError(f"cannot write {path}: {ancestor} is not a writable folder")


def refuse_overwrite(path: str | os.PathLike[str], overwrite: bool) -> None:
    """An error naming ``path`` when it exists and ``overwrite`` is off: nothing a user had is overwritten."""
    if not overwrite and Path(path).exists():
        raise TorchslimError(f"{path} exists; refusing to overwrite it (pass overwrite=True / --force)")


@dataclasses.dataclass(frozen=True)
class ModelFormat:
    """How models are written to and read from files with one suffix.

    ``save(model, path, overwrite)`` writes the file and returns its path; ``load(path, trust_factory)`` rebuilds a
    runnable model; ``sniff(first_bytes)`` (optional) recognises the format from a file's first bytes whatever its
    name.
    """

    suffix: str
    save: Callable[..., Path]
    load: Callable[..., Any] | None = None
    sniff: Callable[[bytes], bool] | None = None


FORMATS: Registry[ModelFormat] = Registry("model file format")


def register_format(model_format: ModelFormat) -> ModelFormat:
    """Add a file format under its suffix (``.tslim``); a second one for the same suffix is an error."""
    return FORMATS.register(model_format.suffix, f"{model_format.suffix} model files")(model_format)


def format_for(path: str | os.PathLike[str], reading: bool = False) -> ModelFormat:
    """The format of ``path``: by its first bytes when reading (where a format can tell), else by its suffix."""
    path = Path(path)
    if reading and path.is_file():
        with open(path, "rb") as handle:
            head = handle.read(64)
        for name in FORMATS.names():
            entry = FORMATS.get(name)
            if entry.sniff is not None and entry.sniff(head):
                return entry
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise TorchslimError(f"{path}: unknown model file suffix {suffix or '(none)'!r}; torchslim writes and reads {', '.join(FORMATS.names())}")
    return FORMATS.get(suffix)


def save_model_file(model: Any, path: str | os.PathLike[str], overwrite: bool = True) -> Path:
    """Write ``model`` in the format its suffix names (see ``FORMATS``)."""
    return format_for(path).save(model, Path(path), overwrite=overwrite)


def load_model_file(path: str | os.PathLike[str], trust_factory: bool | str = False) -> Any:
    """Read a model file of any registered format."""
    path = Path(path)
    if not path.is_file():
        raise TorchslimError(f"{path}: no such model file")
    entry = format_for(path, reading=True)
    if entry.load is None:
        raise TorchslimError(f"{path}: torchslim writes {entry.suffix} files but does not load them back as models")
    return entry.load(path, trust_factory=trust_factory)


__all__ = [
    "FORMATS",
    "ModelFormat",
    "check_writable",
    "format_for",
    "load_model_file",
    "refuse_overwrite",
    "register_format",
    "save_model_file",
    "write_atomic",
]
