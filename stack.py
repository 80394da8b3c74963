"""stack.py: the parallel stack a run trains on, built in order, from outside the model.

The idea: a plain model.Transformer is turned into this rank's share of a parallel run from outside
it, one step after another, in the order they compose (flags.py checks the flags first): the process
groups (topology.py), the model built on the meta device and cut there (pipeline.py keeps a stage,
tensor_parallel.py a slice, context_parallel.py puts ring attention in every block, moe.py keeps
this rank's experts) before only this rank's pieces are allocated and drawn from one seed
(init.init_values: the values do not depend on the layout), then lora.py wraps layers, amp.py casts,
quantization.py swaps in FP8, and last the data-parallel wrapper and optimizer (ddp.py or zero.py),
AdamW decaying matrices only.

Run: not on its own; pretrain.py, sft.py and scaling.py build their runs with it, and training.py's
loop trains what it returns.
"""
import os

import torch
import torch.distributed as dist

import checkpoint
import context_parallel
import launch
import moe
import pipeline
import placement
import quantization
import tensor_parallel
from amp import DynamicLossScaler, MixedPrecisionOptimizer, cast_model
from ddp import DistributedDataParallel
from flags import uses_cuda
from init import init_values, materialize
from model import Transformer
from topology import Topology
from weights import read_box
from zero import ZeroOptimizer


def setup_distributed(device_flag):
    """torchrun sets RANK, WORLD_SIZE, LOCAL_RANK; without them this is one process. Only reads
    them: the process groups are built after every flag, the data and the model shape have been
    checked. device_flag: --device (auto, cpu, cuda)."""
    rank, world, local = (int(os.environ.get(k, d))
                          for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    use_cuda = uses_cuda(device_flag)
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        # fp32 matmuls (and flash_attn.py's fp32 dots) on tensor cores as TF32: 10-bit mantissa,
        # several times the throughput; torch's default "highest" keeps them in full fp32. bf16/fp16
        # runs are unaffected.
        torch.set_float32_matmul_precision("high")
    return rank, world, device


def build_topology(layout, world, device, dist_timeout):
    if world > 1 and not dist.is_initialized():
        launch.join_process_group(device, dist_timeout)
    return Topology(layout.tp, layout.pp, layout.ep, layout.cp)


def build_model(cfg, topo, seed, device, dtype, sequence_parallel=False, experts=None, weights=None,
                adapt=None, fp8=False):
    """This rank's piece of the model, and nothing more is ever allocated: the whole model (with MoE
    MLPs if asked) is built on the meta device (shapes, no memory), cut there to this pipeline
    stage's blocks, this tensor-parallel rank's slices and this expert-parallel rank's experts, and
    only then are the pieces left allocated on `device` and filled: each from the whole model's
    initial values (init.init_values: drawn by parameter name from `seed`, the same whatever the
    layout), or from `weights` (the whole model's tensors by name, fine-tuning's starting point: a
    memory-mapped state dict or weights.SavedWeights, of which only this rank's blocks are read).
    `experts`: moe.MoEConfig (None: dense). Then `adapt(model)` (LoRA), then the compute precision
    (`fp8`: quantization.py's FP8 linears)."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = moe.with_experts(Transformer(cfg), experts)
    names = {name for name, _ in model.named_parameters()}
    if weights is not None and (extra := sorted(set(weights) - names)):
        raise checkpoint.CheckpointError(f"the weights hold {extra[0]}, which this model has not "
                                         "(another --experts or --moe-layers?)")
    pipeline.keep_stage(model, topo)
    tensor_parallel.parallelize(model, topo, sequence_parallel)
    context_parallel.parallelize(model, topo)  # --cp: ring attention in every block
    moe.keep_experts(model, topo)
    pieces = placement.describe(model)  # meta parameter -> (full name, full shape, box)

    def fill(_, p):
        name, shape, box = pieces[p]
        if weights is None:
            return init_values(name, shape, box, model.init_seed, cfg.n_layer, p.dtype, device)
        return read_box(weights, name, shape, box)

    materialize(model, device, fill)
    model.set_rope_tables(device)
    if adapt is not None:
        adapt(model)
    cast_model(model, dtype)
    if fp8:  # each tp rank scales its own shard: no amax all-reduce
        quantization.use_fp8(model)
    return model


def param_groups(model, weight_decay):
    """Decay matrices (linears, embeddings); never norms' gains: shrinking them towards 0 only
    hurts."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def grad_norm_reduce(topo):
    """The squared gradient norm summed over the tp and pp groups, whose ranks hold distinct pieces
    of the model (amp.global_grad_norm tells the whole story). None when there are none."""
    groups = [getattr(topo, f"{axis}_group") for axis in ("tp", "pp") if getattr(topo, axis, 1) > 1]
    if not groups:
        return None

    def reduce(sq):
        for g in groups:
            dist.all_reduce(sq, group=g)
        return sq
    return reduce


def build_training(model, cfg, dtype, topo):
    """The module to call forward on and its optimizer: plain on one data-parallel rank, ddp.py for
    --zero 0, zero.py's stages otherwise. Every optimizer here has the same methods: zero_grad(),
    scale_loss(loss), step(max_norm) -> (grad_norm, skipped), param_groups,
    checkpoint_pieces()/after_load() (checkpoint.py), scaler, and no_sync() for accumulation
    micro-steps that must not communicate. Only parameters with requires_grad are trained. cfg:
    flags.TrainConfig (its optim, precision and data-parallel settings)."""
    optim, lay = cfg.optim, cfg.layout
    scaler = DynamicLossScaler(enabled=cfg.settings.amp == "fp16")
    groups = param_groups(model, optim.weight_decay)
    # fused on every device: it skips an overflowed step there (found_inf, amp.clip_and_step)
    fused = True

    def make_optimizer(groups):
        return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), fused=fused)

    # The gradient norm for clipping and the fp16 overflow check, the same on every rank:
    # amp.global_grad_norm. Under context parallelism the cp ranks of a replica hold the same
    # weights and different tokens: gradients are averaged, and ZeRO shards, over dp x cp
    # (topo.dp_cp_group, the dp group itself when cp is 1).
    norm_reduce = grad_norm_reduce(topo)
    # 16-bit gradients added up and reduced in fp32 (amp.accumulate_main_grads) unless
    # --grad-reduce-dtype model
    main_grads = cfg.settings.grad_reduce_dtype == "fp32"
    if topo.dp * topo.cp == 1:
        return model, MixedPrecisionOptimizer(groups, make_optimizer, dtype, scaler, norm_reduce,
                                              main_grads=main_grads)
    if lay.zero == 0:
        ddp = DistributedDataParallel(model, topo.dp_cp_group, lay.bucket_mb, main_grads)
        expert_reduce = None
        if topo.ep > 1:
            def expert_reduce(sq):
                dist.all_reduce(sq, group=topo.ep_group)
                return sq
        return ddp, MixedPrecisionOptimizer(groups, make_optimizer, dtype, scaler, norm_reduce,
                                            no_sync=ddp.no_sync,
                                            expert_norm_reduce_fn=expert_reduce,
                                            main_grads=main_grads)
    opt = ZeroOptimizer(model, groups, make_optimizer, scaler, topo.dp_cp_group, lay.zero,
                        lay.bucket_mb, norm_reduce_fn=norm_reduce, main_grads=main_grads)
    return opt.module, opt
