"""Helpers for tests and benchmarks: a seeded tiny transformers encoder, a target that counts, and
modules of s3prl's source imported without its package.

A tiny HuBERT or WavLM built from a config with seeded random weights runs the real transformers
code path offline, in milliseconds; its representations mean nothing, which suits plumbing tests and
benchmarks of what cannot be learned, not demos.
"""

from __future__ import annotations

import asyncio
import glob
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
import types
from pathlib import Path

import numpy as np
import torch

from speechmimic.targets import Target

S3PRL_SDIST_ENV = "SPEECHMIMIC_S3PRL_SDIST"


def s3prl_sdist() -> Path | None:
    """s3prl's sdist: ``$SPEECHMIMIC_S3PRL_SDIST``, or the one ``make setup`` downloads into the
    environment's ``sdists/``; None if neither exists."""
    given = os.environ.get(S3PRL_SDIST_ENV)
    found = sorted(glob.glob(str(Path(sys.prefix) / "sdists" / "s3prl-*.tar.gz")))
    path = Path(given) if given else (Path(found[-1]) if found else None)
    return path if path is not None and path.exists() else None


def unpack_s3prl(sdist: Path, into: Path, files: list[str]) -> None:
    """Extract ``files`` (paths under ``s3prl/``) of the sdist into ``into`` and register each of
    their folders in ``sys.modules`` as an empty package, so ``s3prl.x.y`` modules import without
    ``s3prl/__init__.py`` (which imports torchaudio) ever running. The caller restores sys.modules."""
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = member.name.split("/", 1)[-1]  # drop the sdist's top folder
            if name in files:
                member.name = name
                tar.extract(member, into, filter="data")
    for file in files:
        parts = Path(file).parent.parts
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name not in sys.modules:
                package = types.ModuleType(name)
                package.__path__ = [str(into.joinpath(*parts[:i]))]
                sys.modules[name] = package


# (kernel, stride) of the wav2vec 2.0 / HuBERT feature encoder: 320x, 50 Hz frames.
STANDARD_CONV = ((10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2))


def tiny_hf_model(
    path: str | Path,
    kind: str = "hubert",
    width: int = 32,
    heads: int = 2,
    conv: tuple[tuple[int, int], ...] = STANDARD_CONV,
    seed: int = 0,
    **overrides,
) -> Path:
    """Save a seeded 2-layer ``hubert`` or ``wavlm`` of ``width`` to ``path`` (``save_pretrained``);
    ``overrides`` go to its config (e.g. ``feat_extract_norm="layer"``)."""
    import transformers

    config = dict(
        hidden_size=width,
        num_hidden_layers=2,
        num_attention_heads=heads,
        intermediate_size=2 * width,
        conv_dim=(width,) * len(conv),
        conv_kernel=tuple(k for k, _ in conv),
        conv_stride=tuple(s for _, s in conv),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=heads,
    )
    torch.manual_seed(seed)
    if kind == "hubert":
        model = transformers.HubertModel(transformers.HubertConfig(**config, **overrides))
    elif kind == "wavlm":
        wavlm = dict(num_buckets=16, max_bucket_distance=64)
        model = transformers.WavLMModel(transformers.WavLMConfig(**config, **wavlm, **overrides))
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose hubert or wavlm")
    model.save_pretrained(path)
    return Path(path)


class CountingTarget:
    """A :class:`~speechmimic.targets.Target` that forwards to ``inner`` and counts what it is asked:
    ``calls`` (requests) and ``clips``."""

    def __init__(self, inner: Target):
        self.inner = inner
        self.spec = inner.spec
        self.frame_rate = inner.frame_rate
        self.layers = list(inner.layers)
        self.padding = inner.padding
        self.min_samples = inner.min_samples
        self.calls = 0
        self.clips = 0

    def __call__(self, wavs: list[np.ndarray], keys: list[str] | None = None) -> list[dict[str, np.ndarray]]:
        self.calls += 1
        self.clips += len(wavs)
        return self.inner(wavs, keys=keys)


HOSTILE_KINDS = ("idle", "slow-header", "slow-body")


class HostileClients:
    """Keyless clients holding connections to a server without finishing a request, for tests and
    benchmarks on loopback. ``idle`` ones send nothing; ``slow-header`` ones send a request's headers a
    byte every ``interval`` s; ``slow-body`` ones send whole headers announcing a 1 MB body, then a
    byte of it every ``interval`` s. ``n`` connections are held, spread over ``kinds``: one the server
    closes is opened again at once, until :meth:`stop` or ``seconds``. For each closed connection the
    time the server kept it is recorded. Runs on an event loop in a thread of its own."""

    def __init__(self, host: str, port: int, n: int, kinds=HOSTILE_KINDS, interval: float = 1.0,
                 seconds: float = 60.0):  # fmt: skip
        self.host, self.port, self.n, self.kinds = host, port, n, tuple(kinds)
        self.interval, self.seconds = interval, seconds
        self.lifetimes: list[float] = []  # seconds each connection lived before the server closed it
        self.opened = self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> HostileClients:
        self._thread.start()
        return self

    def stop(self) -> dict:
        """Stop, and what happened: connections opened, closed by the server, failed to open, and the
        lifetimes of those the server closed (max and 99th percentile)."""
        self._stop.set()
        self._thread.join(timeout=self.seconds + 30)
        life = sorted(self.lifetimes)
        return {
            "opened": self.opened,
            "closed_by_server": len(life),
            "failed_to_open": self.failed,
            "max_lifetime": round(life[-1], 3) if life else None,
            "p99_lifetime": round(life[int(0.99 * (len(life) - 1))], 3) if life else None,
        }

    def _run(self) -> None:
        asyncio.run(self._hold_all())

    async def _hold_all(self) -> None:
        deadline = time.monotonic() + self.seconds
        workers = [self._hold(self.kinds[i % len(self.kinds)], deadline) for i in range(self.n)]
        await asyncio.gather(*workers)

    async def _hold(self, kind: str, deadline: float) -> None:
        head = f"POST /v1/embed HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: audio/wav\r\n"
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), 5)
            except (OSError, asyncio.TimeoutError):
                self.failed += 1
                await asyncio.sleep(0.1)
                continue
            self.opened += 1
            t0 = time.monotonic()
            pending = {
                "idle": b"",
                "slow-header": (head + "X-Padding: " + "a" * 64).encode(),
                "slow-body": b"",
            }[kind]
            if kind == "slow-body":
                writer.write((head + "Content-Length: 1000000\r\n\r\n").encode())
                pending = b"\0" * 1_000_000
            closed = False
            try:
                while not self._stop.is_set() and time.monotonic() < deadline:
                    if pending:
                        writer.write(pending[:1])
                        pending = pending[1:]
                    try:
                        if await asyncio.wait_for(reader.read(65536), self.interval) == b"":
                            closed = True
                            break
                    except asyncio.TimeoutError:
                        pass
            except OSError:  # reset by the server
                closed = True
            if closed:
                self.lifetimes.append(time.monotonic() - t0)
            writer.close()


class NginxProxy:
    """``deploy/nginx.conf`` run by the system's nginx on a free loopback port in front of a server on
    ``upstream_port``, for tests and benchmarks: its pid file, logs and temporary files in ``root``;
    ``settings`` replace directives of the file (e.g. ``{"client_header_timeout": "2s"}``)."""

    def __init__(self, conf: Path, root: Path, upstream_port: int, settings: dict[str, str] | None = None):
        self.binary = shutil.which("nginx")
        if self.binary is None:
            raise FileNotFoundError("nginx is not installed (apt-get install nginx)")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        with socket.socket() as s:  # a free port (nginx binds it a moment later)
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        text = Path(conf).read_text()
        text = text.replace("server 127.0.0.1:8000;", f"server 127.0.0.1:{upstream_port};")
        text = text.replace("listen 127.0.0.1:8080;", f"listen 127.0.0.1:{self.port};")
        text = text.replace("pid /run/speechmimic-nginx.pid;", f"pid {self.root / 'nginx.pid'};")
        text = text.replace(
            "error_log /var/log/nginx/speechmimic.error.log warn;",
            f"error_log {self.root / 'error.log'} warn;",
        )
        for name, value in (settings or {}).items():
            text, n = re.subn(rf"(?m)^(\s*){name} [^;]*;", rf"\g<1>{name} {value};", text)
            if not n:
                raise ValueError(f"deploy/nginx.conf has no directive {name}")
        temp = "".join(
            f"    {kind}_temp_path {self.root / kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        text = text.replace("http {\n", "http {\n" + temp, 1)
        if os.geteuid() == 0:  # workers would run as nobody, who cannot write into root's folders
            text = "user root;\n" + text
        self.conf = self.root / "nginx.conf"
        self.conf.write_text(text)
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def __enter__(self) -> NginxProxy:
        self.proc = subprocess.Popen(
            [self.binary, "-p", str(self.root), "-c", str(self.conf), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL, stderr=open(self.root / "stderr.log", "wb"),
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"nginx exited: {(self.root / 'stderr.log').read_text()}") from None
                time.sleep(0.05)
        raise RuntimeError("nginx did not start listening within 30 s")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
