"""amp.py: mixed precision written out: a 16-bit model, fp32 master weights, dynamic loss scaling.

The idea (Micikevicius et al., 2018): run the forward and backward in 16-bit floats, which halves
activation memory and runs on the tensor cores, but keep an fp32 "master" copy of every weight for
the update: a step lr * grad is often smaller than the spacing of bf16 numbers near the weight
(8 bits of mantissa), and would round away. Each step: grads (16-bit, on the model) -> fp32 master
grads -> clip -> optimizer step on the masters -> masters rounded into the 16-bit weights.

Why a 16-bit model and a master copy, rather than autocast over fp32 parameters: it is the layout
whose memory the ZeRO paper counts (2 bytes of weights + 2 of grads on the model, 4 + 4 + 4 of
master, momentum and variance in the optimizer: 16 bytes per parameter), it is what zero.py shards,
and it shows every cast in this file rather than inside autocast. Norms and the loss are computed in
fp32 inside model.py all the same.

fp16 has 5 exponent bits: gradients below 2^-24 flush to zero. Dynamic loss scaling multiplies the
loss by S before backward (so every gradient is S times larger and stays representable), divides the
gradients by S before the update, and adapts S: if any gradient is inf/nan the step is skipped and S
halves; after `growth_interval` clean steps S doubles (the torch GradScaler defaults: S0 = 2^16, x2
per 2000 steps, x0.5). bf16 has fp32's exponent range and needs no scaling.

Memory per parameter: 16 bytes either way, fp32 4 (weight) + 4 (gradient) + 8 (Adam's m and v),
bf16/fp16 2 + 2 + 12 (fp32 master, m, v), the 12 being what zero.py shards first. During the step
this file also holds the fp32 master gradients (4 bytes more per parameter), made from the 16-bit
ones and dropped after the update. By default (stack.build_training) the 16-bit gradients are added
up in fp32 from the start instead (accumulate_main_grads, Megatron-LM's main_grad): 2 + 4 + 12, that
fp32 gradient being the master gradient itself.

A run that cannot train must stop rather than skip every step to the end (DivergenceGuard): K = 8
steps in a row with an inf/nan loss (or, in fp32/bf16, gradient norm), or in fp16 the loss scale
below a floor of 1, ends it with the likely cause.

Demo: `python amp.py` trains a tiny model for a few steps in each precision (fp8: quantization.py's
FP8 matmuls, on CPU too), shows fp16's scaler at work, and an fp16 run at learning rate 1 stopped by
the guard.
"""
import contextlib
import math

import torch

from placement import placement_of

# --amp fp8 keeps the model in bf16 like --amp bf16; quantization.py then runs every Linear's
# matmuls in FP8.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp8": torch.bfloat16}


class DynamicLossScaler:
    """Loss scaling for fp16. With enabled=False it is the identity (scale 1, never skips).

    The scale and the count of clean steps are tensors, moved to the device on first use
    (`scale_on`) and updated there, so that a training step never waits to read them; `scale` and
    `good_steps` read them (logs, checks, checkpoints)."""

    def __init__(self, enabled, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000):
        self.enabled = enabled
        self._scale = torch.tensor(init_scale if enabled else 1.0, dtype=torch.float64)
        self._good = torch.zeros((), dtype=torch.int64)
        self.growth_factor, self.backoff_factor, self.growth_interval = (
            growth_factor, backoff_factor, growth_interval)

    def scale_on(self, device):
        if self._scale.device != device:
            self._scale, self._good = self._scale.to(device), self._good.to(device)
        return self._scale

    @property
    def scale(self):
        return float(self._scale)

    @scale.setter
    def scale(self, value):
        self._scale.fill_(value)

    @property
    def good_steps(self):
        return int(self._good)

    @good_steps.setter
    def good_steps(self, value):
        self._good.fill_(value)

    def update(self, found_inf):
        """Called once per step after the overflow check, which must be the same on every rank.
        `found_inf`: a bool, or a 0-dim tensor on the device (nothing is read back):
        x backoff_factor and start counting again after an overflow; x growth_factor after every
        growth_interval clean steps in a row."""
        if not self.enabled:
            return
        inf = torch.as_tensor(found_inf, device=self._scale.device)
        good = torch.where(inf, 0, self._good + 1)
        grow = (good % self.growth_interval == 0) & ~inf
        self._scale.mul_(torch.where(inf, self.backoff_factor,
                                     torch.where(grow, self.growth_factor, 1.0)))
        self._good.copy_(good)

    def state_dict(self):
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, sd):
        self.scale, self.good_steps = sd["scale"], sd["good_steps"]


class TrainingStopped(RuntimeError):
    """A run that cannot train: the one line the user sees (the loop adds the last checkpoint)."""


class DivergenceGuard:
    """Ends a run that cannot train instead of letting it skip steps, or log nan, to its last step.

    A skipped step is the loss scaler's normal answer to one overflow; a run where every step is
    skipped never recovers by itself. Called for each optimizer step, in order, with values that
    agree on every rank (the loss averaged over the data-parallel group, the globally reduced
    gradient norm, the loss scale), so every rank stops at the same step. Three signs, each with
    its likely cause:
      - the loss is inf/nan for `patience` steps in a row: the forward overflows (fp16's largest
        number is 65504) or the weights already hold inf/nan;
      - (fp32, bf16) the gradient norm is inf/nan for `patience` steps in a row;
      - (fp16) the loss scale falls below `min_loss_scale` (DeepSpeed's min_loss_scale, default
        1): at scale 1 the gradients are no longer scaled up at all, and they still overflow."""

    def __init__(self, patience=8, min_loss_scale=1.0):
        self.patience, self.min_loss_scale = patience, min_loss_scale
        self.bad_loss = self.bad_grads = 0

    @property
    def healthy(self):
        """The last step's loss was finite: a checkpoint saved now is a good one. (A step skipped
        for overflowing gradients alone left the weights as they were: that is the scaler's everyday
        work, not damage.)"""
        return self.bad_loss == 0

    def check(self, loss, grad_norm, scaler):
        """None while training can go on, else the reason it cannot (one line)."""
        self.bad_loss = 0 if math.isfinite(loss) else self.bad_loss + 1
        self.bad_grads = 0 if math.isfinite(grad_norm) else self.bad_grads + 1
        if self.bad_loss >= self.patience:
            return (f"the loss was {loss} for {self.bad_loss} steps in a row: the forward "
                    "overflows or the weights hold inf/nan (likely cause: the learning rate is "
                    "too high"
                    + (", or activations above fp16's 65504: try --amp bf16" if scaler.enabled
                       else "") + ")")
        if scaler.enabled and scaler.scale < self.min_loss_scale:
            return (f"the fp16 loss scale fell to {scaler.scale:g}, below {self.min_loss_scale:g}, "
                    f"after {self.bad_grads} skipped steps in a row: the gradients overflow "
                    "unscaled (likely cause: the learning rate is too high, or fp16's range is too "
                    "small for this model: try --amp bf16)")
        if not scaler.enabled and self.bad_grads >= self.patience:
            return (f"the gradient norm was {grad_norm} for {self.bad_grads} steps in a row, "
                    "every step skipped (likely cause: the learning rate is too high, or "
                    "inf/nan in the data or the weights)")
        return None


LOW_PRECISION = (torch.float16, torch.bfloat16)


def grad_of(p):
    """The gradient to step with: the fp32 `main_grad` where one accumulates (accumulate_main_grads,
    ddp.py's fp32 buckets), else p.grad."""
    main = getattr(p, "main_grad", None)
    return main if main is not None else p.grad


def accumulate_main_grads(params):
    """Megatron-LM's main_grad: each backward's 16-bit gradient of a 16-bit parameter is added into
    an fp32 buffer `p.main_grad` (a hook, right after autograd wrote it) and dropped. Summed in
    bf16, micro-step after micro-step, a gradient keeps 8 bits: each addition rounds away what lies
    below the larger term's last bit, and the rounding errors of N micro-steps (and of the
    data-parallel sum) add up; in fp32 they are 2^16 times smaller. The buffer starts at the first
    backward after zero_grad (main_grad None). Parameters that already own one (ddp.py's buckets
    hold theirs) are left alone."""
    for p in params:
        if p.dtype in LOW_PRECISION and not hasattr(p, "main_grad"):
            p.main_grad = None
            p.register_post_accumulate_grad_hook(_add_to_main_grad)


def drop_grads(params):
    """zero_grad: no gradient left, nor fp32 main_grad (the next backward starts it again)."""
    for p in params:
        p.grad = None
        if hasattr(p, "main_grad"):
            p.main_grad = None


def _add_to_main_grad(p):
    if p.main_grad is None:
        p.main_grad = p.grad.float()
    else:
        p.main_grad.add_(p.grad)
    p.grad = None


def cast_model(model, dtype):
    """Store the model's parameters in `dtype` (buffers such as the RoPE tables stay fp32)."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def global_grad_norm(grads, reduce_fn=None, expert_grads=(), expert_reduce_fn=None):
    """The gradient norm for clipping, sqrt(sum of squared entries) over the whole model, in fp32 or
    better, the same on every rank. Each rank squares the pieces it holds; every distinct piece must
    be counted exactly once over the world. This is the one place that story is told:

      - one process: every gradient, no reduction.
      - data parallel, ddp.py: the averaged gradients are equal on every dp rank, so each rank's
        sum is already the model's; nothing is summed over dp.
      - ZeRO, zero.py: each dp rank squares its own flat shards (their zero padding adds nothing)
        and `reduce_fn` first sums over the dp group.
      - tensor parallel, tensor_parallel.py: a split weight's slices are distinct and summed over
        the tp group; a replicated parameter (a norm's gain) has the same gradient on every tp
        rank and is left out on all but tp rank 0 (its placement's tp_duplicate, placement.py).
      - pipeline parallel: each stage's blocks are distinct and summed over the pp group.
        (stack.grad_norm_reduce builds `reduce_fn` for tp and pp; zero.py puts its dp sum in front.)
      - expert parallel, moe.py: this rank's own experts (placement.py: expert_parallel) are not
        held by the other ranks of its ep group. Under ddp.py they come in as `expert_grads` and
        `expert_reduce_fn` sums their part over the ep group before it joins the rest. Under
        zero.py the dp sum already adds every rank's experts, so an expert held by several
        replicas of its expert-data group is counted on the first only (ep_duplicate elsewhere).

    inf/nan propagate into the norm, so a non-finite norm is also fp16's overflow check, and after
    the reductions it is non-finite on every rank alike: all ranks skip the step together."""
    dtype = torch.promote_types(grads[0].dtype, torch.float32) if grads else torch.float32
    sq = torch.zeros((), dtype=dtype, device=grads[0].device if grads else "cpu")
    for g in grads:
        sq += g.to(dtype).pow(2).sum()
    # (every rank of the ep group reduces, with or without experts)
    if expert_grads or expert_reduce_fn is not None:
        sq_experts = torch.zeros_like(sq)
        for g in expert_grads:
            sq_experts += g.to(dtype).pow(2).sum()
        sq = sq + (expert_reduce_fn(sq_experts) if expert_reduce_fn is not None else sq_experts)
    if reduce_fn is not None:
        sq = reduce_fn(sq)
    return sq.sqrt()


def clip_coef(norm, max_norm):
    """The factor that brings the gradient norm down to max_norm (1 if it already is, or if off)."""
    if not max_norm or max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (float(norm) + 1e-6))


def clip_and_step(optimizer, grads, norm, max_norm, scaler):
    """Clip `grads` (the inner optimizer's) to max_norm and step, or skip the update where the norm
    is inf/nan (an fp16 overflow; in fp32/bf16 a bad batch), alike on every rank since the norm is.
    Returns `skipped`, a 0-dim bool tensor on the device, or None for a skip decided on the host
    (the caller drops the gradients).

    Nothing is read back to the host, since a read waits for the GPU to finish all it was given: the
    clip coefficient min(1, max_norm / (norm + 1e-6)) multiplies the gradients on the device (as
    torch's clip_grad_norm_ does), and a fused AdamW takes the flag as `found_inf` and skips its own
    update there (its step count too), while the fp16 loss scale adapts on the device
    (DynamicLossScaler). Only an unfused optimizer makes the step read the flag."""
    skipped = ~torch.isfinite(norm)
    fused = optimizer.defaults.get("fused")
    if not fused:
        found_inf = bool(skipped)
        scaler.update(found_inf)
        if found_inf:
            return None
    else:
        scaler.update(skipped)
    if max_norm and max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef)
    if fused:
        optimizer.found_inf = skipped.float()
    optimizer.step()
    return skipped


def read_step(norm, skipped, read):
    """(grad_norm, skipped) as an optimizer step returns them: floats (read), or device tensors."""
    if skipped is None:  # skipped on the host
        return ((float(norm), True) if read
                else (norm, torch.ones((), dtype=torch.bool, device=norm.device)))
    return (float(norm), bool(skipped)) if read else (norm, skipped)


class MixedPrecisionOptimizer:
    """An optimizer over fp32 master copies of a (possibly 16-bit) model's trainable parameters.

    `make_optimizer(param_groups)` builds the inner optimizer (AdamW here) over the masters; the
    groups keep the structure of `param_groups`, which holds the model's own parameters. In fp32 the
    masters are the model's parameters themselves: no copy, one code path. `no_sync` makes the
    context for accumulation micro-steps that must not communicate (ddp.py's); one process has
    nothing to skip. `expert_norm_reduce_fn` (expert parallelism): sums the squared norm of the
    expert_parallel parameters' gradients over the ep group. `main_grads`: a 16-bit model's
    gradients accumulate in fp32 (accumulate_main_grads)."""

    def __init__(self, param_groups, make_optimizer, dtype, scaler, norm_reduce_fn=None,
                 no_sync=None, expert_norm_reduce_fn=None, main_grads=False):
        self.model_params = [p for g in param_groups for p in g["params"]]
        if main_grads:  # 16-bit gradients accumulated in fp32 (accumulate_main_grads)
            accumulate_main_grads(self.model_params)
        self.low_precision = dtype != torch.float32 and dtype != torch.float64
        if self.low_precision:
            master_groups = [{**g, "params": [p.detach().float().clone().requires_grad_(True)
                                              for p in g["params"]]}
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
        drop_grads(self.model_params)

    def scale_loss(self, loss):
        return (loss * self.scaler.scale_on(loss.device).to(loss.dtype) if self.scaler.enabled
                else loss)

    def step(self, max_norm=0.0, read=True):
        """Unscale, check for overflow, clip, update, copy back. Returns (grad_norm, skipped):
        Python numbers, or with read=False 0-dim tensors on the device, for the loop to read when it
        logs (clip_and_step)."""
        inv_scale = (1.0 / self.scaler.scale_on(self.master_params[0].device)
                     if self.scaler.enabled else 1.0)
        for p, m in zip(self.model_params, self.master_params):
            g = grad_of(p)
            g = g if g is not None else torch.zeros_like(p)
            # In fp32 this is the identity (m is p), and so is an fp32 main_grad's; else the one
            # cast up to fp32.
            m.grad = (g if (g.dtype == m.dtype and not self.scaler.enabled)
                      else g.float() * inv_scale)
        # Which gradients count and which groups sum them: global_grad_norm's docstring.
        where = [placement_of(p) for p in self.model_params]
        counted = [(m.grad, w.expert_parallel) for w, m in zip(where, self.master_params)
                   if not w.tp_duplicate]
        norm = global_grad_norm([g for g, e in counted if not e], self.norm_reduce_fn,
                                [g for g, e in counted if e], self.expert_norm_reduce_fn)
        skipped = clip_and_step(self.optimizer, [m.grad for m in self.master_params], norm,
                                max_norm, self.scaler)
        # (a skipped update left the masters as they were)
        if skipped is not None and self.low_precision:
            with torch.no_grad():
                for p, m in zip(self.model_params, self.master_params):
                    p.copy_(m)
        for m in self.master_params:
            m.grad = None
        return read_step(norm, skipped, read)

    def checkpoint_pieces(self):
        """What checkpoint.py saves and restores: each trainable parameter whole, as
        (param, start, end, {kind: flat view}, the inner optimizer's tensor, sharded=False): its
        weights and, in 16 bits, its fp32 master."""
        for p, m in zip(self.model_params, self.master_params):
            views = {"param": p.detach().view(-1)}
            if self.low_precision:
                views["master"] = m.detach().view(-1)
            yield p, 0, p.numel(), views, m, False

    def after_load(self):
        """checkpoint.py has written the weights, masters and states in place: nothing to redo."""


if __name__ == "__main__":
    from model import PRESETS, Transformer
    from quantization import fp8_unsupported, use_fp8
    torch.manual_seed(0)
    idx = torch.randint(0, 256, (8, 65))
    for name, dtype in DTYPES.items():
        if name == "fp8" and (why := fp8_unsupported("cpu")):
            print(f"fp8: not run: {why}")
            continue
        torch.manual_seed(0)
        model = cast_model(Transformer(PRESETS["tiny"]), dtype)
        if name == "fp8":  # what --amp fp8 trains
            print(f"fp8: the bf16 model with {use_fp8(model)} linear layers' matmuls in FP8 "
                  "(quantization.py)")
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
    print("fp16's loss scale starts at 2^16 = 65536 and doubles after 3 clean steps here "
          "(2000 by default).\n"
          "At step 5 an inf was put into a gradient: (skipped) marks that step, whose update "
          "was dropped (the next\n"
          "loss is the same) and whose scale was halved. fp32, bf16 and fp8 (bf16's range) need\n"
          "no scaling: their scale stays 1.")
    # A run that cannot train: fp16 at learning rate 1 overflows in a few steps, never to recover.
    torch.manual_seed(0)
    model = cast_model(Transformer(PRESETS["tiny"]), torch.float16)
    scaler, guard = DynamicLossScaler(enabled=True), DivergenceGuard()
    opt = MixedPrecisionOptimizer([{"params": list(model.parameters())}],
                                  lambda g: torch.optim.AdamW(g, lr=1.0), torch.float16, scaler)
    for step in range(1, 101):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.scale_loss(loss).backward()
        norm, skipped = opt.step(max_norm=1.0)
        opt.zero_grad()
        if reason := guard.check(loss.item(), norm, scaler):
            print(f"fp16 at lr 1: stopped after step {step}: {reason}")
            break
    else:
        print("fp16 at lr 1: the guard did not stop the run within 100 steps")
