"""``train.amp.HysteresisGradScaler``: DeepSpeed's ``DynamicLossScaler`` rule (hysteresis, window, floor) on CPU
tensors, its state round trip through a checkpoint, and the trainer's scaler from the config."""

from __future__ import annotations

import datetime
import math
import os
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from train.amp import HysteresisGradScaler, build_scaler

# The 2-rank FSDP2 test's processes import this module: the model library (train.checkpoint, lfvila.config) is
# imported inside the tests that need it, so each child imports torch and train.amp only.


class DeepSpeedRule:
    """DeepSpeed's ``DynamicLossScaler.update_scale`` (``deepspeed/runtime/fp16/loss_scaler.py``) transcribed, its
    own bookkeeping (``cur_iter``, ``last_overflow_iter``, a modulo): the oracle the scaler must follow."""

    def __init__(self, init_scale, scale_factor, scale_window, min_scale, delayed_shift, consecutive_hysteresis):
        self.cur_scale, self.cur_iter, self.last_overflow_iter = init_scale, 0, -1
        self.scale_factor, self.scale_window, self.min_scale = scale_factor, scale_window, min_scale
        self.delayed_shift = self.cur_hysteresis = delayed_shift
        self.consecutive_hysteresis = consecutive_hysteresis

    def update_scale(self, overflow: bool) -> None:
        if overflow:
            if self.delayed_shift == 1 or self.cur_hysteresis == 1:
                self.cur_scale = max(self.cur_scale / self.scale_factor, self.min_scale)
            else:
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        else:
            if self.consecutive_hysteresis:
                self.cur_hysteresis = self.delayed_shift
            if (self.cur_iter - self.last_overflow_iter) % self.scale_window == 0:
                if not self.consecutive_hysteresis:
                    self.cur_hysteresis = self.delayed_shift
                self.cur_scale *= self.scale_factor
        self.cur_iter += 1


def _step(scaler: HysteresisGradScaler, param: torch.nn.Parameter, opt, overflow: bool) -> None:
    """One training step whose gradient overflows (inf) or not."""
    opt.zero_grad(set_to_none=True)
    loss = param.sum() * (math.inf if overflow else 1.0)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


def _setup(**kw):
    param = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([param], lr=0.1)
    return HysteresisGradScaler("cpu", **kw), param, opt


def test_scripted_sequence():
    # window 3, hysteresis 2, from 2^10: O = overflow, G = good step
    scaler, param, opt = _setup(init_scale=2.0**10, growth_interval=3, hysteresis=2, min_scale=2.0**8,
                                raise_at_min_scale=False)
    script = "O O G G G O G O O O O G G G"
    scales, lefts = [], []
    for s in script.split():
        _step(scaler, param, opt, s == "O")
        scales.append(math.log2(scaler.get_scale()))
        lefts.append(scaler.get_hysteresis_left())
    # 1st O: tolerated (left 2 -> 1); 2nd O: cut to 2^9; 3 G: grow to 2^10, hysteresis back to 2; O tolerated;
    # G (1 good step); O O: cut to 2^9 then 2^8; O O at the floor 2^8: kept there; 3 G: grow to 2^9
    assert scales == [10, 9, 9, 9, 10, 10, 10, 9, 8, 8, 8, 8, 8, 9]
    assert lefts == [1, 1, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1, 1, 2]
    # overflowing steps changed nothing; the 7 good ones each moved the parameter by lr * 1 (the unscaled gradient)
    torch.testing.assert_close(param.detach(), torch.full((3,), -0.1 * 7))


@pytest.mark.parametrize("hysteresis,consecutive", [(1, False), (2, False), (3, False), (3, True)])
def test_follows_deepspeed_on_random_sequences(hysteresis, consecutive):
    rng = random.Random(hysteresis * 10 + consecutive)
    scaler, param, opt = _setup(init_scale=2.0**6, growth_interval=4, hysteresis=hysteresis,
                                consecutive_hysteresis=consecutive, min_scale=1.0, raise_at_min_scale=False)
    oracle = DeepSpeedRule(2.0**6, 2.0, 4, 1.0, hysteresis, consecutive)
    for i in range(300):
        overflow = rng.random() < 0.3
        _step(scaler, param, opt, overflow)
        oracle.update_scale(overflow)
        assert scaler.get_scale() == oracle.cur_scale, i
        assert scaler.get_hysteresis_left() == oracle.cur_hysteresis, i


def test_hysteresis_one_is_torch_grad_scaler():
    rng = random.Random(0)
    ours, p1, o1 = _setup(init_scale=2.0**12, growth_interval=3, hysteresis=1, min_scale=2.0**-20)
    param = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([param], lr=0.1)
    torch_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3)
    for _ in range(100):
        overflow = rng.random() < 0.4
        _step(ours, p1, o1, overflow)
        _step(torch_scaler, param, opt, overflow)
        assert ours.get_scale() == torch_scaler.get_scale()
        assert ours.state_dict()["_growth_tracker"] == torch_scaler.state_dict()["_growth_tracker"]


def test_overflow_at_min_scale_raises():
    scaler, param, opt = _setup(init_scale=4.0, growth_interval=10, hysteresis=1, min_scale=2.0)
    _step(scaler, param, opt, True)
    assert scaler.get_scale() == 2.0
    with pytest.raises(RuntimeError, match="min_scale"):
        _step(scaler, param, opt, True)


def test_state_round_trip_through_a_checkpoint(tmp_path):
    from train import checkpoint as ckpt

    scaler, param, opt = _setup(init_scale=2.0**10, growth_interval=3, hysteresis=3, min_scale=1.0)
    for overflow in (True, False, False):  # left 2, two good steps counted
        _step(scaler, param, opt, overflow)
    state = scaler.state_dict()
    assert state == {"scale": 2.0**10, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 3,
                     "_growth_tracker": 2, "hysteresis": 3, "consecutive_hysteresis": False, "min_scale": 1.0,
                     "raise_at_min_scale": True, "_hysteresis_left": 2}
    path = ckpt.save_checkpoint(tmp_path, 3, model=torch.nn.Linear(2, 2), optimizer=None, scaler=scaler)
    fresh = HysteresisGradScaler("cpu")  # other defaults: the checkpoint's values win
    ckpt.load_checkpoint(path, model=torch.nn.Linear(2, 2), optimizer=None, scaler=fresh)
    assert fresh.state_dict() == state
    p2, o2 = torch.nn.Parameter(torch.zeros(3)), None
    o2 = torch.optim.SGD([p2], lr=0.1)
    for overflow in (False, True, True, True):  # both continue alike: grow, then two tolerated, then a cut
        _step(scaler, param, opt, overflow)
        _step(fresh, p2, o2, overflow)
        assert fresh.state_dict() == scaler.state_dict()
    assert scaler.get_scale() == 2.0**10 and scaler.get_hysteresis_left() == 1
    # a plain torch.amp.GradScaler state (an older checkpoint) loads with the configured hysteresis, all of it left
    old = HysteresisGradScaler("cpu", hysteresis=2)
    old.load_state_dict(torch.amp.GradScaler("cpu", init_scale=8.0).state_dict())
    assert old.get_scale() == 8.0 and old.get_hysteresis_left() == 2


def test_disabled_is_a_no_op():
    scaler, param, opt = _setup(enabled=False)
    loss = param.sum()
    assert scaler.scale(loss) is loss and scaler.state_dict() == {}
    loss.backward()
    scaler.step(opt)
    scaler.update()
    torch.testing.assert_close(param.detach(), torch.full((3,), -0.1))


def test_built_from_the_config():
    from lfvila.config import ConfigError, load_config

    cfg = load_config(None, ["--train.precision", "fp16", "--train.grad_scaler.hysteresis", "3"]).train
    scaler = build_scaler(cfg, torch.device("cpu"))
    assert scaler.is_enabled() and scaler.get_scale() == 2.0**32 and scaler.get_growth_interval() == 1000
    assert scaler.get_hysteresis_left() == 3 and scaler.get_backoff_factor() == 0.5
    assert not build_scaler(load_config(None, []).train, "cpu").is_enabled()  # auto / fp32 / bf16: no scaling
    with pytest.raises(ConfigError, match="train.grad_scaler.backoff_factor"):
        load_config(None, ["--train.grad_scaler.backoff_factor", "2"])
    with pytest.raises(ValueError, match="hysteresis"):
        HysteresisGradScaler("cpu", hysteresis=0)


# ------------------------------------------------------------------------------------------------ FSDP2 as ZeRO-2


class _Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(2)])


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Blocks()])


class _Toy(nn.Module):
    """What ``wrap_model`` shards: ``video_encoder.layers[i].blocks[j]`` (no text encoder), then the root."""

    def __init__(self):
        super().__init__()
        self.video_encoder = _Encoder()
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        for block in self.video_encoder.layers[0].blocks:
            x = x + block(x)
        return self.head(x).sum()


def _fsdp_worker(rank, init_file, out_dir):
    from torch.distributed.tensor import DTensor

    from train.dist import DistEnv, wrap_model

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    try:
        env, out = DistEnv(rank, 2, rank, torch.device("cpu")), {}
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(rank))  # each rank its own batch
        for reshard in (True, False):
            torch.manual_seed(0)
            model = wrap_model(_Toy(), env, "fsdp", "fp32", reshard_after_forward=reshard)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            scaler = HysteresisGradScaler("cpu", init_scale=2.0**10, hysteresis=1)
            block = model.video_encoder.layers[0].blocks[0][0]
            loss = model(x)
            gathered = not isinstance(block.weight, DTensor)  # between forward and backward
            scaler.scale(loss).backward()
            sharded_grad = isinstance(block.weight.grad, DTensor) and block.weight.grad.to_local().shape == (4, 8)
            scaler.step(opt)
            scaler.update()
            state = opt.state[block.weight]["exp_avg"]
            out[reshard] = {"gathered_after_forward": gathered, "sharded_grad": sharded_grad,
                            "sharded_state": isinstance(state, DTensor) and state.to_local().shape == (4, 8),
                            "weight": block.weight.full_tensor().detach().clone()}
            if not reshard:  # an overflow in rank 0's gradient shard alone: every rank skips and cuts
                before = block.weight.full_tensor().detach().clone()
                scaler.scale(model(x)).backward()
                if rank == 0:
                    block.weight.grad.to_local()[0, 0] = math.inf
                scaler.step(opt)
                scaler.update()
                out["overflow"] = {"scale": scaler.get_scale(),
                                   "unchanged": torch.equal(block.weight.full_tensor(), before)}
        torch.manual_seed(0)
        half = wrap_model(_Toy(), env, "fsdp", "fp16", reshard_after_forward=False)
        out["fp16_loss_dtype"] = str(half(x).dtype)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fsdp2_reshard_after_forward_false_is_zero2(tmp_path):
    """On 2 gloo ranks: with ``reshard_after_forward=False`` the blocks' parameters stay gathered from the forward to
    the backward while the gradients and AdamW state are sharded (ZeRO-2); the update equals the ZeRO-3-like
    default's; an overflow in one rank's gradient shard skips the step on every rank; fp16 computes in fp16."""
    mp.spawn(_fsdp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for r in results:
        assert r[False]["gathered_after_forward"] and not r[True]["gathered_after_forward"]
        for reshard in (True, False):
            assert r[reshard]["sharded_grad"] and r[reshard]["sharded_state"]
        torch.testing.assert_close(r[False]["weight"], r[True]["weight"])
        torch.testing.assert_close(r[False]["weight"], results[0][False]["weight"])
        assert r["overflow"] == {"scale": 2.0**9, "unchanged": True}
        assert r["fp16_loss_dtype"] == "torch.float16"
