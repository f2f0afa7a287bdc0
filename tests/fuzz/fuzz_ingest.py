"""atheris target: bytes as a request body through the receiver's checks and the mapping.

Anything the receiver would accept must map without MappingError and render as JSON, and
come back from the queue's JSON as it went in (integers of any size keep their digits);
nothing may raise but the documented refusals; a good message in a batch is accepted whatever
its neighbours hold (lone surrogates, huge numbers: the corpus has both).
Run: python tests/fuzz/fuzz_ingest.py -runs=N -seed=S
"""

from __future__ import annotations

import sys
import time

import atheris

with atheris.instrument_imports():
    from segment_relay import jsontext
    from segment_relay.config import DestinationConfig
    from segment_relay.infinario import api_style
    from segment_relay.mapping import MappingSettings, map_message
    from segment_relay.segment import (
        BatchEnvelope,
        InvalidMessageError,
        enrich,
        parse_time,
        validate,
    )

STYLES = [
    api_style(DestinationConfig(api=api, project_token="T", api_key="K"))
    for api in ("infinario", "exponea")
]
SETTINGS = MappingSettings()
NOW = time.time()
NEIGHBOUR = {"type": "track", "userId": "u", "event": "e", "properties": {"n": 1}}


def accept(raw: object, kind: str | None, envelope: BatchEnvelope) -> bool:
    try:
        message = enrich(validate(raw, kind), NOW, envelope)
    except InvalidMessageError:
        return False
    stored = jsontext.loads_stored(jsontext.dumps(message).decode())  # as the forwarder reads it
    assert stored == message, (stored, message)
    command = map_message(stored, SETTINGS)  # a MappingError here is a bug: the receiver let it in
    if command is not None:
        for style in STYLES:
            jsontext.dumps(style.render(command))
    return True


def test_one(data: bytes) -> None:
    try:
        body = jsontext.loads(data)
    except jsontext.InvalidJSONError:
        return
    if isinstance(body, dict) and isinstance(body.get("batch"), list):
        context = body.get("context")
        envelope = BatchEnvelope(
            parse_time(body.get("sentAt")), context if isinstance(context, dict) else None, None
        )
        for item in body["batch"]:
            accept(item, None, envelope)
        assert accept(dict(NEIGHBOUR), None, envelope)
    else:
        accept(body, "track", BatchEnvelope())
        accept(body, "identify", BatchEnvelope())
        accept(body, "page", BatchEnvelope())


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one)
    atheris.Fuzz()
