"""A real ``speechmimic serve`` process on a loopback port, for the API tests (2 torch threads, as the
tests use in-process: the same threads give bit-identical answers).

The server runs as its own process (so it can be SIGKILLed and restarted on the same port and
database); keys are made in its SQLite file with the key store the ``keys`` command uses.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from speechmimic.serve.keys import KeyStore

START_TIMEOUT = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, root: Path, target: str, *flags: str, port: int | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.db = self.root / "serve.sqlite"
        self.target = target
        self.flags = flags
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> Server:
        ready = self.root / "ready.json"
        ready.unlink(missing_ok=True)
        self.starts += 1
        log = open(self.root / f"server-{self.starts}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "speechmimic", "serve", "--target", self.target, "--db", str(self.db),
             "--host", "127.0.0.1", "--port", str(self.port), "--ready-file", str(ready), "--threads", "2",
             *self.flags],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log()[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"server not ready within {START_TIMEOUT} s: {self.log()[-3000:]}")
            time.sleep(0.05)
        assert json.loads(ready.read_text())["url"] == self.url
        return self

    def log(self) -> str:
        return (self.root / f"server-{self.starts}.log").read_text(errors="replace")

    def key(self, name: str, **limits) -> str:
        store = KeyStore(self.db)
        try:
            return store.create(name, **limits)[1]
        finally:
            store.close()

    def usage(self, name: str):
        store = KeyStore(self.db)
        try:
            return store.find(name)
        finally:
            store.close()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill(signal.SIGTERM)
