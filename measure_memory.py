"""measure_memory.py: estimate.py's memory formulas against the bytes a real training step holds.

The idea: a formula for memory is only as good as its match with a real step. Build a small model,
run one mixed-precision AdamW step in one process and count what is held:
    model states      2 Psi of 16-bit weights, 2 Psi of gradients, 12 Psi of fp32 master, momentum
                      and variance (the ZeRO paper's accounting; Rajbhandari et al. 2020)
    activations       the storages still alive after the forward, by the part of the block that
                      made them, against Korthikanti et al. 2022's per layer, in 16 bits:
                      s b h (34 + 5 a s / h) bytes, or 2 s b h with full recomputation
Activations are found without autograd's help: every tensor an operation creates is remembered
weakly (a TorchDispatchMode); after the forward those still alive are what backward needs.

Run: `python measure_memory.py` builds two 2-layer bf16 models (d = 128 and 256), each with SDPA,
naive attention and full recomputation, and prints measured / formula and the bytes per part.
"""
import weakref

import torch
# (torch's own hook below autograd: private, with no public twin)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from amp import DynamicLossScaler, MixedPrecisionOptimizer, cast_model
from estimate import activations_per_layer, zero_table
from flags import OneLineParser
from model import ModelConfig, Transformer


class HeldActivations(TorchDispatchMode):
    """Bytes of activations a forward leaves alive for backward, by the module part that made them.

    Every tensor an operation creates is remembered weakly, with the part (e.g. "attn" of block 1)
    running then; after the forward, the storages still alive are those autograd saved (or, with
    activation checkpointing, the block inputs torch.utils.checkpoint keeps). Each storage counts
    once; parameters (and the transposed views of them that matmuls make) are left out."""

    def __init__(self, model, parts=("attn_norm", "attn", "mlp_norm", "mlp")):
        super().__init__()
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.made, self.part, self.inputs = [], None, {}
        for i, block in enumerate(model.blocks):
            block.register_forward_pre_hook(lambda m, a, i=i: self._input(a[0], i))
            for name in parts:
                mod = getattr(block, name)
                mod.register_forward_pre_hook(lambda *_, tag=(i, name): setattr(self, "part", tag))
                mod.register_forward_hook(lambda *_, tag=(i, None): setattr(self, "part", tag))
            # after a block: outside the blocks (embedding, head, loss)
            block.register_forward_hook(lambda *_: setattr(self, "part", None))

    def _input(self, x, i):
        self.inputs[i] = weakref.ref(x)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.made.append((self.part, weakref.ref(t)))
        return out

    def held(self):
        """{(block, part): bytes} of the storages alive now. None: outside the blocks (embedding,
        head, loss); part None: the residual adds between the parts; "input": the block's input."""
        seen, out = set(self.params), {}
        inputs = {x.untyped_storage().data_ptr(): (i, "input") for i, ref in self.inputs.items()
                  if (x := ref()) is not None}
        for tag, ref in self.made:
            t = ref()
            if t is not None and t.untyped_storage().data_ptr() not in seen:
                key = t.untyped_storage().data_ptr()
                seen.add(key)
                # a block's input kept alive (checkpointing) counts as that block's
                tag = inputs.get(key, tag)
                out[tag] = out.get(tag, 0) + t.untyped_storage().nbytes()
        return out


def measure_step(cfg, s=128, b=2, dtype=torch.bfloat16):
    """One mixed-precision AdamW step in one process: bytes of weights, gradients, optimizer states
    held, and the activations held after the forward per layer (mean over blocks) and per part."""
    torch.manual_seed(0)
    model = cast_model(Transformer(cfg), dtype)
    opt = MixedPrecisionOptimizer([{"params": list(model.parameters())}], torch.optim.AdamW, dtype,
                                  DynamicLossScaler(enabled=False))
    meter = HeldActivations(model)
    x = torch.randint(0, cfg.vocab_size, (b, s + 1), generator=torch.Generator().manual_seed(0))
    with meter:
        _, loss = model(x[:, :-1], x[:, 1:])
    held = meter.held()
    loss.backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    opt.step(1.0)
    states = sum(t.numel() * t.element_size() for m in opt.master_params
                 for t in [m, *[v for v in opt.optimizer.state[m].values() if v.dim() > 0]])
    parts = {}
    for tag, nbytes in held.items():
        if tag is None:
            continue
        part = tag[1]
        parts[part] = parts.get(part, 0) + nbytes / cfg.n_layer
    return {"weights": sum(p.numel() * p.element_size() for p in model.parameters()),
            "gradients": grads, "optimizer states": states,
            "activations per layer": sum(parts.values()), "parts": parts}


def measure(sizes=((2, 128, 4, 384), (2, 256, 4, 768)), s=128, b=2):
    """Measured / formula for each memory component at each model size; printed and returned."""
    rows = []
    for L, d, a, d_ff in sizes:
        for attn, recompute in (("sdpa", "none"), ("naive", "none"), ("sdpa", "full")):
            cfg = ModelConfig(n_layer=L, d_model=d, n_head=a, n_kv_head=a, d_ff=d_ff,
                              vocab_size=256, block_size=s, attn=attn,
                              activation_checkpointing=recompute == "full")
            got = measure_step(cfg, s, b)
            n = sum(p.numel() for p in Transformer(cfg).parameters())
            states = zero_table(n, 1)[0]
            want = {"weights": states["params"], "gradients": states["grads"],
                    "optimizer states": states["optimizer"],
                    "activations per layer": activations_per_layer(s, b, d, a, recompute=recompute)}
            rows.append({"d": d, "a": a, "d_ff": d_ff, "attn": attn, "recompute": recompute,
                         "measured": got, "formula": want,
                         "ratio": {k: got[k] / want[k] for k in want}})
    print(f"Bytes held after one bf16 step (one process; s = {s}, b = {b}, 2 layers, vocab 256), "
          "measured / formula (2 Psi, 2 Psi, 12 Psi; Korthikanti's s b h (34 + 5 a s / h), "
          "2 s b h with full recomputation):")
    print(f"{'d':>4} {'a':>2} {'d_ff':>5} {'attention':>9} {'recompute':>9} {'weights':>8} "
          f"{'grads':>6} {'optim':>6} {'activations/layer':>18}   measured per layer, by part "
          "(x s b h bytes)")
    widths = {"weights": 8, "gradients": 6, "optimizer states": 6, "activations per layer": 18}
    for r in rows:
        sbh = s * b * r["d"]
        parts = ", ".join(f"{k or 'residual'} {v / sbh:.1f}"
                          for k, v in r["measured"]["parts"].items() if v)
        print(f"{r['d']:>4} {r['a']:>2} {r['d_ff']:>5} {r['attn']:>9} {r['recompute']:>9} "
              + " ".join(f"{r['ratio'][k]:>{w}.2f}" for k, w in widths.items())
              + f"   {r['measured']['activations per layer'] / sbh:.1f} = {parts}")
    return rows


if __name__ == "__main__":
    OneLineParser(prog="measure_memory.py", description="Bytes held by one step of small models, "
                  "measured / estimate.py's formulas.").parse_args()
    measure()
