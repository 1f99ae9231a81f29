"""What the command-line tools share: help layout, device and thread flags, and the one catch of a user's
mistake. What a tool may write is checked in abcgpt.core.outputs."""
import argparse
import functools
import os
import sys

import torch

from abcgpt.core import limits
from abcgpt.core.device import resolve_device
from abcgpt.core.errors import UserError
from abcgpt.core.outputs import discard_stdout
from abcgpt.core.preflight import check_memory, generation_bytes
from abcgpt.serving.settings import MAX_NEW_TOKENS, check_new_tokens


def run_tool(main):
    """Run a tool's main() as its command line: output line by line even into a file or pipe, Ctrl-C ends
    it with one line and status 130, and a reader that goes away (| head) ends it quietly."""
    sys.stdout.reconfigure(line_buffering=True)
    try:
        main()
    except SystemExit as e:
        if isinstance(e.code, str):  # an error message: one line, whatever a name or path in it holds
            sys.exit(one_line(e.code))
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)  # 128 + SIGINT
    except BrokenPipeError:
        discard_stdout()  # no second error as Python exits
        sys.exit(141)  # 128 + SIGPIPE, as a shell reports a pipe's writer that was cut off


def user_errors(main):
    """A tool's main(argv), where a mistake the user can fix (UserError) ends the tool with its one line,
    error: ..., and a non-zero exit: the one place the tools catch it."""

    @functools.wraps(main)
    def tool(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            sys.exit(f"error: {e}")

    return tool


def one_line(message: str) -> str:
    """message with its line breaks written out (\\n), as a path or a name given by a user may hold them."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


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
        self.exit(2, f"error: {one_line(message)} (see --help)\n")


def add_runtime_flags(parser, device=True):
    """The flags of how a tool runs (not what it computes), for every tool; device=False where --device is
    a setting of its own (train.py's, saved with the run). Returns the names of the flags added."""
    if device:
        parser.add_argument("--device", default="auto", help="auto (CUDA if there is one), cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch; unset: torch's choice (1 is often fastest on a shared machine)")
    return ["device", "threads"] if device else ["threads"]


def add_generation_flags(parser, samples, samples_help, tokens):
    """--samples and --max_new_tokens, one name for each in every tool (the older names stay as aliases)."""
    parser.add_argument("--samples", "--num_samples", type=int, default=samples, help=samples_help)
    parser.add_argument("--max_new_tokens", "--sample_tokens", type=int, default=tokens,
                        help=f"tokens to generate per sample, at most {MAX_NEW_TOKENS:,}")


def check_generation_flags(args, device, config):
    """--samples at least 1, --max_new_tokens within its bound, and room for --samples rows in memory."""
    limits.check("samples", args.samples, "--samples")
    check_new_tokens(args.max_new_tokens, "--max_new_tokens", least=1)
    check_memory(generation_bytes(config, args.samples), device, f"generating {args.samples:,} samples at once")


def add_source_flags(parser):
    """--sources and --cache_dir, for tools that read a run's sources again."""
    parser.add_argument("--sources", help="NAME or NAME=PATH, comma-separated (default: the run's own)")
    parser.add_argument("--cache_dir", default=None, help="where built-in sources are cached (default: the run's)")


def apply_runtime_flags(args):
    """Resolve --device (where the tool has it) and apply --threads; SettingsError for either one being wrong."""
    if "device" in vars(args):
        args.device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(limits.check("threads", args.threads, "--threads"))
    elif sys.stderr.isatty():  # a hint for a person at a terminal; logs and tests stay as they are
        hint = busy_machine_hint()
        if hint:
            print(hint, file=sys.stderr)


def busy_machine_hint(load=None, cores=None):
    """A one-line note when other work already keeps this machine's cores busy: torch's default threads
    then fight it, and one thread can be several times faster."""
    load = os.getloadavg()[0] if load is None else load
    cores = len(os.sched_getaffinity(0)) if cores is None else cores
    if cores > 1 and load >= cores - 0.5:
        return (f"note: this machine is busy (load {load:.1f} on {cores} cores); --threads 1 may be several times "
                "faster")
    return None


def check_max_windows(value):
    """--max_windows: unset (every window), or within its limit."""
    return value if value is None else limits.check("max_windows", value, "--max_windows")
