"""Device handling shared by the benchmark scripts: parse --device, synchronize before reading the clock."""
from __future__ import annotations

import argparse
import time

import torch


def default_device() -> str:
    """cuda when torch sees a GPU, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_argument(text: str) -> torch.device:
    """argparse type for --device: cpu or cuda[:N], and cuda only where torch sees a GPU."""
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: allowed are cpu and cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: torch sees no CUDA GPU here")
    return device


def describe(device: torch.device) -> str:
    """The GPU's name, or the CPU and torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, torch {torch.get_num_threads()} threads"


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued kernels (a no-op on the CPU), so the clock measures finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn, repeats: int, device: torch.device, warmup: int = 2) -> float:
    """Best seconds of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed calls (numba compiles,
    torch picks its kernels); the minimum is the least disturbed measurement on a shared machine."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best
