"""Per-stage timing: CUDA events on a GPU (read after one sync, so graphs stay unbroken), host clocks on CPU."""

from __future__ import annotations

import time

import torch


class StageTimer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._marks: list[tuple[str, object, object]] = []
        self._events: dict[str, tuple[torch.cuda.Event, torch.cuda.Event]] = {}

    def start(self) -> None:
        self._marks.clear()

    def run(self, name: str, fn) -> None:
        if self.cuda:
            if name not in self._events:  # created once: event creation/destruction per call costs host time
                self._events[name] = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            begin, end = self._events[name]
            begin.record()
            fn()
            end.record()
        else:
            begin = time.perf_counter()
            fn()
            end = time.perf_counter()
        self._marks.append((name, begin, end))

    def read(self) -> dict[str, float]:
        """Milliseconds per stage; on CUDA this waits for the last event."""
        if self.cuda and self._marks:
            self._marks[-1][2].synchronize()
            return {n: b.elapsed_time(e) for n, b, e in self._marks}
        return {n: (e - b) * 1e3 for n, b, e in self._marks}
