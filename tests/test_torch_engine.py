"""The torch engine (torch.distributed, gloo) under ``torchrun``, launched from here with 2 and 4 ranks.

tests/torch_scripts/check_communicator.py runs every public method of the Communicator on the world
and on split sub-communicators and writes one pass/fail per check to a JSON file read below.
"""
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "torch_scripts" / "check_communicator.py"
LAUNCH_TIMEOUT_S = 120


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it when binding to port 0)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 4])
def test_torch_communicator(ranks, tmp_path):
    output = tmp_path / "checks.json"
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
               "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(SCRIPT), str(output)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(output.read_text())
    assert result["world_size"] == ranks
    failed = [name for name, passed in result["checks"].items() if not passed]
    assert not failed, failed
    assert len(result["checks"]) > 100                  # every communicator ran every check
