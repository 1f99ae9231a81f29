"""Named, ordered text sources: download or read, tokenize, split, draw batches.

Source k of K sits at alpha = k / (K - 1) on the dial, so with two sources
source 0 is alpha 0 and source 1 is alpha 1. Each source is split into train and
val before any batch is drawn; batches come from the train split only.
"""
import errno
import hashlib
import json
import lzma
import os
import re
import stat
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from abcgpt.core.atomic import write_json
from abcgpt.core.errors import UserError
from abcgpt.gates.voice import draw, source_alpha

from .tokenizer import BPETokenizer, CharTokenizer

MiB = 2**20


@dataclass(frozen=True)
class BuiltinSource:
    url: str
    max_bytes: int | None  # download only this many leading bytes (None: the whole file)
    sha256: str  # of the default download, checked after every download


BUILTIN_SOURCES = {
    "tinystories": BuiltinSource(
        url="https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories-train.txt",
        max_bytes=2 * MiB,
        sha256="5352b299dcb1a32898b2d779b145b5a05f3e1265953fd21c264c9f9f9c9ae33d",
    ),
    "tinyshakespeare": BuiltinSource(
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        max_bytes=None,
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    ),
}
DEFAULT_SOURCES = ("tinystories", "tinyshakespeare")


class DataError(UserError, RuntimeError):
    """A source that cannot be had or used; the message says what to do."""


class DownloadError(DataError):
    def __init__(self, name, url, reason):
        super().__init__(f"could not download source {name!r} from {url} ({reason})")
        self.name, self.reason = name, reason


SOURCE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}", re.ASCII)


def is_source_name(name) -> bool:
    """A source's name is data, never a path: letters, digits, '-', '_' and '.', at most 64, not '.' or '..'
    (run folders name files after it, RunFolder.baseline)."""
    return isinstance(name, str) and SOURCE_NAME.fullmatch(name) is not None and name not in (".", "..")


def check_source_name(name):
    """name, refused in one line unless it is a source name (is_source_name)."""
    if not is_source_name(name):
        raise DataError(f"source name {name[:80]!r} is not allowed: use letters, digits, '-', '_' and '.', at "
                        "most 64 characters (not '.' or '..')")
    return name


def default_cache_dir():
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(os.environ.get("ABCGPT_CACHE_DIR") or Path(root) / "abcgpt")


@dataclass(frozen=True)
class SourceSpec:
    name: str
    path: str | None = None  # a local file; None for a built-in source

    @classmethod
    def parse(cls, text):
        """'tinystories' (built in) or 'name=path/to/file.txt' (a local file)."""
        name, sep, path = text.partition("=")
        name = name.strip()
        if not name:
            raise DataError(f"source {text!r} has no name: write NAME or NAME=PATH")
        check_source_name(name)
        if sep:
            if not path:
                raise DataError(f"source {name!r} has an empty path: write {name}=PATH")
            return cls(name, path)
        if name not in BUILTIN_SOURCES:
            raise DataError(
                f"unknown source {name!r}: built in are {', '.join(BUILTIN_SOURCES)}; "
                f"for a local file write {name}=PATH"
            )
        return cls(name)


def split_sources(text):
    """A comma-separated list of sources, where a comma inside a path is written \\, ."""
    parts = re.split(r"(?<!\\),", text)
    return [part.replace("\\,", ",") for part in parts if part.strip()]


def parse_sources(specs):
    """Sources from a list of specs or one comma-separated string; order sets the dial."""
    if isinstance(specs, str):
        specs = split_sources(specs)
    sources = [s if isinstance(s, SourceSpec) else SourceSpec.parse(s) for s in specs]
    if len(sources) < 2:
        raise DataError(f"the dial needs at least two sources, got {len(sources)}")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise DataError(f"source names must differ, got {names}")
    return sources


class NotARegularFile(OSError):
    """A pipe or a device where a file was to be read."""


def open_regular(path):
    """path opened to read its bytes, without waiting (opening a pipe would block, and a device never ends a
    read): IsADirectoryError for a folder, as open() raises it, NotARegularFile for a pipe or a device, other
    OSErrors as open raises them."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        raise NotARegularFile(f"{path} is not a regular file")
    return os.fdopen(fd, "rb")


def file_sha256(path):
    """The sha256 of a regular file's bytes (open_regular's errors otherwise)."""
    digest = hashlib.sha256()
    with open_regular(path) as f:
        for chunk in iter(lambda: f.read(MiB), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url, dest, max_bytes=None, sha256=None, desc=None):
    """Download url (its first max_bytes only, if given) to dest, with a progress bar.

    Writes to a temporary file renamed into place at the end, so a failed or
    interrupted download leaves nothing behind. Records url, size and sha256 beside
    dest in dest + '.json'. Raises DataError on any failure.
    """
    from tqdm.auto import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    written = 0
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as f:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            if max_bytes is not None:
                total = max_bytes if total is None else min(total, max_bytes)
            with tqdm(total=total, unit="B", unit_scale=True, desc=desc or dest.name, leave=False) as bar:
                while max_bytes is None or written < max_bytes:
                    want = MiB if max_bytes is None else min(MiB, max_bytes - written)
                    chunk = response.read(want)
                    if not chunk:
                        break
                    f.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
        if written == 0:
            raise DataError(f"downloading {url} gave an empty file")
        if sha256 is not None and digest.hexdigest() != sha256:
            raise DataError(
                f"{url} does not match its recorded checksum (sha256 {digest.hexdigest()}, "
                f"expected {sha256}): the file may have changed upstream or been corrupted"
            )
        os.replace(part, dest)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    record = {"url": url, "bytes": written, "sha256": digest.hexdigest()}
    write_json(dest.with_name(dest.name + ".json"), record, DataError)
    return record


def embedded_text(name):
    """The bytes of a built-in source's default download from the copy this package ships (xz-compressed, see
    corpora/NOTICE.md), where there is one and it is that download (its recorded sha256); else None."""
    copy = resources.files("abcgpt.data") / "corpora" / f"{name}.txt.xz"
    if not copy.is_file():
        return None
    raw = lzma.decompress(copy.read_bytes())
    return raw if hashlib.sha256(raw).hexdigest() == BUILTIN_SOURCES[name].sha256 else None


def writable_cache(folder):
    """Refuse, as what it is, a cache folder that cannot be made or written: not a network failure."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot make the cache folder {folder} ({e.strerror}): give --cache_dir a folder you can "
                        "write, or set ABCGPT_CACHE_DIR") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DataError(f"cannot write into the cache folder {folder} (no write permission): give --cache_dir a "
                        "folder you can write, or set ABCGPT_CACHE_DIR")


def fetch_builtin(name, cache_dir=None):
    """Path to the cached copy of a built-in source, downloaded on first use."""
    source = BUILTIN_SOURCES[name]
    path = Path(cache_dir or default_cache_dir()) / f"{name}.txt"
    record_path = path.with_name(path.name + ".json")
    if path.exists() and record_path.exists():
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            record = {}
        if record.get("sha256") == file_sha256(path):
            return path
        print(f"cached {path} does not match its record; downloading it again")
    writable_cache(path.parent)
    try:
        download(source.url, path, source.max_bytes, source.sha256, desc=name)
    except (urllib.error.URLError, OSError) as e:  # HTTPError and timeouts are URLError/OSError
        raise DownloadError(name, source.url, getattr(e, "reason", None) or e) from None
    return path


def read_texts(sources, cache_dir=None):
    """The text of every source; built-in sources that cannot be downloaded are named all at once,
    in dial order, with a --sources line that uses local copies instead."""
    texts, missing = [], []
    for spec in sources:
        try:
            texts.append(read_text(spec, cache_dir))
        except DownloadError as e:
            missing.append(e)
    if missing:
        names = [e.name for e in missing]
        line = ",".join(f"{s.name}={s.path or f'/path/to/{s.name}.txt'}" for s in sources)
        raise DataError(f"could not download source{'s' if len(names) > 1 else ''} {', '.join(map(repr, names))} "
                        f"({missing[0].reason}). Offline? Use local copies instead: --sources {line}")
    return texts


def read_text(spec, cache_dir=None):
    """The raw text of one source, as is (no lowercasing, no cleaning). A built-in source is read from the
    package's own copy, without a network; from the cache or a download where the package has none."""
    if spec.path is not None:
        path = Path(spec.path)
        raw = read_file(spec.name, path)
    else:
        path, raw = "the package's copy", embedded_text(spec.name)
        if raw is None:
            path = fetch_builtin(spec.name, cache_dir)
            raw = read_file(spec.name, path)
    if spec.path is None and BUILTIN_SOURCES[spec.name].max_bytes is not None:
        raw = _drop_cut_character(raw)  # a byte slice may end inside a multi-byte character
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"source {spec.name!r}: {path} is not UTF-8 text (byte {e.start})") from None
    if not text:
        raise DataError(f"source {spec.name!r}: {path} is empty")
    return text


def read_file(name, path):
    """The bytes of source name's local file."""
    try:
        with open_regular(path) as f:
            return f.read()
    except (NotARegularFile, IsADirectoryError):
        raise DataError(f"source {name!r}: {path} is not a regular file (a folder, a pipe or a device)") from None
    except FileNotFoundError:
        raise DataError(f"source {name!r}: file not found: {path}") from None
    except OSError as e:
        raise DataError(f"source {name!r}: cannot read {path}: {e.strerror}") from None


def _drop_cut_character(raw):
    for cut in range(4):
        try:
            raw[: len(raw) - cut].decode("utf-8")
            return raw[: len(raw) - cut]
        except UnicodeDecodeError:
            continue
    return raw  # invalid well before the end: let the caller report it


def make_tokenizer(kind, texts):
    if kind == "char":
        return CharTokenizer.from_texts(texts)
    if kind == "bpe":
        return BPETokenizer("gpt2")
    raise DataError(f"unknown tokenizer {kind!r}: use 'char' or 'bpe'")


def source_alphas(n_sources):
    """Where each source sits on the line dial: evenly from 0 to 1."""
    return [source_alpha(k, n_sources) for k in range(n_sources)]


class Corpus:
    """Tokenized sources, each split into a train and a val part before any batch is drawn."""

    def __init__(self, names, token_lists, tokenizer, val_fraction=0.1, sha256=None):
        """sha256: of each source's text, recorded in checkpoints so that another text under the
        same name is noticed."""
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
        self.names = list(names)
        self.sha256 = list(sha256) if sha256 is not None else [None] * len(self.names)
        self.tokenizer = tokenizer
        self.train, self.val = [], []
        for name, ids in zip(self.names, token_lists):
            ids = torch.as_tensor(ids, dtype=torch.long)
            n_val = max(1, round(len(ids) * val_fraction))
            self.train.append(ids[: len(ids) - n_val])
            self.val.append(ids[len(ids) - n_val :])

    @classmethod
    def from_sources(cls, sources, tokenizer="char", val_fraction=0.1, cache_dir=None):
        """sources: specs (see parse_sources); tokenizer: 'char', 'bpe' or a tokenizer object."""
        sources = parse_sources(sources)
        texts = read_texts(sources, cache_dir)
        if isinstance(tokenizer, str):
            tokenizer = make_tokenizer(tokenizer, texts)
        tokens = [tokenizer.encode(t) for t in texts]
        digests = [hashlib.sha256(t.encode("utf-8")).hexdigest() for t in texts]
        return cls([s.name for s in sources], tokens, tokenizer, val_fraction, digests)

    @property
    def alphas(self):
        return source_alphas(len(self.names))

    def check_block_size(self, block_size):
        for name, train, val in zip(self.names, self.train, self.val):
            for split, ids in (("train", train), ("val", val)):
                if len(ids) < block_size + 1:
                    raise DataError(
                        f"source {name!r}: its {split} split has {len(ids)} tokens, fewer than one "
                        f"block of {block_size} + 1; use more text or a smaller block_size"
                    )

    def batch(self, split, sources, block_size, generator):
        """One sequence per entry of sources (a tensor of source indices): inputs and targets."""
        data = self.train if split == "train" else self.val
        x = torch.empty(len(sources), block_size, dtype=torch.long)
        y = torch.empty_like(x)
        for k in sources.unique().tolist():
            rows = (sources == k).nonzero().flatten()
            starts = torch.randint(len(data[k]) - block_size, (len(rows),), generator=generator)
            windows = data[k][starts[:, None] + torch.arange(block_size + 1)]
            x[rows], y[rows] = windows[:, :-1], windows[:, 1:]
        return x, y


def training_batch(corpus, batch_size, block_size, generator, per_sequence=False, geometry="line",
                   uniform_share=0.0, concentration=0.5):
    """Inputs, targets, the dial and each row's source for one training (micro-)batch (voice.draw).

    per_sequence=False (the reference recipe): one dial and one source for the whole batch.
    per_sequence=True: each sequence draws its own dial and source.
    """
    dial, sources = draw(batch_size if per_sequence else 1, len(corpus.names), geometry, generator, uniform_share,
                         concentration)
    if not per_sequence:
        dial, sources = dial.row(0), sources.expand(batch_size)
    x, y = corpus.batch("train", sources, block_size, generator)
    return x, y, dial, sources
