"""``POST /v1/embed``, step by step: one clip in, the target's layers out, charged exactly once.

:func:`embed` runs the steps in this order, each a function of its own that raises a
:class:`~speechmimic.serve.problems.Problem` to refuse (nothing is charged for a refusal):

1. :func:`check_rate`: the key's token bucket (429 with ``Retry-After``);
2. :func:`idempotency_key`: the header, if any, is 1 to 255 printable ASCII characters (422);
3. :func:`media_kind`: raw samples or an audio type we decode (415);
4. :func:`read_body`: at most the key's payload limit, checked before and while reading (413), and
   within the bytes in flight allowed per key (429) and in all (503);
5. the answer's name in the store: its ``Idempotency-Key``, or, without one, the request's content
   hash. A stored answer is replayed, free and byte for byte (:func:`replay`; 422 if an
   ``Idempotency-Key`` comes with another body); a duplicate of a request being answered waits for it
   and is then replayed: the model runs once;
6. :func:`decode`: through the audio layer, as any untrusted file (413, 415, 422);
7. :func:`answer`: the quota, counting what is reserved (429 without ``Retry-After``), the defences'
   admission (403), a dynamic batch (429 when full), the defences applied as the key's account, and
   the charge, committed with the stored answer before anything is sent;
8. :func:`respond`: the metrics, and the answer in the format and precision asked for.

The rule that follows: **no charge without a deliverable answer.** Every charged answer is stored
with its charge; if the connection breaks before it arrives, the same request sent again (within
``answers_ttl_hours`` under an ``Idempotency-Key``, ``resend_ttl_seconds`` without) gets it, free.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np
from fastapi import Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from speechmimic import audio, defences
from speechmimic.serve.batcher import Batcher, Busy
from speechmimic.serve.config import ServeConfig
from speechmimic.serve.keys import IMPLICIT, Key, KeyStore, QuotaExceeded, StoredAnswer
from speechmimic.serve.limits import RateLimiter
from speechmimic.serve.metrics import Metrics
from speechmimic.serve.problems import Problem
from speechmimic.serve.reservations import Reservations
from speechmimic.targets import Target, wire

RETRY = {"Retry-After": "1"}


@dataclass
class Service:
    """What the steps work with: one per application."""

    target: Target
    store: KeyStore
    cfg: ServeConfig
    batcher: Batcher
    limiter: RateLimiter
    metrics: Metrics
    chain: defences.Chain | None = None  # the defences, applied per key
    reservations: Reservations = field(default_factory=Reservations)


@dataclass(frozen=True)
class Params:
    """The request's query parameters."""

    format: str = "safetensors"
    dtype: str = "float32"
    encoding: str = "f32le"  # raw bodies only
    sample_rate: int = audio.SAMPLE_RATE  # raw bodies only


@dataclass
class Answered:
    """One clip's answer: the stored bytes (safetensors, float32), its samples, whether this request
    was charged for it (else it came from the store, free), and its arrays when just computed."""

    stored: bytes
    samples: int
    charged: bool
    arrays: dict[str, np.ndarray] | None = None

    def layers(self) -> dict[str, np.ndarray]:
        return (
            self.arrays if self.arrays is not None else wire.decode_answer(self.stored, wire.SAFETENSORS)[0]
        )


async def embed(service: Service, request: Request, key: Key, params: Params) -> Response:
    """Answer one authenticated request of one clip (the steps of the module's docstring, in order)."""
    check_rate(service.limiter, key)
    idem = idempotency_key(request.headers.get("idempotency-key"))
    kind = media_kind(request.headers.get("content-type"))
    body, taken = await read_body(service, request, key)
    held = [taken]
    try:
        digest = request_hash(kind, params.encoding, params.sample_rate, body)
        args = (
            body,
            kind,
            params.encoding,
            params.sample_rate,
            _max_seconds(service, key),
            service.target.min_samples,
        )
        del body

        async def wav() -> np.ndarray:
            # raw samples take microseconds to check; a file is decoded off the event loop
            out = decode(*args) if kind == wire.RAW else await run_in_threadpool(decode, *args)
            service.reservations.give_bytes(key.id, held.pop())  # the body's bytes are no longer held
            return out

        got = await clip_answer(service, key, idem if idem is not None else IMPLICIT + digest, digest, wav)
    finally:
        if held:
            service.reservations.give_bytes(key.id, held.pop())
    return respond(service.metrics, key, got, params)


async def embed_batch(service: Service, request: Request, key: Key, params: Params) -> Response:
    """Answer a request of several clips: each answered, charged, stored and replayable on its own
    (a refused clip gets its problem document in the answer, and costs nothing); the payload limit
    applies to the whole request, at most ``max_batch_clips`` clips, one token of the rate limit each."""
    if wire.media_type(request.headers.get("content-type")) != wire.SAFETENSORS:
        raise Problem(415, "unsupported-media-type", f"a batch is {wire.SAFETENSORS} (see the wire format)")
    body, taken = await read_body(service, request, key)
    try:
        try:
            clips, keys, rate = wire.decode_clips(body)
        except wire.WireError as e:
            raise Problem(422, "malformed-batch", str(e)) from None
        del body
        if not clips or len(clips) > service.cfg.max_batch_clips:
            raise Problem(
                413, "too-many-clips", f"{len(clips)} clips; a batch holds 1 to {service.cfg.max_batch_clips}"
            )
        if not audio.MIN_SAMPLE_RATE <= rate <= audio.MAX_SAMPLE_RATE:
            raise Problem(422, "invalid-request", f"sample_rate {rate} out of range")
        check_rate(service.limiter, key, len(clips))
        for idem in keys:
            idempotency_key(idem)
        limit = _max_seconds(service, key)

        async def one(raw: bytes, encoding: str, idem: str | None):
            digest = request_hash(wire.RAW, encoding, rate, raw)

            async def wav() -> np.ndarray:
                return decode(raw, wire.RAW, encoding, rate, limit, service.target.min_samples)

            try:
                return await clip_answer(
                    service, key, idem if idem is not None else IMPLICIT + digest, digest, wav
                )
            except Problem as p:
                service.metrics.rejections.labels(reason=p.kind).inc()
                return p

        results = await asyncio.gather(
            *(one(raw, enc, idem) for (raw, enc), idem in zip(clips, keys, strict=True))
        )
    finally:
        service.reservations.give_bytes(key.id, taken)
    answered = [r for r in results if isinstance(r, Answered)]
    for got in answered:
        _count(service.metrics, key, got)
    content, media = wire.encode_batch_answer(
        [(r.layers(), r.samples) if isinstance(r, Answered) else r.document() for r in results],
        params.format,
        params.dtype,
    )
    seconds = sum(r.samples for r in answered) / audio.SAMPLE_RATE
    charged = sum(r.samples for r in answered if r.charged) / audio.SAMPLE_RATE
    return Response(
        content,
        media_type=media,
        headers={"X-Audio-Seconds": f"{seconds:g}", "X-Charged-Seconds": f"{charged:g}"},
    )


async def clip_answer(service: Service, key: Key, name: str, digest: str, wav) -> Answered:
    """One clip's answer under ``name`` (its Idempotency-Key, or :data:`IMPLICIT` + its hash): from the
    store if there (free), after the request computing it if one is (then from the store), else
    decoded (``await wav()``) and computed by :func:`answer`."""
    while True:  # nothing awaits between the store's answer and the claim: no duplicate slips in
        stored = service.store.stored(key.id, name)
        if stored is not None:
            return _from_store(stored, digest)
        first = service.reservations.answering(key.id, name)
        if first is None:
            break
        await asyncio.shield(first)  # then its answer is stored (or it failed: this one tries)
    with service.reservations.claim(key.id, name):
        clip = await wav()
        arrays, keep, earlier = await answer(service, key, clip, name, digest)
    if earlier is not None:
        return _from_store(earlier, digest)
    return Answered(keep, len(clip), True, arrays)


def _from_store(stored: StoredAnswer, digest: str) -> Answered:
    if stored.request_hash != digest:
        raise Problem(
            422,
            "idempotency-key-reused",
            "this Idempotency-Key was used for another request; use a new key per clip",
        )
    return Answered(stored.body, stored.samples, False)


def _max_seconds(service: Service, key: Key) -> float:
    return min(service.cfg.max_clip_seconds, key.max_seconds or math.inf)


def check_rate(limiter: RateLimiter, key: Key, n: int = 1) -> None:
    """``n`` tokens of the key's bucket (one per clip), or 429 with the wait; a batch larger than the
    bucket can never pass: 413."""
    if key.rate is not None and n > limiter.size(key.rate, key.burst):
        raise Problem(
            413, "too-many-clips", f"{n} clips at once; this key's rate limit allows {key.burst or 1:g}"
        )
    wait = limiter.take(key.id, key.rate, key.burst, n)
    if wait is not None:
        raise Problem(
            429,
            "rate-limited",
            f"rate limit of {key.rate:g} requests/s",
            {"Retry-After": str(math.ceil(wait))},
        )


def idempotency_key(header: str | None) -> str | None:
    if header is not None and not (0 < len(header) <= 255 and header.isascii() and header.isprintable()):
        raise Problem(
            422, "invalid-idempotency-key", "an Idempotency-Key is 1 to 255 printable ASCII characters"
        )
    return header


async def read_body(service: Service, request: Request, key: Key) -> tuple[bytes, int]:
    """The body, and the bytes of it held in the key's and the server's budgets of bytes in flight
    (the caller gives them back once the body is decoded)."""
    limit = min(service.cfg.max_payload_bytes, key.max_bytes or math.inf)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Problem(413, "payload-too-large", f"{declared} bytes; this key may send at most {int(limit)}")
    taken = 0

    def hold(n: int) -> None:
        nonlocal taken
        over = service.reservations.take_bytes(
            key.id, n, service.cfg.max_key_inflight_bytes, service.cfg.max_inflight_bytes
        )
        if over == "key":
            raise Problem(
                429, "busy", "this key's uploads in flight are at their limit", {"Retry-After": "1"}
            )
        if over == "total":
            raise Problem(
                503, "server-busy", "uploads in flight are at the server's limit", {"Retry-After": "1"}
            )
        taken += n

    chunks, size = [], 0
    try:
        if declared is not None and declared.isdigit():
            hold(int(declared))
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise Problem(
                        413,
                        "payload-too-large",
                        f"more than {int(limit)} bytes; this key may send at most that",
                    )
                if size > taken:
                    hold(size - taken)
                chunks.append(chunk)
        except ClientDisconnect:
            raise Problem(400, "incomplete-body", "the connection closed before the body ended") from None
        if not size:
            raise Problem(422, "empty-audio", "the request has no body: send one clip")
    except BaseException:
        if taken:
            service.reservations.give_bytes(key.id, taken)
        raise
    return b"".join(chunks), taken


def media_kind(content_type: str | None) -> str:
    kind = wire.media_type(content_type)
    if kind != wire.RAW and kind not in wire.AUDIO_TYPES:
        raise Problem(
            415, "unsupported-media-type",
            f"Content-Type {kind or 'missing'}; send {wire.RAW} (raw samples) or one of "
            f"{sorted(wire.AUDIO_TYPES)}",
        )  # fmt: skip
    return kind


def request_hash(kind: str, encoding: str, sample_rate: int, body: bytes) -> str:
    """What an answer is stored under (with an ``Idempotency-Key``, bound to): the clip's bytes and
    everything that says how to read them. A clip sent alone or in a batch hashes the same."""
    return hashlib.sha256(f"{kind}|{encoding}|{sample_rate}|".encode() + body).hexdigest()


def decode(
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
            try:
                return audio.load_audio(path, min_samples=min_samples, max_seconds=limit)
            except audio.AudioError as e:  # the decoder's words may name the file: never a server path
                e.reason = e.reason.replace(path, "<upload>").replace(tmp, "<upload>")
                raise
    except audio.AudioError as e:
        raise Problem.of_audio(e) from None


async def answer(
    service: Service, key: Key, wav: np.ndarray, name: str, digest: str
) -> tuple[dict[str, np.ndarray], bytes, StoredAnswer | None]:
    """The (defended) answer to ``wav``, charged to ``key`` and stored under ``name``: its arrays, the
    bytes stored (safetensors, float32), and the answer stored earlier under ``name`` if one was
    meanwhile (then nothing is charged and that one is the answer)."""
    samples = len(wav)
    try:
        hold = service.reservations.reserve(key, samples)
    except QuotaExceeded as e:
        raise Problem(429, "quota-exhausted", e.what) from None
    with hold:
        query = None
        if service.chain is not None:
            # admitted after the reservation (a refusal releases it) and before the model runs: a
            # refused clip costs neither model time nor the key's quota
            try:
                query = await run_in_threadpool(admit, service.chain, key.name, wav)
            except defences.Refused as e:
                raise Problem(403, "refused-by-defence", e.reason) from None
        try:
            arrays = await service.batcher.embed(wav)
        except Busy as e:
            raise Problem(429, "busy", str(e), {"Retry-After": "1"}) from None
        if query is not None:
            # before encoding: the stored answer, and every replay of it, is the defended one
            arrays = await run_in_threadpool(service.chain.apply, query, arrays)
        keep = wire.encode_answer(arrays, samples)[0]
        # Released before the charge commits, never after: a request checked between the commit
        # (in a thread) and a later release would count this one twice, in the key's usage and in
        # its reservations, and be refused short of the quota. Checked in the gap, it may be
        # admitted one too many; the charge itself then refuses it (nothing is charged).
        hold.release()
        try:
            earlier = await run_in_threadpool(service.store.charge, key.id, samples, name, digest, keep)
        except QuotaExceeded as e:
            raise Problem(429, "quota-exhausted", e.what) from None
    if earlier is None:
        service.metrics.stored_answers.inc()
        service.metrics.stored_bytes.inc(len(keep))
    return arrays, keep, earlier


def admit(chain: defences.Chain, account: str, wav: np.ndarray) -> defences.Query:
    """``wav`` asked by ``account``, admitted by ``chain`` (hashed here too: off the event loop)."""
    query = defences.Query(account, wav, defences.digest(wav))
    chain.admit(query)
    return query


def respond(metrics: Metrics, key: Key, got: Answered, params: Params) -> Response:
    """The answer as asked for; a replay says so and costs nothing."""
    _count(metrics, key, got)
    if (params.format, params.dtype) == ("safetensors", "float32"):  # the stored bytes are the answer
        content, media = got.stored, wire.SAFETENSORS
    else:  # (deterministic: a replay is the first answer, byte for byte)
        content, media = wire.encode_answer(got.layers(), got.samples, params.format, params.dtype)
    seconds = f"{got.samples / audio.SAMPLE_RATE:g}"
    headers = {"X-Audio-Seconds": seconds, "X-Charged-Seconds": seconds if got.charged else "0"}
    if not got.charged:
        headers["Idempotent-Replayed"] = "true"
    return Response(content, media_type=media, headers=headers)


def _count(metrics: Metrics, key: Key, got: Answered) -> None:
    if got.charged:
        seconds = got.samples / audio.SAMPLE_RATE
        metrics.audio_seconds.inc(seconds)
        metrics.key_requests.labels(key=key.name).inc()
        metrics.key_seconds.labels(key=key.name).inc(seconds)
    else:
        metrics.replays.labels(key=key.name).inc()
