"""topology.py: each rank's place in the data x pipeline x tensor grid; a process group per axis.

The idea: with world = dp * pp * tp ranks, rank r has coordinates (dp_rank, pp_rank, tp_rank),
tensor innermost:

    r = (dp_rank * pp + pp_rank) * tp + tp_rank

Tensor-parallel peers are neighbours (same node, fast links: they talk twice per block half),
pipeline peers next (one send per micro-batch per stage boundary), data parallel outermost (one
gradient reduction per step, overlappable). Each axis gets its own process group; every reduction in
the project names the group it reduces over, and this object is passed to whoever needs one (no
global state, so a test can build several topologies in one process).

    world 8, dp 2, pp 2, tp 2:   dp_rank 0: stage 0 = ranks {0, 1}, stage 1 = {2, 3};
                                 dp_rank 1: {4, 5}, {6, 7}
                                 tp groups {0,1} {2,3} {4,5} {6,7}
                                 pp groups {0,2} {1,3} {4,6} {5,7}
                                 dp groups {0,4} {1,5} {2,6} {3,7}

Context parallelism (context_parallel.py, --cp) splits each sequence over cp ranks, laid out between
pipeline and tensor:

    r = ((dp_rank * pp + pp_rank) * cp + cp_rank) * tp + tp_rank

Why there: a cp group passes every layer's keys and values around its ring, forward and backward;
that is more traffic, and more often, than a pipeline's one activation per micro-batch or data
parallelism's one reduction per step, but it overlaps with the attention it feeds, where tensor
parallelism's all-reduces sit on the critical path twice per block: tp keeps the fastest links, cp
the next. The cp ranks of a replica hold the same weights and different tokens, so replicated
weights' gradients are reduced over dp x cp (the dp_cp group), while the data loader splits batches
over dp only.
    world 8, dp 2, cp 2, tp 2:   cp groups {0,2} {1,3} {4,6} {5,7};  dp groups {0,4} {1,5} ...;
                                 dp x cp groups {0,2,4,6} {1,3,5,7}

Expert parallelism (moe.py, --ep) is carved out of the data-parallel ranks: within each dp group,
consecutive runs of ep dp ranks form an ep group (they hold different experts and exchange tokens by
all-to-all), and dp ranks with the same dp_rank % ep form an expert-data group (replicas of the same
experts, dp/ep of them, whose gradients are summed there).
    dp 4, ep 2 (tp = pp = 1):    ep groups {0,1} {2,3};  expert-data groups {0,2} {1,3}

Demo: `torchrun --nproc_per_node 4 topology.py --tp 2` (or `--ep 2`, `--cp 2`) prints each rank's
coordinates and groups.
"""
import argparse

import torch.distributed as dist

# torch 2.13 names the flat collectives all_gather_single / reduce_scatter_single; older releases
# (which GPU machines often carry) only have the same functions under their former names.
# zero.py and tensor_parallel.py take them from here.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def rank0_token(lockstep):
    """For ranks that generate in lockstep (under tp, ZeRO-3 or ep each forward is a collective
    needing them all): a function making each chosen token rank 0's, broadcast over the world; None
    for a rank generating alone. Their logits agree only up to the last bits of reductions in
    another order: enough to flip an argmax or a draw, and then one rank stops at end-of-text while
    the others wait in the next collective for ever."""
    if not lockstep:
        return None

    def agree(token):
        dist.broadcast(token, src=0)
        return token
    return agree


# The last barrier of each ended process group, kept until the process exits (end_process_group).
_LAST_BARRIER = []


def end_process_group():
    """The end of a distributed run: a last barrier, then destroy_process_group. Why not the
    destroy alone: gloo's worker threads let go of a collective's tensors just after it completes,
    and letting go of a tensor Python also holds takes the GIL. A thread that asks for the GIL once
    the interpreter has begun to shut down is ended in the middle of C++, which aborts the process
    (SIGABRT, "terminate called without an active exception") after its work is all done: 12 runs
    in 80 of ddp.py's demo on 2 CPU cores, none in 60 since. Waiting on the barrier hands the GIL to
    any worker still letting go of an earlier collective; the barrier's own handle is kept, so the
    main thread, not a worker, lets go of it, at exit. Every rank must call it (a collective)."""
    if not dist.is_initialized():
        return
    work = dist.barrier(async_op=True)
    work.wait()
    _LAST_BARRIER.append(work)
    dist.destroy_process_group()


class TopologyError(ValueError):
    """An impossible layout: its message is the one line the user sees, before any group exists."""


def check_layout(world, tp=1, pp=1, ep=1, cp=1):
    """Validate without touching torch.distributed; returns dp."""
    for name, v in (("--tp", tp), ("--pp", pp), ("--ep", ep), ("--cp", cp)):
        if v < 1:
            raise TopologyError(f"{name} must be at least 1, got {v}")
    if world % (tp * pp * cp):
        what = f"--tp {tp} x --pp {pp}" + (f" x --cp {cp}" if cp > 1 else "")
        raise TopologyError(f"world size {world} is not divisible by {what} = {tp * pp * cp}: "
                            f"launch a multiple of {tp * pp * cp} processes")
    dp = world // (tp * pp * cp)
    if dp % ep:
        raise TopologyError(f"--ep {ep} does not divide the {dp} data-parallel ranks "
                            f"(world {world} / (--tp {tp} x --pp {pp})): expert-parallel groups "
                            f"are taken from them; choose --ep dividing {dp}")
    return dp


class Topology:
    def __init__(self, tp=1, pp=1, ep=1, cp=1):
        """Call on every rank after dist.init_process_group (or with no process group: one rank)."""
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.tp, self.pp, self.ep, self.cp = tp, pp, ep, cp
        self.dp = check_layout(self.world, tp, pp, ep, cp)
        self.dp_rank, rest = divmod(self.rank, pp * cp * tp)
        self.pp_rank, rest = divmod(rest, cp * tp)
        self.cp_rank, self.tp_rank = divmod(rest, tp)
        self.expert_dp_rank, self.ep_rank = divmod(self.dp_rank, ep)  # which replica; which experts
        self.tp_group = self.pp_group = self.dp_group = self.ep_group = self.expert_dp_group = None
        self.cp_group = self.dp_cp_group = None
        self.tp_ranks = self.pp_ranks = self.dp_ranks = self.ep_ranks = [self.rank]
        self.expert_dp_ranks = self.cp_ranks = self.dp_cp_ranks = [self.rank]
        if dist.is_initialized():
            # new_group must be entered by every rank for every group, in the same order.
            cps, dps = range(cp), range(self.dp)
            for d in dps:
                for p in range(pp):
                    for c in cps:
                        self._maybe_keep("tp", [self.rank_of(d, p, t, c) for t in range(tp)])
            for d in dps:
                for c in cps:
                    for t in range(tp):
                        self._maybe_keep("pp", [self.rank_of(d, p, t, c) for p in range(pp)])
            for p in range(pp):
                for c in cps:
                    for t in range(tp):
                        self._maybe_keep("dp", [self.rank_of(d, p, t, c) for d in dps])
            if cp > 1:
                for p in range(pp):
                    for t in range(tp):
                        for d in dps:
                            self._maybe_keep("cp", [self.rank_of(d, p, t, c) for c in cps])
                        self._maybe_keep("dp_cp", [self.rank_of(d, p, t, c)
                                                   for d in dps for c in cps])
            if ep > 1:
                for p in range(pp):
                    for c in cps:
                        for t in range(tp):
                            for start in range(0, self.dp, ep):
                                self._maybe_keep("ep", [self.rank_of(d, p, t, c)
                                                        for d in range(start, start + ep)])
                            for e in range(ep):
                                self._maybe_keep("expert_dp", [self.rank_of(d, p, t, c)
                                                               for d in range(e, self.dp, ep)])
        # one way to name the gradient-reduction group, whether or not the sequence is split
        if cp == 1:
            self.dp_cp_group, self.dp_cp_ranks = self.dp_group, self.dp_ranks

    def _maybe_keep(self, axis, ranks):
        group = dist.new_group(ranks)
        if self.rank in ranks:
            setattr(self, f"{axis}_group", group)
            setattr(self, f"{axis}_ranks", ranks)

    def rank_of(self, dp_rank, pp_rank, tp_rank, cp_rank=0):
        return ((dp_rank * self.pp + pp_rank) * self.cp + cp_rank) * self.tp + tp_rank

    @property
    def is_first_stage(self):
        return self.pp_rank == 0

    @property
    def is_last_stage(self):
        return self.pp_rank == self.pp - 1

    def __repr__(self):
        return (f"rank {self.rank}/{self.world}: dp {self.dp_rank}/{self.dp} "
                f"pp {self.pp_rank}/{self.pp} tp {self.tp_rank}/{self.tp} | "
                f"tp group {self.tp_ranks} pp group {self.pp_ranks} dp group {self.dp_ranks}"
                + (f" | cp {self.cp_rank}/{self.cp} cp group {self.cp_ranks} "
                   f"dp x cp group {self.dp_cp_ranks}" if self.cp > 1 else "")
                + (f" | ep {self.ep_rank}/{self.ep} ep group {self.ep_ranks} "
                   f"expert-data group {self.expert_dp_ranks}" if self.ep > 1 else ""))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--cp", type=int, default=1)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    topo = Topology(args.tp, args.pp, args.ep, args.cp)
    for r in range(topo.world):
        if r == topo.rank:
            print(topo, flush=True)
        dist.barrier()
    end_process_group()
