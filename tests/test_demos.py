"""Every command of the README's map, run as a reader runs it (a subprocess; torchrun as
`python -m torch.distributed.run --standalone`), with a smaller size where the demo is long
(DEMO_STEPS, or the demo's own flags), asserting that the figures it prints are what the file's
docstring says they show.

test_every_map_command_is_run fails when a row of the map has no test here."""
import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args, nproc=None, env=None, timeout=300):
    """stdout of `python ARGS` (torchrun with nproc); a failure shows the end of both streams."""
    launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone",
                                    f"--nproc_per_node={nproc}"] if nproc else [])
    proc = subprocess.run(launcher + [str(a) for a in args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert proc.returncode == 0, (f"{args}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n"
                                  f"{proc.stderr[-3000:]}")
    return proc.stdout


def numbers(pattern, text):
    """Every match of `pattern`'s first group, as floats (commas of thousands dropped)."""
    return [float(m.replace(",", "")) for m in re.findall(pattern, text)]


# ------------------------------------------------------------------------- one test per map command
def test_model(stdlib_data):
    out = run("model.py")
    assert re.search(r"^tiny\s+853,120\s", out, re.M), out  # the preset table, tiny first
    assert len(re.findall(r"^(tiny|small|gpt2-124m|1b)\s+[\d,]+\s+[\d,]+\s+[\d.e+]+$",
                          out, re.M)) == 4, out
    assert numbers(r"max \|naive - sdpa\| logits \(float64\): (\S+)", out)[0] < 1e-12


def test_data_prepare(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("def f(x):\n    return x + 1\n" * 200)
    out = run("data.py", "prepare", "--src", tmp_path / "src", "--out", tmp_path / "data")
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert (meta["tokenizer"] == "bytes" and meta["tokens"]["train"] > 0
            and '"vocab_size": 257' in out)


def test_bpe():
    """The demo learns merges on bpe.py, writes a GPT-2-style tokenizer.json and encodes with it."""
    out = run("bpe.py")
    n_bytes, n_tokens = map(int, re.search(r"(\d+) bytes -> (\d+) tokens", out).groups())
    assert "learned 300 merges" in out and 0 < n_tokens < n_bytes, out
    assert "'<|endoftext|>'" in out.split("pieces:")[1], out


def test_chat():
    """### headers, a folder's ChatML template: the learned text is each reply and its end token."""
    out = run("chat.py")
    assert ("[flog<|endoftext|>]" in out and "[flog<|im_end|>]" in out
            and "[ohce<|im_end|>]" in out), out
    assert "its Jinja chat template" in out and "<|im_start|>assistant\\n" in out, out


def test_amp():
    import quantization
    out = run("amp.py")
    losses = dict(re.findall(r"^(fp32|bf16|fp16|fp8): losses (.*)$", out, re.M))
    curves = {name: numbers(r"(\d+\.\d+)(?:\(skipped\))?", line.split("final")[0])
              for name, line in losses.items()}
    assert curves["fp32"][-1] < curves["fp32"][0] - 1.0  # it trains
    # 16-bit rounding moves the curve far less than training does (up to the skip)
    for name in ("bf16", "fp16"):
        assert max(abs(a - b) for a, b in zip(curves[name][:5], curves["fp32"][:5])) < 0.05, out
    fp16 = losses["fp16"].split()
    # The skipped step applied nothing: the next loss is the same.
    assert fp16[4].endswith("(skipped)") and fp16[5] == fp16[4].removesuffix("(skipped)")
    assert sum("(skipped)" in x for x in fp16) == 1 and "final loss scale 131072" in losses["fp16"]
    assert "(skipped) marks that step" in out  # and the demo says what it means
    if why := quantization.fp8_unsupported("cpu"):  # no fp8 row rather than one computed in bf16
        assert "fp8" not in losses and f"fp8: not run: {why}" in out, out
    else:  # FP8 matmuls really ran: another curve than bf16's, the same training
        swapped = r"^fp8: the bf16 model with [1-9]\d* linear layers' matmuls in FP8"
        assert re.search(swapped, out, re.M), out
        assert curves["fp8"] != curves["bf16"] and curves["fp8"][-1] < curves["fp8"][0] - 1.0, out
        assert max(abs(a - b) for a, b in zip(curves["fp8"][:4], curves["fp32"][:4])) < 0.1, out
    # fp16 at lr 1 overflows in the forward: the guard ends it 8 steps after the loss turns nan
    assert re.search(r"^fp16 at lr 1: stopped after step \d+: "
                     r"the loss was nan for 8 steps in a row", out, re.M), out


def test_pretrain_help():
    out = run("pretrain.py", "--help")
    for flag in ("--model", "--batch-size", "--grad-accum", "--zero", "--tp", "--pp", "--ep",
                 "--amp"):
        assert flag in out


def test_sft_help():
    """flags.py's shared flags with sft.py's defaults, each shown in --help."""
    out = run("sft.py", "--help")
    for flag in ("--init", "--pack", "--lora-r", "--zero", "--tp", "--pp", "--cp", "--fresh"):
        assert flag in out
    assert re.search(r"--lr LR\s+peak learning rate \(AdamW\) \(default: 0.0005\)", out), out


def test_make_estimate():
    makefile = (ROOT / "Makefile").read_text()
    cmd = re.search(r"^estimate:.*\n\t\$\(PY\) (.*)$", makefile, re.M).group(1).split()
    out = run(*cmd)
    assert "162,220,800" in out  # gpt2-124m's parameters, as model.py counts them


def test_make_scaling(tmp_path, stdlib_data):
    """`make scaling`'s command on one tiny budget and three one-layer sizes (the sweep: 8 min)."""
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^scaling:.*\n\tOMP_NUM_THREADS=1 \$\(PY\) scaling.py --out out/scaling$",
                     makefile, re.M)
    out = run("scaling.py", "--budgets", "8e9", "--sizes", "1x16,1x24,1x32", "--out", tmp_path)
    assert ("sweep: 3 runs (0 done)" in out and "Approach 2" in out
            and "Chinchilla's are" in out), out
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 3


def test_flash_attn():
    out = run("flash_attn.py")  # on a CPU: the PyTorch twin against float64 naive attention
    errors = numbers(r"(?:out|dq|dk|dv) (\d\.\d+e-\d+)", out)
    assert len(errors) >= 4 and max(errors) < 1e-12, out


def test_context_parallel():
    out = run("context_parallel.py", "--seq-len", "128", "--reps", "1", nproc=4)
    rows = re.findall(r"^\s+([124])\s+(\S+)\s+(\S+)\s+\S+\s+(\S+)\s+(\S+)\s+(\S+)\s+\S+$",
                      out, re.M)
    assert [r[0] for r in rows] == ["1", "2", "4"], out
    # attention's activations 1/cp; bytes sent as the formula says
    for cp, _, ratio, err, sent, formula in rows:
        assert float(ratio) == 1 / int(cp) and float(err) < 1e-5 and sent == formula, out
    model = re.findall(r"^\s+([124])\s+\S+\s+(\S+)\s+\S+\s+(\S+)\s+\S+\s+(\S+)$", out, re.M)
    assert [r[0] for r in model] == ["1", "2", "4"], out
    # the whole model's activations 1/cp too; the same loss at every cp
    for cp, attention, rest, loss in model:
        assert float(attention) == float(rest) == 1 / int(cp) and loss == model[0][3], out


def test_ddp(stdlib_data):
    out = run("ddp.py", nproc=2, env={"DEMO_STEPS": "10"})
    losses = numbers(r"loss \(mean over ranks\) (\d+\.\d+)", out)
    assert len(losses) == 2 and losses[-1] < 4.5, out  # from ln 320 = 5.77: real text, it learns
    assert "replicas identical after training: True" in out


def test_zero():
    out = run("zero.py", nproc=2)
    rows = re.findall(r"stage (\d): params +(\S+)/ *(\S+) +grads +(\S+)/ *(\S+) "
                      r"+optimizer +(\S+)/ *(\S+) +total (\S+)x formula \| losses (.*)", out)
    # 4 stages x 2 ranks
    assert sorted(r[0] for r in rows) == ["0", "0", "1", "1", "2", "2", "3", "3"], out
    for stage, *cells, total, losses in rows:
        measured, formula = cells[0::2], cells[1::2]
        assert measured == formula and total == "1.000", (stage, cells, total)
        assert losses == rows[0][-1]  # every stage trains the same model the same way


def test_bench_says_when_a_ratio_misses_its_goal():
    from benchmarks.bench_dp import against_goal
    assert against_goal("throughput", 0.8, 1.0) == "throughput 0.800x: below goal (x0.800 < x1)"
    assert against_goal("throughput", 0.95, 0.95) == "throughput 0.950x (goal >= 0.95x)"
    assert against_goal("throughput", 1.2, 0.9) == "throughput 1.200x (goal >= 0.9x)"
    memory = lambda ratio: against_goal("peak memory", ratio, 1.0, at_least=False)
    assert memory(1.05) == "peak memory 1.050x: over goal (x1.050 > x1)"
    assert memory(0.9) == "peak memory 0.900x (goal <= 1x)"


def missed_goals(out, ratios):
    """Each pair's printed line says "below goal" / "over goal" exactly when its ratio misses."""
    for name, r in ratios.items():
        line = next(x for x in out.splitlines() if x.startswith(f"{name}: throughput"))
        assert ("below goal" in line) == (r["throughput"] < r["goal"]), line
        assert ("over goal" in line) == (r["memory"] > 1), line
    missed = [n for n, r in ratios.items() if r["throughput"] < r["goal"] or r["memory"] > 1]
    assert (f"goal missed by: {', '.join(missed)}" in out) == bool(missed), out


def test_make_bench(tmp_path):
    makefile = (ROOT / "Makefile").read_text()
    assert "$(PY) benchmarks/bench_dp.py --out out/bench/bench_dp.json" in makefile
    out = run("benchmarks/bench_dp.py", "--steps", "1", "--warmup", "1", "--repeats", "1",
              "--out", tmp_path / "b.json")
    ratios = json.loads((tmp_path / "b.json").read_text())["ratios"]
    # (timings of one step say little: not checked)
    for pair in ("ours-ddp/torch-ddp", "ours-zero3/torch-fsdp2"):
        assert ratios[pair]["max_loss_difference"] < 1e-5 and ratios[pair]["memory"] > 0, ratios
    missed_goals(out, ratios)
    # bench_parallel.py's pipeline row (its world-4 row, ZeRO-3 x tp against FSDP2 over torch's
    # tensor parallelism, costs about half a minute more on 2 cores: left to make bench)
    assert "$(PY) benchmarks/bench_parallel.py --out out/bench/bench_parallel.json" in makefile
    out = run("benchmarks/bench_parallel.py", "--rows", "1f1b-pp2", "--steps", "1", "--warmup", "0",
              "--repeats", "1", "--out", tmp_path / "p.json")
    rows = json.loads((tmp_path / "p.json").read_text())["rows"]
    assert rows["1f1b-pp2"]["max_loss_difference"] < 1e-5 and rows["1f1b-pp2"]["memory"] > 0, rows
    missed_goals(out, rows)


def test_bench_pack(tmp_path, stdlib_data):
    run("benchmarks/bench_pack.py", "--steps", "2", "--warmup", "1", "--repeats", "1",
        "--out", tmp_path / "p.json")
    report = json.loads((tmp_path / "p.json").read_text())
    padded, packed = report["padded"], report["packed"]
    assert (0 < report["padding_removed"] <= 1
            and packed["padding_fraction"] < padded["padding_fraction"]), report
    # The same examples in fewer, fuller rows.
    assert packed["tokens_per_step"] < padded["tokens_per_step"]


def test_tensor_parallel():
    out = run("tensor_parallel.py", nproc=2)
    rows = re.findall(r"tp rank (\d)/2.*\| loss (\S+) vs one process (\S+) "
                      r"\| max \|grad difference\| (\S+)", out)
    assert len(rows) == 4, out  # 2 ranks, without and with sequence parallelism
    for _, loss, ref, grad_diff in rows:
        assert float(loss) == pytest.approx(float(ref), rel=1e-12) and float(grad_diff) < 1e-12


def test_pipeline():
    out = run("pipeline.py", "--microbatches", "1", "4", "--micro-batch-size", "2",
              "--seq-len", "16", nproc=4)
    table = re.findall(r"^(gpipe|1f1b) +4 +(\d) +(\S+)% +(\S+)% +(\S+) MiB$", out, re.M)
    assert [(s, m) for s, m, *_ in table] == [("gpipe", "1"), ("1f1b", "1"),
                                              ("gpipe", "4"), ("1f1b", "4")], out
    for schedule, m, idle, formula, _ in table:
        assert float(formula) == pytest.approx(100 * 3 / (int(m) + 3), abs=0.05)
        assert 0 < float(idle) < 100
    # a timeline per stage and run
    assert len(re.findall(r"^  stage [0-3] \|[FfBb.]+\| idle", out, re.M)) == 4 * 4
    gpipe4, f1b4 = (float(r[4]) for r in table[2:])
    assert f1b4 <= gpipe4  # 1F1B holds fewer micro-batches in flight


def test_topology():
    out = run("topology.py", "--tp", "2", nproc=4)
    for line in ("rank 0/4: dp 0/2 pp 0/1 tp 0/2 | tp group [0, 1] pp group [0] dp group [0, 2]",
                 "rank 3/4: dp 1/2 pp 0/1 tp 1/2 | tp group [2, 3] pp group [3] dp group [1, 3]"):
        assert line in out, out


def test_moe(stdlib_data):
    # 60 steps, as the README's run: at 30 the load can tie.
    out = run("moe.py", nproc=2, env={"DEMO_STEPS": "60"})
    (busy0, idle0), (busy1, idle1) = [tuple(map(float, m)) for m in
                                      re.findall(r"busiest expert (\S+)%  idlest (\S+)%", out)]
    assert busy1 < busy0 and idle1 >= idle0, out  # the balancing loss spreads the load
    assert 12.5 <= busy1 and idle1 <= 12.5


def test_make_sft(tmp_path, stdlib_data):
    """`make sft` runs sft.py --init on a pretrained folder: here a tiny random one, a few steps."""
    from tests.sft_fixtures import CFG, make_init
    assert re.search(r"^\t\$\(PY\) sft.py --init out/pretrain \$\(SFT_FLAGS\)$",
                     (ROOT / "Makefile").read_text(), re.M)
    # block_size 512: the embedded set's prompts fit.
    init = make_init(tmp_path / "base", replace(CFG, block_size=512))
    out = run("sft.py", "--init", init, "--out", tmp_path / "sft", "--max-steps", "2",
              "--batch-size", "4", "--eval-examples", "4", "--samples", "1",
              "--max-new-tokens", "4", "--log-every", "1")
    assert "held-out" in out and (tmp_path / "sft" / "latest").exists(), out


def test_lora():
    out = run("lora.py")
    assert numbers(r"step 0, max \|adapted - base\| logits: (\S+)", out) == [0.0]
    assert numbers(r"max \|merged - adapted\| logits: (\S+)", out)[0] < 1e-5
    assert numbers(r"LoRA / full: (\S+)%", out)[0] < 20


def test_checkpoint_commands(tmp_path, stdlib_data):
    """`python checkpoint.py consolidate` and `export-hf` on a run's folder, as the map shows them
    (on a 2-step run here); the consolidated file and the Hugging Face folder each start a run
    with --init."""
    run("pretrain.py", "--model", "tiny", "--seq-len", "32", "--batch-size", "4",
        "--max-steps", "2", "--eval-iters", "1", "--sample-tokens", "0", "--out", tmp_path / "run")
    out = run("checkpoint.py", "consolidate", tmp_path / "run", tmp_path / "model.pt")
    out += run("checkpoint.py", "export-hf", tmp_path / "run", tmp_path / "hf")
    assert "model.pt" in out and (tmp_path / "hf" / "model.safetensors").exists(), out
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["architectures"] == ["LlamaForCausalLM"]
            and config["num_hidden_layers"] == 4), config
    for init in (tmp_path / "model.pt", tmp_path / "hf"):
        out = run("pretrain.py", "--init", init, "--seq-len", "32", "--batch-size", "4",
                  "--max-steps", "1", "--eval-iters", "1", "--sample-tokens", "0",
                  "--out", tmp_path / f"from-{init.name}")
        assert "step     1 |" in out or "step 1 |" in out, out


def test_quantization():
    out = run("quantization.py")
    assert (re.search(r"^fp8 e4m3\s+8\s+4\s+3\s+448\s", out, re.M)
            and re.search(r"^int8\s+8\s+-\s+-\s+127\s", out, re.M))
    ratios = numbers(r"fp8 max error/bound (\S+)", out)
    assert len(ratios) == 3 and max(ratios) <= 1.0, out  # forward, dX, dW within the epsilon bound
    for name in ("bf16", "fp8"):
        curve = numbers(r"(\d+\.\d+)",
                        re.search(rf"^{name} \(tiny preset.*losses (.*)$", out, re.M).group(1))
        assert curve[-1] < curve[0] - 1.0, (name, curve)  # both train
    assert numbers(r"max \|W - q s\| / \(s / 2\) = (\S+)", out)[0] <= 1.0


def test_generate(tmp_path):
    """`python generate.py PATH --prompt ...` on a tiny random model's consolidated file (any path
    weights.py reads will do), greedy, with the KV cache and without: the same text, each with a
    line of tokens/s."""
    from model import PRESETS
    from tests.sft_fixtures import make_init
    init = make_init(tmp_path, replace(PRESETS["tiny"], vocab_size=320))
    prompt = "def parse(line):\n    key, val = "  # 32 bytes
    outs = [run("generate.py", init, "--prompt", prompt, "--temperature", "0",
                "--max-new-tokens", "48", *extra)
            for extra in ([], ["--no-cache"])]
    (text, stats), (text_nc, stats_nc) = (out.rstrip("\n").rsplit("\n", 1) for out in outs)
    assert text == text_nc and text.startswith(prompt), outs
    for line, cache in ((stats, r"KV cache of 79 positions: [\d,]+ bytes"), (stats_nc, "no cache")):
        assert re.fullmatch(r"prefill 32 tokens: [\d,.]+ tokens/s \| "
                            r"decode 47 tokens: [\d,.]+ tokens/s \| "
                            rf"{cache} \| stopped at --max-new-tokens", line), line


# ----------------------------------------------------------------------------------- the map itself
def test_plot(tmp_path):
    """The docs' pictures: the bubble (p-1)/(m+p-1) = 3/7 for both schedules, the ZeRO paper's
    120 / 31.4 / 16.6 / 1.9 GB; and a run's curves: one polyline per run, one dot per evaluation."""
    out = run("plot.py", "--docs")
    pipeline_svg, zero_svg = ((ROOT / "docs" / "pipeline.svg").read_text(),
                              (ROOT / "docs" / "zero.svg").read_text())
    assert ("docs/pipeline.svg" in out
            and pipeline_svg.count("= 43% of each stage") == 2), pipeline_svg[:400]
    for gb in ("120.0 GB", "31.4 GB", "16.6 GB", "1.9 GB"):
        assert gb in zero_svg
    for name, losses in (("a", [3.0, 2.0, 1.5]), ("b", [3.1, 2.5, 2.0])):
        (tmp_path / name).mkdir()
        records = [{"step": s, key: l, "elapsed": s * 2.0} for s, l in enumerate(losses, 1)
                   for key in ("loss", "val_loss")]
        (tmp_path / name / "metrics.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in records))
    run("plot.py", tmp_path / "a", tmp_path / "b", "--x", "time", "--svg", tmp_path / "loss.svg")
    svg = (tmp_path / "loss.svg").read_text()
    assert (svg.count("<polyline") == 2 and svg.count("<circle") == 6
            and "val 1.5000" in svg), svg[-800:]


RUN_BY = {"python model.py": test_model,
          "python data.py prepare --src PATH --out DIR": test_data_prepare,
          "python bpe.py": test_bpe, "python chat.py": test_chat,
          "python amp.py": test_amp, "python pretrain.py --help": test_pretrain_help,
          "python sft.py --help": test_sft_help,
          "make estimate": test_make_estimate, "make scaling": test_make_scaling,
          "python flash_attn.py": test_flash_attn, "torchrun --nproc_per_node 2 ddp.py": test_ddp,
          "torchrun --nproc_per_node 2 zero.py": test_zero, "make bench": test_make_bench,
          "torchrun --nproc_per_node 2 tensor_parallel.py": test_tensor_parallel,
          "torchrun --nproc_per_node 4 pipeline.py": test_pipeline,
          "torchrun --nproc_per_node 4 topology.py --tp 2": test_topology,
          "torchrun --nproc_per_node 4 context_parallel.py": test_context_parallel,
          "torchrun --nproc_per_node 2 moe.py": test_moe, "make sft": test_make_sft,
          "python lora.py": test_lora, "python benchmarks/bench_pack.py": test_bench_pack,
          "python quantization.py": test_quantization,
          "python checkpoint.py consolidate out/pretrain model.pt": test_checkpoint_commands,
          "python checkpoint.py export-hf out/pretrain hf/": test_checkpoint_commands,
          'python generate.py out/pretrain --prompt "def "': test_generate,
          "python plot.py --docs": test_plot}


def test_every_map_command_is_run():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Map of the lecture")[1].split("\n## ")[0]
    # The command is the third column (the last: its time).
    commands = re.findall(r"^\|[^|]+\|[^|]+\| `([^`]+)` \|[^|]+\|$", table, re.M)
    assert sorted(commands) == sorted(RUN_BY), commands
