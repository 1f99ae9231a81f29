"""Every file a tool writes is written whole or not at all: filled under a temporary name in the same folder,
flushed to disk, then renamed over the old one. A failed write leaves the old file as it was and says so in
one line."""
import json
import math
import os
from pathlib import Path

from .errors import UserError


class OutputError(UserError, OSError):
    """An output that could not be written; the old file, if any, is untouched."""


def write_atomically(path, fill, error=OutputError):
    """fill(tmp) writes the new content to the path tmp; it replaces path only once it is all on disk."""
    path = Path(path)
    existed = path.exists()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")  # the suffix: a plot's format
    try:
        fill(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a file-size limit, a folder gone: the old file stays
        tmp.unlink(missing_ok=True)
        kept = "it is as it was before" if existed else "nothing was written"
        raise error(f"could not write {path}: {e.strerror or e}; {kept}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path, text: str, error=OutputError):
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), error)


def save_figure(fig, path, dpi=120, error=OutputError):
    """A matplotlib figure as an image file, its format taken from path's suffix."""
    return write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=dpi), error)


def strict(value):
    """value with every non-finite float (NaN, inf) as None: what strict JSON can hold."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def write_json(path, record, error=OutputError):
    """Strict JSON (a non-finite number as null), indented, with one trailing newline."""
    return write_text(path, json.dumps(strict(record), indent=1, allow_nan=False) + "\n", error)
