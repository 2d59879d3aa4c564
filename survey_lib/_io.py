"""Atomic file writes (a reader never sees a half-written file) and one way for readers to reject bad files.

Every reader of a survey_lib file format decodes inside :func:`reading`: a low-level decode error
(``struct.error``, ``zlib.error``, ``KeyError``, ``UnpicklingError``, a torch shape error, ...) becomes a
:class:`FileFormatError` (a ``ValueError``) that names the file, the format and what is wrong. A missing
file stays a ``FileNotFoundError``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator


def _file_mode(path: Path) -> int:
    """The permissions ``path`` has, or those ``open(path, "w")`` would give a new file (0o666 less the umask)."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place.

    The file ends with the permissions a plain ``open(path, "w")`` gives (mkstemp's 0600 is not kept), and an
    existing file keeps its own."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, mode)
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically."""
    import torch

    return atomic_write(path, lambda p: torch.save(obj, p))


# ----------------------------------------------------------------------------------------------------------
# Reading: bad files become one clear error
# ----------------------------------------------------------------------------------------------------------

DECODE_ERRORS: tuple[type[BaseException], ...] = (
    struct.error, zlib.error, pickle.UnpicklingError, EOFError, ImportError, KeyError, IndexError, TypeError,
    AttributeError, ValueError, OverflowError, RuntimeError, MemoryError,
)


class FileFormatError(ValueError):
    """A file that exists but is not a valid file of the expected format; the message names both."""


def not_valid(source: str | os.PathLike, fmt: str, what: str) -> FileFormatError:
    """``FileFormatError("{source}: not a valid {fmt}: {what}")``."""
    return FileFormatError(f"{source}: not a valid {fmt}: {what}")


def _describe(err: BaseException) -> str:
    """What went wrong, in words, from a low-level decode error."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if text.startswith("[ONNXRuntimeError]"):  # "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model from X failed:Y"
        return text.rsplit("failed:", 1)[-1].strip() if "failed:" in text else text.rsplit(" : ", 1)[-1]
    if isinstance(err, KeyError):
        return f"entry {text} is missing"
    if isinstance(err, struct.error):
        return f"truncated or corrupt binary field ({text})"
    if isinstance(err, zlib.error):
        return f"corrupt compressed data ({text})"
    if isinstance(err, (pickle.UnpicklingError, EOFError)):
        return f"truncated or corrupt pickle ({text or type(err).__name__})"
    if isinstance(err, UnicodeDecodeError):
        return "header is not UTF-8 text"
    if isinstance(err, json.JSONDecodeError):
        return f"header is not valid JSON ({text})"
    if isinstance(err, MemoryError):
        return "header asks for a tensor too large to allocate"
    if type(err) is ValueError and text:  # a check's own message says what is wrong
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


@contextlib.contextmanager
def reading(source: str | os.PathLike, fmt: str, errors: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Decode inside this block: a low-level error (or one of ``errors``) becomes :class:`FileFormatError`
    ``"{source}: not a valid {fmt}: {what}"``; FileNotFoundError and other OS errors pass through."""
    try:
        yield
    except OSError:
        raise
    except FileFormatError as err:  # from a nested reader (e.g. a Huffman table inside a file): name the file too
        if str(err).startswith(f"{source}: "):
            raise
        raise not_valid(source, fmt, str(err)) from err
    except DECODE_ERRORS + tuple(errors) as err:
        raise not_valid(source, fmt, _describe(err)) from err


def check_magic(data: bytes, magic: bytes, source: str | os.PathLike, fmt: str) -> None:
    """Raise FileFormatError unless ``data`` starts with ``magic`` (an empty file says so)."""
    if not data:
        raise not_valid(source, fmt, "the file is empty")
    if data[: len(magic)] != magic:
        raise not_valid(source, fmt, f"bad magic: expected {magic!r}, got {bytes(data[:len(magic)])!r}")


def as_path(path: Any, param: str = "path") -> Path:
    """``path`` as a Path; TypeError naming ``param`` unless it is a str or os.PathLike."""
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{param} must be a str or os.PathLike, got {type(path).__name__} ({path!r})")
    return Path(path)


def read_file(path: Any, param: str = "path") -> tuple[Path, bytes]:
    """(Path, bytes) of the file at ``path``: TypeError for a non-path, FileNotFoundError naming a missing file."""
    p = as_path(path, param)
    if not p.exists():
        raise FileNotFoundError(f"{param}={str(p)!r}: no such file")
    return p, p.read_bytes()


def check_bytes(param: str, data: Any) -> bytes | bytearray | memoryview:
    """Return ``data`` if it is bytes, bytearray or memoryview; TypeError naming ``param`` otherwise."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{param} must be bytes (or bytearray/memoryview), got {type(data).__name__}")
    return data


def take(data: bytes, start: int, n: int, source: str | os.PathLike, fmt: str, what: str) -> bytes:
    """``data[start:start + n]``; FileFormatError "truncated" when the file ends before it (or n < 0)."""
    if start < 0 or n < 0 or start + n > len(data):
        raise not_valid(source, fmt, f"truncated: the {what} needs bytes {start}..{start + n}, the file has {len(data)}")
    return data[start:start + n]
