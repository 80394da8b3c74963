"""ddp.py: data parallelism from scratch: every rank holds the whole model, reads its own slice of
the batch, and the gradients are averaged over the data-parallel group before the step.

The idea: N ranks start from the same weights (broadcast from the group's first rank), each computes
the gradient of its own 1/N of the global batch, and an all-reduce turns N local gradients into
their mean, which is the gradient of the global batch: every rank then takes the same optimizer step
and the replicas never drift apart. Two tricks make it cheap (Li et al., "PyTorch Distributed",
VLDB 2020):

  - buckets: gradients are copied into flat buffers of about --bucket-mb megabytes and reduced a
    bucket at a time, so there are few large messages instead of one per tensor;
  - overlap: a bucket's all-reduce is launched asynchronously from a gradient hook the moment its
    last gradient is ready, while backward is still computing the earlier layers' gradients; all of
    them are waited for at the end of backward, so the optimizer step sees averaged gradients.

Gradient accumulation: inside `no_sync()` the hooks do nothing and gradients simply add up in
`p.grad`; the last micro-step's backward reduces the sum. (Reducing a sum in which an earlier
micro-step's *already averaged* part is identical on every rank would also be right, only wasteful.)

Communication per step: a ring all-reduce sends and receives 2 (N-1)/N x Psi elements per rank, for
Psi parameters: about 2 Psi, whatever N is.  Memory: the buckets hold one more copy of the
gradients, which then *are* the gradients (p.grad becomes a view into its bucket), so there is no
extra copy at the step.

Demo: `torchrun --nproc_per_node 2 ddp.py` trains a tiny model on the embedded corpus from different
random starts on each rank (the broadcast makes them one), with two accumulation micro-steps, and
checks that the replicas end identical (20 steps; DEMO_STEPS=N: N steps). tests/test_ddp_zero.py
checks the losses and weights against one process on the global batch.
"""
import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn

from amp import LOW_PRECISION
from placement import placement_of


class Bucket:
    """A flat buffer holding the gradients of a few consecutive parameters, all of one dtype
    (`dtype`: theirs, or fp32 for 16-bit parameters, whose gradients add up and reduce in fp32)."""

    def __init__(self, params, device, dtype):
        self.params = params
        self.buffer = torch.zeros(sum(p.numel() for p in params), dtype=dtype, device=device)
        self.views, offset = {}, 0
        for p in params:
            self.views[p] = self.buffer[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        self.ready = set()
        self.work = None


class DistributedDataParallel(nn.Module):
    """Wraps `module`; call it as the module. `group` is the data-parallel process group
    (topology.dp_group), never the world: under tensor or pipeline parallelism the world also holds
    ranks with other weights."""

    def __init__(self, module, group=None, bucket_mb=25.0, main_grads=False):
        super().__init__()
        self.module = module
        self.group = group
        self.world = dist.get_world_size(group)
        self.require_sync = True
        # The same starting point everywhere: the group's first rank's weights (and buffers) win.
        # Parameters of expert parallelism (moe.py) are left alone: their placement (placement.py)
        # is replicated over their expert-data group, not this one (whose ranks hold other experts);
        # moe.reduce_expert_grads reduces their gradients over their own groups after backward.
        shared = [p for p in module.parameters() if "dp" in placement_of(p).replicated_over]
        src = dist.get_global_rank(group, 0) if group is not None else 0
        with torch.no_grad():
            for t in shared + list(module.buffers()):
                dist.broadcast(t.data, src=src, group=group)
        # Buckets in reverse order of registration: backward produces the last layers' gradients
        # first, so the first bucket fills first and its all-reduce starts while the rest of
        # backward runs. The first bucket is small (1 MB at most, as torch's DDP does), so that
        # communication starts as soon as the head's gradients exist instead of after a whole
        # bucket's worth of backward.
        params = [p for p in shared if p.requires_grad]
        # main_grads: a 16-bit parameter's bucket is fp32, and is its main_grad
        # (amp.accumulate_main_grads): every micro-step's gradient is added into it, and the
        # all-reduce sums fp32 (half the speed on the wire, none of bf16's rounding in the sum).
        dtype = {p: torch.float32 if main_grads and p.dtype in LOW_PRECISION else p.dtype
                 for p in params}
        limit = min(bucket_mb, 1.0) * 2 ** 20
        self.buckets, current, size = [], [], 0
        for p in reversed(params):
            if current and (size + p.numel() * dtype[p].itemsize > limit
                            or dtype[p] != dtype[current[0]]):
                self.buckets.append(Bucket(current, p.device, dtype[current[0]]))
                current, size, limit = [], 0, bucket_mb * 2 ** 20
            current.append(p)
            size += p.numel() * dtype[p].itemsize
        if current:
            self.buckets.append(Bucket(current, current[0].device, dtype[current[0]]))
        self.bucket_of = {p: b for b in self.buckets for p in b.params}
        # buckets are launched in index order: every rank issues the same sequence
        self.next_bucket = 0
        self.callback_queued = False
        for p in params:
            if dtype[p] != p.dtype:
                p.main_grad = None  # (None: no gradient since zero_grad)
            p.register_post_accumulate_grad_hook(self._grad_ready)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulation micro-steps but the last: gradients add up locally, nothing is sent."""
        self.require_sync = False
        try:
            yield
        finally:
            self.require_sync = True

    def _grad_ready(self, p):
        """Runs inside backward, right after p.grad has received this micro-step's contribution."""
        view = self.bucket_of[p].views[p]
        # accumulated in the fp32 bucket on every micro-step, as amp.py's main_grad
        if view.dtype != p.dtype:
            if p.main_grad is None:
                view.copy_(p.grad)
                p.main_grad = view
            else:
                view.add_(p.grad)
            p.grad = None
        if not self.require_sync:
            return
        if not self.callback_queued:
            # This hook runs inside backward: wait for the reductions when the engine finishes it.
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
            self.callback_queued = True
        bucket = self.bucket_of[p]
        if p.grad is not None and p.grad is not view:
            view.copy_(p.grad)
            p.grad = view  # the bucket now *is* the gradient: no copy back after the reduction
        bucket.ready.add(p)
        while self.next_bucket < len(self.buckets) and self._full(self.buckets[self.next_bucket]):
            self._launch(self.buckets[self.next_bucket])
            self.next_bucket += 1

    @staticmethod
    def _full(bucket):
        return len(bucket.ready) == len(bucket.params)

    def _launch(self, bucket):
        # The mean is the sum of x / N: dividing first keeps fp16 sums of N big gradients in range.
        bucket.buffer.div_(self.world)
        bucket.work = dist.all_reduce(bucket.buffer, group=self.group, async_op=True)

    def _finish(self):
        """End of backward: launch what is left (parameters this backward did not reach get zero
        gradients, the same on every rank), then wait for every bucket."""
        for bucket in self.buckets[self.next_bucket:]:
            for p in (p for p in bucket.params if p not in bucket.ready):
                view = bucket.views[p]
                if view.dtype == p.dtype:
                    view.zero_()
                    p.grad = view
                elif p.main_grad is None:  # (an fp32 bucket keeps what earlier micro-steps added)
                    view.zero_()
                    p.main_grad = view
            self._launch(bucket)
        for bucket in self.buckets:
            bucket.work.wait()
            bucket.work = None
            bucket.ready.clear()
        self.next_bucket = 0
        self.callback_queued = False


if __name__ == "__main__":
    import os
    from dataclasses import replace

    import data
    from batches import Batches
    from model import PRESETS, Transformer
    from topology import end_process_group
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    steps = int(os.environ.get("DEMO_STEPS", 20))  # (the tests run a shorter demo)
    if rank == 0:  # the embedded corpus, prepared once by one rank before the others read it
        data.ensure_default_data("bytes")
    dist.barrier()
    batches = Batches(data.ensure_default_data("bytes"), 64, 8 * world, rank, world, n_micro=2)
    # different seeds on purpose: the broadcast must make the replicas equal
    torch.manual_seed(rank)
    # vocab_size: 257 byte tokens, padded
    cfg = replace(PRESETS["tiny"], n_layer=2, block_size=64, vocab_size=320)
    model = DistributedDataParallel(Transformer(cfg), bucket_mb=0.25)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    if rank == 0:
        print(f"{world} ranks x 8 sequences of 64 bytes of Python source a step, 2 accumulation "
              "micro-steps each (the first without communication); loss in nats per byte, "
              "ln 320 = 5.77 for a uniform guess")
    for step in range(steps):
        # this rank's 1/world of the global batch, in 2 micro-batches
        micro_batches = batches.next()
        with model.no_sync():
            _, loss0 = model(*micro_batches[0])
            (loss0 / 2).backward()
        _, loss1 = model(*micro_batches[1])
        (loss1 / 2).backward()
        opt.step()
        opt.zero_grad()
        loss = torch.stack([loss0, loss1]).detach().mean()
        dist.all_reduce(loss)
        if rank == 0 and (step % 5 == 4 or step == steps - 1):
            print(f"step {step + 1:3d} | loss (mean over ranks) {loss.item() / world:.4f} | "
                  f"{len(model.buckets)} buckets", flush=True)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        print("replicas identical after training:",
              all(torch.equal(gathered[0], x) for x in gathered))
    end_process_group()
