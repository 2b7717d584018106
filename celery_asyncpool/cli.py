"""``celery asyncsql``: commands of the asyncsql pool, loaded by the ``celery`` command.

Being a ``celery.commands`` entry point is also what registers ``-P asyncsql``
without the user importing this package. Keep this import path free of
SQLAlchemy: every ``celery`` invocation pays for it.
"""

from __future__ import annotations

import os

import click
from celery.bin.base import CeleryCommand

from .errors import AsyncPoolError
from .registration import register

register()


@click.group(name="asyncsql")
def asyncsql() -> None:
    """Commands of the asyncsql worker pool (celery_asyncpool)."""


@asyncsql.command(cls=CeleryCommand)
@click.option("-c", "--concurrency", type=int, default=None,
              help="The -c the worker will run with (default: worker_concurrency or CPU count).")
@click.pass_context
def check(ctx: click.Context, concurrency: int | None) -> None:
    """Print the resolved settings and connection budget, then connect to each database.

    Exits non-zero, with the reason, when a setting is wrong, a database cannot be
    reached, or the budget exceeds the server's max_connections.
    """
    from .databases.checks import run_check

    app = ctx.obj.app
    slots = concurrency or app.conf.worker_concurrency or os.cpu_count() or 1
    try:
        problems = run_check(app, slots, echo=click.echo)
    except AsyncPoolError as exc:
        raise click.ClickException(str(exc)) from None
    if problems:
        for problem in problems:
            click.echo(f"error: {problem}", err=True)
        ctx.exit(1)
    click.echo("ok")
