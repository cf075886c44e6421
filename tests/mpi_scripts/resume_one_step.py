"""Run under ``mpirun``/``torchrun``: resume the checkpoint in out_dir and train one more step.

    resume_one_step.py --out_dir=DIR --key=value ...      (the killed run's own arguments)

Used after a job was killed at a random moment: whatever the moment, the checkpoint must load.
"""
import sys

from fastmoe_edu.checkpoint import read_manifest
from fastmoe_edu.config import parse_args
from fastmoe_edu.distributed import launch_rank
from fastmoe_edu.train import train

if __name__ == "__main__":
    cfg = parse_args(sys.argv[1:] + ["--resume"])
    step = read_manifest(cfg.out_dir)["step"]
    result = train(cfg, stop_at=step + 1)
    if launch_rank() == 0:
        print(f"resumed at step {step}, now at step {result['steps']}", flush=True)
