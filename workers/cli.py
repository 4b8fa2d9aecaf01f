"""`credits`: the operator's command line.

    credits demo                 the main job on the embedded default (SQLite + in-process Redis)
    credits migrate              apply database migrations (Procfile `release`)
    credits web                  serve the HTTP API on $PORT
    credits worker               run Dramatiq workers (needs REDIS_URL)
    credits scheduler            enqueue periodic jobs on schedule
    credits run <periodic-job>   enqueue one periodic job now
    credits dead-letters list    show dead-lettered messages (archived in the database)
    credits dead-letters replay ID...   re-enqueue archived dead letters
"""

from __future__ import annotations

import argparse
import os
import sys

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="credits", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="simulate months of customers through the real actors")
    demo.add_argument("--customers", type=int, default=200)
    demo.add_argument("--months", type=int, default=14)
    demo.add_argument("--seed", type=int, default=7)

    commands.add_parser("migrate", help="apply database migrations")

    web = commands.add_parser("web", help="serve the HTTP API")
    web.add_argument("--host", default="0.0.0.0")
    web.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))

    worker = commands.add_parser("worker", help="run Dramatiq worker processes")
    worker.add_argument("--processes", type=int, default=2)
    worker.add_argument("--threads", type=int, default=8)

    commands.add_parser("scheduler", help="enqueue periodic jobs on schedule")

    run = commands.add_parser("run", help="enqueue a periodic job now")
    run.add_argument("job", choices=PERIODIC_JOB_NAMES)
    run.add_argument("--as-of", help="ISO 8601 time to sweep as of (not in the future); default now")

    dead = commands.add_parser("dead-letters", help="list or replay dead-lettered messages")
    dead_commands = dead.add_subparsers(dest="dead_letters_command", required=True)
    dead_list = dead_commands.add_parser("list", help="show dead letters not yet replayed")
    dead_list.add_argument("--all", action="store_true", help="include replayed ones")
    dead_list.add_argument("--limit", type=int, default=100)
    dead_replay = dead_commands.add_parser("replay", help="re-enqueue dead letters by id")
    dead_replay.add_argument("ids", type=int, nargs="+")
    dead_replay.add_argument("--force", action="store_true", help="replay even if replayed before")

    args = parser.parse_args(argv)
    return COMMANDS[args.command](args) or 0


def _demo(args) -> int:
    from workers.demo import run_demo

    return run_demo(customers=args.customers, months=args.months, seed=args.seed)


def _migrate(args) -> int:
    from alembic import command

    from infra.db.engine import alembic_config
    from infra.settings import get_settings

    settings = get_settings()
    command.upgrade(alembic_config(settings.effective_database_url), "head")
    print("database migrated to head", file=sys.stderr)
    return 0


def _web(args) -> int:
    import uvicorn

    from api.app import app_factory
    from infra.db import require_current_schema_now
    from infra.settings import get_settings

    # Refuse here, in one readable line, rather than from inside uvicorn's lifespan.
    require_current_schema_now(get_settings().effective_database_url)
    uvicorn.run(app_factory(), host=args.host, port=args.port, log_config=None, proxy_headers=True)
    return 0


def _worker(args) -> int:
    from infra.db import require_current_schema_now
    from infra.logging import configure_logging
    from infra.settings import get_settings
    from workers.supervisor import Supervisor

    settings = get_settings()
    if not settings.broker_address:
        print("credits worker needs BROKER_URL (or REDIS_URL): the embedded default runs in one process (`credits demo`)", file=sys.stderr)
        return 2
    # Refuse here, once and readably: a group refused at boot would only be restarted.
    require_current_schema_now(settings.effective_database_url)
    configure_logging(settings.log_level)
    group = [sys.executable, "-m", "dramatiq", "workers.actors", "--processes", str(args.processes), "--threads", str(args.threads)]
    return Supervisor(group).run()


def _scheduler(args) -> int:
    from infra.settings import get_settings
    from workers.scheduler import run_scheduler

    if not get_settings().broker_address:
        # On the in-process Redis its messages would reach no worker: refuse instead of idling.
        print("credits scheduler needs BROKER_URL (or REDIS_URL): on the embedded default run a sweep with `credits run <job>`", file=sys.stderr)
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
    from datetime import datetime, timezone

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
            replayed = f" replayed {row.replayed_at:%Y-%m-%d %H:%M}" if row.replayed_at else ""
            print(f"{row.id:>6}  {row.failed_at:%Y-%m-%d %H:%M:%S}  {row.actor_name:<16} {(row.error or '')[:100]}{replayed}")
        print(f"{len(rows)} dead letter(s)", file=sys.stderr)

    async def replaying(broker) -> None:
        db = Database(settings.effective_database_url)
        try:
            for line in await dead_letters.replay(db, broker, args.ids, datetime.now(timezone.utc), force=args.force):
                print(line)
        finally:
            await db.dispose()

    if args.dead_letters_command == "list":
        asyncio.run(listing())
        return 0
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
}

if __name__ == "__main__":
    sys.exit(main())
