"""YAML configuration -> frozen dataclasses, with errors that name the dotted key.

Every section is a frozen dataclass whose fields carry a converter in their metadata; one
generic builder walks them, so a new key is one line here and one documented line in
`config.example.yaml`. Durations are stored in seconds in attributes ending in `_s`, while the
YAML keys stay as users write them (`linger: 200ms`).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

from .errors import ConfigError

T = TypeVar("T")
Converter = Callable[[Any, str], Any]

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "null"


def parse_duration(value: Any, key: str) -> float:
    """Parse `250ms`, `10s`, `30m`, `24h`, `7d` or a bare number of seconds into seconds."""
    if isinstance(value, bool):
        raise ConfigError(
            f"{key}: must be a duration like 250ms, 10s, 30m, 24h or 7d, got {value!r}"
        )
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNIT_S[m.group(2)]
    else:
        raise ConfigError(
            f"{key}: must be a duration like 250ms, 10s, 30m, 24h or 7d, got {_describe(value)}"
        )
    if seconds < 0:
        raise ConfigError(f"{key}: must not be negative, got {value!r}")
    return seconds


# --- converters: each takes (raw value, dotted key) and returns the typed value ----------------


def _str(*, nonempty: bool = False) -> Converter:
    def conv(value: Any, key: str) -> str:
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string, got {_describe(value)}")
        if nonempty and not value.strip():
            raise ConfigError(f"{key}: must not be empty")
        return value

    return conv


def _int(lo: int, hi: int) -> Converter:
    def conv(value: Any, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {_describe(value)}")
        if not lo <= value <= hi:
            raise ConfigError(f"{key}: must be {lo}..{hi}, got {value}")
        return value

    return conv


def _float(lo: float, hi: float) -> Converter:
    def conv(value: Any, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: must be a number, got {_describe(value)}")
        if not lo <= value <= hi:
            raise ConfigError(f"{key}: must be {lo:g}..{hi:g}, got {value}")
        return float(value)

    return conv


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: must be true or false, got {_describe(value)}")
    return value


def _choice(*options: str) -> Converter:
    def conv(value: Any, key: str) -> str:
        if value not in options:
            raise ConfigError(f"{key}: must be one of {', '.join(options)}, got {value!r}")
        return str(value)

    return conv


def _duration(lo: float, hi: float) -> Converter:
    def conv(value: Any, key: str) -> float:
        seconds = parse_duration(value, key)
        if not lo <= seconds <= hi:
            raise ConfigError(f"{key}: must be between {lo:g}s and {hi:g}s, got {value!r}")
        return seconds

    return conv


def _url(value: Any, key: str) -> str:
    text: str = _str(nonempty=True)(value, key)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{key}: must be an http:// or https:// URL, got {text!r}")
    return text.rstrip("/")


def redact_url(url: str) -> str:
    """`url` without its password, for messages and logs."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
    except ValueError:
        return url.split("://", 1)[0] + "://***" if "@" in url else url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{netloc}").geturl()


def _postgres_url(value: Any, key: str) -> str:
    text: str = _str(nonempty=True)(value, key)
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise ConfigError(f"{key}: not a valid URL ({exc}): {redact_url(text)!r}") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(
            f"{key}: must be a postgresql:// URL (postgresql://user:password@host:5432/db), "
            f"got {redact_url(text)!r}"
        )
    return text


def _str_list(*, nonempty: bool = False) -> Converter:
    def conv(value: Any, key: str) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: must be a list of strings, got {_describe(value)}")
        items = tuple(_str(nonempty=True)(item, f"{key}[{i}]") for i, item in enumerate(value))
        if nonempty and not items:
            raise ConfigError(f"{key}: must not be empty")
        return items

    return conv


def _optional(conv: Converter) -> Converter:
    def optional(value: Any, key: str) -> Any:
        return None if value is None else conv(value, key)

    return optional


def _section(cls: type[T]) -> Converter:
    def conv(value: Any, key: str) -> T:
        return build(cls, value, key)

    return conv


def _opt(conv: Converter, default: Any, yaml_key: str | None = None) -> Any:
    """A config field: its converter, its default and the YAML key when it differs."""
    meta = {"conv": conv, "key": yaml_key}
    if isinstance(default, list | dict):
        raise TypeError("use a tuple or a default_factory for mutable defaults")
    return field(default=default, metadata=meta)


def _sub(cls: type[T]) -> Any:
    return field(default_factory=cls, metadata={"conv": _section(cls), "key": None})


def build(cls: type[T], raw: Any, path: str) -> T:
    """Build the frozen dataclass `cls` from the YAML mapping `raw` found at `path`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path or 'the config'}: must be a mapping, got {_describe(raw)}")
    by_key = {f.metadata.get("key") or f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    for key in raw:
        if key not in by_key:
            known = ", ".join(sorted(by_key))
            raise ConfigError(f"{_join(path, str(key))}: unknown key (known keys: {known})")
    values: dict[str, Any] = {}
    for key, f in by_key.items():
        if key in raw:
            values[f.name] = f.metadata["conv"](raw[key], _join(path, key))
    return cls(**values)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# --- the sections -------------------------------------------------------------------------------


def _networks(value: Any, key: str) -> tuple[str, ...]:
    items: tuple[str, ...] = _str_list()(value, key)
    for i, item in enumerate(items):
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ConfigError(f"{key}[{i}]: not an address or network: {item!r}") from None
    return items


@dataclass(frozen=True)
class ServerConfig:
    """Where the Segment-compatible receiver listens and what it accepts."""

    host: str = _opt(_str(nonempty=True), "127.0.0.1")
    port: int = _opt(_int(0, 65535), 8088)
    max_message_bytes: int = _opt(_int(1024, 16 * 1024 * 1024), 32 * 1024)
    max_request_bytes: int = _opt(_int(1024, 64 * 1024 * 1024), 512_000)
    max_batch_messages: int = _opt(_int(1, 100_000), 2500)
    cors_origins: tuple[str, ...] = _opt(_str_list(), ("*",))
    # /health, /ready and /metrics on their own address (None: on the Segment API's).
    admin_host: str = _opt(_str(nonempty=True), "127.0.0.1")
    admin_port: int | None = _opt(_optional(_int(0, 65535)), None)
    # HTTPS on the Segment API's port: a PEM certificate (with its chain) and its key, both
    # or neither; SIGHUP reads them again (docs/deployment.md).
    tls_cert: str = _opt(_str(), "")
    tls_key: str = _opt(_str(), "")
    # Proxies whose forwarding header names the client (empty: every such header ignored).
    trusted_proxies: tuple[str, ...] = _opt(_networks, ())
    client_ip_header: str = _opt(_choice("x-forwarded-for", "forwarded"), "x-forwarded-for")

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError(
                "server.tls_cert and server.tls_key: set both (HTTPS) or neither (HTTP)"
            )


@dataclass(frozen=True)
class SourceConfig:
    """One sending application, identified by its Segment write key."""

    name: str = _opt(_str(nonempty=True), "")
    write_key: str = _opt(_str(nonempty=True), "")


@dataclass(frozen=True)
class QueueConfig:
    """The durable queue: a SQLite file (`path`), or a PostgreSQL database that several
    relays share (`url`)."""

    path: str = _opt(_str(nonempty=True), "./relay-data/queue.db")
    url: str = _opt(_postgres_url, "")
    synchronous: str = _opt(_choice("full", "normal"), "full")
    dedup_window_s: float = _opt(_duration(0, 30 * 86400), 86400.0, "dedup_window")
    max_pending: int = _opt(_int(1, 10**10), 10_000_000)
    max_size: int = _opt(_int(0, 2**50), 0)
    # PostgreSQL: how long a relay's hold on its users' buckets lasts unrenewed.
    lease_s: float = _opt(_duration(3, 600), 15.0, "lease")
    pool_size: int = _opt(_int(2, 100), 8)
    # PostgreSQL: False makes a receive-only relay, which stores calls and leaves forwarding
    # (and ending sessions) to the relays on the same database that forward.
    forward: bool = _opt(_bool, True)


def _queue(value: Any, key: str) -> QueueConfig:
    if isinstance(value, Mapping) and "path" in value and "url" in value:
        raise ConfigError(
            f"{key}.path and {key}.url: set one of them, not both (path: a SQLite file on "
            "this VM; url: a PostgreSQL database that several relays share)"
        )
    queue = build(QueueConfig, value, key)
    if not queue.forward and not queue.url:
        raise ConfigError(
            f"{key}.forward: false needs {key}.url: a receive-only relay leaves forwarding to "
            "other relays on the same PostgreSQL database, and no other relay reads this "
            "one's SQLite file"
        )
    return queue


@dataclass(frozen=True)
class RetryConfig:
    """Two levels of retry: quick in-process attempts, then durable backoff in the queue."""

    quick_attempts: int = _opt(_int(1, 20), 3)
    quick_initial_s: float = _opt(_duration(0, 60), 0.2, "quick_initial")
    quick_max_s: float = _opt(_duration(0, 300), 2.0, "quick_max")
    backoff_initial_s: float = _opt(_duration(0, 3600), 5.0, "backoff_initial")
    backoff_max_s: float = _opt(_duration(0, 86400), 600.0, "backoff_max")
    command_retry_s: float = _opt(_duration(0, 3600), 1.0, "command_retry")


@dataclass(frozen=True)
class DestinationConfig:
    """The Infinario-style API the forwarder sends to."""

    api: str = _opt(_choice("infinario", "exponea"), "infinario")
    base_url: str = _opt(_url, "https://api.infinario.com")
    project_token: str = _opt(_str(), "")
    token_field: str = _opt(_choice("project_id", "company_id"), "project_id")
    api_key: str = _opt(_str(), "")
    api_secret: str = _opt(_str(), "")
    batch_size: int = _opt(_int(1, 50), 50)
    linger_s: float = _opt(_duration(0, 60), 0.2, "linger")
    timeout_s: float = _opt(_duration(0.001, 600), 10.0, "timeout")
    concurrency: int = _opt(_int(1, 64), 4)
    max_requests_per_second: float = _opt(_float(0.01, 10_000), 80.0)
    max_age_s: float = _opt(_duration(60, 365 * 86400), 7 * 86400.0, "max_age")
    credentials_probe_s: float = _opt(_duration(0.01, 86400), 30.0, "credentials_probe")
    probe_initial_s: float = _opt(_duration(0.01, 3600), 1.0, "probe_initial")
    probe_max_s: float = _opt(_duration(0.01, 3600), 30.0, "probe_max")
    retry: RetryConfig = _sub(RetryConfig)


@dataclass(frozen=True)
class SessionsConfig:
    """The idle-session timer."""

    enabled: bool = _opt(_bool, True)
    idle_timeout_s: float = _opt(_duration(1, 7 * 86400), 1800.0, "idle_timeout")
    event_types: tuple[str, ...] = _opt(_str_list(nonempty=True), ("page", "screen"))
    cache_size: int = _opt(_int(0, 10_000_000), 10_000)


@dataclass(frozen=True)
class DebuggerConfig:
    """The live debugger page at /debugger."""

    enabled: bool = _opt(_bool, False)
    allow: tuple[str, ...] = _opt(_networks, ("127.0.0.0/8", "::1/128"))
    history: int = _opt(_int(0, 100_000), 500)


@dataclass(frozen=True)
class ShutdownConfig:
    """How the relay stops on SIGTERM."""

    grace_s: float = _opt(_duration(0, 3600), 10.0, "grace")


DEFAULT_CONTEXT_FIELDS = (
    "ip",
    "locale",
    "timezone",
    "userAgent",
    "app",
    "campaign",
    "device",
    "library",
    "location",
    "network",
    "os",
    "page",
    "referrer",
    "screen",
)


@dataclass(frozen=True)
class MappingConfig:
    """How Segment messages become Infinario commands."""

    registered_id: str = _opt(_str(nonempty=True), "registered")
    cookie_id: str = _opt(_str(nonempty=True), "cookie")
    context_fields: tuple[str, ...] = _opt(_str_list(), DEFAULT_CONTEXT_FIELDS)


def _sources(value: Any, key: str) -> tuple[SourceConfig, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key}: must be a non-empty list of {{name, write_key}}")
    sources = tuple(build(SourceConfig, item, f"{key}[{i}]") for i, item in enumerate(value))
    for i, source in enumerate(sources):
        for attr in ("name", "write_key"):
            if not getattr(source, attr):
                raise ConfigError(f"{key}[{i}].{attr}: required")
    names = [s.name for s in sources]
    keys = [s.write_key for s in sources]
    for i, source in enumerate(sources):
        if names.index(source.name) != i:
            raise ConfigError(f"{key}[{i}].name: duplicate source name {source.name!r}")
        if keys.index(source.write_key) != i:
            raise ConfigError(f"{key}[{i}].write_key: the same write key is used twice")
    return sources


# The write key `segment-relay dev` uses and the README prints: never accepted by a relay that
# forwards (Config.check_serving).
DEV_WRITE_KEY = "dev-write-key"
WELL_KNOWN_WRITE_KEYS = frozenset({DEV_WRITE_KEY})


@dataclass(frozen=True)
class Config:
    """The whole relay configuration."""

    sources: tuple[SourceConfig, ...] = field(metadata={"conv": _sources, "key": None})
    server: ServerConfig = _sub(ServerConfig)
    queue: QueueConfig = field(default_factory=QueueConfig, metadata={"conv": _queue, "key": None})
    destination: DestinationConfig = _sub(DestinationConfig)
    sessions: SessionsConfig = _sub(SessionsConfig)
    mapping: MappingConfig = _sub(MappingConfig)
    shutdown: ShutdownConfig = _sub(ShutdownConfig)
    debugger: DebuggerConfig = _sub(DebuggerConfig)

    def __post_init__(self) -> None:
        if self.queue.url and self.queue.lease_s <= self.destination.timeout_s:
            raise ConfigError(
                f"queue.lease: must be longer than destination.timeout "
                f"({self.queue.lease_s:g}s <= {self.destination.timeout_s:g}s): a relay that "
                "lost its users to another may still be sending their messages"
            )

    def check_serving(self, *, dry_run: bool) -> None:
        """The checks of the config itself that `serve` makes before it starts, and
        `check-config` with it: a relay that forwards has the destination's credentials and
        no source takes a well-known development write key."""
        if dry_run:
            return
        for i, source in enumerate(self.sources):
            if source.write_key in WELL_KNOWN_WRITE_KEYS:
                raise ConfigError(
                    f"sources[{i}].write_key: {source.write_key!r} is the development key "
                    "printed in the README, so anyone could send with it; set a key of your "
                    "own (the example config reads SEGMENT_WRITE_KEY), or try the relay with "
                    "serve --dry-run or segment-relay dev"
                )
        if self.queue.forward:
            self.check_destination()

    def well_known_keys(self) -> list[str]:
        """The sources (as config keys) whose write key is a well-known development key."""
        return [
            f"sources[{i}].write_key"
            for i, source in enumerate(self.sources)
            if source.write_key in WELL_KNOWN_WRITE_KEYS
        ]

    def check_destination(self) -> None:
        """Raise ConfigError unless the destination has the credentials its API style needs."""
        dest = self.destination
        if not dest.project_token:
            raise ConfigError(
                "destination.project_token: required to forward (set it, or run with --dry-run)"
            )
        if dest.api == "exponea" and not dest.api_key:
            raise ConfigError("destination.api_key: required when destination.api is exponea")


# --- loading ------------------------------------------------------------------------------------


def expand_env(value: Any, path: str, environ: Mapping[str, str]) -> Any:
    """Expand `${VAR}` and `${VAR:-default}` in every string of a parsed YAML tree."""
    if isinstance(value, dict):
        return {k: expand_env(v, _join(path, str(k)), environ) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{path}[{i}]", environ) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def replace(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        raise ConfigError(f"{path}: environment variable {name} is not set (and has no default)")

    return _ENV_REF.sub(replace, value)


def parse_config(text: str, environ: Mapping[str, str] | None = None) -> Config:
    """Parse and validate YAML text; raise ConfigError naming the first bad key."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"the config is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError("the config must be a YAML mapping of sections")
    if "sources" not in raw:
        raise ConfigError("sources: required (a list of {name, write_key})")
    raw = expand_env(raw, "", os.environ if environ is None else environ)
    return build(Config, raw, "")


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate the YAML config file at `path`.

    A relative `queue.path` is relative to the file's directory, so that every command given
    the daemon's config finds the daemon's queue, wherever it is run from.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror}") from exc
    config = parse_config(text, environ)
    if config.queue.url or Path(config.queue.path).is_absolute():
        return config
    queue_path = os.path.normpath(Path(path).resolve().parent / config.queue.path)
    return replace(config, queue=replace(config.queue, path=queue_path))


_ENV_LINE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")


def read_env_file(path: str | Path) -> dict[str, str]:
    """The variables of a systemd EnvironmentFile: `VAR=value` lines; blank lines and lines
    starting with # or ; are skipped; a value in single or double quotes loses them."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read the environment file {path}: {exc.strerror}") from exc
    found: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith(("#", ";")):
            continue
        match = _ENV_LINE.match(line)
        if match is None:
            raise ConfigError(f"{path}:{number}: not a VAR=value line")
        name, value = match.groups()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        found[name] = value
    return found
