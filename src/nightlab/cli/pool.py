"""``nightlab pool``: host a research pool (serve, invite, revoke, leaderboard, status) or join one (join).

See docs/pool.md for what the pool trusts and what it does not.
"""

from __future__ import annotations

from pathlib import Path

import click

from nightlab.errors import UsageError
from nightlab.ledger import Ledger

lab_option = click.option("--lab", "lab", type=click.Path(file_okay=False, path_type=Path), default=".",
                          show_default=True, help="The lab folder (holds nightlab.toml).")
db_option = click.option("--db", "db", default=None, envvar="NIGHTLAB_DB",
                         help="Ledger URL (default: sqlite at <lab>/.nightlab/ledger.db).")


def _pool_name(lab: Path) -> str:
    from nightlab.spec import load_spec

    return load_spec(lab, check_paths=False).pool.name


def _ledger(lab: Path, db: str | None) -> Ledger:
    if db is None and not (lab / "nightlab.toml").exists():
        raise UsageError(f"no nightlab.toml in {lab.resolve()}", "pass --lab <the lab folder>")
    return Ledger.for_lab(lab.resolve(), db)


@click.group()
def pool() -> None:
    """Host a research pool (untrusted workers search, this lab verifies), or join one."""


@pool.command()
@lab_option
@db_option
@click.argument("name")
def invite(lab: Path, db: str | None, name: str) -> None:
    """Create worker NAME and print its token (shown once; only its sha256 is stored)."""
    from nightlab.pool import store

    name_ = _pool_name(lab)
    with _ledger(lab, db) as led:
        token = store.invite(led, name_, name)
    click.echo(f"worker {name} invited to pool '{name_}'. Its token (shown once, keep it secret):")
    click.echo(token)
    click.echo(f"the worker runs: nightlab pool join http://HOST:PORT --token {token}")


@pool.command()
@lab_option
@db_option
@click.argument("name")
def revoke(lab: Path, db: str | None, name: str) -> None:
    """Revoke worker NAME's token: its requests get 403 from now on (its results stay on the leaderboard)."""
    from nightlab.pool import store

    name_ = _pool_name(lab)
    with _ledger(lab, db) as led:
        store.revoke(led, name_, name)
    click.echo(f"worker {name} revoked from pool '{name_}'")
