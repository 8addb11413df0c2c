"""The admin HTTP listener: Prometheus metrics, health and readiness, and later
the web console, all on one twisted.web resource tree (`gateway.admin.site`).

Nothing here reaches into the device-facing servers: what happened is read
from the structured log events they already write (`gateway.admin.events`),
and what is there now from the state objects at scrape time
(`gateway.admin.collectors`).
"""
