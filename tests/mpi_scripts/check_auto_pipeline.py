"""Under ``mpirun -n 2`` / ``torchrun``: ``pipeline_degree="auto"`` through the real training loop.

    mpirun -n 2 python tests/mpi_scripts/check_auto_pipeline.py WORK_DIR RESULT_JSON

Trains a tiny model (one MoE block, ep = 2) with both degrees ``"auto"``: each MoE layer measures its
first passes and chooses (D_f, D_b) (distributed/autotune.py). Then trains it again from the same seed
with those degrees fixed. The same with only the forward degree ``"auto"`` and the backward fixed at 3
(so the run after the choice is pipelined, whatever this machine's measurements choose). Rank 0
writes ``{case: {"chosen": [per rank: [[D_f, D_b] per MoE layer]], "auto": losses, "fixed": losses,
"tuning": rank 0's record of the first layer}}``.
"""
import json
import sys
from pathlib import Path

import torch

from fastmoe_edu.config import parse_args
from fastmoe_edu.distributed.expert_parallel import ExpertParallel
from fastmoe_edu.train import start_runtime, train

TINY = ["--progress=false", "--batch_size=8", "--seq_len=16", "--n_layer=2", "--moe_every=2", "--d_model=16",
        "--n_head=4", "--d_hidden=32", "--num_experts=4", "--max_steps=6", "--warmup_steps=2",
        "--eval_interval=3", "--eval_iters=1", "--checkpoint_interval=0", "--sample_tokens=0"]


def run(extra: list[str], out_dir: Path) -> tuple[list[float], list[ExpertParallel], object]:
    cfg = parse_args([*TINY, *extra, f"--out_dir={out_dir}"])
    rt = start_runtime(cfg)
    runners, shard = [], rt.shard_model

    def shard_and_keep(model):                       # the training loop's model: keep its expert runners
        shard(model)
        runners.extend(entry.layer.expert_runner for entry in rt.plan.layers)
        return model
    rt.shard_model = shard_and_keep
    return train(cfg, rt=rt)["train_loss"], runners, rt


def main(work_dir: str, result_path: str) -> None:
    work, results = Path(work_dir), {}
    # "auto" for both degrees, and "auto" forward with the backward fixed (pipelined whatever is chosen).
    for case, backward in (("auto", "auto"), ("auto_backward3", "3")):
        auto, runners, rt = run(["--pipeline_degree=auto", f"--backward_pipeline_degree={backward}"], work / case)
        mine = torch.tensor([list(r.chosen_degrees or (0, 0)) for r in runners], dtype=torch.int64)
        everyone = rt.layout.world.allgather(mine.reshape(-1)).reshape(rt.world_size, len(runners), 2)
        D_f, D_b = runners[0].chosen_degrees
        fixed, _, _ = run([f"--pipeline_degree={D_f}", f"--backward_pipeline_degree={D_b}"], work / f"{case}_fixed")
        tuning = runners[0].tuner.tuning
        results[case] = {"chosen": everyone.tolist(), "auto": auto, "fixed": fixed,
                         "tuning": {"tasks": vars(tuning["tasks"]), "predicted": tuning["predicted"],
                                    "measured_unpipelined": tuning["measured_unpipelined"]}}
    if rt.rank == 0:
        Path(result_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
