"""The package names are generic: make sure the ones imported are this repository's, and that the
product (pipeline, trainer, schemas) never imports the benchmarks or the lab (bench, dev)."""

import ast
from pathlib import Path

import pipeline
import schemas
import trainer

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_packages_come_from_this_repo():
    for module in (pipeline, schemas, trainer):
        assert Path(module.__file__).resolve().parent.parent == REPO_ROOT, module.__file__


def test_pipeline_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, pipeline.cli; pipeline.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_the_product_never_imports_bench_or_dev():
    """bench/ and dev/ are one-way: they import the product, never the reverse."""
    found = []
    for package in ("pipeline", "trainer", "schemas"):
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module or ""]
                else:
                    continue
                found += [
                    f"{path.relative_to(REPO_ROOT)}:{node.lineno}: {n}"
                    for n in names
                    if n.split(".")[0] in ("bench", "dev")
                ]
    assert not found, found
