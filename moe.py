"""moe.py: a mixture-of-experts MLP, with expert parallelism over all-to-all.

The idea (Shazeer et al. 2017; GShard; Switch Transformer): replace a block's MLP by E expert MLPs
and a router. Each token goes to its top-k experts only, so parameters grow E-fold while FLOPs per
token grow k-fold:
    router    p = softmax(W_r x) over E experts (in fp32); keep the k largest, renormalise them
              to gates g
    output    y = sum over the k chosen experts e of g_e * expert_e(x)
    balance   aux = alpha * E * sum_i f_i * P_i
              f_i: share of routed (token, choice) pairs that chose expert i; P_i: mean router
              probability of i. It is 1*alpha at perfect balance and grows as the router
              collapses onto few experts; P carries the gradient (f is a count).
    capacity  C = ceil(capacity_factor * k * N / E) pairs per expert per batch of N tokens; first
              choices are served before second choices, tokens in order; an overflowing pair is
              dropped and that token's output from it is zero (the block's residual carries the
              token on). capacity_factor None: dropless, every pair is served.

Expert parallelism (--ep N): the E experts are split over N ranks taken from the data-parallel
ranks, E/N each. Every rank routes its own tokens, then one all-to-all sends each (token, choice)
pair to the rank holding its expert, the experts run on what arrived, and a second all-to-all brings
the results home; their backward is the reverse all-to-all. Communication per MoE layer per step:
each routed pair crosses twice forward and twice backward: 4 * k * N * d elements per rank at most.
Capacity is applied on the sending rank, per expert, to that rank's own tokens (as GShard's
per-group capacity), so ep ranks give exactly what one process gives when it runs the same per-rank
batches one after another.

Gradients: dense parameters are replicated over the data-parallel group and averaged there as usual.
An expert's gradient already sums the contributions of every rank's tokens in its ep group (through
the backward all-to-all); with dp > ep each expert is replicated dp/ep times and is summed over its
expert-data group too; then divided by dp, like the dense ones (`reduce_expert_grads`).

Demo: `torchrun --nproc_per_node 2 moe.py` trains a small MoE with and without the balancing loss
for 60 steps (DEMO_STEPS=N: N steps) and prints the share of tokens of the busiest and idlest expert
over the last third.
"""
import math
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from init import init_values, materialize, whole
from model import MLP
from placement import name_whole, set_placement


class MoEError(ValueError):
    """A bad MoE setting: the message is the one line the user sees."""


def check_moe(n_experts, top_k, capacity_factor, ep=1):
    if n_experts < 1:
        raise MoEError(f"--experts must be at least 1, got {n_experts}")
    if not 1 <= top_k <= n_experts:
        raise MoEError(f"--topk {top_k} must be between 1 and --experts {n_experts}")
    if capacity_factor is not None and capacity_factor <= 0:
        raise MoEError("--capacity-factor must be > 0 (or omitted for dropless routing), "
                       f"got {capacity_factor}")
    if ep < 1 or n_experts % ep:
        raise MoEError(f"--experts {n_experts} is not divisible by --ep {ep}: each rank holds "
                       "experts/ep experts")


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits; its gradient: the same exchange, splits swapped."""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out = x.new_empty((sum(recv_splits),) + x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty((sum(ctx.send_splits),) + grad.shape[1:])
        dist.all_to_all_single(out, grad.contiguous(), ctx.send_splits, ctx.recv_splits,
                               group=ctx.group)
        return out, None, None, None


def all_to_all(x, send_splits, recv_splits, group):
    return _AllToAll.apply(x, send_splits, recv_splits, group)


def combine(y, pair, k, N):
    """Each token's output, the sum of its k pairs' gated outputs `y` (pair c N + t: token t's
    choice c; a pair dropped for capacity adds 0), in a fixed order: the pairs go to their own rows
    of a (k, N, d) buffer, summed over k. Adding them straight into the output by token (index_add_)
    uses atomic adds on CUDA, in whatever order the threads arrive: the low bits of a sum change
    from run to run, and tensor-parallel ranks, which hold the same activations and must route them
    alike, drift apart. For the same reason the tokens are dispatched from k copies of x (x.repeat
    above) rather than x[token]: the backward of each is then a sum in a fixed order too, instead of
    atomic adds of k gradients into one row."""
    # every row written once: no atomics
    buffer = y.new_zeros(k * N, y.shape[-1]).index_copy(0, pair, y)
    return buffer.view(k, N, -1).sum(0)


class MoE(nn.Module):
    """Drop-in for model.MLP: same input and output shape; the balancing loss and load are left in
    `self.aux_loss` and `self.load` after each forward, for the trainer to add and to log."""

    def __init__(self, cfg, n_experts, top_k, capacity_factor=None, aux_loss_weight=1e-2):
        super().__init__()
        check_moe(n_experts, top_k, capacity_factor)
        self.E, self.k, self.capacity_factor, self.alpha = (n_experts, top_k, capacity_factor,
                                                            aux_loss_weight)
        self.router = nn.Linear(cfg.d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(cfg) for _ in range(n_experts))
        self.first_expert, self.ep, self.ep_group = 0, 1, None  # changed by shard_experts
        self.aux_loss = self.load = None

    def route(self, x):
        """Top-k experts and renormalised gates per token; sets the balancing loss and the load."""
        probs = torch.softmax(self.router(x).to(torch.promote_types(x.dtype, torch.float32)),
                              dim=-1)
        top_p, top_e = probs.topk(self.k, dim=-1)
        gates = top_p / top_p.sum(-1, keepdim=True)
        f = F.one_hot(top_e, self.E).sum((0, 1)).to(probs.dtype) / top_e.numel()
        self.aux_loss = self.alpha * self.E * (f * probs.mean(0)).sum()
        self.load = f.detach()
        return top_e, gates

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        N = x.shape[0]
        top_e, gates = self.route(x)
        # (token, choice) pairs, choice-major, so that every token's first choice is served before
        # any second: pair c N + t is token t's choice c.
        expert = top_e.t().reshape(-1)
        pair = torch.arange(self.k * N, device=x.device)
        gate = gates.t().reshape(-1)
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * self.k * N / self.E)
            position = ((F.one_hot(expert, self.E).cumsum(0) - 1)
                        .gather(1, expert[:, None]).squeeze(1))
            keep = position < capacity
            expert, pair, gate = expert[keep], pair[keep], gate[keep]
        order = torch.argsort(expert, stable=True)  # group the pairs by expert
        expert, pair, gate = expert[order], pair[order], gate[order]
        counts = torch.bincount(expert, minlength=self.E)
        y = self.run_experts(x.repeat(self.k, 1)[pair], counts)
        return combine(y * gate[:, None].to(y.dtype), pair, self.k, N).view(shape)

    def run_experts(self, xs, counts):
        """xs: the routed pairs' inputs grouped by expert (counts[e] rows for expert e). Returns
        their outputs. One host sync per layer, the `.tolist()` below: the row counts size the
        expert matmuls and the all-to-all's splits, which torch takes as Python ints (under gloo and
        NCCL alike). The counts exchange itself stays on the device; every other split is derived
        from the one list on the host."""
        if self.ep == 1:
            return torch.cat([expert(c)
                              for expert, c in zip(self.experts, xs.split(counts.tolist()))])
        ep, E_local = self.ep, self.E // self.ep
        # Tell every rank how many rows of each of its experts we send; learn what we will receive.
        send_counts = counts.view(ep, E_local)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.ep_group)
        # [ep][E_local] each: the one sync
        send, recv = torch.stack([send_counts, recv_counts]).tolist()
        send_splits, recv_splits = [sum(row) for row in send], [sum(row) for row in recv]
        received = all_to_all(xs, send_splits, recv_splits, self.ep_group)
        # Arrived grouped by source rank, then by expert, (src 0: e0, e1, ..), (src 1: ..):
        # regroup by local expert, run, restore the order.
        pieces = received.split([n for row in recv for n in row])
        by_expert = [[pieces[src * E_local + e] for src in range(ep)] for e in range(E_local)]
        outs = [self.experts[e](torch.cat(by_expert[e])) for e in range(E_local)]
        back = [o.split([recv[src][e] for src in range(ep)]) for e, o in enumerate(outs)]
        y = torch.cat([back[e][src] for src in range(ep) for e in range(E_local)])
        return all_to_all(y, recv_splits, send_splits, self.ep_group)


def shard_experts(moe, ep_rank, ep, ep_group, expert_dp_rank=0):
    """Keep only this rank's E/ep experts of a whole MoE (real, or on the meta device:
    stack.build_model), and record their placement (placement.py): each its number in the whole
    layer (this rank's own: ddp.py neither broadcasts nor averages them, zero.py does not shard
    them; reduce_expert_grads reduces them) and which replica of its expert-data group holds it (the
    gradient norm counts each expert once: amp.global_grad_norm)."""
    check_moe(moe.E, moe.k, moe.capacity_factor, ep)
    n = moe.E // ep
    moe.experts = nn.ModuleList(list(moe.experts)[ep_rank * n:(ep_rank + 1) * n])
    moe.first_expert, moe.ep, moe.ep_group = ep_rank * n, ep, ep_group
    for j, expert in enumerate(moe.experts):
        for p in expert.parameters():
            set_placement(p, expert=moe.first_expert + j, expert_dp_rank=expert_dp_rank)
    return moe


def keep_experts(model, topo):
    """With topo.ep > 1, keep this rank's experts of every MoE layer (shard_experts marks them)."""
    if topo.ep == 1:
        return model
    name_whole(model)  # (the experts kept keep their names in the whole model)
    for layer in moe_layers(model):
        shard_experts(layer, topo.ep_rank, topo.ep, topo.ep_group, topo.expert_dp_rank)
    return model


def moe_layers(model):
    return [m for m in model.modules() if isinstance(m, MoE)]


def aux_loss(model):
    """The sum of every MoE layer's balancing loss from the last forward (0 for a dense model)."""
    losses = [m.aux_loss for m in moe_layers(model) if m.aux_loss is not None]
    return sum(losses) if losses else 0.0


def expert_params(model):
    return [p for m in moe_layers(model) for p in m.experts.parameters()]


def reduce_expert_grads(model, dp, expert_dp_group=None):
    """Expert grads hold their ep group's token sum: summed over replicas (dp > ep), then / dp."""
    for p in expert_params(model):
        # (amp.grad_of: fp32 main_grad)
        grad = p.grad if getattr(p, "main_grad", None) is None else p.main_grad
        if grad is None:
            continue
        if expert_dp_group is not None:
            dist.all_reduce(grad, group=expert_dp_group)
        grad.div_(dp)


@dataclass(frozen=True)
class MoEConfig:
    """The mixture-of-experts flags (pretrain.py's --experts, --topk, --moe-layers,
    --capacity-factor, --aux-loss-weight), or those an MoE checkpoint recorded (config_of).
    experts 0: a dense model."""
    experts: int
    topk: int
    moe_layers: str
    capacity_factor: float
    aux_loss_weight: float


def config_of(saved):
    """The MoE settings a checkpoint's flags (its "args") recorded; experts 0 (dense) if none."""
    return MoEConfig(**{f.name: saved.get(f.name, 0 if f.name == "experts" else None)
                        for f in fields(MoEConfig)})


def check_flags(settings, n_layer, ep, pp, sequence_parallel):
    """--experts and its companions, before anything is built (MoEError: one line)."""
    check_moe(settings.experts, settings.topk, settings.capacity_factor, ep)
    parse_layers(settings.moe_layers, n_layer)
    if pp > 1:
        raise MoEError("--experts with --pp > 1: the balancing loss of a stage's MoE layers has "
                       "no way into the pipeline's backward yet; use --tp and data parallelism "
                       "with MoE")
    if sequence_parallel:
        raise MoEError("--experts with --sequence-parallel: routing needs every token of a "
                       "rank's batch; drop --sequence-parallel")


def with_experts(model, settings):
    """--experts: swap the chosen blocks' MLPs for MoE layers, before any slicing (settings:
    MoEConfig; None, or 0 experts: dense)."""
    if settings is not None and settings.experts:
        add_moe(model, settings.experts, settings.topk, settings.capacity_factor,
                settings.aux_loss_weight, parse_layers(settings.moe_layers, model.cfg.n_layer))
    return model


def parse_layers(spec, n_layer):
    """--moe-layers: 'all' (None: every block) or block numbers like 1,3."""
    if spec == "all":
        return None
    try:
        layers = {int(i) for i in spec.split(",")}
    except ValueError:
        raise MoEError("--moe-layers must be 'all' or block numbers like 0,2; "
                       f"got {spec!r}") from None
    if not layers <= set(range(n_layer)):
        raise MoEError(f"--moe-layers {spec}: blocks are numbered 0..{n_layer - 1}")
    return layers


def add_moe(model, n_experts, top_k, capacity_factor=None, aux_loss_weight=1e-2, layers=None):
    """Swap the MLP of the chosen blocks (default: every block) for an MoE layer."""
    device = next(model.parameters()).device
    for i, block in enumerate(model.blocks):
        if layers is None or i in layers:
            # built on meta, then drawn by name from the model's seed, as model.py draws its own
            with torch.device("meta"):
                block.mlp = MoE(model.cfg, n_experts, top_k, capacity_factor, aux_loss_weight)
            if device.type != "meta":
                materialize(block.mlp, device, lambda name, p, i=i: init_values(
                    f"blocks.{i}.mlp.{name}", p.shape, whole(p.shape), model.init_seed,
                    model.cfg.n_layer, p.dtype, device))
    return model


def inactive_params(model):
    """Parameters a token never meets: E - k experts of every MoE layer (FLOPs follow the rest)."""
    return sum((m.E - m.k) * sum(p.numel() for p in m.experts[0].parameters())
               for m in moe_layers(model))


def load_spread(model):
    """Share of routed pairs of the busiest and of the idlest expert, averaged over MoE layers."""
    loads = [m.load for m in moe_layers(model) if m.load is not None]
    return (sum(l.max().item() for l in loads) / len(loads),
            sum(l.min().item() for l in loads) / len(loads))


if __name__ == "__main__":
    import os
    from dataclasses import replace

    import data
    from batches import Batches
    from model import PRESETS, Transformer
    from topology import end_process_group

    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    steps = int(os.environ.get("DEMO_STEPS", 60))  # (the tests run a shorter demo)
    last = max(1, steps // 3)  # the load is averaged over the last third of the run
    cfg = replace(PRESETS["tiny"], n_layer=2, vocab_size=320, d_ff=128)
    if rank == 0:  # the embedded corpus, prepared once by one rank before the others read it
        data.ensure_default_data("bytes")
    if world > 1:
        dist.barrier()
    batches_dir = data.ensure_default_data("bytes")
    E, k = 8, 2
    for alpha in (0.0, 1e-2):
        torch.manual_seed(0)
        model = add_moe(Transformer(cfg), E, k, capacity_factor=None, aux_loss_weight=alpha)
        for m in moe_layers(model):
            # An uneven start makes collapse visible in a short run: the router favours expert 0.
            with torch.no_grad():
                m.router.weight[0] += 0.05
            if world > 1:
                shard_experts(m, rank, world, None)
        dense = [p for n, p in model.named_parameters() if ".experts." not in n]
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        batches = Batches(batches_dir, 64, 16, rank, world, seed=0)
        spreads = []
        for step in range(steps):
            (x, y), = batches.next()
            _, loss = model(x, y)
            (loss + aux_loss(model)).backward()
            if world > 1:
                for p in dense:
                    dist.all_reduce(p.grad)
                    p.grad.div_(world)
                reduce_expert_grads(model, world)
            opt.step()
            opt.zero_grad()
            spreads.append(load_spread(model))
        busiest, idlest = (sum(s[i] for s in spreads[-last:]) / last for i in (0, 1))
        if rank == 0:
            print(f"aux weight {alpha:<5}: loss {loss.item():.3f}  busiest expert {busiest:.1%}  "
                  f"idlest {idlest:.1%} of routed pairs over the last {last} steps on rank 0 "
                  f"(perfect balance: {1 / E:.1%}), ep={world}")
    end_process_group()
