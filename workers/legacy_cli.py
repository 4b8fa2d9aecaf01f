"""`credits import-legacy`: bring credit histories over from the old membership system (docs/MIGRATION.md).

Exit status: 0 every member imported (now or by an earlier run) and matched; 1 some member
left out or mismatched; 2 unusable arguments or an unreadable file (nothing imported).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

COMMAND = "import-legacy"


def register(commands: argparse._SubParsersAction) -> None:
    """Add the subcommand to `credits`' parser."""
    parser = commands.add_parser(
        COMMAND,
        help="import members' credit histories exported from the old membership system",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("transactions", type=Path, help="CSV: Id,MembershipId,Type,Amount,CreatedAt,ExpiresAt")
    parser.add_argument(
        "--balances",
        type=Path,
        help="CSV: MembershipId,Balance as the old system showed them; compared, never 'fixed' (default: none, nothing compared)",
    )
    parser.add_argument(
        "--customer-map", type=Path, help="CSV: MembershipId,CustomerId (default: the customer id is the MembershipId)"
    )
    parser.add_argument(
        "--report",
        type=Path,
        default=Path("legacy-import-report.csv"),
        help="balance differences CSV (with --balances); the bad-row list goes beside it as <name>-problems.csv (default: %(default)s)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check and replay everything, write nothing to the database (default: off, the import is written)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="worker processes replaying and writing members, on PostgreSQL (default: the CPUs, at most 4: %(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    from infra.db import SchemaNotReady
    from infra.legacy_staging import UnusableInput
    from service_layer.legacy_import import ImportInterrupted

    try:
        return asyncio.run(_run(args))
    except (UnusableInput, SchemaNotReady) as unusable:
        print(f"credits import-legacy: {unusable}; nothing imported", file=sys.stderr)
        return 2
    except ImportInterrupted as interrupted:
        print(
            f"credits import-legacy: {interrupted}; the members written so far stay imported: run the same command again to finish",
            file=sys.stderr,
        )
        return 3


async def _run(args: argparse.Namespace) -> int:
    from infra.db import Database, require_current_schema
    from infra.legacy_staging import UnusableInput
    from infra.settings import get_settings
    from service_layer.legacy_import import ImportRequest, import_legacy

    for path in (args.transactions, args.balances, args.customer_map):
        if path is not None and not path.is_file():
            raise UnusableInput(f"{path} is not a readable file")
    if not 1 <= args.processes <= 64:
        raise UnusableInput(f"--processes {args.processes}: from 1 to 64")
    if not args.report.parent.is_dir():
        raise UnusableInput(f"--report {args.report}: no such directory")
    settings = get_settings()
    request = ImportRequest(
        args.transactions, args.balances, args.customer_map, args.report, args.dry_run, args.processes
    )
    db = Database(settings.effective_database_url)
    try:
        await require_current_schema(db)
        with _RichProgress() as progress:
            summary = await import_legacy(request, db, settings.policy, datetime.now(UTC), progress)
    finally:
        await db.dispose()
    return summary.exit_status


class _RichProgress:
    """A progress bar on stderr; report lines on stdout, printed above it."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.out = Console(highlight=False, soft_wrap=True)
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self.task = None

    def __enter__(self) -> _RichProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()

    def start(self, phase: str, total: int | None) -> None:
        if self.task is not None:
            self.bar.update(self.task, completed=self.bar.tasks[self.task].total or 0)
        self.task = self.bar.add_task(phase, total=total)

    def advance(self, amount: int) -> None:
        self.bar.advance(self.task, amount)

    def say(self, line: str) -> None:
        self.out.print(line, markup=False)
