"""A training run's checkpoints: what a new run may write over, what a resume must match, and the check
that nothing non-finite is ever saved."""
import math
import zipfile

import torch

from abcgpt.core import outputs
from abcgpt.core.checkpoint import CheckpointError
from abcgpt.core.errors import SettingsError, UserError

from .config import ARCHITECTURE
from .run import changed_sources


class TrainingDiverged(UserError, RuntimeError):
    """The loss, a gradient, a weight or a held-out loss went NaN or infinite."""


def check_run_folder(folder, resume, overwrite):
    """Refuse, before any work, an out_dir that cannot be written, or one whose run a new run would replace
    without overwrite; return what the new run replaces: exactly what the old one recorded writing there."""
    outputs.check_out_dir(folder.path, "out_dir")
    for path in (folder.checkpoint, folder.best):
        if path.exists() and not (path.is_file() and zipfile.is_zipfile(path)):
            raise SettingsError(f"out_dir: {path} is not a checkpoint; refusing to write over it")
    existing = folder.run_files()
    if folder.holds_only_a_log() and not resume and not overwrite:
        raise SettingsError(f"out_dir {folder} holds only the log of a run that saved no checkpoint: start that "
                            "run from nothing with --resume (its log is kept), or clear it with --overwrite")
    if existing and not resume and not overwrite:
        raise SettingsError(f"out_dir {folder} already holds a run ({', '.join(existing)}): continue it with "
                            "--resume, or replace it with --overwrite")
    return [] if resume else [folder.path / name for name in folder.recorded()] + [folder.manifest]


def check_same_sources(run, corpus, new_sources):
    """A resume trains on the text its run recorded (sha256), unless new_sources: then the changes, as
    {name: {"from": recorded, "to": now}}, for the log."""
    changed = changed_sources(run, corpus)
    if changed and not new_sources:
        name, digests = next(iter(changed.items()))
        raise SettingsError(f"source {name!r} is not the text the run was trained on (sha256 {digests['to'][:12]}..., "
                            f"trained on {digests['from'][:12]}...): give the run's own files, or --new_sources to "
                            "go on with these (the log records the change)")
    return changed


def check_resumable(run, config):
    """A resume must train the same model on the same sources as the run it continues."""
    saved = run.train_config
    changed = [k for k in ARCHITECTURE if getattr(saved, k) != getattr(config, k)]
    if changed:
        raise CheckpointError(
            f"cannot resume with a different {', '.join(changed)} than the checkpoint's "
            f"({', '.join(f'{k}={getattr(saved, k)!r}' for k in changed)})"
        )
    if run.source_names != [s.partition("=")[0].strip() for s in config.sources]:
        raise CheckpointError(f"cannot resume with other sources than the checkpoint's {run.source_names}")


@torch.no_grad()
def non_finite_state(model, optimizer, losses):
    """What, if anything, of the weights, the optimizer's moments and the held-out losses is not finite."""
    moments = [v for state in optimizer.state.values() for v in state.values()
               if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0]
    for what, tensors in (("a weight", list(model.parameters())), ("an optimizer moment", moments)):
        # one fused pass: a non-finite entry makes its tensor's norm non-finite
        if tensors and not torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all():
            return what
    if any(not math.isfinite(v) for v in (losses or {}).values()):
        return "a held-out loss"
    return None


def diverged(step, what, folder, saved_step):
    kept = (f"the last good checkpoint is {folder.checkpoint} (step {saved_step})" if saved_step is not None
            else "no checkpoint had been written")
    return TrainingDiverged(f"training diverged at step {step}: {what} is not finite (NaN or inf); nothing after it "
                            f"was saved and {kept}. Try a lower learning_rate, or grad_clip")
