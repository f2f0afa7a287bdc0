"""HTTPS on the Segment API's port: the certificate, loaded at start and again on SIGHUP
(docs/deployment.md, "HTTPS")."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from .config import ServerConfig
from .errors import ConfigError

log = logging.getLogger(__name__)


def _load(cert: str, key: str) -> ssl.SSLContext:
    """A server context holding the certificate chain at `cert` and its key at `key`;
    ConfigError naming both when they cannot be read or do not match."""
    for name, path in (("server.tls_cert", cert), ("server.tls_key", key)):
        try:
            with Path(path).open("rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"{name}: cannot read {path}: {exc.strerror}") from exc
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"server.tls_cert / server.tls_key: {cert} and {key} are not a PEM certificate "
            f"and its private key ({exc})"
        ) from exc
    return context


class Certificate:
    """The server's TLS context. Every handshake takes the certificate loaded last (the
    context's SNI callback hands the connection to it), so a reload swaps whole, checked
    contexts: a bad pair changes nothing, and connections already open keep theirs."""

    def __init__(self, server: ServerConfig) -> None:
        self.cert, self.key = server.tls_cert, server.tls_key
        # The context the server listens with; until a reload it is also the one handed out.
        self.context = self.current = _load(self.cert, self.key)
        self.context.sni_callback = self._choose

    def _choose(self, connection: ssl.SSLObject, _name: str | None, _: ssl.SSLContext) -> None:
        connection.context = self.current

    def reload(self) -> bool:
        """Read the files again (a rotated certificate); False, logged, when they are bad."""
        try:
            self.current = _load(self.cert, self.key)
        except ConfigError as exc:
            log.error(  # noqa: TRY400 - the message says what is wrong; no traceback needed
                "the certificate was not reloaded, the one in use stays: %s",
                exc,
                extra={"action": "tls_reload_failed"},
            )
            return False
        log.info("certificate reloaded from %s", self.cert, extra={"action": "tls_reloaded"})
        return True


def certificate(server: ServerConfig) -> Certificate | None:
    """The certificate `server` names (None: plain HTTP); ConfigError when it is unusable."""
    return Certificate(server) if server.tls_cert else None
