"""Every vector of the shared conformance file, in the API style it names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from segment_relay.config import DestinationConfig
from segment_relay.infinario import api_style
from segment_relay.mapping import MappingSettings, map_message
from support import CONFORMANCE

VECTORS: list[dict[str, Any]] = json.loads((CONFORMANCE / "mapping.json").read_text())["vectors"]
SHARED = Path(__file__).parents[3] / "shared" / "conformance"


def render(message: dict[str, Any], api: str) -> list[dict[str, Any]]:
    style = api_style(DestinationConfig(api=api, project_token="TOKEN", token_field="project_id"))
    command = map_message(message, MappingSettings())
    return [] if command is None else [style.render(command)]


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector(vector: dict[str, Any]) -> None:
    assert render(vector["message"], vector["api"]) == vector["commands"]


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_survives_the_json_round_trip(vector: dict[str, Any]) -> None:
    # What goes on the wire is JSON: the commands must serialise to exactly the vector.
    assert json.loads(json.dumps(render(vector["message"], vector["api"]))) == vector["commands"]


def test_the_copy_is_identical_to_the_shared_vectors() -> None:
    if not SHARED.is_dir():
        pytest.skip("../shared is not beside this clone")
    for name in ("mapping.json", "sessions.json"):
        assert (CONFORMANCE / name).read_bytes() == (SHARED / name).read_bytes(), name


def test_the_vectors_cover_every_call_type_and_both_styles() -> None:
    types = {v["message"]["type"] for v in VECTORS}
    assert types == {"identify", "track", "page", "screen", "alias", "group"}
    assert {v["api"] for v in VECTORS} == {"infinario", "exponea"}


def test_id_names_and_context_fields_come_from_the_config() -> None:
    settings = MappingSettings(
        registered_id="customer_id", cookie_id="browser", context_fields=("ip", "device")
    )
    message = {
        "type": "track",
        "messageId": "m",
        "userId": "u",
        "anonymousId": "a",
        "event": "e",
        "timestamp": "2024-03-01T12:00:00Z",
        "context": {"ip": "1.1.1.1", "locale": "en", "device": {"model": "X"}},
    }
    command = map_message(message, settings)
    assert command is not None
    assert command.ids == {"customer_id": "u", "browser": "a"}
    assert command.properties == {"ip": "1.1.1.1", "device_model": "X"}
