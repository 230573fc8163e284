"""A real `bbx serve` for the Python tests: a fresh data directory and a free port."""

import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def bbx_binary() -> str:
    explicit = os.environ.get("BBX_BIN")
    if explicit:
        return explicit
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    return str(target / "debug" / "bbx")


class RunningKernel:
    def __init__(self) -> None:
        self.dir = tempfile.TemporaryDirectory()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [bbx_binary(), "serve", "--listen", f"127.0.0.1:{self.port}", "--data-dir", self.dir.name],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"bbx serve exited: {self.process.stderr.read().decode()}")
                time.sleep(0.02)
        else:
            raise RuntimeError("bbx serve did not become ready")
        self.key = (Path(self.dir.name) / "admin.key").read_text().strip()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.dir.cleanup()


@pytest.fixture
def kernel():
    running = RunningKernel()
    yield running
    running.stop()


@pytest.fixture
def anyio_backend():
    return "asyncio"
