"""A run, typed: what a checkpoint holds (Run) and how a run's folder is laid out (RunFolder).

Nothing else reads a checkpoint's fields by name or spells a run file's name. Run.load
checks the file (checkpoint.py) and refuses, in one line, a field this version does
not know, naming the field and the versions involved, before anything is built from it.
"""
import fcntl
import hashlib
import json
import os
import socket
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

import torch

from abcgpt.core.atomic import write_json
from abcgpt.core.checkpoint import CheckpointError, copy_checkpoint, load_checkpoint, save_checkpoint
from abcgpt.core.errors import SettingsError
from abcgpt.data.corpus import Corpus, DataError, check_source_name, file_sha256, is_source_name, parse_sources
from abcgpt.data.tokenizer import UnknownCharactersError, tokenizer_from_dict
from abcgpt.model.gpt import GPT, GPTConfig

from .config import DEFAULT_OUT_DIR, TrainConfig

VERSION = "0.1.0"  # of abcgpt, recorded in every checkpoint it writes
LEGACY_MODEL_FIELDS = {"gate_backend"}  # model settings of older versions, ignored on load


@dataclass
class Run:
    """The fields of a checkpoint. model and optimizer are state dicts; the rest plain values."""

    model: dict
    model_config: GPTConfig
    tokenizer: dict
    step: int = 0
    train_config: Optional[TrainConfig] = None
    optimizer: Optional[dict] = None
    source_names: list = field(default_factory=list)
    source_sha256: list = field(default_factory=list)  # of each source's text, in source_names' order
    val_losses: dict = field(default_factory=dict)  # the held-out losses at step
    seed: Optional[int] = None
    tokens_seen: list = field(default_factory=list)  # training tokens drawn from each source
    best_val_loss: Optional[float] = None  # the run's best held-out score so far
    dial_map: Optional[dict] = None  # the calibrated dial (calibrate.py)
    run_id: Optional[str] = None  # the same in every checkpoint of one run, its best.pt too (None: older versions)
    version: str = VERSION  # of abcgpt, where it wrote the checkpoint
    format: str = ""  # of the file, as load found it
    weights_sha256: Optional[str] = None  # of the model's tensors, as load found them (weights_digest)

    NOT_SAVED = ("format", "weights_sha256")  # facts of the file read, not fields of the run

    @classmethod
    def load(cls, path) -> "Run":
        state = load_checkpoint(path)
        written_by = f"written by abcgpt {state.get('version', 'before 0.1.0')} ({state['format']})"
        known = {f.name for f in fields(cls)} - set(cls.NOT_SAVED)
        unknown = sorted(set(state) - known - {"format", "checksums"})
        if unknown:
            raise CheckpointError(f"{path} has field {unknown[0]!r}, which abcgpt {VERSION} does not know: it was "
                                  f"{written_by}; use that version")
        values = {k: state[k] for k in known if k in state}
        try:
            values["model_config"] = _config(GPTConfig, state["model_config"], "model_config", LEGACY_MODEL_FIELDS)
            if state.get("train_config") is not None:
                values["train_config"] = _config(TrainConfig, state["train_config"], "train_config", set())
            run = cls(**values, format=state["format"], weights_sha256=weights_digest(state))
        except KeyError as e:
            raise CheckpointError(f"{path} lacks {e.args[0]!r}: it is not a whole run ({written_by})") from None
        except (SettingsError, _UnknownSetting) as e:
            raise CheckpointError(f"{path}: {e} ({written_by}; this is abcgpt {VERSION})") from None
        bad = run.non_finite_tensor()
        if bad is not None:
            raise CheckpointError(f"{path} holds a non-finite value (NaN or inf) in {bad}: it is not a usable run; "
                                  "use an earlier checkpoint or train again")
        return run

    def non_finite_tensor(self):
        """The name of the first weight or optimizer moment holding a NaN or an infinity, None if all are finite:
        one reduction per tensor."""
        moments = {f"optimizer moment {k}/{name}": v for k, state in (self.optimizer or {}).get("state", {}).items()
                   for name, v in state.items()}
        for name, value in {**{f"weight {k}": v for k, v in self.model.items()}, **moments}.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                return name
        return None

    def save(self, path) -> None:
        save_checkpoint(self.to_state(), path)

    def to_state(self) -> dict:
        state = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.NOT_SAVED}
        state["model_config"] = self.model_config.to_dict()
        state["train_config"] = self.train_config.to_dict() if self.train_config is not None else None
        state["version"] = VERSION
        return state

    def build_model(self, device="cpu", backend="auto", path="the checkpoint") -> tuple:
        """(model, tokenizer) ready for inference with the given gate backend."""
        try:
            model = GPT(self.model_config, backend)
            model.load_state_dict(self.model)
            tokenizer = tokenizer_from_dict(self.tokenizer)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            reason = " ".join(line.strip() for line in str(e).strip().splitlines())
            raise CheckpointError(f"{path} does not hold a usable model: {reason}") from None
        return model.to(device).eval(), tokenizer


def weights_digest(state):
    """One sha256 of a checkpoint's model tensors, from the checksums it carries (None for the old format, which
    has none): the same for two files that hold the same weights, whatever else (a map, a step) differs."""
    tensors = (state.get("checksums") or {}).get("tensors")
    if not tensors:
        return None
    model = sorted((path, d) for path, d in tensors.items() if path.startswith("/model/"))
    return hashlib.sha256(repr(model).encode()).hexdigest()


class _UnknownSetting(Exception):
    pass


def _config(kind, values, name, legacy):
    unknown = sorted(set(values) - {f.name for f in fields(kind)} - legacy)
    if unknown:
        raise _UnknownSetting(f"its {name} has setting {unknown[0]!r}, which this version does not know")
    return kind.from_dict(values)


class RunFolder:
    """A run's folder: its latest checkpoint, its best one, its log, and its baselines' folders."""

    FILES = ("ckpt.pt", "best.pt", "log.jsonl")

    def __init__(self, path):
        self.path = Path(path)

    def __str__(self):
        return str(self.path)

    @classmethod
    def of(cls, checkpoint) -> "RunFolder":
        """The folder a checkpoint file is in."""
        return cls(Path(checkpoint).parent)

    @property
    def checkpoint(self) -> Path:
        return self.path / self.FILES[0]  # the latest state, written at every evaluation

    @property
    def best(self) -> Path:
        return self.path / self.FILES[1]  # the state with the lowest held-out loss so far

    @property
    def log(self) -> Path:
        return self.path / self.FILES[2]

    def baseline(self, source) -> "RunFolder":
        """Where train.py --baselines trains a vanilla GPT on one source alone."""
        return RunFolder(self.path / f"baseline-{check_source_name(source)}")

    def run_files(self) -> list:
        """The names of the run files that exist here."""
        return [name for name in self.FILES if (self.path / name).exists()]

    def holds_only_a_log(self) -> bool:
        """Whether this folder holds the log of a run that saved no checkpoint, and nothing else of a run."""
        return self.run_files() == [self.FILES[2]]

    @property
    def evaluation(self) -> Path:
        return self.path / "eval.json"  # evaluate.py's sweep of the latest checkpoint, which report.py reuses

    @property
    def manifest(self) -> Path:
        return self.path / "manifest.json"  # what the runs in this folder wrote here: all that --overwrite removes

    def recorded(self) -> list:
        """The names of the files and folders a run recorded writing here (a folder of an older version, which
        kept no manifest: its run files)."""
        try:
            names = json.loads(self.manifest.read_text())["written"]
        except (OSError, ValueError, KeyError, TypeError):
            return self.run_files()
        return [n for n in names if isinstance(n, str) and (n in self.FILES or self._is_baseline_name(n))]

    @staticmethod
    def _is_baseline_name(name):
        """Whether name is one RunFolder.baseline gives: a manifest holds names, never paths."""
        return name.startswith("baseline-") and is_source_name(name.removeprefix("baseline-"))

    def record(self, *names) -> None:
        """Add names (files or folders in this folder) to what the manifest says a run wrote here."""
        written = list(dict.fromkeys([*self.recorded(), *names]))
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.manifest, {"written": written})

    @contextmanager
    def lock(self):
        """Hold the folder as its one writer: an OS lock on .lock, which names the holder (pid, host, start)
        for whoever comes second. The OS lets go of a dead holder's lock, so a stale file is taken over."""
        created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.path / ".lock"
        while True:
            handle = _open_lock(path)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise SettingsError(f"{self} is being written by {holder}: wait for it to finish, or stop it "
                                    "first") from None
            if path.exists() and os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                break  # not a file its last holder removed as we opened it
            handle.close()
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # while still held: nobody takes a lock on a file about to go
            handle.close()
            if created and not any(self.path.iterdir()):  # a run that wrote nothing leaves nothing behind
                self.path.rmdir()

    def save(self, run: Run, best=False) -> None:
        """The latest checkpoint, and the same bytes as the best one too when best."""
        run.save(self.checkpoint)
        if best:  # no second round of hashing, writing and reading back
            copy_checkpoint(self.checkpoint, self.best)


DEFAULT_CHECKPOINT = str(RunFolder(DEFAULT_OUT_DIR).checkpoint)  # every tool's --ckpt unless given


@contextmanager
def editing(path):
    """A tool's change to the checkpoint at path: its folder held (RunFolder.lock) from before the checkpoint is
    read until the change is saved. Yields save(run), which writes run over path only while path is still the
    file it was when the edit began (its sha256): a writer that ignored the lock is not undone."""
    path = Path(path)
    with RunFolder.of(path).lock():
        began = identity(path)

        def save(run):
            if identity(path) != began:
                raise changed_meanwhile(path, run.step)
            run.save(path)

        yield save


def identity(path):
    """The sha256 of a checkpoint file, None where there is none (or no regular file: a pipe is never waited
    on): whether it is still the file once read."""
    try:
        return file_sha256(path)
    except OSError:
        return None


def changed_meanwhile(path, step_read):
    """The refusal to write over a checkpoint that another writer replaced since it was read at step_read."""
    try:
        now = f"step {load_checkpoint(path).get('step')}"
    except CheckpointError:
        now = "not a readable checkpoint"
    return CheckpointError(f"{path} changed while this tool worked on it (step {step_read} then, {now} now): "
                           "nothing was written; run it again")


def _open_lock(path):
    """The lock file, opened for reading and writing: a regular file or nothing (then made). A link is never
    followed (its target would be written), and a folder, a pipe or a device at that name is refused."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as e:
        kind = "a link" if path.is_symlink() else "a folder" if path.is_dir() else e.strerror
        raise SettingsError(f"{path} is not a lock file ({kind}): remove it if no abcgpt tool is using this "
                            "folder") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SettingsError(f"{path} is not a lock file (a pipe or a device): remove it if no abcgpt tool is "
                            "using this folder")
    return os.fdopen(fd, "r+")


def load_model(path, device="cpu", backend="auto"):
    """(model, tokenizer, run) of a checkpoint, the model ready for inference with the given gate backend."""
    run = Run.load(path)
    model, tokenizer = run.build_model(device, backend, path)
    return model, tokenizer, run


def corpus_for(run, tokenizer, sources=None, cache_dir=None):
    """The run's sources (or local copies named alike), split and tokenized as the run had them."""
    config = run.train_config
    sources = parse_sources(sources or config.sources)
    if [s.name for s in sources] != run.source_names:
        raise DataError(f"the checkpoint was trained on {run.source_names}, in that order; name the same sources")
    try:
        corpus = Corpus.from_sources(sources, tokenizer, config.val_fraction, cache_dir or config.cache_dir or None)
    except UnknownCharactersError as e:
        raise DataError(f"the sources have text the checkpoint's tokenizer lacks: {e}") from None
    changed = changed_sources(run, corpus)
    for spec in sources:
        digests = changed.get(spec.name)
        if digests:
            raise DataError(f"source {spec.name!r}: {spec.path or 'the built-in copy'} is not the text the checkpoint "
                            f"was trained on under that name (sha256 {digests['to'][:12]}..., trained on "
                            f"{digests['from'][:12]}...)")
    return corpus


def changed_sources(run, corpus) -> dict:
    """The sources whose text is not what the run recorded, as {name: {"from": recorded, "to": now}}
    (older checkpoints recorded no sha256: nothing to compare)."""
    return {name: {"from": recorded, "to": now} for name, recorded, now
            in zip(corpus.names, run.source_sha256, corpus.sha256) if recorded is not None and recorded != now}


def load_gated_run(path, device="cpu", sources=None, cache_dir=None):
    """(model, tokenizer, run, corpus) of a gated checkpoint, with its sources as it was trained on them."""
    model, tokenizer, run = load_model(path, device)
    if not model.config.gated:
        raise CheckpointError(f"{path} holds a vanilla (ungated) model: there is no dial to sweep")
    return model, tokenizer, run, corpus_for(run, tokenizer, sources, cache_dir)


def require_two_source_line(run, path, what):
    """Refuse, in one line, a run whose dial is not the two-source line that `what` is made for."""
    geometry, names = run.model_config.geometry, run.source_names
    if geometry != "line" or len(names) != 2:
        raise CheckpointError(f"{path} has {len(names)} sources on the {geometry} dial; {what} is a two-source "
                              "feature (for many sources: evaluate.py, sample.py --voice and python -m bench.voices)")
