"""The layer never makes the host wait for the device inside its step (what lets a GPU step be captured
in a CUDA graph): checked on the CPU by catching, with a TorchFunctionMode, every tensor call that would
synchronize on a GPU (reading a value on the host: .item(), int(), bool(), .tolist(), .cpu(); an output whose
size depends on the values: nonzero, masked_select, indexing with a boolean mask, bincount, repeat_interleave
without output_size) during a numba forward + backward.

On a GPU, bench/gpu_kernels.py runs the same step under torch.cuda.set_sync_debug_mode("error") and
captures it with torch.cuda.graph.
"""
from __future__ import annotations

import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode

from fastmoe_edu import MoELayer
from fastmoe_edu.backends import numba_backend

#: Tensor calls that wait for the device on a GPU.
SYNCHRONIZING = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__, torch.Tensor.__float__,
                 torch.Tensor.__bool__, torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.nonzero, torch.nonzero,
                 torch.Tensor.masked_select, torch.masked_select, torch.bincount, torch.Tensor.bincount}


def synchronizes(func, args, kwargs) -> bool:
    if func in SYNCHRONIZING:
        return True
    if func in (torch.repeat_interleave, torch.Tensor.repeat_interleave):
        return "output_size" not in kwargs
    if func is torch.Tensor.__getitem__:                            # x[mask]: as many rows as mask has True
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
    return False


class CatchSynchronizations(TorchFunctionMode):
    """Records (call, where) for every synchronizing call made while it is active."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if synchronizes(func, args, kwargs):
            caller = traceback.extract_stack(limit=3)[0]
            self.calls.append(f"{func.__name__} at {caller.filename}:{caller.lineno}")
        return func(*args, **kwargs)


@pytest.fixture(autouse=True)
def experts_as_on_a_gpu(monkeypatch):
    """The experts by the path CUDA tensors take (numba's grouped GEMM, torch's activation): the CPU's fused
    SwiGLUExperts reads the segment sizes on the host, which costs nothing on a CPU and never runs on a GPU."""
    monkeypatch.setattr(numba_backend, "expert_feed_forward", numba_backend.unfused_expert_feed_forward)


def synchronizations(layer: MoELayer, x: torch.Tensor) -> list[str]:
    (layer(x) * torch.randn(x.shape)).sum().backward()             # warm-up (numba compiles, caches fill)
    with CatchSynchronizations() as catch:
        (layer(x) * torch.randn(x.shape)).sum().backward()
    return catch.calls


@pytest.mark.parametrize("router,options", [("softmax_top_k", {}), ("sigmoid", dict(num_groups=2, top_k_groups=1)),
                                            ("gshard", dict(random_routing=False)),
                                            ("softmax_top_k", dict(weights_on="input", num_shared_experts=1))])
def test_a_dropless_step_never_waits_for_the_device(router, options):
    torch.manual_seed(0)
    layer = MoELayer(16, 24, 4, top_k=2, router=router, backend="numba", **options)
    assert synchronizations(layer, torch.randn(2, 12, 16, requires_grad=True)) == []
    assert layer.last_routing.num_dropped == 0                    # read after the step: an int


def test_with_a_capacity_the_one_wait_is_the_buffer_size():
    """Capacity pruning decides on the device how many rows the buffer has; the host reads that one number."""
    torch.manual_seed(0)
    layer = MoELayer(16, 24, 4, top_k=2, capacity_factor=0.5, backend="numba")
    calls = synchronizations(layer, torch.randn(24, 16, requires_grad=True))
    assert len(calls) == 1 and "layer.py" in calls[0], calls
    assert layer.last_routing.num_dropped > 0


def test_the_catcher_sees_a_synchronization():
    """The check above can fail: a host read inside the step is caught."""
    with CatchSynchronizations() as catch:
        int(torch.ones(3).sum())
        torch.ones(3)[torch.tensor([True, False, True])]
        torch.ones(3)[torch.tensor([0, 2])]                         # an integer index: no wait
    assert len(catch.calls) == 2
