"""The README's code stays true to the code: its Python blocks run as written, its commands parse.

The Python blocks run in order, in one namespace, in a fresh interpreter in an empty folder (the
in-process recipe starts its own Tiled server there). The shell commands are parsed by the real
parser; running them end to end is the job of the example and workflow tests.
"""

import ast
import importlib
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bluesky_ptychonn.cli import build_parser

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README, flags=re.S)


def _commands() -> list[str]:
    """Every ``bluesky-ptychonn ...`` invocation in the README's code blocks, continuations joined.

    Shell loop variables (``$k`` in ``for k in 0 1 2 3``) are replaced by the loop's first value.
    """
    found = []
    for _, body in BLOCKS:
        for loop_var, first in re.findall(r"for (\w+) in (\S+)", body):
            body = body.replace(f"${loop_var}", first)
        for line in body.replace("\\\n", " ").splitlines():
            for part in re.split(r";|&&", line):
                part = part.split(" #")[0].strip().removeprefix("do ").strip()
                part = re.sub(r"^(\w+=\S+\s+)+", "", part)  # environment assignments
                if part.startswith("bluesky-ptychonn "):
                    found.append(part)
    return found


#: README commands quick enough to run on the recipe's server (the rest are parsed, and run by the workflow tests).
QUICK = ("runs", "show", "models", "replay")


def test_python_blocks_and_quick_commands_run_as_written(tmp_path):
    """The Python blocks in order, then the quick archive commands against the run they made.

    ``<uid>`` is that run; ``model.safetensors`` is the shipped base model copied under that name.
    """
    blocks = [body for lang, body in BLOCKS if lang == "python"]
    # Not --refine (pty-chi) nor --workers (a Dask cluster's processes would re-run this script: spawn).
    commands = [c for c in _commands() if c.split()[1] in QUICK and not {"--refine", "--workers"} & set(c.split())]
    assert len(commands) >= 5, commands
    script = "\n".join(blocks) + textwrap.dedent(
        f"""
        import os, shlex, shutil
        from bluesky_ptychonn.cli import main
        print("== commands")
        os.environ["TILED_URI"] = archive.server.uri.split("?")[0]
        os.environ["TILED_API_KEY"] = archive.server.api_key
        shutil.copy(model, "model.safetensors")
        for command in {commands!r}:
            assert main(shlex.split(command.replace("<uid>", uid))[1:]) == 0, command
        archive.close()
        """
    )
    (tmp_path / "readme.py").write_text(script)
    done = subprocess.run(
        [sys.executable, "readme.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    recipe, commands_out = done.stdout.split("== commands\n")
    status, sample = recipe.splitlines()[-2:]
    assert status.startswith("complete 144 frames;") and "'phase': (" in status, done.stdout
    assert sample == "sim-features-0 (144, 64, 64)"
    uid = next(p.stem for p in tmp_path.glob("*.png"))  # `show <uid>` wrote <uid's first 8>.png here
    assert f'"figure": "{uid}.png"' in commands_out  # show
    assert '"frames_done": 144' in commands_out and '"status": "complete"' in commands_out  # the replay


def test_python_blocks_import_what_exists():
    blocks = [body for lang, body in BLOCKS if lang == "python"]
    assert blocks
    for body in blocks:
        for node in ast.walk(ast.parse(body)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bluesky_ptychonn"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"README imports {alias.name} from {node.module}"


@pytest.mark.parametrize("command", _commands())
def test_commands_parse(command):
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert callable(args.func)


def test_the_live_workflow_notebook_runs(tmp_path):
    """examples/live_workflow.ipynb, executed top to bottom in a fresh kernel in an empty folder."""
    pytest.importorskip("nbclient")
    notebook = Path(__file__).resolve().parents[1] / "examples" / "live_workflow.ipynb"
    run = (
        "import nbclient, nbformat, sys\n"
        f"nb = nbformat.read({str(notebook)!r}, as_version=4)\n"
        "nbclient.NotebookClient(nb, timeout=600, resources={'metadata': {'path': '.'}}).execute()\n"
        "nbformat.write(nb, 'executed.ipynb')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", run], cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    executed = (tmp_path / "executed.ipynb").read_text()
    assert "complete 144 frames; trust median" in executed and "image/png" in executed
    assert "('sim-features-0', (144, 64, 64))" in executed
