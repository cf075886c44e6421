"""Run under ``mpirun -n 8``: ``fastmoe_edu.train`` with TED layouts, overlap and hierarchical exchange.

    mpirun -n 8 python tests/mpi_scripts/check_ted_training.py WORK_DIR RESULT_JSON

Each case trains the same tiny model (one dense block, so the tensor-parallel MLP is used too, and
one MoE block) for 6 steps through the real training loop: batch sharding, TED gradient reduction,
global-norm clipping, AdamW, validation. The pytest side (tests/test_distributed_training.py) trains
the same configuration in one process and compares the losses. The first case is also interrupted
after 3 steps and resumed, which must reproduce the uninterrupted losses bit for bit (every rank
reloads its own expert and tensor-parallel slices). Rank 0 writes everything as JSON.
"""
import json
import sys
from pathlib import Path

from fastmoe_edu.config import parse_args
from fastmoe_edu.distributed import launch_rank
from fastmoe_edu.train import train

# The single-process run of the same model uses TINY alone.
TINY = ["--progress=false", "--batch_size=8", "--seq_len=16", "--n_layer=2", "--moe_every=2", "--d_model=16",
        "--n_head=4", "--d_hidden=32", "--num_experts=8", "--max_steps=6", "--warmup_steps=2",
        "--eval_interval=3", "--eval_iters=1", "--checkpoint_interval=0", "--sample_tokens=0"]

CASES = {
    "tp2_ep2_dp2_drop": ["--tp=2", "--ep=2", "--dp=2", "--drop_duplicate_tokens=true"],
    "tp4_ep2_dp1_drop": ["--tp=4", "--drop_duplicate_tokens=true"],
    "tp2_ep4_pipeline2": ["--tp=2", "--pipeline_degree=2"],
    "tp1_ep8_hierarchical4": ["--ranks_per_node=4"],
}
RESUMED_CASE = "tp2_ep2_dp2_drop"


def main(work_dir: str, result_path: str) -> None:
    work = Path(work_dir)
    results = {}
    for case, extra in CASES.items():
        # The resumed case's uninterrupted run also prints what the command line prints (rank 0: the layout, the
        # options, "done"), which tests/test_distributed_training.py reads from the launch's output.
        shown = ["--progress=true"] if case == RESUMED_CASE else []
        whole = train(parse_args([*TINY, *extra, f"--out_dir={work / case / 'whole'}", *shown]))
        results[case] = {"whole": whole["train_loss"], "whole_val": whole["final_val_loss"]}
        if case == RESUMED_CASE:
            split = [*TINY, *extra, f"--out_dir={work / case / 'split'}"]
            train(parse_args(split), stop_at=3)
            folder = work / case / "split"
            results[case]["checkpoint_files"] = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
            resumed = train(parse_args(split + ["--resume"]))
            results[case].update(resumed=resumed["train_loss"], resumed_val=resumed["final_val_loss"])
    if launch_rank() == 0:
        Path(result_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
