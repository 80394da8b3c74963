"""init.py: initial values drawn by parameter name, so that any piece of a model can be drawn alone.

The idea: every parameter is drawn from its own generators, seeded by (the model's seed, its name in
the whole model, the block of rows): a pipeline stage, a tensor-parallel slice or an expert-parallel
rank's experts can be drawn on their own, equal to the same part of the whole model's.
stack.build_model builds this rank's pieces on the meta device; materialize then allocates only
them and fills each with init_values of its box.

The values (init_rule): ones for the norms' gains; N(0, 0.02) for embeddings and linears, with
GPT-2's scaled init std 0.02 / sqrt(2L) for each residual branch's output projection;
U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for moe.py's routers and experts. One generator draws about
ELEMENTS_PER_DRAW values (whole rows): a slice of rows costs its rows, a slice of columns one block
of rows at a time.

No demo of its own: model.Transformer draws itself this way, and tests/test_meta_build.py checks
that every layout's pieces equal the whole model's, and that no rank holds more than its share.
"""
import hashlib
import math

import torch
import torch.nn as nn


ELEMENTS_PER_DRAW = 1 << 20  # about this many values per generator: whole rows, at least one


def init_seed():
    """The model's seed: one draw from torch's global generator (torch.manual_seed repeats it)."""
    return int(torch.randint(0, 2 ** 62, (), device="cpu"))


def whole(shape):
    """The box ([start, length] per dimension) that covers a whole tensor."""
    return [[0, n] for n in shape]


def init_rule(name, shape, n_layer):
    """(kind, scale) of a parameter's initial values, from its name in the whole model: ones for the
    norms' gains; N(0, 0.02) for embeddings and linears, with GPT-2's scaled init for each residual
    branch's output projection (attn.wo, mlp.w2: std 0.02 / sqrt(2L), so the residual stream's
    variance does not grow with depth); moe.py's routers and experts keep torch's default for a
    linear, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    if len(shape) == 1:
        return "ones", 1.0
    if ".experts." in name or ".router." in name:
        return "uniform", 1 / math.sqrt(shape[1])
    if name.endswith(("attn.wo.weight", "mlp.w2.weight")):
        return "normal", 0.02 / math.sqrt(2 * n_layer)
    return "normal", 0.02


def draw_seed(seed, name, block):
    digest = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@torch.no_grad()
def init_values(name, shape, box, seed, n_layer, dtype=None, device=None):
    """Rows and columns `box` ([start, length] per dimension) of the full parameter `name` (of
    `shape`), as the whole model's init draws them. Only the blocks of rows the box meets are drawn,
    one at a time: a slice of rows costs its rows, a slice of columns a block of rows at a time."""
    out = torch.empty([n for _, n in box], dtype=dtype, device=device)
    kind, scale = init_rule(name, shape, n_layer)
    if kind == "ones":
        return out.fill_(1.0)
    (r0, h), (c0, w) = box
    rows = max(1, ELEMENTS_PER_DRAW // shape[1])
    for start in range(r0 // rows * rows, r0 + h, rows):
        g = torch.Generator(device=out.device).manual_seed(draw_seed(seed, name, start // rows))
        block = torch.empty(min(rows, shape[0] - start), shape[1], dtype=out.dtype,
                            device=out.device)
        if kind == "normal":
            block.normal_(0.0, scale, generator=g)
        else:
            block.uniform_(-scale, scale, generator=g)
        lo, hi = max(start, r0), min(start + rows, r0 + h)
        out[lo - r0:hi - r0] = block[lo - start:hi - start, c0:c0 + w]
    return out


@torch.no_grad()
def materialize(module, device, fill):
    """Every parameter of `module` still on the meta device becomes a real one on `device`, holding
    fill(name, meta parameter): a new tensor of its shape, not a view of another one (it becomes the
    parameter); what parallel files marked on a parameter stays on it."""
    done = {}
    for prefix, m in module.named_modules():
        for key, p in m._parameters.items():
            if p is None or not p.is_meta:
                continue
            if p not in done:
                name = f"{prefix}.{key}" if prefix else key
                values = fill(name, p).to(device=device, dtype=p.dtype)
                fits = values.shape == p.shape and values.is_contiguous()
                assert fits, f"{name}: {values.shape}"
                new = nn.Parameter(values, p.requires_grad)
                new.__dict__.update(p.__dict__)
                done[p] = new
            m._parameters[key] = done[p]
    return module
