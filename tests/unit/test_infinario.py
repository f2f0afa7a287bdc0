"""Reading the destination's answers: per-command outcomes and whole-request statuses."""

from __future__ import annotations

import pytest

from segment_relay.config import DestinationConfig
from segment_relay.errors import PermanentSendError, TransientSendError
from segment_relay.infinario import CredentialsError, Outcome, api_style, retry_after_seconds

LEGACY = api_style(DestinationConfig(api="infinario", project_token="T"))
V2 = api_style(DestinationConfig(api="exponea", project_token="T", api_key="K"))
NOW = 1_700_000_000.0


def test_legacy_results_match_commands_by_position_and_a_missing_one_is_retry() -> None:
    body = b'{"success": true, "results": [{"status": "OK"}, {"status": "retry"}, {"status": "Error", "errors": ["bad"]}]}'
    outcomes = LEGACY.outcomes(200, {}, body, 4, NOW)
    assert [o.outcome for o in outcomes] == [
        Outcome.OK,
        Outcome.RETRY,
        Outcome.ERROR,
        Outcome.RETRY,
    ]
    assert outcomes[2].errors == ("bad",)


def test_what_the_destination_says_keeps_no_nul() -> None:
    # PostgreSQL cannot store NUL in text: a dead letter or retry carrying one could not be
    # written, and its batch would be sent again, and refused so, again and again.
    body = b'{"results": [{"status": "error", "errors": ["bad\\u0000id", 7]}]}'
    (outcome,) = LEGACY.outcomes(200, {}, body, 1, NOW)
    assert outcome.errors == ("bad\ufffdid", "7")
    with pytest.raises(PermanentSendError) as info:
        LEGACY.outcomes(400, {}, b"no \x00 here", 1, NOW)
    assert "\x00" not in str(info.value)
    assert info.value.body == "no \ufffd here"


def test_v2_results() -> None:
    body = b'{"success": true, "results": [{"success": true}, {"success": false, "errors": ["x"]}]}'
    outcomes = V2.outcomes(200, {}, body, 2, NOW)
    assert [o.outcome for o in outcomes] == [Outcome.OK, Outcome.ERROR]


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_overload_and_server_errors_are_transient(status: int) -> None:
    with pytest.raises(TransientSendError) as info:
        LEGACY.outcomes(status, {"Retry-After": "7"}, b"busy", 1, NOW)
    assert info.value.retry_after_s == 7


@pytest.mark.parametrize("status", [401, 403])
def test_credentials(status: int) -> None:
    with pytest.raises(CredentialsError):
        V2.outcomes(status, {}, b'{"success": false}', 1, NOW)


@pytest.mark.parametrize("status", [400, 404, 413, 501])
def test_other_client_errors_are_permanent(status: int) -> None:
    with pytest.raises(PermanentSendError) as info:
        LEGACY.outcomes(status, {}, b'{"success": false, "message": "no"}', 1, NOW)
    assert info.value.status == status


def test_a_2xx_without_json_is_retried_whole() -> None:
    with pytest.raises(TransientSendError):
        LEGACY.outcomes(200, {}, b"<html>", 1, NOW)


def test_retry_after_in_seconds_or_as_an_http_date() -> None:
    assert retry_after_seconds("120", NOW) == 120
    assert retry_after_seconds("Tue, 14 Nov 2023 22:13:40 GMT", NOW) == pytest.approx(20.0)
    assert retry_after_seconds("soon", NOW) is None
    assert retry_after_seconds(None, NOW) is None


def test_v2_request_carries_the_token_in_the_path_and_the_key_in_authorization() -> None:
    request = V2.request([])
    assert request.url.endswith("/track/v2/projects/T/batch")
    assert request.headers["Authorization"] == "Token K"
    basic = api_style(
        DestinationConfig(api="exponea", project_token="T", api_key="id", api_secret="s")
    )
    assert basic.request([]).headers["Authorization"] == "Basic aWQ6cw=="
