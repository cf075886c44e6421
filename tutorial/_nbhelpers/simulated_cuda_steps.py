"""The dispatch steps with fastmoe_edu's numba.cuda kernels in numba's CUDA simulator (tutorial 02).

    python simulated_cuda_steps.py INPUTS.pt OUTPUT.pt

Run in a fresh process: the simulator must be switched on before numba is first imported. Reads the
notebook's tiny example and the launch configuration of the thread map from INPUTS.pt, writes every
step's tensor, the time taken and the thread map to OUTPUT.pt.
"""
import os
import sys
import time

os.environ["NUMBA_ENABLE_CUDASIM"] = "1"          # before numba is imported

import torch                                       # noqa: E402  (after the switch, on purpose)
from numba import cuda                             # noqa: E402

from fastmoe_edu.backends import numba_backend     # noqa: E402

inputs = torch.load(sys.argv[1])
numba_backend.run_cuda_kernels_on_cpu_tensors(True)   # CPU tensors -> numba.cuda kernels (simulated)



def steps(x, ids, w, capacity, num_experts, weight):
    """The six dispatch steps (as run_steps in the notebook), each with the backend's numba.cuda kernel."""
    out = {"ids": numba_backend.prune_capacity(ids, num_experts, capacity)}
    out["counts"] = numba_backend.count_tokens_per_expert(out["ids"], num_experts)
    out["starts"] = numba_backend.exclusive_prefix_sum(out["counts"])
    out["rows"] = numba_backend.stable_positions(out["ids"], out["starts"])
    out["buffer"] = numba_backend.scatter_rows(x, out["rows"], int(out["counts"].sum()))
    out["expert_out"] = numba_backend.grouped_matmul(out["buffer"], weight, out["counts"])
    out["y"] = numba_backend.gather_combine(out["expert_out"], out["rows"], w * (out["ids"] >= 0))
    return out


start = time.perf_counter()
numba_backend.set_grouped_gemm("tiled")               # the experts as a numba.cuda kernel too
tiny = inputs["tiny"]
with torch.no_grad():
    result = steps(tiny["x"], tiny["expert_ids"], tiny["weights"], tiny["capacity"], tiny["E"], tiny["weight"])
result = {"steps": result, "seconds": time.perf_counter() - start}

# Which GPU thread handles which element with one thread per element (row = i // width,
# col = i % width, the launcher _launch's rule), launched with the configuration the notebook passes
# in? This kernel writes down its block and thread numbers instead of copying data.
big = inputs["big"]
blocks, threads = big["launch"]



@cuda.jit
def who_handles(width, block_of, thread_of):
    index = cuda.grid(1)                               # blockIdx.x * blockDim.x + threadIdx.x
    if index < block_of.shape[0] * width:
        block_of[index // width, index % width] = cuda.blockIdx.x
        thread_of[index // width, index % width] = cuda.threadIdx.x


block_of = torch.full((big["num_rows"], big["width"]), -1, dtype=torch.int64)
thread_of = torch.full((big["num_rows"], big["width"]), -1, dtype=torch.int64)
who_handles[blocks, threads](big["width"], block_of.numpy(), thread_of.numpy())
result["thread_map"] = {"block_of": block_of, "thread_of": thread_of}
torch.save(result, sys.argv[2])
