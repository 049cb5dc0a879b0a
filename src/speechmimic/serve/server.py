"""Running the API: load the target, open the key store, bind a socket of our own, serve with uvicorn.

Binding the socket here (rather than letting uvicorn) makes ``port=0`` usable: the port is known
before serving starts, and ``ready_file`` tells a script where the server listens once it answers.

A defended spec (``target|defence|...``) loads its plain target for the batcher, so the requests of
every key still share batches, and runs the defences per request with the request's key as the
account (:class:`~speechmimic.defences.Chain`), their state in ``defence_state``.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from speechmimic.defences import Chain, parse_chain
from speechmimic.serve.app import create_app
from speechmimic.serve.config import ServeConfig
from speechmimic.serve.keys import KeyStore
from speechmimic.serve.protocol import Guard, auto_max_connections, guarded
from speechmimic.targets import load_backend


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart may reuse the port at once
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run(cfg: ServeConfig) -> None:
    import torch
    import uvicorn

    cfg.check()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    base, defences, _, _ = parse_chain(cfg.target)  # cfg.check refused an account segment
    target = load_backend(base, device=cfg.device)
    chain = Chain(defences, cfg.defence_state_path()) if defences else None
    spec = f"{target.spec}|{chain.spec}" if chain is not None else target.spec
    store = KeyStore(cfg.db)
    sock = bind(cfg.host, cfg.port)
    url = url_of(sock)

    def ready() -> None:
        where = f"keys: {cfg.db}" + (f", defences' state: {chain.store.path}" if chain is not None else "")
        print(f"serving {spec} on {url} ({where})", flush=True)
        if cfg.ready_file:
            path = Path(cfg.ready_file)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps({"url": url, "pid": os.getpid(), "target": spec}))
            os.replace(tmp, path)

    app = create_app(target, store, cfg, on_ready=ready, chain=chain)
    closed = app.state.metrics.connections_closed
    guard = Guard(
        header_timeout=cfg.header_timeout,
        body_timeout=cfg.body_timeout,
        body_min_rate=cfg.body_min_rate,
        max_header_bytes=cfg.max_header_bytes,
        max_connections=cfg.max_connections or auto_max_connections(),
        on_close=lambda reason: closed.labels(reason=reason).inc(),
    )
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            http=guarded(guard),
            log_level="warning",
            access_log=False,
            timeout_keep_alive=cfg.keepalive_timeout,
        )
    )
    try:
        server.run(sockets=[sock])
    finally:
        store.close()
        if chain is not None:
            chain.store.close()
        if cfg.ready_file:
            Path(cfg.ready_file).unlink(missing_ok=True)
