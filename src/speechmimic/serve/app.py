"""The embedding API: FastAPI endpoints over a target, a key store, rate limits and a batcher.

``POST /v1/embed`` takes one clip (an audio file, or raw samples) and answers the target's layers
(:mod:`speechmimic.targets.wire`). In order, a request is: authenticated (401 missing or unknown
key, 403 revoked), rate limited (429 with ``Retry-After``), size checked before it is read (413),
typed (415), replayed from the store if its ``Idempotency-Key`` was answered before (free; 422 if the
same key comes with another body, 409 while the first is still in flight), decoded by the audio
layer (422 undecodable, non-finite, silent, too short; 413 too long), checked against the key's
quota (429 without ``Retry-After``: waiting will not help), admitted by the defences of a defended
spec (403 ``refused-by-defence``), answered in a dynamic batch, passed through the defences as the
key's account, and charged: the charge and the stored answer are committed together before the
answer is sent. Every error is an RFC 9457 problem document (``application/problem+json``).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import tempfile
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
from speechmimic.serve.batcher import Batcher, Busy
from speechmimic.serve.config import ServeConfig
from speechmimic.serve.keys import Key, KeyStore, QuotaExceeded
from speechmimic.serve.limits import RateLimiter
from speechmimic.serve.metrics import Metrics
from speechmimic.targets import Target, wire

PROBLEM = "application/problem+json"
_ENDPOINTS = {"/v1/embed", "/v1/info", "/v1/usage", "/healthz", "/metrics"}
# AudioError subclasses -> (status, problem kind); the first match wins, so subclasses come first.
_AUDIO_PROBLEMS = (
    (audio.TooLongAudioError, 413, "clip-too-long"),
    (audio.UnsupportedAudioTypeError, 415, "unsupported-audio-type"),
    (audio.EmptyAudioError, 422, "empty-audio"),
    (audio.NonFiniteAudioError, 422, "non-finite-audio"),
    (audio.SilentAudioError, 422, "silent-audio"),
    (audio.TooShortAudioError, 422, "clip-too-short"),
    (audio.UnreadableAudioError, 422, "undecodable-audio"),
    (audio.AudioError, 422, "invalid-audio"),
)


class Problem(Exception):
    """An error answer: ``status``, a short ``kind`` (its type is ``urn:speechmimic:problem:<kind>``)."""

    def __init__(self, status: int, kind: str, detail: str, headers: dict[str, str] | None = None):
        self.status, self.kind, self.detail, self.headers = status, kind, detail, headers or {}
        super().__init__(detail)


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
    limiter = RateLimiter()
    batcher = Batcher(
        target, metrics, cfg.max_batch_seconds, cfg.max_delay_ms / 1000, cfg.max_queue, cfg.model_workers
    )
    info = _describe(target, cfg, chain)
    reserved: dict[int, list[int]] = {}  # key id -> [requests, samples] being answered now
    in_flight: set[tuple[int, str]] = set()

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        store.forget_answers(cfg.answers_ttl_hours)
        await batcher.start()
        if on_ready is not None:
            on_ready()
        yield
        await batcher.stop()

    app = FastAPI(
        title="speechmimic embedding API",
        version="1",
        description="Frame-level representations of a speech encoder, per API key with quotas and limits.",
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    app.add_middleware(_Observe, metrics=metrics)

    def problem_response(p: Problem) -> JSONResponse:
        metrics.rejections.labels(reason=p.kind).inc()
        title = p.kind.replace("-", " ")
        doc = {
            "type": f"urn:speechmimic:problem:{p.kind}",
            "title": title,
            "status": p.status,
            "detail": p.detail,
        }
        return JSONResponse(doc, status_code=p.status, headers=p.headers, media_type=PROBLEM)

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
        return problem_response(Problem(500, "internal-error", f"{type(exc).__name__}: {exc}"))

    async def authenticate(
        bearer: HTTPAuthorizationCredentials | None = Depends(_bearer),
        api_key: str | None = Depends(_api_key),
    ) -> Key:
        token = bearer.credentials if bearer is not None else api_key
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
            **_problems(401, 403, 409, 413, 415, 422, 429),
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
        wait = limiter.take(key.id, key.rate, key.burst)
        if wait is not None:
            raise Problem(
                429,
                "rate-limited",
                f"rate limit of {key.rate:g} requests/s",
                {"Retry-After": str(math.ceil(wait))},
            )
        idem = request.headers.get("idempotency-key")
        if idem is not None and not (0 < len(idem) <= 255 and idem.isascii() and idem.isprintable()):
            raise Problem(
                422, "invalid-idempotency-key", "an Idempotency-Key is 1 to 255 printable ASCII characters"
            )
        body = await _read_body(request, min(cfg.max_payload_bytes, key.max_bytes or math.inf))
        kind = wire.media_type(request.headers.get("content-type"))
        if kind != wire.RAW and kind not in wire.AUDIO_TYPES:
            raise Problem(
                415, "unsupported-media-type",
                f"Content-Type {kind or 'missing'}; send {wire.RAW} (raw samples) or one of "
                f"{sorted(wire.AUDIO_TYPES)}",
            )  # fmt: skip
        request_hash = hashlib.sha256(f"{kind}|{encoding}|{sample_rate}|".encode() + body).hexdigest()
        if idem is not None:
            stored = store.stored(key.id, idem)
            if stored is not None:
                return _replay(stored, request_hash, format, dtype, key, metrics)
            if (key.id, idem) in in_flight:
                raise Problem(
                    409,
                    "in-flight",
                    "a request with this Idempotency-Key is being answered",
                    {"Retry-After": "1"},
                )
        max_seconds = min(cfg.max_clip_seconds, key.max_seconds or math.inf)
        args = (body, kind, encoding, sample_rate, max_seconds, target.min_samples)
        # raw samples take microseconds to check; a file is decoded off the event loop
        wav = _decode(*args) if kind == wire.RAW else await run_in_threadpool(_decode, *args)
        samples = len(wav)
        held = reserved.setdefault(key.id, [0, 0])
        exceeded = key.over_quota(key.requests + held[0] + 1, key.samples + held[1] + samples)
        if exceeded:
            raise Problem(429, "quota-exhausted", exceeded)
        held[0] += 1
        held[1] += samples
        if idem is not None:
            in_flight.add((key.id, idem))
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                held[0] -= 1
                held[1] -= samples
                released = True

        try:
            query = None
            if chain is not None:
                # admitted after the reservation (inside the try, so a refusal releases it) and
                # before the model runs: a refused clip costs neither model time nor the key's quota
                try:
                    query = await run_in_threadpool(_admit, chain, key.name, wav)
                except defences.Refused as e:
                    raise Problem(403, "refused-by-defence", e.reason) from None
            try:
                arrays = await batcher.embed(wav)
            except Busy as e:
                raise Problem(429, "busy", str(e), {"Retry-After": "1"}) from None
            if query is not None:
                # before encoding: the stored answer, and every replay of it, is the defended one
                arrays = await run_in_threadpool(chain.apply, query, arrays)
            keep = wire.encode_answer(arrays, samples)[0] if idem is not None else b""
            # Released before the charge commits, never after: a request checked between the commit
            # (in a thread) and a later release would count this one twice, in the key's usage and
            # in its reservations, and be refused short of the quota. Checked in the gap, it may be
            # admitted one too many; the charge itself then refuses it (nothing is charged).
            release()
            try:
                earlier = await run_in_threadpool(store.charge, key.id, samples, idem, request_hash, keep)
            except QuotaExceeded as e:
                raise Problem(429, "quota-exhausted", e.what) from None
        finally:
            release()
            in_flight.discard((key.id, idem))
        if earlier is not None:
            return _replay(earlier, request_hash, format, dtype, key, metrics)
        metrics.audio_seconds.inc(samples / audio.SAMPLE_RATE)
        metrics.key_requests.labels(key=key.name).inc()
        metrics.key_seconds.labels(key=key.name).inc(samples / audio.SAMPLE_RATE)
        if keep and (format, dtype) == ("safetensors", "float32"):  # the stored bytes are the answer
            content, media = keep, wire.SAFETENSORS
        else:
            content, media = wire.encode_answer(arrays, samples, format, dtype)
        seconds = f"{samples / audio.SAMPLE_RATE:g}"
        return Response(
            content, media_type=media, headers={"X-Audio-Seconds": seconds, "X-Charged-Seconds": seconds}
        )

    @app.get("/v1/info", summary="What the API returns", response_model=Info,
             response_model_exclude_none=True,
             responses=_problems(404))  # fmt: skip
    async def get_info() -> dict:
        if info is None:
            raise Problem(404, "not-found", "this API does not describe itself")
        return info

    @app.get(
        "/v1/usage", summary="What your key has used", response_model=Usage, responses=_problems(401, 403)
    )
    async def get_usage(key: Key = Depends(authenticate)) -> dict:
        return key.public()

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})  # fmt: skip
    async def get_metrics() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return app


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
    }
    return {k: v for k, v in full.items() if k not in hidden}


def _admit(chain: defences.Chain, account: str, wav: np.ndarray) -> defences.Query:
    """``wav`` asked by ``account``, admitted by ``chain`` (hashed here too: off the event loop)."""
    query = defences.Query(account, wav, defences.digest(wav))
    chain.admit(query)
    return query


async def _read_body(request: Request, limit: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Problem(413, "payload-too-large", f"{declared} bytes; this key may send at most {int(limit)}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Problem(
                413, "payload-too-large", f"more than {int(limit)} bytes; this key may send at most that"
            )
        chunks.append(chunk)
    if not size:
        raise Problem(422, "empty-audio", "the request has no body: send one clip")
    return b"".join(chunks)


def _decode(
    body: bytes, kind: str, encoding: str, rate: int, max_seconds: float, min_samples: int
) -> np.ndarray:
    """The clip as 16 kHz float32, through the same audio layer as every file of a corpus."""
    limit = None if math.isinf(max_seconds) else max_seconds
    try:
        if kind == wire.RAW:
            try:
                wav = wire.decode_raw(body, encoding)
            except wire.WireError as e:
                raise Problem(422, "malformed-samples", str(e)) from None
            if limit is not None and len(wav) > limit * rate:
                raise audio.TooLongAudioError(
                    "<request>", f"{len(wav) / rate:.1f} s, longer than the {limit:g} s allowed"
                )
            wav = audio.resample(wav, rate, audio.SAMPLE_RATE) if len(wav) else wav
            return audio.validate_waveform(wav, "<request>", min_samples=min_samples)
        with tempfile.TemporaryDirectory(prefix="speechmimic-upload-") as tmp:
            path = os.path.join(tmp, "clip" + wire.AUDIO_TYPES[kind])
            with open(path, "wb") as f:
                f.write(body)
            return audio.load_audio(path, min_samples=min_samples, max_seconds=limit)
    except audio.AudioError as e:
        status, problem = next((s, p) for cls, s, p in _AUDIO_PROBLEMS if isinstance(e, cls))
        raise Problem(status, problem, e.reason) from None


def _replay(stored, request_hash: str, fmt: str, dtype: str, key: Key, metrics: Metrics) -> Response:
    if stored.request_hash != request_hash:
        raise Problem(
            422,
            "idempotency-key-reused",
            "this Idempotency-Key was used for another request; use a new key per clip",
        )
    arrays, _ = wire.decode_answer(stored.body, wire.SAFETENSORS)
    content, media = wire.encode_answer(arrays, stored.samples, fmt, dtype)
    metrics.replays.labels(key=key.name).inc()
    headers = {
        "X-Audio-Seconds": f"{stored.samples / audio.SAMPLE_RATE:g}",
        "X-Charged-Seconds": "0",
        "Idempotent-Replayed": "true",
    }
    return Response(content, media_type=media, headers=headers)


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
