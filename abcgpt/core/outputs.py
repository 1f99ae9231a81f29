"""Where a tool may write, checked before any work starts, so that a bad flag costs a one-line error and
never a lost minute or a file of another kind: never a system folder, a special file or a folder; never
over a file that is not the tool's own output. And stdout, once its reader has gone."""
import json
import os
import sys
import zipfile
from pathlib import Path

from .errors import SettingsError


def discard_stdout():
    """Send what is still to be printed nowhere: the reader of stdout has gone (| head)."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


SYSTEM_FOLDERS = ("/dev", "/proc", "/sys")  # never written into, through a link or not


def named_path(path, flag) -> Path:
    """An output path as given; an empty one is refused (Path("") would be the current folder)."""
    if not str(path).strip():
        raise SettingsError(f"{flag} is empty: name a path")
    return Path(path)


def resolved(path, flag) -> Path:
    """path with every link followed; a loop of links (or one too deep) is refused in one line."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError):  # Python 3.11 raises RuntimeError for a loop, later versions OSError
        raise SettingsError(f"{flag}: {path} is a loop of symbolic links") from None


def _system_path(path, flag):
    where = str(resolved(path, flag))
    return any(where == top or where.startswith(top + "/") for top in SYSTEM_FOLDERS)


def _writable_folder(folder, flag):
    if _system_path(folder, flag):
        raise SettingsError(f"{flag}: {folder} is a system folder; refusing to write there")
    if folder.exists() and not folder.is_dir():
        raise SettingsError(f"{flag}: {folder} is a file, not a folder")
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SettingsError(f"{flag}: cannot write into {probe} (no write permission)")


def is_json_object(path, *keys):
    """Whether path holds a JSON object with these keys: how a tool knows its own JSON output."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(record, dict) and all(k in record for k in keys)


def check_output(path, flag, kind, is_kind):
    """A file a tool is about to write, refused before any work unless it is new or the tool's own kind of
    output (is_kind(path) says; kind names it): never a device, FIFO or other special file, never into
    /dev, /proc or /sys, never a folder, and never over a file that is not that kind of output."""
    path = named_path(path, flag)
    if _system_path(path, flag):
        raise SettingsError(f"{flag}: {path} is in a system folder; refusing to write there")
    if not path.parent.is_dir():
        raise SettingsError(f"{flag}: the folder {path.parent} does not exist")
    _writable_folder(path.parent, flag)
    if path.is_dir():
        raise SettingsError(f"{flag}: {path} is a folder, not a file")
    if path.exists() or path.is_symlink():
        if not path.is_file():
            raise SettingsError(f"{flag}: {path} is not a regular file (a device, a pipe or a broken link); "
                                "refusing to write over it")
        if not is_kind(path):
            raise SettingsError(f"{flag}: {path} exists and is not {kind}; refusing to write over it")
    return path


def check_out_file(path, flag, kind, is_kind):
    """A non-checkpoint output file (see check_output): also refused where it is named like a checkpoint."""
    if Path(path).suffix == ".pt" or (Path(path).is_file() and zipfile.is_zipfile(path)):
        raise SettingsError(f"{flag}: {path} is (or is named like) a checkpoint; refusing to write over it")
    return check_output(path, flag, kind, is_kind)


def check_out_dir(path, flag="--out_dir"):
    """Refuse an output folder that is a file or a system folder, or cannot be created or written."""
    path = named_path(path, flag)
    _writable_folder(path, flag)
    return path
