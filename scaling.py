"""scaling.py: a small scaling-law lab: IsoFLOP profiles and a parametric loss fit, on a CPU.

The idea (Kaplan et al. 2020; Hoffmann et al. 2022, "Chinchilla"): at a fixed training compute C, a
model too small underfits and one too large sees too few tokens; the final loss as a function of
model size N has a minimum that moves with C as a power law. Two of Chinchilla's three approaches:

    compute per run   C = F(N) x D;  F(N) = 6 N + 6 L d T FLOPs per token (model.py's count: N
                      are the parameters in matrix multiplies, the second term attention's scores)
    approach 2        for each C, fit a parabola to loss vs log N (an IsoFLOP profile); its vertex
                      is N_opt(C); then N_opt = k C^a by least squares in log-log space
                                                               (Chinchilla: a = 0.49, about 0.5)
    approach 3        L(N, D) = E + A / N^alpha + B / D^beta, fitted by least squares on log L,
                      the residual log L_hat - log L with
                      log L_hat = logsumexp(log A - alpha log N, log B - beta log D, log E),
                      Levenberg-Marquardt from a grid of starts; it implies
                      N_opt ~ C^(beta / (alpha + beta))
                                          (Chinchilla: alpha = 0.34, beta = 0.28, E = 1.69 nats)
    uncertainty       bootstrap: refit on runs drawn with replacement; +- is half the 16-84th
                      percentile range.

Every run is the project's own training loop (training.py, called as a function with a
flags.TrainConfig: `train`) in this process, on the embedded corpus (Python's standard library as
bytes), a model of the tiny preset's family (head dimension 32, 2 query heads per key/value head,
d_ff = 3 d, context T = 128) of width d and depth L, trained for D = C / F(N) tokens with a cosine
schedule that ends with the run (Chinchilla's lesson: a schedule longer than the run biases the
comparison).

How far this is from the paper: Chinchilla's runs span 70M-16B parameters, 5e18-3e21 FLOPs and
subword tokens of web text; these span 10k-350k parameters, 3e11-3e12 FLOPs (ten million times less
compute) and bytes of Python, with one learning rate for every size and one seed. The shape of the
result (a parabola per budget, its vertex moving right with C) is what carries over; the fitted
exponents are rough, and the irreducible loss E here is that of bytes of code, not of English
tokens.

Run: `make scaling` (python scaling.py) trains the sweep (14 runs, 17,119 steps of 2048 tokens: 8
minutes on 2 CPU cores shared with light other work, as measured once), appending one line per
finished run to out/scaling/runs.jsonl; an interrupted sweep, run again, skips the finished runs and
resumes the unfinished one from its checkpoint. `python scaling.py --fit-only` refits and replots
what is there.
"""
import argparse
import contextlib
import io
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import data as data_lib
import flags
import model as model_lib
import stack
import training
from batches import Batches, eval_batches
from model import Transformer, config_dict, flops_per_token, num_params, pad_vocab

SEQ_LEN, BATCH = 128, 16                                     # 2048 tokens per step
# The family: (layers, width); depth grows slowly with width, as in Kaplan's and Chinchilla's.
LADDER = [(2, 16), (2, 24), (2, 32), (2, 48), (2, 64), (3, 80), (3, 96), (4, 128)]
BUDGETS = [3e11, 1e12, 3e12]                                # FLOPs per run
# sizes whose D/N at a budget falls in this range run
TOKENS_PER_PARAM = (2, 350)
CHINCHILLA = {"a": 0.49, "alpha": 0.34, "beta": 0.28, "E": 1.69, "tokens_per_param": 20}


# ----------------------------------------------------------------------------- the sweep
def shape(n_layer, d_model):
    """The tiny preset's family: head dimension 32 (2 heads at least), grouped-query 2:1."""
    n_head = max(2, d_model // 32)
    return replace(model_lib.PRESETS["tiny"], n_layer=n_layer, d_model=d_model, n_head=n_head,
                   n_kv_head=max(1, n_head // 2), d_ff=3 * d_model, block_size=SEQ_LEN)


def counts(cfg):
    """(N in matmuls, FLOPs per token) of the model as built on the meta device."""
    with torch.device("meta"):
        n = num_params(Transformer(cfg), matmul_only=True)
    return n, flops_per_token(cfg, n, SEQ_LEN)


def plan(budgets, ladder=LADDER, tokens_per_param=TOKENS_PER_PARAM, min_steps=20):
    """Every (budget, shape) run of the sweep with its N, steps and tokens D."""
    runs = []
    for C in budgets:
        for L, d in ladder:
            n, fpt = counts(shape(L, d))
            steps = round(C / fpt / (SEQ_LEN * BATCH))
            D = steps * SEQ_LEN * BATCH
            if tokens_per_param[0] <= D / n <= tokens_per_param[1] and steps >= min_steps:
                runs.append({"key": f"C{C:.0e}-L{L}-d{d}", "budget": C, "n_layer": L, "d_model": d,
                             "N": n, "D": D, "steps": steps, "flops": fpt * D})
    return runs


def config_for(run, run_dir, lr):
    """The run's flags: the shared defaults, with the sweep's batch, length, schedule (a cosine that
    ends with the run, 5% warm-up) and cadence (one evaluation, at the end), on the CPU in fp32."""
    base, steps = flags.defaults("scaling"), run["steps"]
    optim = replace(base.optim, lr=lr, max_steps=steps, warmup_steps=max(1, steps // 20))
    settings = replace(base.settings, out=str(run_dir), save_every=200, eval_every=steps,
                       log_every=steps, device="cpu", amp="fp32")
    layout = replace(base.layout, batch_size=BATCH, seq_len=SEQ_LEN)
    return replace(base, optim=optim, layout=layout, settings=settings)


def train(cfg, model_cfg, eval_iters=20):
    """One run of training.py's loop in this process, on the embedded corpus: resumed from its
    checkpoint when cfg's --out holds one of the same run. Returns training.Run."""
    cfg = flags.resolved(cfg)  # (--attn unset: sdpa)
    _, _, device = stack.setup_distributed(cfg.settings.device)
    ckpt = training.read_checkpoint(cfg.settings, 0)
    data_dir = data_lib.ensure_default_data(data_lib.DEFAULT_TOKENIZER)
    meta = data_lib.load_meta(data_dir, data_lib.DEFAULT_TOKENIZER)
    model_cfg = replace(model_cfg, vocab_size=pad_vocab(meta["vocab_size"]), attn=cfg.settings.attn)
    model_config = config_dict(replace(model_cfg, attn="-"))
    identity = training.check_same_run(cfg, ckpt, max_steps=cfg.optim.max_steps,
                                       model_config=model_config, tokenizer=meta["tokenizer"])
    topo = stack.build_topology(cfg.layout, 1, device, cfg.settings.dist_timeout)
    lay = cfg.layout
    batches = Batches(data_dir, lay.seq_len, lay.batch_size, 0, 1, 1, cfg.settings.seed)
    val = eval_batches(data_dir, lay.seq_len, lay.batch_size, eval_iters)
    model = stack.build_model(model_cfg, topo, cfg.settings.seed, device, torch.float32)
    meta = {"tokenizer": meta["tokenizer"], "model_config": model_config, "identity": identity}
    run = training.start(cfg, topo, device, model, batches, val, cfg.optim.max_steps, meta,
                         counts(model_cfg)[1], ckpt)
    training.train_loop(run)
    training.finish(run)
    return run


def train_one(run, out, lr, threads):
    """One run of the sweep; returns its final validation loss. Resumes from its checkpoint if
    any."""
    run_dir = out / "runs" / run["key"]
    torch.set_num_threads(threads)
    with contextlib.redirect_stdout(io.StringIO()):
        train(config_for(run, run_dir, lr), shape(run["n_layer"], run["d_model"]))
    finals = [r["val_loss"] for r in map(json.loads, open(run_dir / "metrics.jsonl"))
              if "val_loss" in r and r["step"] == run["steps"]]
    return finals[-1]


def sweep(runs, out, lr, threads):
    """Train each run not yet in runs.jsonl, appending it as it finishes (a stop loses one run)."""
    out.mkdir(parents=True, exist_ok=True)
    results = out / "runs.jsonl"
    done = {r["key"] for r in read_results(results)}
    todo = [r for r in runs if r["key"] not in done]
    print(f"sweep: {len(runs)} runs ({len(runs) - len(todo)} done), "
          f"{sum(r['flops'] for r in todo):.3g} FLOPs to go, results in {results}", flush=True)
    for i, run in enumerate(todo):
        if run["key"] in {r["key"] for r in read_results(results)}:
            # finished meanwhile by another invocation (one per budget can share the cores)
            continue
        t0 = time.perf_counter()
        val_loss = train_one(run, out, lr, threads)
        rec = dict(run, val_loss=val_loss, seconds=round(time.perf_counter() - t0, 1))
        with open(results, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"[{i + 1}/{len(todo)}] C {run['budget']:.0e}  L{run['n_layer']} "
              f"d{run['d_model']:<4} N {run['N']:>9,}  D {run['D']:>11,} "
              f"({run['D'] / run['N']:5.1f} tokens/param)  val loss {val_loss:.4f}  "
              f"{rec['seconds']:.0f} s", flush=True)


def read_results(path):
    return [json.loads(line) for line in open(path)] if Path(path).exists() else []


# --------------------------------------------------------------------- approach 2: IsoFLOP profiles
def isoflop_optima(results):
    """{budget: N_opt}: the vertex of a parabola in log N through each budget's losses (3+ sizes
    needed)."""
    optima = {}
    for C in sorted({r["budget"] for r in results}):
        pts = [(math.log(r["N"]), r["val_loss"]) for r in results if r["budget"] == C]
        if len({x for x, _ in pts}) < 3:
            continue
        c2, c1, _ = np.polyfit(*zip(*pts), 2)
        # a minimum; a profile without one (all sizes on one side of it) says nothing about N_opt
        if c2 > 0:
            optima[C] = math.exp(-c1 / (2 * c2))
    return optima


def fit_power(xs, ys):
    """y = k x^a by least squares in log-log space: (a, k)."""
    a, logk = np.polyfit(np.log(xs), np.log(ys), 1)
    return a, math.exp(logk)


def approach2(results):
    """(a, k, optima): N_opt = k C^a over the budgets whose profiles have a minimum."""
    optima = isoflop_optima(results)
    if len(optima) < 2:
        return None, None, optima
    a, k = fit_power(list(optima), list(optima.values()))
    return a, k, optima


# ----------------------------------------------------------------------------- approach 3: L(N, D)
def _model_and_jacobian(theta, x, y):
    """log L_hat and its Jacobian in theta = (log A, alpha, log B, beta, log E), at x = log N and
    y = log D."""
    la, alpha, lb, beta, le = theta
    terms = np.stack([la - alpha * x, lb - beta * y, np.full_like(x, le)])
    top = terms.max(0)
    w = np.exp(terms - top)
    total = w.sum(0)
    # the softmax weights are the partial derivatives
    w = w / total
    J = np.stack([w[0], -w[0] * x, w[1], -w[1] * y, w[2]], axis=1)
    return top + np.log(total), J


def _levenberg_marquardt(theta, x, y, target, iters=200):
    lam = 1e-3
    pred, J = _model_and_jacobian(theta, x, y)
    cost = np.sum((pred - target) ** 2)
    for _ in range(iters):
        r = pred - target
        step = np.linalg.solve(J.T @ J + lam * np.diag(np.diag(J.T @ J) + 1e-12), -J.T @ r)
        new = theta + step
        new_pred, new_J = _model_and_jacobian(new, x, y)
        new_cost = np.sum((new_pred - target) ** 2)
        if new_cost < cost:
            theta, pred, J, lam = new, new_pred, new_J, lam / 3
            if cost - new_cost < 1e-14:
                cost = new_cost
                break
            cost = new_cost
        else:
            lam *= 4
            if lam > 1e8:
                break
    return theta, cost


def fit_parametric(N, D, loss, starts=None):
    """Least squares on log L for L = E + A/N^alpha + B/D^beta: {E, A, alpha, B, beta}, best of a
    grid of starts."""
    x, y, target = (np.log(np.asarray(N, float)), np.log(np.asarray(D, float)),
                    np.log(np.asarray(loss, float)))
    if starts is None:
        starts = [(la, al, lb, be, le) for la in (0.0, 5.0, 10.0) for al in (0.2, 0.5)
                  for lb in (0.0, 5.0, 10.0)
                  for be in (0.2, 0.5) for le in (-1.0, 0.5)]
    best = min((_levenberg_marquardt(np.array(s, float), x, y, target) for s in starts),
               key=lambda tc: tc[1])[0]
    la, alpha, lb, beta, le = best
    return {"E": math.exp(le), "A": math.exp(la), "alpha": alpha, "B": math.exp(lb), "beta": beta}


def bootstrap(results, fit, n=100, seed=0):
    """The spread of each fitted number over refits on runs drawn with replacement; a refit
    that fails is skipped."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        pick = [results[i] for i in rng.integers(0, len(results), len(results))]
        with np.errstate(all="ignore"):
            try:
                got = fit(pick)
            except (np.linalg.LinAlgError, ValueError, TypeError, ZeroDivisionError):
                continue
        # (a fitted number is None when the runs drawn leave too few budgets)
        if got and all(v is not None and np.isfinite(v) for v in got.values()):
            samples.append(got)
    # Half the 16th-84th percentile range (one sigma for a normal spread, robust to the odd refit
    # that runs off).
    return ({k: float(np.subtract(*np.percentile([s[k] for s in samples], [84, 16])) / 2)
             for k in samples[0]} if samples else {})


# ----------------------------------------------------------------------------- the report
def ascii_plot(results, width=64, height=22):
    """Final loss vs log compute, a letter per model size: IsoFLOP profiles seen from the side."""
    sizes = sorted({r["N"] for r in results})
    marks = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    letters = {n: marks[i] if i < len(marks) else "#" for i, n in enumerate(sizes)}
    xs = [math.log10(r["flops"]) for r in results]
    ys = [r["val_loss"] for r in results]
    x0, x1, y0, y1 = min(xs), max(xs) + 1e-9, min(ys), max(ys) + 1e-9
    grid = [[" "] * width for _ in range(height)]
    for r, x, y in zip(results, xs, ys):
        row, col = (round((y1 - y) / (y1 - y0) * (height - 1)),
                    round((x - x0) / (x1 - x0) * (width - 1)))
        # (*: two runs in one cell)
        grid[row][col] = letters[r["N"]] if grid[row][col] == " " else "*"
    lines = [f"{y1 - i * (y1 - y0) / (height - 1):6.3f} |" + "".join(row).rstrip()
             for i, row in enumerate(grid)]
    lines.append(" " * 7 + "+" + "-" * width)
    lines.append(" " * 8 + f"{10 ** x0:.1e} FLOPs" + " " * (width - 26) + f"{10 ** x1:.1e}")
    lines.append("  " + "  ".join(f"{letters[n]} = {n / 1e3:.0f}k" for n in sizes)
                 + " parameters (in matmuls); * two runs in one cell")
    return "\n".join(lines)


def report(results):
    print("\nvalidation loss (nats per byte) vs compute; each letter a model size, each column "
          "of letters a budget:")
    print(ascii_plot(results))
    a, k, optima = approach2(results)
    print("\nApproach 2, IsoFLOP profiles (the vertex of a parabola in log N per budget):")
    for C, n_opt in optima.items():
        fpt = counts(shape(*min(LADDER, key=lambda s: abs(counts(shape(*s))[0] - n_opt))))[1]
        print(f"  C = {C:.0e} FLOPs: N_opt = {n_opt:,.0f}, D_opt = C / F(N) ~ {C / fpt:,.0f} "
              f"tokens (~{C / fpt / n_opt:.0f} tokens per parameter; Chinchilla: "
              f"{CHINCHILLA['tokens_per_param']})")
    if a is not None:
        err = bootstrap(results, lambda rs: {"a": approach2(rs)[0]}).get("a", float("nan"))
        print(f"  N_opt ~ C^a: a = {a:.2f} +- {err:.2f} (bootstrap)   Chinchilla: a = "
              f"{CHINCHILLA['a']}")
    else:
        print("  fewer than two budgets with a minimum: no exponent")
    fitted = None
    if len(results) >= 6:
        fitted = fit_parametric([r["N"] for r in results], [r["D"] for r in results],
                                [r["val_loss"] for r in results])
        err = bootstrap(results, lambda rs: fit_parametric([r["N"] for r in rs],
                                                           [r["D"] for r in rs],
                                                           [r["val_loss"] for r in rs],
                                                           starts=[_as_start(fitted)]), n=50)
        print("\nApproach 3, L(N, D) = E + A / N^alpha + B / D^beta (least squares on log L, "
              f"{len(results)} runs; +- bootstrap):")
        for name in ("alpha", "beta", "E"):
            print(f"  {name:<5} = {fitted[name]:.3f} +- {err.get(name, float('nan')):.3f}   "
                  f"Chinchilla: {CHINCHILLA[name]}")
        print(f"  A = {fitted['A']:.3g}, B = {fitted['B']:.3g}; implied a = beta / (alpha + "
              f"beta) = {fitted['beta'] / (fitted['alpha'] + fitted['beta']):.2f}")
    flops, sizes = [r["flops"] for r in results], [r["N"] for r in results]
    print(f"\nScale: these runs are {min(flops):.0e}-{max(flops):.0e} FLOPs, "
          f"{min(sizes) / 1e3:.0f}k-{max(sizes) / 1e3:.0f}k parameters, bytes of Python, one "
          "learning rate and one seed;\nChinchilla's are 6e18-3e21 FLOPs, 70M-16B parameters, "
          "subword tokens of web text. Read the shape, not the digits.")
    return {"a": a, "optima": optima, "parametric": fitted}


def _as_start(fit):
    return (math.log(fit["A"]), fit["alpha"], math.log(fit["B"]), fit["beta"], math.log(fit["E"]))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="scaling.py", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="out/scaling",
                    help="runs.jsonl and each run's checkpoint go here")
    ap.add_argument("--budgets", default=",".join(f"{c:.0e}" for c in BUDGETS),
                    help="FLOPs per run, comma-separated")
    ap.add_argument("--sizes", default=",".join(f"{L}x{d}" for L, d in LADDER),
                    help="the model family: layers x width, comma-separated")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--fit-only", action="store_true",
                    help="fit and plot the runs already in runs.jsonl")
    args = ap.parse_args(argv)
    try:
        budgets = [float(c) for c in args.budgets.split(",")]
    except ValueError:
        ap.exit(2, "scaling.py: error: --budgets must be numbers separated by commas, got "
                   f"{args.budgets!r}\n")
    try:
        ladder = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
        assert all(len(s) == 2 and s[0] > 0 and s[1] > 0 for s in ladder)
    except (ValueError, AssertionError):
        ap.exit(2, "scaling.py: error: --sizes must be layers x width, like 2x32,3x96, got "
                   f"{args.sizes!r}\n")
    for L, d in ladder:
        if d % shape(L, d).n_head or shape(L, d).head_dim % 2:
            ap.exit(2, f"scaling.py: error: --sizes {L}x{d}: width {d} does not split into "
                       f"{shape(L, d).n_head} heads of an even size (head dimension 32, at least "
                       "2 heads): try a multiple of 32\n")
    if any(c <= 0 for c in budgets) or args.lr <= 0 or args.threads < 1:
        ap.exit(2, "scaling.py: error: --budgets and --lr must be positive, --threads at least 1\n")
    out = Path(args.out)
    runs = plan(budgets, ladder)
    if not args.fit_only:
        if not runs:
            ap.exit(2, f"scaling.py: error: no model of the ladder fits --budgets {args.budgets} "
                       f"({TOKENS_PER_PARAM[0]}-{TOKENS_PER_PARAM[1]} tokens per parameter)\n")
        t0 = time.perf_counter()
        sweep(runs, out, args.lr, args.threads)
        print(f"sweep time (this invocation): {time.perf_counter() - t0:.0f} s")
    keys = {r["key"] for r in runs}
    results = [r for r in read_results(out / "runs.jsonl") if args.fit_only or r["key"] in keys]
    if len(results) < 3:
        print(f"scaling.py: {len(results)} runs in {out / 'runs.jsonl'}: too few to fit",
              file=sys.stderr)
        return {"results": results}
    return dict(report(results), results=results)


if __name__ == "__main__":
    main()
