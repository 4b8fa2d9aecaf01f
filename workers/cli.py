"""`credits`: the operator's command line (its commands: ``OVERVIEW``, shown by ``credits --help``)."""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC

from workers import legacy_cli

PERIODIC_JOB_NAMES = (
    "expire_credits",
    "lapse_holds",
    "collect_payments",
    "pay_referrals",
    "send_notifications",
    "warn_expiring_credits",
    "notice_retention_crossings",
    "archive_dead_letters",
)

#: `credits worker`'s defaults (also the Procfile's and docker-compose.yml's, and bench.end_to_end's).
WORKER_PROCESSES = 2
WORKER_THREADS = 64

#: The commands at a glance, indented as ``--help`` shows them (a plain string: formatters leave it alone).
OVERVIEW = """
    credits demo                 the main job on the embedded default (SQLite + in-process Redis)
    credits migrate              apply database migrations (before starting web, worker, scheduler)
    credits web                  serve the HTTP API on $PORT
    credits worker               run Dramatiq workers (needs REDIS_URL)
    credits scheduler            enqueue periodic jobs on schedule
    credits run <periodic-job>   enqueue one periodic job now
    credits dead-letters list    show dead-lettered messages (archived in the database)
    credits dead-letters show ID print one dead letter whole (personal data masked)
    credits dead-letters replay ID...   re-enqueue archived dead letters
    credits import-legacy CSV    bring members' credit histories over from the old system
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="credits",
        description="`credits`: the operator's command line.\n\n" + OVERVIEW,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _add_process_commands(commands)
    _add_job_commands(commands)
    legacy_cli.register(commands)
    args = parser.parse_args(argv)
    return COMMANDS[args.command](args) or 0


def _add_process_commands(commands) -> None:
    """demo, migrate, web, worker, scheduler: the processes one runs."""
    demo = commands.add_parser("demo", help="simulate months of customers through the real actors")
    demo.add_argument("--customers", type=int, default=30, help="how many simulated customers (default: %(default)s)")
    demo.add_argument(
        "--months", type=int, default=14, help="how many months of business, ending last month (default: %(default)s)"
    )
    demo.add_argument(
        "--seed", type=int, default=7, help="random seed: the same seed tells the same story (default: %(default)s)"
    )
    demo.add_argument(
        "--keep",
        action="store_true",
        help="keep the database, the payouts CSV and the mail file, and print where (default: all removed)",
    )

    commands.add_parser("migrate", help="apply database migrations (run it before starting the processes)")

    web = commands.add_parser("web", help="serve the HTTP API")
    web.add_argument("--host", default="0.0.0.0", help="address to listen on (default: %(default)s, every interface)")
    web.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("PORT", "8000")),
        help="port to listen on (default: $PORT, else 8000; now %(default)s)",
    )

    worker = commands.add_parser("worker", help="run Dramatiq worker processes")
    worker.add_argument(
        "--processes", type=int, default=WORKER_PROCESSES, help="worker processes (default: %(default)s)"
    )
    worker.add_argument(
        "--threads", type=int, default=WORKER_THREADS, help="worker threads per process (default: %(default)s)"
    )

    commands.add_parser("scheduler", help="enqueue periodic jobs on schedule")


def _add_job_commands(commands) -> None:
    """run, dead-letters: one-off jobs on a running system."""
    run = commands.add_parser("run", help="enqueue a periodic job now")
    run.add_argument("job", choices=PERIODIC_JOB_NAMES, metavar="JOB", help="the periodic job: %(choices)s")
    run.add_argument(
        "--as-of",
        type=_as_of,
        metavar="TIME",
        help="run as of this ISO 8601 time with a timezone, not in the future, e.g. 2026-01-31T00:00:00Z, to catch up (default: now)",
    )

    dead = commands.add_parser("dead-letters", help="list, show or replay dead-lettered messages")
    dead_commands = dead.add_subparsers(dest="dead_letters_command", required=True)
    dead_list = dead_commands.add_parser("list", help="show dead letters not yet replayed, one line each")
    dead_list.add_argument(
        "--all", action="store_true", help="include those already replayed (default: not replayed only)"
    )
    dead_list.add_argument(
        "--limit", type=int, default=100, help="show at most this many, oldest first (default: %(default)s)"
    )
    dead_show = dead_commands.add_parser(
        "show", help="print one dead letter: its whole error and its message (personal data masked)"
    )
    dead_show.add_argument("id", type=int, help="the dead letter's id, from `credits dead-letters list`")
    dead_replay = dead_commands.add_parser("replay", help="re-enqueue dead letters by id")
    dead_replay.add_argument(
        "ids", type=int, nargs="+", metavar="ID", help="dead letter ids, from `credits dead-letters list`"
    )
    dead_replay.add_argument(
        "--force", action="store_true", help="replay even those replayed before (default: skip them)"
    )


def _as_of(text: str) -> str:
    """Checked here, before anything is enqueued: a refused time is an exit status 2, not a dead letter."""
    from datetime import datetime

    from workers.as_of import parse_as_of

    try:
        return parse_as_of(text, datetime.now(UTC)).isoformat()
    except ValueError as problem:
        raise argparse.ArgumentTypeError(str(problem)) from None


def _demo(args) -> int:
    from workers.demo import run_demo

    return run_demo(customers=args.customers, months=args.months, seed=args.seed, keep=args.keep)


def _migrate(args) -> int:
    import structlog
    from alembic import command

    from infra.db.engine import alembic_config, head_revision
    from infra.logging import configure_logging
    from infra.settings import get_settings

    settings = get_settings()
    configure_logging(
        settings.log_level, settings.log_max_value_chars
    )  # alembic's own lines too: JSON, warnings and above
    command.upgrade(alembic_config(settings.effective_database_url), "head")
    structlog.get_logger("credits.migrate").info(
        "database_migrated", head=head_revision(), message="database migrated to head"
    )
    return 0


def _web(args) -> int:
    import uvicorn

    from api.app import app_factory
    from api.head_limits import HeadLimits, head_limited_protocol
    from infra.db import require_current_schema_now
    from infra.settings import get_settings

    settings = get_settings()
    # Refuse here, in one readable line, rather than from inside uvicorn's lifespan.
    require_current_schema_now(settings.effective_database_url)
    limits = HeadLimits(settings.http_max_request_line_bytes, settings.http_max_header_bytes)
    uvicorn.run(
        app_factory(),
        host=args.host,
        port=args.port,
        log_config=None,
        proxy_headers=True,
        http=head_limited_protocol(limits),
    )
    return 0


def _worker(args) -> int:
    from infra.db import require_current_schema_now
    from infra.logging import configure_logging
    from infra.settings import get_settings
    from workers.startup import warn_unset_optional_settings
    from workers.supervisor import Supervisor

    settings = get_settings()
    if not settings.broker_address:
        print(
            "credits worker needs BROKER_URL (or REDIS_URL): the embedded default runs in one process (`credits demo`)",
            file=sys.stderr,
        )
        return 2
    # Refuse here, once and readably: a group refused at boot would only be restarted.
    require_current_schema_now(settings.effective_database_url)
    configure_logging(settings.log_level, settings.log_max_value_chars)
    warn_unset_optional_settings(settings)  # once here, not once per worker process or per run
    group = [
        sys.executable,
        "-m",
        "dramatiq",
        "workers.actors",
        "--processes",
        str(args.processes),
        "--threads",
        str(args.threads),
    ]
    return Supervisor(group).run()


def _scheduler(args) -> int:
    from infra.settings import get_settings
    from workers.scheduler import run_scheduler

    if not get_settings().broker_address:
        # On the in-process Redis its messages would reach no worker: refuse instead of idling.
        print(
            "credits scheduler needs BROKER_URL (or REDIS_URL): on the embedded default run a sweep with `credits run <job>`",
            file=sys.stderr,
        )
        return 2
    run_scheduler(get_settings())
    return 0


def _run(args) -> int:
    from workers.actors import PERIODIC_ACTORS
    from workers.runtime import get_runtime

    _refuse_unmigrated_embedded(get_runtime().settings)
    options = {"as_of": args.as_of} if args.as_of else {}
    message = PERIODIC_ACTORS[args.job].send(**options)
    print(f"enqueued {args.job} as message {message.message_id}", file=sys.stderr)
    if _work_here_if_embedded():
        print(f"{args.job} done", file=sys.stderr)
    return 0


def _dead_letters(args) -> int:
    import asyncio
    from datetime import datetime

    from infra.db import Database, require_current_schema_now
    from workers import dead_letters
    from workers.runtime import get_runtime

    settings = get_runtime().settings
    require_current_schema_now(settings.effective_database_url)

    async def listing() -> None:
        db = Database(settings.effective_database_url)
        try:
            rows = await dead_letters.list_dead_letters(db, include_replayed=args.all, limit=args.limit)
        finally:
            await db.dispose()
        for row in rows:
            print(dead_letters.summary_line(row))
        print(
            f"{len(rows)} dead letter(s); errors are cut at a word (…): `credits dead-letters show ID` prints one whole",
            file=sys.stderr,
        )

    async def showing() -> int:
        db = Database(settings.effective_database_url)
        try:
            row = await dead_letters.get_dead_letter(db, args.id)
        finally:
            await db.dispose()
        if row is None:
            print(f"no dead letter {args.id}", file=sys.stderr)
            return 1
        print(dead_letters.full_text(row))
        return 0

    async def replaying(broker) -> None:
        db = Database(settings.effective_database_url)
        try:
            for line in await dead_letters.replay(db, broker, args.ids, datetime.now(UTC), force=args.force):
                print(line)
        finally:
            await db.dispose()

    if args.dead_letters_command == "list":
        asyncio.run(listing())
        return 0
    if args.dead_letters_command == "show":
        return asyncio.run(showing())
    from workers.actors import broker

    asyncio.run(replaying(broker))
    _work_here_if_embedded()
    return 0


def _refuse_unmigrated_embedded(settings) -> None:
    from infra.broker import is_embedded

    if is_embedded(settings):
        # Refuse before enqueueing and booting the in-process worker; nothing else could run the message.
        from infra.db import require_current_schema_now

        require_current_schema_now(settings.effective_database_url)


def _work_here_if_embedded() -> bool:
    """On the embedded default no other process can reach the in-process Redis: do the work here."""
    from infra.broker import is_embedded
    from workers.actors import broker
    from workers.runtime import get_runtime

    if not is_embedded(get_runtime().settings):
        return False
    from workers.inprocess import drain, running_worker

    with running_worker(broker) as worker:
        drain(broker, worker)
    return True


COMMANDS = {
    "demo": _demo,
    "migrate": _migrate,
    "web": _web,
    "worker": _worker,
    "scheduler": _scheduler,
    "run": _run,
    "dead-letters": _dead_letters,
    legacy_cli.COMMAND: legacy_cli.run,
}

if __name__ == "__main__":
    sys.exit(main())
