"""The package names are generic: make sure the ones imported are this repository's."""

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
