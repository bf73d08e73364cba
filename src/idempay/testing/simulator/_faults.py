"""Failures injected into the simulator's API on purpose: what the network and Stripe do to a
client on a bad day.

A :class:`Fault` hits the next requests whose method and path match a rule (``*`` matches one
path segment: ``/v1/payment_intents/*/confirm``), a given number of times:

- ``error``: an HTTP error (500 by default) in Stripe's ``api_error`` shape;
- ``hang``: the connection is held, unanswered, for ``seconds``, then closed: a client with a
  shorter timeout sees a timeout;
- ``reset``: the connection is closed without an answer (a reset).

``applied`` says whether the request takes effect first. ``reset`` with ``applied=True`` (its
default) is the unknown-outcome case: Stripe committed the call and saved its response under the
idempotency key, but the client never saw it; the same request again gets the saved response.
``error`` with ``applied=True`` saves the error under the key, as Stripe saves a 500.

A :class:`Gate` (:meth:`~idempay.testing.simulator.StripeSimulator.pause_next`) stops a matching
request after it claimed its idempotency key and before it executes, until the test releases it:
the way to have a request provably in flight, without sleeping.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Final, Literal

from idempay.errors import ConfigurationError

__all__ = ["Fault", "FaultKind", "FaultPlan", "Gate"]

FaultKind = Literal["error", "hang", "reset"]
_KINDS: Final = ("error", "hang", "reset")


@dataclass(frozen=True, slots=True)
class Fault:
    """One kind of failure; see the module's docstring."""

    kind: FaultKind
    status: int = 500
    seconds: float = 30.0
    applied: bool | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ConfigurationError(f"a fault kind is one of {', '.join(_KINDS)}")
        if not 400 <= self.status <= 599:
            raise ConfigurationError("an injected error status is a 4xx or 5xx")
        if self.seconds <= 0:
            raise ConfigurationError("a hang lasts a positive number of seconds")

    @property
    def takes_effect(self) -> bool:
        """Whether the request executes before the failure (default: only for ``reset``)."""
        if self.applied is not None:
            return self.applied
        return self.kind == "reset"


class Gate:
    """Holds one request between its idempotency claim and its execution.

    :meth:`wait_reached` returns once a request is held; :meth:`release` lets it go on. A gate
    is released by the simulator's ``close()`` too, so a test that fails never hangs.
    """

    def __init__(self) -> None:
        self._reached = threading.Event()
        self._released = threading.Event()

    def wait_reached(self, timeout: float = 10.0) -> bool:
        """Wait until a request is held at the gate; ``False`` if none came in time."""
        return self._reached.wait(timeout)

    def release(self) -> None:
        """Let the held request (and any later one at this gate) execute."""
        self._released.set()

    @property
    def reached(self) -> bool:
        """Whether a request arrived at the gate."""
        return self._reached.is_set()

    def hold(self, timeout: float) -> None:
        """Called by the request: announce it, then wait for the release (or ``timeout``)."""
        self._reached.set()
        self._released.wait(timeout)


@dataclass(slots=True)
class _Rule:
    method: str
    pattern: re.Pattern[str]
    remaining: int
    fault: Fault | Gate


def _compile(path: str) -> re.Pattern[str]:
    if not path.startswith("/"):
        raise ConfigurationError("a fault's path starts with '/'")
    return re.compile(
        "/".join("[^/]+" if part == "*" else re.escape(part) for part in path.split("/"))
    )


class FaultPlan:
    """The rules waiting to hit requests; thread-safe, each hit counted down exactly once."""

    def __init__(self) -> None:
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        self.injected = 0

    def add(self, fault: Fault | Gate, *, method: str, path: str, times: int) -> None:
        """Hit the next ``times`` requests matching ``method`` and ``path``."""
        if times < 1:
            raise ConfigurationError("a fault hits at least one request")
        rule = _Rule(method.upper(), _compile(path), times, fault)
        with self._lock:
            self._rules.append(rule)

    def take(self, method: str, path: str, *, gates: bool) -> Fault | Gate | None:
        """The fault (``gates=False``) or gate (``gates=True``) for this request, if any."""
        with self._lock:
            for rule in self._rules:
                if isinstance(rule.fault, Gate) != gates:
                    continue
                if rule.method == method and rule.pattern.fullmatch(path):
                    rule.remaining -= 1
                    if rule.remaining == 0:
                        self._rules.remove(rule)
                    self.injected += 1
                    return rule.fault
            return None

    def clear(self) -> list[Gate]:
        """Drop every rule; return the gates that were waiting, for release."""
        with self._lock:
            gates = [rule.fault for rule in self._rules if isinstance(rule.fault, Gate)]
            self._rules.clear()
            return gates
