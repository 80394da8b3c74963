"""zero.py: ZeRO (Rajbhandari et al., 2020): data parallelism where no rank keeps what another has.

The idea: plain data parallelism (ddp.py) keeps a full copy of the model states on every rank. With
mixed-precision Adam that is 16 bytes per parameter: 2 for the 16-bit weights, 2 for their
gradients, and K = 12 for the fp32 master weights, momentum and variance. ZeRO partitions them over
the N_d data-parallel ranks (for Psi parameters):

    stage partitioned             memory per rank              communication per step
    0 DDP nothing                 2 Psi + 2 Psi + K Psi        2 Psi: all-reduce
    1     optimizer states        2 Psi + 2 Psi + K Psi / N_d  3 Psi: all-reduce + all-gather
    2     ... and gradients       2 Psi + (2 + K) Psi / N_d    2 Psi: reduce-scatter + all-gather
    3     ... and 16-bit weights  (2 + 2 + K) Psi / N_d        3 Psi: 2 all-gathers + reduce-scatter

(elements sent per rank; a ring reduce-scatter or all-gather moves (N_d - 1)/N_d x Psi, an
all-reduce twice that. Stage 1 here all-reduces the gradients with ddp.py, reusing its buckets and
overlap, hence 3 Psi; DeepSpeed's stage 1 reduce-scatters like stage 2.)

How, here: the trainable parameters are grouped into units (each transformer block, and the root:
whatever is left, the embedding, final norm and head), and each unit's parameters are laid out in
one flat buffer padded to a multiple of N_d. Rank r owns the contiguous slice [r S, (r+1) S) of
every unit: its fp32 master copy, and the optimizer state of that slice (the inner optimizer, AdamW,
steps views of it; it is elementwise, so stepping slices is stepping the whole). Per step:
  - stage 1: gradients arrive averaged (ddp.py's buckets); each rank steps its slice; the updated
    slices are all-gathered back into the flat 16-bit weights, of which every parameter is a view.
  - stage 2: when a unit's last gradient is ready (a hook in backward), the unit's gradients are
    reduce-scattered: each rank receives the sum of its slice only; the full gradients are dropped.
  - stage 3 (zero3.py): the 16-bit weights are partitioned too; a unit is all-gathered just
    before its forward (prefetching the next), freed right after, gathered again for its
    backward, freed once its gradients are reduce-scattered.
What the stages share (the units, master slices, step, clipping, checkpoints) is ZeroBase; Zero1,
Zero2 and zero3.Zero3 say only how gradients arrive and how updated slices become the weights. The
global gradient norm is the square root of the sum over ranks of each slice's squared norm (one
all-reduce of a scalar; amp.global_grad_norm says which pieces count): used for clipping and, with
fp16, as the overflow check, non-finite on every rank alike when any rank's gradient overflowed, so
all ranks skip together.

Demo: `torchrun --nproc_per_node 2 zero.py` trains a small bf16 model with each stage and prints,
per rank, the measured bytes of parameters, gradients and optimizer state next to the formula's.
"""
import contextlib
import math

import torch
import torch.distributed as dist

from amp import (LOW_PRECISION, accumulate_main_grads, clip_and_step, drop_grads, global_grad_norm,
                 grad_of, read_step)
from ddp import DistributedDataParallel
from placement import placement_of
from topology import all_gather_single, end_process_group, reduce_scatter_single


def ZeroOptimizer(model, param_groups, make_optimizer, scaler, group=None, stage=1, bucket_mb=25.0,
                  norm_reduce_fn=None, main_grads=False):
    """ZeRO stage `stage` over `model` (call forward on its .module): Zero1, Zero2 or zero3.Zero3,
    with the methods of amp.MixedPrecisionOptimizer (zero_grad, scale_loss, step, param_groups,
    checkpoint_pieces, after_load, scaler, no_sync) and gathered(). norm_reduce_fn sums the squared
    gradient norm over the other groups (tp, pp); main_grads: amp.accumulate_main_grads."""
    assert stage in (1, 2, 3)
    args = (model, param_groups, make_optimizer, scaler, group, norm_reduce_fn, main_grads)
    if stage == 1:
        return Zero1(*args, bucket_mb=bucket_mb)
    if stage == 2:
        return Zero2(*args)
    from zero3 import Zero3  # (here, not at the top: zero3.py builds on this file's classes)
    return Zero3(*args)


class FlatUnit:
    """One unit's trainable parameters in a flat buffer; this rank's slice of it, in fp32, for the
    optimizer. `local`: a unit "sharded" over one rank (an expert-parallel rank's own experts)."""

    def __init__(self, module, params, rank, world, master_dtype, main_grads, local=False):
        self.module, self.params, self.local = module, params, local
        self.dtype, device = params[0].dtype, params[0].device
        self.offsets = [0]
        for p in params:
            self.offsets.append(self.offsets[-1] + p.numel())
        self.shard_size = math.ceil(self.offsets[-1] / world)
        self.lo, self.hi = rank * self.shard_size, (rank + 1) * self.shard_size
        self.full = torch.zeros(self.shard_size * world, dtype=self.dtype, device=device)
        with torch.no_grad():
            for p, off in zip(params, self.offsets):
                self.full[off:off + p.numel()].copy_(p.flatten())
                p.data = self.full[off:off + p.numel()].view_as(p)  # now a view of the unit
        self.master = self.full[self.lo:self.hi].to(master_dtype).clone()
        # The parts of parameters in this rank's slice: (param, start in param, in slice, length).
        self.pieces = []
        for p, off in zip(params, self.offsets):
            a, b = max(off, self.lo), min(off + p.numel(), self.hi)
            if a < b:
                self.pieces.append((p, a - off, a - self.lo, b - a))
        # The dtype gradients are reduced and added up in: main_grads, fp32 for a 16-bit model.
        fp32 = main_grads and self.dtype in LOW_PRECISION
        self.grad_dtype = torch.float32 if fp32 else self.dtype
        self.grad_shard = None   # stages 2, 3: this rank's slice of the averaged gradient
        self.master_grad = None  # during step() only
        self.ready = 0           # gradients received in the current backward
        self.shard16 = None      # stage 3: this rank's slice of the 16-bit weights
        self.gathered, self.pending = True, None

    def nbytes(self, t):
        return t.numel() * t.element_size()


class ZeroBase:
    """What every stage shares: the units, this rank's fp32 master slices and the inner optimizer
    (AdamW) stepping views of them, the global norm, clipping, checkpoints. A stage says how the
    gradients reach it (_prepare, grad_slice), how updated slices become the weights (_publish,
    weight_slice), and what it holds (_held)."""

    def __init__(self, model, param_groups, make_optimizer, scaler, group, norm_reduce_fn,
                 main_grads):
        self.group, self.scaler = group, scaler
        self.norm_reduce_fn = norm_reduce_fn  # sums the squared norm over the other groups too
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        # Expert parallelism (moe.py): a rank's own experts are replicated over their expert-data
        # group, not over this one, whose ranks hold other experts (placement.py): they cannot be
        # sliced over the group, and stay whole here, in one unit of their own.
        experts = [p for g in param_groups for p in g["params"]
                   if "dp" not in placement_of(p).replicated_over]
        self.module = self._prepare(model, experts, main_grads)
        group_of = {p: i for i, g in enumerate(param_groups) for p in g["params"]}  # trainable
        master_dtype = torch.promote_types(next(iter(group_of)).dtype, torch.float32)
        self.units, seen = [], set(experts)
        for module in list(getattr(model, "blocks", [])) + [model]:  # in forward order, then root
            params = [p for p in module.parameters() if p in group_of and p not in seen]
            seen.update(params)
            if params:
                self.units.append(FlatUnit(module, params, self.rank, self.world, master_dtype,
                                           main_grads))
        if experts:
            self.units.append(FlatUnit(model, experts, 0, 1, master_dtype, main_grads, local=True))
        for u in self.units:
            if u.master.dtype == u.dtype:  # an fp32 (fp64) model is its own master, as in amp.py
                self._master_is_model(u)
        # The inner optimizer steps views of the master slices, one per piece, in its group.
        inner = [{**g, "params": []} for g in param_groups]
        for u in self.units:
            u.views = [u.master[s:s + n] for _, _, s, n in u.pieces]
            for (p, *_), view in zip(u.pieces, u.views):
                inner[group_of[p]]["params"].append(view)
        self.optimizer = make_optimizer(inner)
        self.unit_of = {p: u for u in self.units for p in u.params}

    @staticmethod
    def _master_is_model(u):
        u.master = u.full[u.lo:u.hi]  # the optimizer updates the model's slice in place

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self):
        for u in self.units:
            u.grad_shard = None
            drop_grads(u.params)

    def scale_loss(self, loss):
        if not self.scaler.enabled:
            return loss
        return loss * self.scaler.scale_on(loss.device).to(loss.dtype)

    def gathered(self):
        """Every weight whole for a while (to read or save the full model): always, but stage 3."""
        return contextlib.nullcontext()

    def _sum_over_ranks(self, x):
        dist.all_reduce(x, group=self.group)
        return self.norm_reduce_fn(x) if self.norm_reduce_fn is not None else x

    def step(self, max_norm=0.0, read=True):
        """Unscale, agree on overflow, clip by the global norm, step this rank's slices, share
        them. Returns (grad_norm, skipped), the same on every rank: numbers, or with read=False
        the device's tensors."""
        device = self.units[0].master.device
        inv_scale = 1.0 / self.scaler.scale_on(device) if self.scaler.enabled else 1.0
        for u in self.units:
            g = self.grad_slice(u)
            same = g.dtype == u.master.dtype and not self.scaler.enabled
            u.master_grad = g if same else g.to(u.master.dtype) * inv_scale  # as in amp.py
        # Each distinct piece once over the world (amp.global_grad_norm): not the tp duplicates of
        # replicated parameters, not the experts' second replicas; the dp sum comes first.
        where = {p: placement_of(p) for p in self.unit_of}
        counted = [u.master_grad[s:s + n] for u in self.units for p, _, s, n in u.pieces
                   if not where[p].tp_duplicate and not where[p].ep_duplicate]
        norm = global_grad_norm(counted or [torch.zeros(1, device=device)], self._sum_over_ranks)
        for u in self.units:
            for (_, _, s, n), view in zip(u.pieces, u.views):
                view.grad = u.master_grad[s:s + n]
        grads = [u.master_grad for u in self.units]
        skipped = clip_and_step(self.optimizer, grads, norm, max_norm, self.scaler)
        if skipped is not None:  # (a skipped update left the slices as they were)
            self._publish()
        for u in self.units:
            u.master_grad = None
            for view in u.views:
                view.grad = None
        return read_step(norm, skipped, read)

    def _publish(self):
        """The updated slices become the model's weights: all-gathered into every rank's unit."""
        works = []
        for u in self.units:
            if u.local:  # nothing to gather (an fp32 model's master already is its weights)
                if u.master.data_ptr() != u.full.data_ptr():
                    u.full.copy_(u.master)
            else:  # (the input must not alias the output: an fp32 model's master is a view of it)
                mine = u.master.to(u.dtype) if u.master.dtype != u.dtype else u.master.clone()
                works.append(all_gather_single(u.full, mine, group=self.group, async_op=True))
        for w in works:
            w.wait()

    @staticmethod
    def weight_slice(u):
        """This rank's slice of u's 16-bit weights."""
        return u.full[u.lo:u.hi]

    def checkpoint_pieces(self):
        """What checkpoint.py saves and restores: each piece of a parameter in this rank's slice, as
        (param, start, end, {kind: flat view}, the inner optimizer's tensor, sharded): [start, end)
        is the range of the parameter's flattening that the piece covers; its 16-bit weights and
        fp32 master (one tensor in fp32)."""
        for u in self.units:
            weights = self.weight_slice(u)
            for (p, a, s, n), view in zip(u.pieces, u.views):
                views = {"param": view}
                if u.master.dtype != u.dtype:
                    views = {"param": weights[s:s + n], "master": view}
                yield p, a, a + n, views, view, not u.local

    def after_load(self):
        """The masters were loaded: the 16-bit weights follow from them, as after a step."""
        self._publish()

    def memory(self):
        """Bytes this rank holds now, for the demo: 16-bit weights, gradients, optimizer states
        (master + inner state)."""
        params, grads = self._held()
        own = [u for u in self.units if u.master is not u.shard16 and u.master.dtype != u.dtype]
        states = sum(u.nbytes(u.master) for u in own) + sum(
            t.numel() * t.element_size() for s in self.optimizer.state.values() for t in s.values()
            if torch.is_tensor(t) and t.dim() > 0)  # (Adam's step counters are scalars: left out)
        return {"params": params, "grads": grads, "optimizer": states}


class Zero1(ZeroBase):
    """Stage 1: the optimizer states are sharded. The gradients are averaged whole on every rank by
    ddp.py's buckets (with its overlap and no_sync); each rank takes its slice of them and steps
    it, and the updated slices are all-gathered back into the flat 16-bit weights."""
    stage = 1

    def __init__(self, *args, bucket_mb=25.0):
        self.bucket_mb = bucket_mb
        super().__init__(*args)

    def _prepare(self, model, experts, main_grads):
        """ddp.py broadcasts the first rank's weights and averages the gradients: in fp32 buckets
        with main_grads (amp.accumulate_main_grads), the experts, outside them, in fp32 buffers."""
        module = DistributedDataParallel(model, self.group, self.bucket_mb, main_grads)
        if main_grads:
            accumulate_main_grads(experts)
        return module

    def no_sync(self):
        return self.module.no_sync()

    @staticmethod
    def grad_slice(u):
        """The averaged gradients are whole on every rank (ddp.py): this rank's slice of them."""
        g = torch.zeros(u.shard_size, dtype=u.grad_dtype, device=u.master.device)
        for p, a, s, n in u.pieces:
            if grad_of(p) is not None:
                g[s:s + n] = grad_of(p).flatten()[a:a + n]
        return g

    def _held(self):
        grads = sum(b.buffer.numel() * b.buffer.element_size() for b in self.module.buckets)
        return sum(u.nbytes(u.full) for u in self.units), grads


class Zero2(ZeroBase):
    """Stage 2: the gradients are sharded too. When a unit's last gradient is ready (a hook in
    backward), the unit's gradients are reduce-scattered: each rank receives the average of its
    slice only, and the full gradients are dropped. With main_grads each micro-step's gradients
    are reduce-scattered in fp32, and the fp32 slices added up."""
    stage = 2

    def __init__(self, *args):
        super().__init__(*args)
        self.in_flight, self.callback_queued, self.in_backward = [], False, False
        for p in self.unit_of:
            p.register_post_accumulate_grad_hook(self._grad_ready)

    def _prepare(self, model, experts, main_grads):
        """The same starting point as ddp.py's: the group's first rank's weights and buffers."""
        if experts:
            raise ValueError(f"ZeRO stage {self.stage} shards gradients over the data-parallel "
                             "group, whose ranks hold different experts under expert parallelism: "
                             "use stage 1")
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(t.data, src=src, group=self.group)
        return model

    def no_sync(self):
        """Stages 2 and 3 exist never to hold the full gradients, so they reduce-scatter on every
        micro-step and accumulate the slices: nothing to skip."""
        return contextlib.nullcontext()

    def _grad_ready(self, p):
        if not self.callback_queued:  # wait for the reductions when this backward finishes
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
            self.callback_queued = True
        u = self.unit_of[p]
        u.ready += 1
        if u.ready == len(u.params):
            self._reduce_scatter(u)

    def _reduce_scatter(self, u):
        flat = torch.zeros(u.full.shape, dtype=u.grad_dtype, device=u.full.device)
        for p, off in zip(u.params, u.offsets):
            if p.grad is not None:
                flat[off:off + p.numel()].copy_(p.grad.flatten())
            p.grad = None  # from here on this rank only holds its slice
        flat.div_(self.world)  # averaging: sum of x / N, divided first to keep fp16 in range
        out = torch.empty(u.shard_size, dtype=u.grad_dtype, device=flat.device)
        work = reduce_scatter_single(out, flat, group=self.group, async_op=True)
        self.in_flight.append((u, work, out, flat))
        u.ready = 0
        while len(self.in_flight) > 2:  # bound the full-size gradient buffers alive at once
            self._retire(self.in_flight.pop(0))

    @staticmethod
    def _retire(entry):
        u, work, out, _ = entry
        work.wait()
        u.grad_shard = out if u.grad_shard is None else u.grad_shard.add_(out)

    def _finish_backward(self):
        for u in self.units:  # a unit only partly reached by this backward: the rest are zeros
            if u.ready:
                self._reduce_scatter(u)
        while self.in_flight:
            self._retire(self.in_flight.pop(0))
        self.callback_queued = self.in_backward = False

    @staticmethod
    def grad_slice(u):
        return u.grad_shard if u.grad_shard is not None else torch.zeros_like(u.master)

    def _held(self):
        grads = sum(u.nbytes(u.grad_shard) for u in self.units if u.grad_shard is not None)
        return sum(u.nbytes(u.full) for u in self.units), grads


if __name__ == "__main__":
    from dataclasses import replace

    from amp import DynamicLossScaler, MixedPrecisionOptimizer, cast_model
    from estimate import zero_table
    from model import PRESETS, Transformer
    from topology import Topology
    dist.init_process_group("gloo")
    topo = Topology()
    N, rank = topo.dp, topo.rank
    cfg = replace(PRESETS["tiny"], block_size=64)
    data = torch.randint(0, cfg.vocab_size, (4, 4 * N, 65),
                         generator=torch.Generator().manual_seed(0))
    rows = []
    for stage in (0, 1, 2, 3):
        torch.manual_seed(0)
        model = cast_model(Transformer(cfg), torch.bfloat16)
        groups, scaler = [{"params": list(model.parameters())}], DynamicLossScaler(enabled=False)

        def adamw(groups):
            return torch.optim.AdamW(groups, lr=3e-3)
        if stage == 0:  # ddp.py with bf16 weights and fp32 master copies (amp.py)
            module = DistributedDataParallel(model, topo.dp_group)
            opt = MixedPrecisionOptimizer(groups, adamw, torch.bfloat16, scaler,
                                          no_sync=module.no_sync)
        else:
            opt = ZeroOptimizer(model, groups, adamw, scaler, topo.dp_group, stage)
            module = opt.module
        losses = []
        for step, batch in enumerate(data):
            x = batch.chunk(N)[rank]
            _, loss = module(x[:, :-1], x[:, 1:])
            opt.scale_loss(loss).backward()
            # everything a step needs is held now: weights, gradients, states
            if step == len(data) - 1:
                if stage == 0:
                    states = sum(t.numel() * t.element_size() for m in opt.master_params for t in
                                 [m, *[s for s in opt.optimizer.state[m].values() if s.dim() > 0]])
                    held = {"params": sum(p.numel() * p.element_size() for p in model.parameters()),
                            "grads": sum(b.buffer.numel() * b.buffer.element_size()
                                         for b in module.buckets),
                            "optimizer": states}
                else:
                    held = opt.memory()
            opt.step(1.0)
            opt.zero_grad()
            loss = loss.detach().clone()
            dist.all_reduce(loss, group=topo.dp_group)
            losses.append(loss.item() / N)
        psi = sum(p.numel() for p in model.parameters())
        predicted = zero_table(psi, N)[stage]
        rows.append((stage, held, predicted, losses))
    for r in range(N):
        if r == rank:
            print(f"rank {rank}/{N}: bf16 model of {psi:,} parameters; model states held in MB "
                  "(measured / formula 2 Psi, 2 Psi, 12 Psi sharded per stage); the losses "
                  "(random tokens: they stay near ln 256 = 5.55) are the same for every stage")
            for stage, held, pred, losses in rows:
                cells = "  ".join(f"{k} {held[k] / 2**20:6.3f}/{pred[k] / 2**20:6.3f}"
                                  for k in held)
                total = sum(held.values()) / pred["total"]
                print(f"  stage {stage}: {cells}  total {total:.3f}x formula | losses "
                      + " ".join(f"{l:.3f}" for l in losses), flush=True)
        dist.barrier()
    end_process_group()
