"""Run the backend checks through the numba.cuda kernels, in numba's CUDA simulator.

    NUMBA_ENABLE_CUDASIM=1 python tests/cudasim_check.py [case ...]

The simulator must be switched on before numba is first imported, hence a separate process:
test_backends.py starts this script with the variable set and reads the one JSON line it prints
last: {case id: null if the check passed, else the error message}. The cases and the checks are
backend_cases.py's; CPU tensors stand in for GPU ones (numba_backend.run_cuda_kernels_on_cpu_tensors).
"""
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numba  # noqa: E402

import backend_cases  # noqa: E402
from fastmoe_edu.backends import numba_backend  # noqa: E402


def main(selected: list[str]) -> None:
    if not numba.config.ENABLE_CUDASIM:
        sys.exit("start this script with NUMBA_ENABLE_CUDASIM=1 (numba's CUDA simulator)")
    numba_backend.run_cuda_kernels_on_cpu_tensors(True)
    # The simulator runs each GPU thread as a Python thread while its block manager polls them in a loop that
    # holds the GIL for a whole switch interval (5 ms by default) at a time; at 0.2 ms the threads run between
    # polls sooner: about 30 % less time for the same cases (measured 2026-12-07 on 2 cores).
    sys.setswitchinterval(2e-4)
    cases = backend_cases.simulator_cases()
    results = {}
    for case in selected or cases:
        start = time.perf_counter()
        try:
            cases[case]()
            results[case] = None
        except Exception:                                   # report every failure, keep going
            results[case] = traceback.format_exc()
        print(f"{case}: {'ok' if results[case] is None else 'FAILED'} ({time.perf_counter() - start:.1f}s)",
              file=sys.stderr, flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
