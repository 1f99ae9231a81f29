"""The training loop: the reference recipe (or per-sequence alpha) over a Corpus.

Single process or DDP under torchrun, as nanoGPT does it (process.py). Each
micro-batch seeds its data and dropout from (seed, step, its index among all
micro-batches of the step): a resumed run continues exactly as if it had never
stopped, and N processes with grad_accum G see the same data as one process with
the same G. Checkpoints and what a resume must match are saving.py's; the log is
runlog.py's.
"""
import math
import shutil
import signal
import threading
import time
import uuid
from contextlib import contextmanager, nullcontext

import numpy
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from abcgpt.backends import registry
from abcgpt.core import preflight
from abcgpt.core.checkpoint import CheckpointError
from abcgpt.core.errors import SettingsError
from abcgpt.data.corpus import Corpus, training_batch
from abcgpt.data.tokenizer import tokenizer_from_dict
from abcgpt.gates.voice import evaluation_settings, loss_key, own_label
from abcgpt.measuring.loss import val_loss
from abcgpt.model.gpt import GPT

from .config import TrainConfig
from .process import Process
from .run import Run, RunFolder, changed_meanwhile, identity
from .runlog import RunLog, format_seconds
from .saving import TrainingDiverged, check_resumable, check_run_folder, check_same_sources, diverged, non_finite_state

__all__ = ["Trainer", "TrainingDiverged", "learning_rate_at", "stream_seed"]


def learning_rate_at(step, config):
    """Linear warm-up, then cosine decay to min_lr at decay_iters, then min_lr."""
    if step < config.warmup_iters:
        return config.learning_rate * (step + 1) / (config.warmup_iters + 1)
    if step >= config.decay_iters:
        return config.min_lr
    progress = (step - config.warmup_iters) / max(1, config.decay_iters - config.warmup_iters)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.learning_rate - config.min_lr)


STREAMS = ("data", "dropout")  # what a micro-batch draws at random, each from a stream of its own


def stream_seed(seed, step, index, purpose):
    """The seed of one (run seed, step, micro-batch, purpose) stream: all four hashed (SeedSequence) down to
    the 32 bits that torch's CPU generator really uses, so that every one of them changes the stream."""
    entropy = [seed, step, index, STREAMS.index(purpose)]
    return int(numpy.random.SeedSequence(entropy).generate_state(1, numpy.uint32)[0])


def resolve_dtype(name, device_type):
    if name == "auto":
        if device_type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


class Trainer:
    """Trains a gated GPT as config says; resume=True continues the run in config.out_dir."""

    def __init__(self, config: TrainConfig, resume: bool = False, corpus: Corpus = None, log=print,
                 overwrite: bool = False, new_sources: bool = False):
        """overwrite: start afresh in an out_dir that holds a run (its checkpoints, log and baselines go);
        new_sources: resume on sources whose text differs from what the run recorded (the log says so)."""
        self.config = config
        self.process = Process.start(config.device, config.grad_accum)
        self.device, self.is_master = self.process.device, self.process.is_master
        self.folder = RunFolder(config.out_dir)
        self.log = RunLog(self.folder.log, log, active=self.is_master, on_closed=self._console_closed)
        # an old run's files go only once this one is set up and starts, so a setup error loses nothing
        self.replaced = check_run_folder(self.folder, resume, overwrite) if self.is_master else []
        from_nothing = resume and self.folder.holds_only_a_log()  # a run that saved no checkpoint
        saved = Run.load(self.folder.checkpoint) if resume and not from_nothing else None
        self.read_at_start = identity(self.folder.checkpoint) if saved is not None else None
        if saved is not None:
            check_resumable(saved, config)
        if from_nothing:
            self.log.line(f"note: {self.folder} holds no checkpoint, only the log of a run that saved none; "
                          "starting that run from step 0 (the log goes on)")

        tokenizer = tokenizer_from_dict(saved.tokenizer) if saved else config.tokenizer
        self.corpus = corpus or Corpus.from_sources(config.sources, tokenizer, config.val_fraction,
                                                    config.cache_dir or None)
        self.corpus.check_block_size(config.block_size)
        if config.only_source and config.only_source not in self.corpus.names:
            raise SettingsError(f"only_source {config.only_source!r} is not one of the sources {self.corpus.names}")
        self.new_sources = check_same_sources(saved, self.corpus, new_sources) if saved else {}

        self.model_config = config.model_config(self.corpus.tokenizer.vocab_size)
        preflight.check_memory(preflight.training_bytes(self.model_config, config.batch_size), self.device,
                               f"training at batch_size {config.batch_size}")
        if self.is_master:  # room for the checkpoints' new bytes at their peak
            preflight.check_disk(self.folder.path, preflight.checkpoint_writes(
                                 self.folder, preflight.checkpoint_bytes(self.model_config)),
                                 "the run's checkpoints")
        torch.manual_seed(config.seed)  # weight init
        self.model = GPT(self.model_config, config.gate_backend).to(self.device)
        if config.gated:  # a backend that cannot serve this run's alphas here is refused before any work
            registry.choose(self.model.backend, torch.device(self.device), config.alpha_mode == "sequence")
        self.optimizer = self.model.configure_optimizers(
            config.weight_decay, config.learning_rate, (config.beta1, config.beta2), self.process.device_type
        )
        self.step = 0
        self.local_tokens = [0] * len(self.corpus.names)  # per source, this process (+ a resumed total on rank 0)
        self.best_val_loss = math.inf
        self.last_losses = {}  # the latest held-out losses
        self.saved_step = None  # the step of the last checkpoint written by this run
        self.first_bad_step = torch.tensor(-1, device=self.device)  # first step with a NaN/inf loss or gradient
        self.stop_requested = self.interrupted = False
        self.run_id = uuid.uuid4().hex  # one per run, kept by resumes: which best.pt and baselines are this run's
        if saved is not None:
            self._restore(saved)

        dtype = resolve_dtype(config.dtype, self.process.device_type)
        self.autocast = (nullcontext() if dtype == torch.float32
                         else torch.autocast(device_type=self.process.device_type, dtype=dtype))
        self.scaler = torch.amp.GradScaler(self.process.device_type, enabled=dtype == torch.float16)
        self.forward_model = torch.compile(self.model) if config.compile else self.model
        if self.process.ddp:
            on_cuda = self.process.device_type == "cuda"
            self.forward_model = DDP(self.forward_model, device_ids=[self.process.local_rank] if on_cuda else None)

    def _restore(self, saved: Run):
        self.best_val_loss = saved.best_val_loss if saved.best_val_loss is not None else math.inf
        self.last_losses = saved.val_losses
        self.saved_step = self.step = saved.step
        self.run_id = saved.run_id or self.run_id
        try:
            self.model.load_state_dict(saved.model)
            self.optimizer.load_state_dict(saved.optimizer)
        except (RuntimeError, ValueError, KeyError) as e:
            reason = str(e).strip().splitlines()[0]
            raise CheckpointError(f"{self.folder.checkpoint} does not fit this run's model: {reason}") from None
        if self.is_master and saved.tokens_seen:
            self.local_tokens = list(saved.tokens_seen)

    # evaluation and saving

    @torch.no_grad()
    def evaluate(self):
        """Each source's held-out loss at alpha 0, 0.5 and 1: measuring.loss.val_loss on the same
        eval_iters * batch_size windows of the val split every time."""
        self.model.eval()
        losses = {}
        config = self.config
        settings = (evaluation_settings(self.corpus.names, config.geometry, config.uniform_share > 0)
                    if config.gated else [(None, None)])
        windows = config.eval_iters * config.batch_size
        for name, ids in zip(self.corpus.names, self.corpus.val):
            if config.only_source and name != config.only_source:
                continue
            for label, dial in settings:
                with self.autocast:
                    loss = val_loss(self.model, ids, dial, config.batch_size, windows, self.device)
                losses[loss_key(name, label)] = loss
        self.model.train()
        return losses

    def held_out_score(self, losses):
        """One number to pick the best checkpoint by: the mean loss of each source at its own corner."""
        names = self.corpus.names
        own = [losses.get(loss_key(name, own_label(k, names, self.config.geometry)), losses.get(loss_key(name)))
               for k, name in enumerate(names)]
        own = [v for v in own if v is not None]
        return sum(own) / len(own) if own else sum(losses.values()) / len(losses)

    def tokens_seen(self):
        """Training tokens drawn from each source so far, over all processes (all must call this)."""
        return self.process.total(self.local_tokens)

    def run_state(self):
        return Run(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(), model_config=self.model_config,
                   train_config=self.config, tokenizer=self.corpus.tokenizer.to_dict(), source_names=self.corpus.names,
                   source_sha256=self.corpus.sha256, val_losses=self.last_losses, step=self.step, seed=self.config.seed,
                   tokens_seen=self.tokens_seen(), best_val_loss=self.best_val_loss, run_id=self.run_id)

    def save(self, best=False):
        """The latest checkpoint, and the best one too when best; never a state that went non-finite."""
        self.check_finite(self.last_losses)
        run = self.run_state()  # on every process: tokens_seen gathers from all
        if self.is_master:
            self.folder.save(run, best)
            best_too = f" and {self.folder.best} (best so far)" if best else ""
            self.log.line(f"saved {self.folder.checkpoint}{best_too}")
        self.saved_step = self.step

    def check_finite(self, losses=None):
        """Stop the run, naming the step, if any loss or gradient so far was NaN or infinite, or if the
        weights, the optimizer's moments or the held-out losses are now: nothing non-finite is ever saved."""
        bad_step, what = int(self.first_bad_step.item()), "the loss or a gradient"
        if bad_step < 0:
            what = non_finite_state(self.model, self.optimizer, losses)
            bad_step = self.step if what else -1
        if bad_step >= 0:
            raise diverged(bad_step, what, self.folder, self.saved_step)

    # the loop

    def train_step(self):
        """One optimizer step over grad_accum micro-batches; returns the mean loss (a tensor)."""
        config, process = self.config, self.process
        lr = learning_rate_at(self.step, config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        for micro in range(process.micro_steps):
            index = process.rank * process.micro_steps + micro
            generator = torch.Generator().manual_seed(stream_seed(config.seed, self.step, index, "data"))
            torch.manual_seed(stream_seed(config.seed, self.step, index, "dropout"))
            if config.only_source:
                sources = torch.full((config.batch_size,), self.corpus.names.index(config.only_source))
                x, y = self.corpus.batch("train", sources, config.block_size, generator)
                alpha = None  # a single-source baseline is vanilla
            else:
                x, y, alpha, sources = training_batch(
                    self.corpus, config.batch_size, config.block_size, generator, config.alpha_mode == "sequence",
                    config.geometry, config.uniform_share, config.dial_beta,
                )
            counts = torch.bincount(sources, minlength=len(self.corpus.names)) * config.block_size
            self.local_tokens = [seen + n for seen, n in zip(self.local_tokens, counts.tolist())]
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if process.ddp:  # all-reduce gradients on the last micro-step only
                self.forward_model.require_backward_grad_sync = micro == process.micro_steps - 1
            with self.autocast:
                _, loss = self.forward_model(x, alpha if config.gated else None, y)
                loss = loss / process.micro_steps
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

    def describe(self):
        """The run's first line: the model, its gate backend, the device and the sources."""
        config = self.config
        per_row = config.alpha_mode == "sequence"
        backend = registry.explain(self.model.backend, torch.device(self.device), per_row) if config.gated else "none"
        if config.only_source:
            sources = f"source {config.only_source} alone"
        elif config.geometry == "line":
            sources = "sources " + ", ".join(f"{name} (alpha {a:g})" for name, a in zip(self.corpus.names,
                                                                                       self.corpus.alphas))
        else:
            sources = f"{len(self.corpus.names)} sources on the {config.geometry} dial: " + ", ".join(self.corpus.names)
        if config.uniform_share > 0:
            sources += f"; {config.uniform_share:g} of the dials in uniform mode"
        return (f"model: {self.model.get_num_params() / 1e6:.2f}M parameters, "
                f"{'gated' if config.gated else 'vanilla'}, gate backend {backend}; device {self.device}; {sources}")

    def train(self):
        """Train up to max_iters; evaluate and checkpoint every eval_interval and at the end. The run's
        folder is this process's alone meanwhile (RunFolder.lock)."""
        with self.folder.lock() if self.is_master else nullcontext(), self._signals_save():
            return self._train()

    def _train(self):
        config = self.config
        if self.step == 0:
            self.log.line(self.describe())
        if self.is_master and self.read_at_start and identity(self.folder.checkpoint) != self.read_at_start:
            raise changed_meanwhile(self.folder.checkpoint, self.step)  # read before the lock was taken
        for path in self.replaced:  # an old run's files go only now, once this one has started
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        self.replaced = []
        if self.is_master:
            self.folder.record(*RunFolder.FILES)
        if self.new_sources:
            self.log.record({"step": self.step, "new_sources": self.new_sources},
                            f"note: resuming on new text for {', '.join(self.new_sources)} (--new_sources)")
        tokens_per_step = config.batch_size * config.block_size * config.grad_accum
        timer, timed_steps = time.perf_counter(), 0
        first = self.step + 1  # logged at once, so a run says how fast it goes before log_interval steps
        while self.step < config.max_iters:
            loss, lr = self.train_step()
            timed_steps += 1
            at_log = self.step % config.log_interval == 0 or self.step in (first, config.max_iters)
            if at_log:
                self.check_finite()
                elapsed = time.perf_counter() - timer
                record = {"step": self.step, "loss": loss.item(), "lr": lr,
                          "tokens_per_s": round(tokens_per_step * timed_steps / elapsed)}
                eta = (config.max_iters - self.step) * elapsed / timed_steps  # training time only
                self.log.record(record, f"step {self.step}/{config.max_iters} | loss {record['loss']:.4f} | "
                                        f"lr {lr:.3g} | {record['tokens_per_s']:,} tokens/s | "
                                        f"ETA {format_seconds(eta)}")
                timer, timed_steps = time.perf_counter(), 0
            if self.step % config.eval_interval == 0 or self.step == config.max_iters:
                self.check_finite()
                self.last_losses = self.evaluate()
                self.log.record({"step": self.step, **self.last_losses})
                score = self.held_out_score(self.last_losses)
                improved = math.isfinite(score) and score < self.best_val_loss  # min() would keep a NaN
                if improved:
                    self.best_val_loss = score
                self.save(best=improved)  # refuses non-finite losses: a NaN held-out loss is a divergence
                timer, timed_steps = time.perf_counter(), 0  # evaluation is not training time
            if self._stop_now(at_log):
                if self.saved_step != self.step:  # an evaluation may have just saved this step
                    self.save()
                self.interrupted = self.stop_requested or signal.SIGINT  # the signal that stopped the run
                break
        return self.last_losses

    def _stop_now(self, at_log):
        """A stop was asked for: with DDP, every process agrees at a log step, where they sync anyway."""
        if not self.process.ddp:
            return bool(self.stop_requested)
        return at_log and self.process.anyone(bool(self.stop_requested))

    @contextmanager
    def _signals_save(self):
        """While training, Ctrl-C, SIGTERM (batch schedulers, containers) or SIGHUP (a closed terminal) asks
        for a checkpoint and a clean stop after the current step; interrupted then holds the signal's
        number. A second one interrupts at once."""
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

        def handle(signum, frame):
            self.stop_requested = signum
            for s in stops:
                signal.signal(s, previous[s])

        previous = {s: signal.signal(s, handle) for s in stops}
        try:
            yield
        finally:
            for s in stops:
                signal.signal(s, previous[s])

    def _console_closed(self):
        """The reader of the run's output went away (| head): save and stop, as a signal would."""
        self.stop_requested = signal.SIGPIPE

    def close(self):
        self.process.close()
