"""`gateway state migrate` and `gateway state status`: the state backend, for admins.

`migrate` creates or upgrades the PostgreSQL schema (gateway processes only
check it). `status` says which backend this configuration uses and, for
PostgreSQL, the schema version, the gateway processes seen recently and what
each kind of state holds (`STATUS_QUERIES`: one entry per table, so the
pieces of state add their line without touching the rest).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import psycopg

from gateway.cli.common import add_command, emit_json, fail, load_or_report
from gateway.model import Config
from gateway.state.database import StateUnavailable, connect
from gateway.state.files import StateError
from gateway.state.schema import current_version, latest_version, migrate

if TYPE_CHECKING:
    from gateway.cli.common import Commands

# Processes whose lease passed longer ago than this are not listed.
RECENT = "10 minutes"

# name -> (table that must exist, query returning rows of (label, count)).
StatusQuery = tuple[str, str]
STATUS_QUERIES: dict[str, StatusQuery] = {
    "uidl maps": (
        "gateway_uidl_mailboxes",
        "SELECT 'accounts', count(*) FROM gateway_uidl_mailboxes",
    ),
    "locks held": (
        "gateway_mailbox_locks",
        # Only live holders: a dead process's rows are free for the taking.
        "SELECT p.node, count(*) FROM gateway_mailbox_locks JOIN gateway_processes p"
        " USING (process) WHERE p.lease_until > now() GROUP BY 1 ORDER BY 1",
    ),
    "oauth tokens": (
        "gateway_oauth_tokens",
        "SELECT state || CASE WHEN refresh_until > now() THEN ' (refreshing)' ELSE '' END,"
        " count(*) FROM gateway_oauth_tokens GROUP BY 1 ORDER BY 1",
    ),
    "spool depth": (
        "gateway_spool",
        # By the node holding it (delivering), else the node that accepted it.
        "SELECT state || ' on ' || coalesce(split_part(lease_holder, ':', 1), node),"
        " count(*) FROM gateway_spool GROUP BY 1 ORDER BY 1",
    ),
    "login lockouts": (
        "gateway_penalty_events",
        "SELECT book, count(DISTINCT network) FROM gateway_penalty_events"
        " WHERE kind = 'lockout' AND until > extract(epoch FROM now()) GROUP BY book",
    ),
    "console sessions": (
        "gateway_console_sessions",
        "SELECT 'logged in, used in the last hour', count(*) FROM gateway_console_sessions"
        " WHERE admin IS NOT NULL AND last_seen > extract(epoch FROM now()) - 3600",
    ),
}


def register(commands: Commands) -> None:
    state = add_command(
        commands,
        "state",
        _missing_subcommand,
        "the state backend: migrate the PostgreSQL schema, show status",
        "Create or upgrade the PostgreSQL schema the gateway nodes share, or show "
        "which backend is used and what it holds.",
    )
    sub = state.add_subparsers(title="state commands", metavar="COMMAND", required=True)
    add_command(
        sub,
        "migrate",
        _run_migrate,
        "create or upgrade the PostgreSQL schema",
        "Apply every schema migration the database lacks (safe to run again, and "
        "from two hosts at once).",
    )
    add_command(
        sub,
        "status",
        _run_status,
        "backend, schema version, nodes seen, locks held, spool depth",
        "Show the state backend and, for PostgreSQL, the schema version, the "
        "gateway processes seen recently and what the shared state holds.",
    )


def _missing_subcommand(args: argparse.Namespace) -> int:
    print("gateway state: name a command: migrate or status", file=sys.stderr)
    return 2


def _with_database(
    args: argparse.Namespace, command: str, work: Callable[[Config, psycopg.Connection[Any]], int]
) -> int:
    config = load_or_report(args)
    if config is None:
        return 1
    if config.state.backend != "postgresql":
        if command == "state status":
            return _embedded_status(args, config)
        return fail(command, 'nothing to do: [state] backend is "embedded"')
    try:
        with connect(config.state, autocommit=True) as connection:
            return work(config, connection)
    except (StateUnavailable, StateError, psycopg.Error) as e:
        return fail(command, str(e).strip().splitlines()[0] if str(e).strip() else repr(e))


def _run_migrate(args: argparse.Namespace) -> int:
    def work(config: Config, connection: psycopg.Connection[Any]) -> int:
        applied = migrate(connection)
        version = current_version(connection)
        if args.json:
            emit_json({"version": version, "applied": [m.name for m in applied]})
        elif applied:
            for migration in applied:
                print(f"applied {migration.version:04d} {migration.name}")
            print(f"schema version {version}")
        else:
            print(f"schema version {version}: up to date")
        return 0

    return _with_database(args, "state migrate", work)


def _embedded_status(args: argparse.Namespace, config: Config) -> int:
    if args.json:
        emit_json({"backend": "embedded", "state_dir": str(config.state_dir)})
    else:
        print(f"backend: embedded (state_dir {config.state_dir})")
    return 0


def _run_status(args: argparse.Namespace) -> int:
    def work(config: Config, connection: psycopg.Connection[Any]) -> int:
        version, wanted = current_version(connection), latest_version()
        processes = (
            connection.execute(
                "SELECT node, process, lease_until > now() AS alive,"
                " extract(epoch FROM now() - seen_at)::float8"
                " FROM gateway_processes"
                f" WHERE lease_until > now() - interval '{RECENT}'"
                " ORDER BY node, process"
            ).fetchall()
            if version
            else []
        )
        sections: dict[str, list[tuple[str, int]]] = {}
        for name, (table, query) in STATUS_QUERIES.items():
            exists = connection.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
            if exists and exists[0]:
                sections[name] = [(str(label), int(n)) for label, n in connection.execute(query)]
        if args.json:
            emit_json(
                {
                    "backend": "postgresql",
                    "schema_version": version,
                    "schema_wanted": wanted,
                    "processes": [
                        {"node": n, "process": p, "alive": a, "seen_seconds_ago": round(s, 1)}
                        for n, p, a, s in processes
                    ],
                    **{name: dict(rows) for name, rows in sections.items()},
                }
            )
            return 0 if version == wanted else 1
        note = ""
        if version != wanted:
            note = f" (this gateway needs {wanted}: run `gateway state migrate`)"
        print("backend: postgresql")
        print(f"schema version: {version}{note}")
        print(f"processes seen in the last {RECENT}: {len(processes)}")
        for node, process, alive, seen in processes:
            state = "alive" if alive else "gone"
            print(f"  {node}  {process}  {state}, seen {seen:.0f} s ago")
        for name, rows in sections.items():
            print(f"{name}: {sum(n for _, n in rows)}")
            for label, n in rows:
                print(f"  {label}: {n}")
        return 0 if version == wanted else 1

    return _with_database(args, "state status", work)
