"""What a run prints: a progress line, validation results and a summary block, and nothing else.

In a terminal one line redraws in place (step, loss, LR, tokens/s, elapsed and left); off a
terminal (CI, nohup, SLURM) the same line is printed every few steps. Every line also goes to
the run directory's ``cli.log``. Lightning's chatter (accelerator lines, tips, known spurious
warnings) is dropped; other warnings print as one ``warning:`` line.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import warnings
from typing import Any, Optional

import lightning.pytorch as L
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

log = logging.getLogger("lightning_mp.cli")

# Messages that tell a user of lightning-mp-train nothing (each checked to appear on a plain run).
_NOISE = (
    "Experiment logs directory",  # the loggers write into the run directory, which holds config.yaml
    "is not supported by the model summary",  # the summary's size column knows Lightning's names only
    "isinstance(treespec, LeafSpec)",  # a deprecation inside Lightning
    "does not have many workers",  # the corpus is in memory: workers would not help
    "💡 Tip",
    "GPU available:",
    "TPU available:",
    "HPU available:",
    "`Trainer.fit` stopped",  # the summary says it
    "smaller than the logging interval",  # short runs: the CLI logs their last step anyway
    "The dirpath has changed from",  # a resumed run writes its checkpoints in its own run directory
    "Restoring states from the checkpoint path",  # "Restored all states from the checkpoint" follows
    "`weights_only` was not set",  # Lightning loading our own checkpoint
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in _NOISE)


class _NotOnConsole(logging.Filter):
    """Keeps records marked ``console=False`` (the progress line, drawn in place) out of the terminal."""

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "console", True)


def setup(terminal: bool) -> None:
    """Route Lightning's and lightning-mp's messages through the root logger (Hydra's console and
    ``cli.log``), drop the noise, and make warnings one line."""
    root = logging.getLogger()
    for handler in root.handlers:
        handler.addFilter(_DropNoise())
        if terminal and isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.addFilter(_NotOnConsole())
    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] in ("lightning", "lightning_mp")]
    for name in names:  # Lightning gives its loggers handlers of their own: through the root instead
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    for text in _NOISE:
        warnings.filterwarnings("ignore", message=f".*{re.escape(text)}")
    warnings.showwarning = _one_line_warning


def _one_line_warning(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    log.warning(f"warning: {str(message).strip().splitlines()[0]}")


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def rate(tokens_per_second: float) -> str:
    return f"{tokens_per_second / 1000:.1f}k" if tokens_per_second >= 1000 else f"{tokens_per_second:.0f}"


class Progress(ProgressBar):
    """``step 120/250 | loss 2.31 | lr 2.1e-03 | 15.2k tok/s | 0:31 elapsed, 0:33 left``: redrawn in a
    terminal, printed every ``every_n_steps`` steps otherwise (and always logged to ``cli.log``).
    Validation prints ``val step 125 | loss 2.09 | 3.01 bits/byte``."""

    def __init__(self, every_n_steps: int, terminal: Optional[bool] = None) -> None:
        super().__init__()
        self.every_n_steps = max(int(every_n_steps), 1)
        self.terminal = sys.stdout.isatty() if terminal is None else terminal
        self._enabled = True
        self._start = self._last = 0.0
        self._first_step = 0
        self._tokens = 0
        self._drawn = 0.0
        self._open_line = False

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._first_step, self._tokens = time.perf_counter(), trainer.global_step, 0
        self._last = self._start

    @property
    def seconds(self) -> float:
        """Seconds from the start of training to the end of the last step: the clock of the step lines."""
        return self._last - self._start

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
        self._tokens += getattr(inputs, "numel", lambda: 0)() * trainer.world_size
        self._last = time.perf_counter()
        if not self._enabled or not trainer.is_global_zero:
            return
        step = trainer.global_step
        last = step == trainer.max_steps
        now = self._last
        if self.terminal and (now - self._drawn > 0.1 or last):
            self._drawn = now
            sys.stdout.write("\r\033[K" + self.status(trainer))
            sys.stdout.flush()
            self._open_line = True
        if step % self.every_n_steps == 0 or last:
            log.info(self.status(trainer), extra={"console": not self.terminal})

    def status(self, trainer: L.Trainer) -> str:
        step, total = trainer.global_step, trainer.max_steps
        elapsed = self.seconds
        done = step - self._first_step
        parts = [f"step {step}/{total}" if total > 0 else f"step {step}"]
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            parts.append(f"loss {float(loss):.4f}")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.2e}")
        if elapsed > 0 and self._tokens:
            parts.append(f"{rate(self._tokens / elapsed)} tok/s")
        left = f", {duration(elapsed / done * (total - step))} left" if done and total > 0 else ""
        parts.append(f"{duration(elapsed)} elapsed{left}")
        return " | ".join(parts)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._enabled or trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        if "val/loss" not in metrics:
            return
        self._end_line()
        bits = metrics.get("val/bits_per_byte")
        text = f"val step {trainer.global_step} | loss {float(metrics['val/loss']):.4f}"
        log.info(text + (f" | {float(bits):.2f} bits/byte" if bits is not None else ""))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end_line()

    def _end_line(self) -> None:
        if self._open_line:
            sys.stdout.write("\n")
            sys.stdout.flush()
            self._open_line = False

    @property
    def tokens(self) -> int:
        """Tokens trained on since training started (this run's own, after any resume)."""
        return self._tokens
