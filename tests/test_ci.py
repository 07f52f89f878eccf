"""CI runs the README's test command with ../shared required: the golden tests fail, never skip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import REQUIRE_SHARED_ENV

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command_with_shared_required() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    ci = (REPO_ROOT / ".ci/run").read_text().splitlines()
    command = ci[-1]
    assert command.endswith("&& pytest") and f"\n{command}\n" in readme, "not the README's command verbatim"
    assert f"export {REQUIRE_SHARED_ENV}=1" in ci[: ci.index(command)]


def test_tests_needing_shared_fail_without_it_when_required(tmp_path: Path) -> None:
    env = {**os.environ, "XC_SHARED": str(tmp_path / "nowhere"), REQUIRE_SHARED_ENV: "1"}
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "tests/test_tiling.py", "-k", "golden"]
    required = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert required.returncode == 1, required.stdout[-2000:]
    assert f"{REQUIRE_SHARED_ENV}=1 requires it" in required.stdout and " skipped" not in required.stdout
    env.pop(REQUIRE_SHARED_ENV)
    optional = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert optional.returncode == 0 and "4 skipped" in optional.stdout, optional.stdout[-2000:]
