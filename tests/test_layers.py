"""The house's floors: core, data, model, run, tools, each importing only from the floors below it (the layers
contract in pyproject.toml, checked by import-linter), and no `asr` import hidden inside a function without a
comment saying why."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import asr

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(checkout: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--config", str(checkout / "pyproject.toml"), "--no-cache"],
                          cwd=checkout, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(checkout), "PATH": "/usr/bin:/bin"})


def test_layers_only_import_downwards():
    result = lint_imports(asr.REPO_DIR)
    assert result.returncode == 0 and "1 kept, 0 broken" in result.stdout, result.stdout[-3000:]


def test_the_contract_fails_on_an_import_from_a_layer_above(tmp_path):
    """The contract is not vacuous: the data layer importing the run layer (inside a function, where such edges
    used to hide) breaks it, and the report names the edge."""
    shutil.copytree(asr.REPO_DIR / "asr", tmp_path / "asr", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(asr.REPO_DIR / "pyproject.toml", tmp_path)
    batching = tmp_path / "asr" / "data" / "batching.py"
    batching.write_text(batching.read_text() + "\n\ndef _climbs():\n    from asr.run import training\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1 and "0 kept, 1 broken" in result.stdout, result.stdout[-3000:]
    assert "asr.data.batching -> asr.run.training" in result.stdout


def local_asr_imports(path: Path) -> list[tuple[int, str]]:
    """(line, statement) of each `asr` import inside a function of `path` with no comment on its line or above
    its block of imports saying why it is there and not at the top."""
    lines = path.read_text().splitlines()
    found = []
    for function in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(function):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            if any(n == "asr" or n.startswith("asr.") for n in names):
                first = node.lineno - 1  # a comment above a block of imports speaks for the block
                while lines[first - 1].lstrip().startswith(("from ", "import ")):
                    first -= 1
                if "#" not in lines[node.lineno - 1] and not lines[first - 1].strip().startswith("#"):
                    found.append((node.lineno, lines[node.lineno - 1].strip()))
    return found


def test_no_asr_import_inside_a_function_without_a_reason():
    files = [*(asr.REPO_DIR / "asr").rglob("*.py"), *(asr.REPO_DIR / f for f in ("train.py", "evaluate.py",
                                                                                  "transcribe.py"))]
    hidden = {f"{path.relative_to(asr.REPO_DIR)}:{line}": statement
              for path in files for line, statement in local_asr_imports(path)}
    assert not hidden, hidden


def test_a_local_import_without_a_comment_is_found(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from asr.run import training\n\n\ndef g():\n"
                      "    # optional: onnxruntime is only needed here\n    from asr.model import onnx\n"
                      "    from asr.model import lm\n\n"
                      "    from asr.run import report\n")
    assert local_asr_imports(module) == [(2, "from asr.run import training"), (10, "from asr.run import report")]
