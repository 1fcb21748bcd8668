"""Timing on the device: per-stage CUDA events for the runner (host clocks on CPU), and CUDA-graph timing of a call."""

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


def time_graph(fn, iters: int) -> float:
    """Milliseconds per call of fn, measured as one CUDA graph replay of `iters` calls, after warm-up."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(iters):
            fn()
    g.replay()
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    g.replay()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / iters


def graph_replay_times(fn, iters: int, warmup: int = 3) -> list[float]:
    """Milliseconds of each of `iters` replays of one CUDA graph holding one call of fn (after warm-up calls on a
    side stream): the distribution, for p50 and p99."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        begin.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return times
