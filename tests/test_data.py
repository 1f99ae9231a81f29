import hashlib
import json
import urllib.error
from pathlib import Path

import pytest
import torch

from abcgpt.data import corpus as data  # "corpus" names a test's corpus
from abcgpt.data.corpus import Corpus, DataError, SourceSpec, download, fetch_builtin, parse_sources, training_batch
from abcgpt.data.tokenizer import CharTokenizer


def test_source_specs():
    assert SourceSpec.parse("tinystories") == SourceSpec("tinystories")
    assert SourceSpec.parse("mine=/tmp/a=b.txt") == SourceSpec("mine", "/tmp/a=b.txt")
    assert [s.name for s in parse_sources("tinystories,x=/a.txt")] == ["tinystories", "x"]
    with pytest.raises(DataError, match="unknown source 'shakespeare'.*NAME=PATH|shakespeare=PATH"):
        SourceSpec.parse("shakespeare")
    with pytest.raises(DataError, match="at least two sources"):
        parse_sources(["a=/x"])
    with pytest.raises(DataError, match="must differ"):
        parse_sources(["a=/x", "a=/y"])
    with pytest.raises(DataError, match="empty path"):
        SourceSpec.parse("a=")


def marked_corpus(val_fraction=0.25):
    """Two sources whose val parts use characters their train parts never use."""
    first = "ab" * 300 + "XY" * 100  # the last quarter is the val split
    second = "cd" * 300 + "ZW" * 100
    tok = CharTokenizer.from_texts([first, second])
    return Corpus(["first", "second"], [tok.encode(first), tok.encode(second)], tok, val_fraction), tok


def test_each_source_is_split_into_train_then_val():
    corpus, tok = marked_corpus()
    assert tok.decode(corpus.train[0].tolist()) == "ab" * 300
    assert tok.decode(corpus.val[0].tolist()) == "XY" * 100
    assert tok.decode(corpus.val[1].tolist()) == "ZW" * 100


@pytest.mark.parametrize("per_sequence", [False, True])
def test_no_val_token_reaches_a_training_batch(per_sequence):
    corpus, tok = marked_corpus()
    val_ids = torch.tensor(tok.encode("XYZW"))
    generator = torch.Generator().manual_seed(0)
    seen = torch.zeros(tok.vocab_size, dtype=torch.bool)
    for _ in range(300):
        x, y, _, _ = training_batch(corpus, 8, 16, generator, per_sequence)
        seen[x.flatten()] = True
        seen[y.flatten()] = True
    assert not seen[val_ids].any()
    assert seen[torch.tensor(tok.encode("abcd"))].all()  # both sources were drawn, up to their last train token


def test_batches_are_next_token_windows_of_one_source():
    corpus, tok = marked_corpus()
    x, y, dial, sources = training_batch(corpus, 16, 12, torch.Generator().manual_seed(1))
    alpha = dial.point
    assert not dial.per_row and alpha.dtype == torch.float32 and 0 <= alpha <= 1
    assert torch.equal(x[:, 1:], y[:, :-1])
    chars = set(tok.decode(torch.cat([x.flatten(), y[:, -1]]).tolist()))
    assert chars <= set("ab") or chars <= set("cd")


def test_per_sequence_batches_draw_alpha_and_source_per_row():
    corpus, tok = marked_corpus()
    x, y, dial, sources = training_batch(corpus, 64, 8, torch.Generator().manual_seed(2), per_sequence=True)
    alpha = dial.point
    assert alpha.shape == (64,) and alpha.dtype == torch.float32 and dial.uniform is None
    from_second = torch.tensor([set(tok.decode(row.tolist())) <= set("cd") for row in x])
    assert torch.equal(from_second, sources == 1)  # the reported sources are the rows' real ones
    assert 0 < from_second.sum() < 64
    # rows from the second source have a higher alpha on average (source 1 with probability alpha)
    assert alpha[from_second].mean() > alpha[~from_second].mean()


def test_missing_and_empty_and_binary_files(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("hello there " * 50)
    with pytest.raises(DataError, match="file not found"):
        Corpus.from_sources([f"a={good}", f"b={tmp_path / 'nope.txt'}"])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="'b'.*is empty"):
        Corpus.from_sources([f"a={good}", f"b={tmp_path / 'empty.txt'}"])
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match="not UTF-8"):
        Corpus.from_sources([f"a={good}", f"b={tmp_path / 'bin.txt'}"])


def test_source_too_short_for_one_block(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 1000)
    (tmp_path / "b.txt").write_text("y" * 50)
    corpus = Corpus.from_sources([f"a={tmp_path / 'a.txt'}", f"b={tmp_path / 'b.txt'}"])
    with pytest.raises(DataError, match="'b': its val split has 5 tokens"):
        corpus.check_block_size(16)


def test_download_slices_records_and_caches(tmp_path, monkeypatch):
    remote = tmp_path / "remote.txt"
    payload = ("Once upon a time é. " * 5000).encode()
    remote.write_bytes(payload)
    want = 30_001  # cuts the 2-byte 'é' in two: the cut character must be dropped on reading
    sha = hashlib.sha256(payload[:want]).hexdigest()
    monkeypatch.setitem(data.BUILTIN_SOURCES, "tinystories", data.BuiltinSource(remote.as_uri(), want, sha))
    cache = tmp_path / "cache"
    path = fetch_builtin("tinystories", cache)
    assert path.read_bytes() == payload[:want]
    record = json.loads((cache / "tinystories.txt.json").read_text())
    assert record == {"url": remote.as_uri(), "bytes": want, "sha256": sha}
    text = data.read_text(SourceSpec("tinystories"), cache)
    assert payload.startswith(text.encode()) and len(text.encode()) >= want - 3
    remote.unlink()  # cached now: no second download
    assert fetch_builtin("tinystories", cache) == path


def test_failed_download_names_the_offline_way_and_leaves_nothing(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(data.urllib.request, "urlopen", refuse)
    monkeypatch.setattr(data, "embedded_text", lambda name: None)  # a package without its own copies
    with pytest.raises(DataError, match=r"could not download source 'tinyshakespeare'"):
        fetch_builtin("tinyshakespeare", tmp_path)
    assert list(tmp_path.iterdir()) == []
    # every missing built-in source at once, in dial order, with a --sources line to copy
    local = tmp_path / "mine.txt"
    local.write_text("a local source")
    with pytest.raises(DataError) as failure:
        Corpus.from_sources(["tinystories", f"mine={local}", "tinyshakespeare"], cache_dir=tmp_path)
    assert str(failure.value).startswith("could not download sources 'tinystories', 'tinyshakespeare' (")
    assert str(failure.value).endswith(
        f"Offline? Use local copies instead: --sources tinystories=/path/to/tinystories.txt,mine={local},"
        "tinyshakespeare=/path/to/tinyshakespeare.txt")


def test_checksum_mismatch_leaves_no_file(tmp_path):
    remote = tmp_path / "remote.txt"
    remote.write_text("tampered")
    dest = tmp_path / "cache" / "x.txt"
    with pytest.raises(DataError, match="checksum"):
        download(remote.as_uri(), dest, sha256="0" * 64)
    assert list(dest.parent.iterdir()) == []


def test_unreadable_source_is_a_clear_error(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("hello there " * 50)
    folder = tmp_path / "folder.txt"
    folder.mkdir()  # exists but cannot be read as a file (root ignores file permissions)
    with pytest.raises(DataError, match=r"source 'b': .*folder.txt is not a regular file"):
        Corpus.from_sources([f"a={good}", f"b={folder}"])


def test_the_default_sources_come_with_the_package_and_need_no_network(tmp_path, monkeypatch):
    """python train.py runs offline: the package's copies are the default downloads, byte for byte (their
    recorded sha256), and reading them opens no connection and writes no cache."""
    def refuse(*args, **kwargs):
        raise AssertionError("a built-in source went to the network")

    monkeypatch.setattr(data.urllib.request, "urlopen", refuse)
    cache = tmp_path / "cache"
    texts = data.read_texts(data.parse_sources(list(data.DEFAULT_SOURCES)), cache)
    assert not cache.exists()
    for name, text in zip(data.DEFAULT_SOURCES, texts):
        assert hashlib.sha256(data.embedded_text(name)).hexdigest() == data.BUILTIN_SOURCES[name].sha256
        assert data.embedded_text(name).startswith(text.encode()) and len(text) > 1_000_000
    notice = (Path(data.__file__).parent / "corpora" / "NOTICE.md").read_text()
    assert "CDLA-Sharing-1.0" in notice and all(name in notice for name in data.DEFAULT_SOURCES)
