"""The training loop: the reference recipe (or per-sequence alpha) over a Corpus.

Single process or DDP under torchrun, as nanoGPT does it. Each micro-batch
seeds its data and dropout from (seed, step, its index among all micro-batches
of the step): a resumed run continues exactly as if it had never stopped, and N
processes with grad_accum G see the same data as one process with the same G.
"""
import json
import math
import os
import signal
import threading
import time
from contextlib import contextmanager, nullcontext

import torch
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP

from . import backends, cli
from .checkpoint import CheckpointError
from .config import ARCHITECTURE, TrainConfig
from .data import Corpus, training_batch
from .device import resolve_device
from .errors import SettingsError, UserError
from .evaluate import val_loss
from .model import GPT
from .run import Run, RunFolder
from .tokenizer import tokenizer_from_dict

EVAL_ALPHAS = (0.0, 0.5, 1.0)


class TrainingDiverged(UserError, RuntimeError):
    """The loss, a gradient, a weight or a held-out loss went NaN or infinite."""


def learning_rate_at(step, config):
    """Linear warm-up, then cosine decay to min_lr at decay_iters, then min_lr."""
    if step < config.warmup_iters:
        return config.learning_rate * (step + 1) / (config.warmup_iters + 1)
    if step >= config.decay_iters:
        return config.min_lr
    progress = (step - config.warmup_iters) / max(1, config.decay_iters - config.warmup_iters)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.learning_rate - config.min_lr)


def format_seconds(seconds):
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def micro_batch_seed(seed, step, index):
    # distinct for every (step, index) with index < 2**20: no two micro-batches share a stream
    return (seed * 2**40 + step * 2**20 + index) % 2**63


def resolve_dtype(name, device_type):
    if name == "auto":
        if device_type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def check_run_folder(folder, resume, overwrite):
    """Refuse, before any work, an out_dir that cannot be written, or one whose run a new run would replace
    without overwrite; return the old run's files that the new run replaces."""
    cli.check_out_dir(folder.path, "out_dir")
    existing = folder.run_files()
    if existing and not resume and not overwrite:
        raise SettingsError(f"out_dir {folder} already holds a run ({', '.join(existing)}): continue it with "
                         "--resume, or replace it with --overwrite")
    return [] if resume else existing


def finite_json(record):
    """record with non-finite floats as null, so that log lines are strict JSON."""
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in record.items()}


class Trainer:
    """Trains a gated GPT as config says; resume=True continues the run in config.out_dir."""

    def __init__(self, config: TrainConfig, resume=False, corpus=None, log=print, overwrite=False):
        """overwrite: start afresh in an out_dir that holds a run (its checkpoints and log are replaced)."""
        self.config = config
        self.log_line = log
        self._setup_distributed()
        self.folder = RunFolder(config.out_dir)
        # an old run's files go only once this one is set up and starts, so a setup error loses nothing
        self.replaced = check_run_folder(self.folder, resume, overwrite) if self.is_master else []
        saved = Run.load(self.folder.checkpoint) if resume else None
        if saved is not None:
            self._check_resumable(saved)

        tokenizer = tokenizer_from_dict(saved.tokenizer) if saved else config.tokenizer
        cache_dir = config.cache_dir or None
        self.corpus = corpus or Corpus.from_sources(config.sources, tokenizer, config.val_fraction, cache_dir)
        self.corpus.check_block_size(config.block_size)

        self.model_config = config.model_config(self.corpus.tokenizer.vocab_size)
        torch.manual_seed(config.seed)  # weight init
        self.model = GPT(self.model_config, config.gate_backend).to(self.device)
        self.optimizer = self.model.configure_optimizers(
            config.weight_decay, config.learning_rate, (config.beta1, config.beta2), self.device_type
        )
        self.step = 0
        self.local_tokens = [0] * len(self.corpus.names)  # per source, this process (+ a resumed total on rank 0)
        self.best_val_loss = math.inf
        self.last_losses = {}  # the latest held-out losses
        self.saved_step = None  # the step of the last checkpoint written by this run
        self.first_bad_step = torch.tensor(-1, device=self.device)  # first step with a NaN/inf loss or gradient
        self.stop_requested = self.interrupted = False
        if saved is not None:
            self.best_val_loss = saved.best_val_loss if saved.best_val_loss is not None else math.inf
            self.last_losses = saved.val_losses
            self.saved_step = self.step = saved.step
            self.model.load_state_dict(saved.model)
            self.optimizer.load_state_dict(saved.optimizer)
            if self.is_master and saved.tokens_seen:
                self.local_tokens = list(saved.tokens_seen)
        if config.only_source and config.only_source not in self.corpus.names:
            raise SettingsError(f"only_source {config.only_source!r} is not one of the sources {self.corpus.names}")

        dtype = resolve_dtype(config.dtype, self.device_type)
        self.autocast = (
            nullcontext() if dtype == torch.float32 else torch.autocast(device_type=self.device_type, dtype=dtype)
        )
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=dtype == torch.float16)
        self.forward_model = torch.compile(self.model) if config.compile else self.model
        if self.ddp:
            self.forward_model = DDP(self.forward_model, device_ids=[self.local_rank] if self.device_type == "cuda" else None)

    def _setup_distributed(self):
        config = self.config
        self.ddp = int(os.environ.get("RANK", -1)) != -1
        if self.ddp:
            self.rank = int(os.environ["RANK"])
            self.local_rank = int(os.environ["LOCAL_RANK"])
            self.world_size = int(os.environ["WORLD_SIZE"])
            use_cuda = resolve_device(config.device).startswith("cuda")
            init_process_group(backend="nccl" if use_cuda else "gloo")
            self.device = f"cuda:{self.local_rank}" if use_cuda else "cpu"
            if use_cuda:
                torch.cuda.set_device(self.device)
            if config.grad_accum % self.world_size:
                raise SettingsError(
                    f"grad_accum ({config.grad_accum}) must be a multiple of the number of processes ({self.world_size})"
                )
            self.micro_steps = config.grad_accum // self.world_size
        else:
            self.rank, self.local_rank, self.world_size = 0, 0, 1
            self.device = resolve_device(config.device)
            self.micro_steps = config.grad_accum
        self.device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        self.is_master = self.rank == 0

    def _check_resumable(self, run):
        saved = run.train_config
        changed = [k for k in ARCHITECTURE if getattr(saved, k) != getattr(self.config, k)]
        if changed:
            raise CheckpointError(
                f"cannot resume with a different {', '.join(changed)} than the checkpoint's "
                f"({', '.join(f'{k}={getattr(saved, k)!r}' for k in changed)})"
            )
        if run.source_names != [s.partition("=")[0].strip() for s in self.config.sources]:
            raise CheckpointError(f"cannot resume with other sources than the checkpoint's {run.source_names}")

    def log(self, record, line=None):
        """Print one line (line, or the record) and append the record to the run's log (master only)."""
        if not self.is_master:
            return
        self.log_line(line or " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in record.items()))
        self.folder.path.mkdir(parents=True, exist_ok=True)
        with open(self.folder.log, "a") as f:
            f.write(json.dumps(finite_json(record), allow_nan=False) + "\n")

    @torch.no_grad()
    def evaluate(self):
        """Each source's held-out loss at alpha 0, 0.5 and 1: evaluate.val_loss on the same
        eval_iters * batch_size windows of the val split every time."""
        self.model.eval()
        losses = {}
        alphas = EVAL_ALPHAS if self.config.gated else (None,)
        windows = self.config.eval_iters * self.config.batch_size
        for name, ids in zip(self.corpus.names, self.corpus.val):
            if self.config.only_source and name != self.config.only_source:
                continue
            for alpha in alphas:
                with self.autocast:
                    loss = val_loss(self.model, ids, alpha, self.config.batch_size, windows, self.device)
                losses[f"val/{name}" if alpha is None else f"val/{name}@{alpha:g}"] = loss
        self.model.train()
        return losses

    def tokens_seen(self):
        """Training tokens drawn from each source so far, over all processes (all must call this)."""
        counts = torch.tensor(self.local_tokens, dtype=torch.long, device=self.device)
        if self.ddp:
            torch.distributed.all_reduce(counts)
        return counts.tolist()

    def run_state(self):
        return Run(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(), model_config=self.model_config,
                   train_config=self.config, tokenizer=self.corpus.tokenizer.to_dict(), source_names=self.corpus.names,
                   source_sha256=self.corpus.sha256, val_losses=self.last_losses, step=self.step, seed=self.config.seed,
                   tokens_seen=self.tokens_seen(), best_val_loss=self.best_val_loss)

    def save(self, best=False):
        """The latest checkpoint, and the best one too when best; never a state that went non-finite."""
        self.check_finite(self.last_losses)
        run = self.run_state()  # on every process: tokens_seen gathers from all
        if self.is_master:
            self.folder.save(run, best)
            self.log_line(f"saved {self.folder.checkpoint}" + (f" and {self.folder.best} (best so far)" if best else ""))
        self.saved_step = self.step

    def check_finite(self, losses=None):
        """Stop the run, naming the step, if any loss or gradient so far was NaN or infinite, or if the
        weights, the optimizer's moments or the held-out losses are now: nothing non-finite is ever saved."""
        bad_step, what = int(self.first_bad_step.item()), "the loss or a gradient"
        if bad_step < 0:
            what = self._non_finite_state(losses)
            bad_step = self.step if what else -1
        if bad_step >= 0:
            kept = (f"the last good checkpoint is {self.folder.checkpoint} (step {self.saved_step})"
                    if self.saved_step is not None else "no checkpoint had been written")
            raise TrainingDiverged(
                f"training diverged at step {bad_step}: {what} is not finite (NaN or inf); "
                f"nothing after it was saved and {kept}. Try a lower learning_rate, or grad_clip"
            )

    @torch.no_grad()
    def _non_finite_state(self, losses):
        """What, if anything, of the weights, the optimizer's moments and the held-out losses is not finite."""
        moments = [v for state in self.optimizer.state.values() for v in state.values()
                   if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0]
        for what, tensors in (("a weight", list(self.model.parameters())), ("an optimizer moment", moments)):
            # one fused pass: a non-finite entry makes its tensor's norm non-finite
            if tensors and not torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all():
                return what
        if any(not math.isfinite(v) for v in (losses or {}).values()):
            return "a held-out loss"
        return None

    def held_out_score(self, losses):
        """One number to pick the best checkpoint by: the mean loss of each source at its own corner."""
        own = [losses.get(f"val/{name}@{alpha:g}", losses.get(f"val/{name}"))
               for name, alpha in zip(self.corpus.names, self.corpus.alphas)]
        own = [v for v in own if v is not None]
        return sum(own) / len(own) if own else sum(losses.values()) / len(losses)

    def train_step(self):
        """One optimizer step over grad_accum micro-batches; returns the mean loss (a tensor)."""
        config = self.config
        lr = learning_rate_at(self.step, config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        for micro in range(self.micro_steps):
            index = self.rank * self.micro_steps + micro
            generator = torch.Generator().manual_seed(micro_batch_seed(config.seed, self.step, index))
            torch.manual_seed(micro_batch_seed(config.seed + 1, self.step, index))  # dropout
            if config.only_source:
                sources = torch.full((config.batch_size,), self.corpus.names.index(config.only_source))
                x, y = self.corpus.batch("train", sources, config.block_size, generator)
                alpha = None  # a single-source baseline is vanilla
            else:
                x, y, alpha, sources = training_batch(
                    self.corpus, config.batch_size, config.block_size, generator, config.alpha_mode == "sequence"
                )
            counts = torch.bincount(sources, minlength=len(self.corpus.names)) * config.block_size
            self.local_tokens = [seen + n for seen, n in zip(self.local_tokens, counts.tolist())]
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.ddp:  # all-reduce gradients on the last micro-step only
                self.forward_model.require_backward_grad_sync = micro == self.micro_steps - 1
            with self.autocast:
                _, loss = self.forward_model(x, alpha if config.gated else None, y)
                loss = loss / self.micro_steps
            self.scaler.scale(loss).backward()
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip if config.grad_clip > 0 else math.inf)
        bad = ~torch.isfinite(total)
        if not self.scaler.is_enabled():  # with fp16 loss scaling, inf gradients are expected and skipped
            bad |= ~torch.isfinite(norm)
        # remembered on the device (no sync per step), read where the loop syncs anyway
        self.first_bad_step = torch.where(bad & (self.first_bad_step < 0), self.step + 1, self.first_bad_step)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total, lr

    def train(self):
        """Train up to max_iters; evaluate and checkpoint every eval_interval and at the end."""
        config = self.config
        if self.is_master and self.step == 0:
            n = self.model.get_num_params()
            per_row = config.alpha_mode == "sequence"
            backend = (backends.explain(self.model.backend, torch.device(self.device), per_row) if config.gated
                       else "none")
            self.log_line(
                f"model: {n / 1e6:.2f}M parameters, {'gated' if config.gated else 'vanilla'}, "
                f"gate backend {backend}; device {self.device}; "
                + (f"source {config.only_source} alone" if config.only_source else
                   f"sources {', '.join(f'{name} (alpha {a:g})' for name, a in zip(self.corpus.names, self.corpus.alphas))}")
            )
        for name in self.replaced:
            (self.folder.path / name).unlink(missing_ok=True)
        self.replaced = []
        tokens_per_step = config.batch_size * config.block_size * config.grad_accum
        timer, timed_steps = time.perf_counter(), 0
        with self._ctrl_c_saves():
            while self.step < config.max_iters:
                loss, lr = self.train_step()
                timed_steps += 1
                at_log = self.step % config.log_interval == 0 or self.step == config.max_iters
                if at_log:
                    self.check_finite()
                    elapsed = time.perf_counter() - timer
                    record = {"step": self.step, "loss": loss.item(), "lr": lr,
                              "tokens_per_s": round(tokens_per_step * timed_steps / elapsed)}
                    eta = (config.max_iters - self.step) * elapsed / timed_steps  # training time only
                    self.log(record, f"step {self.step}/{config.max_iters} | loss {record['loss']:.4f} | lr {lr:.3g} | "
                                     f"{record['tokens_per_s']:,} tokens/s | ETA {format_seconds(eta)}")
                    timer, timed_steps = time.perf_counter(), 0
                if self.step % config.eval_interval == 0 or self.step == config.max_iters:
                    self.check_finite()
                    self.last_losses = self.evaluate()
                    self.log({"step": self.step, **self.last_losses})
                    score = self.held_out_score(self.last_losses)
                    improved = math.isfinite(score) and score < self.best_val_loss  # min() would keep a NaN
                    if improved:
                        self.best_val_loss = score
                    self.save(best=improved)  # refuses non-finite losses: a NaN held-out loss is a divergence
                    timer, timed_steps = time.perf_counter(), 0  # evaluation is not training time
                if self._stop_now(at_log):
                    if self.saved_step != self.step:  # an evaluation may have just saved this step
                        self.save()
                    self.interrupted = True
                    break
        return self.last_losses

    def _stop_now(self, at_log):
        """Ctrl-C was pressed: with DDP, every process agrees at a log step, where they sync anyway."""
        if not self.ddp:
            return self.stop_requested
        if not at_log:
            return False
        flag = torch.tensor(int(self.stop_requested), device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    @contextmanager
    def _ctrl_c_saves(self):
        """While training, the first Ctrl-C asks for a checkpoint and a clean stop after the
        current step; a second one interrupts at once."""
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return

        def handle(signum, frame):
            self.stop_requested = True
            signal.signal(signal.SIGINT, previous)

        previous = signal.signal(signal.SIGINT, handle)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def close(self):
        if self.ddp:
            # every process done with every collective before any tears its group down: without this, a
            # process leaving first could abort the other inside gloo ("terminate called ...")
            torch.distributed.barrier()
            destroy_process_group()
