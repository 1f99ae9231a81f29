"""What the command-line tools share: help layout, device and thread flags, and output checks made
before any work starts, so a bad flag costs a one-line error, not a lost minute."""
import argparse
import math
import os
import zipfile
from pathlib import Path

import torch

from .device import resolve_device
from .errors import SettingsError


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every flag's default where there is one to show: not for an unset
    value, an on/off switch, or a flag whose help already says what its default is."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse, with a bad flag answered in one line like every other error (no usage dump)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def add_runtime_flags(parser, device=True):
    """The flags of how a tool runs (not what it computes), for every tool; device=False where --device is
    a setting of its own (train.py's, saved with the run). Returns the names of the flags added."""
    if device:
        parser.add_argument("--device", default="auto", help="auto (CUDA if there is one), cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch; unset: torch's choice (1 is often fastest on a shared machine)")
    return ["device", "threads"] if device else ["threads"]


def add_source_flags(parser):
    """--sources and --cache_dir, for tools that read a run's sources again."""
    parser.add_argument("--sources", help="NAME or NAME=PATH, comma-separated (default: the run's own)")
    parser.add_argument("--cache_dir", default=None, help="where built-in sources are cached (default: the run's)")


def apply_runtime_flags(args):
    """Resolve --device (where the tool has it) and apply --threads; SettingsError for either one being wrong."""
    if "device" in vars(args):
        args.device = resolve_device(args.device)
    if args.threads is not None:
        if args.threads < 1:
            raise SettingsError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)


def positive(name, value, allow_none=False):
    """value, refused unless it is a finite number above 0."""
    if value is None and allow_none:
        return value
    if value is None or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise SettingsError(f"{name} must be a positive number, got {value}")
    return value


def _writable_folder(folder, flag):
    if folder.exists() and not folder.is_dir():
        raise SettingsError(f"{flag}: {folder} is a file, not a folder")
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SettingsError(f"{flag}: cannot write into {probe} (no write permission)")


def check_out_file(path, flag="--out"):
    """Refuse an output file that cannot be written, or one that would write over a checkpoint."""
    path = Path(path)
    if not path.parent.is_dir():
        raise SettingsError(f"{flag}: the folder {path.parent} does not exist")
    _writable_folder(path.parent, flag)
    if path.is_dir():
        raise SettingsError(f"{flag}: {path} is a folder, not a file")
    if path.suffix == ".pt" or (path.is_file() and zipfile.is_zipfile(path)):
        raise SettingsError(f"{flag}: {path} is (or is named like) a checkpoint; refusing to write over it")
    return path


def check_out_dir(path, flag="--out_dir"):
    """Refuse an output folder that is a file or cannot be created or written."""
    path = Path(path)
    _writable_folder(path, flag)
    return path
