"""lora.py: low-rank adaptation: freeze the model, learn W + (alpha/r) B A in chosen linear layers.

The idea (Hu et al., 2021): the update a fine-tune makes to a d_out x d_in weight has low rank, so
learn it as a product B A of a d_out x r and an r x d_in matrix, r << d, and leave W frozen:

    y = x W^T + (alpha / r) * dropout(x) A^T B^T
    A ~ Kaiming-uniform, B = 0, so at step 0 y = x W^T

Trainable parameters per adapted layer: r (d_in + d_out) instead of d_in d_out. Every other
parameter (embeddings, norms, head, the frozen W) has requires_grad False, so it gets no gradient
and no optimizer state: Adam's 8 bytes per trainable parameter (momentum and variance, fp32), plus 4
of fp32 master weights in mixed precision, are paid only for the adapters. Scaling by alpha/r keeps
the update's size roughly independent of r, so the learning rate need not change with it. After
training, W + (alpha/r) B A is merged into W: the exported model is a plain Transformer with no
extra cost at inference.

The adapters are saved on their own (`save_adapter`: a few KB to MB, with the rank, targets and the
base model's config), loadable onto the same base (`load_adapter`), and mergeable (`merge_lora`).
Targets are the names of the linears inside the blocks: wq wk wv wo (attention), w1 w2 w3 (SwiGLU,
also inside MoE experts). Under ZeRO only the adapters reach the optimizer, so only they are sharded
(ZeRO-3 included: the frozen base stays whole on each data-parallel rank and carries no optimizer
state). On a tensor-parallel layer (tensor_parallel.py) the adapter is split to match it
(LoRALinear): column-parallel W_i -> A whole, B_i; row-parallel W_i -> A_i, B whole; per rank r
(d_in + d_out / tp) or r (d_in / tp + d_out) parameters. Saving gathers the adapters whole, under
their names in the whole model, whatever the layout (`lora_state_dict`).

Demo: `python lora.py` adapts the tiny model, shows the trainable count, that step 0 and the merged
model reproduce the adapted logits, and measures optimizer-state bytes with LoRA against full
fine-tuning. `torchrun --nproc_per_node 2 lora.py` adapts the tiny model's tensor-parallel slices:
step 0 equals the base, the ranks' adapters add up to r (d_in + d_out) per layer, and after 5 steps
the adapters, gathered whole and merged into the one-process model, reproduce the tensor-parallel
logits.
"""
import math
import os
import pickle
import zlib

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from placement import full_name, placement_of, set_placement
from tensor_parallel import ColumnParallelLinear, CopyToTensorParallel, RowParallelLinear

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


class LoRAError(ValueError):
    """Bad LoRA settings or adapter file: the message is the one line the user sees."""


class LoRALinear(nn.Module):
    """A frozen linear plus a trainable low-rank update. It keeps the base layer's `weight` under
    the same name, so a base checkpoint's keys (`...wq.weight`) still load into an adapted model.

    The base may be a tensor-parallel layer (tensor_parallel.py). Column-parallel (W split by output
    rows): A stays whole and B is split by output rows like W, so B_i A is rank i's rows of B A.
    Row-parallel (W split by input columns): A is split by input columns like W and B stays whole,
    and the update is added before the layer's reduction, which sums sum_i (x_i A_i^T) B^T = (x A^T)
    B^T. The layer's own f and g (its enter and leave) carry the activations' communication; the
    whole factor (A, or B) is used by every rank with a different partner slice, so its gradient is
    a partial sum: it passes through f, whose backward all-reduces it over the tp group (as a
    sequence-parallel norm's gain does)."""

    def __init__(self, base, r, alpha, dropout=0.0, generator=None):
        super().__init__()
        if getattr(base, "bias", None) is not None:
            raise LoRAError("LoRA here wraps bias-free linears only (model.py has none)")
        self.kind = {ColumnParallelLinear: "column",
                     RowParallelLinear: "row"}.get(type(base), "linear")
        self.group = getattr(base, "group", None) if self.kind != "linear" else None
        tp, rank = (dist.get_world_size(self.group),
                    dist.get_rank(self.group)) if self.group else (1, 0)
        out_local, in_local = base.weight.shape
        self.in_features = in_local * (tp if self.kind == "row" else 1)
        self.out_features = out_local * (tp if self.kind == "column" else 1)
        # the layer's f (column) or nothing; its g (row), the head's gather, or nothing
        self.enter = getattr(base, "enter", lambda x: x)
        self.leave = getattr(base, "leave", lambda y: y)
        # (not a submodule: its weight is this module's; merging puts it back)
        self.__dict__["base"] = base
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        kw = {"dtype": base.weight.dtype, "device": base.weight.device}
        # A as nn.Linear initialises its weight (Kaiming-uniform, a = sqrt 5), whole on every rank
        # from the same generator, then sliced; B = 0 makes B A = 0 at the start.
        A = torch.empty(r, self.in_features, **kw)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(self.local(A, "A", tp, rank))
        self.lora_B = nn.Parameter(self.local(torch.zeros(self.out_features, r, **kw),
                                              "B", tp, rank))
        # The factors live where the weight does (placement.py: its tp rank, its expert), named
        # after it; the one split, B (column) or A (row), along the weight's cut, the other whole.
        stem = placement_of(self.weight).name
        for which, factor in (("A", self.lora_A), ("B", self.lora_B)):
            cut = {("column", "B"): 0, ("row", "A"): 1}.get((self.kind, which))
            set_placement(factor, like=self.weight, tp_dim=cut,
                          name=stem and f"{stem.removesuffix('.weight')}.lora_{which}")
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def local(self, full, which, tp, rank):
        """This rank's piece of a whole A or B: B's rows (column-parallel) or A's columns (row)."""
        if (self.kind, which) == ("column", "B"):
            return full.chunk(tp, 0)[rank].clone()
        if (self.kind, which) == ("row", "A"):
            return full.chunk(tp, 1)[rank].clone()
        return full.clone()

    def shared(self, p):
        """f on the factor each tp rank holds whole: identity forward, gradient all-reduced."""
        return CopyToTensorParallel.apply(p, self.group) if self.group is not None else p

    def forward(self, x):
        h = self.enter(x)
        A, B = self.lora_A, self.lora_B
        if self.kind == "column":
            A = self.shared(A)
        elif self.kind == "row":
            B = self.shared(B)
        # (h A^T) B^T: two thin matmuls, never the d_out x d_in product B A. Under tensor
        # parallelism every rank draws the same dropout mask: their random streams are in lockstep
        # (same seed, same operations).
        y = F.linear(h, self.weight) + F.linear(F.linear(self.dropout(h), A), B) * self.scaling
        return self.leave(y)

    def delta(self):
        """This rank's part of the dense update (alpha/r) B A, for merging: its weight's shape."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def extra_repr(self):
        return (f"{self.in_features} -> {self.out_features} ({self.kind}), r={self.r}, "
                f"alpha={self.alpha}")


def parse_targets(spec):
    targets = (tuple(t.strip() for t in spec.split(",") if t.strip()) if isinstance(spec, str)
               else tuple(spec))
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise LoRAError(f"--lora-targets {spec if isinstance(spec, str) else ','.join(spec)}: "
                        f"{', '.join(bad) or 'nothing'} is not a linear of the blocks; choose "
                        f"from {','.join(TARGETS)}")
    return targets


def check_settings(r, alpha, dropout):
    if r < 1:
        raise LoRAError(f"--lora-r must be at least 1, got {r}")
    if alpha <= 0:
        raise LoRAError(f"--lora-alpha must be > 0, got {alpha}")
    if not 0 <= dropout < 1:
        raise LoRAError(f"--lora-dropout must be in [0, 1), got {dropout}")


def check_rank(cfg, r, targets):
    """A rank above a layer's smaller side is not low-rank (B A could be any matrix, at a cost)."""
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    shapes = {"wq": (cfg.d_model, q), "wk": (cfg.d_model, kv), "wv": (cfg.d_model, kv),
              "wo": (q, cfg.d_model), "w1": (cfg.d_model, cfg.d_ff), "w3": (cfg.d_model, cfg.d_ff),
              "w2": (cfg.d_ff, cfg.d_model)}
    for t in parse_targets(targets):
        if r > min(shapes[t]):
            raise LoRAError(f"--lora-r {r} is larger than {t}'s smaller side ({shapes[t][0]} -> "
                            f"{shapes[t][1]}): choose --lora-r <= "
                            f"{min(min(shapes[u]) for u in parse_targets(targets))}")


def apply_lora(model, r=8, alpha=16.0, dropout=0.0, targets=("wq", "wv"), seed=0):
    """Freeze every parameter of `model`, then wrap each linear (plain or tensor-parallel) whose
    name is in `targets` (the last part of its module path) in a LoRALinear. Each layer's A is drawn
    from a generator seeded by (seed, its name in the whole model), so the adapters do not depend on
    the layout. Returns the adapted layers' names. Works on the model (or this rank's piece of it)
    in place."""
    check_settings(r, alpha, dropout)
    targets = parse_targets(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in targets and isinstance(child, (nn.Linear, ColumnParallelLinear,
                                                            RowParallelLinear)):
                name = f"{parent_name}.{child_name}" if parent_name else child_name
                # (seed and name in one 32-bit number: a CPU generator keeps only the low 32 bits of
                # its seed)
                g = torch.Generator(device=child.weight.device).manual_seed(
                    zlib.crc32(f"{seed}:{full_name(model, name)}".encode()))
                layer = LoRALinear(child, r, alpha, dropout, g)
                if r > min(layer.in_features, layer.out_features):
                    raise LoRAError(f"--lora-r {r} is larger than {name}'s smaller side "
                                    f"({layer.in_features} -> {layer.out_features})")
                setattr(parent, child_name, layer)
                wrapped.append(name)
    if not wrapped:
        raise LoRAError(f"--lora-targets {','.join(targets)}: no linear of that name in the model")
    model.lora_config = {"r": r, "alpha": alpha, "dropout": dropout, "targets": list(targets)}
    return wrapped


def lora_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def count_trainable(model):
    """(trainable, total) parameters of this rank, and the expected trainable count r (d_in + d_out)
    summed over layers, whole: over tp ranks, the trainable parameters that are not another rank's
    copy add up to it."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    expected = sum(m.r * (m.in_features + m.out_features) for _, m in lora_layers(model))
    return trainable, total, expected


def describe(model):
    trainable, total, _ = count_trainable(model)
    layers = lora_layers(model)
    c = model.lora_config
    return (f"LoRA r={c['r']} alpha={c['alpha']:g} on {','.join(c['targets'])} ({len(layers)} "
            f"layers): {trainable:,} trainable of {total:,} parameters ({trainable / total:.2%})")


def _gather(t, dim, group):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def lora_state_dict(model, topo=None):
    """Only the adapters, whole and by their names in the whole model: tensor-parallel slices
    concatenated, pipeline stages and expert-parallel ranks' layers merged. A collective under a
    layout: every rank calls it (under ZeRO-3, inside the optimizer's gathered())."""
    out = {}
    for name, m in lora_layers(model):
        A, B = m.lora_A.detach(), m.lora_B.detach()
        if m.kind == "column" and m.group is not None:
            B = _gather(B, 0, m.group)
        if m.kind == "row" and m.group is not None:
            A = _gather(A, 1, m.group)
        full = full_name(model, name)
        out[f"{full}.lora_A"], out[f"{full}.lora_B"] = A.cpu().clone(), B.cpu().clone()
    for axis in ("pp", "ep"):
        if topo is not None and getattr(topo, axis) > 1:
            parts = [None] * getattr(topo, axis)
            dist.all_gather_object(parts, out, group=getattr(topo, f"{axis}_group"))
            out = {k: v for part in parts for k, v in part.items()}
    return out


def save_adapter(path, model, model_config, topo=None):
    """Rank 0 saves the whole adapters, LoRA and model configs (a collective under a layout)."""
    adapter = lora_state_dict(model, topo)
    if topo is None or topo.rank == 0:
        torch.save({"lora_config": model.lora_config, "model_config": model_config,
                    "adapter": adapter}, path)


def load_adapter(model, path, model_config):
    """Wrap a plain (or sliced) base model as the adapter file says and load its A and B (this
    rank's slices). The adapter must have been trained on a model of the same config: another shape
    would not load, and another base would not mean the same thing even if it did."""
    # weights_only: tensors and plain values; a file that would run code when unpickled is refused
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        lora_config, adapter = saved["lora_config"], saved["adapter"]
    except FileNotFoundError:
        raise LoRAError(f"--adapter {path}: no such file") from None
    except pickle.UnpicklingError:
        raise LoRAError(f"--adapter {path} holds pickled objects other than tensors and plain "
                        "values: not loaded, as unpickling them could run code") from None
    except Exception as e:
        raise LoRAError(f"--adapter {path}: not an adapter file ({type(e).__name__})") from None
    if saved["model_config"] != model_config:
        diff = sorted(k for k in model_config if saved["model_config"].get(k) != model_config[k])
        raise LoRAError(f"--adapter {path} was trained on another model config "
                        f"(differs in {', '.join(diff)})")
    if not lora_layers(model):
        apply_lora(model, lora_config["r"], lora_config["alpha"], lora_config["dropout"],
                   lora_config["targets"])
    elif model.lora_config != lora_config:
        raise LoRAError(f"--adapter {path} has LoRA settings {lora_config}, the model "
                        f"{model.lora_config}")
    layers = lora_layers(model)
    missing = sorted({f"{full_name(model, n)}.lora_{w}" for n, _ in layers for w in "AB"}
                     - set(adapter))
    if missing:
        raise LoRAError(f"--adapter {path} does not fit the model "
                        f"(missing {', '.join(missing[:2])})")
    with torch.no_grad():
        for n, m in layers:
            tp, rank = (dist.get_world_size(m.group), dist.get_rank(m.group)) if m.group else (1, 0)
            for w in "AB":
                getattr(m, f"lora_{w}").copy_(m.local(adapter[f"{full_name(model, n)}.lora_{w}"],
                                                      w, tp, rank))
    return model


@torch.no_grad()
def merge_lora(model):
    """Fold W + (alpha/r) B A into the base layer in place of every LoRALinear (each rank its own
    slice): the original structure and state-dict keys, no adapter cost at inference. The merged
    weights are trainable again, as in the base."""
    for name, m in lora_layers(model):
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        m.base.weight.data = m.weight + m.delta().to(m.weight.dtype)
        setattr(parent, child_name, m.base)
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


@torch.no_grad()
def merged_state_dict(model, base=None, adapter=None):
    """The state dict merge_lora's model would have, leaving `model` as it is (adapted, still
    training); or, given a whole base state dict and whole adapters (lora_state_dict), the whole
    merged model's, whatever the layout the adapters were trained on."""
    if base is None:
        sd = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
        for name, m in lora_layers(model):
            sd[f"{name}.weight"] = m.weight + m.delta().to(m.weight.dtype)
        return sd
    sd, scaling = dict(base), model.lora_config["alpha"] / model.lora_config["r"]
    for k in adapter:
        if k.endswith(".lora_A"):
            layer = k[:-len(".lora_A")]
            w = sd[f"{layer}.weight"]
            sd[f"{layer}.weight"] = w + (adapter[f"{layer}.lora_B"] @ adapter[k]
                                         * scaling).to(w.dtype)
    return sd


def optimizer_state_bytes(optimizer):
    """Bytes of an optimizer's state (Adam: exp_avg and exp_avg_sq per parameter, a step scalar)."""
    # amp.MixedPrecisionOptimizer wraps the torch one
    inner = getattr(optimizer, "optimizer", optimizer)
    return sum(t.numel() * t.element_size() for s in inner.state.values() for t in s.values()
               if torch.is_tensor(t))


def demo_tensor_parallel():
    """torchrun --nproc_per_node 2 lora.py: adapters on tp ranks (float64) against one process."""
    from model import PRESETS, Transformer
    from tensor_parallel import parallelize, set_gather_output
    from topology import Topology, end_process_group
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    topo = Topology(tp=dist.get_world_size())
    cfg = PRESETS["tiny"]
    idx = torch.randint(0, cfg.vocab_size, (4, 65), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    whole = Transformer(cfg).double()
    torch.manual_seed(0)
    sliced = parallelize(Transformer(cfg).double(), topo)
    set_gather_output(sliced, True)
    base_logits = sliced(idx[:, :-1])[0]
    apply_lora(sliced, r=8, alpha=16, targets=TARGETS)
    own = torch.tensor(float(sum(p.numel() for p in sliced.parameters() if p.requires_grad
                                 and not placement_of(p).tp_duplicate)))
    dist.all_reduce(own, group=topo.tp_group)
    step0 = (sliced(idx[:, :-1])[0] - base_logits).abs().max().item()
    opt = torch.optim.AdamW([p for p in sliced.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):
        sliced(idx[:, :-1], idx[:, 1:])[1].backward()
        opt.step()
        opt.zero_grad()
    merged = whole
    merged.load_state_dict(merged_state_dict(sliced, whole.state_dict(),
                                             lora_state_dict(sliced, topo)))
    diff = (merged(idx[:, :-1])[0] - sliced(idx[:, :-1])[0]).abs().max().item()
    if topo.rank == 0:
        print(f"tp {topo.tp}: {describe(sliced)} on rank 0 | over the ranks, one copy of each "
              f"whole factor: {int(own.item()):,} = r (d_in + d_out) summed over layers "
              f"{count_trainable(sliced)[2]:,}")
        print(f"step 0, max |adapted - base| logits: {step0:.1e} | after 5 steps, the adapters "
              "gathered whole and merged into the one-process model: max |merged - adapted| "
              f"logits {diff:.1e}")
    end_process_group()


if __name__ == "__main__" and int(os.environ.get("WORLD_SIZE", 1)) > 1:
    demo_tensor_parallel()
elif __name__ == "__main__":
    import copy

    from model import PRESETS, Transformer
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    base = Transformer(cfg).double()
    idx = torch.randint(0, cfg.vocab_size, (4, 65))
    x, y = idx[:, :-1], idx[:, 1:]
    adapted = copy.deepcopy(base)
    apply_lora(adapted, r=8, alpha=16, targets=TARGETS)
    trainable, total, expected = count_trainable(adapted)
    print(describe(adapted), f"| r (d_in + d_out) summed over layers = {expected:,}")
    print("step 0, max |adapted - base| logits:", (adapted(x)[0] - base(x)[0]).abs().max().item())

    states = {}
    for name, model in (("full fine-tuning", copy.deepcopy(base).float()),
                        ("LoRA", adapted.float())):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(5):
            model(x, y)[1].backward()
            opt.step()
            opt.zero_grad()
        states[name] = optimizer_state_bytes(opt)
        print(f"{name:>16}: {sum(p.numel() for p in model.parameters() if p.requires_grad):>9,} "
              f"trainable, AdamW state {states[name]:>10,} bytes")
    print(f"optimizer state, LoRA / full: {states['LoRA'] / states['full fine-tuning']:.3%}")
    adapted_logits = adapted(x)[0]
    print("after 5 steps, max |merged - adapted| logits:",
          (merge_lora(adapted)(x)[0] - adapted_logits).abs().max().item())
