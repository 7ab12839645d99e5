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
    if db is None:
        from nightlab.workspace import Workspace

        Workspace(lab.resolve()).ensure_state_dir()  # .nightlab/ stays out of git, as a session keeps it
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


@pool.command()
@lab_option
@db_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback needs --behind-proxy (TLS in front: docs/pool.md).")
@click.option("--port", type=click.IntRange(0, 65535), default=8766, show_default=True)
@click.option("--behind-proxy", is_flag=True,
              help="Allow a non-loopback --host: a TLS reverse proxy terminates the connections (docs/pool.md).")
@click.option("--token", default=None, envvar="NIGHTLAB_UI_TOKEN",
              help="The dashboard's access token (off loopback it is required for the dashboard pages; the pool "
                   "API uses worker tokens).")
@click.option("--sandbox", type=click.Choice(["auto", "required", "none"]), default=None,
              help="Override [sandbox] mode for the host's verification runs.")
@click.option("--slots", type=click.IntRange(min=1), default=None, help="Override [executor] slots.")
@click.option("--quiet", "-q", is_flag=True, help="Print only the final summary.")
def serve(lab: Path, db: str | None, host: str, port: int, behind_proxy: bool, token: str | None,
          sandbox: str | None, slots: int | None, quiet: bool) -> None:
    """Serve the pool (its API under /api/pool, the dashboard, /pool) and verify claims until stopped.

    The verification is an ordinary session of the lab, tag pool-<[pool] name>, whose branch
    nightlab/pool-<name> advances only on claims the host re-ran and kept. Ctrl-C, SIGTERM or
    .nightlab/STOP stop it; run it again to resume (queued claims wait).
    """
    from nightlab.web.security import Access, is_loopback

    if not is_loopback(host) and not behind_proxy:
        raise UsageError(f"--host {host} would expose the pool beyond this machine without TLS",
                         "keep --host 127.0.0.1 and put a TLS reverse proxy in front (docs/pool.md), then pass "
                         "--behind-proxy to bind elsewhere")
    try:
        access = Access.make(host, token)
    except ValueError:
        raise UsageError(f"binding to {host} exposes the dashboard pages without a token",
                         "add --token SECRET (or set NIGHTLAB_UI_TOKEN)") from None
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UsageError("`nightlab pool serve` needs the ui extra (fastapi, uvicorn)",
                         "pip install 'nightlab[ui]'") from None
    from nightlab.console import make_reporter
    from nightlab.pool.serve import serve as run_pool

    def ready(url: str) -> None:
        click.echo(f"nightlab pool '{_pool_name(lab)}' on {url}/api/pool  (dashboard: {url}/pool"
                   + f"?token={access.token}" + ")  Ctrl-C to stop", err=False)

    session = run_pool(lab, db, host=host, port=port, access=access, reporter=make_reporter(quiet, True),
                       sandbox_mode=sandbox, slots=slots, ready=ready)
    click.echo(f"pool session {session.tag}: {session.status} ({session.stop_reason}); best {session.metric_name} = "
               f"{session.incumbent_metric} at {session.incumbent_commit[:10]} on {session.branch}")


@pool.command()
@lab_option
@db_option
@click.option("--json", "as_json", is_flag=True, help="Print the leaderboard as JSON (the API's shape).")
def leaderboard(lab: Path, db: str | None, as_json: bool) -> None:
    """The pool's workers ranked by verified gain, with claims, compute, strikes and trust."""
    import json

    from nightlab.pool import board
    from nightlab.spec import load_spec

    spec = load_spec(lab, check_paths=False)
    with _ledger(lab, db) as led:
        data = board.leaderboard(led, spec.pool.name, spec.pool)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"pool '{spec.pool.name}'")
    for col in ("rank", "worker", "verified gain", "accepted", "rejected", "pending", "credited", "compute",
                "spot-verified", "strikes", "trust"):
        t.add_column(col, justify="left" if col in ("worker", "trust") else "right")
    for w in data["workers"]:
        frac = w["verified_compute_fraction"]
        t.add_row(str(w["rank"]), w["worker"], f"{w['verified_gain_pct']:+.3f}%", str(w["accepted"]),
                  str(w["rejected"]), str(w["pending"]), str(w["credited"]), f"{w['compute_s']:.0f}s",
                  "—" if frac is None else f"{100 * frac:.0f}%", str(w["strikes"]),
                  w["trust"] + (" (revoked)" if w["revoked"] else ""))
    import sys

    Console(width=None if sys.stdout.isatty() else 200).print(t)  # piped: never squeeze the names away
    tot = data["totals"]
    frac = tot["verification_fraction"]
    click.echo(f"verification: {tot['verification_s']:.1f}s of host time for {tot['worker_compute_s']:.1f}s of "
               f"worker compute ({'—' if frac is None else f'{100 * frac:.2f}%'}); {tot['claims']} claims, "
               f"{tot['accepted']} accepted")


@pool.command()
@lab_option
@db_option
def status(lab: Path, db: str | None) -> None:
    """The pool's session, head, queue and workers at a glance."""
    from nightlab.pool import store
    from nightlab.spec import load_spec

    spec = load_spec(lab, check_paths=False)
    name = spec.pool.name
    with _ledger(lab, db) as led:
        s = led.get_session(f"pool-{name}")
        claims = store.list_claims(led, name)
        workers = store.list_workers(led, name)
    click.echo(f"pool '{name}': session pool-{name} " + (f"{s.status}, head {s.incumbent_commit[:10]}, best "
               f"{s.metric_name} = {s.incumbent_metric} (baseline {s.baseline_metric})" if s else "not started"))
    counts: dict[str, int] = {}
    for c in claims:
        counts[c.status] = counts.get(c.status, 0) + 1
    click.echo(f"claims: {len(claims)} " + ("(" + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ")"
                                             if counts else ""))
    active = sum(not w.revoked and not w.record.quarantined for w in workers)
    click.echo(f"workers: {len(workers)} ({active} active, {sum(w.record.quarantined for w in workers)} quarantined, "
               f"{sum(w.revoked for w in workers)} revoked)")


@pool.command()
@click.argument("url")
@click.option("--token", required=True, envvar="NIGHTLAB_POOL_TOKEN", help="The worker token from the host.")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the pool's lab is checked out (default: ./nightlab-pool-<host>).")
@click.option("--researcher", default=None, help="Researcher kind for the local session (default: the lab's).")
@click.option("--seed", type=int, default=None, help="The researcher's seed.")
@click.option("--experiments", type=click.IntRange(min=1), default=10, show_default=True,
              help="Experiments per round.")
@click.option("--rounds", default="1", show_default=True, help="Rounds to run, or 'forever'.")
@click.option("--sandbox", type=click.Choice(["auto", "required", "none"]), default=None,
              help="Sandbox of the local runs and of the host's setup command (default: required).")
@click.option("--setup-network", is_flag=True,
              help="Let the host's [run] setup command reach the network (it always runs sandboxed).")
@click.option("--max-lab-mb", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Refuse a pool lab (bundle, checked-out files) larger than this.")
def join(url: str, token: str, directory: Path | None, researcher: str | None, seed: int | None, experiments: int,
         rounds: str, sandbox: str | None, setup_network: bool, max_lab_mb: int) -> None:
    """Join a research pool: search on this machine, claim the keeps, follow the pool head."""
    if rounds != "forever" and not rounds.isdigit():
        raise UsageError(f"--rounds {rounds!r} is not a number", "give a whole number of rounds, or 'forever'")
    import importlib

    try:
        worker = importlib.import_module("nightlab.pool.worker")
    except ImportError:
        raise UsageError("this nightlab has no pool worker", "upgrade nightlab") from None
    worker.join(url=url, token=token, directory=directory, researcher=researcher, seed=seed,
                experiments=experiments, rounds=None if rounds == "forever" else int(rounds), sandbox=sandbox,
                setup_network=setup_network, max_lab_mb=max_lab_mb)
