"""Every command in README.md and docs/*.md works: none can rot.

How a docs author writes commands (the whole rule):
- Every line of a ```bash block is a command (a line ending in `\\` continues on the next;
  blank lines and lines that start with `#` are skipped). Each runs here, for real, with bash,
  in a scratch copy of the repository (`../shared/data` is the shared data, `.venv/bin/` and a
  bare `python`/`deepspeed`/`torchrun` are this interpreter's), README.md first, then docs/*.md by
  name, each page top to bottom; all pages share that copy, so a page can use `runs/smoke/` made
  by README's smoke run. A command must exit 0; one written on several pages runs once.
- A command that cannot run here ends in a comment saying what it needs: `# needs GPUs`,
  `# needs the Hub`, `# needs SLURM`, `# needs an hour`, ... Then it is parsed, not run: its
  launcher script's flags (`launcher/*.py`, `bench/*.py`, or a `slurm/*.sbatch` whose arguments
  are launcher/train.py's) go through that launcher's own parser and validation, and every file it
  names (`*.json`, `*.yaml`, `*.py`, `*.sbatch`) must exist. Anything else cannot be checked: put it
  in prose instead (so are `pytest` and `ruff`, which would run this test again).
- Each command costs test time (a training run about 20 s): show a runnable variant once, the rest
  in prose.
- Two changes, so that the tests stay short and can run beside other jobs: a command running
  `launcher/train.py` gets `--max_steps 2` appended, and `deepspeed`/`torchrun` get a free
  `--master_port`.
- A ```python block runs as a program the same way (after the bash lines above it); one whose
  first line is a `# needs ...` comment is only compiled.
- Lines ending in `# CI runs this line` are what `.ci/run` runs: README's first two commands, set
  up and train, then lint and test. They are checked for that shape here; of the first, the
  commands after the set-up (`python3 -m venv`, `pip install`) run here like any other.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from conftest import REPO, SHARED
from medgpt.cli import Request, parse_request
from medgpt.config import build_parser, parse_config
from medgpt.distributed import free_port
from medgpt.errors import UserError
from medgpt.sweep_plan import plan_sweep

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CI_MARK = "# CI runs this line"
SETUP = re.compile(r"python3 -m venv |\S*pip install ")
TESTS = re.compile(r"\b(pytest|ruff)\b")
NEEDS = re.compile(r"\s#\s*needs\b")
TRAIN_STEPS = "--max_steps 2"
NAMED_FILE = re.compile(r"\.(json|ya?ml|py|sbatch)$")
SHELL_OPERATORS = {"&&", "||", "|", ";", ">", ">>", "2>&1"}
# Top-level repository entries a command may not see in its scratch copy (it makes its own).
NOT_COPIED = {".git", ".venv", "runs", ".pytest_cache"}


@dataclass(frozen=True)
class Snippet:
    page: str
    line: int  # where it starts in the page, 1-based
    text: str
    kind: str  # "bash" or "python"

    @property
    def parse_only(self) -> bool:
        first = self.text.splitlines()[0]
        return bool(NEEDS.search(first) if self.kind == "bash" else first.startswith("# needs"))

    @property
    def ci(self) -> bool:
        return self.kind == "bash" and self.text.endswith(CI_MARK)

    @property
    def runs_here(self) -> str | None:
        """The command this test runs: the text, or of a CI line the commands after its set-up (None:
        nothing left, or the test suite itself, which would run this test again)."""
        if self.parse_only:
            return None
        if not self.ci:
            return self.text
        commands = [c for c in self.text.removesuffix(CI_MARK).strip().split(" && ") if not SETUP.match(c)]
        return " && ".join(commands) if commands and not any(TESTS.search(c) for c in commands) else None

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"


def snippets(page: Path) -> list[Snippet]:
    """The page's commands (bash lines, joined across `\\`) and python blocks, in order."""
    found: list[Snippet] = []
    name = str(page.relative_to(REPO)) if page.is_relative_to(REPO) else page.name
    block, lines, start = None, [], 0  # the open block's language, its lines and where they start
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if block is None:
            if line.startswith(("```bash", "```python")):
                block, lines = line[3:].strip(), []
            continue
        if line.startswith("```"):
            if block == "python":
                found.append(Snippet(name, start, "\n".join(lines), "python"))
            block = None
            continue
        if not lines:
            start = number
        if block == "python" or line.endswith("\\"):
            lines.append(line if block == "python" else line[:-1])
        elif lines or (line.strip() and not line.lstrip().startswith("#")):
            found.append(Snippet(name, start, "".join([*lines, line]).strip(), "bash"))
            lines = []
    return found


ALL = [s for page in PAGES for s in snippets(page)]


def scratch_copy(root: Path) -> Path:
    """The repository as symlinks under root/repo (writes land in root/repo/runs), with
    root/shared the shared data and .venv this interpreter's environment."""
    repo = root / "repo"
    repo.mkdir(parents=True)
    for entry in REPO.iterdir():
        if entry.name not in NOT_COPIED:
            (repo / entry.name).symlink_to(entry)
    (repo / ".venv").symlink_to(sys.prefix)
    (root / "shared").symlink_to(SHARED.parent)
    return repo


def command_env(repo: Path, cache: Path) -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(repo), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
            "HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


def runnable(text: str) -> str:
    """The command as run here: TRAIN_STEPS appended to training, a free port for the launchers."""
    command = re.sub(r"\s+#[^'\"]*$", "", text)
    command = re.sub(r"(^|\s)((?:\S*/)?(?:deepspeed|torchrun))\s",
                     lambda m: f"{m.group(1)}{m.group(2)} --master_port {free_port()} ", command, count=1)
    return f"{command} {TRAIN_STEPS}" if "launcher/train.py" in command else command


def run(snippet: Snippet, repo: Path, env: dict[str, str]) -> None:
    command = snippet.text if snippet.kind == "python" else runnable(snippet.runs_here)
    argv = [sys.executable if snippet.kind == "python" else "bash", "-c", command]
    proc = subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (f"{snippet}\nexit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\n"
                                  f"STDERR:\n{proc.stderr[-5000:]}")


def module(script: Path) -> ModuleType:
    """A launcher or bench script as a module (its __main__ block stays out)."""
    spec = importlib.util.spec_from_file_location(f"docs_{script.parent.name}_{script.stem}", script)
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = loaded  # dataclasses look their module up there
    spec.loader.exec_module(loaded)
    return loaded


def parse(snippet: Snippet, repo: Path) -> None:
    """The flags of a command that cannot run here, through its launcher's own parser and checks."""
    words = shlex.split(snippet.text, comments=True)
    scripts = [i for i, w in enumerate(words) if w.endswith((".py", ".sbatch"))]
    assert scripts, f"{snippet}\nno launcher/*.py, bench/*.py or slurm/*.sbatch to check: write it in prose"
    first = scripts[0]
    args = words[first + 1:]
    args = args[:next((i for i, w in enumerate(args) if w in SHELL_OPERATORS), len(args))]
    for word in words:
        path = word.split("=", 1)[-1]
        assert not NAMED_FILE.search(path) or (repo / path).exists(), f"{snippet}\n{path} does not exist"
    script = repo / words[first]
    if script.suffix == ".sbatch":  # its arguments are launcher/train.py's flags
        parse_config(args, build_parser())
    elif script.parent.name == "bench":
        module(script).parse_args(args)
    else:
        launcher = module(script)
        request = [v for v in vars(launcher).values() if isinstance(v, type) and issubclass(v, Request)
                   and v is not Request]
        if hasattr(launcher, "parse"):  # launcher/sweep.py: its flags, then training flags after "--"
            plan_sweep(*launcher.parse(args))
        elif request:
            parse_request(request[0], launcher.parser(), args)
        else:
            parse_config(args, launcher.parser())


# --- The extraction itself.

def test_snippets_joins_continued_lines_and_reads_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n```bash\n# a comment\npython launcher/plan.py \\\n    --model gpt2\n\n"
                    "sbatch slurm/train.sbatch --lr 1  # needs SLURM\n```\n"
                    "```python\nprint(1)\n```\n```\nnot a command\n```\n")
    assert [(s.line, s.text, s.kind, s.parse_only) for s in snippets(page)] == [
        (4, "python launcher/plan.py     --model gpt2", "bash", False),
        (7, "sbatch slurm/train.sbatch --lr 1  # needs SLURM", "bash", True),
        (10, "print(1)", "python", False)]


def test_runnable_shortens_training_and_frees_the_port():
    command = runnable(".venv/bin/deepspeed --num_gpus 2 launcher/train.py --config configs/smoke.yaml  # note")
    assert re.fullmatch(r"\.venv/bin/deepspeed --master_port \d+ --num_gpus 2 launcher/train\.py "
                        r"--config configs/smoke\.yaml --max_steps 2", command), command
    assert runnable("python launcher/plan.py --model gpt2") == "python launcher/plan.py --model gpt2"


def test_ci_runs_the_install_and_smoke_run_then_the_test_suite():
    """.ci/run runs README's two marked first lines: set up .venv and train, then lint and test."""
    ci = [s.text.removesuffix(CI_MARK).strip() for s in ALL if s.ci]
    assert [s.page for s in ALL if s.ci] == ["README.md"] * 2, ci
    assert ALL[0].ci and ALL[1].ci, "README.md's first two commands are what CI runs"
    assert ci[0].startswith("python3 -m venv .venv && ") and "install" in ci[0], ci
    assert ALL[0].runs_here and "launcher/train.py" in ALL[0].runs_here, ci
    assert ci[1] == ".venv/bin/ruff check . && .venv/bin/python -m pytest -q", ci
    listed = subprocess.run(["bash", str(REPO / ".ci" / "run"), "--list"], capture_output=True, text=True,
                            check=True, cwd=REPO).stdout.splitlines()
    assert listed == ci


def test_parse_refuses_a_renamed_flag_and_a_missing_file(tmp_path, monkeypatch):
    repo = scratch_copy(tmp_path)
    monkeypatch.chdir(repo)
    good = "torchrun --nproc_per_node 8 launcher/train.py --ds_config ds_configs/zero3.json --lr 1e-4  # needs GPUs"
    parse(Snippet("page.md", 1, good, "bash"), repo)
    with pytest.raises(UserError, match="--max_step"):
        parse(Snippet("page.md", 1, good.replace("--lr 1e-4", "--max_step 3"), "bash"), repo)
    with pytest.raises(UserError, match="--gpus"):
        parse(Snippet("page.md", 1, "python launcher/plan.py --model gpt2 --gpus 0  # needs time", "bash"), repo)
    with pytest.raises(AssertionError, match=r"zero9\.json does not exist"):
        parse(Snippet("page.md", 1, good.replace("zero3", "zero9"), "bash"), repo)


def test_layout_names_every_module_launcher_and_test_file():
    """docs/layout.md is where a newcomer looks a file up: a new one must be listed there."""
    layout = (REPO / "docs" / "layout.md").read_text()
    files = [*REPO.glob("medgpt/*.py"), *REPO.glob("launcher/*.py"), *REPO.glob("tests/test_*.py")]
    missing = [str(f.relative_to(REPO)) for f in files
               if f.name != "__init__.py" and not re.search(rf"(^|\s|`){re.escape(f.name)}(\s|`|,|:)", layout, re.M)]
    assert not missing, f"add a line for each to docs/layout.md: {missing}"


# --- The pages' commands.

@pytest.mark.parametrize("snippet", [s for s in ALL if s.parse_only], ids=lambda s: f"{s.page}:{s.line}")
def test_command_that_needs_more_than_this_machine_parses(snippet, tmp_path, monkeypatch):
    repo = scratch_copy(tmp_path)
    monkeypatch.chdir(repo)  # relative paths (configs, output folders) as the user's shell sees them
    if snippet.kind == "python":
        compile(snippet.text, str(snippet), "exec")
    else:
        parse(snippet, repo)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, data_cache):
    """The one scratch copy every page's commands run in; run(page) runs README.md's first, once."""
    repo = scratch_copy(tmp_path_factory.mktemp("docs"))
    env = command_env(repo, data_cache)
    done: dict[Path, bool] = {}  # page -> its commands all ran
    ran: set[str] = set()  # a command written on several pages runs once

    def run_page(page: Path) -> None:
        for needed in (PAGES[0], page):
            if needed not in done:
                done[needed] = False
                for snippet in snippets(needed):
                    if snippet.runs_here and snippet.runs_here not in ran:
                        ran.add(snippet.runs_here)
                        run(snippet, repo, env)
                done[needed] = True
            assert done[needed], f"{needed.name} failed first (see its test); this page may use its runs/"
    return run_page


@pytest.mark.e2e
@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_page_commands_run(page, scratch):
    scratch(page)
