"""The two Infinario API styles: building requests and reading responses (docs/api.md).

Pure: no I/O. `ApiStyle.request(commands)` gives the URL, headers and body to POST;
`ApiStyle.outcomes(status, headers, body, count, now)` turns the answer into one outcome per
command, or raises a SendError for an answer about the whole request.
"""

from __future__ import annotations

import base64
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import orjson

from . import jsontext
from .config import DestinationConfig
from .errors import PermanentSendError, SendError, TransientSendError
from .mapping import Command

MAX_ERROR_BODY = 2048


class CredentialsError(SendError):
    """The destination refused the credentials (401 or 403); forwarding pauses."""

    def __init__(self, message: str | None = None, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class Outcome(enum.Enum):
    """What became of one command."""

    OK = "ok"
    RETRY = "retry"
    ERROR = "error"


@dataclass(frozen=True)
class CommandResult:
    """The destination's verdict on one command, with its errors when refused."""

    outcome: Outcome
    errors: tuple[str, ...] = ()


# Most commands are taken: one shared result, not one object per command.
TAKEN = CommandResult(Outcome.OK)
RETRY = CommandResult(Outcome.RETRY)


@dataclass(frozen=True)
class Request:
    """One HTTP request to the destination."""

    url: str
    headers: dict[str, str]
    body: bytes


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """`Retry-After` as seconds from `now`: delta-seconds or an HTTP date; None if absent or bad."""
    if not value:
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - now)


def cut(body: bytes | str, limit: int = MAX_ERROR_BODY) -> str:
    """A response body as text, cut to `limit` characters for logs and the dead-letter table
    (a NUL or a lone surrogate in it as U+FFFD: the queue's database cannot store them)."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    text = jsontext.storable_text(text)
    return text if len(text) <= limit else text[:limit] + "...(cut)"


def classify_status(status: int, headers: Mapping[str, str], body: bytes, now: float) -> None:
    """Raise the SendError that a non-2xx status means for the whole request."""
    if 200 <= status < 300:
        return
    text = cut(body)
    if status == 429 or (status >= 500 and status != 501):
        raise TransientSendError(
            f"destination answered {status}: {text}",
            retry_after_s=retry_after_seconds(headers.get("Retry-After"), now),
        )
    if status in (401, 403):
        raise CredentialsError(f"destination refused the credentials ({status}): {text}", status)
    raise PermanentSendError(f"destination refused the request ({status}): {text}", status, text)


def _results(body: bytes) -> list[Any]:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise TransientSendError(
            f"destination answered 2xx with a body that is not JSON: {cut(body, 200)}"
        ) from exc
    if not isinstance(parsed, dict) or not isinstance(parsed.get("results", []), list):
        raise TransientSendError(
            f"destination answered 2xx without a results list: {cut(body, 200)}"
        )
    return list(parsed.get("results", []))


def _errors(result: dict[str, Any]) -> tuple[str, ...]:
    errors = result.get("errors")
    if isinstance(errors, list):
        return tuple(jsontext.storable_text(str(e)) for e in errors)
    if errors is not None:
        return (jsontext.storable_text(str(errors)),)
    return ()


class ApiStyle:
    """Common to both styles: the per-position matching of results to commands."""

    def __init__(self, config: DestinationConfig) -> None:
        self.config = config

    def render(self, command: Command) -> dict[str, Any]:
        raise NotImplementedError

    def request(self, commands: Sequence[Command]) -> Request:
        raise NotImplementedError

    def result(self, item: Any) -> CommandResult:
        raise NotImplementedError

    def outcomes(
        self, status: int, headers: Mapping[str, str], body: bytes, count: int, now: float
    ) -> list[CommandResult]:
        """One result per command, matched by position; a missing result counts as retry."""
        classify_status(status, headers, body, now)
        results = _results(body)
        return [self.result(results[i]) if i < len(results) else RETRY for i in range(count)]


class LegacyApi(ApiStyle):
    """The legacy Infinario `/bulk` API with the token in each command's data."""

    def render(self, command: Command) -> dict[str, Any]:
        token_field, token = self.config.token_field, self.config.project_token
        if command.event_type is None:
            return {
                "name": "crm/customers",
                "data": {"ids": command.ids, token_field: token, "properties": command.properties},
            }
        return {
            "name": "crm/events",
            "data": {
                "customer_ids": command.ids,
                token_field: token,
                "type": command.event_type,
                "properties": command.properties,
                "timestamp": command.timestamp,
            },
        }

    def request(self, commands: Sequence[Command]) -> Request:
        body = jsontext.dumps({"commands": [self.render(c) for c in commands]})
        return Request(f"{self.config.base_url}/bulk", {"Content-Type": "application/json"}, body)

    def result(self, item: Any) -> CommandResult:
        if not isinstance(item, dict):
            return RETRY
        status = str(item.get("status", "retry")).lower()
        if status in ("ok", "success"):
            return TAKEN
        if status == "error":
            return CommandResult(Outcome.ERROR, _errors(item))
        return RETRY


class ExponeaApi(ApiStyle):
    """Exponea / Bloomreach Engagement v2 batch API."""

    def render(self, command: Command) -> dict[str, Any]:
        if command.event_type is None:
            data: dict[str, Any] = {
                "customer_ids": command.ids,
                "properties": command.properties,
                "update_timestamp": command.timestamp,
            }
            return {"name": "customers", "command_id": command.message_id, "data": data}
        data = {
            "customer_ids": command.ids,
            "event_type": command.event_type,
            "timestamp": command.timestamp,
            "properties": command.properties,
        }
        return {"name": "customers/events", "command_id": command.message_id, "data": data}

    def authorization(self) -> str:
        key, secret = self.config.api_key, self.config.api_secret
        if secret:
            return "Basic " + base64.b64encode(f"{key}:{secret}".encode()).decode("ascii")
        return f"Token {key}"

    def request(self, commands: Sequence[Command]) -> Request:
        url = f"{self.config.base_url}/track/v2/projects/{self.config.project_token}/batch"
        headers = {"Content-Type": "application/json", "Authorization": self.authorization()}
        body = jsontext.dumps({"commands": [self.render(c) for c in commands]})
        return Request(url, headers, body)

    def result(self, item: Any) -> CommandResult:
        if not isinstance(item, dict) or "success" not in item:
            return RETRY
        if item["success"] is True:
            return TAKEN
        return CommandResult(Outcome.ERROR, _errors(item))


def api_style(config: DestinationConfig) -> ApiStyle:
    """The style named by `destination.api`."""
    return ExponeaApi(config) if config.api == "exponea" else LegacyApi(config)
