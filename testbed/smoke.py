"""`kvgate smoke [--mode auto|docker|local] [--workdir DIR]`: run the compose stack and check it.

The stack is docker-compose.yml, run with Docker when an engine answers and
otherwise as local processes (testbed/stack.py). Checks, in order:

1. every request answered: completions and chat, streamed and not, all 200;
2. prefix affinity: a long prefix warmed on sim-2 (directly, so the balancer
   alone would not pick it) is found in the controller's /lookup, and repeats of
   it through the gateway land on sim-2 with cached tokens;
3. backend fail-over: sim-1 is killed while requests are in flight; all succeed;
4. controller down: the mock LMCache is killed; requests still succeed
   (the routing filter falls back to its load policy).

Exit code 0 when every check passes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from testbed.stack import DockerStack, LocalStack, docker_available, sigterm_unwinds

GATEWAY, CONTROLLER = ("gateway", 8888), ("lmcache", 9000)
WARM_BACKEND, VICTIM = ("sim-2", 8104), "sim-1"
WORDS = ("cache prefix token route backend gateway latency prefill decode block chunk "
         "controller worker request stream answer system prompt user model").split()


def long_text(seed: int, words: int) -> str:
    """Deterministic filler text (a shared "system prompt")."""
    return " ".join(WORDS[(seed * 7 + i * i) % len(WORDS)] for i in range(words))


@dataclass
class Reply:
    status: int
    endpoint: str | None
    cached_tokens: int | None
    body: str


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


async def ask(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Reply:
    """POST one request; for streams, the usage comes from the final SSE chunk."""
    async with session.post(url, json=body) as resp:
        text = await resp.text()
        endpoint = resp.headers.get("x-kvgate-endpoint")
    if resp.status != 200:
        return Reply(resp.status, endpoint, None, text)
    if body.get("stream"):
        events = [e.removeprefix("data: ") for e in text.split("\n\n") if e.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            return Reply(599, endpoint, None, text[-300:])
        usage = next((json.loads(e).get("usage") for e in reversed(events[:-1]) if '"usage"' in e), None)
    else:
        usage = json.loads(text).get("usage")
    cached = ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens")
    return Reply(200, endpoint, cached, text)


def _request(model: str, i: int, prompt: str, stream: bool = False, max_tokens: int = 8) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if i % 2:
        return "/v1/chat/completions", body | {"messages": [{"role": "user", "content": prompt}]}
    return "/v1/completions", body | {"prompt": prompt}


class Smoke:
    def __init__(self, stack: LocalStack | DockerStack, session: aiohttp.ClientSession) -> None:
        self.stack = stack
        self.session = session
        self.gateway = stack.url(*GATEWAY)
        self.model = ""

    async def send(self, path: str, body: dict[str, Any]) -> Reply:
        return await ask(self.session, self.gateway + path, body)

    async def all_answered(self) -> Check:
        async with self.session.get(self.gateway + "/v1/models") as resp:
            self.model = (await resp.json())["data"][0]["id"]
        requests = [_request(self.model, i, f"smoke question {i}: {long_text(i, 30)}", stream=i % 3 == 0)
                    for i in range(12)]
        replies = await asyncio.gather(*(self.send(p, b) for p, b in requests))
        bad = [(r.status, r.body[:120]) for r in replies if r.status != 200]
        used = sorted({r.endpoint or "?" for r in replies})
        return Check("every request answered", not bad, f"{len(replies) - len(bad)}/{len(replies)} ok, "
                     f"endpoints {used}" + (f"; failures {bad[:3]}" if bad else ""))

    async def prefix_affinity(self) -> Check:
        system = long_text(99, 700)
        direct = self.stack.url(*WARM_BACKEND)
        warm = await ask(self.session, direct + "/v1/completions",
                         {"model": self.model, "prompt": system + " warm up", "max_tokens": 1})
        async with self.session.post(direct + "/tokenize", json={"prompt": system + " probe"}) as resp:
            tokens = (await resp.json())["tokens"]
        held = await self._wait_lookup(tokens, WARM_BACKEND[0])
        replies = [await self.send("/v1/completions", {"model": self.model, "prompt": f"{system} question {i}",
                                                       "max_tokens": 4}) for i in range(3)]
        ok = warm.status == 200 and held > 0 and all(
            r.status == 200 and r.endpoint == WARM_BACKEND[0] and (r.cached_tokens or 0) > 0 for r in replies)
        return Check("repeated long prefix lands on the backend holding it", ok,
                     f"{len(tokens)} prompt tokens, controller credits {WARM_BACKEND[0]} with {held}; "
                     f"repeats went to {[r.endpoint for r in replies]} "
                     f"with cached {[r.cached_tokens for r in replies]}")

    async def _wait_lookup(self, tokens: list[int], instance: str, timeout: float = 10.0) -> int:
        controller = self.stack.url(*CONTROLLER)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            async with self.session.post(controller + "/lookup", json={"tokens": tokens}) as resp:
                layout = (await resp.json()).get("layout_info", {})
            if instance in layout:
                value = layout[instance]
                return int(value[1] if isinstance(value, list) else value.get("num_tokens", 0))
            await asyncio.sleep(0.05)
        return 0

    async def backend_failover(self) -> Check:
        done: list[Reply] = []
        half = asyncio.Event()
        sem = asyncio.Semaphore(4)

        async def one(i: int) -> None:
            async with sem:
                path, body = _request(self.model, 0, f"failover {i}: {long_text(i + 50, 20)}", max_tokens=16)
                done.append(await self.send(path, body))
                if len(done) >= 6:
                    half.set()

        tasks = [asyncio.create_task(one(i)) for i in range(20)]
        await half.wait()
        await asyncio.to_thread(self.stack.kill, VICTIM)
        await asyncio.gather(*tasks)
        bad = [(r.status, r.body[:120]) for r in done if r.status != 200]
        counts = {e: sum(r.endpoint == e for r in done) for e in sorted({r.endpoint or "?" for r in done})}
        return Check(f"backend killed mid-run ({VICTIM}) is failed over", not bad,
                     f"{len(done) - len(bad)}/{len(done)} ok, by endpoint {counts}"
                     + (f"; failures {bad[:3]}" if bad else ""))

    async def controller_down(self) -> Check:
        await asyncio.to_thread(self.stack.kill, CONTROLLER[0])
        system = long_text(99, 700)
        requests = [_request(self.model, i, f"{system} after controller death {i}", stream=i % 2 == 0)
                    for i in range(6)]
        start = time.monotonic()
        replies = await asyncio.gather(*(self.send(p, b) for p, b in requests))
        bad = [(r.status, r.body[:120]) for r in replies if r.status != 200]
        return Check("controller killed: requests still succeed", not bad,
                     f"{len(replies) - len(bad)}/{len(replies)} ok in {time.monotonic() - start:.2f}s, "
                     f"endpoints {sorted({r.endpoint or '?' for r in replies})}")


async def run_checks(stack: LocalStack | DockerStack) -> list[Check]:
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        smoke = Smoke(stack, session)
        checks = [await smoke.all_answered()]
        for step in (smoke.prefix_affinity, smoke.backend_failover, smoke.controller_down):
            checks.append(await step())
        return checks


def report(checks: Sequence[Check]) -> str:
    lines = [f"[{'PASS' if c.ok else 'FAIL'}] {c.name}: {c.detail}" for c in checks]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="kvgate smoke", description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("auto", "docker", "local"), default="auto")
    parser.add_argument("--workdir", type=Path, help="local mode: scratch dir for models, configs, logs")
    args = parser.parse_args(list(argv))
    use_docker = args.mode == "docker" or (args.mode == "auto" and docker_available())
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kvgate-smoke-"))
    stack: LocalStack | DockerStack = DockerStack() if use_docker else LocalStack(workdir)
    print(f"kvgate smoke: {'docker compose' if use_docker else f'local processes (logs in {workdir}/logs)'}")
    with sigterm_unwinds(), stack:
        try:
            stack.start()
            checks = asyncio.run(run_checks(stack))
        except Exception as exc:  # noqa: BLE001 - a broken stack is a failed smoke run, with logs
            print(f"kvgate smoke: stack failed: {exc}\n{stack.logs()}", file=sys.stderr)
            return 1
        print(report(checks))
        if not all(c.ok for c in checks):
            print(stack.logs(), file=sys.stderr)
            return 1
    return 0
