"""zero.py: ZeRO (Rajbhandari et al., 2020): data parallelism in which no rank keeps what another one has.

The idea: plain data parallelism (ddp.py) keeps a full copy of the model states on every rank. With
mixed-precision Adam that is 16 bytes per parameter: 2 for the 16-bit weights, 2 for their gradients, and K = 12
for the fp32 master weights, momentum and variance. ZeRO partitions them over the N_d data-parallel ranks:

    stage   what is partitioned                 memory per rank (Psi parameters)   communication per step
    0 DDP   nothing                             2 Psi + 2 Psi + K Psi              all-reduce:          2 Psi
    1       optimizer states (master, m, v)     2 Psi + 2 Psi + K Psi / N_d        all-reduce + all-gather: 3 Psi
    2       ... and gradients                   2 Psi + (2 + K) Psi / N_d          reduce-scatter + all-gather: 2 Psi
    3       ... and the 16-bit weights          (2 + 2 + K) Psi / N_d              2 all-gathers + reduce-scatter: 3 Psi

(elements sent per rank; a ring reduce-scatter or all-gather moves (N_d - 1)/N_d x Psi, an all-reduce twice that.
Stage 1 here all-reduces the gradients with ddp.py, reusing its buckets and overlap, hence 3 Psi; DeepSpeed's
stage 1 reduce-scatters like stage 2.)

How, here: the trainable parameters are grouped into units (each transformer block, and the root: whatever
is left, the embedding, final norm and head), and each unit's parameters are laid out in one flat buffer padded
to a multiple of N_d. Rank r owns the contiguous slice [r S, (r+1) S) of every unit: its fp32 master copy,
and the optimizer state of that slice (the inner optimizer, AdamW, steps views of it; it is elementwise, so
stepping slices is stepping the whole). Per step:
  - stage 1: gradients arrive averaged (ddp.py's buckets); each rank steps its slice; the updated slices are
    all-gathered back into the flat 16-bit weights, of which every parameter is a view.
  - stage 2: when a unit's last gradient is ready (a hook in backward), the unit's gradients are
    reduce-scattered: each rank receives the sum of its slice only, and the full gradients are dropped.
  - stage 3: the 16-bit weights are partitioned too. A unit is all-gathered just before its forward (the next
    unit's gather is launched at the same time: prefetch, so communication overlaps compute), freed right after,
    gathered again when backward reaches it (a hook on its output's gradient) and freed once its gradients
    are reduce-scattered. Freeing shrinks the buffer's storage to nothing; the parameters stay views of it, so
    the tensors autograd saved for backward see the re-gathered weights.
The global gradient norm is the square root of the sum over ranks of each slice's squared norm (one
all-reduce of a scalar; amp.global_grad_norm says which pieces count): used for clipping and, with fp16, as the
overflow check, non-finite on every rank alike when any rank's gradient overflowed, so all ranks skip together.

Demo: `torchrun --nproc_per_node 2 zero.py` trains a small bf16 model with each stage and prints, per rank,
the measured bytes of parameters, gradients and optimizer state next to the formula's prediction.
"""
import contextlib
import math

import torch
import torch.distributed as dist

from amp import LOW_PRECISION, accumulate_main_grads, clip_and_step, global_grad_norm, grad_of, read_step
from ddp import DistributedDataParallel
from moe import is_ep_duplicate, is_expert_parallel
from tensor_parallel import is_tp_duplicate
from topology import all_gather_single, reduce_scatter_single


class FlatUnit:
    """One unit's trainable parameters in a flat buffer; this rank's slice of it, in fp32, for the optimizer."""

    def __init__(self, module, params, rank, world, master_dtype):
        self.module, self.params = module, params
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
                p.data = self.full[off:off + p.numel()].view_as(p)  # the parameter is now a view of the unit
        self.master = self.full[self.lo:self.hi].to(master_dtype).clone()
        # The parts of parameters that fall in this rank's slice: (param, start in param, start in slice, length).
        self.pieces = []
        for p, off in zip(params, self.offsets):
            a, b = max(off, self.lo), min(off + p.numel(), self.hi)
            if a < b:
                self.pieces.append((p, a - off, a - self.lo, b - a))
        self.grad_shard = None    # stages 2, 3: this rank's slice of the averaged gradient, in grad_dtype
        self.master_grad = None   # during step() only
        self.ready = 0            # gradients received in the current backward
        self.shard16 = None       # stage 3: this rank's slice of the 16-bit weights
        self.gathered, self.pending = True, None

    def nbytes(self, t):
        return t.numel() * t.element_size()


class ZeroOptimizer:
    """The optimizer interface of amp.MixedPrecisionOptimizer (zero_grad, scale_loss, step, param_groups,
    checkpoint_pieces, after_load, scaler, no_sync) over partitioned states. `module` is what to call forward on."""

    def __init__(self, model, param_groups, make_optimizer, scaler, group=None, stage=1, bucket_mb=25.0,
                 norm_reduce_fn=None, main_grads=False):
        assert stage in (1, 2, 3)
        self.stage, self.group, self.scaler = stage, group, scaler
        self.norm_reduce_fn = norm_reduce_fn  # sums the squared norm over the other groups (tp, pp) too
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        # Expert parallelism (moe.py): a rank's own experts (marked expert_parallel) differ from its data-parallel
        # peers', so they cannot be sliced over the group; they stay whole here, in one unit of their own.
        experts = [p for g in param_groups for p in g["params"] if is_expert_parallel(p)]
        if experts and stage > 1:
            raise ValueError(f"ZeRO stage {stage} shards gradients over the data-parallel group, whose ranks hold "
                             "different experts under expert parallelism: use stage 1")
        # main_grads: a 16-bit model's gradients accumulated and reduced in fp32 (amp.accumulate_main_grads): stage 1
        # in ddp.py's fp32 buckets (the experts, outside them, in their own fp32 buffers); stages 2 and 3
        # reduce-scatter each micro-step's gradients in fp32 and add up fp32 slices.
        self.module = DistributedDataParallel(model, group, bucket_mb, main_grads) if stage == 1 else model
        if main_grads and stage == 1:
            accumulate_main_grads(experts)
        if stage > 1:  # ddp.py broadcasts for stage 1; here the same: one starting point, the first rank's
            src = dist.get_global_rank(group, 0) if group is not None else 0
            with torch.no_grad():
                for t in list(model.parameters()) + list(model.buffers()):
                    dist.broadcast(t.data, src=src, group=group)
        group_of = {p: i for i, g in enumerate(param_groups) for p in g["params"]}  # only trainable ones
        master_dtype = torch.promote_types(next(iter(group_of)).dtype, torch.float32)
        self.units, seen = [], set(experts)
        for module in list(getattr(model, "blocks", [])) + [model]:  # blocks in forward order, then the root
            params = [p for p in module.parameters() if p in group_of and p not in seen]
            seen.update(params)
            if params:
                self.units.append(FlatUnit(module, params, self.rank, self.world, master_dtype))
        self.root = self.units[-1] if self.units and self.units[-1].module is model else None
        for u in self.units:
            u.local = False
        if experts:  # a unit "sharded" over one rank: this rank holds all of it, master and optimizer state
            self.units.append(FlatUnit(model, experts, 0, 1, master_dtype))
            self.units[-1].local = True
        for u in self.units:  # the dtype gradients are reduced and added up in
            u.grad_dtype = torch.float32 if main_grads and u.dtype in LOW_PRECISION else u.dtype
        for u in self.units:
            if u.master.dtype == u.dtype:  # an fp32 (or fp64) model is its own master, as in amp.py: no copy
                if stage == 3:
                    u.shard16 = u.master    # the slice kept between gathers is the master
                else:
                    u.master = u.full[u.lo:u.hi]  # the optimizer updates the model's slice in place
        # The inner optimizer steps views of the master slices, one per parameter piece, in the piece's group.
        inner = [{**g, "params": []} for g in param_groups]
        for u in self.units:
            u.views = [u.master[s:s + n] for _, _, s, n in u.pieces]
            for (p, *_), view in zip(u.pieces, u.views):
                inner[group_of[p]]["params"].append(view)
        self.optimizer = make_optimizer(inner)
        self.unit_of = {p: u for u in self.units for p in u.params}
        self.in_flight, self.callback_queued, self.in_backward = [], False, False
        if stage >= 2:
            for p in self.unit_of:
                p.register_post_accumulate_grad_hook(self._grad_ready)
        if stage == 3:
            for u in self.units:
                if u.shard16 is None:
                    u.shard16 = u.full[u.lo:u.hi].clone()
                self._free(u)
            self._install_stage3_hooks(model)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def no_sync(self):
        """Stage 1 accumulates like ddp.py. Stages 2 and 3 exist never to hold the full gradients, so they
        reduce-scatter on every micro-step and accumulate the slices: nothing to skip."""
        return self.module.no_sync() if self.stage == 1 else contextlib.nullcontext()

    def zero_grad(self):
        for u in self.units:
            u.grad_shard = None
            for p in u.params:
                p.grad = None
                if hasattr(p, "main_grad"):
                    p.main_grad = None

    def scale_loss(self, loss):
        return loss * self.scaler.scale_on(loss.device).to(loss.dtype) if self.scaler.enabled else loss

    # ------------------------------------------------------------------ gradients (stages 2, 3)
    def _grad_ready(self, p):
        if not self.callback_queued:  # wait for the reductions when the autograd engine finishes this backward
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
        self.in_flight.append((u, reduce_scatter_single(out, flat, group=self.group, async_op=True), out, flat))
        u.ready = 0
        if self.stage == 3:
            self._free(u)  # its backward is done: every use of the weights came before its gradients
        while len(self.in_flight) > 2:  # bound the full-size gradient buffers alive at once
            self._retire(self.in_flight.pop(0))

    @staticmethod
    def _retire(entry):
        u, work, out, _ = entry
        work.wait()
        u.grad_shard = out if u.grad_shard is None else u.grad_shard.add_(out)

    def _finish_backward(self):
        for u in self.units:  # a unit only partly reached by this backward: its missing gradients are zeros
            if u.ready:
                self._reduce_scatter(u)
        while self.in_flight:
            self._retire(self.in_flight.pop(0))
        self.callback_queued = self.in_backward = False

    # ------------------------------------------------------------------ weights (stage 3)
    def _gather(self, u):
        """Launch the all-gather of u's weights into its (re-grown) flat buffer, unless gathered or on the way."""
        if u.gathered or u.pending is not None:
            return
        u.full.untyped_storage().resize_(u.nbytes(u.full))
        u.pending = all_gather_single(u.full, u.shard16, group=self.group, async_op=True)

    def _wait_gathered(self, u):
        self._gather(u)
        if u.pending is not None:
            u.pending.wait()
            u.pending, u.gathered = None, True

    @staticmethod
    def _free(u):
        u.full.untyped_storage().resize_(0)
        u.gathered = False

    def _install_stage3_hooks(self, model):
        blocks = [u for u in self.units if u is not self.root]
        for i, u in enumerate(blocks):
            nxt, prev = (blocks[i + 1] if i + 1 < len(blocks) else None), (blocks[i - 1] if i else None)
            u.module.register_forward_pre_hook(lambda m, args, u=u, nxt=nxt: self._before_forward(u, nxt))
            u.module.register_forward_hook(lambda m, args, out, u=u, prev=prev: self._after_forward(u, prev, out))
        first = blocks[0] if blocks else None
        # The root (embedding, norm, head) is used at both ends of the forward: it stays gathered from the
        # start of the forward until its gradients are reduce-scattered at the end of backward.
        model.register_forward_pre_hook(lambda m, args: self._before_forward(self.root, first))
        if self.root is not None:
            model.register_forward_hook(lambda m, args, out: self._after_root_forward(out))

    def _after_root_forward(self, out):
        if not torch.is_grad_enabled():
            self._free(self.root)
            return
        # A pipeline stage (pipeline.py) may run several micro-batches' forwards before their backwards, and the
        # root is freed after each backward's reduce-scatter: gather it again when a backward reaches the output.
        t = out[0] if isinstance(out, tuple) else out
        if t.requires_grad:
            t.register_hook(lambda grad: self._wait_gathered(self.root))

    def _before_forward(self, u, nxt):
        if u is None:
            return
        self._wait_gathered(u)
        if nxt is not None and not self.in_backward:  # (activation checkpointing re-runs forwards in backward)
            self._gather(nxt)

    def _after_forward(self, u, prev, out):
        if self.in_backward:
            return  # a recomputation inside backward: u stays gathered for its backward
        self._free(u)
        if torch.is_grad_enabled() and out.requires_grad:
            out.register_hook(lambda grad: self._before_backward(u, prev))

    def _before_backward(self, u, prev):
        """Runs when the gradient of u's output is ready, i.e. just before u's own backward."""
        self.in_backward = True
        self._wait_gathered(u)
        if prev is not None:
            self._gather(prev)

    @contextlib.contextmanager
    def gathered(self):
        """Stage 3: every weight whole for a while (to read or save the full model); a no-op otherwise."""
        if self.stage == 3:
            for u in self.units:
                self._wait_gathered(u)
        try:
            yield
        finally:
            if self.stage == 3:
                for u in self.units:
                    self._free(u)

    # ------------------------------------------------------------------ the step
    def _sum_over_ranks(self, x):
        dist.all_reduce(x, group=self.group)
        return self.norm_reduce_fn(x) if self.norm_reduce_fn is not None else x

    def step(self, max_norm=0.0, read=True):
        """Unscale, agree on overflow, clip by the global norm, step this rank's slices, share them.
        Returns (grad_norm, skipped), the same on every rank: numbers, or with read=False the device's tensors."""
        inv_scale = 1.0 / self.scaler.scale_on(self.units[0].master.device) if self.scaler.enabled else 1.0
        for u in self.units:
            if self.stage == 1:  # the averaged gradients are whole on every rank (ddp.py): take my slice
                g = torch.zeros(u.shard_size, dtype=u.grad_dtype, device=u.master.device)
                for p, a, s, n in u.pieces:
                    if grad_of(p) is not None:
                        g[s:s + n] = grad_of(p).flatten()[a:a + n]
            else:
                g = u.grad_shard if u.grad_shard is not None else torch.zeros_like(u.master)
            same = g.dtype == u.master.dtype and not self.scaler.enabled
            u.master_grad = g if same else g.to(u.master.dtype) * inv_scale  # the cast up, as in amp.py
        # Each distinct piece once over the world (amp.global_grad_norm's docstring): not the tp duplicates of
        # replicated parameters, not the experts' second replicas; the dp sum comes first in _sum_over_ranks.
        counted = [u.master_grad[s:s + n] for u in self.units for p, _, s, n in u.pieces
                   if not is_tp_duplicate(p) and not is_ep_duplicate(p)]
        norm = global_grad_norm(counted or [torch.zeros(1, device=self.units[0].master.device)],
                                self._sum_over_ranks)
        for u in self.units:
            for (_, _, s, n), view in zip(u.pieces, u.views):
                view.grad = u.master_grad[s:s + n]
        skipped = clip_and_step(self.optimizer, [u.master_grad for u in self.units], norm, max_norm, self.scaler)
        if skipped is not None:  # (a skipped update left the slices as they were: publishing them changes nothing)
            self._publish()
        for u in self.units:
            u.master_grad = None
            for view in u.views:
                view.grad = None
        return read_step(norm, skipped, read)

    def _publish(self):
        """The updated slices become the model's weights: all-gathered (stages 1, 2) or kept as the slice (3)."""
        works = []
        for u in self.units:
            if self.stage == 3:
                if u.shard16 is not u.master:
                    u.shard16.copy_(u.master)
            elif u.local:  # nothing to gather (an fp32 model's master already is its weights)
                if u.master.data_ptr() != u.full.data_ptr():
                    u.full.copy_(u.master)
            else:  # (the input must not alias the output: an fp32 model's master is a view of it)
                mine = u.master.to(u.dtype) if u.master.dtype != u.dtype else u.master.clone()
                works.append(all_gather_single(u.full, mine, group=self.group, async_op=True))
        for w in works:
            w.wait()

    # ------------------------------------------------------------------ checkpoints (checkpoint.py): this rank's slices
    def checkpoint_pieces(self):
        """What checkpoint.py saves and restores: each piece of a parameter in this rank's slice, as (param, start,
        end, {kind: flat view}, the inner optimizer's tensor, sharded): [start, end) is the range of the
        parameter's flattening that the piece covers; its 16-bit weights and fp32 master (one tensor in fp32)."""
        for u in self.units:
            weights = u.shard16 if self.stage == 3 else u.full[u.lo:u.hi]
            for (p, a, s, n), view in zip(u.pieces, u.views):
                views = {"param": view} if u.master.dtype == u.dtype else {"param": weights[s:s + n], "master": view}
                yield p, a, a + n, views, view, not u.local

    def after_load(self):
        """The masters were loaded: the 16-bit weights follow from them, as after a step."""
        self._publish()

    # ------------------------------------------------------------------ what is held, for the demo
    def memory(self):
        """Bytes this rank holds now: 16-bit weights, gradients, optimizer states (master + inner state)."""
        if self.stage == 3:
            params = sum(u.nbytes(u.shard16) + (u.nbytes(u.full) if u.gathered else 0) for u in self.units)
        else:
            params = sum(u.nbytes(u.full) for u in self.units)
        if self.stage == 1:
            grads = sum(b.buffer.numel() * b.buffer.element_size() for b in self.module.buckets)
        else:
            grads = sum(u.nbytes(u.grad_shard) for u in self.units if u.grad_shard is not None)
        own_master = [u for u in self.units if u.master is not u.shard16 and u.master.dtype != u.dtype]
        states = sum(u.nbytes(u.master) for u in own_master) + sum(
            t.numel() * t.element_size() for s in self.optimizer.state.values() for t in s.values()
            if torch.is_tensor(t) and t.dim() > 0)  # (Adam's step counters are scalars: left out)
        return {"params": params, "grads": grads, "optimizer": states}


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
    data = torch.randint(0, cfg.vocab_size, (4, 4 * N, 65), generator=torch.Generator().manual_seed(0))
    rows = []
    for stage in (0, 1, 2, 3):
        torch.manual_seed(0)
        model = cast_model(Transformer(cfg), torch.bfloat16)
        groups, scaler = [{"params": list(model.parameters())}], DynamicLossScaler(enabled=False)

        def adamw(groups):
            return torch.optim.AdamW(groups, lr=3e-3)
        if stage == 0:  # ddp.py with bf16 weights and fp32 master copies (amp.py)
            module = DistributedDataParallel(model, topo.dp_group)
            opt = MixedPrecisionOptimizer(groups, adamw, torch.bfloat16, scaler, no_sync=module.no_sync)
        else:
            opt = ZeroOptimizer(model, groups, adamw, scaler, topo.dp_group, stage)
            module = opt.module
        losses = []
        for step, batch in enumerate(data):
            x = batch.chunk(N)[rank]
            _, loss = module(x[:, :-1], x[:, 1:])
            opt.scale_loss(loss).backward()
            if step == len(data) - 1:  # everything a step needs is held now: weights, gradients, states
                if stage == 0:
                    states = sum(t.numel() * t.element_size() for m in opt.master_params for t in
                                 [m, *[s for s in opt.optimizer.state[m].values() if s.dim() > 0]])
                    held = {"params": sum(p.numel() * p.element_size() for p in model.parameters()),
                            "grads": sum(b.buffer.numel() * b.buffer.element_size() for b in module.buckets),
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
                  f"(measured / formula 2 Psi, 2 Psi, 12 Psi sharded per stage); the losses (random tokens: they "
                  f"stay near ln 256 = 5.55) are the same for every stage")
            for stage, held, pred, losses in rows:
                cells = "  ".join(f"{k} {held[k] / 2**20:6.3f}/{pred[k] / 2**20:6.3f}" for k in held)
                total = sum(held.values()) / pred["total"]
                print(f"  stage {stage}: {cells}  total {total:.3f}x formula | losses "
                      + " ".join(f"{l:.3f}" for l in losses), flush=True)
        dist.barrier()
    dist.destroy_process_group()
