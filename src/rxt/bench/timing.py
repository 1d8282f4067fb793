"""Timing helpers shared by the benchmarks: thread control, median-of-repeats timers, summaries."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch


@contextlib.contextmanager
def single_threaded(n_threads: int | None = 1) -> Iterator[None]:
    """Run the block with ``n_threads`` intra-op threads (None or 0 keeps PyTorch's setting).

    One thread by default: timings then compare arithmetic, not how well each shape parallelises.
    """
    previous = torch.get_num_threads()
    if n_threads:
        torch.set_num_threads(n_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def synchronize(device: str | torch.device = "cpu") -> None:
    """Wait for queued GPU work, so a wall-clock reading covers the kernels it launched."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: str | torch.device = "cpu") -> float:
    """Seconds one call of ``fn`` takes, GPU work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def time_call(
    fn: Callable[[], object], repeats: int = 5, warmup: int = 1, device: str | torch.device = "cpu"
) -> list[float]:
    """Seconds of each of ``repeats`` calls, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    return [time_once(fn, device) for _ in range(repeats)]


def time_round_robin(
    fns: Mapping[str, Callable[[], object]],
    repeats: int = 5,
    warmup: int = 1,
    device: str | torch.device = "cpu",
    tick: Callable[[], object] | None = None,
) -> dict[str, list[float]]:
    """Like time_call for several functions, interleaved: each round calls every function once.

    Noise that lasts a while (another process, frequency scaling) then falls on all of them alike.
    ``tick`` is called after every call, warm-up included (e.g. a progress bar's update).
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_index in range(warmup + repeats):
        for name, fn in fns.items():
            seconds = time_once(fn, device)
            if round_index >= warmup:
                times[name].append(seconds)
            if tick is not None:
                tick()
    return times


def describe_machine(device: str | torch.device = "cpu") -> str:
    """The hardware a timing ran on, in words: GPU name, or CPU model and thread count."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        model = names[0] if names else model
    return f"{model} ({os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads)"


def summarize(times: list[float]) -> dict[str, float]:
    """Median, min and max of a list of timings, in seconds."""
    if not times:
        raise ValueError("no timings to summarize")
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}
