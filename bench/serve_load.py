"""Load benchmark of serve.py: many concurrent chat clients against one real server on loopback.

    python bench/serve_load.py [--model OUT/step1_sft/final] [--clients 32 --requests 3 --max_tokens 16]
                               [--max_queue 8] [--out bench/results/serve_load.json]

serve.py runs in a child process (its own interpreter, as in production, so the client threads do not share
its GIL) on a free loopback port. Without --model an untrained nano model with the tests' chat tokenizer is
built in a temp dir: the figures then measure the server (worker queue, 429s, HTTP), and every reply runs to
max_tokens. All clients start together; each sends its requests one after another (plain completions).

Reported (printed and written as JSON): p50/p95 latency of answered requests, the share refused with 429
(the bounded queue), generated tokens per second of wall time, and any request lost (transport error or
another status), which should be none. tests/test_serve.py runs the same load through run_load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make the repo's packages (and tests.helpers) importable
    sys.path.insert(0, str(REPO))

URL = "/v1/chat/completions"
MESSAGES = [{"role": "system", "content": "你是一个助手"}, {"role": "user", "content": "评价一下这家酒店。"}]


@dataclass
class Outcome:
    """One request as its client saw it: status 0 means no HTTP answer (the error says why)."""

    status: int
    seconds: float
    tokens: int = 0  # completion tokens of an answered request
    error: str = ""


def one_client(base_url: str, body: dict, n: int, start: threading.Barrier, timeout: float) -> list[Outcome]:
    """n requests in a row over one connection, after every client is ready (so they all arrive at once)."""
    outcomes = []
    with httpx.Client(base_url=base_url, timeout=timeout) as http:
        start.wait()
        for _ in range(n):
            began = time.perf_counter()
            try:
                response = http.post(URL, json=body)
            except httpx.HTTPError as err:  # a lost request: recorded, so the caller sees it
                outcomes.append(Outcome(0, time.perf_counter() - began, error=repr(err)))
                continue
            seconds = time.perf_counter() - began
            tokens = response.json()["usage"]["completion_tokens"] if response.status_code == 200 else 0
            outcomes.append(Outcome(response.status_code, seconds, tokens))
    return outcomes


def run_load(base_url: str, clients: int, requests: int, body: dict,
             timeout: float = 60.0) -> tuple[list[Outcome], float]:
    """Every client's outcomes, and the wall time from the common start to the last answer."""
    start = threading.Barrier(clients + 1)
    with ThreadPoolExecutor(max_workers=clients) as pool:
        futures = [pool.submit(one_client, base_url, body, requests, start, timeout) for _ in range(clients)]
        start.wait()
        began = time.perf_counter()
        outcomes = [o for f in futures for o in f.result()]
    return outcomes, time.perf_counter() - began


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None without values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summarize(outcomes: list[Outcome], wall: float) -> dict:
    """The reported figures; latencies are of answered (200) requests only, since a 429 is immediate."""
    answered = [o for o in outcomes if o.status == 200]
    statuses = Counter(o.status for o in outcomes)
    latencies = [o.seconds for o in answered]
    tokens = sum(o.tokens for o in answered)
    return {
        "requests": len(outcomes), "answered": len(answered), "refused_429": statuses[429],
        "refused_share": round(statuses[429] / len(outcomes), 4) if outcomes else None,
        "lost": len(outcomes) - len(answered) - statuses[429],
        "latency_p50_s": percentile(latencies, 50), "latency_p95_s": percentile(latencies, 95),
        "generated_tokens": tokens, "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
    }


def cpu_model() -> str:
    """The CPU's name from /proc/cpuinfo (where there is one), to say what the figures were measured on."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "unknown"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")


def build_nano_model(root: Path) -> Path:
    """An untrained nano causal LM with the tests' chat tokenizer, exported as a step's final/ dir."""
    # the load client imports no torch; only this set-up does
    from testkit.chat_tokenizer import make_chat_tokenizer
    from utils.model import create_causal_lm

    out = root / "final"
    tokenizer = make_chat_tokenizer(root / "tokenizer")
    create_causal_lm("nano", len(tokenizer), 1024, seed=0).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve(model: Path, max_queue: int, log_path: Path, timeout: float = 180.0) -> Iterator[str]:
    """serve.py in a child process, yielding its base URL once /v1/models answers; stopped on exit."""
    port = free_port()
    cmd = [sys.executable, str(REPO / "step1_pretrain_sft" / "serve.py"), "--model", str(model),
           "--port", str(port), "--max_queue", str(max_queue)]
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log, subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT) as proc:
        try:
            wait_ready(base, proc, log_path, timeout)
            yield base
        finally:
            proc.terminate()
            proc.wait(30)


def wait_ready(base: str, proc: subprocess.Popen, log_path: Path, timeout: float) -> None:
    """Poll until the server answers, failing with its log if it exits or takes longer than `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve.py exited with {proc.returncode}:\n{log_path.read_text()[-2000:]}")
        try:
            if httpx.get(base + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(0.2)
    raise RuntimeError(f"serve.py did not answer within {timeout:.0f} s:\n{log_path.read_text()[-2000:]}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/serve_load.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="", help="exported model dir; default: a fresh untrained nano model")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=3, help="requests each client sends, one after another")
    parser.add_argument("--max_tokens", type=int, default=16, help="max_tokens of every request")
    parser.add_argument("--max_queue", type=int, default=8, help="serve.py --max_queue (waiting requests)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "serve_load.json"),
                        help="JSON file for the figures")
    args = parser.parse_args(argv)
    for name in ("clients", "requests", "max_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_queue < 0:
        parser.error(f"--max_queue must be >= 0, got {args.max_queue}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    body = {"messages": MESSAGES, "max_tokens": args.max_tokens}
    with tempfile.TemporaryDirectory(prefix="serve_load-") as tmp:
        model = Path(args.model) if args.model else build_nano_model(Path(tmp))
        with serve(model, args.max_queue, Path(tmp) / "serve.log") as base:
            outcomes, wall = run_load(base, args.clients, args.requests, body)
            models_status = httpx.get(base + "/v1/models", timeout=10).status_code
    result = {"clients": args.clients, "requests_per_client": args.requests, "max_tokens": args.max_tokens,
              "max_queue": args.max_queue, "model": args.model or "untrained nano (built by the benchmark)",
              **summarize(outcomes, wall), "models_status_after": models_status, "cpu": cpu_model(),
              "cpu_count": len(os.sched_getaffinity(0))}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return result


if __name__ == "__main__":
    main()
