"""Run under ``mpirun -n 2``: an interrupted and resumed run gives exactly the uninterrupted run's losses.

    mpirun -n 2 python tests/mpi_scripts/check_resume.py WORK_DIR RESULT_JSON

For each router case: train 6 steps in one go; train 3 steps (``stop_at=3``: a checkpoint is
written, one expert file per rank) and resume to 6. The routers chosen draw random numbers (switch
jitter) or keep a non-gradient state (sigmoid bias), so the per-rank RNG state and the buffers must
come back from the checkpoint too. Rank 0 writes both loss lists and the checkpoint's file names.
"""
import json
import sys
from pathlib import Path

from fastmoe_edu.config import parse_args
from fastmoe_edu.distributed import launch_rank
from fastmoe_edu.train import train

CASES = {
    "switch_jitter": ["--router=switch", "--top_k=1", "--capacity_factor=1.0", "--router_options.jitter_epsilon=0.1"],
    "sigmoid": ["--router=sigmoid", "--top_k=2", "--router_options.bias_update_rate=0.01"],
}


def tiny(out_dir: Path, extra: list[str]) -> list[str]:
    return ["--progress=false", f"--out_dir={out_dir}", "--batch_size=4", "--seq_len=16", "--n_layer=2",
            "--d_model=16", "--n_head=2", "--d_hidden=32", "--num_experts=4", "--max_steps=6",
            "--warmup_steps=2", "--eval_interval=3", "--eval_iters=1", "--checkpoint_interval=0",
            "--sample_tokens=0", *extra]


def main(work_dir: str, result_path: str) -> None:
    work = Path(work_dir)
    results = {}
    for case, extra in CASES.items():
        whole = train(parse_args(tiny(work / case / "whole", extra)))
        train(parse_args(tiny(work / case / "split", extra)), stop_at=3)
        files = sorted(str(p.relative_to(work / case / "split")) for p in (work / case / "split").rglob("*"))
        resumed = train(parse_args(tiny(work / case / "split", extra) + ["--resume"]))
        results[case] = {"whole": whole["train_loss"], "resumed": resumed["train_loss"],
                         "whole_val": whole["final_val_loss"], "resumed_val": resumed["final_val_loss"],
                         "checkpoint_files": files}
    if launch_rank() == 0:
        Path(result_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
