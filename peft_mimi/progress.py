"""What a training run shows while it runs: a progress bar on a terminal, plain lines in a log file."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator

from tqdm.auto import tqdm


class Progress:
    """Progress of the run: a tqdm bar on a terminal; when standard error is not a terminal (a log file, a job
    scheduler), a plain line every ``every_s`` seconds and at the end of every round, with round, optimizer step,
    loss and learning rate, instead of hundreds of carriage-return frames."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str, every_s: float | None = None) -> None:
        self.enabled, self.total, self.done, self.desc = enabled, total, initial, desc
        self.bar = tqdm(total=total, initial=initial, desc=desc) if enabled and sys.stderr.isatty() else None
        self.every_s = every_s if every_s is not None else float(os.environ.get("PEFT_MIMI_LOG_EVERY_S", 30))
        self.started = self.last = time.perf_counter()
        self.first = initial

    def step(self, stage: str, loss: float, lr: float) -> None:
        """One optimizer step of ``stage`` (e.g. ``"round 2/4"``)."""
        self.done += 1
        if self.bar is not None:
            self.bar.update()
            self.bar.set_postfix_str(f"{stage}, loss {loss:.4f}")
        elif self.enabled and (time.perf_counter() - self.last >= self.every_s or self.done == self.total):
            self.last = time.perf_counter()
            elapsed = self.last - self.started
            rate = (self.done - self.first) / elapsed if elapsed > 0 else 0.0
            left = f", {(self.total - self.done) / rate:.0f} s left" if rate > 0 else ""
            self._print(f"{self.desc}: {stage}, step {self.done}/{self.total}, loss {loss:.4f}, "
                        f"lr {lr:.3g}, {elapsed:.0f} s{left}")

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif self.enabled:
            self._print(text)

    @staticmethod
    def _print(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def quiet_library_bars() -> Iterator[None]:
    """transformers' own progress bars (loading and writing weights) off while standard error is not a terminal,
    so that a log file holds only readable lines; restored afterwards."""
    from transformers.utils import logging as hf_logging

    quiet = not sys.stderr.isatty() and hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet:
            hf_logging.enable_progress_bar()
