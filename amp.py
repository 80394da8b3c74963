"""amp.py: mixed precision written out: low-precision model, fp32 master weights, dynamic loss scaling.

The idea (Micikevicius et al., 2018): run the forward and backward in 16-bit floats, which halves activation
memory and runs on the tensor cores, but keep an fp32 "master" copy of every weight for the update: a step
lr * grad is often smaller than the spacing of bf16 numbers near the weight (8 bits of mantissa), and would
round away. Each step: grads (16-bit, on the model) -> fp32 master grads -> clip -> optimizer step on the
masters -> masters rounded back into the model's 16-bit weights.

Why a 16-bit model and a master copy, rather than autocast over fp32 parameters: it is the layout whose memory
the ZeRO paper counts (2 bytes of weights + 2 of grads on the model, 4 + 4 + 4 of master, momentum and
variance in the optimizer: 16 bytes per parameter), it is what zero.py shards, and it shows every cast in this
file rather than inside autocast. Norms and the loss are computed in fp32 inside model.py all the same.

fp16 has 5 exponent bits: gradients below 2^-24 flush to zero. Dynamic loss scaling multiplies the loss by S
before backward (so every gradient is S times larger and stays representable), divides the gradients by S
before the update, and adapts S: if any gradient is inf/nan the step is skipped and S halves; after
`growth_interval` clean steps S doubles (the torch GradScaler defaults: S0 = 2^16, x2 per 2000 steps, x0.5).
bf16 has fp32's exponent range and needs no scaling.

Memory per parameter (bytes): fp32 4 + 4 + 8 (Adam) = 16; bf16/fp16 here 2 + 2 + (4 + 4 + 8) = 20 before
ZeRO, of which 16 sit in the optimizer and shard away under zero.py.

Demo: `python amp.py` trains a tiny model for a few steps in each precision and shows fp16's scaler at work.
"""
import contextlib
import math

import torch

# --amp fp8 keeps the model in bf16 like --amp bf16; quantization.py then runs every Linear's matmuls in FP8.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}


class DynamicLossScaler:
    """Loss scaling for fp16, from scratch. With enabled=False it is the identity (scale 1, never skips)."""

    def __init__(self, enabled, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000):
        self.enabled = enabled
        self.scale = init_scale if enabled else 1.0
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.good_steps = 0

    def update(self, found_inf):
        """Called once per step after the overflow check, which must be the same on every rank."""
        if not self.enabled:
            return
        if found_inf:
            self.scale *= self.backoff_factor
            self.good_steps = 0
        else:
            self.good_steps += 1
            if self.good_steps % self.growth_interval == 0:
                self.scale *= self.growth_factor

    def state_dict(self):
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, sd):
        self.scale, self.good_steps = sd["scale"], sd["good_steps"]


def cast_model(model, dtype):
    """Store the model's parameters in `dtype` (buffers such as the RoPE tables stay fp32)."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def global_grad_norm(grads, reduce_fn=None, expert_grads=(), expert_reduce_fn=None):
    """sqrt(sum of squared entries) over all gradients, in fp32 or better. `reduce_fn` sums the squared norm
    over ranks that hold distinct pieces (ZeRO shards, tensor-parallel slices). inf/nan propagate into the
    norm, so a non-finite norm is also the overflow check, and it agrees on every rank after the reduction.
    Under expert parallelism (moe.py) `expert_grads` are this rank's experts' gradients, which the other ranks
    of its ep group do not hold: `expert_reduce_fn` sums their part over that group before it joins the rest."""
    dtype = torch.promote_types(grads[0].dtype, torch.float32) if grads else torch.float32
    sq = torch.zeros((), dtype=dtype, device=grads[0].device if grads else "cpu")
    for g in grads:
        sq += g.to(dtype).pow(2).sum()
    if expert_grads or expert_reduce_fn is not None:  # (every rank of the ep group reduces, with or without experts)
        sq_experts = torch.zeros_like(sq)
        for g in expert_grads:
            sq_experts += g.to(dtype).pow(2).sum()
        sq = sq + (expert_reduce_fn(sq_experts) if expert_reduce_fn is not None else sq_experts)
    if reduce_fn is not None:
        sq = reduce_fn(sq)
    return sq.sqrt()


def clip_coef(norm, max_norm):
    """Scale factor that brings the gradient norm down to max_norm (1 when it already is, or when off)."""
    if not max_norm or max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (float(norm) + 1e-6))


class MixedPrecisionOptimizer:
    """An optimizer over fp32 master copies of a (possibly 16-bit) model's trainable parameters.

    `make_optimizer(param_groups)` builds the inner optimizer (AdamW here) over the masters; the groups keep
    the structure of `param_groups`, which holds the model's own parameters. In fp32 the masters are the
    model's parameters themselves: no copy, one code path. `no_sync` makes the context for accumulation
    micro-steps that must not communicate (ddp.py's); one process has nothing to skip. `expert_norm_reduce_fn`
    (expert parallelism): sums the squared norm of the expert_parallel parameters' gradients over the ep group."""

    def __init__(self, param_groups, make_optimizer, dtype, scaler, norm_reduce_fn=None, no_sync=None,
                 expert_norm_reduce_fn=None):
        self.model_params = [p for g in param_groups for p in g["params"]]
        self.low_precision = dtype != torch.float32 and dtype != torch.float64
        if self.low_precision:
            master_groups = [{**g, "params": [p.detach().float().clone().requires_grad_(True) for p in g["params"]]}
                             for g in param_groups]
        else:
            master_groups = param_groups
        self.master_params = [p for g in master_groups for p in g["params"]]
        self.optimizer = make_optimizer(master_groups)
        self.scaler = scaler
        self.norm_reduce_fn, self.expert_norm_reduce_fn = norm_reduce_fn, expert_norm_reduce_fn
        self.no_sync = no_sync or contextlib.nullcontext

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self):
        for p in self.model_params:
            p.grad = None

    def scale_loss(self, loss):
        return loss * self.scaler.scale if self.scaler.enabled else loss

    def step(self, max_norm=0.0):
        """Unscale, check for overflow, clip, update, copy back. Returns (grad_norm, skipped)."""
        inv_scale = 1.0 / self.scaler.scale
        for p, m in zip(self.model_params, self.master_params):
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            # In fp32 this is the identity (m is p); in 16-bit it is the one cast up to the master grad.
            m.grad = g.float() * inv_scale if (self.low_precision or inv_scale != 1.0) else g
        # A parameter replicated across tensor-parallel ranks (tensor_parallel.py marks it tp_duplicate on all
        # but one) enters the global norm once; split ones enter once per slice; norm_reduce_fn sums the ranks.
        # Dense gradients are equal over the data-parallel group and count once; each rank's experts are its own.
        counted = [(m.grad, getattr(p, "expert_parallel", False)) for p, m in zip(self.model_params, self.master_params)
                   if not getattr(p, "tp_duplicate", False)]
        norm = global_grad_norm([g for g, e in counted if not e], self.norm_reduce_fn,
                                [g for g, e in counted if e], self.expert_norm_reduce_fn)
        found_inf = not math.isfinite(float(norm))
        self.scaler.update(found_inf)
        if found_inf:  # skip: the weights and the optimizer state stay as they were
            for m in self.master_params:
                m.grad = None
            return float(norm), True
        coef = clip_coef(norm, max_norm)
        if coef < 1.0:
            for m in self.master_params:
                m.grad.mul_(coef)
        self.optimizer.step()
        if self.low_precision:
            with torch.no_grad():
                for p, m in zip(self.model_params, self.master_params):
                    p.copy_(m)
        for m in self.master_params:
            m.grad = None
        return float(norm), False

    def state_dict(self):
        sd = {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}
        if self.low_precision:
            sd["master"] = [m.detach().clone() for m in self.master_params]
        return sd

    def load_state_dict(self, sd):
        self.optimizer.load_state_dict(sd["optimizer"])
        self.scaler.load_state_dict(sd["scaler"])
        if self.low_precision:
            with torch.no_grad():
                for m, saved in zip(self.master_params, sd["master"]):
                    m.copy_(saved)


if __name__ == "__main__":
    from model import PRESETS, Transformer
    torch.manual_seed(0)
    idx = torch.randint(0, 256, (8, 65))
    for name, dtype in DTYPES.items():
        torch.manual_seed(0)
        model = cast_model(Transformer(PRESETS["tiny"]), dtype)
        scaler = DynamicLossScaler(enabled=name == "fp16", growth_interval=3)
        opt = MixedPrecisionOptimizer([{"params": list(model.parameters())}],
                                      lambda g: torch.optim.AdamW(g, lr=3e-3), dtype, scaler)
        losses = []
        for step in range(8):
            _, loss = model(idx[:, :-1], idx[:, 1:])
            opt.scale_loss(loss).backward()
            if name == "fp16" and step == 4:  # an injected overflow: the step must be skipped
                next(model.parameters()).grad[0, 0] = float("inf")
            norm, skipped = opt.step(max_norm=1.0)
            opt.zero_grad()
            losses.append(f"{loss.item():.3f}{'(skipped)' if skipped else ''}")
        print(f"{name}: losses {' '.join(losses)}  final loss scale {scaler.scale:g}")
