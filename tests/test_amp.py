import math

import pytest
import torch

from amp import (DivergenceGuard, DynamicLossScaler, MixedPrecisionOptimizer, cast_model,
                 global_grad_norm)
from model import PRESETS, Transformer
from dataclasses import replace

CFG = replace(PRESETS["tiny"], n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=96, block_size=32)


def test_scaler_backs_off_on_overflow_and_grows_after_an_interval():
    s = DynamicLossScaler(enabled=True, init_scale=1024.0, growth_interval=3)
    s.update(found_inf=True)
    assert s.scale == 512.0
    for _ in range(2):
        s.update(found_inf=False)
    assert s.scale == 512.0
    s.update(found_inf=False)
    assert s.scale == 1024.0
    off = DynamicLossScaler(enabled=False)
    off.update(found_inf=True)
    assert off.scale == 1.0


def make(dtype, scaler):
    torch.manual_seed(0)
    model = cast_model(Transformer(CFG), dtype)
    opt = MixedPrecisionOptimizer([{"params": list(model.parameters())}],
                                  lambda g: torch.optim.AdamW(g, lr=1e-3), dtype, scaler)
    return model, opt


def step(model, opt, idx, inject_inf=False):
    _, loss = model(idx[:, :-1], idx[:, 1:])
    opt.scale_loss(loss).backward()
    if inject_inf:
        model.blocks[1].mlp.w2.weight.grad[0, 0] = float("inf")
    out = opt.step(max_norm=1.0)
    opt.zero_grad()
    return out


def test_fp16_overflow_skips_the_step_halves_the_scale_and_carries_on():
    scaler = DynamicLossScaler(enabled=True)
    model, opt = make(torch.float16, scaler)
    idx = torch.randint(0, CFG.vocab_size, (4, 33))
    step(model, opt, idx)
    weights = [p.detach().clone() for p in model.parameters()]
    masters = [m.detach().clone() for m in opt.master_params]
    adam = {k: v.clone() for k, v in opt.optimizer.state[opt.master_params[0]].items()}
    scale = scaler.scale
    norm, skipped = step(model, opt, idx, inject_inf=True)
    assert skipped and not math.isfinite(norm)
    assert scaler.scale == scale / 2
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(masters, opt.master_params))
    assert all(torch.equal(v, opt.optimizer.state[opt.master_params[0]][k])
               for k, v in adam.items())
    norm, skipped = step(model, opt, idx)
    assert not skipped and math.isfinite(norm)
    assert not all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))


def test_model_weights_are_16_bit_and_masters_fp32():
    model, opt = make(torch.bfloat16, DynamicLossScaler(enabled=False))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(m.dtype == torch.float32 for m in opt.master_params)
    assert model.rope_cos.dtype == torch.float32  # buffers stay fp32
    idx = torch.randint(0, CFG.vocab_size, (4, 33))
    step(model, opt, idx)
    for p, m in zip(model.parameters(), opt.master_params):
        assert torch.equal(p, m.to(torch.bfloat16))  # the model holds the rounded masters


def test_master_weights_keep_updates_smaller_than_bf16_spacing():
    """The reason for fp32 masters: 1 + 1e-3 rounds back to 1 in bf16 (spacing 2^-7 near 1)."""
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = MixedPrecisionOptimizer([{"params": [p]}], lambda g: torch.optim.SGD(g, lr=1e-3),
                                  torch.bfloat16, DynamicLossScaler(enabled=False))
    naive = torch.ones(4, dtype=torch.bfloat16)
    for _ in range(20):
        p.grad = -torch.ones(4, dtype=torch.bfloat16)
        opt.step()
        naive = naive + 1e-3  # the same SGD step without a master copy
    assert torch.equal(naive, torch.ones(4, dtype=torch.bfloat16))  # every update lost
    torch.testing.assert_close(opt.master_params[0], torch.full((4,), 1.02), rtol=0, atol=1e-6)
    assert p[0].item() == pytest.approx(1.0234375)  # the nearest bf16 to 1.02


def test_bf16_and_fp16_track_fp32():
    idx = torch.randint(0, CFG.vocab_size, (8, 33))
    losses = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        model, opt = make(dtype, DynamicLossScaler(enabled=name == "fp16"))
        out = []
        for _ in range(10):
            _, loss = model(idx[:, :-1], idx[:, 1:])
            out.append(loss.item())
            opt.scale_loss(loss).backward()
            opt.step(1.0)
            opt.zero_grad()
        losses[name] = out
    assert losses["fp32"][-1] < losses["fp32"][0] - 0.3
    # 16-bit rounding moves the curve by far less than training moves it
    for name in ("bf16", "fp16"):
        assert max(abs(a - b) for a, b in zip(losses["fp32"], losses[name])) < 0.05


def test_fp16_gradient_norm_and_update_equal_fp32s():
    """One SGD step (no clipping: Adam and clipping are both blind to a constant factor on the
    gradient) from the same weights in fp32 and in fp16 with its 2^16 loss scale: the reported norm
    and the master weights' update must be fp32's up to fp16 rounding (measured: 7e-6 and 7e-4
    relative), so a gradient left scaled shows."""
    torch.manual_seed(1)
    idx = torch.randint(0, CFG.vocab_size, (8, 33))
    norms, updates = {}, {}
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        torch.manual_seed(0)
        model = cast_model(Transformer(CFG), dtype)
        opt = MixedPrecisionOptimizer([{"params": list(model.parameters())}],
                                      lambda g: torch.optim.SGD(g, lr=1e-2), dtype,
                                      DynamicLossScaler(enabled=name == "fp16"))
        before = [m.detach().clone() for m in opt.master_params]
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.scale_loss(loss).backward()
        norms[name], skipped = opt.step(max_norm=0.0)
        assert not skipped
        updates[name] = torch.cat([(m.detach() - b).flatten()
                                   for m, b in zip(opt.master_params, before)])
    assert opt.scaler.scale == 2.0 ** 16
    assert norms["fp16"] == pytest.approx(norms["fp32"], rel=1e-4)
    assert (updates["fp16"] - updates["fp32"]).norm() < 5e-3 * updates["fp32"].norm()


def test_grad_norm_propagates_nan():
    assert math.isnan(float(global_grad_norm([torch.ones(3), torch.tensor([float("nan")])])))
    assert float(global_grad_norm([torch.full((4,), 2.0)])) == 4.0


# -------------------------------------------------------------------------- a run that cannot train
def test_guard_stops_after_k_non_finite_losses_and_forgives_one():
    guard, scaler = DivergenceGuard(patience=3), DynamicLossScaler(enabled=False)
    nan = float("nan")
    assert guard.check(2.0, 1.0, scaler) is None and guard.healthy
    assert guard.check(nan, nan, scaler) is None and not guard.healthy
    assert guard.check(nan, nan, scaler) is None
    assert guard.check(2.0, 1.0, scaler) is None and guard.healthy  # a finite step resets the count
    for _ in range(2):
        assert guard.check(nan, nan, scaler) is None
    reason = guard.check(nan, nan, scaler)
    assert reason.startswith("the loss was nan for 3 steps in a row") and "learning rate" in reason


def test_guard_stops_on_k_non_finite_gradients_without_loss_scaling():
    guard, scaler = DivergenceGuard(patience=4), DynamicLossScaler(enabled=False)
    reasons = [guard.check(2.0, math.inf, scaler) for _ in range(4)]
    # a skipped step leaves the weights as they were: a checkpoint now is still good
    assert guard.healthy
    assert (reasons[:3] == [None] * 3
            and reasons[3].startswith("the gradient norm was inf for 4 steps in a row"))


def test_guard_stops_fp16_when_the_loss_scale_falls_below_the_floor():
    """fp16 overflows in the backward alone are the scaler's job (skip, halve) until the scale is
    below the floor: from 2^16 with floor 1, the 17th skip in a row."""
    guard, scaler = (DivergenceGuard(patience=100, min_loss_scale=1.0),
                     DynamicLossScaler(enabled=True))
    for i in range(1, 18):
        scaler.update(found_inf=True)
        reason = guard.check(3.0, math.inf, scaler)
        assert (reason is None) == (i < 17), (i, scaler.scale)
    assert (reason.startswith("the fp16 loss scale fell to 0.5, below 1, after 17 skipped steps")
            and "bf16" in reason)
