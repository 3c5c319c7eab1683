"""Credentials refused while a transport runs: the policy, transport-neutral.

A broker can start refusing a running bus's credentials: an operator
removed the user or changed its password, a token expired. Retrying the
same credential cannot succeed unless the operator undoes the change, so a
transport neither gives up at the first refusal nor retries forever
(docs/security.md, "Credentials revoked while running"):

* the first refusal of an episode is logged at ERROR (the repeats, one per
  reconnection attempt, at DEBUG) and reported by :attr:`Refusals.problem`,
  which the transport's ``problem`` returns to health;
* an accepted connection ends the episode (a WARNING says so);
* once the episode lasted ``grace`` seconds, :meth:`Refusals.expired`
  returns the :class:`~trio_bus.errors.AuthenticationError` for the
  transport to raise, which ends the bus.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ..errors import AuthenticationError

__all__ = ["AUTH_FAILURE_GRACE", "Refusals"]

#: Default grace: long enough for an operator's credential rotation to land
#: on every broker, short enough that a revoked service fails loudly.
AUTH_FAILURE_GRACE = 5.0


class Refusals:
    """The refusals of one transport's credentials since it was last
    accepted.

    Args:
        broker_kind: How log lines name the broker (``"kafka"``).
        grace: Seconds an episode may last before :meth:`expired` says so.
        logger: Where the episode is logged.
        clock: Monotonic seconds (tests may pass their own).
    """

    def __init__(
        self,
        broker_kind: str,
        grace: float,
        logger: logging.Logger,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.broker_kind = broker_kind
        self.grace = grace
        self._logger = logger
        self._clock = clock
        self._error: AuthenticationError | None = None
        self._deadline = 0.0

    @property
    def problem(self) -> str | None:
        """The refusal for health reports (no secret), or None."""
        if self._error is None:
            return None
        return f"{self._error}; the transport fails if still refused after {self.grace:g}s"

    def refused(self, error: AuthenticationError) -> None:
        """Record a refusal; the first of an episode starts the grace."""
        first = self._error is None
        self._error = error
        if first:
            self._deadline = self._clock() + self.grace
            self._logger.error("%s refuses our credentials: %s", self.broker_kind, self.problem)
        else:
            self._logger.debug(
                "%s refuses our credentials again: %s", self.broker_kind, self.problem
            )

    def accepted(self) -> None:
        """A connection was accepted: the episode, if any, is over."""
        if self._error is not None:
            self._logger.warning("%s accepts our credentials again", self.broker_kind)
        self._error = None

    def clear(self) -> None:
        """Forget the episode without a word (the transport is closing)."""
        self._error = None

    def remaining(self) -> float | None:
        """Seconds left of the grace, or None outside an episode."""
        if self._error is None:
            return None
        return max(0.0, self._deadline - self._clock())

    def expired(self) -> AuthenticationError | None:
        """The error to fail with once the grace is over, else None."""
        if self._error is None or self._clock() < self._deadline:
            return None
        return self._error
