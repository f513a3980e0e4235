"""Load test of `medlora serve` on loopback: N requests from C concurrent clients, streaming and not, base and adapter.

    python bench/load_server.py                        # 500 requests, 32 clients, tiny-qwen2 + a quick adapter
    python bench/load_server.py --requests 100 --clients 8 --base_model tiny-qwen2 --lora_weights DIR

Starts the server itself on 127.0.0.1 (a free port), waits for it, runs the requests once, samples the server's
RSS every 0.2 s, stops the server, and prints a markdown table (latency p50/p90/p99/max, throughput, memory).
Exits 1 if any request failed: a non-200 answer, a transport error, or a stream without its `[DONE]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

QUESTIONS = ["感冒的常见症状是什么？", "高血压应该去哪个科室？", "糖尿病的典型症状有哪些？", "肺结核的病原体是什么？",
             "缺铁性贫血常用什么药？", "哮喘发作时首选什么药物？", "乙肝的主要传播途径？", "痛风急性发作常用什么药？"]


@dataclass
class Result:
    kind: str  # "stream" or "plain"
    ok: bool
    seconds: float
    first_token: float | None = None
    tokens: int = 0
    error: str = ""


@dataclass
class MemorySampler:
    pid: int
    samples: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, RSS MB)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self):
        import psutil

        process, started = psutil.Process(self.pid), time.monotonic()

        def sample():
            while not self._stop.is_set():
                self.samples.append((time.monotonic() - started, process.memory_info().rss / 2**20))
                self._stop.wait(0.2)
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_adapter(folder: Path) -> Path:
    """A small LoRA adapter on tiny-qwen2 (seeded, untrained), saved as finetune saves one."""
    import torch

    from medlora.modeling import attach_lora, load_base_model, load_tokenizer, model_fingerprint
    from medlora.templates import load_template
    from medlora.train import save_adapter

    model = attach_lora(load_base_model("tiny-qwen2", "fp32", device="cpu"), r=4, alpha=8, dropout=0.0,
                        target_modules="q_proj,v_proj")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    meta = {"base_model": "tiny-qwen2", "base_fingerprint": model_fingerprint(model.get_base_model().config),
            "template": load_template("med_template").to_dict()}
    return save_adapter(model, load_tokenizer("tiny-qwen2"), folder, meta)


def start_server(base_model: str, adapter: Path, port: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "medlora.cli", "serve", "--base_model", base_model, "--lora_weights",
               f"tuned={adapter}", "--host", "127.0.0.1", "--port", str(port), "--dtype", "fp32"]
    # No key (loopback only): MEDLORA_API_KEY unset, as the server refuses an empty key rather than serve open.
    env = {k: v for k, v in os.environ.items() if k != "MEDLORA_API_KEY"}
    with log.open("w") as handle:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)


async def wait_until_up(client, url: str, proc: subprocess.Popen, log: Path, seconds: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"medlora serve exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if (await client.get(f"{url}/health")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.5)
    raise SystemExit(f"medlora serve did not come up in {seconds:.0f} s")


def request_body(rng: random.Random, max_tokens: int) -> tuple[str, dict, bool]:
    stream, chat = rng.random() < 0.5, rng.random() < 0.7
    model = rng.choice(["tuned", "base"])
    tokens = rng.choice([max(1, max_tokens // 2), max_tokens])  # a few settings, as real clients: batches form
    question = f"{rng.choice(QUESTIONS)}（第{rng.randint(1, 999)}例）"
    if chat:
        body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": tokens}
    else:
        body = {"model": model, "prompt": question, "max_tokens": tokens}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return ("/v1/chat/completions" if chat else "/v1/completions"), body, stream


async def one_request(client, url: str, path: str, body: dict, stream: bool) -> Result:
    started = time.perf_counter()
    kind = "stream" if stream else "plain"
    try:
        if not stream:
            response = await client.post(f"{url}{path}", json=body)
            if response.status_code != 200:
                return Result(kind, False, time.perf_counter() - started, error=f"{response.status_code}")
            return Result(kind, True, time.perf_counter() - started,
                          tokens=response.json()["usage"]["completion_tokens"])
        first, done, tokens = None, False, 0
        async with client.stream("POST", f"{url}{path}", json=body) as response:
            if response.status_code != 200:
                return Result(kind, False, time.perf_counter() - started, error=f"{response.status_code}")
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    continue
                event = json.loads(data)
                if "error" in event:
                    return Result(kind, False, time.perf_counter() - started, error=event["error"]["message"])
                choices = event.get("choices") or [{}]
                if choices[0].get("text") or (choices[0].get("delta") or {}).get("content"):
                    first = first or time.perf_counter() - started
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
        return Result(kind, done, time.perf_counter() - started, first, tokens, "" if done else "no [DONE]")
    except Exception as exc:  # a transport error is a failed request, counted, not a crash of the bench
        return Result(kind, False, time.perf_counter() - started, error=f"{type(exc).__name__}: {exc}")


async def run_load(url: str, n_requests: int, n_clients: int, max_tokens: int, seed: int) -> tuple[list, float]:
    import httpx

    rng = random.Random(seed)
    plan = [request_body(rng, max_tokens) for _ in range(n_requests)]
    queue: asyncio.Queue = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)
    results: list[Result] = []
    limits = httpx.Limits(max_connections=n_clients, max_keepalive_connections=n_clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        async def worker():
            while not queue.empty():
                path, body, stream = queue.get_nowait()
                results.append(await one_request(client, url, path, body, stream))
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(n_clients)))
        return results, time.perf_counter() - started


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": ordered[-1]}


def report(results: list[Result], wall: float, memory: MemorySampler, args, warm_rss: float,
           wave_rss: list[tuple[float, float]]) -> str:
    failed = [r for r in results if not r.ok]
    lines = [f"{len(results)} requests ({args.waves} × {args.requests}) from {args.clients} concurrent clients on "
             f"127.0.0.1 "
             f"({sum(r.kind == 'stream' for r in results)} streaming), {args.base_model} + adapter, "
             f"max_tokens {max(1, args.max_tokens // 2)} or {args.max_tokens}; CPU, {os.cpu_count()} cores", "",
             "| requests | n | failed | p50 s | p90 s | p99 s | max s | first token p50 s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for kind in ("plain", "stream", "all"):
        chosen = [r for r in results if kind in ("all", r.kind)]
        if not chosen:
            continue
        p = percentiles([r.seconds for r in chosen])
        firsts = [r.first_token for r in chosen if r.first_token is not None]
        first = f"{statistics.median(firsts):.2f}" if firsts else "-"
        lines.append(f"| {kind} | {len(chosen)} | {sum(not r.ok for r in chosen)} | {p['p50']:.2f} | {p['p90']:.2f} "
                     f"| {p['p99']:.2f} | {p['max']:.2f} | {first} |")
    rss = [mb for _, mb in memory.samples]
    tokens = sum(r.tokens for r in results)
    lines += ["", "| throughput and memory | value |", "|---|---|",
              f"| wall time | {wall:.1f} s |",
              f"| throughput | {len(results) / wall:.1f} requests/s, {tokens / wall:.0f} generated tokens/s |",
              f"| server RSS after warm-up | {warm_rss:.0f} MB |",
              f"| server RSS during the run | min {min(rss):.0f} MB, max {max(rss):.0f} MB, "
              f"at the end {rss[-1]:.0f} MB ({len(rss)} samples) |"]
    if len(wave_rss) > 1:
        lines.append(f"| server RSS (wall time) after each wave of {args.requests} | "
                     + ", ".join(f"{mb:.0f} MB ({s:.0f} s)" for mb, s in wave_rss) + " |")
    if failed:
        lines += ["", f"FAILED: {len(failed)}; first: {failed[0].error}"]
    return "\n".join(lines)


async def main_async(args) -> int:
    import httpx
    import psutil

    with tempfile.TemporaryDirectory(prefix="medlora-load-") as folder:
        adapter = Path(args.lora_weights) if args.lora_weights else make_adapter(Path(folder) / "tuned")
        port, log = free_port(), Path(folder) / "server.log"
        url = f"http://127.0.0.1:{port}"
        proc = start_server(args.base_model, adapter, port, log)
        try:
            async with httpx.AsyncClient(timeout=120) as client:
                await wait_until_up(client, url, proc, log)
                for model in ("tuned", "base"):  # first requests build per-model state: not part of the figures
                    for stream in (False, True):
                        await one_request(client, url, "/v1/chat/completions",
                                          {"model": model, "messages": [{"role": "user", "content": "你好"}],
                                           "max_tokens": 2, "stream": stream}, stream)
            warm_rss = psutil.Process(proc.pid).memory_info().rss / 2**20
            results, wall, wave_rss = [], 0.0, []
            with MemorySampler(proc.pid) as memory:
                for wave in range(args.waves):  # the same requests again: memory should level off, not climb
                    wave_results, wave_wall = await run_load(url, args.requests, args.clients, args.max_tokens,
                                                             args.seed)
                    results, wall = results + wave_results, wall + wave_wall
                    wave_rss.append((psutil.Process(proc.pid).memory_info().rss / 2**20, wave_wall))
            health = httpx.get(f"{url}/health", timeout=10).json()
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        print(report(results, wall, memory, args, warm_rss, wave_rss))
        print(f"\nserver /health after the run: queue {health['queue']}, served {health['served']}, "
              f"generate calls {health['generate_calls']}")
        if "Traceback" in log.read_text():
            print("the server log holds a traceback:\n" + log.read_text()[-3000:])
            return 1
        return 1 if any(not r.ok for r in results) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max_tokens", type=int, default=32, help="each request asks for half or all of this")
    parser.add_argument("--base_model", default="tiny-qwen2")
    parser.add_argument("--lora_weights", default=None, help="adapter served as `tuned` (default: a quick one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--waves", type=int, default=1, help="run the requests this many times (memory trend)")
    args = parser.parse_args(argv)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
