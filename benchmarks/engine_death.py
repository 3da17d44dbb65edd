"""Time from the engine core's death to the API server's exit.

Starts `pagedserve serve` (the default model unless --model), opens a long stream, SIGKILLs the
engine-core process, and prints the server's exit status, the seconds until it exited, and how
the stream ended (its last events: the engine's error, then [DONE]).

    python benchmarks/engine_death.py                                   # exits with status 1
    python benchmarks/engine_death.py --server-args --keep-alive-on-engine-death  # stays up
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import psutil


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(args: argparse.Namespace) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        "-m",
        "pagedserve.entrypoints.cli",
        "serve",
        *([args.model] if args.model else []),
    ]
    command += ["--host", "127.0.0.1", "--port", str(port), "--max-model-len", "1024", *args.server_args]
    server = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ)
    )
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            if server.poll() is not None:
                raise SystemExit(
                    f"the server exited during start-up with status {server.returncode}"
                ) from None
        time.sleep(0.2)

    events: list[str] = []

    def stream() -> None:
        body = {"prompt": "Once upon a time", "max_tokens": 900, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as response:
                events.extend(line for line in response.iter_lines() if line)
        except httpx.HTTPError as e:
            events.append(f"connection error: {type(e).__name__}")

    reader = threading.Thread(target=stream)
    reader.start()
    while not events:
        time.sleep(0.01)
    engine_core = next(
        p
        for p in psutil.Process(server.pid).children(recursive=True)
        if p.environ().get("PAGEDSERVE_PROCESS_NAME") == "pagedserve-engine-core"
    )
    killed = time.monotonic()
    engine_core.kill()
    try:
        status = server.wait(timeout=args.wait_s)
        print(
            f"server exited with status {status}, {time.monotonic() - killed:.2f} s after the engine core died"
        )
    except subprocess.TimeoutExpired:
        print(f"server still up {args.wait_s:.0f} s after the engine core died; stopping it")
        server.terminate()
        server.wait()
    reader.join(timeout=30)
    print("the stream's last events:", *events[-2:], sep="\n  ")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="checkpoint to serve (default: SmolLM2)")
    parser.add_argument("--wait-s", type=float, default=30.0, help="how long to wait for the server's exit")
    parser.add_argument(
        "--server-args", nargs=argparse.REMAINDER, default=[], help="more `pagedserve serve` flags"
    )
    main(parser.parse_args())
