"""Peak memory over a block of code: max allocated on CUDA, process RSS sampled on CPU."""

from __future__ import annotations

import os
import resource
import threading
from pathlib import Path

import torch

STATM = Path("/proc/self/statm")


class PeakMemory:
    """``with PeakMemory() as peak: ...`` then ``peak.mb``: the most memory in use during the block."""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self.cuda = torch.cuda.is_available()
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        elif STATM.exists():
            self._peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self._peak = torch.cuda.max_memory_allocated()
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
        else:  # no /proc: the process's lifetime peak is the best there is
            self._peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    @property
    def mb(self) -> float:
        return self._peak / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, _rss_bytes())


def _rss_bytes() -> int:
    return int(STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
