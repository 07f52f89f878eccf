"""The package names are generic: make sure the ones imported are this repository's, and that the
three programs keep their import rules (docs/ARCHITECTURE.md), none of them importing the benchmarks or
the lab (bench/ and dev/ are one-way)."""

import ast
from pathlib import Path

import chat
import pipeline
import schemas
import trainer

REPO_ROOT = Path(__file__).resolve().parent.parent
ONE_WAY = {"bench", "dev"}
FORBIDDEN = {
    "schemas": {"pipeline", "trainer", "chat", "torch"} | ONE_WAY,
    "pipeline": {"trainer", "chat", "torch", "transformers", "peft", "deepspeed"} | ONE_WAY,
    "trainer": {"pipeline", "chat"} | ONE_WAY,
    "chat": ONE_WAY,
}
"""Top-level modules each package's files never import: `schemas/` is the contract both sides
share, `pipeline/` runs without torch, `trainer/` reads shards only; `chat/` may import the three.
No product file imports `bench/` or `dev/`, which import the product, never the reverse."""


def test_packages_come_from_this_repo():
    for module in (pipeline, schemas, trainer, chat):
        assert Path(module.__file__).resolve().parent.parent == REPO_ROOT, module.__file__


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_each_program_imports_only_what_it_may():
    problems = [
        f"{path.relative_to(REPO_ROOT)} imports {', '.join(sorted(imported_packages(path) & forbidden))}"
        for package, forbidden in FORBIDDEN.items()
        for path in sorted((REPO_ROOT / package).rglob("*.py"))
        if imported_packages(path) & forbidden
    ]
    assert not problems, problems


def test_pipeline_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, pipeline.cli; pipeline.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
