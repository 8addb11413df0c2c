"""Local authentication of devices against their own password hashes.

A device polls every minute or so; an argon2id check costs tens of
milliseconds of CPU by design. So a password is checked against its argon2
hash once, in a worker thread; after that the process remembers a keyed
digest (HMAC-SHA256 under a per-process random key) of the password that
worked, and later logins compare against that in microseconds. The digest
never leaves memory and is useless without the key, which never leaves the
process either. Failures are never cached and always pay for a full check,
with a bounded number running at once, so guessing stays expensive. Neither
is a login refused for its address or protocol: it pays for a full check
whether or not the password is right, so its timing cannot tell which.

An unknown device name is checked against a dummy hash made with the same
argon2 parameters as the configured devices' hashes: a check costs what its
parameters say, so only then do an unknown name and a wrong password take
equally long. It is made on first use, in the worker thread, not at import.

Login penalties (gateway.penalties) are asked and told here, so POP3 and
SMTP get them alike: a locked-out address is refused before any check (no
argon2 time spent, nothing about the password shown); otherwise the pause
an attempt earns is read after its check and before its result is counted,
so it is the same whether the password was right or not. A refusal carries
it to `gateway.sessions.LoginRefusals`, which waits it out (at least its own
one second); a success waits it here before the device is let in, so a
guesser cannot learn a right password by hanging up early.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from argon2 import Parameters, PasswordHasher, extract_parameters, profiles
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from gateway.model import Device
from gateway.penalties import NoPenalties, Penalized, PenaltyBook

# What `gateway hash-password` makes: RFC 9106's second recommended profile
# (64 MiB, t=3, p=4), named rather than the library's defaults, which change
# across argon2-cffi upgrades.
DEVICE_HASH_PROFILE: Parameters = profiles.RFC_9106_LOW_MEMORY


def device_password_hasher() -> PasswordHasher:
    """The hasher that makes device password hashes."""
    return PasswordHasher.from_parameters(DEVICE_HASH_PROFILE)


def usual_parameters(hashes: Iterable[str]) -> Parameters:
    """The argon2 parameters most of `hashes` use; the pinned profile if none parse."""
    found: list[Parameters] = []
    for stored in hashes:
        try:
            found.append(extract_parameters(stored))
        except InvalidHashError:
            continue
    # Parameters is not hashable: count by position in `found`.
    return max(found, key=found.count) if found else DEVICE_HASH_PROFILE


class AuthFailed(Exception):
    """Refused login. `reason` is for the log only; the peer sees one message."""

    def __init__(
        self,
        reason: str,
        device: str | None = None,
        *,
        delay: float = 0.0,
        penalized: tuple[Penalized, ...] = (),
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.device = device
        # The login penalty's pause before the answer (the refusal waits at
        # least its own), and the penalties this failure started, to log.
        self.delay = delay
        self.penalized = penalized


@dataclass
class _Remembered:
    password_hash: str
    digest: bytes


class DeviceAuthenticator:
    """Checks a device's name, password, source address and protocol."""

    def __init__(
        self,
        devices: Mapping[str, Device],
        *,
        run_in_thread: Callable[..., Deferred[Any]] = deferToThread,
        concurrent_checks: int = 2,
        penalties: PenaltyBook | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        if penalties is not None and clock is None:
            raise ValueError("login penalties need the clock that waits them out")
        self._penalties: PenaltyBook = penalties if penalties is not None else NoPenalties()
        self._clock = clock
        self._devices = devices
        self._hasher = PasswordHasher()
        self._run_in_thread = run_in_thread
        self._checks = DeferredSemaphore(concurrent_checks)
        self._key = secrets.token_bytes(32)
        self._remembered: dict[str, _Remembered] = {}
        self._dummy: str | None = None

    async def authenticate(
        self, username: str, password: bytes, peer: str, protocol: str
    ) -> Device:
        book = self._penalties
        if book.locked(peer):
            known = username if username in self._devices else None
            raise AuthFailed("address locked out", known, delay=book.delay_for(peer, username))
        try:
            device = await self._check(username, password, peer, protocol)
        except AuthFailed as refusal:
            name = refusal.device or username
            refusal.delay = book.delay_for(peer, name)
            refusal.penalized = book.failed(peer, name, self._attempt(name, password))
            raise
        delay = book.delay_for(peer, device.name)
        if book.locked(peer):
            # Locked by parallel attempts while this one was checked: refused
            # right or wrong, so a guess in flight learns nothing.
            raise AuthFailed("address locked out", device.name, delay=delay)
        book.succeeded(peer, device.name)
        if delay > 0 and self._clock is not None:
            await deferLater(self._clock, delay, lambda: None)
        return device

    def _attempt(self, name: str, password: bytes) -> bytes:
        """A keyed digest of one name-and-password attempt: the penalty book
        tells a repeated attempt from a new guess without holding the password."""
        data = name.encode("utf-8", "surrogatepass") + b"\0" + password
        return hmac.new(self._key, data, hashlib.sha256).digest()[:8]

    async def _check(self, username: str, password: bytes, peer: str, protocol: str) -> Device:
        device = self._devices.get(username)
        if device is None:
            await self._checks.run(self._run_in_thread, self._verify_unknown, password)
            raise AuthFailed("unknown device")
        refusal = None
        if not device.allowed(peer):
            refusal = f"address {peer} not in allow_from"
        elif protocol not in device.protocols:
            refusal = f"protocol {protocol} not allowed"
        if refusal is not None:
            # Refused whatever the password: it gets the full argon2 check,
            # never the remembered digest, right or wrong, so the time the
            # refusal takes says nothing about it. The log still tells an
            # admin which it was.
            right = await self._slow_check(device.password_hash.reveal(), password)
            raise AuthFailed(refusal if right else "wrong password", device.name)
        if not await self._password_matches(device, password):
            raise AuthFailed("wrong password", device.name)
        if self._devices.get(username) != device:
            # A config reload changed or removed it during the check.
            raise AuthFailed("device reconfigured during login", device.name)
        return device

    def reconfigure(self, devices: Mapping[str, Device]) -> None:
        """A reloaded configuration: a device removed, or with another
        password hash, is forgotten, so no login succeeds from memory."""
        self._devices = devices
        for name, known in list(self._remembered.items()):
            device = devices.get(name)
            if device is None or device.password_hash.reveal() != known.password_hash:
                del self._remembered[name]

    async def _password_matches(self, device: Device, password: bytes) -> bool:
        stored = device.password_hash.reveal()
        digest = hmac.new(self._key, stored.encode() + b"\0" + password, hashlib.sha256).digest()
        known = self._remembered.get(device.name)
        if known is not None and known.password_hash == stored:
            if hmac.compare_digest(known.digest, digest):
                return True
        if not await self._slow_check(stored, password):
            return False
        self._remembered[device.name] = _Remembered(stored, digest)
        return True

    async def _slow_check(self, stored: str, password: bytes) -> bool:
        return await self._checks.run(self._run_in_thread, self._verify, stored, password)

    def dummy_hash(self) -> str:
        """The hash an unknown device name is checked against (made on first use)."""
        if self._dummy is None:
            params = usual_parameters(d.password_hash.reveal() for d in self._devices.values())
            self._dummy = PasswordHasher.from_parameters(params).hash(secrets.token_urlsafe(16))
        return self._dummy

    def _verify_unknown(self, password: bytes) -> bool:
        return self._verify(self.dummy_hash(), password)

    def _verify(self, stored: str, password: bytes) -> bool:
        try:
            return self._hasher.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
