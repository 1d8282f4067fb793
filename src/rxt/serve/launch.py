"""Start `rxt serve` as a child process on a loopback port and wait until it answers.

    with ServerProcess(model_dir, store="sqlite:///tmp/s.db") as server:
        ...  # server.url is http://127.0.0.1:PORT

Used by `rxt bench serve --spawn-model` and by the tests (which also SIGKILL it on purpose).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ServerProcess:
    def __init__(self, model_dir: str | Path, store: str, port: int | None = None, args: Sequence[str] = (),
                 env: dict[str, str] | None = None, log_path: str | Path | None = None, host: str = "127.0.0.1"):
        self.model_dir, self.store, self.host = str(model_dir), store, host
        self.port = port or free_port(host)
        self.args, self.env = list(args), env or {}
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="rxt-serve-", suffix=".log")[1])
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 60.0) -> ServerProcess:
        command = [sys.executable, "-m", "rxt.cli", "serve", "--model", self.model_dir, "--store", self.store,
                   "--host", self.host, "--port", str(self.port), "--log-level", "warning", *self.args]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, **self.env})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"rxt serve exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.health() is not None:
                return self
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"rxt serve did not answer within {timeout_s} s:\n{self.log_tail()}")

    def health(self) -> int | None:
        """The /health status code, or None if nothing answers yet."""
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code
        except (urllib.error.URLError, OSError):
            return None

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def stop(self, timeout_s: float = 30.0) -> None:
        """Graceful: SIGTERM lets turns in flight write their memory first."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL: no chance to clean up (crash tests)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(10)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
