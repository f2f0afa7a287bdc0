"""Config: YAML in, frozen objects out, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from segment_relay.config import load_config, parse_config, parse_duration
from segment_relay.errors import ConfigError

ROOT = Path(__file__).parents[2]
MINIMAL = "sources: [{name: web, write_key: k}]\n"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("10s", 10),
        ("30m", 1800),
        ("24h", 86400),
        ("7d", 604800),
        (5, 5),
        (1.5, 1.5),
        ("2", 2),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text, "k") == seconds


@pytest.mark.parametrize("bad", ["10 minutes", "-1s", "", True, None, [1]])
def test_bad_durations_name_the_key(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"^destination\.linger: "):
        parse_duration(bad, "destination.linger")


def test_example_config_is_valid_and_has_the_documented_defaults() -> None:
    config = load_config(ROOT / "config.example.yaml", environ={})
    assert config.server.port == 8088
    assert config.sources[0].write_key == "dev-write-key"
    # Relative to the config file, wherever the command runs.
    assert config.queue.path == str(ROOT.resolve() / "relay-data" / "queue.db")
    d = config.destination
    assert (d.api, d.batch_size, d.linger_s, d.timeout_s, d.token_field) == (
        "infinario",
        50,
        0.2,
        10.0,
        "project_id",
    )
    assert d.project_token == ""
    assert config.sessions.idle_timeout_s == 1800


def test_environment_variables_fill_secrets() -> None:
    text = (
        MINIMAL
        + "destination: {project_token: '${TOKEN}', base_url: '${URL:-http://127.0.0.1:9}'}\n"
    )
    config = parse_config(text, environ={"TOKEN": "s3cret"})
    assert config.destination.project_token == "s3cret"
    assert config.destination.base_url == "http://127.0.0.1:9"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            MINIMAL + "destination: {batch_size: 500}",
            r"^destination\.batch_size: must be 1\.\.50, got 500$",
        ),
        (
            MINIMAL + "destination: {batch_size: fifty}",
            r"^destination\.batch_size: must be an integer",
        ),
        (MINIMAL + "server: {port: '8088'}", r"^server\.port: must be an integer"),
        (MINIMAL + "server: {prot: 8088}", r"^server\.prot: unknown key"),
        (
            MINIMAL + "destination: {retry: {quick_attempts: 0}}",
            r"^destination\.retry\.quick_attempts: must be 1\.\.20",
        ),
        (
            MINIMAL + "destination: {api: segment}",
            r"^destination\.api: must be one of infinario, exponea",
        ),
        (MINIMAL + "destination: {base_url: ftp://x}", r"^destination\.base_url: must be an http"),
        (MINIMAL + "sessions: {enabled: 'yes'}", r"^sessions\.enabled: must be true or false"),
        (MINIMAL + "queue: []", r"^queue: must be a mapping"),
        (
            "sources: [{name: web, write_key: '${MISSING_KEY}'}]",
            r"^sources\[0\]\.write_key: environment variable MISSING_KEY is not set",
        ),
        ("sources: [{name: web}]", r"^sources\[0\]\.write_key: required"),
        (
            "sources: [{name: a, write_key: k}, {name: b, write_key: k}]",
            r"^sources\[1\]\.write_key: the same write key",
        ),
        (
            MINIMAL + "server: {tls_cert: /etc/relay.pem}",
            r"^server\.tls_cert and server\.tls_key: set both \(HTTPS\) or neither \(HTTP\)$",
        ),
        (
            MINIMAL + "server: {trusted_proxies: [10.0.0.0/8, nginx]}",
            r"^server\.trusted_proxies\[1\]: not an address or network: 'nginx'$",
        ),
        (
            MINIMAL + "server: {client_ip_header: x-real-ip}",
            r"^server\.client_ip_header: must be one of x-forwarded-for, forwarded",
        ),
        ("server: {port: 1}", r"^sources: required"),
        ("a: [", r"not valid YAML"),
    ],
)
def test_errors_name_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(text, environ={})


def test_config_objects_are_frozen() -> None:
    config = parse_config(MINIMAL, environ={})
    with pytest.raises(AttributeError):
        config.server.port = 1  # type: ignore[misc]


def test_forwarding_needs_a_token_but_dry_run_does_not() -> None:
    config = parse_config(MINIMAL, environ={})
    with pytest.raises(ConfigError, match=r"^destination\.project_token: required"):
        config.check_destination()
    v2 = parse_config(MINIMAL + "destination: {api: exponea, project_token: T}", environ={})
    with pytest.raises(ConfigError, match=r"^destination\.api_key: required"):
        v2.check_destination()


def test_a_receive_only_relay_needs_no_destination_credentials() -> None:
    config = parse_config(MINIMAL + "queue: {url: 'postgresql://db/relay', forward: false}\n", {})
    config.check_serving(dry_run=False)  # no project_token, and no error
    assert not config.queue.forward
    with pytest.raises(ConfigError, match=r"^destination\.project_token: required"):
        parse_config(MINIMAL + "queue: {url: 'postgresql://db/relay'}\n", {}).check_serving(
            dry_run=False
        )


def test_queue_url_takes_the_password_from_the_environment() -> None:
    text = MINIMAL + "queue: {url: 'postgresql://relay:${DB_PASSWORD}@db:5432/relay', lease: 20s}\n"
    config = parse_config(text, environ={"DB_PASSWORD": "pw"})
    assert (config.queue.url, config.queue.lease_s) == ("postgresql://relay:pw@db:5432/relay", 20)


@pytest.mark.parametrize(
    ("queue", "message"),
    [
        (
            "{path: /var/lib/q.db, url: 'postgresql://db/relay'}",
            "queue.path and queue.url: set one of them, not both",
        ),
        ("{url: 'mysql://u:hunter2@db/relay'}", "queue.url: must be a postgresql:// URL"),
        ("{url: 'postgresql://u:hunter2@db:port/relay'}", "queue.url: not a valid URL"),
        ("{lease: 1s}", "queue.lease: must be between 3s and 600s"),
        (
            "{url: 'postgresql://db/relay', lease: 10s}",
            "queue.lease: must be longer than destination.timeout (10s <= 10s)",
        ),
        ("{forward: false}", "queue.forward: false needs queue.url"),
        ("{url: 'postgresql://db/relay', forward: maybe}", "queue.forward: must be true or"),
    ],
)
def test_queue_errors_name_the_key_and_never_the_password(queue: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(MINIMAL + f"queue: {queue}\n", environ={})
    assert message in str(caught.value)
    assert "hunter2" not in str(caught.value)
