"""plot.py: training drawn as SVG by hand: loss curves of runs, a pipeline schedule, ZeRO's memory.

The idea: a run's metrics.jsonl holds one JSON record per logged step (loss, lr, grad_norm,
tokens/s, ...), one per evaluation (val_loss) and, with each, the wall-clock time and the training
time elapsed since step 0. A curve is those records drawn on two axes. An SVG file is text (lines,
polylines, rectangles, labels in a <svg> tag), so no plotting library is needed, and any browser (or
the README, on a forge) shows it.

Three pictures:
    curves      training loss (thin) and held-out loss (dots) against the step or the elapsed
                time, one colour per run:
                `python plot.py out/pretrain out/run2 --svg loss.svg [--x time]`
    pipeline    which stage runs which micro-batch's forward (F) and backward (B) at each moment,
                for GPipe and 1F1B, from pipeline.py's schedules, a backward costing twice a
                forward; idle slots are the bubble, (p - 1) / (m + p - 1) of each stage's time
                for both schedules: `python plot.py --docs`
    zero        model-state bytes per GPU under DDP and ZeRO stages 1-3 (estimate.zero_table:
                2 bytes of weights, 2 of gradients, 12 of fp32 master and Adam moments per
                parameter, the sharded parts / N_d):
                `python plot.py --docs` (docs/pipeline.svg, docs/zero.svg)
"""
import argparse
import json
import math
import sys
from pathlib import Path
from xml.sax.saxutils import escape

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f"]


class SVG:
    """A canvas of width x height pixels collecting SVG elements; str() is the file."""

    def __init__(self, width, height):
        self.width, self.height, self.items = width, height, []

    def line(self, x0, y0, x1, y1, colour="#000", width=1.0):
        self.items.append(f'<line x1="{x0:.1f}" y1="{y0:.1f}" x2="{x1:.1f}" y2="{y1:.1f}" '
                          f'stroke="{colour}" stroke-width="{width}"/>')

    def polyline(self, points, colour, width=1.0):
        pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        self.items.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" '
                          f'stroke-width="{width}"/>')

    def circle(self, x, y, r, colour):
        self.items.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{colour}"/>')

    def rect(self, x, y, w, h, fill, stroke="none"):
        self.items.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" '
                          f'fill="{fill}" stroke="{stroke}"/>')

    def text(self, x, y, s, size=12, anchor="start", colour="#000"):
        self.items.append(f'<text x="{x:.1f}" y="{y:.1f}" font-family="sans-serif" '
                          f'font-size="{size}" text-anchor="{anchor}" '
                          f'fill="{colour}">{escape(str(s))}</text>')

    def __str__(self):
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" '
                f'height="{self.height}" viewBox="0 0 {self.width} {self.height}">\n'
                '<rect width="100%" height="100%" fill="white"/>\n'
                + "\n".join(self.items) + "\n</svg>\n")


def nice_ticks(lo, hi, n=5):
    """About n round tick values covering [lo, hi] (steps of 1, 2 or 5 times a power of ten)."""
    hi = max(hi, lo + 1e-9)
    raw = (hi - lo) / n
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 5, 10) if s * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def label(v):
    return f"{v:g}" if abs(v) < 1e5 else f"{v:.0e}"


# ----------------------------------------------------------------------------- loss curves
def read_metrics(out):
    """The records of OUT/metrics.jsonl (or of that file) in order, or one line on what is wrong."""
    path = Path(out) / "metrics.jsonl" if Path(out).is_dir() else Path(out)
    if not path.is_file():
        raise SystemExit(f"plot.py: error: {path}: no such file (give a run's --out folder or "
                         "its metrics.jsonl)")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            records.append(json.loads(line)) if line.strip() else None
        except json.JSONDecodeError:
            raise SystemExit(f"plot.py: error: {path}:{n}: not a JSON record") from None
    return records


def axes(svg, box, xlim, ylim, xlabel, ylabel, yticks=True):
    """Draw a frame with ticks in box = (left, top, width, height); returns (x, y) -> pixels."""
    left, top, w, h = box
    (x0, x1), (y0, y1) = xlim, ylim
    px = lambda x: left + (x - x0) / ((x1 - x0) or 1) * w  # noqa: E731
    py = lambda y: top + h - (y - y0) / ((y1 - y0) or 1) * h  # noqa: E731
    svg.rect(left, top, w, h, "none", stroke="#000")
    for t in nice_ticks(x0, x1):
        if x0 <= t <= x1:
            svg.line(px(t), top + h, px(t), top + h + 4)
            svg.text(px(t), top + h + 16, label(t), size=11, anchor="middle")
    for t in nice_ticks(y0, y1) if yticks else []:
        if y0 <= t <= y1:
            svg.line(left - 4, py(t), left, py(t))
            svg.line(left, py(t), left + w, py(t), colour="#e5e5e5")
            svg.text(left - 6, py(t) + 4, label(t), size=11, anchor="end")
    svg.text(left + w / 2, top + h + 34, xlabel, size=12, anchor="middle")
    svg.text(14, top + h / 2, ylabel, size=12, anchor="middle")
    return lambda x, y: (px(x), py(y))


def curves(runs, x="step"):
    """Training loss (lines) and held-out loss (dots) of each run against the step or the time."""
    key = "elapsed" if x == "time" else "step"
    series = []
    for out in runs:
        recs = [r for r in read_metrics(out) if key in r]
        if x == "time" and not recs:
            raise SystemExit(f"plot.py: error: {out}: its records have no elapsed time (written "
                             "by an older version): plot against --x step")
        train = [(r[key], r["loss"]) for r in recs if "loss" in r]
        val = [(r[key], r["val_loss"]) for r in recs if "val_loss" in r]
        series.append((str(out), train, val))
    points = [p for _, train, val in series for p in train + val]
    if not points:
        raise SystemExit("plot.py: error: no loss records in " + ", ".join(map(str, runs)))
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    svg = SVG(760, 460)
    to = axes(svg, (70, 20, 520, 380), (min(xs), max(xs)), (min(ys) * 0.95, max(ys) * 1.02),
              "elapsed training time (s)" if x == "time" else "step", "loss (nats per token)")
    for i, (name, train, val) in enumerate(series):
        c = COLOURS[i % len(COLOURS)]
        if train:
            svg.polyline([to(*p) for p in train], c, 1.2)
        for p in val:
            svg.circle(*to(*p), 3.5, c)
        svg.line(605, 30 + 36 * i, 625, 30 + 36 * i, c, 2)
        svg.text(630, 34 + 36 * i, Path(name).name or name, size=12)
        last = f"val {val[-1][1]:.4f}" if val else f"loss {train[-1][1]:.4f}"
        svg.text(630, 50 + 36 * i, last, size=11, colour="#555")
    svg.text(605, 36 + 36 * len(series), "line: training, dots: held-out", size=10, colour="#555")
    return svg


# ------------------------------------------------------------------- the pipeline and ZeRO pictures
def simulate(kind, m, p, t_f=1.0, t_b=2.0):
    """Start and end of every op of every stage when each stage runs pipeline.make_schedule's order
    and an op waits for its input: F(i) on stage s after F(i) on s - 1, B(i) on s after B(i) on
    s + 1 (and after F(i) on the last stage). Returns [[(op, i, start, end)] per stage]."""
    from pipeline import make_schedule
    todo = [list(make_schedule(kind, m, p, s)) for s in range(p)]
    done, clock, rows = {}, [0.0] * p, [[] for _ in range(p)]
    while any(todo):
        progressed = False
        for s in range(p):
            if not todo[s]:
                continue
            op, i = todo[s][0]
            dep = (("F", i, s - 1) if s > 0 else None) if op == "F" else \
                (("B", i, s + 1) if s < p - 1 else ("F", i, s))
            if dep is not None and dep not in done:
                continue
            start = max(clock[s], done.get(dep, 0.0))
            end = start + (t_f if op == "F" else t_b)
            done[(op, i, s)], clock[s] = end, end
            rows[s].append((op, i, start, end))
            todo[s].pop(0)
            progressed = True
        assert progressed, "the schedule deadlocks"
    return rows


def pipeline_picture(m=4, p=4):
    svg, unit, top = SVG(900, 60 + 2 * (p * 26 + 50)), 20, 30
    for kind in ("gpipe", "1f1b"):
        rows = simulate(kind, m, p)
        end = max(e for r in rows for *_, e in r)
        bubble = (p - 1) / (m + p - 1)
        svg.text(10, top, f"{kind}: p = {p} stages, m = {m} micro-batches; idle (grey) = "
                          f"(p-1)/(m+p-1) = {bubble:.0%} of each stage's time", size=13)
        for s, row in enumerate(rows):
            y = top + 10 + 26 * s
            svg.text(10, y + 16, f"stage {s}", size=11)
            svg.rect(70, y, end * unit, 22, "#eeeeee")
            for op, i, a, b in row:
                svg.rect(70 + a * unit, y, (b - a) * unit, 22,
                         COLOURS[i % len(COLOURS)] if op == "F" else "#ffffff",
                         stroke=COLOURS[i % len(COLOURS)])
                svg.text(70 + (a + b) / 2 * unit, y + 15, f"{op}{i}", size=10, anchor="middle",
                         colour="#fff" if op == "F" else "#000")
        top += p * 26 + 50
    svg.text(10, top, "F: forward of micro-batch i (filled), B: its backward (outlined, "
                      "twice as long).", size=11)
    svg.text(10, top + 16, "1F1B starts backwards early: at most p micro-batches' activations "
                           "held at once (GPipe: all m).", size=11)
    return svg


def zero_picture(n_params=7.5e9, gpus=64):
    """The ZeRO paper's Figure 1: 7.5 B parameters on 64 GPUs, GB of model states per GPU."""
    from estimate import zero_table
    rows = zero_table(n_params, gpus)
    svg = SVG(760, 330)
    top_gb = max(r["total"] for r in rows) / 1e9
    to = axes(svg, (70, 40, 480, 220), (0, top_gb * 1.1), (0, 4), "GB of model states per GPU", "",
              yticks=False)
    parts = (("params", "16-bit weights", "#1f77b4"), ("grads", "16-bit gradients", "#ff7f0e"),
             ("optimizer", "fp32 master + Adam m, v", "#2ca02c"))
    svg.text(70, 24, f"model states per GPU, {n_params / 1e9:g} B parameters, N_d = {gpus} "
                     "data-parallel GPUs", size=13)
    for k, r in enumerate(rows):
        y0 = to(0, 3.8 - k)[1]
        x = 0.0
        for key, _, colour in parts:
            gbs = r[key] / 1e9
            (xa, _), (xb, _) = to(x, 0), to(x + gbs, 0)
            svg.rect(xa, y0, max(xb - xa, 0.5), 30, colour)
            x += gbs
        svg.text(8, y0 + 20, "DDP" if r["stage"] == 0 else f"ZeRO-{r['stage']}", size=12)
        svg.text(to(x, 0)[0] + 6, y0 + 20, f"{r['total'] / 1e9:.1f} GB", size=11)
    for j, (_, name, colour) in enumerate(parts):
        svg.rect(570, 60 + 24 * j, 14, 14, colour)
        svg.text(590, 72 + 24 * j, name, size=11)
    return svg


def main(argv=None):
    ap = argparse.ArgumentParser(prog="plot.py",
                                 description="Loss curves of runs, or the docs' pictures, as SVG.")
    ap.add_argument("runs", nargs="*", help="runs' --out folders (or metrics.jsonl files)")
    ap.add_argument("--x", choices=("step", "time"), default="step", help="the horizontal axis")
    ap.add_argument("--svg", default="loss.svg", help="the picture of the curves")
    ap.add_argument("--docs", action="store_true", help="write docs/pipeline.svg and docs/zero.svg")
    args = ap.parse_args(argv)
    if not args.runs and not args.docs:
        ap.error("give one or more runs' --out folders, or --docs")
    written = []
    if args.runs:
        Path(args.svg).write_text(str(curves(args.runs, args.x)))
        written.append(args.svg)
    if args.docs:
        docs = Path(__file__).resolve().parent / "docs"
        docs.mkdir(exist_ok=True)
        for name, svg in (("pipeline.svg", pipeline_picture()), ("zero.svg", zero_picture())):
            (docs / name).write_text(str(svg))
            written.append(str(docs / name))
    print("wrote " + ", ".join(written))


if __name__ == "__main__":
    sys.exit(main())
