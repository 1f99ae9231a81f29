"""One base for errors a user can fix: the tools print those in one line and let every other exception,
a bug, keep its traceback."""
import importlib

import pytest

from abcgpt.core.checkpoint import CheckpointError
from abcgpt.core.errors import SettingsError, UserError
from abcgpt.data.corpus import DataError
from abcgpt.data.tokenizer import UnknownCharactersError, VocabularyError
from abcgpt.serving.server import BadInput
from abcgpt.training.trainer import TrainingDiverged


def test_every_user_error_shares_the_base():
    for error in (CheckpointError, DataError, SettingsError, VocabularyError, UnknownCharactersError,
                  TrainingDiverged, BadInput):
        assert issubclass(error, UserError), error


@pytest.mark.parametrize("tool, target", [("evaluate", "load_gated_run"), ("sample", "load_model"),
                                          ("report", "load_gated_run"), ("calibrate", "load_gated_run")])
def test_a_bug_keeps_its_traceback_and_a_user_error_is_one_line(tool, target, monkeypatch, capsys, tmp_path):
    module = importlib.import_module(f"abcgpt.tools.{tool}")
    args = ["--ckpt", str(tmp_path / "ckpt.pt")] + (["--out_dir", str(tmp_path / "r")] if tool == "report" else [])

    def bug(*_, **__):
        raise ValueError("an internal bug")

    monkeypatch.setattr(module, target, bug)
    with pytest.raises(ValueError, match="an internal bug"):  # not swallowed into a one-line exit
        module.main(args)

    def user_error(*_, **__):
        raise CheckpointError("the checkpoint is damaged")

    monkeypatch.setattr(module, target, user_error)
    with pytest.raises(SystemExit) as exit_:
        module.main(args)
    assert exit_.value.code == "error: the checkpoint is damaged"
