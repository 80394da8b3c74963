"""placement.py: where each parameter lives, written down once, by the code that cuts the model.

A rank of a parallel run holds pieces of the whole model. What a parameter is in the whole model,
and which other ranks hold the same values, is decided in the few places that cut the model, and
recorded there, on the parameter, as a Placement:

    where it is cut              what is cut                      what is recorded
    pipeline.keep_stage          a stage's blocks kept            every name in the whole model
    tensor_parallel.parallelize  Column/RowParallel linears,      tp_dim: the dimension cut (this
                                 the vocabulary-parallel          rank holds slice tp_rank of tp);
                                 embedding and head               the rest: whole on each tp rank
    moe.shard_experts            a rank's experts kept            expert: its number in the layer;
                                                                  expert_dp_rank: which replica
    lora.LoRALinear              adapters added to a weight       theirs, from the weight's

Every cut first names the whole model's parameters (name_whole) if nothing did yet: the pieces cut
from a parameter keep its name, so blocks and experts keep the numbers they have in the whole model.
Whatever needs a placement reads it here, with placement_of, and nothing else: amp.py and zero.py
(which gradients the norm counts), ddp.py and zero.py (what the data-parallel group shares),
reshard.py and stack.build_model (what a tensor is in the whole model: describe). A parameter
no one cut has the default placement: its own name, whole, replicated over every group. (A
placement is an attribute of the parameter: copy.deepcopy, which copies a parameter's values and not
its attributes, drops it: deep-copy a model before cutting it, never after.)

Replication, read from a placement (replicated_over):
  - over the tp group: every parameter tensor parallelism did not cut (a norm's gain, a router):
    the same values and gradient on each tp rank, counted in the gradient norm on tp rank 0 only
    (tp_duplicate);
  - over the dp group: every parameter but an expert-parallel rank's own experts, which the rest
    of its dp group does not hold; those are replicated over the expert-data group (topology.py)
    instead, and the ZeRO gradient norm counts each on its first replica only (ep_duplicate).
tests/test_placement.py builds a tp x pp x ep model and puts the whole one back together from the
placements.
"""
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Placement:
    name: str = None         # the name in the whole model; None: its own name (an uncut model)
    tp: int = 1              # the tensor-parallel group's size, and this rank's place in it
    tp_rank: int = 0
    tp_dim: int = None       # the dimension tp cut (this rank: slice tp_rank of tp); None: whole
    expert: int = None       # expert parallelism: one of this rank's own experts, its number
    expert_dp_rank: int = 0  # ... and which of its replicas (over the expert-data group) this is

    @property
    def expert_parallel(self):
        return self.expert is not None

    @property
    def replicated_over(self):
        """The groups whose ranks all hold this parameter: 'tp', and 'dp' or 'expert_dp'."""
        return ("tp",) * (self.tp > 1 and self.tp_dim is None) + (
            ("expert_dp",) if self.expert_parallel else ("dp",))

    @property
    def tp_duplicate(self):
        """A tp-replicated parameter on a tp rank other than 0: not counted twice in the norm."""
        return self.tp_dim is None and self.tp_rank != 0

    @property
    def ep_duplicate(self):
        """An expert that an earlier replica of its expert-data group counts instead."""
        return self.expert_parallel and self.expert_dp_rank > 0


WHOLE = Placement()


def placement_of(p):
    return getattr(p, "placement", WHOLE)


def set_placement(p, like=None, **fields):
    """Record p's placement: that of `like` (the parameter p was cut from) or p's own so far,
    with `fields` changed. Returns p."""
    p.placement = replace(placement_of(p if like is None else like), **fields)
    return p


def name_whole(model):
    """Before a cut: each parameter of the whole model not yet named gets its name in it."""
    for name, p in model.named_parameters():
        if placement_of(p).name is None:
            set_placement(p, name=name)


def full_name(model, name):
    """The name in the whole model of a parameter of `model` (a pipeline stage, a tp slice, an ep
    rank's experts), or of a layer: its weight's name less `.weight`."""
    try:
        p, suffix = model.get_parameter(name), ""
    except AttributeError:
        p, suffix = model.get_submodule(name).weight, ".weight"
    recorded = placement_of(p).name
    return name if recorded is None else recorded.removesuffix(suffix)


def describe(model):
    """param -> (name in the whole model, full shape, box): the box is [start, length] per
    dimension of the full tensor; a tp slice spans 1/tp of the dimension it was cut along."""
    out = {}
    for name, p in model.named_parameters():
        assert 1 <= p.dim() <= 2, f"{name}: only 1-D and 2-D parameters are described"
        where = placement_of(p)
        shape, box = list(p.shape), [[0, n] for n in p.shape]
        if where.tp_dim is not None and where.tp > 1:
            d = where.tp_dim
            shape[d] *= where.tp
            box[d] = [where.tp_rank * p.shape[d], p.shape[d]]
        out[p] = (where.name or name, shape, box)
    return out
