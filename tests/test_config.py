"""TrainConfig: TOML + CLI precedence, type conversion, clear errors for unknown keys and bad values."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from fastmoe_edu import config as C
from fastmoe_edu.config import ConfigError, TrainConfig, parse_args
from fastmoe_edu.backends import BACKEND_NAMES
from fastmoe_edu.data import DATASETS
from fastmoe_edu.routers import ROUTERS

CONFIGS = Path(C.__file__).with_name("configs")


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_are_valid_and_match_default_toml():
    assert TrainConfig().validate() == TrainConfig()
    assert parse_args(["--config", str(CONFIGS / "default.toml")]) == TrainConfig()


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_packaged_configs_load(path):
    parse_args(["--config", str(path)])


def test_packaged_config_found_by_bare_name():
    assert parse_args(["--config", "switch.toml"]).router == "switch"


def test_precedence_defaults_toml_cli(tmp_path):
    a = write(tmp_path, "a.toml", 'lr = 0.01\nmax_steps = 7\nrouter = "noisy_top_k"\n')
    b = write(tmp_path, "b.toml", "max_steps = 9\n")
    cfg = parse_args(["--config", a])
    assert (cfg.lr, cfg.max_steps, cfg.router) == (0.01, 7, "noisy_top_k")
    assert cfg.seq_len == TrainConfig().seq_len                          # untouched key keeps its default
    cfg = parse_args(["--config", a, f"--config={b}"])                      # later file wins
    assert (cfg.lr, cfg.max_steps) == (0.01, 9)
    cfg = parse_args(["--max_steps=3", "--config", a, "--config", b])       # CLI wins wherever it stands
    assert (cfg.lr, cfg.max_steps) == (0.01, 3)


def test_cli_types():
    cfg = parse_args(["--lr=1e-3", "--seq_len=32", "--tie_weights=false", "--resume", "--capacity_factor=1.5",
                      "--device=cpu"])
    assert cfg.lr == 1e-3 and isinstance(cfg.lr, float)
    assert cfg.seq_len == 32 and isinstance(cfg.seq_len, int)
    assert cfg.tie_weights is False and cfg.resume is True
    assert cfg.capacity_factor == 1.5
    assert parse_args(["--capacity_factor=none"]).capacity_factor is None
    assert parse_args(["--resume=TRUE"]).resume is True
    assert parse_args(["--lr=1"]).lr == 1.0                               # an int where a float is expected


def test_router_options_from_toml_and_cli(tmp_path):
    path = write(tmp_path, "r.toml", "[router_options]\nbalance_loss_weight = 0.05\n")
    cfg = parse_args(["--config", path, "--router_options.z_loss_weight=0.001"])
    assert cfg.router_options == {"balance_loss_weight": 0.05, "z_loss_weight": 0.001}
    cfg = parse_args(["--router=sigmoid", "--router_options.bias_update_rate=0.01"])
    assert cfg.router_options == {"bias_update_rate": 0.01}


@pytest.mark.parametrize("argv, words", [
    (["--lrr=0.1"], ["lrr", "allowed keys", "lr"]),
    (["--bogus"], ["bogus", "allowed keys"]),
    (["positional"], ["positional"]),
])
def test_unknown_cli_key(argv, words):
    with pytest.raises(ConfigError) as err:
        parse_args(argv)
    for word in words:
        assert word in str(err.value)


def test_unknown_toml_key(tmp_path):
    path = write(tmp_path, "bad.toml", "max_step = 10\n")
    with pytest.raises(ConfigError, match="max_step.*allowed keys: dataset, seq_len"):
        parse_args(["--config", path])
    path = write(tmp_path, "table.toml", "[model]\nn_layer = 2\n")
    with pytest.raises(ConfigError, match="'model'"):
        parse_args(["--config", path])


@pytest.mark.parametrize("argv, pattern", [
    (["--backend=cuda_magic"], r"backend='cuda_magic'.*allowed values: reference, numba, auto"),
    (["--lr=-1"], r"lr=-1.0 .*> 0"),
    (["--seq_len=0"], r"seq_len=0 .*>= 1"),
    (["--batch_size=-3"], r"batch_size=-3 .*>= 1"),
    (["--dataset=wikipedia"], r"dataset='wikipedia'.*languages, stdlib"),
    (["--router=magic"], r"router='magic'.*softmax_top_k"),
    (["--expert=tanh"], r"expert='tanh'.*swiglu"),
    (["--top_k=9"], r"top_k=9.*num_experts=8"),
    (["--router=switch"], r"top_k must be 1"),
    (["--router=gshard", "--top_k=1"], r"top_k must be 2"),
    (["--d_model=30"], r"d_model=30 .*n_head=4"),
    (["--capacity_factor=0"], r"capacity_factor=0.0 .*> 0"),
    (["--min_lr=1"], r"min_lr=1.0 .*<= lr"),
    (["--device=tpu"], r"device='tpu'"),
    (["--seq_len=abc"], r"seq_len='abc' cannot be read as int"),
    (["--seq_len=2.5"], r"seq_len='2.5' cannot be read as int"),
    (["--resume=maybe"], r"resume='maybe' cannot be read as bool"),
    (["--lr"], r"--lr needs a value"),
    (["--router_options.nonsense=1"], r"router_options.nonsense.*balance_loss_weight"),
])
def test_bad_values(argv, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_args(argv)


def test_bad_toml_value_types(tmp_path):
    with pytest.raises(ConfigError, match="seq_len=True cannot be read as int"):
        parse_args(["--config", write(tmp_path, "a.toml", "seq_len = true\n")])
    with pytest.raises(ConfigError, match="lr='fast'"):
        parse_args(["--config", write(tmp_path, "b.toml", 'lr = "fast"\n')])
    with pytest.raises(ConfigError, match="does not exist"):
        parse_args(["--config", str(tmp_path / "missing.toml")])
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_args(["--config", write(tmp_path, "c.toml", "lr = = 1\n")])


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in C.field_names():
        assert f"--{name}=" in out
    assert "(default: 'languages')" in out


def test_help_from_command_line():
    proc = subprocess.run([sys.executable, "-m", "fastmoe_edu.train", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--max_steps=" in proc.stdout


def test_main_reports_config_errors(capsys):
    from fastmoe_edu.train import main
    with pytest.raises(SystemExit) as exit_info:
        main(["--backend=nope"])
    assert exit_info.value.code == 2
    assert "backend='nope'" in capsys.readouterr().err


def test_toml_round_trip(tmp_path):
    cfg = parse_args(["--lr=0.002", "--capacity_factor=1.25", "--out_dir=some dir", "--router_options.z_loss_weight=0.01"])
    path = write(tmp_path, "resolved.toml", C.to_toml(cfg))
    assert parse_args(["--config", path]) == cfg
    none_cfg = parse_args(["--config", write(tmp_path, "n.toml", C.to_toml(TrainConfig()))])
    assert none_cfg.capacity_factor is None


def test_format_config_and_choices_agree():
    text = C.format_config(TrainConfig())
    for name in C.field_names():
        assert name in text
    choices = {f.name: f.metadata["choices"] for f in dataclasses.fields(TrainConfig)}
    assert set(choices["dataset"]) == set(DATASETS)
    assert set(choices["router"]) == set(ROUTERS) and set(choices["backend"]) == set(BACKEND_NAMES)
    assert C.from_dict(TrainConfig().to_dict()) == TrainConfig()
