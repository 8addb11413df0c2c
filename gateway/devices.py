"""Local authentication of devices against their own password hashes.

A device polls every minute or so; an argon2id check costs tens of
milliseconds of CPU by design. So a password is checked against its argon2
hash once, in a worker thread; after that the process remembers a keyed
digest (HMAC-SHA256 under a per-process random key) of the password that
worked, and later logins compare against that in microseconds. The digest
never leaves memory and is useless without the key, which never leaves the
process either. Failures are never cached and always pay for a full check,
with a bounded number running at once, so guessing stays expensive.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.threads import deferToThread

from gateway.model import Device

# Checked when the device is unknown, so that an unknown name costs the same
# as a wrong password and the two cannot be told apart by timing.
_DUMMY_HASH = PasswordHasher().hash(secrets.token_urlsafe(16))


class AuthFailed(Exception):
    """Refused login. `reason` is for the log only; the peer sees one message."""

    def __init__(self, reason: str, device: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.device = device


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
    ) -> None:
        self._devices = devices
        self._hasher = PasswordHasher()
        self._run_in_thread = run_in_thread
        self._checks = DeferredSemaphore(concurrent_checks)
        self._key = secrets.token_bytes(32)
        self._remembered: dict[str, _Remembered] = {}

    async def authenticate(
        self, username: str, password: bytes, peer: str, protocol: str
    ) -> Device:
        device = self._devices.get(username)
        if device is None:
            await self._slow_check(_DUMMY_HASH, password)
            raise AuthFailed("unknown device")
        if not await self._password_matches(device, password):
            raise AuthFailed("wrong password", device.name)
        if self._devices.get(username) != device:
            # A config reload changed or removed it during the check.
            raise AuthFailed("device reconfigured during login", device.name)
        # Address and protocol are checked after the password so that a
        # refusal for them does not reveal that the password was right.
        if not device.allowed(peer):
            raise AuthFailed(f"address {peer} not in allow_from", device.name)
        if protocol not in device.protocols:
            raise AuthFailed(f"protocol {protocol} not allowed", device.name)
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

    def _verify(self, stored: str, password: bytes) -> bool:
        try:
            return self._hasher.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
