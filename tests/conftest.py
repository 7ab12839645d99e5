"""Shared fixtures: real git repositories with a tiny lab in them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

# Ray clusters that tests start stay on loopback (Ray reads this when first imported).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

GIT_ENV = {
    "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.invalid",
}
SRC = str(Path(__file__).resolve().parents[1] / "src")

# A lab whose metric is a known function of its constants: score = (X - 1)^2 + (Y - 2)^2 + 0.5
TARGET_PY = '''\
import os, sys
X = 3.0
Y = 0.0
score = (X - 1) ** 2 + (Y - 2) ** 2 + 0.5
print("training...", file=sys.stderr)
print("---")
print(f"score: {score:.6f}")
print(f"seed: {os.environ.get('NIGHTLAB_SEED')}")
print(f"budget: {os.environ.get('NIGHTLAB_BUDGET_S')}")
'''

SPEC = '''\
[files]
editable = ["target.py"]
protected = ["evaluate.py"]

[run]
command = "python target.py"
budget_s = 5
timeout_s = 20
kill_grace_s = 0.5

[metric]
name = "score"
direction = "minimize"
secondary = ["seed"]

[stop]
max_experiments = 3

[researcher]
kind = "scripted"

[executor]
pipeline = false   # these tests assert autoresearch's strict order; test_parallel.py covers pipelining
'''


def git(cwd: Path, *args: str) -> str:
    env = {**os.environ, **GIT_ENV}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


def commit_all(repo: Path, msg: str = "lab") -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", msg)
    return git(repo, "rev-parse", "HEAD").strip()


@pytest.fixture
def make_lab(tmp_path: Path) -> Callable[..., Path]:
    """make_lab(files={...}, spec=...) -> a committed git repo holding the lab."""

    def _make(files: dict[str, str] | None = None, spec: str | None = SPEC, sub: str = "") -> Path:
        repo = tmp_path / "repo"
        repo.mkdir(exist_ok=True)
        git(repo, "init", "-q", "-b", "main")
        lab = repo / sub if sub else repo
        lab.mkdir(parents=True, exist_ok=True)
        all_files = {"target.py": TARGET_PY, "evaluate.py": "print('protected')\n", "program.md": "# test\n"}
        all_files.update(files or {})
        if spec is not None:
            all_files["nightlab.toml"] = spec
        for name, text in all_files.items():
            p = lab / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(textwrap.dedent(text) if text.startswith("\n") else text)
        commit_all(repo)
        return lab

    return _make


def nightlab_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "nightlab", *args]


def dashboard_client(app: object, base_url: str = "http://127.0.0.1", **kw: object):  # type: ignore[no-untyped-def]
    """A test client of a dashboard app that opened the printed URL: it carries the token cookie (every
    request needs the token; acting needs it in the header too, which a test sends itself)."""
    from fastapi.testclient import TestClient

    return TestClient(app, base_url=base_url, cookies={"nightlab_token": app.state.access.token},  # type: ignore
                      **kw)


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture
def pg_url():
    """A fresh, empty PostgreSQL database (dropped afterwards); skips without NIGHTLAB_TEST_POSTGRES."""
    import uuid

    import sqlalchemy as sa

    admin_url = os.environ.get("NIGHTLAB_TEST_POSTGRES")
    if not admin_url:
        pytest.skip("NIGHTLAB_TEST_POSTGRES is not set (CI starts PostgreSQL with .ci/services.sh)")
    name = f"nightlab_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    try:
        yield sa.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()
