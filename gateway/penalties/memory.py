"""Login penalties, after Dovecot's auth penalty: failed logins slow their source, then lock it out.

Three failures per connection and a one-second pause per refusal (what
gateway.sessions always did) only slow one connection: a guesser opens the
next. So failures are counted across connections, by where they come from:

- per address (an IPv6 address by its /64, or the prefix configured: one
  host owns a whole /64): each failure doubles the pause before the next
  answer to that address, 2, 4, 8 s up to 15 s, Dovecot's steps; the
  refusal's own one-second pause is the first step. `lockout_after`
  failures within `lockout_window` refuse the address outright for
  `lockout_time` (Dovecot has no lockout of its own: its policy server's
  rejection is a failed login, and so is ours);
- per device name *and* address, for the pause: an attacker's failures for
  a name never slow that device logging in from its own address, and a
  device sharing an address (NAT) with someone who logs in cleanly stays
  penalized for its name;
- per device name across all addresses, only to slow, never to lock (a
  lockout per name would let anyone lock out any device): past
  `device_slow_after` failures within the window, every address the device
  has not logged in from waits, so a password spray from many addresses
  is slowed while the device itself, from where it logged in before, is not.

As in Dovecot, a failure repeating one of the last ten name-and-password
attempts of its address does not count again: a printer with a stale
password keeps polling with the same wrong one and would otherwise lock
its own address. A successful login clears its address's and its (device,
address) penalty. Trusted networks are never penalized.

`PenaltyBook` is the whole interface the authenticator uses;
`gateway.penalties.shared` shares a `MemoryPenaltyBook` between processes
(nodes through PostgreSQL, a host's workers through SQLite). In memory,
every table is bounded (`max_entries`, oldest dropped first) and entries
expire on the injected clock: guessed device names and rotating addresses
cannot grow the process.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import ipaddress
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Literal, Protocol

from twisted.internet.interfaces import IReactorTime

from gateway.model import IPNetwork, PenaltySettings
from gateway.net import parse_peer_address

# Dovecot's CHECKSUM_VALUE_PTR_COUNT: a failure repeating one of this many
# recent attempts (same name, same password) of its address is not counted.
REPEATS_REMEMBERED = 10
# How long a successful login keeps the device's address exempt from the
# device-wide slowdown.
KNOWN_FOR = 30 * 24 * 3600.0
# Longer device names (any text a client sends) are remembered by digest.
_NAME_KEY_MAX = 64


@dataclass(frozen=True)
class Penalized:
    """A penalty a failure started, for the one log line that says so."""

    kind: Literal["lockout", "device_slowdown"]
    device: str
    # The address key (the address, or its IPv6 network); "" for a device-wide slowdown.
    network: str
    failures: int
    window: float
    # How long the lockout lasts; the longest pause for a slowdown.
    seconds: float


class PenaltyBook(Protocol):
    """What the device authenticator asks and tells about failed logins.

    `address` is the peer's address as the servers see it (after the PROXY
    protocol); the book folds it to its key. `device` is the name the peer
    sent, configured or not. `attempt` identifies a name-and-password
    attempt (a keyed digest) so a repeated one is not counted twice.
    """

    def delay_for(self, address: str, device: str) -> float:
        """Seconds to wait before answering the current attempt."""
        ...

    def failed(self, address: str, device: str, attempt: bytes = b"") -> tuple[Penalized, ...]:
        """Count a failed login; return the penalties it started."""
        ...

    def succeeded(self, address: str, device: str) -> None:
        """A successful login: clear the address's and the (device, address) penalty."""
        ...

    def locked(self, address: str) -> bool:
        """Whether logins from `address` are refused outright."""
        ...


class NoPenalties:
    """`[penalties] enabled = false`: a refusal's one-second pause is all."""

    def delay_for(self, address: str, device: str) -> float:
        return 0.0

    def failed(self, address: str, device: str, attempt: bytes = b"") -> tuple[Penalized, ...]:
        return ()

    def succeeded(self, address: str, device: str) -> None:
        return None

    def locked(self, address: str) -> bool:
        return False


@dataclass(frozen=True)
class Counted:
    """What one failure did: whether it counted (not a repeated attempt) at
    its address, and the penalties it started."""

    counted: bool
    penalized: tuple[Penalized, ...]


@dataclass
class _Tally:
    """Failures of one key: their times within the window, recent attempts."""

    failures: deque[float]
    updated: float
    repeats: deque[bytes] = field(default_factory=lambda: deque(maxlen=REPEATS_REMEMBERED))

    def count(self, since: float) -> int:
        while self.failures and self.failures[0] <= since:
            self.failures.popleft()
        return len(self.failures)

    def add(self, when: float, attempt: bytes) -> bool:
        """Count a failure unless it repeats a recent attempt; whether it counted."""
        if attempt and attempt in self.repeats:
            return False
        if attempt:
            self.repeats.append(attempt)
        if self.failures and when < self.failures[-1]:
            # Another process's failure, arriving after later ones: in order,
            # so that `count` keeps dropping the oldest first.
            if len(self.failures) == self.failures.maxlen:
                self.failures.popleft()
            bisect.insort(self.failures, when)
        else:
            self.failures.append(when)
        return True


class _Table:
    """Tallies by key, least recently updated first, at most `limit` of them."""

    def __init__(self, limit: int, depth: int) -> None:
        self._entries: OrderedDict[str, _Tally] = OrderedDict()
        self._limit = limit
        self._depth = depth

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> _Tally | None:
        return self._entries.get(key)

    def touch(self, key: str, now: float) -> _Tally:
        entry = self._entries.pop(key, None)
        if entry is None:
            entry = _Tally(failures=deque(maxlen=self._depth), updated=now)
        entry.updated = now
        self._entries[key] = entry
        while len(self._entries) > self._limit:
            self._entries.popitem(last=False)
        return entry

    def drop(self, key: str) -> None:
        self._entries.pop(key, None)

    def expire(self, before: float) -> None:
        """Forget tallies with no failure since `before`: nothing of them counts."""
        while self._entries:
            key, oldest = next(iter(self._entries.items()))
            if oldest.updated > before:
                return
            del self._entries[key]


class _Deadlines:
    """Keys with a time each (a lockout's end, a known pair's last login), bounded."""

    def __init__(self, limit: int) -> None:
        self._entries: OrderedDict[str, float] = OrderedDict()
        self._limit = limit

    def __len__(self) -> int:
        return len(self._entries)

    def set(self, key: str, when: float) -> None:
        self._entries.pop(key, None)
        self._entries[key] = when
        while len(self._entries) > self._limit:
            self._entries.popitem(last=False)

    def until(self, key: str) -> float | None:
        return self._entries.get(key)

    def after(self, key: str, now: float) -> bool:
        """Whether `key` holds a time later than `now` (an ended one is forgotten)."""
        when = self._entries.get(key)
        if when is None:
            return False
        if when <= now:
            del self._entries[key]
            return False
        return True

    def expire(self, now: float) -> None:
        # Set in time order with one duration each, so the oldest end first.
        while self._entries:
            key, when = next(iter(self._entries.items()))
            if when > now:
                return
            del self._entries[key]


def name_key(device: str) -> str:
    """The key of a device name: itself, or a digest of an overlong one."""
    if len(device) <= _NAME_KEY_MAX:
        return device
    data = device.encode("utf-8", "surrogatepass")
    return "#" + hashlib.blake2b(data, digest_size=16).hexdigest()


class MemoryPenaltyBook:
    """The penalties of one gateway process, in memory, on the injected clock."""

    def __init__(self, settings: PenaltySettings, clock: IReactorTime) -> None:
        self.settings = settings
        self._clock = clock
        limit = settings.max_entries
        depth = max(settings.lockout_after, settings.device_slow_after) + 16
        self._addresses = _Table(limit, depth)
        self._pairs = _Table(limit, depth)
        self._names = _Table(limit, depth)
        self._locks = _Deadlines(limit)
        self._known = _Deadlines(limit)

    def network(self, address: str) -> str | None:
        """The key penalties of `address` go under; None for a trusted one."""
        return penalty_key(address, self.settings.trusted, self.settings.ipv6_prefix)

    def sizes(self) -> dict[str, int]:
        """How many entries each table holds (tests, and an admin's curiosity)."""
        return {
            "addresses": len(self._addresses),
            "pairs": len(self._pairs),
            "names": len(self._names),
            "locks": len(self._locks),
            "known": len(self._known),
        }

    def delay_for(self, address: str, device: str) -> float:
        network = self.network(address)
        if network is None:
            return 0.0
        since = self._clock.seconds() - self.settings.lockout_window
        name = name_key(device)
        pair = _pair(name, network)
        own = max(_count(self._addresses, network, since), _count(self._pairs, pair, since))
        delay = self._doubling(own)
        sprayed = _count(self._names, name, since) - self.settings.device_slow_after + 1
        if sprayed > 0 and not self._known.after(pair, self._clock.seconds()):
            delay = max(delay, self._doubling(sprayed))
        return delay

    def failed(self, address: str, device: str, attempt: bytes = b"") -> tuple[Penalized, ...]:
        network = self.network(address)
        if network is None:
            return ()
        return self.count_failure(network, device, self._clock.seconds(), attempt).penalized

    def count_failure(
        self, network: str, device: str, when: float, attempt: bytes = b"", *, remote: bool = False
    ) -> Counted:
        """Count a failure under the address key `network` at `when`.

        `remote`: another process saw it (a shared book replays it here); it
        is counted at its own time and starts no penalty here: the process
        that saw it decided and said so, and the next failure seen here
        decides with it counted."""
        s = self.settings
        now = self._clock.seconds()
        since = now - s.lockout_window
        if when <= since:
            return Counted(False, ())
        self._expire(now)
        name = name_key(device)
        started: list[Penalized] = []
        at_address = self._addresses.touch(network, now)
        counted = at_address.add(when, attempt)
        if counted and not remote:
            failures = at_address.count(since)
            if failures >= s.lockout_after and not self._locks.after(network, now):
                self._locks.set(network, now + s.lockout_time)
                # The lockout is the penalty now; once it ends, the address
                # starts over (at most `lockout_after` guesses per lockout).
                self._addresses.drop(network)
                window, seconds = s.lockout_window, s.lockout_time
                started.append(Penalized("lockout", device, network, failures, window, seconds))
        self._pairs.touch(_pair(name, network), now).add(when, attempt)
        for_name = self._names.touch(name, now)
        if (
            for_name.add(when, attempt)
            and not remote
            and for_name.count(since) == s.device_slow_after
        ):
            failures, window = s.device_slow_after, s.lockout_window
            started.append(Penalized("device_slowdown", device, "", failures, window, s.max_delay))
        return Counted(counted, tuple(started))

    def absorb_lockout(self, network: str, until: float) -> None:
        """Another process locked `network` out until `until`."""
        current = self._locks.until(network)
        if until > self._clock.seconds() and (current is None or current < until):
            self._locks.set(network, until)
            self._addresses.drop(network)

    def absorb_success(self, network: str, device: str, known_until: float | None) -> None:
        """Another process logged `device` in from `network`."""
        self._addresses.drop(network)
        self._pairs.drop(_pair(name_key(device), network))
        self.absorb_known(network, device, known_until)

    def absorb_known(self, network: str, device: str, until: float | None) -> None:
        """`device` logged in from `network` elsewhere: known there until `until`."""
        pair = _pair(name_key(device), network)
        if until is not None and until > (self._known.until(pair) or 0.0):
            self._known.set(pair, until)

    def holds(self, network: str, device: str) -> bool:
        """Whether a success would clear something here (failures of the
        address or of the pair)."""
        pair = _pair(name_key(device), network)
        return self._addresses.get(network) is not None or self._pairs.get(pair) is not None

    def known_until(self, network: str, device: str) -> float | None:
        """Until when `device` counts as known at `network` (None: not known)."""
        return self._known.until(_pair(name_key(device), network))

    def succeeded(self, address: str, device: str) -> None:
        network = self.network(address)
        if network is None:
            return
        pair = _pair(name_key(device), network)
        self._addresses.drop(network)
        self._pairs.drop(pair)
        self._known.set(pair, self._clock.seconds() + KNOWN_FOR)

    def locked(self, address: str) -> bool:
        network = self.network(address)
        return network is not None and self._locks.after(network, self._clock.seconds())

    def _doubling(self, failures: int) -> float:
        """Dovecot's steps: 2, 4, 8 ... seconds, at most `max_delay`."""
        if failures <= 0:
            return 0.0
        return min(self.settings.max_delay, 2.0 ** min(failures, 32))

    def _expire(self, now: float) -> None:
        before = now - self.settings.lockout_window
        for table in (self._addresses, self._pairs, self._names):
            table.expire(before)
        self._locks.expire(now)
        self._known.expire(now)


def _pair(name: str, network: str) -> str:
    return f"{name}\0{network}"


def _count(table: _Table, key: str, since: float) -> int:
    entry = table.get(key)
    return 0 if entry is None else entry.count(since)


@functools.lru_cache(maxsize=4096)
def penalty_key(address: str, trusted: tuple[IPNetwork, ...], ipv6_prefix: int) -> str | None:
    """What `MemoryPenaltyBook.network` says, remembered: a login asks it several
    times, and parsing and printing an address with `ipaddress` costs more
    than the rest of the book's work. A pure function of its arguments, so a
    reload that changes `trusted` or the prefix simply asks anew."""
    ip = parse_peer_address(address)
    if ip is None:
        return address  # no IP (a UNIX socket, a test transport): itself
    if any(ip.version == net.version and ip in net for net in trusted):
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, ipv6_prefix), strict=False))
    return str(ip)
