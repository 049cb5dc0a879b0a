"""Any HTTP embedding API as a :class:`~speechmimic.targets.base.Target`: ours (``speechmimic serve``)
or another that speaks the same wire format (:mod:`speechmimic.targets.wire`).

Spec: ``http://host:port[/prefix]?key_env=VAR&concurrency=8&timeout=60&retries=8&dtype=float32``.
The API key is read from the environment variable ``key_env`` (default ``SPEECHMIMIC_API_KEY``),
never from the spec, so specs (which the ledger records) hold no secret.

What it promises the ledger:

- **Never charged twice for one clip.** Each request carries the clip's content key (the ledger's
  key, the SHA-256 of its samples) as ``Idempotency-Key``; a resend (a retry, a resume after a
  crash) of the same clip is answered from the server's store without a second charge, by any
  server that honours the header (ours does). Against one that does not, a retry after a lost
  answer may be charged again: set ``retries=0`` there.
- **Never beyond the budget.** It sends only the clips the ledger gives it; the ledger checks the
  budget before it hands them over.
- **Batches where the API takes them**: an API whose ``/v1/info`` offers ``batch`` gets the clips of
  a call in ``POST /v1/embed/batch`` requests (up to ``concurrency`` of them, each of at most the
  offered clips and the payload limit), each clip with its own ``Idempotency-Key``; a clip the batch
  could not place (the model's queue was full) is sent again alone. Otherwise one clip a request.
- **Bounded concurrency**: at most ``concurrency`` requests in flight; retries with exponential
  backoff and full jitter on 5xx, 408, 409 (the same clip still in flight), timeouts and refused
  connections (``retries`` of them per clip); on 429 it waits what ``Retry-After`` says (at most
  ``MAX_RETRY_AFTER`` seconds per clip in all), and a 429 without it (a spent quota) ends the run.
- **Learns what it needs from the answers**: ``GET /v1/info`` is read if the API has it; otherwise
  (or for what it hides) layers come from the first answer and the frame rate is left to the
  ledger, which fits it on the answers' frame counts.

A clip the API refuses for itself (413 too long, 422 undecodable/too short/silent) is a
:class:`ClipRefused`: the ledger lists it as unusable and goes on.
"""

from __future__ import annotations

import email.utils
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

from speechmimic.errors import InputError
from speechmimic.targets import wire
from speechmimic.targets.base import ClipRefused, PartialAnswers, TargetError

DEFAULT_KEY_ENV = "SPEECHMIMIC_API_KEY"
# Waiting longer than this for one clip (a Retry-After, or all of them together) ends the run, resumable.
MAX_RETRY_AFTER = 600.0
_BACKOFF_BASE, _BACKOFF_CAP = 0.25, 20.0
_CLIP_STATUSES = (413, 422)  # refusals of one clip for what it is
_RETRY_STATUSES = (408, 409, 500, 502, 503, 504)


class HTTPTarget:
    """A remote embedding API; see the module docstring for what it guarantees."""

    def __init__(
        self,
        url: str,
        key_env: str = DEFAULT_KEY_ENV,
        concurrency: int = 8,
        timeout: float = 60.0,
        retries: int = 8,
        dtype: str = "float32",
        seed: int = 0,
    ):
        if concurrency < 1:
            raise InputError(f"concurrency must be >= 1, got {concurrency}")
        if dtype not in wire.DTYPES:
            raise InputError(f"dtype must be one of {list(wire.DTYPES)}, got {dtype!r}")
        self.url = url.rstrip("/")
        self.key_env = key_env
        self.concurrency = concurrency
        self.retries = retries
        self.dtype = dtype
        key = os.environ.get(key_env)
        if not key:
            raise InputError(f"no API key: set the environment variable {key_env} (the spec's key_env)")
        self._headers = {"Authorization": f"Bearer {key}"}
        self._client = httpx.Client(
            timeout=timeout,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self._pool: ThreadPoolExecutor | None = None
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        options = [f"key_env={key_env}"] if key_env != DEFAULT_KEY_ENV else []
        options += [f"dtype={dtype}"] if dtype != "float32" else []
        self.spec = self.url + ("?" + "&".join(options) if options else "")

        info = self._info()
        layers = info.get("layers")
        self.layers: list[str] | None = [str(x) for x in layers] if isinstance(layers, list) else None
        rate = info.get("frame_rate")
        self.frame_rate: float | None = float(rate) if isinstance(rate, int | float) else None
        self.min_samples = int(info["min_samples"]) if isinstance(info.get("min_samples"), int) else 0
        self.padding = str(info.get("padding", "remote"))
        batch, limits = info.get("batch"), info.get("limits")
        self.max_batch = int(batch.get("max_clips", 0)) if isinstance(batch, dict) else 0
        self.max_payload = int(limits.get("max_payload_bytes", 0)) if isinstance(limits, dict) else 0

    def _info(self) -> dict:
        """What ``GET /v1/info`` says, or ``{}`` where the API has no such endpoint."""
        try:
            r = self._client.get(f"{self.url}/v1/info", headers=self._headers)
        except httpx.HTTPError as e:
            raise TargetError(f"cannot reach the API at {self.url} ({type(e).__name__}: {e})") from None
        if r.status_code in (401, 403):
            raise TargetError(f"{self.url} refuses the key in ${self.key_env}: {_detail(r)}")
        if r.status_code != 200:
            return {}
        try:
            info = r.json()
        except ValueError:
            return {}
        return info if isinstance(info, dict) else {}

    def __call__(self, wavs: list[np.ndarray], keys: list[str] | None = None) -> list[dict[str, np.ndarray]]:
        if keys is not None and len(keys) != len(wavs):
            raise ValueError(f"{len(keys)} idempotency keys for {len(wavs)} clips")
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="http-target")
        keys = keys or [None] * len(wavs)
        groups = self._groups(wavs)
        if groups is None:  # one clip a request
            futures = [
                self._pool.submit(_attempt, self._embed, w, k) for w, k in zip(wavs, keys, strict=True)
            ]
            results = [f.result() for f in futures]
        else:
            futures = [
                self._pool.submit(self._embed_batch, [wavs[i] for i in g], [keys[i] for i in g])
                for g in groups
            ]
            results = [r for f in futures for r in f.result()]
        errors = {i: r for i, r in enumerate(results) if isinstance(r, TargetError)}
        if errors:
            raise PartialAnswers([None if i in errors else r for i, r in enumerate(results)], errors)
        return results  # type: ignore[return-value]

    def _groups(self, wavs: list[np.ndarray]) -> list[list[int]] | None:
        """The clips' indices in batches, or None where the API takes one clip a request (or there is one
        clip): as many batches as requests may be in flight, within the API's clip and payload limits."""
        if self.max_batch < 2 or len(wavs) < 2:
            return None
        size = min(self.max_batch, -(-len(wavs) // self.concurrency))
        groups, current, nbytes = [], [], 0
        for i, wav in enumerate(wavs):
            clip_bytes = 4 * len(wav) + 256
            if current and (
                len(current) == size or (self.max_payload and nbytes + clip_bytes > self.max_payload)
            ):
                groups.append(current)
                current, nbytes = [], 0
            current.append(i)
            nbytes += clip_bytes
        return groups + [current]

    def _send(self, path: str, body: bytes, headers: dict, params: dict) -> httpx.Response:
        """POST until an answer that is not to be retried: refused connections, timeouts and the
        retryable statuses are tried again with backoff, a 429 with ``Retry-After`` is waited out
        (one without: a spent quota, which ends the run); returns a 200 or a refusal for the caller."""
        failures, waited = 0, 0.0
        while True:
            try:
                r = self._client.post(f"{self.url}{path}", content=body, headers=headers, params=params)
            except httpx.TransportError as e:  # refused, reset, timed out: the answer may be lost
                failures += 1
                self._backoff(failures, f"{type(e).__name__}: {e}")
                continue
            if r.status_code == 429:
                wait = _retry_after(r.headers.get("Retry-After"))
                if wait is None:
                    raise TargetError(
                        f"{self.url} refuses: {_detail(r)} (429 without Retry-After: quota spent)"
                    )
                if waited + wait > MAX_RETRY_AFTER:
                    raise TargetError(
                        f"{self.url} asks to wait {wait:.0f} s more ({_detail(r)}) after {waited:.0f} s; "
                        "rerun later"
                    )
                time.sleep(wait + self._jitter(0.1))
                waited += wait
                continue
            if r.status_code in _RETRY_STATUSES:
                failures += 1
                self._backoff(failures, f"{r.status_code} {_detail(r)}")
                continue
            return r

    def _embed(self, wav: np.ndarray, key: str | None) -> dict[str, np.ndarray]:
        headers = {**self._headers, "Content-Type": wire.RAW}
        if key:
            headers["Idempotency-Key"] = key
        params = {"encoding": "f32le", "sample_rate": "16000", "format": "safetensors", "dtype": self.dtype}
        r = self._send("/v1/embed", wire.encode_raw(wav), headers, params)
        if r.status_code == 200:
            return self._answer(r, len(wav))
        if r.status_code in _CLIP_STATUSES or _refused_by_defence(r):
            raise ClipRefused(f"the API refuses the clip: {r.status_code} {_detail(r)}")
        raise TargetError(f"{self.url} refuses: {r.status_code} {_detail(r)}")

    def _embed_batch(self, wavs: list[np.ndarray], keys: list[str | None]) -> list[dict | TargetError]:
        """Each clip's answer, or the TargetError (a ClipRefused for the clip's own fault) it met."""
        headers = {**self._headers, "Content-Type": wire.SAFETENSORS}
        r = self._send("/v1/embed/batch", wire.encode_clips(wavs, keys), headers, {"dtype": self.dtype})
        if r.status_code in (404, 405, 413, 415):  # no batches here, or not this many: one clip a request
            if r.status_code != 413:
                self.max_batch = 0
            return [_attempt(self._embed, w, k) for w, k in zip(wavs, keys, strict=True)]
        if r.status_code != 200:
            raise TargetError(f"{self.url} refuses: {r.status_code} {_detail(r)}")
        try:
            results = wire.decode_batch_answer(r.content, r.headers.get("Content-Type"))
        except wire.WireError as e:
            raise TargetError(f"{self.url} sent an unreadable answer: {e}") from None
        if len(results) != len(wavs):
            raise TargetError(f"{self.url} answered {len(results)} clips, {len(wavs)} were sent")
        out: list[dict | TargetError] = []
        for wav, key, result in zip(wavs, keys, results, strict=True):
            kind = str(result.get("type", "")) if "status" in result else ""
            if not kind:
                if self.layers is None:
                    self.layers = list(result)
                out.append(result)
            elif result["status"] in _CLIP_STATUSES or kind.endswith(":refused-by-defence"):
                out.append(
                    ClipRefused(f"the API refuses the clip: {result['status']} {result.get('detail')}")
                )
            elif kind.endswith(":quota-exhausted"):
                out.append(TargetError(f"{self.url} refuses: {result.get('detail')} (quota spent)"))
            else:  # not placed this time (the model's queue was full): alone, with the usual retries
                out.append(_attempt(self._embed, wav, key))
        return out

    def _answer(self, r, num_samples: int) -> dict[str, np.ndarray]:
        try:
            arrays, samples = wire.decode_answer(r.content, r.headers.get("Content-Type"))
        except wire.WireError as e:
            raise TargetError(f"{self.url} sent an unreadable answer: {e}") from None
        if samples is not None and samples != num_samples:
            raise TargetError(f"{self.url} answered for {samples} samples, {num_samples} were sent")
        if self.layers is None:
            self.layers = list(arrays)
        return arrays

    def _jitter(self, scale: float) -> float:
        with self._rng_lock:
            return self._rng.uniform(0, scale)

    def _backoff(self, failures: int, what: str) -> None:
        if failures > self.retries:
            raise TargetError(f"{self.url}: gave up after {failures} tries; last: {what}")
        time.sleep(self._jitter(min(_BACKOFF_CAP, _BACKOFF_BASE * 2**failures)))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        self._client.close()


def _attempt(fn, *args):
    """``fn(*args)``, or the TargetError it raised."""
    try:
        return fn(*args)
    except TargetError as e:
        return e


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _refused_by_defence(r) -> bool:
    """A 403 whose problem type says a defence turned this clip away: the key stays valid, the clip
    is refused (so the run goes on with the clips still answered)."""
    if r.status_code != 403:
        return False
    try:
        doc = r.json()
    except ValueError:
        return False
    return isinstance(doc, dict) and str(doc.get("type", "")).endswith(":refused-by-defence")


def _detail(r) -> str:
    """The ``detail`` (or ``title``) of a problem document, else the start of the body."""
    try:
        doc = r.json()
        if isinstance(doc, dict):
            return str(doc.get("detail") or doc.get("title") or doc)
    except ValueError:
        pass
    return r.text[:200] or r.reason_phrase
