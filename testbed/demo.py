"""`kvgate demo [--no-sim] [--users N] [--keep DIR]`: the whole local stack, a sample workload, a routing summary.

Generates the seeded tiny model, starts the mock LMCache controller, two MLX
daemons, a simulated vLLM backend (unless --no-sim) and the gateway with
configs/demo.yaml (ports remapped to free ones), sends a workload of several
users sharing long system prompts (completions and multi-turn chat, some
streamed), prints where each request went and why from the gateway's access
log, then stops everything.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from testbed.procs import ManagedProcess, free_ports, start_kvgate
from testbed.smoke import WORDS, ask
from testbed.stack import ROOT, Rewriter, sigterm_unwinds

CONFIG = ROOT / "configs" / "demo.yaml"
# Ports written in configs/demo.yaml; the demo maps each to a free one.
PORTS = {"gateway": 8888, "lmcache": 9000, "pull": 9001, "reply": 9002, "heartbeat": 9003,
         "mlx-a": 8101, "mlx-b": 8102, "sim-1": 8103,
         # KV-event publishers (PUB, replay ROUTER) of each engine, followed by the gateway
         "mlx-a-events": 5561, "mlx-a-replay": 5562, "mlx-b-events": 5563, "mlx-b-replay": 5564,
         "sim-1-events": 5565, "sim-1-replay": 5566}
TENANTS = ("a legal assistant that cites statutes", "a support agent for a cloud database",
           "a tutor for first-year physics")


def system_prompt(tenant: int) -> str:
    rng = random.Random(tenant)
    filler = " ".join(rng.choice(WORDS) for _ in range(450))
    return f"You are {TENANTS[tenant]}. Follow the house rules below exactly.\n{filler}"


class Demo:
    def __init__(self, workdir: Path, with_sim: bool) -> None:
        self.workdir = workdir
        self.with_sim = with_sim
        self.ports = dict(zip(PORTS, free_ports(len(PORTS)), strict=True))
        self.model_dir = workdir / "models" / "tiny"
        self.rewrite = Rewriter([], {PORTS[k]: v for k, v in self.ports.items()}, {"models/tiny": str(self.model_dir)})
        self.procs: list[ManagedProcess] = []

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def _start(self, name: str, args: list[str], ready: str) -> None:
        proc = start_kvgate(name, args, self.workdir / "logs")
        self.procs.append(proc)
        proc.wait_http(ready, timeout=90)

    def _gateway_config(self) -> Path:
        config = yaml.safe_load(self.rewrite(CONFIG.read_text()))
        config["filters"] = [f for f in config["filters"] if f["type"] != "access-log"] + [
            {"type": "access-log", "config": {"path": str(self.workdir / "logs" / "access.jsonl")}}]
        if not self.with_sim:
            for cluster in config["clusters"]:
                cluster["endpoints"] = [e for e in cluster["endpoints"] if e["id"] != "sim-1"]
        path = self.workdir / "demo.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def start(self) -> None:
        print(f"demo: working in {self.workdir}")
        from mlxd.tiny_model import main as make_tiny_model

        make_tiny_model([str(self.model_dir), "--seed", "0"])
        monitor = json.dumps({k: self.ports[k] for k in ("pull", "reply", "heartbeat")})
        self._start("lmcache", ["mock-lmcache", "--port", str(self.ports["lmcache"]), "--monitor-ports", monitor],
                    self.url("lmcache") + "/controller/workers")
        controller = ["--lmcache-controller", "127.0.0.1", "--lmcache-ports", monitor]
        for name in ("mlx-a", "mlx-b"):
            self._start(name, ["mlx-serve", "--model", str(self.model_dir), "--id", name,
                               "--port", str(self.ports[name]), *controller, *self._events(name)],
                        self.url(name) + "/health")
        if self.with_sim:
            self._start("sim-1", ["sim-vllm", "--model", str(self.model_dir), "--id", "sim-1", "--port",
                                  str(self.ports["sim-1"]), "--prefill-rate", "4000", "--decode-rate", "100",
                                  *controller, *self._events("sim-1")], self.url("sim-1") + "/health")
        self._start("gateway", ["serve", "-c", str(self._gateway_config())], self.url("gateway") + "/healthz")
        print("demo: stack up:", ", ".join(f"{p.name} :{self.ports[p.name]}" for p in self.procs))

    def _events(self, engine: str) -> list[str]:
        return ["--kv-events-port", str(self.ports[f"{engine}-events"]),
                "--kv-events-replay-port", str(self.ports[f"{engine}-replay"])]

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(timeout=10)


def workload(model: str, users: int) -> list[list[tuple[str, dict[str, Any]]]]:
    """Per user, a sequence of requests: turns of a chat (history grows) or completions, some streamed."""
    sessions = []
    for user in range(users):
        system = system_prompt(user % len(TENANTS))
        turns: list[tuple[str, dict[str, Any]]] = []
        messages = [{"role": "system", "content": system}]
        for turn in range(3):
            stream = (user + turn) % 3 == 0
            extra: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
            question = f"user {user} question {turn}: what about {WORDS[(user * 3 + turn) % len(WORDS)]}?"
            if user % 2 == 0:
                messages = [*messages, {"role": "user", "content": question}]
                turns.append(("/v1/chat/completions", {"model": model, "messages": messages, "max_tokens": 12} | extra))
                messages = [*messages, {"role": "assistant", "content": f"answer {turn}"}]
            else:
                turns.append(("/v1/completions", {"model": model, "prompt": f"{system}\n{question}",
                                                  "max_tokens": 12} | extra))
        sessions.append(turns)
    return sessions


async def run_workload(gateway: str, users: int) -> int:
    """Each user's requests in order, users concurrently; returns the number of failed requests."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        async with session.get(gateway + "/v1/models") as resp:
            model = (await resp.json())["data"][0]["id"]

        async def user_session(turns: list[tuple[str, dict[str, Any]]]) -> int:
            failures = 0
            for path, body in turns:
                reply = await ask(session, gateway + path, body)
                failures += reply.status != 200
            return failures

        return sum(await asyncio.gather(*(user_session(t) for t in workload(model, users))))


def summarise(records: list[dict[str, Any]]) -> str:
    """Where requests went and why: per request, then totals."""
    header = (f"{'#':>3} {'request':<10} {'endpoint':<8} {'tier':<12} {'decision':<20} {'preferred':<9} "
              f"{'predicted':>9} {'cached':>6} {'ttfb ms':>7}")
    lines = [header, "-" * len(header)]
    for i, r in enumerate(records, 1):
        kind = ("chat" if "chat" in str(r.get("path")) else "cmpl") + ("/sse" if r.get("stream") else "")
        lines.append(f"{i:>3} {kind:<10} {str(r.get('endpoint')):<8} {str(r.get('tier') or '-'):<12} "
                     f"{str(r.get('decision') or '-'):<20} {str(r.get('preferred_endpoint') or '-'):<9} "
                     f"{_num(r.get('predicted_cached_tokens')):>9} {_num(r.get('cached_tokens')):>6} "
                     f"{_num(r.get('ttfb_ms')):>7}")
    with_pref = [r for r in records if r.get("preferred_endpoint")]
    honoured = sum(r["preferred_endpoint"] == r.get("endpoint") for r in with_pref)
    predicted = sum(r.get("predicted_cached_tokens") or 0 for r in records)
    actual = sum(r.get("cached_tokens") or 0 for r in records)
    prompt = sum(r.get("prompt_tokens") or 0 for r in records)
    lines += ["", f"requests by endpoint: {dict(Counter(str(r.get('endpoint')) for r in records))}",
              f"requests by tier:     {dict(Counter(str(r.get('tier')) for r in records))}",
              f"decisions:            {dict(Counter(str(r.get('decision')) for r in records))}",
              f"preferred endpoint honoured: {honoured}/{len(with_pref)}",
              f"cached tokens: predicted {predicted}, actual {actual} of {prompt} prompt tokens"
              + (f" ({actual / prompt:.0%} of prefill skipped)" if prompt else "")]
    return "\n".join(lines)


def _num(value: Any) -> str:
    return "-" if value is None else str(round(value) if isinstance(value, float) else value)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="kvgate demo", description=__doc__.splitlines()[0])
    parser.add_argument("--no-sim", action="store_true", help="run without the simulated vLLM backend")
    parser.add_argument("--users", type=int, default=6)
    parser.add_argument("--keep", type=Path, help="work dir to keep (logs, access log); default: a temp dir")
    args = parser.parse_args(list(argv))
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="kvgate-demo-"))
    demo = Demo(workdir, with_sim=not args.no_sim)
    with sigterm_unwinds():
        try:
            demo.start()
            failures = asyncio.run(run_workload(demo.url("gateway"), args.users))
        except (RuntimeError, TimeoutError) as exc:
            print(f"demo: the stack failed to start: {exc}")
            return 1
        finally:
            demo.stop()
    log = workdir / "logs" / "access.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    records = [r for r in records if str(r.get("path", "")).endswith("completions")]
    print(summarise(records))
    print(f"\ndemo: {len(records)} requests logged, {failures} failed; logs in {workdir / 'logs'}")
    return 0 if failures == 0 and records else 1
