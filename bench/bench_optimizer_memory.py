"""Peak extra memory of one AdamW step, the whole model at once vs DeepSpeed-TED's grouped step.

    python bench/bench_optimizer_memory.py                     # the default model, widened
    python bench/bench_optimizer_memory.py --d-model 256 --groups 0 262144 65536

AdamW's multi-tensor ("foreach") implementation, torch's default for CUDA tensors, computes each
update for a whole parameter group at once and allocates its temporaries (for example √v̂ + ε for
every tensor of the group) together. ``optimizer_group_size`` cuts the parameters into groups of at
most that many elements (train.configure_optimizer), so those temporaries exist for one group at a
time. This script measures the step's peak memory above what existed before it (weights, gradients,
optimizer state), from the PyTorch profiler's memory timeline, with foreach on as on a GPU, for each
group size, and prints it ÷ the ungrouped step's. On CPU tensors torch's default is the per-tensor
loop, whose temporaries are one tensor's at a time whatever the groups.
"""
from __future__ import annotations

import argparse
import platform

import torch
from torch.profiler import ProfilerActivity, profile

from fastmoe_edu.config import TrainConfig
from fastmoe_edu.model import build_model
from fastmoe_edu.precision import store_parameters
from fastmoe_edu.train import configure_optimizer


def step_peak_bytes(cfg: TrainConfig, device: str) -> tuple[int, int, int]:
    """(peak bytes allocated during optimizer.step() above the start, number of groups, parameter bytes)."""
    torch.manual_seed(0)
    model = store_parameters(build_model(cfg, vocab_size=64).to(device), cfg.dtype, cfg.master_weights)
    optimizer = configure_optimizer(model, cfg)
    for group in optimizer.param_groups:
        group["foreach"] = True
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    optimizer.step()                                             # creates the state (m, v): not counted
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        optimizer.step()
    current = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:   # (time, action, tensor, bytes) in time order
        if action.name == "CREATE":
            current += size
        elif action.name == "DESTROY":
            current -= size
        peak = max(peak, current)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return peak, len(optimizer.param_groups), param_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--groups", type=int, nargs="+", default=[0, 1 << 20, 1 << 18, 1 << 16],
                        help="optimizer_group_size values to measure (0 = no grouping)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--master-weights", action="store_true",
                        help="bfloat16 parameters and gradients, float32 master copies in the optimizer")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, torch {torch.__version__}, device {args.device}")
    precision = (dict(dtype="bfloat16", master_weights="optimizer") if args.master_weights else {})
    base = None
    rows = []
    for size in args.groups:
        cfg = TrainConfig(d_model=args.d_model, d_hidden=args.d_hidden, n_layer=args.layers,
                          optimizer_group_size=size, **precision).validate()
        peak, groups, param_bytes = step_peak_bytes(cfg, args.device)
        base = peak if base is None else base
        rows.append((size, groups, peak, param_bytes))
    print(f"model: d_model {args.d_model}, d_hidden {args.d_hidden}, {args.layers} blocks, "
          f"{rows[0][3] / 2**20:.1f} MiB of parameters ("
          + ("bfloat16 but the routers; master weights in the optimizer" if args.master_weights else "float32") + ")")
    print("| optimizer_group_size | groups | step's peak extra memory (MiB) | ÷ ungrouped | ÷ parameter bytes |")
    print("|---:|---:|---:|---:|---:|")
    for size, groups, peak, param_bytes in rows:
        print(f"| {size or 'none'} | {groups} | {peak / 2**20:.2f} | {peak / base:.2f} | {peak / param_bytes:.2f} |")


if __name__ == "__main__":
    main()
