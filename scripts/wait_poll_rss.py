#!/usr/bin/env python3
"""Measures how the kernel's memory grows under long polls that time out.

Starts `bbx serve` (the binary given, default target/release/bbx) on a scratch data
directory, submits one `sleep` op that runs for ten minutes, and polls
`/v1/ops/ID/wait?timeout_ms=1` on it: a warm-up, then `--polls` more from four
keep-alive connections. Prints JSON with the kernel's RSS after the warm-up and at the
end. A waiter left behind by each timed-out poll would show as growth.

    python3 scripts/wait_poll_rss.py [--bbx target/release/bbx] [--polls 200000]
"""

import argparse
import http.client
import json
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def call(conn, method, path, key, body=None):
    headers = {"Authorization": f"Bearer {key}"}
    if body is not None:
        headers["Content-Type"] = "application/json"
        body = json.dumps(body)
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    data = response.read()
    if response.status >= 300:
        raise RuntimeError(f"{method} {path}: {response.status} {data!r}")
    return json.loads(data) if data else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bbx", default="target/release/bbx")
    parser.add_argument("--polls", type=int, default=200_000)
    parser.add_argument("--warmup", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        kernel = subprocess.Popen(
            [args.bbx, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", data],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            key_file = Path(data) / "admin.key"
            for _ in range(500):
                if key_file.exists():
                    break
                time.sleep(0.02)
            key = key_file.read_text().strip()
            conn = http.client.HTTPConnection("127.0.0.1", port)
            for _ in range(500):
                try:
                    call(conn, "GET", "/readyz", key)
                    break
                except (OSError, RuntimeError):
                    conn = http.client.HTTPConnection("127.0.0.1", port)
                    time.sleep(0.02)
            agent = call(conn, "POST", "/v1/agents", key, {"name": "poller"})["id"]
            op = {"agent": agent, "kind": "sleep", "args": {"ms": 600_000}, "timeout_ms": 700_000}
            op_id = call(conn, "POST", "/v1/ops", key, {"ops": [op]})["ops"][0]["op_id"]
            path = f"/v1/ops/{op_id}/wait?timeout_ms=1"

            def poll(count: int) -> None:
                c = http.client.HTTPConnection("127.0.0.1", port)
                for _ in range(count):
                    state = call(c, "GET", path, key)["state"]
                    assert state != "done", state

            def run(total: int) -> float:
                started = time.monotonic()
                threads = [threading.Thread(target=poll, args=(total // 4,)) for _ in range(4)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                return time.monotonic() - started

            run(args.warmup)
            before = rss_kb(kernel.pid)
            took = run(args.polls)
            after = rss_kb(kernel.pid)
            print(json.dumps({
                "polls": args.polls // 4 * 4,
                "polls_per_sec": round(args.polls / took),
                "rss_after_warmup_kb": before,
                "rss_after_polls_kb": after,
                "growth_kb": after - before,
            }))
        finally:
            kernel.terminate()
            kernel.wait(timeout=30)


if __name__ == "__main__":
    main()
