"""lora.py: low-rank adaptation: freeze the model, learn W + (alpha/r) B A in a few chosen linear layers.

The idea (Hu et al., 2021): the update a fine-tune makes to a d_out x d_in weight has low rank, so learn it as
a product B A of a d_out x r and an r x d_in matrix, r << d, and leave W frozen:

    y = x W^T + (alpha / r) * dropout(x) A^T B^T        A ~ Kaiming-uniform, B = 0, so at step 0 y = x W^T

Trainable parameters per adapted layer: r (d_in + d_out) instead of d_in d_out. Every other parameter
(embeddings, norms, head, the frozen W) has requires_grad False, so it gets no gradient and no optimizer
state: Adam's 8 bytes per trainable parameter (momentum and variance, fp32), plus 4 of fp32 master weights in
mixed precision, are paid only for the adapters. Scaling by alpha/r keeps the update's size roughly independent
of r, so the learning rate need not change with it. After training, W + (alpha/r) B A is merged into W: the
exported model is a plain Transformer with no extra cost at inference.

The adapters are saved on their own (`save_adapter`: a few KB to MB, with the rank, targets and the base
model's config), loadable onto the same base (`load_adapter`), and mergeable (`merge_lora`).
Targets are the names of nn.Linear modules inside the blocks: wq wk wv wo (attention), w1 w2 w3 (SwiGLU).
Under ZeRO only the adapters reach the optimizer, so only they are sharded. Tensor-parallel layers are not
wrapped here (out of scope).

Demo: `python lora.py` adapts the tiny model, shows the trainable count, that step 0 and the merged model
reproduce the adapted logits, and measures optimizer-state bytes with LoRA against full fine-tuning.
"""
import math

import torch
import torch.nn as nn

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


class LoRAError(ValueError):
    """Bad LoRA settings or adapter file: the message is the one line the user sees."""


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update. It keeps the base layer's `weight` under the same
    name, so a base checkpoint's keys (`...wq.weight`) still load into an adapted model."""

    def __init__(self, base: nn.Linear, r, alpha, dropout=0.0):
        super().__init__()
        if base.bias is not None:
            raise LoRAError("LoRA here wraps bias-free linears only (model.py has none)")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        kw = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))
        # A as nn.Linear initialises its weight (Kaiming-uniform, a = sqrt 5); B = 0 makes B A = 0 at the start.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        base = x @ self.weight.t()
        # (x A^T) B^T: two thin matmuls, never the d_out x d_in product B A.
        return base + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def delta(self):
        """The dense update (alpha/r) B A, for merging."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def extra_repr(self):
        return f"{self.in_features} -> {self.out_features}, r={self.r}, alpha={self.alpha}"


def parse_targets(spec):
    targets = tuple(t.strip() for t in spec.split(",") if t.strip()) if isinstance(spec, str) else tuple(spec)
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise LoRAError(f"--lora-targets {spec if isinstance(spec, str) else ','.join(spec)}: "
                        f"{', '.join(bad) or 'nothing'} is not a linear of the blocks; choose from {','.join(TARGETS)}")
    return targets


def check_settings(r, alpha, dropout):
    if r < 1:
        raise LoRAError(f"--lora-r must be at least 1, got {r}")
    if alpha <= 0:
        raise LoRAError(f"--lora-alpha must be > 0, got {alpha}")
    if not 0 <= dropout < 1:
        raise LoRAError(f"--lora-dropout must be in [0, 1), got {dropout}")


def apply_lora(model, r=8, alpha=16.0, dropout=0.0, targets=("wq", "wv")):
    """Freeze every parameter of `model`, then wrap each nn.Linear whose name is in `targets` (the last part of
    its module path) in a LoRALinear. Returns the adapted layers' names. Works on the model in place."""
    check_settings(r, alpha, dropout)
    targets = parse_targets(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(parent, child_name, LoRALinear(child, r, alpha, dropout))
                wrapped.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    if not wrapped:
        raise LoRAError(f"--lora-targets {','.join(targets)}: no nn.Linear of that name in the model")
    model.lora_config = {"r": r, "alpha": alpha, "dropout": dropout, "targets": list(targets)}
    return wrapped


def lora_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def count_trainable(model):
    """(trainable, total) parameters, and the expected trainable count r (d_in + d_out) summed over layers."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    expected = sum(m.r * (m.in_features + m.out_features) for _, m in lora_layers(model))
    return trainable, total, expected


def describe(model):
    trainable, total, _ = count_trainable(model)
    layers = lora_layers(model)
    c = model.lora_config
    return (f"LoRA r={c['r']} alpha={c['alpha']:g} on {','.join(c['targets'])} ({len(layers)} layers): "
            f"{trainable:,} trainable of {total:,} parameters ({trainable / total:.2%})")


def lora_state_dict(model):
    """Only the adapters: the A and B of every LoRALinear."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if ".lora_" in k}


def save_adapter(path, model, model_config):
    torch.save({"lora_config": model.lora_config, "model_config": model_config,
                "adapter": lora_state_dict(model)}, path)


def load_adapter(model, path, model_config):
    """Wrap a plain base model as the adapter file says and load its A and B. The adapter must have been
    trained on a model of the same config: another shape would not load, and another base would not mean
    the same thing even if it did."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
        lora_config, adapter = saved["lora_config"], saved["adapter"]
    except FileNotFoundError:
        raise LoRAError(f"--adapter {path}: no such file") from None
    except Exception as e:
        raise LoRAError(f"--adapter {path}: not an adapter file ({type(e).__name__})") from None
    if saved["model_config"] != model_config:
        diff = sorted(k for k in model_config if saved["model_config"].get(k) != model_config[k])
        raise LoRAError(f"--adapter {path} was trained on another model config (differs in {', '.join(diff)})")
    if not lora_layers(model):
        apply_lora(model, lora_config["r"], lora_config["alpha"], lora_config["dropout"], lora_config["targets"])
    elif model.lora_config != lora_config:
        raise LoRAError(f"--adapter {path} has LoRA settings {lora_config}, the model {model.lora_config}")
    missing, unexpected = model.load_state_dict(adapter, strict=False)
    missing = [k for k in missing if ".lora_" in k]
    if missing or unexpected:
        raise LoRAError(f"--adapter {path} does not fit the model (missing {missing[:2]}, unexpected "
                        f"{unexpected[:2]})")
    return model


@torch.no_grad()
def merge_lora(model):
    """Fold W + (alpha/r) B A into a plain nn.Linear in place of every LoRALinear: the original structure and
    state-dict keys, no adapter cost at inference. The merged weights are trainable again, as in the base."""
    for name, m in lora_layers(model):
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        merged = nn.Linear(m.in_features, m.out_features, bias=False, device=m.weight.device, dtype=m.weight.dtype)
        merged.weight.copy_(m.weight + m.delta().to(m.weight.dtype))
        setattr(parent, child_name, merged)
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


@torch.no_grad()
def merged_state_dict(model):
    """The state dict merge_lora's model would have, leaving `model` as it is (adapted, still training)."""
    sd = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    for name, m in lora_layers(model):
        sd[f"{name}.weight"] = m.weight + m.delta().to(m.weight.dtype)
    return sd


def optimizer_state_bytes(optimizer):
    """Bytes held in an optimizer's state (Adam: exp_avg and exp_avg_sq per parameter, plus a step scalar)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # amp.MixedPrecisionOptimizer wraps the torch one
    return sum(t.numel() * t.element_size() for s in inner.state.values() for t in s.values() if torch.is_tensor(t))


if __name__ == "__main__":
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
    for name, model in (("full fine-tuning", copy.deepcopy(base).float()), ("LoRA", adapted.float())):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(5):
            model(x, y)[1].backward()
            opt.step()
            opt.zero_grad()
        states[name] = optimizer_state_bytes(opt)
        print(f"{name:>16}: {sum(p.numel() for p in model.parameters() if p.requires_grad):>9,} trainable, "
              f"AdamW state {states[name]:>10,} bytes")
    print(f"optimizer state, LoRA / full: {states['LoRA'] / states['full fine-tuning']:.3%}")
    adapted_logits = adapted(x)[0]
    print("after 5 steps, max |merged - adapted| logits:",
          (merge_lora(adapted)(x)[0] - adapted_logits).abs().max().item())
