"""``pipeline_degree="auto"`` (FSMoE's online choice, distributed/autotune.py) through the training loop.

One ``mpirun -n 2`` job of tests/mpi_scripts/check_auto_pipeline.py (about 6 s on 2 cores): a tiny model
trained with both degrees "auto", and with the forward "auto" and the backward fixed at 3; each run
again with the chosen degrees fixed. Which degrees this machine's measurements choose is not tested
(it depends on the machine's load); that a choice was made, is a power of 2 within the bounds, is the
same on every rank, and reproduces the fixed run, is.
"""
import json
import tempfile
from pathlib import Path

import pytest

from fastmoe_edu.config import ConfigError, parse_args, to_toml
from fastmoe_edu.distributed.autotune import MAX_DEGREE
from launcher import launch

SCRIPT = Path(__file__).resolve().parent / "mpi_scripts" / "check_auto_pipeline.py"
# The profiling passes run the layer unpipelined, the fixed run pipelined: the same rows through the same
# experts, only the expert weight gradients add their chunks' partial sums in another order (float32 ulp).
# 1e-5 relative over 6 AdamW steps, as between the two engines (test_distributed_training.py).
LOSS_RTOL = 1e-5


def test_config_reads_an_integer_or_auto_and_names_a_bad_value(tmp_path):
    assert parse_args(["--pipeline_degree=2"]).pipeline_degree == 2
    cfg = parse_args(["--pipeline_degree=auto", "--backward_pipeline_degree=4"])
    assert (cfg.pipeline_degree, cfg.backward_pipeline_degree) == ("auto", 4)
    assert parse_args([]).backward_pipeline_degree is None                   # = as pipeline_degree
    path = tmp_path / "resolved.toml"
    path.write_text(to_toml(cfg))
    assert parse_args(["--config", str(path)]) == cfg                        # "auto" survives TOML
    with pytest.raises(ConfigError, match=r"pipeline_degree='fast' is not allowed; allowed: an integer >= 1, or 'auto'"):
        parse_args(["--pipeline_degree=fast"])
    with pytest.raises(ConfigError, match=r"backward_pipeline_degree=0 is out of range; it must be >= 1"):
        parse_args(["--backward_pipeline_degree=0"])
    both = parse_args(["--pipeline_degree=auto", "--shadow_experts=auto"])         # shadowing + pipelining
    assert (both.pipeline_degree, both.shadow_experts) == ("auto", "auto")
    with pytest.raises(ConfigError, match=r"shadow_experts='auto' .* does not combine with expert_tensor_parallel"):
        parse_args(["--shadow_experts=auto", "--expert_tensor_parallel=true"])
    assert parse_args(["--pipeline_degree=2", "--ranks_per_node=2"]).ranks_per_node == 2   # pipelined hierarchical


@pytest.mark.mpi
def test_auto_degrees_are_chosen_alike_and_reproduce_the_fixed_run():
    with tempfile.TemporaryDirectory() as work:
        output = Path(work) / "auto.json"
        done = launch("mpi", 2, [str(SCRIPT), work, str(output)], timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        results = json.loads(output.read_text())
    # One log line per run and MoE layer, from rank 0 alone.
    assert done.stdout.count("auto pipeline degrees, MoE layer 0: forward") == 2, done.stdout[-3000:]
    allowed = [2 ** i for i in range(MAX_DEGREE.bit_length()) if 2 ** i <= MAX_DEGREE]
    for case, result in results.items():
        per_rank = result["chosen"]                               # [rank][layer] = [D_f, D_b]
        assert all(layers == per_rank[0] for layers in per_rank), case          # the same on every rank
        (D_f, D_b), = per_rank[0]
        assert D_f in allowed, case
        assert D_b in allowed if case == "auto" else D_b == 3, case         # a fixed degree stays as given
        assert len(result["auto"]) == 6
        assert result["auto"] == pytest.approx(result["fixed"], rel=LOSS_RTOL), case
        tuning = result["tuning"]
        assert tuning["measured_unpipelined"]["forward"] > 0 and tuning["predicted"]["total"] > 0
