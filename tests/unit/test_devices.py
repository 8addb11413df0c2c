"""Local device authentication: the dummy hash for unknown names, and what a
refusal costs."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from argon2 import PasswordHasher, extract_parameters
from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from gateway.devices import (
    DEVICE_HASH_PROFILE,
    AuthFailed,
    DeviceAuthenticator,
    device_password_hasher,
    usual_parameters,
)
from gateway.model import Device, Secret
from tests.helpers.front_end import FAST_HASHER, run_now


def outcome(coroutine: Any) -> Any:
    """The result of a coroutine that runs to its end synchronously (or raise its error)."""
    results: list[Any] = []
    Deferred.fromCoroutine(coroutine).addBoth(results.append)
    (result,) = results
    if isinstance(result, Failure):
        result.raiseException()
    return result


def device(name: str, hasher: PasswordHasher = FAST_HASHER) -> Device:
    return Device(name=name, password_hash=Secret(hasher.hash(f"{name}-pw")), account="a")


def test_dummy_hash_uses_the_pinned_profile_like_hash_password() -> None:
    profiled = device("printer", device_password_hasher())
    auth = DeviceAuthenticator({"printer": profiled}, run_in_thread=run_now)
    assert extract_parameters(profiled.password_hash.reveal()) == DEVICE_HASH_PROFILE
    assert extract_parameters(auth.dummy_hash()) == DEVICE_HASH_PROFILE
    # With no device at all, the profile too (not argon2-cffi's defaults).
    assert extract_parameters(DeviceAuthenticator({}).dummy_hash()) == DEVICE_HASH_PROFILE


def test_dummy_hash_follows_the_parameters_the_devices_use() -> None:
    devices = {name: device(name) for name in ("printer", "copier")}
    devices["odd"] = device("odd", PasswordHasher(time_cost=2, memory_cost=16, parallelism=1))
    auth = DeviceAuthenticator(devices, run_in_thread=run_now)
    fast = extract_parameters(devices["printer"].password_hash.reveal())
    assert fast != DEVICE_HASH_PROFILE
    assert extract_parameters(auth.dummy_hash()) == fast
    assert usual_parameters(["not a hash"]) == DEVICE_HASH_PROFILE


def test_dummy_hash_is_made_on_first_use_not_at_import() -> None:
    auth = DeviceAuthenticator({"printer": device("printer")}, run_in_thread=run_now)
    assert auth._dummy is None
    with pytest.raises(AuthFailed, match="unknown device"):
        outcome(auth.authenticate("ghost", b"x", "10.0.0.1", "pop3"))
    assert auth._dummy is not None


def test_a_refusal_for_address_or_protocol_costs_the_same_right_or_wrong() -> None:
    checks: list[tuple[str, tuple[Any, ...]]] = []

    def counting(f: Any, *args: Any) -> Deferred[Any]:
        checks.append((f.__name__, args[:1]))
        return succeed(f(*args))

    printer = Device(
        name="printer",
        password_hash=Secret(FAST_HASHER.hash("printer-pw")),
        account="a",
        allow_from=(ipaddress.ip_network("10.0.0.0/8"),),
        protocols=frozenset({"pop3"}),
    )
    auth = DeviceAuthenticator({"printer": printer}, run_in_thread=counting)
    # Logged in once since start: the keyed digest of its password is remembered.
    assert outcome(auth.authenticate("printer", b"printer-pw", "10.1.1.1", "pop3")) is printer
    assert outcome(auth.authenticate("printer", b"printer-pw", "10.1.1.1", "pop3")) is printer
    checks.clear()
    work: dict[tuple[str, str, bytes], list[tuple[str, tuple[Any, ...]]]] = {}
    for peer, protocol in [("192.0.2.1", "pop3"), ("10.1.1.1", "smtp")]:
        for password in (b"printer-pw", b"wrong"):
            with pytest.raises(AuthFailed) as refused:
                outcome(auth.authenticate("printer", password, peer, protocol))
            work[peer, protocol, password] = checks[:]
            checks.clear()
            if password == b"wrong":
                assert refused.value.reason == "wrong password"
            else:
                assert refused.value.reason != "wrong password"
    # One full argon2 check against the device's hash, right password or wrong.
    full_check = [("_verify", (printer.password_hash.reveal(),))]
    assert all(done == full_check for done in work.values()), work
