"""pipeline.py: pipeline parallelism: blocks cut into stages, micro-batches flowing through them.

The idea (GPipe, Huang et al. 2019; 1F1B, PipeDream-Flush, Narayanan et al. 2021): stage s of p
holds a contiguous slice of the blocks (the embedding on the first stage; the final norm, head and
loss on the last). A batch is cut into m micro-batches; a stage sends each micro-batch's output
activations to the next stage and, in the backward, each input gradient back to the previous one
(point-to-point send/recv over the pp group). A stage waits while the pipeline fills and drains:
with equal stage times the idle ("bubble") fraction is

    bubble = (p - 1) / (m + p - 1)          for GPipe and for 1F1B alike

GPipe runs all m forwards, then all m backwards, so a stage holds the activations of m micro-batches
at once. 1F1B runs p - s - 1 warm-up forwards, then alternates one forward and one backward, then
drains the backwards: the same bubble, but at most p - s micro-batches in flight (p on the first
stage), whatever m is. Communication per micro-batch and stage boundary: B x T x d activations
forward, the same backward. Each op's send and the next op's receive are posted together
(dist.batch_isend_irecv), so that the schedule cannot deadlock where sends block until the matching
receive is posted (NCCL; see run_pipeline).

The loss lives on the last stage: each micro-batch's summed loss divided by the step's labelled
tokens (the token mean, training.py), then all-reduced over the pp group (zeros from the other
stages) so that every rank reports it.

Demo: `torchrun --nproc_per_node 4 pipeline.py` runs GPipe and 1F1B on p = 4 stages for m = 1, 4, 8
and prints each executed schedule as a timeline per stage (F/f forward, B/b backward, alternating
case per micro-batch, . idle), the measured idle fraction next to (p-1)/(m+p-1), and the peak
activation memory held per stage. `--pp 2` with --nproc_per_node 2 does the same on two stages.
"""
import argparse
import contextlib
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from placement import name_whole

SCHEDULES = ("gpipe", "1f1b")


# -------------------------------------------------------------------- cutting the model into stages
def stage_layers(n_layer, pp, stage):
    """Blocks [start, end) of `stage`: as even as possible, extra blocks on the earliest stages."""
    base, extra = divmod(n_layer, pp)
    start = stage * base + min(stage, extra)
    return start, start + base + (stage < extra)


def keep_stage(model, topo):
    """Keep only this stage's part of a full model.Transformer (real, or on the meta device:
    stack.build_model). The blocks kept keep their names in the whole model (placement.py)."""
    name_whole(model)
    if topo.pp == 1:
        model.first_layer = 0
        return model
    start, end = stage_layers(model.cfg.n_layer, topo.pp, topo.pp_rank)
    model.blocks = nn.ModuleList(list(model.blocks)[start:end])
    model.first_layer = start  # block i here is block first_layer + i of the full model
    if not topo.is_first_stage:
        model.tok_emb = None
    if not topo.is_last_stage:
        model.norm = model.lm_head = None
    return model


def cut(batch, m):
    """A batch (x, y) or (x, y, {"pos": ..., "doc": ...}) as (at most) m micro-batches of rows."""
    x, y, *packing = batch
    pieces = ([x.chunk(m), y.chunk(m)]
              + [v.chunk(m) for v in (packing[0].values() if packing else ())])
    if not packing:
        return list(zip(*pieces))
    return [(p[0], p[1], dict(zip(packing[0], p[2:]))) for p in zip(*pieces)]


# ----------------------------------------------------------------------------- the schedules
def make_schedule(kind, m, p, stage):
    """The ordered list of ("F", i) and ("B", i) this stage executes for micro-batches 0..m-1."""
    if kind == "gpipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    if kind == "1f1b":
        warmup = min(p - stage - 1, m)
        ops = [("F", i) for i in range(warmup)]
        for i in range(m - warmup):
            ops += [("F", warmup + i), ("B", i)]
        return ops + [("B", i) for i in range(m - warmup, m)]
    raise ValueError(f"--pp-schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")


# ----------------------------------------------------------------------------- running one step
class ActivationMeter:
    """Bytes of activations saved for backward, now and at peak, by torch's saved-tensor hooks
    (parameters saved by matmuls left out; a storage saved by several operations counted once)."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.live, self.now, self.peak = {}, 0, 0

    def pack(self, t):
        key = t.untyped_storage().data_ptr()
        if key in self.params:
            return t
        if key not in self.live:
            self.live[key] = [0, t.untyped_storage().nbytes()]
            self.now += self.live[key][1]
            self.peak = max(self.peak, self.now)
        self.live[key][0] += 1
        return _Saved(t, self, key)

    def release(self, key):
        self.live[key][0] -= 1
        if self.live[key][0] == 0:
            self.now -= self.live.pop(key)[1]

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack,
                                                        lambda s: s if torch.is_tensor(s) else s.t)


class _Saved:
    def __init__(self, t, meter, key):
        self.t, self.meter, self.key = t, meter, key

    def __del__(self):
        self.meter.release(self.key)


class StageStep:
    """This rank's stage during one step: the forward and backward of each micro-batch, and the
    point-to-point exchange that moves activations to the next stage and gradients to the previous
    one. It keeps what the schedule leaves between ops: each micro-batch's input and output (for its
    backward), the last stage's losses, the sends still in flight, and the running loss total."""

    def __init__(self, model, micro_batches, topo, loss_div=None, scale_loss=None, train=True):
        self.model, self.micro_batches, self.topo = model, micro_batches, topo
        self.loss_div = loss_div or sum(int((mb[1] != -100).sum()) for mb in micro_batches)
        self.scale_loss, self.train = scale_loss, train
        self.first, self.last, s = topo.is_first_stage, topo.is_last_stage, topo.pp_rank
        self.prev_rank = topo.pp_ranks[s - 1] if not self.first else None
        self.next_rank = topo.pp_ranks[s + 1] if not self.last else None
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.inputs, self.outputs, self.losses, self.sends = {}, {}, {}, []
        self.total = torch.zeros((), dtype=torch.float64, device=self.device)

    def act_shape(self, i):
        # (B, T, d) between stages; (B, T/tp, d) under sequence parallelism (tensor_parallel.py). A
        # gradient sent back has the shape of the activation it belongs to.
        x = self.micro_batches[i][0]
        return (x.shape[0], x.shape[1] // getattr(self.model, "sequence_shards", 1),
                self.model.cfg.d_model)

    def incoming(self, op, i):
        """(buffer, source) of what op i must receive first: an activation from the previous stage
        for a forward, a gradient from the next stage for a backward; None when it needs nothing."""
        if op == "F" and not self.first:
            return (torch.empty(self.act_shape(i), dtype=self.dtype, device=self.device),
                    self.prev_rank)
        if op == "B" and not self.last:
            return (torch.empty(self.act_shape(i), dtype=self.dtype, device=self.device),
                    self.next_rank)
        return None

    def forward(self, i, h):
        """Micro-batch i's forward here: the (activation, next stage) to send, None on the last."""
        # Packed rows (sft.py --pack) bring positions and document ids, {"pos": ..., "doc": ...}:
        # every stage's attention needs them; each stage has them from the data loader, only
        # activations travel.
        x, y, *packing = self.micro_batches[i]
        packing = {k: v.to(self.device) for k, v in packing[0].items()} if packing else {}
        h = x.to(self.device) if self.first else h.requires_grad_(self.train)
        # The stage's forward: token ids -> activations on the first, activations -> (logits, loss)
        # on the last, activations -> activations in between (model.py's forward skips the parts a
        # stage lacks).
        out, loss = self.model(h, y.to(self.device) if self.last else None, reduction="sum",
                               **packing)
        if self.last:
            self.losses[i] = loss / self.loss_div
            self.total.add_(self.losses[i].detach().double())
        if self.train:
            self.inputs[i], self.outputs[i] = h, out
        return None if self.last else (out.detach().contiguous(), self.next_rank)

    def backward(self, i, grad):
        """Micro-batch i's backward from the received gradient (from the loss on the last stage);
        returns (input gradient, previous stage) to send, None on the first."""
        h, out = self.inputs.pop(i), self.outputs.pop(i)
        if self.last:
            loss = self.losses.pop(i)
            (self.scale_loss(loss) if self.scale_loss else loss).backward()
        else:
            torch.autograd.backward(out, grad)
        return None if self.first else (h.grad.contiguous(), self.prev_rank)

    def exchange(self, send, recv):
        """Post this op's send and the next op's receive as one group; wait for the receive only (a
        send's buffer is kept alive, and its completion waited for, at the end of the step)."""
        ops = []
        if send is not None:
            ops.append(dist.P2POp(dist.isend, send[0], send[1], group=self.topo.pp_group))
        if recv is not None:
            ops.append(dist.P2POp(dist.irecv, recv[0], recv[1], group=self.topo.pp_group))
        works = dist.batch_isend_irecv(ops) if ops else []
        if send is not None:
            self.sends.append((works[0], send[0]))
        if recv is not None:
            works[-1].wait()
            return recv[0]
        return None


def run_pipeline(model, micro_batches, topo, schedule="1f1b", loss_div=None, scale_loss=None,
                 timeline=None, train=True, no_sync=None):
    """Forward (and with train=True backward) of `micro_batches` [(x, y) or (x, y, packing), ...]
    through this rank's stage. Gradients accumulate in the stage's parameters. The last stage sums
    each micro-batch's per-token losses (labels of -100 take none) and divides by loss_div (default:
    the micro-batches' labelled tokens, so that the result is their mean; training.py passes the
    global batch's count). Returns the sum over micro-batches, the same on every rank of the pp
    group. `timeline`, a list, receives (op, micro-batch, t0, t1) per op. `no_sync()` (ddp.py's)
    wraps every backward but the step's last, so that data parallelism reduces once.

    Communication is safe under blocking sends (NCCL: a send completes only once the peer has posted
    the matching receive, and a rank's operations run in the order posted). After each op, the send
    of its result and the receive of the next op's input are posted together in one
    dist.batch_isend_irecv, as Megatron's send_forward_recv_backward / send_backward_recv_forward
    do. Posted one after the other, 1F1B's steady state deadlocks: stage s sends activation i+1
    before receiving gradient i while stage s+1 sends gradient i before receiving activation i+1,
    and both sends wait for a receive that is never posted."""
    m, p, s = len(micro_batches), topo.pp, topo.pp_rank
    step = StageStep(model, micro_batches, topo, loss_div, scale_loss, train)
    if p > 1 and not getattr(topo, "pp_group_warm", False):
        # NCCL builds a group's communicator at its first call; if that call is a batched
        # send/receive, every rank of the group must take part in it. A collective first makes later
        # batches free of that rule.
        dist.all_reduce(torch.zeros(1, device=step.device), group=topo.pp_group)
        topo.pp_group_warm = True
    ops = make_schedule(schedule, m, p, s) if train else [("F", i) for i in range(m)]
    # waiting for the previous (next) stage is idle time
    received = step.exchange(None, step.incoming(*ops[0]))
    for k, (op, i) in enumerate(ops):
        t0 = time.perf_counter()
        if op == "F":
            with torch.no_grad() if not train else contextlib.nullcontext():
                send = step.forward(i, received)
        elif no_sync is not None and k < len(ops) - 1:
            with no_sync():
                send = step.backward(i, received)
        else:
            send = step.backward(i, received)
        if timeline is not None:
            timeline.append((op, i, t0, time.perf_counter()))
        received = step.exchange(send, step.incoming(*ops[k + 1]) if k + 1 < len(ops) else None)
    for work, _ in step.sends:
        work.wait()
    if p > 1:
        # the loss from the last stage, to every stage
        dist.all_reduce(step.total, group=topo.pp_group)
    return step.total


# ------------------------------------------------------------------ the demo: timelines and bubbles
def render(timeline, t_start, t_end, width=72):
    """One character per time slice: F/f forward, B/b backward, . idle (the letter's case
    alternates per micro-batch)."""
    row = ["."] * width
    scale = width / (t_end - t_start)
    for op, i, t0, t1 in timeline:
        a, b = int((t0 - t_start) * scale), max(int((t0 - t_start) * scale) + 1,
                                                int((t1 - t_start) * scale))
        for c in range(a, min(b, width)):
            row[c] = op if i % 2 == 0 else op.lower()
    return "".join(row)


def demo():
    from dataclasses import replace

    from model import PRESETS, Transformer
    from topology import Topology, end_process_group

    ap = argparse.ArgumentParser()
    ap.add_argument("--pp", type=int, default=None, help="stages (default: the world size)")
    ap.add_argument("--microbatches", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    pp = args.pp or dist.get_world_size()
    # with more ranks than stages, the other data-parallel replicas run alongside
    topo = Topology(tp=1, pp=pp)
    cfg = replace(PRESETS["tiny"], n_layer=2 * pp)
    torch.manual_seed(0)
    model = keep_stage(Transformer(cfg), topo)
    gen = torch.Generator().manual_seed(1)
    results = []
    for m in args.microbatches:
        for schedule in SCHEDULES:
            seqs = torch.randint(0, cfg.vocab_size, (m, args.micro_batch_size, args.seq_len + 1),
                                 generator=gen)
            batch = [(s[:, :-1], s[:, 1:]) for s in seqs]  # inputs and next-token targets
            # one untimed run first: first-call allocations would skew the timeline
            for warm in (True, False):
                timeline, meter = [], ActivationMeter(model)
                dist.barrier()
                t_start = time.perf_counter()
                with meter.hooks():
                    loss = run_pipeline(model, batch, topo, schedule, timeline=timeline)
                t_end = time.perf_counter()
                model.zero_grad()
            rows = [None] * pp
            dist.all_gather_object(rows, (timeline, t_start, t_end, meter.peak),
                                   group=topo.pp_group)
            if dist.get_rank() == 0:
                # The step's span from the first stage's start to the last stage's end. perf_counter
                # is one monotonic clock for every process of a machine, so the ranks' times
                # compare; a per-rank span (end - own start) would be shorter for a rank that left
                # the barrier late, and read as less idle.
                t0 = min(r[1] for r in rows)
                total = max(r[2] for r in rows) - t0
                idle = [1 - sum(b - a for _, _, a, b in tl) / total for tl, _, _, _ in rows]
                print(f"\n{schedule}, p={pp}, m={m}: "
                      f"loss {loss.item():.4f}, step {total * 1e3:.0f} ms")
                for s, (tl, _, _, peak) in enumerate(rows):
                    print(f"  stage {s} |{render(tl, t0, t0 + total)}| idle {idle[s]:.0%}, "
                          f"activations {peak / 2 ** 20:.1f} MiB")
                results.append((schedule, m, sum(idle) / pp, (pp - 1) / (m + pp - 1),
                                max(r[3] for r in rows)))
    if dist.get_rank() == 0:
        print(f"\n{'schedule':<8} {'p':>2} {'m':>2} {'idle, measured':>15} {'(p-1)/(m+p-1)':>14} "
              f"{'peak activations (worst stage)':>31}")
        for schedule, m, idle, formula, peak in results:
            print(f"{schedule:<8} {pp:>2} {m:>2} {idle:>15.1%} {formula:>14.1%} "
                  f"{peak / 2 ** 20:>27.1f} MiB")
    end_process_group()


if __name__ == "__main__":
    demo()
