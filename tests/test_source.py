"""The source reads in one sitting: no line over 100 characters and no Python file over 500 lines,
in every file the repository tracks that holds code (*.py, the Makefile, CI's script, the
requirements)."""
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_COLUMNS, MAX_LINES = 100, 500
OTHER_CODE = ("Makefile", ".ci/run", "requirements.txt")


def tracked():
    """The repository's code files: git's list, or (outside a git checkout) a walk that skips what
    runs leave behind."""
    try:
        names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
                 if not {".venv", "out", "data", "__pycache__"} & set(p.relative_to(ROOT).parts)]
        names += [n for n in OTHER_CODE if (ROOT / n).exists()]
    return [n for n in names if n.endswith(".py") or n in OTHER_CODE]


def test_code_lines_fit_100_columns_and_files_500_lines():
    files = tracked()
    assert len(files) > 50 and "model.py" in files and "Makefile" in files
    long_lines, long_files = [], []
    for name in files:
        lines = (ROOT / name).read_text(encoding="utf-8").splitlines()
        long_lines += [f"{name}:{i}: {len(x)} characters" for i, x in enumerate(lines, 1)
                       if len(x) > MAX_COLUMNS]
        if name.endswith(".py") and len(lines) > MAX_LINES:
            long_files.append(f"{name}: {len(lines)} lines")
    assert not long_lines, f"{len(long_lines)} over {MAX_COLUMNS}: " + "; ".join(long_lines[:20])
    assert not long_files, f"files over {MAX_LINES} lines: " + "; ".join(long_files)
