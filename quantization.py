"""quantization.py: FP8 matmuls for training, INT8 weights for inference, each measured against
bf16.

Number formats, as the demo prints them from torch.finfo / torch.iinfo (a float with e exponent bits
and m mantissa bits has epsilon 2^-m, the spacing of numbers just above 1, and rounds to nearest
with a relative error of at most u = 2^-(m+1) inside its normal range):

    format      bits  exponent  mantissa  largest        smallest normal  epsilon
    fp32        32    8         23        3.4e38         1.2e-38          1.2e-7
    bf16        16    8         7         3.4e38         1.2e-38          7.8e-3
    fp16        16    5         10        65504          6.1e-5           9.8e-4
    fp8 e4m3    8     4         3         448            1.6e-2           0.125
    fp8 e5m2    8     5         2         57344          6.1e-5           0.25
    int8        8     -         -         127            (step 1)         -

FP8 training (Micikevicius et al., 2022, "FP8 Formats for Deep Learning"): the three matmuls of a
linear layer run on 8-bit inputs with fp32 accumulation, everything else stays in bf16 with fp32
master weights (amp.py):
    forward    Y  = X W^T      X, W in E4M3 (more mantissa: activations and weights need precision)
    backward   dX = dY W       dY in E5M2 (more exponent: gradients span a wider range), W in E4M3
               dW = dY^T X     dY in E5M2, X in E4M3
Eight bits hold only 2^4 or 2^5 binades, so each tensor is multiplied by a scale s before the cast
and the
product by 1/(s_a s_b) after it: s = the largest power of two with amax(|T|) s <= max of the format. A power of
two makes scaling exact (only the cast rounds) at the price of up to one binade of the format left
unused. On an H100 FP8 doubles the dense tensor-core rate of bf16 (1,979 vs 989 TFLOP/s, datasheet)
and halves the bytes a matmul reads.

Current vs delayed scaling. Current scaling (here) takes amax from the tensor about to be cast:
always fits, never overflows, but costs one extra read of the tensor (a reduction over it) before
the cast can start, plus, where the scale must agree across ranks, an all-reduce of one scalar.
Delayed scaling (Transformer Engine's DelayedScaling) uses the largest amax seen over the last
steps' history, recorded while casting: no extra pass and no wait, but a tensor that grows faster
than its history saturates at the format's maximum, and the histories are state to keep (and
checkpoint) per tensor.

Composition. The FP8 matmul replaces F.linear inside each layer: nn.Linear is swapped for Fp8Linear
(same Parameter, same state-dict key), and tensor_parallel.py's layers call `linear_fn`, which
use_fp8 points at fp8_linear, so the f and g collectives stay where they were. DDP and ZeRO see bf16
parameters and gradients as before (ZeRO-3 gathers the whole weight before the forward, so its amax
is the whole weight's). Under tensor parallelism each rank scales its own shard (no communication: a
shard's amax is at most the whole tensor's, so its scale is at least as fine); `amax_group=tp_group`
all-reduces the amaxes (MAX) instead, which makes the quantized values those of one process
(tests/test_quantization.py checks that parity). With power-of-two scales the choice matters less
than it seems: an entry in the normal range rounds to the same mantissa whatever the scale, so
per-shard and whole-tensor scales differ only in the entries that fall below the smallest normal. On
CUDA, _scaled_mm takes its first operand row-major and its second column-major (hence the transposed
copies in the backward), the summed dimension K and the output's columns N multiples of 16: fp8_mm
pads them with zeros (exact), since the weight gradient sums over a micro-batch's tokens, whatever
their count.

INT8 weight-only post-training quantization (the weights' vector-wise scaling of LLM.int8, Dettmers
et al., 2022, without its fp16 path for outlier features): each row (output channel) j of a trained
weight gets
s_j = max|W_j| / 127, and W_j is stored as round(W_j / s_j) in int8: 1 byte per weight instead of 2, error at most
s_j / 2 per entry; y = (x q^T) s_j, done by torch._weight_int8pack_mm on the CPU. Decoding one token
at a time (with a KV cache) reads every weight for 2 FLOPs each, so it is bound by memory traffic,
which int8 halves; a matmul over many rows is bound by compute, where weight-only int8 buys nothing.

Demo: `python quantization.py` prints the format table, the FP8 linear's measured errors against
their bound, a few training steps in bf16 and in FP8, and INT8's matmul speed against bf16 for 1 and
64 rows. `python quantization.py eval CKPT` quantizes a trained checkpoint (pretrain.py's --out
folder) to INT8 and reports its validation loss, size and generation speed beside bf16.
"""
import argparse
import functools
import math
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# (getattr: on a torch without FP8 dtypes this file still imports, and --amp fp8 is refused in one
# line)
E4M3, E5M2 = getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)
AMAX_FLOOR = 1e-30  # an all-zero tensor still gets a finite scale (fp8 max / 1e-30 fits fp32)
# torch._scaled_mm on CUDA: K and both dimensions of the second operand multiples of 16
FP8_MULTIPLE = 16


# ----------------------------------------------------------------------------- formats
def format_table():
    """(name, bits, exponent bits, mantissa bits, largest, smallest normal, epsilon) from
    torch.finfo/iinfo: the mantissa has -log2(eps) bits, the exponent what is left after the
    sign."""
    rows = []
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16),
                        ("fp8 e4m3", E4M3), ("fp8 e5m2", E5M2)):
        fi = torch.finfo(dtype)
        mant = round(-math.log2(fi.eps))
        rows.append((name, fi.bits, fi.bits - 1 - mant, mant, fi.max, fi.tiny, fi.eps))
    ii = torch.iinfo(torch.int8)
    rows.append(("int8", ii.bits, None, None, ii.max, None, None))
    return rows


def unit_roundoff(dtype):
    """u = eps / 2: the largest relative error of rounding to nearest in the normal range."""
    return torch.finfo(dtype).eps / 2


# -------------------------------------------------------------------------- FP8 scaling and matmuls
def fp8_scale(amax, fp8_dtype):
    """The largest power of two s with amax * s <= the format's max (fp32 scalar tensor)."""
    fmax = torch.finfo(fp8_dtype).max
    return torch.exp2(torch.floor(torch.log2(fmax / amax.float().clamp(min=AMAX_FLOOR))))


def to_fp8(t, fp8_dtype, amax_group=None):
    """Current scaling: (t * s cast to fp8, 1/s). With amax_group the amax is the maximum over its
    ranks."""
    # (an MoE expert may get no rows: max() of nothing is an error, its amax 0)
    amax = t.detach().abs().max().float() if t.numel() else torch.zeros((), device=t.device)
    if amax_group is not None and dist.get_world_size(amax_group) > 1:
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=amax_group)
    scale = fp8_scale(amax, fp8_dtype)
    fmax = torch.finfo(fp8_dtype).max
    # The clamp guards log2's rounding at an exact power of two, and makes saturation explicit: the
    # casts differ past the largest value (on this CPU build E4M3 saturates to 448 but E5M2 turns
    # into inf).
    return (t.float() * scale).clamp(-fmax, fmax).to(fp8_dtype), scale.reciprocal()


def _padded(t, rows, cols):
    """t (contiguous) with zero rows and columns appended up to rows x cols."""
    if t.shape == (rows, cols):
        return t.contiguous()
    out = t.new_zeros(rows, cols)  # (filled and copied into: every fp8 op a CUDA build has)
    out[:t.shape[0], :t.shape[1]] = t
    return out


def fp8_mm(a, b, a_inv, b_inv, out_dtype):
    """a b^T (a: M x K, b: N x K, both FP8, scales 1/s) through torch._scaled_mm under CUDA's rules
    (cuBLASLt): the first operand row-major, the second column-major, K and N multiples of 16; M,
    the rows, anything, 0 included. K and N are padded with zeros, which add nothing to the sums
    (the scales were taken before), and the padded columns of the result dropped. So any
    micro-batch's token count (the K of the weight gradient: padded SFT rows, a context-parallel
    chunk, an MoE expert's 7 or 0 rows) and any tensor-parallel slice (a vocabulary of 320 at tp 8:
    N = 40) run; a copy only where a dimension is ragged."""
    (m, k), n = a.shape, b.shape[0]
    kp, np_ = -(-k // FP8_MULTIPLE) * FP8_MULTIPLE, -(-n // FP8_MULTIPLE) * FP8_MULTIPLE
    y = torch._scaled_mm(_padded(a, m, kp), _padded(b, np_, kp).t(), scale_a=a_inv, scale_b=b_inv,
                         out_dtype=out_dtype)
    return y if np_ == n else y[:, :n].contiguous()


class Fp8Matmul(torch.autograd.Function):
    """Y = X W^T with X, W in E4M3; dX = dY W and dW = dY^T X with dY in E5M2; fp32 accumulation,
    outputs in the input's dtype. Saves the 8-bit X and W for the backward (half the bytes of bf16
    activations)."""

    @staticmethod
    def forward(ctx, x, weight, amax_group):
        x2 = x.reshape(-1, x.shape[-1])
        xq, x_inv = to_fp8(x2, E4M3, amax_group)
        wq, w_inv = to_fp8(weight, E4M3, amax_group)
        y = fp8_mm(xq, wq, x_inv, w_inv, x.dtype)
        ctx.save_for_backward(xq, x_inv, wq, w_inv)
        ctx.amax_group, ctx.x_shape, ctx.w_dtype = amax_group, x.shape, weight.dtype
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        xq, x_inv, wq, w_inv = ctx.saved_tensors
        g2 = grad_y.reshape(-1, grad_y.shape[-1])
        gq, g_inv = to_fp8(g2, E5M2, ctx.amax_group)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = fp8_mm(gq, wq.t(), g_inv, w_inv, grad_y.dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:  # a sum over the tokens: K is the micro-batch's token count
            grad_w = fp8_mm(gq.t(), xq.t(), g_inv, x_inv, ctx.w_dtype)
        return grad_x, grad_w, None


def fp8_linear(x, weight, bias=None, amax_group=None):
    """A drop-in for F.linear whose three matmuls run in FP8 (inputs of dtype fp32, bf16 or
    fp16)."""
    y = Fp8Matmul.apply(x, weight, amax_group)
    return y if bias is None else y + bias


class Fp8Linear(nn.Module):
    """nn.Linear's parameters (the same tensors, under the same names), fp8_linear's matmuls."""

    def __init__(self, linear: nn.Linear, amax_group=None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self.amax_group = amax_group

    def forward(self, x):
        return fp8_linear(x, self.weight, self.bias, self.amax_group)

    def extra_repr(self):
        return f"{self.in_features} -> {self.out_features}, fp8 (e4m3 forward, e5m2 gradients)"


def use_fp8(model, amax_group=None):
    """Every linear layer's matmuls in FP8: nn.Linear swapped for Fp8Linear; layers that call
    `linear_fn` for their matmul (tensor_parallel.py's) pointed at fp8_linear. Returns the number of
    layers changed. An MoE router (moe.py) stays in bf16: its logits pick experts, a discrete choice
    that 8-bit noise would flip (DeepSeek-V3 keeps its gating in higher precision too), and its E
    outputs are rarely a multiple of 16."""
    changed = 0
    for module in list(model.modules()):
        if hasattr(module, "linear_fn"):
            module.linear_fn = functools.partial(fp8_linear, amax_group=amax_group)
            changed += 1
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and name != "router":
                setattr(module, name, Fp8Linear(child, amax_group))
                changed += 1
    return changed


def fp8_unsupported(device):
    """None where torch._scaled_mm runs on `device`, else the one line that refuses --amp fp8."""
    why = None
    if not hasattr(torch, "_scaled_mm") or E4M3 is None:
        why = "this torch has no FP8 matmul (torch._scaled_mm)"
    else:
        try:
            a = torch.zeros(16, 16, device=device).to(E4M3)
            one = torch.ones((), device=device)
            torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        except (RuntimeError, NotImplementedError) as e:
            why = f"torch._scaled_mm does not run on {device} ({str(e).splitlines()[0][:80]})"
    return None if why is None else (f"--amp fp8: {why} (torch {torch.__version__}); use --amp "
                                     "bf16, or a torch and device where it runs (this CPU build "
                                     "of torch 2.13, H100-class GPUs)")


def matmul_error_bound(a, b, fmt_a, fmt_b, out_dtype):
    """Entrywise bound on |fp8 result - exact a b^T| (float64) when a is cast to fmt_a and b to fmt_b with
    to_fp8's scales. Each entry of a is off by at most e_a = u_a (|a| + tiny_a / s_a) (relative error u in the
    normal range, half a subnormal step below it), so |a' b'^T - a b^T| <= e_a (|b| + e_b)^T + |a| e_b^T; then
    fp32 accumulation (K u_fp32 of the sum of |products|) and the output's rounding (u_out)."""
    a, b = a.double(), b.double()

    def entry_error(t, fmt):
        s = fp8_scale(t.abs().max(), fmt).double()
        return unit_roundoff(fmt) * (t.abs() + torch.finfo(fmt).tiny / s)

    e_a, e_b = entry_error(a, fmt_a), entry_error(b, fmt_b)
    cast = e_a @ (b.abs() + e_b).t() + a.abs() @ e_b.t()
    accumulate = a.shape[1] * unit_roundoff(torch.float32) * ((a.abs() + e_a) @ (b.abs() + e_b).t())
    inner = cast + accumulate
    return inner + unit_roundoff(out_dtype) * ((a @ b.t()).abs() + inner)


# ----------------------------------------------------------------------------- INT8 weight-only PTQ
def quantize_int8(weight):
    """Per-output-channel symmetric: (q int8 with W ~ q * s[:, None], s fp32 of one per row)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=AMAX_FLOOR) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


class Int8Linear(nn.Module):
    """A frozen linear layer with int8 weights and one scale per output channel."""

    def __init__(self, linear: nn.Linear, dtype=torch.bfloat16):
        super().__init__()
        assert linear.bias is None, "model.py's linears have no bias"
        q, scale = quantize_int8(linear.weight)
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale.to(dtype))

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        if x.device.type == "cpu":  # the fused kernel: int8 weights are converted inside the matmul
            y = torch._weight_int8pack_mm(x2, self.weight_int8, self.scale.to(x.dtype))
        else:
            y = F.linear(x2, self.weight_int8.to(x.dtype)) * self.scale.to(x.dtype)
        return y.view(*x.shape[:-1], -1)


def quantize_model_int8(model, dtype=torch.bfloat16):
    """Every nn.Linear of `model` (in place) to Int8Linear; the rest (embedding, norms) cast to
    `dtype`."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, Int8Linear(child, dtype))
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def model_bytes(model):
    """Bytes of what a checkpoint of the model holds: parameters and persistent buffers."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


# ------------------------------------------------------------------------ `eval CKPT`: INT8 vs bf16
class EvalError(ValueError):
    """A bad argument to `eval`: the message is the one line the user sees."""


def load_trained(path):
    """A trained model from any checkpoint the project writes or reads (a run's --out folder on any
    layout, a consolidated file, a Hugging Face Llama folder: weights.load_weights): (model,
    tokenizer)."""
    from checkpoint import CheckpointError
    from model import ModelConfig, Transformer
    from weights import load_weights
    try:
        whole = load_weights(path)
    except CheckpointError as e:
        raise EvalError(f"eval {path}: {e}") from None
    cfg = ModelConfig(**{**whole["model_config"], "attn": "sdpa",
                         "activation_checkpointing": False})
    model = Transformer(cfg)
    model.load_state_dict(whole["model"])
    return model.eval(), whole["tokenizer"]


@torch.no_grad()
def val_loss(model, batches):
    return torch.stack([model(x, y)[1].double() for x, y in batches]).mean().item()


@torch.no_grad()
def generation_seconds(model, prompt, n_tokens):
    t0 = time.perf_counter()
    # greedy: the two models' outputs can be compared
    out = model.generate(prompt, n_tokens, temperature=0)
    return time.perf_counter() - t0, out[0, prompt.shape[1]:]


def eval_main(argv):
    import copy

    import data as data_lib
    from batches import eval_batches
    p = argparse.ArgumentParser(prog="quantization.py eval",
                                description="INT8 weight-only PTQ of a checkpoint "
                                "against its bf16 model: validation loss, bytes, generation "
                                "tokens/s")
    p.add_argument("ckpt", help="a run's --out folder (any layout), a consolidated file or a "
                                "Hugging Face folder")
    p.add_argument("--data", default=None, help="prepared data folder (default: the embedded "
                                                "corpus)")
    p.add_argument("--eval-iters", type=int, default=20, help="validation batches")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per validation batch")
    p.add_argument("--gen-tokens", type=int, default=100, help="tokens generated per timing")
    p.add_argument("--repeats", type=int, default=3,
                   help="timings per model, alternating; the fastest counts")
    args = p.parse_args(argv)
    for flag in ("eval_iters", "batch_size", "gen_tokens", "repeats"):
        if getattr(args, flag) < 1:
            raise EvalError(f"--{flag.replace('_', '-')} must be at least 1, got "
                            f"{getattr(args, flag)}")
    model, tokenizer = load_trained(args.ckpt)
    data_dir = args.data or data_lib.ensure_default_data(tokenizer)
    # a DataError if the data was prepared with another tokenizer
    data_lib.load_meta(data_dir, tokenizer)
    val = eval_batches(data_dir, model.cfg.block_size, args.batch_size, args.eval_iters)
    enc = data_lib.get_tokenizer(tokenizer)
    prompt = torch.tensor([enc.encode_ordinary("def ")])

    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    # from the checkpoint's own weights, not from bf16's
    int8 = quantize_model_int8(model, torch.bfloat16)
    models = {"bf16": bf16, "int8": int8}
    seconds, text = {k: [] for k in models}, {}
    for _ in range(args.repeats):  # alternate, so that both see the same machine load
        for name, m in models.items():
            s, text[name] = generation_seconds(m, prompt, args.gen_tokens)
            seconds[name].append(s)
    rows = {name: (val_loss(m, val), model_bytes(m), args.gen_tokens / min(seconds[name]))
            for name, m in models.items()}
    print(f"{args.ckpt}: {sum(p.numel() for p in bf16.parameters()):,} parameters, {len(val)} x "
          f"{args.batch_size} x {model.cfg.block_size} validation tokens, greedy generation of "
          f"{args.gen_tokens} tokens (fastest of {args.repeats}, {torch.get_num_threads()} "
          "threads)")
    print(f"{'model':<6} {'val loss':>9} {'bytes':>12} {'tokens/s':>9}")
    for name, (loss, nbytes, tps) in rows.items():
        print(f"{name:<6} {loss:>9.4f} {nbytes:>12,} {tps:>9.1f}")
    (lb, bb, tb), (li, bi, ti) = rows["bf16"], rows["int8"]
    same = int((text["bf16"] == text["int8"]).cumprod(0).sum())
    print(f"int8 vs bf16: val loss {li - lb:+.5f} nats, bytes {bi / bb:.3f}x, generation "
          f"{ti / tb:.2f}x tokens/s; greedy outputs agree on the first {same} of "
          f"{args.gen_tokens} tokens")
    return rows


# ----------------------------------------------------------------------------- the demo
def demo_formats():
    print(f"{'format':<9} {'bits':>4} {'exponent':>8} {'mantissa':>8} {'largest':>10} "
          f"{'smallest normal':>15} {'epsilon':>8}")
    for name, bits, e, m, big, tiny, eps in format_table():
        print(f"{name:<9} {bits:>4} {'-' if e is None else e:>8} {'-' if m is None else m:>8} "
              f"{big:>10.4g} {'-' if tiny is None else f'{tiny:.3g}':>15} "
              f"{'-' if eps is None else f'{eps:.3g}':>8}")


def demo_fp8():
    """One layer's three matmuls, fp8 and bf16, against float64 (errors and their bound); scaling
    over 12 decades; 8 training steps of the tiny preset in bf16 and in FP8."""
    from model import PRESETS, Transformer
    from amp import DynamicLossScaler, MixedPrecisionOptimizer, cast_model
    g = torch.Generator().manual_seed(0)
    x, w, gy = (torch.randn(*s, generator=g).bfloat16()
                for s in ((512, 128), (384, 128), (512, 384)))
    results = {}
    for name, dtype, linear in (("fp8", torch.bfloat16, fp8_linear),
                                ("bf16", torch.bfloat16, F.linear),
                                ("exact", torch.float64, F.linear)):
        xl, wl = x.to(dtype, copy=True).requires_grad_(), w.to(dtype, copy=True).requires_grad_()
        y = linear(xl, wl)
        y.backward(gy.to(dtype))
        results[name] = [t.detach().double() for t in (y, xl.grad, wl.grad)]
    print("one linear layer, X 512x128, W 384x128, bf16 inputs, against float64: the fp8 error's "
          "largest ratio to its bound, and the relative error ||error|| / ||exact|| of fp8 and "
          "of bf16")
    for i, (what, a, b, fa) in enumerate((("forward  Y = X W^T", x, w, E4M3),
                                          ("backward dX = dY W", gy, w.t(), E5M2),
                                          ("backward dW = dY^T X", gy.t(), x.t(), E5M2))):
        ref, fp8, bf16 = results["exact"][i], results["fp8"][i], results["bf16"][i]
        bound = matmul_error_bound(a, b, fa, E4M3, torch.bfloat16)
        rel = [((r - ref).norm() / ref.norm()).item() for r in (fp8, bf16)]
        print(f"  {what:<21} fp8 max error/bound {((fp8 - ref).abs() / bound).max().item():.2f} "
              f"| relative error fp8 {rel[0]:.2e}, bf16 {rel[1]:.2e}")
    amaxes = [10.0 ** k for k in range(-6, 7, 3)]
    used = [(to_fp8(torch.tensor([a, -a / 3]), E4M3)[0].float().abs().max().item()) for a in amaxes]
    print("current scaling, E4M3, tensors of amax " + ", ".join(f"{a:g}" for a in amaxes)
          + ": scaled amax "
          + ", ".join(f"{u:g}" for u in used) + f" (of at most {torch.finfo(E4M3).max:g}: never "
                                                "overflows)")

    torch.manual_seed(0)
    idx = torch.randint(0, 256, (8, 65))
    for name in ("bf16", "fp8"):
        torch.manual_seed(0)
        model = cast_model(Transformer(PRESETS["tiny"]), torch.bfloat16)
        if name == "fp8":
            print(f"fp8: {use_fp8(model)} linear layers swapped to FP8")
        opt = MixedPrecisionOptimizer([{"params": list(model.parameters())}],
                                      lambda groups: torch.optim.AdamW(groups, lr=3e-3),
                                      torch.bfloat16, DynamicLossScaler(enabled=False))
        losses = []
        for _ in range(8):
            _, loss = model(idx[:, :-1], idx[:, 1:])
            loss.backward()
            opt.step(max_norm=1.0)
            opt.zero_grad()
            losses.append(f"{loss.item():.3f}")
        print(f"{name} (tiny preset, 8 steps on one batch): losses {' '.join(losses)}")


def demo_int8():
    """Per-channel INT8 of one 4096 x 4096 weight: its error, its bytes, its matmul speed against
    bf16."""
    lin = nn.Linear(4096, 4096, bias=False)
    q, s = quantize_int8(lin.weight)
    err = (q.float() * s[:, None] - lin.weight).abs()
    print("int8 per-channel, W 4096x4096: max |W - q s| / (s / 2) = "
          f"{(err / (s[:, None] / 2)).max().item():.3f} (at most 1), bytes "
          f"{q.numel() + 2 * s.numel():,} vs bf16 {2 * lin.weight.numel():,}")
    int8, w16 = Int8Linear(lin), lin.weight.detach().bfloat16()
    # one token (decoding: every weight read for 2 FLOPs) vs 64 (prefill: compute-bound)
    for m in (1, 64):
        x = torch.randn(m, 4096).bfloat16()
        t16, t8 = best_seconds(lambda: F.linear(x, w16)), best_seconds(lambda: int8(x))
        print(f"  x W^T with {m:>2} row(s), {torch.get_num_threads()} thread(s): bf16 "
              f"{t16 * 1e3:.2f} ms, int8 {t8 * 1e3:.2f} ms: int8 {t16 / t8:.2f}x the speed of "
              "bf16")


def best_seconds(fn, repeats=10):
    """The fastest of `repeats` timed calls, after one untimed warm-up."""
    fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["eval"]:
        try:
            return eval_main(argv[1:])
        except EvalError as e:
            print(f"quantization.py: {e}", file=sys.stderr)
            sys.exit(2)
    elif argv:
        print(f"quantization.py: unknown command {argv[0]!r}: run without arguments for the "
              "demo, or `eval CKPT`", file=sys.stderr)
        sys.exit(2)
    else:
        demo_formats()
        demo_fp8()
        demo_int8()


if __name__ == "__main__":
    main()
