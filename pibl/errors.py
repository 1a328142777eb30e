"""One small hierarchy of errors.

Protocol errors carry the status code PIBL answers with, so the connection code never has
to guess: a parser or validator raises ``ProtocolError(400, "...")`` and the shell turns it
into a short response and closes the connection.
"""

from __future__ import annotations


class PiblError(Exception):
    """Base class of every error PIBL raises on purpose."""


class ConfigError(PiblError):
    """A configuration file or flag is invalid; the message names the file, key and problem."""


class ProtocolError(PiblError):
    """A client sent something PIBL refuses; ``status`` is the answer (400, 413, 414, 431...)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason


class UpstreamError(PiblError):
    """A backend failed; ``status`` is what the client gets (502 or 504).

    ``connected`` tells whether the TCP connection was ever established and ``retryable``
    whether another backend might do better (not for a response timeout or a malformed
    response); the retry rules depend on both.
    """

    def __init__(
        self,
        status: int,
        reason: str,
        *,
        connected: bool = True,
        retryable: bool = True,
        unreachable: bool = False,
        counts: bool = True,
    ) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason
        self.connected = connected
        self.retryable = retryable
        self.unreachable = unreachable  # refused or timed out at TCP level (503 when all are)
        self.counts = counts  # whether it says something about the backend's health

    @property
    def failure_kind(self) -> str:
        """What the failure says about the backend, for passive checks: "refused" (nothing
        accepted the connection), "timeout" (maybe one slow URL) or "error"."""
        if self.status == 504:
            return "timeout"
        return "refused" if self.unreachable else "error"
