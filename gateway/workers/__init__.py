"""`workers = N`: N reactor processes serving the same listening sockets.

The twistd process stays the parent: it binds every listening socket while
it still has the privileges to (before `--uid/--gid` drops them), then runs
N worker processes that adopt those sockets and serve them, restarts a
worker that dies, and forwards reload and stop to all of them
(`gateway.workers.supervisor`). A worker is `python -m gateway.workers.child`
(`gateway.workers.child`). The kernel hands each new connection to whichever
worker accepts it first, so busy workers take fewer.

Nothing is imported here: `gateway.runtime` imports `gateway.workers.sockets`,
and the supervisor and the child import the service tree.
"""
