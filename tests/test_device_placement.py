"""Every tensor handed to a collective lives on the run's device: audited over a CPU run per layout.

NCCL's collectives take CUDA tensors only; a counter made on the host (torch.tensor(n) without
device=) fails at run time on GPUs and passes on CPU gloo. On a CPU run every tensor is on the CPU,
so "on the run's device" is tracked instead (HostTensors, a TorchFunctionMode): a tensor is
host-made when a factory (torch.tensor, zeros, ...) created it without a device (and outside
`with torch.device(...)`), or when it was computed only from host-made tensors, or by .cpu(); an
explicit .to(device) places it. The collectives (and batched send/receive) are wrapped to record
every host-made tensor they are given. Each layout runs two optimizer steps with logging,
evaluation and a checkpoint, through pretrain.py and sft.py.
"""
import os

import torch
import torch.distributed as dist
import torch.utils._device
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import pretrain
import sft
import tensor_parallel
import zero
from sft_fixtures import make_init, reverse_examples, write_jsonl
from tests.distributed import run_distributed

FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full,
             torch.arange, torch.rand, torch.randn, torch.randint, torch.linspace, torch.eye}
COLLECTIVES = ["all_reduce", "broadcast", "all_gather", "all_gather_single",
               "all_gather_into_tensor", "reduce_scatter_single", "reduce_scatter_tensor",
               "all_to_all_single", "reduce", "send", "recv"]
# (isend and irecv are not wrapped: P2POp accepts only the originals; pipeline.py passes them
# through batch_isend_irecv, whose P2POps are checked.)


def is_host(t):
    return getattr(t, "_host_made", False)


class HostTensors(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if func in FACTORIES:
            host = kwargs.get("device") is None and torch.utils._device.CURRENT_DEVICE is None
        elif func is torch.Tensor.cpu:
            host = True
        elif func is torch.Tensor.to and ("device" in kwargs
                                          or any(isinstance(a, (str, torch.device, torch.Tensor))
                                                 for a in args[1:])):
            host = False
            for t in tree_flatten(out)[0]:  # (on the CPU, .to(cpu) returns the tensor itself)
                if isinstance(t, torch.Tensor):
                    t.__dict__.pop("_host_made", None)
        else:
            host = bool(inputs) and all(is_host(t) for t in inputs)
        if host:
            ids = {id(t) for t in inputs}
            for t in tree_flatten(out)[0]:
                # in-place results keep their own placement
                if isinstance(t, torch.Tensor) and id(t) not in ids:
                    t._host_made = True
        return out


def audited(fn, found):
    """fn, recording the host-made tensors it is given (with where they came from) into `found`."""
    def wrapper(*args, **kwargs):
        ops = args[0] if fn.__name__ == "batch_isend_irecv" else []
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        for t in tensors + [op.tensor for op in ops]:
            if is_host(t):
                import traceback
                caller = [f for f in traceback.extract_stack()[:-1]
                          if "site-packages" not in f.filename][-1]
                found.add(f"{fn.__name__} in {os.path.basename(caller.filename)}:{caller.lineno} "
                          f"({caller.line})")
        return fn(*args, **kwargs)
    return wrapper


def run_audited(main, argv):
    found, saved = set(), []
    targets = [(dist, name) for name in COLLECTIVES + ["batch_isend_irecv"] if hasattr(dist, name)]
    targets += [(m, name) for m in (zero, tensor_parallel)
                for name in ("all_gather_single", "reduce_scatter_single")]
    for owner, name in targets:
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, audited(getattr(owner, name), found))
    try:
        with HostTensors():
            main(argv)
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
    return sorted(found)


STEPS = ["--max-steps", "2", "--log-every", "1", "--eval-every", "1", "--save-every", "2",
         "--device", "cpu"]
PRETRAIN = ["--model", "tiny", "--seq-len", "16", "--batch-size", "8", "--eval-iters", "1",
            "--sample-tokens", "0", *STEPS]
LAYOUTS = {"dp (ddp.py)": [], "ZeRO-1": ["--zero", "1"], "ZeRO-2": ["--zero", "2"],
           "ZeRO-3": ["--zero", "3"],
           "tp 2, sequence-parallel": ["--tp", "2", "--sequence-parallel"],
           "pp 2 (1f1b)": ["--pp", "2", "--microbatches", "2"],
           "ep 2": ["--experts", "4", "--ep", "2", "--zero", "1"]}
SFT_LAYOUTS = {"sft, dp 2": [], "sft, tp 2, packed rows": ["--tp", "2", "--pack"]}


def _audit(rank, world, out, cache, sft_files):
    os.environ["LLM_DATA_CACHE"] = cache
    found = {name: run_audited(pretrain.main, PRETRAIN + extra + ["--out", f"{out}/{i}"])
             for i, (name, extra) in enumerate(LAYOUTS.items())}
    for name, extra in SFT_LAYOUTS.items():
        found[name] = run_audited(sft.main, ["--init", sft_files[0], "--data", sft_files[1],
                                             "--val-data", sft_files[2], "--batch-size", "4",
                                             "--samples", "0", "--out", f"{out}/{name}",
                                             *STEPS, *extra])
    return found


def test_every_collective_gets_tensors_on_the_runs_device(tmp_path, stdlib_data, data_cache):
    files = [str(make_init(tmp_path / "init")),
             str(write_jsonl(tmp_path / "t.jsonl", reverse_examples(16))),
             str(write_jsonl(tmp_path / "v.jsonl", reverse_examples(4, seed=1)))]
    for found in run_distributed(_audit, 2, str(tmp_path), str(data_cache), files):
        assert list(found) == [*LAYOUTS, *SFT_LAYOUTS]
        assert all(v == [] for v in found.values()), {k: v for k, v in found.items() if v}


def test_the_audit_sees_a_host_counter():
    """The tracking: a host-made count and what is computed from it alone: flagged; .to() places."""
    with HostTensors():
        n = torch.tensor([3.0, 4.0])
        on_device = torch.zeros(2, device="cpu")
        assert is_host(n) and is_host(n * 2) and is_host(n.sum()) and not is_host(on_device)
        assert (not is_host(on_device + n) and not is_host(n.to("cpu"))
                and not is_host(torch.zeros_like(on_device)))
        with torch.device("cpu"):
            assert not is_host(torch.zeros(2))
