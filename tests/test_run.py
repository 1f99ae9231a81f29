"""The typed run: a checkpoint's fields round-trip through Run, the run folder's layout is RunFolder's,
and a field this version does not know is refused in one line that names it and the versions."""
import pytest

from abcgpt.core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from abcgpt.training.run import VERSION, Run, RunFolder


def test_a_run_round_trips(trained_checkpoint, tmp_path):
    run = Run.load(trained_checkpoint)
    assert run.step == 6 and run.source_names == ["stories", "plays"] and run.train_config.max_iters == 6
    run.save(tmp_path / "copy.pt")
    again = Run.load(tmp_path / "copy.pt")
    assert again.to_state().keys() == run.to_state().keys()
    assert again.model_config == run.model_config and again.train_config == run.train_config
    assert again.version == VERSION


@pytest.mark.parametrize("where, field", [("top", "future_field"), ("model_config", "n_experts"),
                                          ("train_config", "schedule")])
def test_an_unknown_field_is_refused_naming_it_and_the_versions(trained_checkpoint, tmp_path, where, field):
    state = {k: v for k, v in load_checkpoint(trained_checkpoint).items() if k not in ("format", "checksums")}
    state["version"] = "9.9.0"
    if where == "top":
        state[field] = 1
    else:
        state[where] = {**state[where], field: 1}
    save_checkpoint(state, tmp_path / "future.pt")
    with pytest.raises(CheckpointError) as error:
        Run.load(tmp_path / "future.pt")
    message = str(error.value)
    assert repr(field) in message and "9.9.0" in message and VERSION in message and "\n" not in message


def test_the_run_folder_names_every_file(tmp_path):
    folder = RunFolder(tmp_path)
    assert folder.run_files() == []
    for path in (folder.checkpoint, folder.best, folder.log):
        path.write_text("x")
    assert folder.run_files() == ["ckpt.pt", "best.pt", "log.jsonl"]
    assert RunFolder.of(folder.checkpoint).path == tmp_path
    assert folder.baseline("plays").path == tmp_path / "baseline-plays"


def test_a_write_that_fails_is_one_line_and_keeps_the_old_file(trained_checkpoint, tmp_path, monkeypatch):
    """A full disk or a file-size limit while saving: one line, no half-written file, the old one intact."""
    import errno
    import shutil

    import torch

    path = tmp_path / "ckpt.pt"
    shutil.copy(trained_checkpoint, path)
    before = path.read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="could not write .*No space left on device"):
        Run.load(path).save(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_inspect_shows_each_source_and_the_units_it_owns(voices_checkpoint, trained_checkpoint):
    from abcgpt.tools.inspect import describe
    from abcgpt.training.run import Run

    run = Run.load(voices_checkpoint)
    text = "\n".join(describe(voices_checkpoint, run))
    assert "on the pool dial (shared share 0.75)" in text
    owned = [int((t.max(-1).values == 1).sum()) for t in (run.model[k] for k in run.model if k.endswith("_scores"))]
    per_source = [sum(int((t[:, k] == 1).sum()) for name, t in run.model.items() if name.endswith("_scores"))
                  for k in range(3)]
    assert sum(per_source) == sum(owned)
    for k, name in enumerate(["stories", "plays", "words"]):
        assert f"vertex {k} ({per_source[k]:,} units): {name}" in text
    line = "\n".join(describe(trained_checkpoint, Run.load(trained_checkpoint)))
    assert "alpha 0: stories" in line and "alpha 1: plays" in line
