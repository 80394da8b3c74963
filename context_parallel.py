"""context_parallel.py: context parallelism by ring attention, the sequence split across ranks.

The idea (Liu et al., "Ring Attention with Blockwise Transformers", 2023; the causal load balance of
Brandon et al., "Striped Attention", and Llama 3's "zigzag" chunks): attention over T tokens on cp
ranks. Each rank keeps T/cp of the queries, keys and values. The key/value chunks travel around a
ring: at step t a rank computes attention of its queries against the chunk it holds while it already
sends that chunk to the next rank and receives the next one from the previous rank. The partial
results cover disjoint key sets, so they merge exactly, as FlashAttention's tiles do inside a GPU:

    L = log(exp(L1) + exp(L2)),   O = exp(L1 - L) O1 + exp(L2 - L) O2

The backward runs the same ring: each rank recomputes its blocks from Q, K, V and the final O and L,
keeps dQ at home, and sends dK, dV around with their chunks (one extra hop brings them home).

Causal load balance. Cut the sequence into 2cp chunks of c = T/2cp tokens; rank i holds chunks i and
2cp-1-i. A query chunk a sees a key chunk b fully if b < a, causally (the diagonal) if b = a, not at
all if b > a, and those pairs are skipped. Every rank then computes 2 diagonal blocks and 2cp-1 full
ones: the same work everywhere, where contiguous chunks would leave rank 0 one block and rank cp-1
cp of them.

    memory     O(B H T/cp D) per rank for Q, K, V, O, L (and two K/V chunks in flight),
               against O(B H T D)
    sent       per rank and layer: forward (cp-1) K/V chunks, backward (cp-1) K/V chunks
               + cp dK/dV chunks, one chunk = 2 B H_kv (T/cp) D elements
    FLOPs      unchanged in total, 1/cp per rank (causal: balanced by the zigzag)

Every block is one call of flash_attn.py (Triton kernels on GPUs, its PyTorch twin on CPUs) with a
causal offset between the query and key chunks: query i sees key j iff j + k_offset <= i + q_offset.

In training (--cp N, training.py): ranks laid out dp x pp x cp x tp (topology.py); every cp rank of
a replica takes the same rows and keeps its zigzag chunks (split_batch), RoPE at their global
positions; replicated weights' gradients are averaged over dp x cp; the loss is summed over dp x cp
and divided by the labelled tokens of the whole rows.

Demo: `torchrun --nproc_per_node 4 context_parallel.py` prints, for a long sequence, at cp 1, 2, 4:
ring attention's saved activations, time and bytes sent per rank (against the formula), then the
same model run on one sequence with its activations split into attention's and the rest's.
"""
import argparse
import math
import os
import time

import torch
import torch.distributed as dist

from flash_attn import attention_backward, attention_forward, check_inputs
from topology import TopologyError, end_process_group


# ------------------------------------------------------------------------------ the zigzag layout
def zigzag_chunks(cp, rank):
    """The two global chunk indices (of 2cp) rank `rank` holds: i and 2cp-1-i."""
    return rank, 2 * cp - 1 - rank


def zigzag_positions(T, cp, rank, device=None):
    """Global positions of this rank's T/cp tokens, in local order: chunk i, then chunk 2cp-1-i."""
    if T % (2 * cp):
        raise ValueError(f"context parallelism: sequence length {T} must be a multiple of "
                         f"2 x cp = {2 * cp}")
    c = T // (2 * cp)
    return torch.cat([torch.arange(a * c, (a + 1) * c, device=device)
                      for a in zigzag_chunks(cp, rank)])


def zigzag_split(x, cp, rank, dim=1):
    """This rank's tokens of a full-sequence tensor (the same sequences on all ranks of a group)."""
    return x.index_select(dim, zigzag_positions(x.shape[dim], cp, rank, device=x.device))


def ring_schedule(cp, rank, causal):
    """For each ring step, the blocks this rank computes: (local query chunk, local key chunk,
    offset), where offset = a - b for global chunks a (queries) and b (keys): query i sees key j iff
    j <= i + offset c. At step t the rank holds the K/V of rank (rank - t) mod cp. Fully masked
    pairs (b > a) are left out."""
    mine = zigzag_chunks(cp, rank)
    steps = []
    for t in range(cp):
        theirs = zigzag_chunks(cp, (rank - t) % cp)
        steps.append([(qa, kb, mine[qa] - theirs[kb]) for qa in (0, 1) for kb in (0, 1)
                      if not causal or theirs[kb] <= mine[qa]])
    return steps


def schedule_work(schedule, c, causal):
    """Score entries (query, key pairs) a schedule computes, with chunks of c tokens: c^2 per full
    block, c(c+1)/2 per diagonal one."""
    return sum(c * (c + 1) // 2 if causal and off == 0 else c * c
               for step in schedule for _, _, off in step)


# ------------------------------------------------------------------------------ the ring
class Ring:
    """Point-to-point exchange with both ring neighbours of a process group."""

    def __init__(self, group=None):
        if group is not None:
            ranks = dist.get_process_group_ranks(group)
        else:  # the whole world; one rank when there is no process group at all
            ranks = list(range(dist.get_world_size())) if dist.is_initialized() else [0]
        self.size, self.rank = (len(ranks),
                                ranks.index(dist.get_rank() if dist.is_initialized() else 0))
        self.next, self.prev = (ranks[(self.rank + 1) % self.size],
                                ranks[(self.rank - 1) % self.size])
        self.group, self.bytes_sent = group, 0

    def exchange(self, send, recv):
        """Start sending `send` to the next rank and receiving `recv` from the previous one; returns
        the handles. NCCL's send completes only when the peer posts its receive: every rank sending
        first would deadlock. batch_isend_irecv posts the pair together, so each send meets the
        receive it crosses."""
        self.bytes_sent += send.numel() * send.element_size()
        return dist.batch_isend_irecv([dist.P2POp(dist.isend, send, self.next, self.group),
                                       dist.P2POp(dist.irecv, recv, self.prev, self.group)])


def _wait(handles):
    for h in handles:
        h.wait()


def merge(o, lse, o_blk, lse_blk):
    """Online softmax across blocks: two partial attentions (O, L) over disjoint keys into one."""
    if o is None:
        return o_blk, lse_blk
    new = torch.logaddexp(lse, lse_blk)
    return (torch.exp(lse - new)[..., None] * o + torch.exp(lse_blk - new)[..., None] * o_blk), new


def _chunks(x):
    """The two zigzag chunks of a local (B, H, 2c, D) or (B, H, 2c) tensor, dense for kernels."""
    c = x.shape[2] // 2
    return [x[:, :, :c].contiguous(), x[:, :, c:].contiguous()]


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, ring):
        acc_t = torch.promote_types(q.dtype, torch.float32)  # merge in fp32 (float64 stays float64)
        c = q.shape[2] // 2
        schedule = ring_schedule(ring.size, ring.rank, causal)
        qs = _chunks(q)
        kv = torch.stack([k, v])  # one buffer travels: (2, B, H_kv, 2c, D)
        out, lse = [None, None], [None, None]
        for t, blocks in enumerate(schedule):
            if t < ring.size - 1:  # send on while computing on what we hold
                nxt = torch.empty_like(kv)
                handles = ring.exchange(kv, nxt)
            ks, vs = _chunks(kv[0]), _chunks(kv[1])
            for qa, kb, off in blocks:
                o_blk, lse_blk = attention_forward(qs[qa], ks[kb], vs[kb], causal, scale,
                                                   offset=off * c)
                out[qa], lse[qa] = merge(out[qa], lse[qa], o_blk.to(acc_t), lse_blk.to(acc_t))
            if t < ring.size - 1:
                _wait(handles)
                kv = nxt
        o, lse = torch.cat(out, 2).to(q.dtype), torch.cat(lse, 2)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale, ctx.ring = causal, scale, ring
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        ring, causal, scale = ctx.ring, ctx.causal, ctx.scale
        acc_t = torch.promote_types(q.dtype, torch.float32)
        c = q.shape[2] // 2
        qs, os_, dos, lses = _chunks(q), _chunks(o), _chunks(do), _chunks(lse)
        dq = [torch.zeros_like(x, dtype=acc_t) for x in qs]
        kv = torch.stack([k, v])
        dkv_handles = None
        for t, blocks in enumerate(ring_schedule(ring.size, ring.rank, causal)):
            if t < ring.size - 1:
                nxt = torch.empty_like(kv)
                handles = ring.exchange(kv, nxt)
            ks, vs = _chunks(kv[0]), _chunks(kv[1])
            # this step's share for the held chunk
            dkv = torch.zeros(kv.shape, dtype=acc_t, device=kv.device)
            # exact shares of the global softmax: P = exp(S - L) with the merged L
            for qa, kb, off in blocks:
                dq_blk, dk_blk, dv_blk = attention_backward(qs[qa], ks[kb], vs[kb], os_[qa],
                                                            lses[qa], dos[qa], causal, scale,
                                                            offset=off * c)
                dq[qa] += dq_blk
                dkv[0, :, :, kb * c:(kb + 1) * c] += dk_blk
                dkv[1, :, :, kb * c:(kb + 1) * c] += dv_blk
            if dkv_handles is not None:  # what earlier ranks added for this same chunk
                _wait(dkv_handles)
                dkv += dkv_in
            dkv_in = torch.empty_like(dkv) if ring.size > 1 else dkv
            if ring.size > 1:
                # on with the chunk; overlaps the next step
                dkv_handles = ring.exchange(dkv, dkv_in)
            if t < ring.size - 1:
                _wait(handles)
                kv = nxt
        _wait(dkv_handles or [])  # the last hop brings this rank's own dK, dV home
        dq = torch.cat(dq, 2).to(q.dtype)
        return dq, dkv_in[0].to(k.dtype), dkv_in[1].to(v.dtype), None, None, None


def ring_attention(q, k, v, group=None, causal=True, softmax_scale=None, ring=None):
    """Attention over a sequence split across `group` (None: the whole world), each rank holding its
    zigzag chunks: q (B, H, T/cp, D), k, v (B, H_kv, T/cp, D) with tokens in zigzag_positions order.
    Returns this rank's output rows. Pass `ring` (a Ring) to reuse one and read its bytes_sent."""
    q, k, v = check_inputs(q, k, v)
    if q.shape[2] % 2:
        raise ValueError(f"ring_attention: each rank holds two equal chunks; got {q.shape[2]} "
                         "local tokens")
    ring = ring or Ring(group)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    return RingAttention.apply(q, k, v, bool(causal), scale, ring)


# ------------------------------------------------------------------------ in the model and the loop
class RingBackend:
    """model.py's attention backend under --cp: ring attention over the cp group."""

    def __init__(self, group):
        self.ring = Ring(group)

    def __call__(self, q, k, v, doc=None):
        # training.py refuses --pack with --cp before any work; this guards other callers.
        if doc is not None:
            raise ValueError("ring attention: packed rows' document masks across the ring are "
                             "not implemented")
        return ring_attention(q, k, v, ring=self.ring)


def parallelize(model, topo):
    """--cp: every block's attention becomes ring attention over topo's cp group (the model is
    otherwise unchanged: each rank's weights are the same, its tokens are its zigzag chunks, RoPE
    takes their positions)."""
    if topo.cp > 1:
        backend = RingBackend(topo.cp_group)
        for block in model.blocks:
            block.attn.backend = backend
    return model


def check_flags(cp, T, attn, pp=1, ep=1, experts=0, sequence_parallel=False, pack=False):
    """--cp and what it cannot compose with yet, before anything is built: one line each, the
    reason and what would work (TopologyError)."""
    moe_why = ("routing capacity and the balancing loss are computed per rank, over part of each "
               "sequence; use a dense model")
    why = {"--pp": (pp > 1, "the pipeline sends whole sequences between stages; use --tp and data "
                            "parallelism with --cp"),
           "experts (--experts, --ep, an MoE --init)": (ep > 1 or experts, moe_why),
           "--sequence-parallel": (sequence_parallel,
                                   "it splits the sequence over tp ranks as well; drop it"),
           "--pack": (pack, "document masks across a ring are not implemented; drop --pack")}
    for flag, (bad, reason) in why.items():
        if bad:
            raise TopologyError(f"--cp {cp} with {flag}: {reason}")
    if attn not in (None, "flash"):  # (None: flags.resolved makes it flash)
        raise TopologyError(f"--cp {cp} runs ring attention, whose blocks are flash_attn.py's "
                            f"kernels (its twin on CPU): drop --attn {attn} (--cp picks flash)")
    if T % (2 * cp):
        raise TopologyError(f"--cp {cp} cuts each sequence into 2 x {cp} equal chunks (zigzag): "
                            f"choose a --seq-len divisible by {2 * cp} (got {T})")


def split_batch(x, y, topo):
    """This cp rank's zigzag chunks of a batch of whole sequences (B, T), and the model's keyword
    arguments for them: their global positions (B, T/cp), for RoPE. Every cp rank of a replica is
    given the same sequences."""
    if topo.cp == 1:
        return x, y, {}
    pos = zigzag_positions(x.shape[1], topo.cp, topo.cp_rank, device=x.device)
    return x[:, pos], y[:, pos], {"pos": pos.expand(x.shape[0], -1)}


# ------------------------------------------------------------------------------ the demo
class SavedActivations:
    """Counts the bytes autograd keeps for the backward, each storage once, under a name per code
    region (saved-tensor hooks; the innermost region wins). Parameters are excluded: they are the
    model, not activations."""

    def __init__(self, exclude=()):
        self.bytes, self.seen = {}, {p.untyped_storage().data_ptr() for p in exclude}

    def under(self, name):
        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in self.seen:
                self.seen.add(storage.data_ptr())
                self.bytes[name] = self.bytes.get(name, 0) + storage.nbytes()
            return t
        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def _worst(*values):
    """The largest value of each over all ranks (the rank that bounds memory or time)."""
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def demo_attention(T, B, H, H_kv, D, reps, groups):
    """Ring attention alone: saved activations, time, bytes sent per rank and cp; output vs cp 1."""
    torch.manual_seed(0)  # the same full sequence on every rank; each cp group splits it
    q, k, v, do = (torch.randn(B, h, T, D) for h in (H, H_kv, H_kv, H))
    print0(f"ring attention, causal, fp32 on CPU (flash_attn.py's twin per block), B={B} H={H} "
           f"H_kv={H_kv} T={T} D={D}; time: median of {reps} forward + backward after a warm-up\n"
           f"{'cp':>3} {'saved MiB/rank':>15} {'x cp1':>6} {'ms/rank':>8} {'max|o - o_cp1|':>15} "
           f"{'sent MiB/rank':>14} {'formula':>8} {'per ring step':>14}")
    base = base_saved = None
    for cp, (group, r) in groups.items():
        local = [zigzag_split(x, cp, r, dim=2).requires_grad_() for x in (q, k, v)]
        ring, times = Ring(group), []
        for _ in range(reps + 1):                         # the first is a warm-up
            ring.bytes_sent, acts = 0, SavedActivations()
            dist.barrier()
            t0 = time.perf_counter()
            with acts.under("attention"):
                o = ring_attention(*local, ring=ring)
            o.backward(zigzag_split(do, cp, r, dim=2))
            times.append(time.perf_counter() - t0)
        parts = [torch.empty_like(o) for _ in range(cp)]
        dist.all_gather(parts, o.detach().contiguous(), group=group)
        full = torch.empty_like(q)
        for i, part in enumerate(parts):
            full[:, :, zigzag_positions(T, cp, i)] = part
        base = full if base is None else base
        # one K/V chunk (dK/dV travel in fp32 too)
        chunk = 2 * B * H_kv * (T // cp) * D * q.element_size()
        formula = (2 * (cp - 1) + (cp if cp > 1 else 0)) * chunk
        saved, ms, sent = _worst(acts.bytes["attention"], sorted(times[1:])[reps // 2] * 1e3,
                                 ring.bytes_sent)
        base_saved = base_saved or saved
        print0(f"{cp:>3} {saved / 2**20:>15.2f} {saved / base_saved:>6.3f} {ms:>8.0f} "
               f"{(full - base).abs().max().item():>15.1e} {sent / 2**20:>14.2f} "
               f"{formula / 2**20:>8.2f} {chunk / 2**20:>14.2f}")
    print0("saved: what autograd keeps for the backward (Q, K, V, O, L of this rank's tokens); "
           "sent: forward (cp-1) K/V chunks + backward (cp-1) K/V and cp dK/dV chunks, a chunk "
           "being 2 B H_kv (T/cp) D x 4 bytes\n")


def demo_model(T, groups):
    """model.py's tiny preset on one sequence of T tokens, attention by the ring: activations saved
    per rank in attention and in the rest of the model, and the time of one forward + backward."""
    from dataclasses import replace
    from types import SimpleNamespace

    from model import PRESETS, Transformer
    cfg = replace(PRESETS["tiny"], block_size=T, attn="flash")
    torch.manual_seed(0)
    model, seq = Transformer(cfg), torch.randint(0, cfg.vocab_size, (1, T + 1))
    print0(f"model.py 'tiny' ({cfg.n_layer} layers, d {cfg.d_model}, {cfg.n_head} heads), one "
           f"sequence of T={T}, fp32; saved for backward per rank (parameters excluded)\n"
           f"{'cp':>3} {'attention MiB':>14} {'x cp1':>6} {'rest MiB':>9} {'x cp1':>6} "
           f"{'ms/rank':>8} {'loss':>8}")
    base = None
    for cp, (group, r) in groups.items():
        acts, ring = SavedActivations(exclude=model.parameters()), RingBackend(group)

        def attend(q, k, v, doc=None):
            with acts.under("attention"):
                return ring(q, k, v, doc)
        for block in model.blocks:
            block.attn.backend = attend
        x, y, kw = split_batch(seq[:, :-1], seq[:, 1:], SimpleNamespace(cp=cp, cp_rank=r))
        dist.barrier()
        t0 = time.perf_counter()
        with acts.under("rest"):
            loss = model(x, y, reduction="sum", **kw)[1]
        loss.backward()
        model.zero_grad()
        attn, rest, ms = _worst(acts.bytes["attention"], acts.bytes["rest"],
                                (time.perf_counter() - t0) * 1e3)
        loss = loss.detach().clone()
        dist.all_reduce(loss, group=group)
        base = base or (attn, rest)
        print0(f"{cp:>3} {attn / 2**20:>14.2f} {attn / base[0]:>6.3f} {rest / 2**20:>9.2f} "
               f"{rest / base[1]:>6.3f} {ms:>8.0f} {loss.item() / T:>8.4f}")


def print0(*a):
    if dist.get_rank() == 0:
        print(*a, flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if "RANK" not in os.environ:
        raise SystemExit("context_parallel.py: launch with torchrun, e.g. torchrun "
                         "--nproc_per_node 4 context_parallel.py")
    if args.seq_len % 8:
        raise SystemExit("context_parallel.py: --seq-len must be a multiple of 2 x 4 = 8 "
                         f"(zigzag chunks for cp 4), got {args.seq_len}")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    # cp -> (this rank's cp group, its rank in it); every rank enters every new_group, in order
    groups = {}
    for cp in (c for c in (1, 2, 4) if world % c == 0):
        made = [dist.new_group(list(range(g, g + cp))) for g in range(0, world, cp)]
        groups[cp] = made[rank // cp], rank % cp
    print0(f"{world} processes, one thread each (timings on a shared CPU are rough)")
    demo_attention(args.seq_len, args.batch, args.heads, args.kv_heads, args.head_dim, args.reps,
                   groups)
    demo_model(args.seq_len, groups)
    end_process_group()
