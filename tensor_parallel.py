"""tensor_parallel.py: Megatron-style tensor parallelism, a layer's matrices split across tp ranks.

The idea (Shoeybi et al., 2019): a linear layer Y = X A can be split two ways. Column-parallel: A =
[A_1 .. A_t] by output columns, each rank computes Y_i = X A_i from the whole (replicated) X and
holds a slice of Y. Row-parallel: A split by input rows, each rank multiplies its slice X_i by A_i
and the partial products are summed, Y = sum_i X_i A_i, by one all-reduce. Chain them, column then
row, and the slice of Y in between never has to be gathered: attention splits by heads (wq, wk, wv
column-parallel, wo row-parallel; grouped-query KV heads go with the query heads that read them),
the SwiGLU MLP by hidden units (w1, w3 column, w2 row).

Two conjugate operators carry the communication, written out below as autograd functions:
    f: forward identity,   backward all-reduce (before a column-parallel layer: every rank's
                                                input gradient is a partial sum over its slice)
    g: forward all-reduce, backward identity   (after a row-parallel layer: partial products add up)
The embedding is split by vocabulary rows (each rank looks up the ids it owns, g sums), and so is
the output head, whose cross-entropy never gathers the V logits: the max and the sum of exponentials
are all-reduced instead (2 numbers per token rather than V/t).

Per block and t ranks, with activations of B x T x d: weights and their optimizer state / t; forward
2 all-reduces of B T d (one per g), backward 2 (one per f); FLOPs of the matmuls / t. wq, wk and wv
read the same input, and so do w1 and w3: f is applied once, to the output of the norm before them
(NormThenCopy), so their three (two) partial input gradients are summed locally and all-reduced
once, as Megatron's fused QKV and gate-up linears do. (In an MoE layer f goes on each expert's input
rows instead, once per expert: the replicated router reads the norm's output too, and its whole
gradient must not be summed over the ranks.) Norms are replicated and compute the same values on
every tp rank.

Sequence parallelism (Korthikanti et al., 2022; `sequence_parallel=True`): between the blocks'
matmuls the activations are replicated, so the norms and residual adds repeat the same work and
memory on every rank. Instead keep them split along the sequence (each rank T/t positions):
all-gather the sequence before a column-parallel layer and reduce-scatter after a row-parallel one.
An all-reduce is a reduce-scatter plus an all-gather, so communication stays the same; the norms'
activations and work shrink by t. The norms' gains see only T/t positions each, so their gradients
are summed over the ranks (an f on the weight).

Each rank's slice holds exactly the values of the same rows or columns of the single-process model
(drawn by parameter name from one seed: init.init_values), so the tensor-parallel model computes
what the single-process one does, up to summation order. (stack.build_model slices a model on the
meta device, then allocates and fills only the slices; the demo below slices a real one.)

Demo: `torchrun --nproc_per_node 2 tensor_parallel.py` checks loss and gradients against one process
(float64), without and with sequence parallelism.
"""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from placement import name_whole, placement_of, set_placement
from topology import all_gather_single, end_process_group, reduce_scatter_single


# ---------------------------------------------------------------------------- the f and g operators
def _all_reduce(x, group):
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, group=group)
    return x


class CopyToTensorParallel(torch.autograd.Function):
    """f: identity forward, all-reduce backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group), None


class ReduceFromTensorParallel(torch.autograd.Function):
    """g: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class GatherFromTensorParallel(torch.autograd.Function):
    """Concatenate the ranks' slices of the last dimension (sampling from a vocab-parallel head)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.rank = group, dist.get_rank(group)
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad.chunk(dist.get_world_size(ctx.group), dim=-1)[ctx.rank].contiguous(), None


class GatherSequence(torch.autograd.Function):
    """Sequence-parallel f: all-gather (B, T/t, d) shards to (B, T, d); backward reduce-scatter."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_sequence(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_sequence(grad, ctx.group), None


class ReduceScatterSequence(torch.autograd.Function):
    """Sequence-parallel g: sum the partial (B, T, d), keep this rank's T/t; backward all-gather."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_sequence(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_sequence(grad, ctx.group), None


def _gather_sequence(x, group):
    t = dist.get_world_size(group)
    out = torch.empty((t * x.shape[1], x.shape[0], *x.shape[2:]), dtype=x.dtype, device=x.device)
    all_gather_single(out, x.transpose(0, 1).contiguous(), group=group)  # collectives work on dim 0
    return out.transpose(0, 1)


def _reduce_scatter_sequence(x, group):
    t = dist.get_world_size(group)
    out = torch.empty((x.shape[1] // t, x.shape[0], *x.shape[2:]), dtype=x.dtype, device=x.device)
    reduce_scatter_single(out, x.transpose(0, 1).contiguous(), group=group)
    return out.transpose(0, 1)


# ----------------------------------------------------------------------------- the parallel layers
def _slice(weight, dim, topo):
    """This rank's contiguous 1/tp of a full tensor along `dim` (a copy: the full tensor can be
    freed), its placement recorded (placement.py)."""
    piece = nn.Parameter(weight.detach().chunk(topo.tp, dim=dim)[topo.tp_rank].clone())
    return set_placement(piece, like=weight, tp=topo.tp, tp_rank=topo.tp_rank, tp_dim=dim)


class ColumnParallelLinear(nn.Module):
    """Y_i = f(X) A_i^T: the weight's output rows split; input replicated, output split across
    ranks. copy_input=False when the input already went through f (NormThenCopy) or through sequence
    parallelism's all-gather (whose backward reduce-scatter sums the ranks' input gradients): a
    second f would sum twice."""

    def __init__(self, linear: nn.Linear, topo, gather_output=False, copy_input=True):
        super().__init__()
        assert linear.bias is None, "model.py's linears have no bias"
        self.group, self.gather_output, self.copy_input = topo.tp_group, gather_output, copy_input
        self.weight = _slice(linear.weight, 0, topo)
        self.linear_fn = F.linear  # the local matmul (quantization.use_fp8 swaps in its FP8 one)

    def enter(self, x):
        return CopyToTensorParallel.apply(x, self.group) if self.copy_input else x

    def leave(self, y):
        return (GatherFromTensorParallel.apply(y, self.group) if self.gather_output and self.group
                else y)

    # Split into enter and leave so that lora.py can add its update in between.
    def forward(self, x):
        return self.leave(self.linear_fn(self.enter(x), self.weight))


class RowParallelLinear(nn.Module):
    """Y = g(sum_i X_i A_i^T): the weight's input columns split; input split, output replicated."""

    def __init__(self, linear: nn.Linear, topo, sequence_parallel=False):
        super().__init__()
        assert linear.bias is None, "model.py's linears have no bias"
        self.group, self.sequence_parallel = topo.tp_group, sequence_parallel
        self.weight = _slice(linear.weight, 1, topo)
        self.linear_fn = F.linear

    def enter(self, x):
        return x

    def leave(self, y):
        reduce = ReduceScatterSequence if self.sequence_parallel else ReduceFromTensorParallel
        return reduce.apply(y, self.group)

    def forward(self, x):
        return self.leave(self.linear_fn(x, self.weight))


class VocabParallelEmbedding(nn.Module):
    """Rows [start, end) of the table on each rank; other ids look up zeros; g sums over ranks."""

    def __init__(self, emb: nn.Embedding, topo, sequence_parallel=False):
        super().__init__()
        self.group, self.sequence_parallel = topo.tp_group, sequence_parallel
        self.weight = _slice(emb.weight, 0, topo)
        self.start = topo.tp_rank * self.weight.shape[0]

    def forward(self, idx):
        local = idx - self.start
        mine = (local >= 0) & (local < self.weight.shape[0])
        out = (F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
               * mine.unsqueeze(-1))
        reduce = ReduceScatterSequence if self.sequence_parallel else ReduceFromTensorParallel
        return reduce.apply(out, self.group)


class NormThenCopy(nn.Module):
    """A replicated norm followed by f: the column-parallel layers that read its output (wq, wk, wv;
    w1, w3) skip their own f, so the backward all-reduces their summed input gradient once instead
    of once each."""

    def __init__(self, norm, topo):
        super().__init__()
        self.eps, self.group = norm.eps, topo.tp_group
        self.weight = norm.weight  # named like the norm it replaces: checkpoints are unchanged

    def forward(self, x):
        return CopyToTensorParallel.apply(_rms_norm(x, self.weight, self.eps), self.group)


class SequenceParallelRMSNorm(nn.Module):
    """model.RMSNorm over this rank's T/t positions, then the all-gather that the next matmul needs.
    The gain passes through f, so that its gradient, computed from T/t positions here, is summed
    over the ranks."""

    def __init__(self, norm, topo, gather=True):
        super().__init__()
        self.eps, self.group, self.gather = norm.eps, topo.tp_group, gather
        self.weight = norm.weight

    def forward(self, x):
        h = _rms_norm(x, CopyToTensorParallel.apply(self.weight, self.group), self.eps)
        return GatherSequence.apply(h, self.group) if self.gather else h


def _rms_norm(x, weight, eps):
    """model.RMSNorm's arithmetic (fp32 or wider), with the gain passed in."""
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * weight.to(h.dtype)).to(x.dtype)


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token -log softmax(z)[y] from this rank's logits z[:, start:start+V/t], z never gathered:
        m = max over all ranks (all-reduce MAX), S = sum exp(z - m) (all-reduce SUM),
        z_y - m from the one rank that owns y (all-reduce SUM),   loss = log S - (z_y - m).
    Backward: softmax - onehot(y), each rank for its own columns, with no communication."""

    @staticmethod
    def forward(ctx, logits, targets, start, group):
        n, v = logits.shape
        m = logits.max(dim=-1).values
        if group is not None:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        exp = (logits - m.unsqueeze(1)).exp()
        sum_exp = _all_reduce(exp.sum(dim=-1), group)
        local = targets - start
        mine = (local >= 0) & (local < v)  # ignored labels (-100) are never anyone's
        local = local.clamp(0, v - 1)
        z_y = torch.where(mine, logits.gather(1, local.unsqueeze(1)).squeeze(1) - m,
                          torch.zeros_like(m))
        z_y = _all_reduce(z_y, group)
        valid = targets != -100
        loss = torch.where(valid, sum_exp.log() - z_y, torch.zeros_like(z_y))
        softmax = exp.div_(sum_exp.unsqueeze(1))
        ctx.save_for_backward(softmax, local, mine, valid)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local, mine, valid = ctx.saved_tensors
        grad = softmax.clone()
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local] -= mine.to(grad.dtype)
        grad.mul_((grad_loss * valid).unsqueeze(1))
        return grad, None, None, None


def vocab_parallel_loss_fn(start, group):
    """A drop-in for model.cross_entropy (the head's loss_fn) over vocabulary-parallel logits."""

    def loss_fn(logits, targets, reduction="mean"):
        flat = logits.reshape(-1, logits.shape[-1])
        flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
        targets = targets.reshape(-1)
        per_token = VocabParallelCrossEntropy.apply(flat, targets, start, group)
        if reduction == "none":
            return per_token
        if reduction == "sum":
            return per_token.sum()
        # F.cross_entropy's mean over non-ignored labels
        return per_token.sum() / (targets != -100).sum()

    return loss_fn


# ------------------------------------------------------------------ the model, changed from outside
def check_divisible(cfg, tp):
    """Every split dimension must divide by tp: the message for the first that does not, or None."""
    for what, n in (("n_head", cfg.n_head), ("n_kv_head", cfg.n_kv_head), ("d_ff", cfg.d_ff),
                    ("vocab_size (padded)", cfg.vocab_size)):
        if n % tp:
            return (f"--tp {tp} does not divide the model's {what} {n}: choose a --tp that "
                    "divides it")
    return None


def parallelize(model, topo, sequence_parallel=False):
    """Swap a (pipeline stage of a) model.Transformer's linears and embeddings for their
    tensor-parallel versions holding this rank's slice. Call on the full model (real, or on the meta
    device: then the slices are meta tensors of the slices' shapes, for stack.build_model to
    allocate and fill). With sequence_parallel the activations between blocks are (B, T/tp, d): T
    must divide by tp."""
    # pipeline.py sends activations of this shape
    model.sequence_shards = topo.tp if sequence_parallel else 1
    name_whole(model)  # (the slices keep their names in the whole model)
    if topo.tp == 1:
        return model
    err = check_divisible(model.cfg, topo.tp)
    assert err is None, err  # pretrain.py refuses this up front; here it is a programming error
    sp = sequence_parallel
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        moe = hasattr(mlp, "experts")
        # The norm before a group of column-parallel layers applies f (under sp: all-gather) once.
        block.attn_norm = (SequenceParallelRMSNorm if sp else NormThenCopy)(block.attn_norm, topo)
        if sp or not moe:
            block.mlp_norm = (SequenceParallelRMSNorm if sp else NormThenCopy)(block.mlp_norm, topo)
        attn.wq, attn.wk, attn.wv = (ColumnParallelLinear(l, topo, copy_input=False)
                                     for l in (attn.wq, attn.wk, attn.wv))
        attn.wo = RowParallelLinear(attn.wo, topo, sequence_parallel=sp)
        attn.n_head, attn.n_kv_head = attn.n_head // topo.tp, attn.n_kv_head // topo.tp
        # An MoE layer (moe.py) splits each expert the same way; its router stays replicated, so
        # every tp rank routes its (replicated) tokens alike and the experts' row-parallel
        # all-reduce meets the same rows.
        for m in getattr(mlp, "experts", [mlp]):
            m.w1, m.w3 = (ColumnParallelLinear(l, topo, copy_input=False) for l in (m.w1, m.w3))
            # f on the expert's input rows (a pre-hook keeps the parameter names unchanged)
            if moe and not sp:
                m.register_forward_pre_hook(
                    lambda module, args: (CopyToTensorParallel.apply(args[0], topo.tp_group),))
            m.w2 = RowParallelLinear(m.w2, topo, sequence_parallel=sp)
    if getattr(model, "tok_emb", None) is not None:
        model.tok_emb = VocabParallelEmbedding(model.tok_emb, topo, sequence_parallel=sp)
    if getattr(model, "lm_head", None) is not None:
        if sp:
            model.norm = SequenceParallelRMSNorm(model.norm, topo)
        model.lm_head = ColumnParallelLinear(model.lm_head, topo, copy_input=not sp)
        model.loss_fn = vocab_parallel_loss_fn(topo.tp_rank * model.lm_head.weight.shape[0],
                                               topo.tp_group)
    # Every parameter not sliced above (the norms' gains, a router) is whole on each tp rank: its
    # placement says so (the gradient norm counts it on tp rank 0 only: amp.global_grad_norm).
    for p in model.parameters():
        set_placement(p, tp=topo.tp, tp_rank=topo.tp_rank)
    return model


def is_tp_duplicate(p):
    """A replicated parameter on tp rank > 0: same gradient as tp rank 0's, so not counted twice."""
    return placement_of(p).tp_duplicate


def split_dim(name):
    """The dimension along which parameter `name` of a full model is split under tensor
    parallelism, or None: the rule by name, independent of the placements recorded above."""
    if name.endswith(("attn.wq.weight", "attn.wk.weight", "attn.wv.weight", "mlp.w1.weight",
                      "mlp.w3.weight", "tok_emb.weight", "lm_head.weight")):
        return 0
    if name.endswith(("attn.wo.weight", "mlp.w2.weight")):
        return 1
    return None


def set_gather_output(model, on):
    """Full logits from the vocabulary-parallel head, to sample (tp ranks generate in lockstep)."""
    if isinstance(getattr(model, "lm_head", None), ColumnParallelLinear):
        model.lm_head.gather_output = on


if __name__ == "__main__":
    from dataclasses import replace

    from model import PRESETS, Transformer
    from topology import Topology

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    topo = Topology(tp=dist.get_world_size())
    cfg = replace(PRESETS["tiny"], n_layer=2, n_head=max(4, topo.tp), n_kv_head=max(2, topo.tp))
    idx = torch.randint(0, cfg.vocab_size, (4, 33), generator=torch.Generator().manual_seed(1))
    for sp in (False, True):
        torch.manual_seed(0)
        full = Transformer(cfg).double()
        _, ref_loss = full(idx[:, :-1], idx[:, 1:])
        ref_loss.backward()
        ref_grads = {n: p.grad for n, p in full.named_parameters()}
        # full's layers are replaced in place: now this rank's slice
        model = parallelize(full, topo, sp)
        model.zero_grad()
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        worst = 0.0
        for n, p in model.named_parameters():
            d = split_dim(n)
            want = ref_grads[n] if d is None else ref_grads[n].chunk(topo.tp, dim=d)[topo.tp_rank]
            worst = max(worst, (p.grad - want).abs().max().item())
        n_local = sum(p.numel() for p in model.parameters())
        line = (f"tp rank {topo.tp_rank}/{topo.tp}{' + sequence parallel' if sp else ''}: "
                f"{n_local:,} of {sum(g.numel() for g in ref_grads.values()):,} parameters | "
                f"loss {loss.item():.12f} vs one process {ref_loss.item():.12f} | "
                f"max |grad difference| {worst:.2e}")
        # rank 0 prints every rank's line: lines of processes sharing a pipe can interleave
        lines = [None] * topo.tp
        dist.all_gather_object(lines, line)
        if topo.tp_rank == 0:
            print("\n".join(lines), flush=True)
    end_process_group()
