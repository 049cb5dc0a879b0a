"""Running the API: load the target, open the key store, bind a socket of our own, serve with uvicorn.

Binding the socket here (rather than letting uvicorn) makes ``port=0`` usable: the port is known
before serving starts, and ``ready_file`` tells a script where the server listens once it answers.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from speechmimic.serve.app import create_app
from speechmimic.serve.config import ServeConfig
from speechmimic.serve.keys import KeyStore
from speechmimic.targets import load_target


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
    target = load_target(cfg.target, device=cfg.device)
    store = KeyStore(cfg.db)
    sock = bind(cfg.host, cfg.port)
    url = url_of(sock)

    def ready() -> None:
        print(f"serving {target.spec} on {url} (keys: {cfg.db})", flush=True)
        if cfg.ready_file:
            path = Path(cfg.ready_file)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps({"url": url, "pid": os.getpid(), "target": target.spec}))
            os.replace(tmp, path)

    app = create_app(target, store, cfg, on_ready=ready)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=30))
    try:
        server.run(sockets=[sock])
    finally:
        store.close()
        if cfg.ready_file:
            Path(cfg.ready_file).unlink(missing_ok=True)
