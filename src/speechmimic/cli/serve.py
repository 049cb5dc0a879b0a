"""``speechmimic serve`` (an encoder behind an embedding API) and ``speechmimic keys`` (its API keys)."""

from __future__ import annotations

import json
import time

from speechmimic import config
from speechmimic.cli import _options
from speechmimic.serve.config import ENV_PREFIX, ServeConfig
from speechmimic.serve.keys import LIMITS, KeyStore


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a target as an embedding API with API keys, quotas and rate limits",
        description="Put an encoder behind an HTTP embedding API: POST /v1/embed (one clip per request, "
        "an audio file or raw samples; answers as safetensors or JSON, float32 or float16, "
        "Idempotency-Key honoured across restarts), GET /v1/info, /v1/usage, /healthz, /metrics "
        "(Prometheus), /docs and /openapi.json. Keys come from 'speechmimic keys create'. A target spec "
        "with defences after '|' answers every key through them, the key being the account, their "
        "per-key state in --defence-state. Settings: "
        f"defaults < --config FILE.json < {ENV_PREFIX}<SETTING> environment variables < flags.",
    )
    _options.add_config_flags(p, ServeConfig)
    _options.add_config_file(p, "server")
    p.set_defaults(func=run_serve)

    k = sub.add_parser(
        "keys",
        help="create, list or revoke the API keys of a server",
        description="Manage the API keys in a server's SQLite file (it may be serving meanwhile: "
        "a revocation takes effect on the next request).",
    )
    ksub = k.add_subparsers(
        dest="keys_command", metavar="COMMAND", required=True, help="what to do with the keys"
    )
    c = ksub.add_parser(
        "create",
        help="create a key and print it (shown this once: only its hash is kept)",
        description="Create an API key with optional limits and print it. It is shown this once: the "
        "database keeps only its SHA-256. Limits not given are unlimited.",
    )
    c.add_argument("name", help="a name for the key's holder, unique")
    limits = {
        "quota_requests": (int, "most requests the key may make in its lifetime"),
        "quota_seconds": (float, "most seconds of audio the key may send in its lifetime"),
        "rate": (float, "token-bucket rate limit, requests per second"),
        "burst": (float, "token-bucket size: requests allowed at once (default: max(1, rate))"),
        "max_bytes": (int, "largest request body, bytes (the server's limit applies too)"),
        "max_seconds": (float, "longest clip, seconds (the server's limit applies too)"),
    }
    for name, (typ, text) in limits.items():
        c.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=text + " (default: none)")
    c.add_argument("--json", action="store_true", help="print the key and its settings as JSON")
    ksub.add_parser(
        "list",
        help="every key with its limits and usage (never the key itself)",
        description="List every key: its limits, requests and audio seconds charged, when it was revoked.",
    )
    r = ksub.add_parser(
        "revoke",
        help="revoke a key: its requests get 403 from now on",
        description="Revoke a key by name; a running server refuses it (403) from its next request on.",
    )
    r.add_argument("name", help="the key's name")
    for q in ksub.choices.values():
        q.add_argument(
            "--db", default="serve.sqlite", help="the server's SQLite file (default: serve.sqlite)"
        )
    k.set_defaults(func=run_keys)


def resolve(args) -> ServeConfig:
    values = {
        **_options.file_settings(args),
        **config.from_env(ServeConfig, ENV_PREFIX),
        **_options.given(args, ServeConfig),
    }
    cfg = config.from_dict(ServeConfig, values)
    cfg.check()
    return cfg


def run_serve(args) -> int:
    from speechmimic.serve.server import run

    cfg = resolve(args)
    if args.print_config:
        return _options.print_config(cfg)
    run(cfg)
    return 0


def run_keys(args) -> int:
    store = KeyStore(args.db)
    try:
        if args.keys_command == "create":
            key, token = store.create(args.name, **{n: getattr(args, n) for n in LIMITS})
            if args.json:
                print(json.dumps({"key": token, **key.public()}, indent=2))
            else:
                print(token)
                limits = ", ".join(f"{n}={getattr(key, n):g}" for n in LIMITS if getattr(key, n) is not None)
                print(f"created key {key.name!r} ({limits or 'no limits'}); it is shown only now", flush=True)
        elif args.keys_command == "list":
            print(_table(store.list()))
        else:
            key = store.revoke(args.name)
            print(f"revoked {key.name!r} at {time.ctime(key.revoked)}")
    finally:
        store.close()
    return 0


def _table(keys) -> str:
    cols = ("name", "requests", "seconds", *LIMITS, "revoked")
    rows = [[str(c) for c in cols]]
    for key in keys:
        d = key.public()
        d["seconds"] = f"{key.seconds:.2f}"
        d["revoked"] = time.strftime("%Y-%m-%d %H:%M", time.localtime(key.revoked)) if key.revoked else ""
        rows.append(["" if d[c] is None else str(d[c]) for c in cols])
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows)
