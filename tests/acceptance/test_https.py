"""HTTPS served by the relay: certificates made by a throwaway CA (trustme), refused when
unusable, and rotated under load by SIGHUP without a refused call (docs/deployment.md)."""

from __future__ import annotations

import asyncio
import signal
import ssl
from pathlib import Path

import aiohttp
import pytest
import trustme

from support import AUTH, T0, run_cli, start_daemon, write_config

pytestmark = pytest.mark.acceptance
CALLS = 400


def write_pair(ca: trustme.CA, directory: Path, name: str) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (with its chain) and its key, as PEM files."""
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    for blob in leaf.cert_chain_pems:
        blob.write_to_path(str(cert), append=True)
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key


def replace_pair(source: tuple[Path, Path], live: tuple[Path, Path]) -> None:
    """Put a pair where the relay reads its own, each file renamed into place (as certbot's
    symlinks switch at once)."""
    for new, path in zip(source, live, strict=True):
        staged = path.with_suffix(".staged")
        staged.write_bytes(new.read_bytes())
        staged.replace(path)


async def served_certificate(url: str, trust: ssl.SSLContext) -> bytes:
    """The certificate a new TLS connection to `url` is shown (DER)."""
    host, port = url.removeprefix("https://").rsplit(":", 1)
    _, writer = await asyncio.open_connection(host, int(port), ssl=trust)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
        await writer.wait_closed()
    assert isinstance(der, bytes)
    return der


def der(cert: Path) -> bytes:
    """The first certificate of a PEM file (the server's own), as DER."""
    first, footer = cert.read_text().split(ssl.PEM_FOOTER)[0], ssl.PEM_FOOTER
    return ssl.PEM_cert_to_DER_cert(first + footer)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def client_trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def test_an_unusable_certificate_is_refused_at_start_naming_the_keys(
    ca: trustme.CA, tmp_path: Path
) -> None:
    cert, _ = write_pair(ca, tmp_path, "one")
    _, other_key = write_pair(ca, tmp_path, "two")
    cases = [
        (
            {"tls_cert": str(cert), "tls_key": str(other_key)},
            "are not a PEM certificate and its private key",
        ),
        (
            {"tls_cert": str(cert), "tls_key": str(tmp_path / "missing.key")},
            "server.tls_key: cannot read",
        ),
        ({"tls_cert": str(cert)}, "server.tls_cert and server.tls_key: set both"),
    ]
    for server, named in cases:
        config = write_config(
            tmp_path / "relay.yaml", tmp_path / "q.db", "http://127.0.0.1:9", server=server
        )
        for command in ("check-config", "serve"):
            code, out, err = await run_cli(command, "--config", str(config))
            assert (code, named in err, out) == (2, True, ""), (command, err)
            assert "server.tls_" in err
    assert not (tmp_path / "q.db").exists()


async def test_a_certificate_rotated_by_sighup_under_load_refuses_no_call(
    ca: trustme.CA, tmp_path: Path
) -> None:
    first = write_pair(ca, tmp_path, "first")
    rotated = write_pair(ca, tmp_path, "rotated")
    live = (tmp_path / "live.pem", tmp_path / "live.key")
    replace_pair(first, live)
    config = write_config(
        tmp_path / "relay.yaml",
        tmp_path / "q.db",
        "http://127.0.0.1:9",
        server={"tls_cert": str(live[0]), "tls_key": str(live[1])},
        destination={"retry": {"backoff_initial": "1h", "backoff_max": "1h"}},
    )
    trust = client_trusting(ca)
    daemon = await start_daemon(config)
    statuses: list[int] = []
    under_way = asyncio.Event()
    try:
        assert daemon.url.startswith("https://127.0.0.1:")
        assert await served_certificate(daemon.url, trust) == der(first[0])

        async def load() -> None:
            # A new connection (and handshake) for every call, so that each sees the
            # certificate of its moment.
            connector = aiohttp.TCPConnector(ssl=trust, force_close=True)
            async with aiohttp.ClientSession(connector=connector, headers=AUTH) as session:
                for n in range(CALLS):
                    body = {
                        "userId": f"u{n % 5}",
                        "event": "e",
                        "messageId": f"m{n}",
                        "timestamp": T0,
                    }
                    async with session.post(
                        daemon.url + "/v1/track", json=body, timeout=aiohttp.ClientTimeout(total=30)
                    ) as response:
                        statuses.append(response.status)
                    if n == CALLS // 4:
                        under_way.set()

        sender = asyncio.create_task(load())
        async with asyncio.timeout(60):
            await under_way.wait()
        replace_pair(rotated, live)
        daemon.process.send_signal(signal.SIGHUP)
        await daemon.wait_stderr("certificate reloaded")
        assert await served_certificate(daemon.url, trust) == der(rotated[0])
        assert not sender.done(), "the calls ended before the reload: not a test under load"
        # A bad pair (the first certificate with the rotated key) changes nothing.
        live[0].write_bytes(first[0].read_bytes())
        daemon.process.send_signal(signal.SIGHUP)
        await daemon.wait_stderr("the certificate was not reloaded")
        assert await served_certificate(daemon.url, trust) == der(rotated[0])
        await sender
    finally:
        assert await daemon.stop() == 0
    assert statuses == [200] * CALLS
    assert any(
        " ERROR " in line and "are not a PEM certificate and its private key" in line
        for line in daemon.stderr_lines
    )
