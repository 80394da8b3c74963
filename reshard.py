"""reshard.py: a rank's training state as pieces of the whole model, named by what they are, and
the copy that moves them from one layout to another (what lets checkpoint.py resume on any layout).

The idea: describe every tensor by what it is, not by who holds it. A rank's tensors are pieces of
the full model's parameters: a tensor-parallel slice is a box (offset and length per dimension) of
the full parameter, a pipeline stage holds whole blocks under their full names
(blocks.{first_layer + i}), an expert-parallel rank whole experts (experts.{first_expert + j}), and
a ZeRO flat shard covers a flat range [a, b) of the (sliced) parameter. Of each piece a rank holds
the 16-bit weights ("param"), the fp32 master ("master", under mixed precision) and AdamW's exp_avg
and exp_avg_sq, all of the same range (held_pieces).

Moving state to another layout: a flat range of a box is at most three rectangles of the full
tensor (rects), so two pieces of one parameter overlap in rectangles, each a plain slice copy
(copy_overlap). For a box of C columns, with a = ra * C + ca and b = rb * C + cb:

    [a, b) = row ra from column ca  +  rows ra + 1 .. rb - 1 whole  +  row rb up to column cb

See it run: tests/test_checkpoint.py saves under one layout (tp, pp, ep, ZeRO stages, LoRA) and
resumes under another, in float64, with the losses of the run that kept its layout;
benchmarks/bench_checkpoint.py counts the bytes each rank copies in.
"""
from placement import describe, placement_of


def held_pieces(model, opt, topo):
    """Every piece of a parameter this rank holds: dict(name, shape, box, flat=[a, b],
    tensors={kind: live 1-D view}, key=the inner optimizer's tensor, writer=whether this rank is the
    one that saves it). The optimizer (amp.py, zero.py) says what it holds through
    checkpoint_pieces(); frozen parameters are taken whole."""
    names = describe(model)  # (placement.py: name in the whole model, full shape, box)
    pieces = []

    # replicas save nothing: tp copies of a norm, dp (and cp) copies outside ZeRO's shards
    def writer(p, sharded):
        where = placement_of(p)
        dp_rank = topo.expert_dp_rank if where.expert_parallel else topo.dp_rank
        first = dp_rank == 0 and topo.cp_rank == 0
        return not where.tp_duplicate and (sharded or first)

    for p, a, b, views, key, sharded in opt.checkpoint_pieces():
        state = opt.optimizer.state.get(key, {})
        views = dict(views)
        if "exp_avg" in state:
            views.update(exp_avg=state["exp_avg"].view(-1), exp_avg_sq=state["exp_avg_sq"].view(-1))
        name, shape, box = names[p]
        pieces.append(dict(name=name, shape=shape, box=box, flat=[a, b], tensors=views, key=key,
                           adam_step=float(state["step"]) if "step" in state else None,
                           writer=writer(p, sharded)))
    for p in model.parameters():
        if not p.requires_grad:  # frozen (LoRA's base weights): the optimizer knows nothing of them
            name, shape, box = names[p]
            pieces.append(dict(name=name, shape=shape, box=box, flat=[0, p.numel()], key=None,
                               adam_step=None, tensors={"param": p.detach().view(-1)},
                               writer=writer(p, False)))
    return pieces


def rects(box, flat):
    """The range [a, b) of a box's row-major flattening as rectangles of the full tensor, each
    (starts, lengths, offset of its first element in the range): a partial first row, whole rows, a
    partial last row."""
    (r0, _), (c0, C) = box if len(box) == 2 else ([0, 1], box[0])  # 1-D: one row
    a, b = flat
    ra, ca = divmod(a, C)
    rb, cb = divmod(b, C)
    if ra == rb:
        spans = [(ra, 1, ca, cb - ca, 0)]
    else:
        spans = [(ra, 1, ca, C - ca, 0), (ra + 1, rb - ra - 1, 0, C, C - ca),
                 (rb, 1, 0, cb, (rb - ra) * C - ca)]
    return [((r0 + r, c0 + c), (h, w), off) for r, h, c, w, off in spans if h > 0 and w > 0]


def copy_overlap(dst, dst_rects, src, src_rects):
    """Copy every element the two pieces share from src into dst (both 1-D); returns how many."""
    n = 0
    for (d0, d1), (dh, dw), doff in dst_rects:
        for (s0, s1), (sh, sw), soff in src_rects:
            lo0, hi0 = max(d0, s0), min(d0 + dh, s0 + sh)  # the rows both cover
            lo1, hi1 = max(d1, s1), min(d1 + dw, s1 + sw)  # and the columns
            if lo0 >= hi0 or lo1 >= hi1:
                continue
            d = dst[doff:doff + dh * dw].view(dh, dw)[lo0 - d0:hi0 - d0, lo1 - d1:hi1 - d1]
            d.copy_(src[soff:soff + sh * sw].view(sh, sw)[lo0 - s0:hi0 - s0, lo1 - s1:hi1 - s1])
            n += (hi0 - lo0) * (hi1 - lo1)
    return n
