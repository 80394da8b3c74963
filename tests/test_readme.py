"""The README's commands (and its pages' in docs/), run one after another in a fresh clone, never
collide: each pretrain.py and sft.py command of its code blocks (after `make pretrain` and `make
sft`, the Makefile's) trains into a folder of its own, unless it is the same run (the same flags but
the layout's and the logging's), which continues there; a command with --fresh starts its folder
over. A collision would be refused at run time ("OUT holds another run")."""
import dataclasses
import re
import shlex
from pathlib import Path

import pytest

import flags
import pretrain
import sft

ROOT = Path(__file__).resolve().parent.parent


def makefile_commands():
    """make pretrain's and make sft's command lines, from the Makefile's variables."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    var = {k: v.strip() for k, v in re.findall(r"^(\w+) \?= (.*)$", text, re.M)}
    words = shlex.split(var["PARALLEL_FLAGS"] + " " + var["PRETRAIN_FLAGS"])
    yield "make pretrain", words[words.index("pretrain.py"):]
    yield "make sft", ["sft.py", "--init", "out/pretrain", *shlex.split(var["SFT_FLAGS"])]


def readme_commands():
    """(the line, its words from the script on) for every pretrain.py/sft.py line of the README's
    bash blocks (then docs/'s), shell variables set in the block (F="...") expanded."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # read in this order
    for block in re.findall(r"```bash\n(.*?)```", "".join(p.read_text() for p in pages), re.S):
        env = {}
        for line in block.replace("\\\n", " ").splitlines():
            code = line.split("  #")[0].strip()
            if m := re.fullmatch(r'(\w+)="(.*)"', code):
                env[m.group(1)] = m.group(2)
                continue
            words = shlex.split(re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), ""), code),
                                comments=True)
            script = next((i for i, w in enumerate(words) if w in ("pretrain.py", "sft.py")), None)
            if script is not None and "&&" not in words:
                yield code, words[script:]


def test_readme_commands_never_share_a_folder():
    holds, seen = {}, 0
    for line, (script, *argv) in [*makefile_commands(), *readme_commands()]:
        args = (pretrain if script == "pretrain.py" else sft).build_parser().parse_args(argv)
        if getattr(args, "estimate", False):
            continue  # the calculator: trains nothing, writes nothing
        out = args.out or flags.run_folder(vars(args), script.removesuffix(".py"))
        what = {k: v for k, v in vars(args).items() if k not in flags.HOW_FLAGS}
        if not args.fresh:
            assert holds.setdefault(out, (what, line))[0] == what, \
                f"`{line}` would be refused: {out} holds the run of `{holds[out][1]}`"
        holds[out] = (what, line)
        seen += 1
    assert seen >= 30, seen  # the README's commands were found


def test_the_default_folder_follows_what_is_computed():
    """Another learning rate: another folder; another layout of the same run: the same one."""
    parse = pretrain.build_parser().parse_args
    a, b, c = (parse(["--lr", "1e-3"]), parse(["--lr", "2e-3"]),
               parse(["--lr", "1e-3", "--tp", "2", "--zero", "3"]))
    folder = lambda args: flags.run_folder(vars(args), "pretrain")  # noqa: E731
    assert folder(a) != folder(b) and folder(a) == folder(c)
    assert re.fullmatch(r"out/pretrain-[0-9a-f]{8}", folder(a))
    assert pretrain.parse(["--lr", "1e-3"]).settings.out == folder(a)  # the config's --out


@pytest.mark.parametrize("prog,argv", [
    ("pretrain", ["--lr", "2e-3", "--tp", "2", "--experts", "4"]),
    ("sft", ["--lora-r", "4", "--pack", "--out", "out/x"])])
def test_the_config_holds_every_flag_once_and_is_never_changed(prog, argv):
    """flags.from_args splits the parsed flags into frozen parts and the entry point's own; flat()
    gives back exactly the flags parsed (what checkpoints record, what the folder's name hashes)."""
    entry = pretrain if prog == "pretrain" else sft
    args, cfg = entry.build_parser().parse_args(argv), entry.parse(argv)
    assert cfg.flat() == vars(args) | {"out": cfg.settings.out}
    assert (cfg.moe is not None) == (prog == "pretrain")  # (sft.py's come from its --init)
    for part in (cfg.optim, cfg.task):
        with pytest.raises(dataclasses.FrozenInstanceError):
            part.seed = 1
    resolved = flags.resolved(cfg)  # --amp auto: a new config, the parsed one as it was
    assert resolved.settings.amp in ("bf16", "fp32") and cfg.settings.amp == "auto"


def test_every_link_of_the_readme_and_its_pages_resolves():
    """The README is the map: each relative link of it and of docs/ names a file that exists."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    links = [(page, target) for page in pages
             for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text())
             if not target.startswith("http")]
    assert len(links) > 50 and len(pages) > 10, (len(links), len(pages))
    missing = [f"{page.name}: {target}" for page, target in links
               if not (page.parent / target).exists()]
    assert not missing, missing
