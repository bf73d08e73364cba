"""Run an example shop for real: its ``serve.sh`` in a process group, on a free port.

Shared by the examples' own tests (examples/*/tests) and by idempay's tests of the examples.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ExampleServer:
    """``examples/<name>/serve.sh 127.0.0.1 PORT WORKERS`` with the given environment."""

    def __init__(self, name: str, env: Mapping[str, str], *, workers: int = 1) -> None:
        self.script = ROOT / "examples" / name / "serve.sh"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers = workers
        self.env = {**os.environ, "PYTHON": sys.executable, **env}
        self.process: subprocess.Popen[bytes] | None = None
        # A file, not a pipe: a chatty server must never block on a full pipe.
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()

    def start(self, *, timeout: float = 60) -> None:
        self.process = subprocess.Popen(
            [str(self.script), "127.0.0.1", str(self.port), str(self.workers)],
            env=self.env,
            cwd=self.script.parent,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                raise RuntimeError(f"{self.script} exited with {code}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)  # polling a starting server; no ordering between tests rests on it
        output = self.output()
        self.stop()
        raise RuntimeError(f"{self.script} did not answer within {timeout} s:\n{output}")

    def stop(self) -> None:
        """SIGTERM to the script's PID (serve.sh execs the server), then to the group."""
        if self.process is None:
            return
        process, self.process = self.process, None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)

    def output(self) -> str:
        """What the server printed so far."""
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def close(self) -> None:
        self.stop()
        self.log.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def list_all(api: httpx.Client, path: str) -> list[dict[str, Any]]:
    """Every object of a Stripe list endpoint (``/v1/payment_intents``...), page after page."""
    found: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 100}
    while True:
        page = api.get(path, params=params).json()
        found.extend(page["data"])
        if not page.get("has_more") or not page["data"]:
            return found
        params["starting_after"] = page["data"][-1]["id"]
