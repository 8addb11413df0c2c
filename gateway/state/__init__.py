"""What the gateway remembers, and where: the state backend seam.

Everything mutable that two gateway processes (workers of one node, or nodes
behind one load balancer) must agree on goes through this package: mailbox
locks, OAuth tokens, the UIDL and size maps, the SMTP spool, login penalties
and console sessions. Two backends implement it:

- ``embedded`` (the default): files and SQLite under ``state_dir``, shared by
  the worker processes of one host through file locks (`gateway.state.files`);
- ``postgresql``: one database shared by every node (`gateway.state.database`,
  schema in `gateway.state.schema`), reached through a thread pool so the
  reactor thread never waits on it.

`gateway.state.files` keeps the state directory's file helpers; they are
re-exported here because most of the code base knows them by this name.
"""

from __future__ import annotations

from gateway.state.files import (
    StateError,
    atomic_write,
    check_private,
    decode_record,
    encode_record,
    ensure_dir,
    fsync_dir,
    json_records,
)

__all__ = [
    "StateError",
    "atomic_write",
    "check_private",
    "decode_record",
    "encode_record",
    "ensure_dir",
    "fsync_dir",
    "json_records",
]
