"""Mixed precision (precision.py) and the grouped optimizer step (train.configure_optimizer)."""
import math

import pytest
import torch

from fastmoe_edu.config import ConfigError, parse_args
from fastmoe_edu.layer import MoELayer
from fastmoe_edu.precision import LossScaler, MasterWeightAdamW, autocast, store_parameters
from fastmoe_edu.train import (build_dataset, configure_optimizer, get_batch, parameter_chunks, train,
                               train_step)
from fastmoe_edu.model import build_model
from fastmoe_edu.runtime import Runtime

pytestmark = pytest.mark.usefixtures("one_thread")


def small(tmp_path, *argv):
    return parse_args(["--progress=false", "--sample_tokens=0", f"--out_dir={tmp_path}", "--batch_size=8",
                       "--seq_len=32", "--max_steps=20", "--eval_interval=0", "--eval_iters=1",
                       "--checkpoint_interval=0", "--warmup_steps=3", *argv])


# --------------------------------------------------------------------------------------------------
# loss scaling
# --------------------------------------------------------------------------------------------------
def test_loss_scaler_only_scales_float16():
    for dtype in ("float32", "bfloat16"):
        scaler = LossScaler(dtype)
        assert scaler.scale == 1.0 and not scaler.update(False) and scaler.scale == 1.0


def test_loss_scaler_halves_on_overflow_and_grows_after_an_interval():
    scaler = LossScaler("float16", initial_scale=1024.0, growth_interval=3)
    assert scaler.update(False) and scaler.scale == 512.0          # overflow: skip, halve
    assert not scaler.update(True) and not scaler.update(True) and scaler.scale == 512.0
    assert not scaler.update(True) and scaler.scale == 1024.0      # 3 good steps: double
    scaler.load_state_dict({"scale": 1.0, "good_steps": 0})
    assert not scaler.update(False)                                # at scale 1 an overflow is a real divergence


def test_float16_overflow_skips_the_update_and_halves_the_scale(tmp_path):
    cfg = small(tmp_path, "--dtype=float16")
    dataset = build_dataset(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, dataset.vocab_size)
    optimizer = configure_optimizer(model, cfg)
    before = [p.detach().clone() for p in model.parameters()]
    scaler = LossScaler("float16", initial_scale=2.0 ** 120)       # loss · 2^120 overflows float16 activations' grads
    record = train_step(model, optimizer, get_batch(dataset, cfg, "train", 0), cfg, 0, Runtime(), scaler)
    assert record["overflow"] and record["skipped"] and scaler.scale == 2.0 ** 119
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))   # no update reached the weights
    assert math.isfinite(record["loss"])


# --------------------------------------------------------------------------------------------------
# the loss curve in low precision tracks float32
# --------------------------------------------------------------------------------------------------
# bfloat16 keeps 8 significant bits: each matrix product's result is rounded by up to 2^-8 ≈ 0.4 %,
# so a loss of 2-4 moves by ~0.01-0.02 at a step, and 20 steps of training let it drift a little more
# (measured on this default model over 60 steps: at most 0.068, mean 0.006, both backends; float16
# with loss scaling: at most 0.063). Bounds: 0.1 at every step, 0.03 on average.
# The default batch (32 × 64 tokens): with 8 × 32 a single step's loss is noisy enough that one
# token's routing flipping by rounding moves it by 0.1.
DEFAULT_BATCH = ("--batch_size=32", "--seq_len=64")


@pytest.fixture(scope="module")
def float32_losses(tmp_path_factory):
    """backend -> the float32 run's losses: trained once per backend, for every low-precision run compared with it."""
    runs = {}

    def losses(backend):
        if backend not in runs:
            out = tmp_path_factory.mktemp(f"f32_{backend}")
            runs[backend] = train(small(out, *DEFAULT_BATCH, f"--backend={backend}"))["train_loss"]
        return runs[backend]
    return losses


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_low_precision_loss_tracks_float32(tmp_path, dtype, backend, float32_losses):
    full = float32_losses(backend)
    low = train(small(tmp_path / dtype, *DEFAULT_BATCH, f"--backend={backend}", f"--dtype={dtype}"))["train_loss"]
    gaps = [abs(a - b) for a, b in zip(full, low)]
    assert len(gaps) == 20 and max(gaps) < 0.1 and sum(gaps) / len(gaps) < 0.03, gaps
    assert low[-1] < low[0] - 0.5                                   # and it trains


def test_routers_route_in_float32_under_autocast():
    torch.manual_seed(0)
    layer = MoELayer(32, 64, 8, router="softmax_top_k", top_k=2)
    x = torch.randn(256, 32)
    plain = layer.router.route(x)
    with autocast("bfloat16", "cpu"):
        out, _ = layer.router(x)
    assert out.logits.dtype == torch.float32
    assert torch.equal(out.expert_ids, plain.expert_ids) and torch.equal(out.weights, plain.weights)


def test_dtype_is_checked():
    with pytest.raises(ConfigError, match="dtype='half' is not allowed; allowed values: float32, bfloat16, float16"):
        parse_args(["--dtype=half"])


# --------------------------------------------------------------------------------------------------
# grouped optimizer step
# --------------------------------------------------------------------------------------------------
def test_parameter_chunks_cover_every_parameter_once_in_order():
    params = [torch.zeros(n) for n in (5, 3, 9, 1, 1, 4)]
    for cap in (0, 1, 4, 8, 100):
        chunks = parameter_chunks(params, cap)
        assert [p for chunk in chunks for p in chunk] == params
        if cap:
            # at most cap elements, except a tensor larger than cap, which is a group alone
            assert all(sum(p.numel() for p in chunk) <= cap or len(chunk) == 1 for chunk in chunks)


def test_grouped_optimizer_step_gives_the_same_training(tmp_path):
    whole = train(small(tmp_path / "whole", "--max_steps=4"))["train_loss"]
    grouped_cfg = small(tmp_path / "grouped", "--max_steps=4", "--optimizer_group_size=5000")
    torch.manual_seed(0)
    assert len(configure_optimizer(build_model(grouped_cfg, 64), grouped_cfg).param_groups) > 10
    assert train(grouped_cfg)["train_loss"] == whole                 # per-element AdamW math is unchanged


def test_resume_refuses_another_optimizer_group_size(tmp_path):
    train(small(tmp_path, "--max_steps=2", "--optimizer_group_size=5000"))
    with pytest.raises(ConfigError, match="optimizer_group_size=0 \\(checkpoint: 5000\\)"):
        train(small(tmp_path, "--max_steps=2", "--resume"))


# --------------------------------------------------------------------------------------------------
# master weights in the optimizer (bfloat16 parameters, float32 copies, one group at a time)
# --------------------------------------------------------------------------------------------------
def _two_groups(params):
    return [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}]


def test_master_weight_adamw_is_torch_adamw_on_the_float32_copies():
    """The same gradients (bfloat16 values, exact in float32): the master copies follow torch's AdamW on
    float32 parameters bit for bit, and the model's bfloat16 parameters are them rounded."""
    torch.manual_seed(0)
    start = [torch.randn(n, 3).bfloat16().float() for n in (4, 5, 2, 7)]
    full = [torch.nn.Parameter(t.clone()) for t in start]
    half = [torch.nn.Parameter(t.clone().bfloat16()) for t in start]
    reference = torch.optim.AdamW(_two_groups(full), lr=1e-2, betas=(0.9, 0.99))
    master = MasterWeightAdamW(_two_groups(half), lr=1e-2, betas=(0.9, 0.99))
    for _ in range(5):
        for f, h in zip(full, half):
            h.grad = torch.randn_like(h)
            f.grad = h.grad.float()
        reference.step()
        master.step()
    for f, h in zip(full, half):
        assert torch.equal(master.state[h]["master"], f.detach())
        assert torch.equal(h.detach(), f.detach().bfloat16())


def test_master_weights_survive_a_checkpoint_in_float32():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3).bfloat16()) for _ in range(4)]
    optimizer = MasterWeightAdamW(_two_groups(params), lr=1e-2)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    restored = MasterWeightAdamW(_two_groups(params), lr=1e-2)
    restored.load_state_dict(optimizer.state_dict())
    for p in params:
        for key in ("master", "exp_avg", "exp_avg_sq"):
            assert restored.state[p][key].dtype == torch.float32
            assert torch.equal(restored.state[p][key], optimizer.state[p][key])


def test_master_weights_keep_bfloat16_parameters_and_float32_routers(tmp_path):
    cfg = small(tmp_path, "--dtype=bfloat16", "--master_weights=optimizer", "--max_steps=2")
    model = store_parameters(build_model(cfg, 64), cfg.dtype, cfg.master_weights)
    routers = {id(p) for layer in model.moe_layers() for p in layer.router.parameters()}
    assert routers and all(p.dtype == (torch.float32 if id(p) in routers else torch.bfloat16)
                           for p in model.parameters())
    assert isinstance(configure_optimizer(model, cfg), MasterWeightAdamW)


# The same tolerance as bfloat16 under autocast above: the arithmetic differs only in where values
# are rounded (bfloat16 parameters and gradients instead of bfloat16 copies of float32 ones).
def test_bfloat16_master_weights_train_like_float32(tmp_path, float32_losses):
    full = float32_losses("reference")                               # the default backend
    low = train(small(tmp_path / "bf16", *DEFAULT_BATCH, "--dtype=bfloat16", "--master_weights=optimizer"))
    gaps = [abs(a - b) for a, b in zip(full, low["train_loss"])]
    assert len(gaps) == 20 and max(gaps) < 0.1 and sum(gaps) / len(gaps) < 0.03, gaps
    assert low["train_loss"][-1] < low["train_loss"][0] - 0.5


def test_master_weights_need_bfloat16():
    for dtype in ("float32", "float16"):
        with pytest.raises(ConfigError, match=f"master_weights='optimizer' with dtype='{dtype}'.*need dtype='bfloat16'"):
            parse_args([f"--dtype={dtype}", "--master_weights=optimizer"])


def test_master_weights_resume_reproduces_the_run(tmp_path):
    precision = ("--dtype=bfloat16", "--master_weights=optimizer", "--max_steps=4", "--optimizer_group_size=5000")
    whole = train(small(tmp_path / "whole", *precision))["train_loss"]
    train(small(tmp_path / "split", *precision), stop_at=2)
    assert train(small(tmp_path / "split", *precision, "--resume"))["train_loss"] == whole
