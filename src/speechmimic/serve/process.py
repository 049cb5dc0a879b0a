"""A ``speechmimic serve`` process on a loopback port, started and stopped from Python: for the demo
over the wire, the serving benchmark and the API tests.

The server runs as its own process, so it can be SIGKILLed and restarted on the same port and
database; keys are made in its SQLite file with the key store the ``keys`` command uses. It runs
with as many torch threads as the caller (``threads``), because the same threads give bit-identical
answers to an in-process call.
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from speechmimic.serve.keys import Key, KeyStore

START_TIMEOUT = 90.0


class ServerProcess:
    """``speechmimic serve --target TARGET FLAGS`` with its database and logs in ``root``. ``port=None``
    lets the OS pick a free port on the first start; restarts keep it."""

    def __init__(
        self,
        root: Path,
        target: str,
        *flags: str,
        port: int | None = None,
        threads: int | None = None,
        nofile: int | None = None,
    ):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.db = self.root / "serve.sqlite"
        self.target = target
        self.flags = flags
        self.port = port
        self.threads = threads
        self.nofile = nofile  # the server's descriptor limit (ulimit -n), if set
        self.url: str | None = None
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.metrics_token = secrets.token_urlsafe(16)  # through the environment, as a user should

    def start(self) -> ServerProcess:
        ready = self.root / "ready.json"
        ready.unlink(missing_ok=True)
        self.starts += 1
        if self.threads is None:
            import torch

            self.threads = torch.get_num_threads()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "SPEECHMIMIC_SERVE_METRICS_TOKEN": self.metrics_token}
        with open(self.root / f"server-{self.starts}.log", "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "speechmimic", "serve", "--target", self.target, "--db", str(self.db),
                 "--host", "127.0.0.1", "--port", str(self.port or 0), "--ready-file", str(ready),
                 "--threads", str(self.threads), *self.flags],
                stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=self._limits,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log()[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"server not ready within {START_TIMEOUT} s: {self.log()[-3000:]}")
            time.sleep(0.05)
        self.url = json.loads(ready.read_text())["url"]
        self.port = int(self.url.rsplit(":", 1)[1])
        return self

    def _limits(self) -> None:
        if self.nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def metrics(self) -> str:
        """The server's Prometheus metrics (with its metrics token)."""
        import httpx

        headers = {"Authorization": f"Bearer {self.metrics_token}"}
        return httpx.get(self.url + "/metrics", headers=headers, timeout=30).raise_for_status().text

    def log(self) -> str:
        return (self.root / f"server-{self.starts}.log").read_text(errors="replace")

    def key(self, name: str, **limits) -> str:
        """A new API key ``name`` with ``limits`` (see :data:`~speechmimic.serve.keys.LIMITS`)."""
        with self._store() as store:
            return store.create(name, **limits)[1]

    def usage(self, name: str) -> Key:
        with self._store() as store:
            return store.find(name)

    def keys(self) -> list[Key]:
        with self._store() as store:
            return store.list()

    @contextmanager
    def _store(self):
        store = KeyStore(self.db)
        try:
            yield store
        finally:
            store.close()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM (uvicorn finishes the requests in flight), SIGKILL if it does not end in 30 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
