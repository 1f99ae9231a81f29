"""Where a tool may write (abcgpt/core/outputs.py): refused before any work, in one line, unless the path is
new or the tool's own kind of output; never a system folder, a special file or a folder."""
import os

import pytest

from abcgpt.core.errors import SettingsError
from abcgpt.core.outputs import check_out_dir, check_out_file, check_output, is_json_object, named_path, resolved


def is_ours(path):
    return path.read_text() == "ours"


def test_a_new_file_or_one_of_the_tools_own_kind_is_accepted(tmp_path):
    assert check_output(tmp_path / "new.txt", "--out", "a note", is_ours) == tmp_path / "new.txt"
    (tmp_path / "old.txt").write_text("ours")
    assert check_output(tmp_path / "old.txt", "--out", "a note", is_ours) == tmp_path / "old.txt"


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("someone else's"), "exists and is not a note; refusing to write over it"),
    (lambda p: p.mkdir(), "is a folder, not a file"),
    (lambda p: os.mkfifo(p), "is not a regular file"),
    (lambda p: p.symlink_to(p.parent / "nowhere"), "is not a regular file"),
])
def test_anything_else_at_the_path_is_refused_and_kept(tmp_path, make, message):
    path = tmp_path / "out.txt"
    make(path)
    before = path.read_text() if path.is_file() else None
    with pytest.raises(SettingsError, match=message):
        check_output(path, "--out", "a note", is_ours)
    assert (path.read_text() if path.is_file() else None) == before


def test_system_folders_missing_folders_and_empty_names_are_refused(tmp_path):
    with pytest.raises(SettingsError, match="system folder"):
        check_output("/proc/self/out.txt", "--out", "a note", is_ours)
    with pytest.raises(SettingsError, match="does not exist"):
        check_output(tmp_path / "missing" / "out.txt", "--out", "a note", is_ours)
    with pytest.raises(SettingsError, match="--out is empty"):
        named_path("  ", "--out")
    with pytest.raises(SettingsError, match="system folder"):
        check_out_dir("/sys/kernel", "--out_dir")


def test_a_checkpoint_is_never_written_over_as_another_output(tmp_path):
    with pytest.raises(SettingsError, match="named like\\) a checkpoint"):
        check_out_file(tmp_path / "eval.pt", "--out", "an evaluation", lambda _: True)


def test_a_folder_that_is_a_file_or_a_loop_of_links_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SettingsError, match="is a file, not a folder"):
        check_out_dir(tmp_path / "file")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(SettingsError, match="loop of symbolic links"):
        resolved(loop, "--out")


def test_a_tools_json_is_known_by_its_keys(tmp_path):
    path = tmp_path / "report.json"
    path.write_text('{"sources": [], "corner_loss": 1}')
    assert is_json_object(path, "sources", "corner_loss") and not is_json_object(path, "losses")
    path.write_text("[1, 2]")
    assert not is_json_object(path) and not is_json_object(tmp_path / "missing.json")
