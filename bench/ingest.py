"""Ingest benchmark (issue 3): the relay against two bare baselines, in the same run.

  .venv/bin/python bench/ingest.py [--seconds 10] [--rounds 1] [--rate N]

64 connections from wrk (one thread) to 127.0.0.1. For single calls the baseline is a bare
aiohttp handler that parses the JSON and answers 200; for 100-message batches a bare durable
handler that writes each message as a row in one SQLite transaction (WAL, synchronous=FULL).
The relay runs as the real daemon as shipped (synchronous: full), forwarding to the fake API at
the destination's default rate limit (80 requests/s); `--rate N` lifts that limit, so that the
forwarder competes with the receiver for the event loop at full speed. Each relay run (one per
round, each on a fresh queue) is measured against the mean of the baseline runs just before and
after it, and the median of the rounds is reported with every round's ratio (this host drifts).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import orjson
import trustme

from common import WrkResult, fake_api, process, python_bin, relay, relay_config, wrk

TRACK = {
    "userId": "user-1234567890",
    "event": "Order Completed",
    "properties": {
        "revenue": 19.99,
        "currency": "EUR",
        "product": {"sku": "SKU-1", "name": "Mug", "price": 19.99},
        "coupon": "SPRING",
        "items": 3,
    },
    "context": {
        "ip": "203.0.113.7",
        "locale": "en-GB",
        "timezone": "Europe/London",
        "userAgent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36",
        "library": {"name": "analytics-python", "version": "2.4.0"},
        "page": {
            "url": "https://shop.example/cart?step=2",
            "path": "/cart",
            "title": "Cart",
            "referrer": "https://search.example/",
        },
        "campaign": {"source": "newsletter", "medium": "email", "name": "spring"},
    },
    "timestamp": "2024-03-01T12:00:00.000Z",
}
SINGLE = orjson.dumps(TRACK)
BATCH = orjson.dumps(
    {"batch": [{"type": "track", **TRACK}] * 100, "sentAt": "2024-03-01T12:00:01.000Z"}
)


def baseline(mode: str, tmp: Path, body: bytes, path: str, seconds: int) -> WrkResult:
    with process(
        python_bin(), "bench/baselines.py", mode, "--db", str(tmp / f"{mode}.db")
    ) as server:
        return wrk(server.url + path, body, seconds=seconds)


def row(name: str, result: WrkResult, events: int) -> str:
    return (
        f"{name:<34} {result.ok_per_s(events):>12,.0f} {result.p50_ms:>8.2f} "
        f"{result.p99_ms:>8.2f} {result.non_2xx:>7} {result.steal_pct:>6.0f}%"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="relay runs per load, each between two baseline runs (the host drifts)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="destination.max_requests_per_second (default: the relay's, 80)",
    )
    parser.add_argument(
        "--https",
        action="store_true",
        help="instead: the relay serving HTTPS (server.tls_cert) against the relay on plain "
        "HTTP, alternated in each round",
    )
    args = parser.parse_args()
    if args.https:
        https_against_http(args)
        return
    print(
        f"message {len(SINGLE)} bytes; batch {len(BATCH)} bytes (100 messages); 64 connections, {args.seconds}s each; "
        f"forwarding at {args.rate or 'the default'} requests/s; {args.rounds} round(s)"
    )
    print(f"{'':<34} {'acked ev/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>7} {'steal':>7}")
    for name, body, path, events, mode in [
        ("single calls", SINGLE, "/v1/track", 1, "parse"),
        ("100-message batches", BATCH, "/v1/batch", 100, "durable"),
    ]:
        ratios: list[float] = []
        p99s: list[float] = []
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            before = baseline(mode, tmp, body, path, args.seconds)
            print(row(f"{name}: baseline ({mode})", before, events))
            for n in range(args.rounds):
                (tmp / f"relay{n}").mkdir()  # a fresh queue each round
                with (
                    fake_api() as api,
                    relay(relay_config(tmp / f"relay{n}", api.url, rate=args.rate)) as daemon,
                ):
                    ours = wrk(daemon.url + path, body, seconds=args.seconds)
                after = baseline(mode, tmp, body, path, args.seconds)
                # Each relay run against the mean of the baseline runs just before and after it.
                reference = (before.ok_per_s(events) + after.ok_per_s(events)) / 2
                ratios.append(ours.ok_per_s(events) / reference)
                p99s.append(ours.p99_ms)
                print(row(f"{name}: relay", ours, events) + f"   {ratios[-1]:.2f}x")
                print(row(f"{name}: baseline ({mode})", after, events))
                before = after
        rounds = ", ".join(f"{r:.2f}x" for r in ratios)
        print(
            f"{name}: relay / baseline = {statistics.median(ratios):.2f}x (median; rounds {rounds}), "
            f"relay p99 {statistics.median(p99s):.1f} ms (median)"
        )


def https_against_http(args: argparse.Namespace) -> None:
    """What TLS costs: the same relay on HTTP and on HTTPS (a certificate from a throwaway CA;
    wrk keeps its 64 connections open, as clients do, so this is mostly the cost of
    encrypting, with 64 handshakes per run)."""
    print(
        f"message {len(SINGLE)} bytes; batch {len(BATCH)} bytes (100 messages); 64 connections, "
        f"{args.seconds}s each; {args.rounds} round(s) of HTTP then HTTPS"
    )
    print(f"{'':<34} {'acked ev/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>7} {'steal':>7}")
    for name, body, path, events in [
        ("single calls", SINGLE, "/v1/track", 1),
        ("100-message batches", BATCH, "/v1/batch", 100),
    ]:
        ratios: list[float] = []
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            leaf = trustme.CA().issue_cert("127.0.0.1")
            cert, key = tmp / "cert.pem", tmp / "key.pem"
            leaf.cert_chain_pems[0].write_to_path(str(cert))
            leaf.private_key_pem.write_to_path(str(key))
            tls = {"tls_cert": str(cert), "tls_key": str(key)}
            for n in range(args.rounds):
                results = {}
                for scheme, server in (("http", {}), ("https", tls)):
                    run = tmp / f"{scheme}{n}"
                    run.mkdir()  # a fresh queue each run
                    with (
                        fake_api() as api,
                        relay(relay_config(run, api.url, rate=args.rate, server=server)) as daemon,
                    ):
                        assert daemon.url.startswith(scheme + "://"), daemon.url
                        results[scheme] = wrk(daemon.url + path, body, seconds=args.seconds)
                    print(row(f"{name}: relay over {scheme.upper()}", results[scheme], events))
                ratios.append(results["https"].ok_per_s(events) / results["http"].ok_per_s(events))
        rounds = ", ".join(f"{r:.2f}x" for r in ratios)
        print(f"{name}: HTTPS / HTTP = {statistics.median(ratios):.2f}x (median; rounds {rounds})")


if __name__ == "__main__":
    main()
