"""KV-event publishing for kvgate's engines (sim-vllm, the MLX daemon): flags, cache sink, app wiring.

Flags (both engines): `--kv-events-port P` turns publishing on (0: any free
port); `--kv-events-replay-port R` adds the replay socket (0: any free port;
absent: no replay); `--kv-events-topic`, `--kv-events-format {map,array}`.
Sockets bind on the engine's `--host`.

How a harness learns the bound ports: `GET /kvgate/kv-events` on the engine's
HTTP port answers `{"enabled": true, "port": P, "replay_port": R, "endpoint":
"tcp://host:P", "replay_endpoint": "tcp://host:R"|null, "topic", "format",
"next_seq"}` (`{"enabled": false}` when publishing is off). The HTTP server only
answers once the publisher is bound, so a harness that waited for /health can ask
at once. The ports are also logged.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from kvproto.kv_events import (
    EVENT_FORMATS,
    MEDIUM_GPU,
    AllBlocksCleared,
    BlockHash,
    BlockRemoved,
    EventFormat,
    block_stored,
)
from kvproto.kv_events_pub import KVEventPublisher

log = logging.getLogger("kvproto.kv_events")
ROUTE = "/kvgate/kv-events"


@dataclass(frozen=True, slots=True)
class KVEventsConfig:
    host: str
    port: int
    replay_port: int | None = None  # None: no replay socket
    topic: str = ""
    event_format: EventFormat = "map"
    buffer_steps: int = 10_000

    def __post_init__(self) -> None:
        for name in ("port", "replay_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 65536:
                raise ValueError(f"--kv-events-{name.replace('_', '-')} must be in 0..65535, got {value}")
        if self.event_format not in EVENT_FORMATS:
            raise ValueError(f"--kv-events-format must be one of {EVENT_FORMATS}, got {self.event_format!r}")


def add_kv_events_args(parser: argparse.ArgumentParser) -> None:
    """Add the --kv-events-* flags (publishing stays off unless --kv-events-port is given)."""
    group = parser.add_argument_group("KV events (vLLM format, ZMQ)")
    group.add_argument("--kv-events-port", type=int, help="publish KV events on this PUB port (0: any free)")
    group.add_argument("--kv-events-replay-port", type=int, help="replay ROUTER port (0: any free; absent: none)")
    group.add_argument("--kv-events-topic", default="", help="topic frame of every message")
    group.add_argument("--kv-events-format", choices=EVENT_FORMATS, default="map",
                       help="event encoding: map (vLLM after 0.23, PR #42892) or array (vLLM <= 0.23)")


def kv_events_config(args: argparse.Namespace, host: str) -> KVEventsConfig | None:
    """The publishing config from parsed flags, None when off. Raises ValueError on a bad combination."""
    if args.kv_events_port is None:
        if args.kv_events_replay_port is not None:
            raise ValueError("--kv-events-replay-port needs --kv-events-port")
        return None
    return KVEventsConfig(host, args.kv_events_port, args.kv_events_replay_port, args.kv_events_topic,
                          args.kv_events_format)


class KVEventSink:
    """Block-level cache callbacks that become KV-event batches once a publisher is attached.

    Each call publishes one batch. Safe from any thread (see `KVEventPublisher.publish`).
    """

    def __init__(self, block_size: int, medium: str | None = MEDIUM_GPU) -> None:
        self.block_size = block_size
        self.medium = medium
        self.publisher: KVEventPublisher | None = None

    def stored(self, hashes: Sequence[BlockHash], parent: BlockHash | None, tokens: Sequence[int]) -> None:
        """Consecutive full blocks `hashes` (after `parent`) holding exactly `tokens` became cached."""
        if self.publisher is not None and hashes:
            self.publisher.publish([block_stored(hashes, parent, tokens, self.block_size, self.medium)])

    def removed(self, hashes: Sequence[BlockHash]) -> None:
        if self.publisher is not None and hashes:
            self.publisher.publish([BlockRemoved(tuple(hashes), self.medium)])

    def cleared(self) -> None:
        if self.publisher is not None:
            self.publisher.publish([AllBlocksCleared()])


KV_EVENTS_SINK = web.AppKey("kv_events_sink", KVEventSink)


def _describe(config: KVEventsConfig | None, publisher: KVEventPublisher | None) -> dict[str, Any]:
    if config is None or publisher is None:
        return {"enabled": False}
    replay = f"tcp://{config.host}:{publisher.replay_port}" if publisher.replay_port is not None else None
    return {"enabled": True, "port": publisher.port, "replay_port": publisher.replay_port,
            "endpoint": f"tcp://{config.host}:{publisher.port}", "replay_endpoint": replay,
            "topic": config.topic, "format": config.event_format, "next_seq": publisher.next_seq}


def setup_kv_events(app: web.Application, config: KVEventsConfig | None, sink: KVEventSink) -> None:
    """Serve GET /kvgate/kv-events and, when `config` is set, own a publisher attached to `sink`."""
    app[KV_EVENTS_SINK] = sink

    async def describe(request: web.Request) -> web.Response:
        return web.json_response(_describe(config, sink.publisher))

    app.router.add_get(ROUTE, describe)
    if config is not None:
        app.cleanup_ctx.append(_publisher_ctx(config, sink))


def _publisher_ctx(config: KVEventsConfig, sink: KVEventSink) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        replay = f"tcp://{config.host}:{config.replay_port}" if config.replay_port is not None else None
        publisher = KVEventPublisher(f"tcp://{config.host}:{config.port}", replay, topic=config.topic,
                                     buffer_steps=config.buffer_steps, event_format=config.event_format)
        await publisher.start()
        log.info("kv-events: publishing on tcp://%s:%s, replay %s", config.host, publisher.port,
                 publisher.replay_port)
        sink.publisher = publisher
        try:
            yield
        finally:
            sink.publisher = None
            await publisher.close()

    return ctx
