"""The API under hostile clients, on loopback: does an honest client still get through?

The server runs with a descriptor limit of ``--nofile`` (256, as ``ulimit -n 256``) and its default
deadlines. A keyless client holds ``--connections`` (1,000) connections for ``--seconds`` (60): a
third idle, a third sending its headers a byte a second, a third sending headers then a body a byte
a second; each one the server closes is opened again at once. Meanwhile an honest client with a key
sends one clip after another, each on a fresh connection. Reported: the honest requests' statuses
and latency (p50, p99), how long the server kept the abusive connections (it must close each within
its deadline), and the server's peak memory. Then the same through ``deploy/nginx.conf`` (nginx in
front; its per-address limit raised, since every client here shares 127.0.0.1), if nginx is
installed. Last, a 64 MB header: how fast it is refused, and ``/healthz`` latency meanwhile.

    python benchmarks/hostile_clients.py                   # ~3 minutes on 2 CPU cores
    python benchmarks/hostile_clients.py --seconds 20 --connections 300 --no-proxy
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from speechmimic.recipes.demo import demo_corpus
from speechmimic.serve.process import ServerProcess
from speechmimic.targets import wire
from speechmimic.testing import HostileClients, NginxProxy

CONF = Path(__file__).resolve().parents[1] / "deploy" / "nginx.conf"


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of a process, in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def honest(url: str, token: str, bodies: list[bytes], seconds: float) -> dict:
    """Requests one after another, each on a fresh connection, for ``seconds``."""
    statuses: dict[str, int] = {}
    latencies = []
    end, i = time.monotonic() + seconds, 0
    headers = {"Authorization": f"Bearer {token}", "Content-Type": wire.RAW}
    while time.monotonic() < end:
        t0 = time.monotonic()
        try:
            with httpx.Client(timeout=30) as client:
                r = client.post(url + "/v1/embed", content=bodies[i % len(bodies)], headers=headers)
            status = str(r.status_code)
        except httpx.HTTPError as e:
            status = type(e).__name__
        latencies.append(time.monotonic() - t0)
        statuses[status] = statuses.get(status, 0) + 1
        i += 1
    lat = np.array(latencies) * 1000
    return {
        "statuses": statuses,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
    }


def siege(server: ServerProcess, url: str, port: int, args, bodies: list[bytes]) -> dict:
    token = server.key(f"honest-{port}")
    before = rss_mb(server.proc.pid)[0]
    attack = HostileClients("127.0.0.1", port, args.connections, interval=1.0, seconds=args.seconds + 15)
    attack.start()
    time.sleep(5)  # the connections pile up first
    result = honest(url, token, bodies, args.seconds)
    stats = attack.stop()
    now, peak = rss_mb(server.proc.pid)
    rss = {"rss_before_mb": round(before), "rss_peak_mb": round(peak), "rss_after_mb": round(now)}
    return {**result, "attack": stats, **rss}


def huge_header(server: ServerProcess) -> dict:
    huge = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (64 << 20) + b"\r\n\r\n"
    out: dict = {}

    def send() -> None:
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            try:
                s.sendall(huge)
                out["answer"] = s.recv(64).split(b"\r\n")[0].decode(errors="replace")
            except OSError as e:
                out["answer"] = f"connection closed ({type(e).__name__})"
        out["refused_after_s"] = round(time.monotonic() - t0, 3)

    health = []
    with httpx.Client(timeout=5) as client:
        client.get(server.url + "/healthz")
        sender = threading.Thread(target=send)
        sender.start()
        while len(health) < 20 or sender.is_alive() and len(health) < 500:
            t0 = time.monotonic()
            client.get(server.url + "/healthz")
            health.append(time.monotonic() - t0)
        sender.join()
    return {**out, "healthz_max_ms": round(max(health) * 1000, 1), "healthz_requests": len(health)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="resemblyzer?layers=all", help="the served spec (default: the demo's)")
    p.add_argument("--connections", type=int, default=1000, help="abusive connections held (default: 1000)")
    p.add_argument("--seconds", type=float, default=60, help="how long the honest client runs (default: 60)")
    p.add_argument("--nofile", type=int, default=256, help="the server's descriptor limit (default: 256)")
    p.add_argument("--no-proxy", action="store_true", help="skip the run through nginx")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args()

    pool, _ = demo_corpus()
    bodies = [wire.encode_raw(c.load()) for c in pool[:32]]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        with ServerProcess(Path(tmp) / "server", args.target, nofile=args.nofile) as server:
            print(
                f"server {server.url}, descriptor limit {args.nofile}; {args.connections} abusive connections"
            )
            results["bare"] = siege(server, server.url, server.port, args, bodies)
            print("bare:", json.dumps(results["bare"]), flush=True)
            if not args.no_proxy and shutil.which("nginx"):
                settings = {"limit_conn": "per_client 50000"}
                with NginxProxy(CONF, Path(tmp) / "nginx", server.port, settings) as proxy:
                    results["proxy"] = siege(server, proxy.url, proxy.port, args, bodies)
                print("through nginx:", json.dumps(results["proxy"]), flush=True)
            elif not args.no_proxy:
                print("nginx is not installed: the run through the proxy is skipped (apt-get install nginx)")
            results["huge_header"] = huge_header(server)
            print("64 MB header:", json.dumps(results["huge_header"]), flush=True)
    print()
    columns = ["path", "honest requests", "p50 ms", "p99 ms", "abusive opened", "closed by the server",
               "longest kept s", "server RSS MB before / peak"]  # fmt: skip
    print("| " + " | ".join(columns) + " |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for name, r in results.items():
        if name == "huge_header":
            continue
        a = r["attack"]
        rss = f"{r['rss_before_mb']} / {r['rss_peak_mb']}"
        cells = [name, r["statuses"], f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}", a["opened"],
                 a["closed_by_server"], a["max_lifetime"], rss]  # fmt: skip
        print("| " + " | ".join(map(str, cells)) + " |")
    h = results["huge_header"]
    print(f"\n64 MB header: {h['answer']!r} after {h['refused_after_s']} s; /healthz at most "
          f"{h['healthz_max_ms']} ms over {h['healthz_requests']} requests meanwhile")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
