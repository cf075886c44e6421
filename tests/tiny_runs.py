"""A tiny training run for the fault tests (test_reliability.py, test_checkpoint_faults.py): its arguments, and
``python -m fastmoe_edu.train`` run in this process."""
import contextlib
import io

from fastmoe_edu.train import main


def tiny(out_dir, *argv, max_steps: int = 4) -> list[str]:
    """The arguments of a run of a few seconds into ``out_dir``; ``argv`` come last (they override)."""
    return ["--progress=false", "--sample_tokens=0", f"--out_dir={out_dir}", "--batch_size=8", "--seq_len=16",
            "--n_layer=1", "--d_model=16", "--n_head=2", "--d_hidden=32", "--num_experts=4", f"--max_steps={max_steps}",
            "--eval_interval=0", "--eval_iters=1", "--checkpoint_interval=1", "--warmup_steps=1", *argv]


def run_main(argv) -> tuple[int, str]:
    """``python -m fastmoe_edu.train ARGV`` in this process: (exit status, what it printed on stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main(argv)
            status = 0
        except SystemExit as stop:
            status = stop.code
    return status, err.getvalue()
