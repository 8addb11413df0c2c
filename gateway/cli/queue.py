"""`gateway queue list|retry ID|delete ID`: the SMTP spool for admins.

The command and a running gateway share the spool directory. `list` only
reads (it never removes what looks like junk: a file in tmp/ may be a message
arriving right now). `retry` and `delete` change files themselves only when no
gateway holds the spool's lock; otherwise they leave a request in
spool/control/, which the gateway carries out within a few seconds (it looks
every two), so a message is never changed under the relay's feet while it is
being delivered.

Run it as the user the gateway runs as: spool files are 0600.

With `[state] backend = "postgresql"` the command works on the shared
`gateway_spool` table: `retry` and `delete` are done at once in one
transaction, unless a live gateway process is delivering the message right
now; then they are left on its row for that process, which carries them out
when its attempt ends.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any

from gateway.cli.common import add_command, config_location
from gateway.config import ConfigError, load_config
from gateway.model import Config
from gateway.smtp.spool import QueueEntry, SpoolDir, valid_id
from gateway.smtp.spool_pg import change, list_entries
from gateway.state.database import StateUnavailable, connect
from gateway.units import short_duration, short_size

if TYPE_CHECKING:
    from gateway.cli.common import Commands


class CommandFailed(Exception):
    """What the admin is told, on one line, before exit status 1."""


def register(commands: Commands) -> None:
    """Add `gateway queue` and its subcommands to the admin command."""
    queue = add_command(
        commands,
        "queue",
        _missing_subcommand,
        "list, retry or delete messages in the SMTP spool",
        "Show the SMTP relay's spool (queued messages and dead letters), retry "
        "a message now, or delete one.",
    )
    sub = queue.add_subparsers(title="queue commands", metavar="COMMAND", required=True)
    add_command(
        sub,
        "list",
        _run_list,
        "list queued messages and dead letters",
        "List every message in the spool: queued ones with their attempts, next "
        "try and last error; dead letters with the reason they failed.",
    )
    for name, summary in (
        ("retry", "try a message again now (a dead letter goes back into the queue)"),
        ("delete", "remove a message from the spool for good"),
    ):
        parser = add_command(sub, name, _run_change, summary, summary.capitalize() + ".")
        parser.add_argument("id", metavar="ID", help="the queue id `gateway queue list` shows")
        parser.set_defaults(verb=name)


def _missing_subcommand(args: argparse.Namespace) -> int:
    print("gateway queue: name a command: list, retry ID or delete ID", file=sys.stderr)
    return 2


def _load(args: argparse.Namespace) -> tuple[Config, SpoolDir]:
    location = config_location(args)
    try:
        config = load_config(location.path)
    except ConfigError as e:
        problems = "; ".join(str(p) for p in e.problems[:3])
        raise CommandFailed(
            f"configuration {location.path} ({location.origin}): {problems}"
        ) from None
    return config, SpoolDir(config.state_dir / "spool")


def _run(args: argparse.Namespace, work: Any) -> int:
    try:
        return int(work(args))
    except CommandFailed as e:
        print(f"gateway queue: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"gateway queue: {e.strerror or e}: {e.filename or ''}", file=sys.stderr)
        return 1
    except StateUnavailable as e:
        print(f"gateway queue: state database unreachable: {e}", file=sys.stderr)
        return 1


_PG_SPOOL = "PostgreSQL table gateway_spool"


def _shared(config: Config) -> bool:
    return config.state.backend == "postgresql"


def _pg_entries(config: Config) -> list[QueueEntry]:
    with connect(config.state) as connection:
        return list_entries(connection)


# -- list ------------------------------------------------------------------------


def _run_list(args: argparse.Namespace) -> int:
    return _run(args, _list)


def _list(args: argparse.Namespace) -> int:
    config, spool = _load(args)
    if _shared(config):
        where, entries = _PG_SPOOL, _pg_entries(config)
    else:
        where = str(spool.root)
        entries = spool.scan(clean=False) if spool.queue.is_dir() else []
    now = time.time()
    if args.json:
        document = {"spool": where, "messages": [entry_json(e) for e in entries]}
        print(json.dumps(document, indent=2))
        return 0
    if not entries:
        print(f"{where}: no messages")
        return 0
    for entry in entries:
        print(describe(entry, now))
    queued = sum(1 for e in entries if e.status == "queued")
    print(f"{queued} queued, {len(entries) - queued} dead letter(s) in {where}")
    return 0


def entry_json(entry: QueueEntry) -> dict[str, Any]:
    env, state = entry.envelope, entry.state
    return {
        "id": entry.id,
        "status": entry.status,
        "account": env.account,
        "device": env.device,
        "sender": env.original_sender,
        "sent_as": env.sender,
        "recipients": list(env.recipients),
        "pending": entry.pending,
        "delivered": state.delivered,
        "failed": state.failed,
        "size": env.size,
        "received": env.received,
        "attempts": state.attempts,
        "next_attempt": state.next_attempt if entry.status == "queued" else None,
        "last_error": state.last_error or None,
        "dead_reason": state.dead_reason,
        "bounce_of": env.bounce_of,
    }


def describe(entry: QueueEntry, now: float) -> str:
    env, state = entry.envelope, entry.state
    rcpts = entry.pending or list(env.recipients)
    more = f" (+{len(rcpts) - 1})" if len(rcpts) > 1 else ""
    sender = f"<{env.original_sender}>"
    what = "bounce" if env.identified_by == "bounce" else f"device {env.device}"
    head = (
        f"{entry.id}  {entry.status:6}  account {env.account}  {what}  {short_size(env.size)}  "
        f"age {short_duration(now - env.received)}  {sender} -> <{rcpts[0]}>{more}"
    )
    lines = [head]
    if entry.status == "queued":
        when = state.next_attempt - now
        nxt = "now" if when <= 0 else f"in {short_duration(when)}"
        lines.append(f"    attempts {state.attempts}, next try {nxt}")
        if state.last_error:
            lines.append(f"    last error: {state.last_error}")
    elif state.dead_reason:
        lines.append(f"    failed: {state.dead_reason}")
    return "\n".join(lines)


# -- retry / delete ------------------------------------------------------------------


def _run_change(args: argparse.Namespace) -> int:
    return _run(args, _change)


def _change(args: argparse.Namespace) -> int:
    verb, message_id = args.verb, args.id
    if not valid_id(message_id):
        raise CommandFailed(f"{message_id!r} is not a queue id (see `gateway queue list`)")
    config, spool = _load(args)
    if _shared(config):
        return _change_shared(args, config, verb, message_id)
    if not spool.queue.is_dir():
        raise CommandFailed(f"no message {message_id} ({spool.root} has no spool yet)")
    with spool.offline() as offline:
        entry = spool.read(message_id)
        if entry is None:
            raise CommandFailed(f"no message {message_id} in {spool.root}")
        if offline:
            if verb == "delete":
                spool.remove(entry)
                done = "deleted"
            else:
                spool.retry_now(entry, time.time())
                done = "will be tried as soon as the gateway starts"
        else:
            spool.request(verb, message_id)
            done = f"{verb} requested; the running gateway carries it out within seconds"
    if args.json:
        print(json.dumps({"id": message_id, "action": verb, "gateway_running": not offline}))
    else:
        print(f"{message_id}: {done}")
    return 0


def _change_shared(args: argparse.Namespace, config: Config, verb: str, message_id: str) -> int:
    with connect(config.state) as connection:
        outcome = change(
            connection, "delete" if verb == "delete" else "retry", message_id, time.time()
        )
    if outcome is None:
        raise CommandFailed(f"no message {message_id} in the {_PG_SPOOL}")
    held = outcome == "requested"
    if args.json:
        print(json.dumps({"id": message_id, "action": verb, "gateway_running": held}))
    elif held:
        print(f"{message_id}: {verb} requested; the gateway delivering it carries it out")
    else:
        print(f"{message_id}: {'deleted' if verb == 'delete' else 'will be tried at once'}")
    return 0
