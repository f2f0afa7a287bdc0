"""One exception hierarchy for the relay; each class's docstring is its default message."""

from __future__ import annotations


class RelayError(Exception):
    """segment-relay failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(RelayError):
    """The configuration is invalid."""


class ListenError(RelayError):
    """The relay cannot listen on its address."""


class StoreError(RelayError):
    """The queue database cannot be used."""


class StoreFullError(StoreError):
    """The queue is full: no room on disk or over queue.max_pending."""


class MappingError(RelayError):
    """The message cannot be mapped to Infinario commands."""


class SendError(RelayError):
    """Sending a batch to the destination failed."""


class TransientSendError(SendError):
    """The destination is unavailable for now; the batch is retried."""

    def __init__(self, message: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PermanentSendError(SendError):
    """The destination refused the request itself; retrying it unchanged cannot succeed."""

    def __init__(self, message: str | None = None, status: int = 0, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body
