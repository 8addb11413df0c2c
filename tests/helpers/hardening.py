"""What the attack regression tests (tests/integration/test_hardening.py) measure
the real gateway with: its memory from /proc, the real fail2ban-regex over
its log, and a rank test for two samples of timings."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from tests.helpers.log_lines import FILTER

MiB = 1024 * 1024


def proc_status(pid: int) -> dict[str, int]:
    """The Vm* fields of /proc/PID/status, in bytes."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name.startswith("Vm") and value.strip().endswith("kB"):
            found[name] = int(value.split()[0]) * 1024
    return found


def reset_peak(pid: int) -> bool:
    """Set the process's VmHWM back to its current VmRSS (Linux's clear_refs
    `5`), so a peak from before the test does not count; False if the kernel
    does not allow it."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def fail2ban_regex_hosts(logfile: Path, filter_file: Path = FILTER) -> list[str]:
    """The address of every match of the real `fail2ban-regex` (Debian's
    fail2ban) over `logfile` with `filter_file`, one per matched line.

    `-v` lists, under each failregex, `IP  date` for each line it matched:
    the address fail2ban would ban, never the line's text."""
    command = shutil.which("fail2ban-regex")
    assert command is not None, "fail2ban-regex missing: apt-get install fail2ban"
    result = subprocess.run(
        [command, "-v", str(logfile), str(filter_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    section = result.stdout.partition("\nFailregex:")[2].partition("\nIgnoreregex:")[0]
    total = re.match(r" (\d+) total", section)
    assert total is not None, result.stdout
    hosts = re.findall(r"^\|\s+(\S+)\s{2,}[A-Z][a-z]{2} [A-Z][a-z]{2} ", section, re.MULTILINE)
    assert len(hosts) == int(total.group(1)), result.stdout
    return hosts


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def mann_whitney_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of the Mann-Whitney U test (normal approximation with
    tie correction; fine for 50 against 50): how likely samples this far apart
    are if both came from one distribution."""
    n1, n2 = len(a), len(b)
    pooled = sorted([(v, 0) for v in a] + [(v, 1) for v in b])
    ranks = [0.0] * len(pooled)
    ties = 0.0
    i = 0
    while i < len(pooled):
        j = i
        while j + 1 < len(pooled) and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[k] = (i + j) / 2 + 1
        size = j - i + 1
        ties += size**3 - size
        i = j + 1
    rank_sum = sum(r for r, (_, group) in zip(ranks, pooled, strict=True) if group == 0)
    u = rank_sum - n1 * (n1 + 1) / 2
    n = n1 + n2
    variance = n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1)))
    if variance == 0:
        return 1.0
    z = (abs(u - n1 * n2 / 2) - 0.5) / math.sqrt(variance)
    return math.erfc(max(z, 0.0) / math.sqrt(2))
