"""The embedding API: FastAPI endpoints over a target, a key store, rate limits and a batcher.

``POST /v1/embed`` takes one clip (an audio file, or raw samples) and answers the target's layers
(:mod:`speechmimic.targets.wire`); its steps, from authentication to the charge, are in
:mod:`speechmimic.serve.embed`. This module wires them to FastAPI: the routes, authentication (401
missing or unknown key, 403 revoked), ``/v1/info``, ``/v1/usage``, ``/healthz`` and ``/metrics``, the
OpenAPI schema, and every error as an RFC 9457 problem document (``application/problem+json``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import time
from typing import Literal

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from speechmimic import audio, defences
from speechmimic.serve import embed as pipeline
from speechmimic.serve.batcher import Batcher
from speechmimic.serve.config import ServeConfig
from speechmimic.serve.keys import Key, KeyStore
from speechmimic.serve.limits import RateLimiter
from speechmimic.serve.metrics import Metrics
from speechmimic.serve.problems import PROBLEM, Problem
from speechmimic.targets import Target, wire

log = logging.getLogger("speechmimic.serve")
_ENDPOINTS = {"/v1/embed", "/v1/embed/batch", "/v1/info", "/v1/usage", "/healthz", "/metrics"}


class ProblemDoc(BaseModel):
    type: str
    title: str
    status: int
    detail: str


class LayerJSON(BaseModel):
    name: str
    shape: list[int]
    dtype: Literal["float32", "float16"]
    data: str


class AnswerJSON(BaseModel):
    num_samples: int
    layers: list[LayerJSON]


class Info(BaseModel):
    sample_rate: int
    formats: list[str]
    dtypes: list[str]
    layers: list[str] | None = None
    widths: dict[str, int] | None = None
    frame_rate: float | None = None
    min_samples: int | None = None
    padding: str | None = None
    limits: dict[str, float] | None = None
    batch: dict[str, int] | None = None


class Usage(BaseModel):
    name: str
    requests: int
    samples: int
    seconds: float
    quota_requests: int | None
    quota_seconds: float | None
    rate: float | None
    burst: float | None
    max_bytes: int | None
    max_seconds: float | None


def _problems(*statuses: int) -> dict:
    return {
        s: {"model": ProblemDoc, "content": {PROBLEM: {"schema": ProblemDoc.model_json_schema()}}}
        for s in statuses
    }


_BINARY = {"schema": {"type": "string", "format": "binary"}}
_EMBED_BODY = {
    "requestBody": {
        "required": True,
        "description": "one clip: raw little-endian samples (application/octet-stream, see encoding and "
        "sample_rate) or an audio file",
        "content": {wire.RAW: _BINARY, "audio/wav": _BINARY, "audio/flac": _BINARY, "audio/ogg": _BINARY},
    }
}
_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="the API key")


def create_app(
    target: Target, store: KeyStore, cfg: ServeConfig, on_ready=None, chain: defences.Chain | None = None
) -> FastAPI:
    """The application serving ``target``, through ``chain`` per key if given (the plain target goes
    to the batcher, so every key's requests share batches); ``on_ready()`` is called once it accepts
    requests."""
    metrics = Metrics()
    batcher = Batcher(
        target, metrics, cfg.max_batch_seconds, cfg.max_delay_ms / 1000, cfg.max_queue, cfg.model_workers
    )
    service = pipeline.Service(target, store, cfg, batcher, RateLimiter(), metrics, chain)
    info = _describe(target, cfg, chain)

    async def purge() -> None:
        stats = await run_in_threadpool(
            store.purge, cfg.answers_ttl_hours * 3600, cfg.resend_ttl_seconds, cfg.max_store_bytes
        )
        metrics.stored_answers.set(stats["answers"])
        metrics.stored_bytes.set(stats["bytes"])

    async def purge_every_while() -> None:
        while True:
            await asyncio.sleep(cfg.purge_seconds)
            try:
                await purge()
            except Exception:  # a failed purge is retried at the next; the server goes on
                log.exception("purging stored answers failed")

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await purge()
        purger = asyncio.create_task(purge_every_while())
        await batcher.start()
        if on_ready is not None:
            on_ready()
        yield
        purger.cancel()
        await batcher.stop()

    docs = {} if cfg.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(
        title="speechmimic embedding API",
        version="1",
        description="Frame-level representations of a speech encoder, per API key with quotas and limits.",
        lifespan=lifespan,
        **docs,
    )
    app.state.metrics = metrics
    app.add_middleware(_Observe, metrics=metrics)

    def problem_response(p: Problem) -> JSONResponse:
        metrics.rejections.labels(reason=p.kind).inc()
        return p.response()

    @app.exception_handler(Problem)
    async def _problem(_request, exc: Problem):
        return problem_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc: RequestValidationError):
        errors = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return problem_response(Problem(422, "invalid-request", errors))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request, exc: StarletteHTTPException):
        kind = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        return problem_response(Problem(exc.status_code, kind, str(exc.detail), dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _crash(_request, exc: Exception):
        # the details (paths, code) go to the server's log, never to the client
        incident = secrets.token_hex(6)
        log.error("internal error %s", incident, exc_info=exc)
        return problem_response(
            Problem(500, "internal-error", f"internal error {incident} (in the server's log)")
        )

    async def authenticate(
        request: Request,
        bearer_scheme: HTTPAuthorizationCredentials | None = Depends(_bearer),  # (the schema's)
        key_scheme: str | None = Depends(_api_key),
    ) -> Key:
        token = credential(request.headers)
        if not token:
            raise Problem(
                401, "missing-key", "send your API key as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"
            )
        key = store.authenticate(token)  # an indexed read on the reading connection: microseconds
        if key is None:
            raise Problem(401, "unknown-key", "this API key is not known here")
        if key.revoked is not None:
            raise Problem(403, "revoked-key", f"this API key was revoked at {time.ctime(key.revoked)}")
        return key

    @app.post(
        "/v1/embed",
        summary="The target's layers for one clip",
        response_class=Response,
        responses={
            200: {
                "description": "the layers' frames, (frames, width) each, in the target's order",
                "content": {wire.SAFETENSORS: _BINARY, wire.JSON: {"schema": AnswerJSON.model_json_schema()}},
                "headers": {
                    "X-Audio-Seconds": {"schema": {"type": "number"}, "description": "seconds of the clip"},
                    "X-Charged-Seconds": {"schema": {"type": "number"}, "description": "0 for a replay"},
                },
            },
            **_problems(400, 401, 403, 413, 415, 422, 429, 503),
        },
        openapi_extra=_EMBED_BODY,
    )
    async def embed(
        request: Request,
        key: Key = Depends(authenticate),
        format: Literal["safetensors", "json"] = Query(
            "safetensors", description="how the answer is encoded"
        ),
        dtype: Literal["float32", "float16"] = Query("float32", description="precision of the answer"),
        encoding: Literal["f32le", "s16le"] = Query("f32le", description="raw bodies only: sample encoding"),
        sample_rate: int = Query(
            audio.SAMPLE_RATE,
            ge=audio.MIN_SAMPLE_RATE,
            le=audio.MAX_SAMPLE_RATE,
            description="raw bodies only",
        ),
    ) -> Response:
        params = pipeline.Params(format, dtype, encoding, sample_rate)
        return await pipeline.embed(service, request, key, params)

    @app.post(
        "/v1/embed/batch",
        summary="The target's layers for several clips, each charged and stored on its own",
        response_class=Response,
        responses={
            200: {
                "description": "per clip, its layers or the problem that refused it (metadata 'results')",
                "content": {wire.SAFETENSORS: _BINARY, wire.JSON: {"schema": {"type": "object"}}},
            },
            **_problems(400, 401, 403, 413, 415, 422, 429, 503),
        },
        openapi_extra={"requestBody": {"required": True, "content": {wire.SAFETENSORS: _BINARY},
                                       "description": "clips as 1-D tensors 0..n-1 (see the wire format)"}},
    )  # fmt: skip
    async def embed_batch(
        request: Request,
        key: Key = Depends(authenticate),
        format: Literal["safetensors", "json"] = Query(
            "safetensors", description="how the answer is encoded"
        ),
        dtype: Literal["float32", "float16"] = Query("float32", description="precision of the answer"),
    ) -> Response:
        return await pipeline.embed_batch(service, request, key, pipeline.Params(format, dtype))

    @app.get("/v1/info", summary="What the API returns", response_model=Info,
             response_model_exclude_none=True,
             responses=_problems(404))  # fmt: skip
    async def get_info() -> dict:
        if info is None:
            raise Problem(404, "not-found", "this API does not describe itself")
        return info

    @app.get(
        "/v1/usage",
        summary="What your key has used",
        response_model=Usage,
        responses=_problems(400, 401, 403),
    )
    async def get_usage(key: Key = Depends(authenticate)) -> dict:
        return key.public()

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", summary="Prometheus metrics (with the metrics token)", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
                        **_problems(401, 404)})  # fmt: skip
    async def get_metrics(request: Request) -> Response:
        if not cfg.metrics_token:
            raise Problem(404, "not-found", "metrics are off: the server was started without --metrics-token")
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {cfg.metrics_token}".encode()):
            raise Problem(401, "missing-key", "metrics need 'Authorization: Bearer <metrics token>'")
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def credential(headers) -> str | None:
    """The API key of a request: ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``. Two of a header,
    or both headers with different keys, are refused: a server must not pick one silently (a proxy
    may have added one, or a client mixed two accounts)."""
    bearers = headers.getlist("authorization")
    keys = headers.getlist("x-api-key")
    if len(bearers) > 1 or len(keys) > 1:
        raise Problem(400, "conflicting-credentials", "send one Authorization or one X-API-Key header")
    bearer = None
    if bearers:
        scheme, _, value = bearers[0].partition(" ")
        bearer = value.strip() if scheme.lower() == "bearer" else None
    key = keys[0].strip() if keys else None
    if bearer and key and not hmac.compare_digest(bearer.encode(), key.encode()):
        raise Problem(
            400, "conflicting-credentials", "the Authorization and X-API-Key headers name different keys"
        )
    return bearer or key


def _describe(target: Target, cfg: ServeConfig, chain: defences.Chain | None = None) -> dict | None:
    """``/v1/info``: what clients receive (widths from one seeded probe clip, through the defences if
    any), less what is hidden."""
    hidden = cfg.hidden()
    if "all" in hidden:
        return None
    n = max(target.min_samples, audio.SAMPLE_RATE)
    probe = np.random.default_rng(0).standard_normal(n).astype(np.float32) * 0.1
    answer = target([probe])[0]
    layers = target.layers
    if chain is not None:
        # a throwaway chain with its state in memory: the probe touches no real key's state
        probing = defences.Chain(chain.defences, None)
        answer = probing.apply(defences.Query("/v1/info", probe, defences.digest(probe)), answer)
        layers = chain.layers(layers)
    widths = {name: int(frames.shape[1]) for name, frames in answer.items()}
    full = {
        "sample_rate": audio.SAMPLE_RATE,
        "formats": list(wire.FORMATS),
        "dtypes": list(wire.DTYPES),
        "layers": None if layers is None else list(layers),
        "widths": widths,
        "frame_rate": target.frame_rate,
        "min_samples": target.min_samples,
        "padding": target.padding,
        "limits": {"max_payload_bytes": cfg.max_payload_bytes, "max_clip_seconds": cfg.max_clip_seconds},
        "batch": {"max_clips": cfg.max_batch_clips},
    }
    return {k: v for k, v in full.items() if k not in hidden}


class _Observe:
    """Counts every answer by endpoint and status and times it (a plain ASGI middleware: cheap)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def observed(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            endpoint = scope["path"] if scope["path"] in _ENDPOINTS else "other"
            self.metrics.requests.labels(endpoint=endpoint, status=str(status[0])).inc()
            self.metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - start)
