"""The embedding API's wire format, written once for both ends (the server and the HTTP target).

A request carries one clip: an audio file body (``audio/wav``, ``audio/flac``, ``audio/ogg``) or raw
little-endian samples (``application/octet-stream`` with ``encoding=f32le|s16le`` and
``sample_rate``). Raw float32 at 16 kHz is what the HTTP target sends: it is the ledger's own audio,
so the server answers exactly what an in-process call would.

An answer is the returned layers' frames, ``(T, D)`` each, in the target's order:

- ``application/x-safetensors`` (default): one tensor per layer; metadata ``layers`` (a JSON list,
  because safetensors sorts its tensors by name) and ``num_samples``;
- ``application/json``: ``{"num_samples": n, "layers": [{"name", "shape", "dtype", "data"}]}`` with
  ``data`` the base64 of the little-endian array.

Either in ``float32`` or ``float16`` (half the bytes; answers rounded to 3 significant digits).

A batch (``POST /v1/embed/batch``) carries several clips in one ``application/x-safetensors`` body:
1-D tensors ``0`` .. ``n-1`` (float32 or int16 samples), metadata ``sample_rate`` and, optionally,
``idempotency_keys`` (a JSON list, one per clip, ``null`` for none). Its answer holds, per clip, a
result (:func:`encode_batch_answer`): the clip's layers, or the problem document that refused it.
"""

from __future__ import annotations

import base64
import json

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load

from speechmimic.errors import SpeechmimicError

SAFETENSORS = "application/x-safetensors"
JSON = "application/json"
RAW = "application/octet-stream"
FORMATS = {"safetensors": SAFETENSORS, "json": JSON}
DTYPES = ("float32", "float16")
ENCODINGS = {"f32le": np.dtype("<f4"), "s16le": np.dtype("<i2")}
# Media types of audio file bodies, mapped to the file suffix the decoder reads them by.
AUDIO_TYPES = {
    "audio/wav": ".wav",
    "audio/x-wav": ".wav",
    "audio/wave": ".wav",
    "audio/vnd.wave": ".wav",
    "audio/flac": ".flac",
    "audio/x-flac": ".flac",
    "audio/ogg": ".ogg",
}


class WireError(SpeechmimicError, ValueError):
    """Bytes that are not a well-formed answer or clip."""


def media_type(content_type: str | None) -> str:
    """``audio/wav; charset=x`` -> ``audio/wav`` (lower case, parameters dropped)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def encode_raw(wav: np.ndarray) -> bytes:
    return np.ascontiguousarray(wav, dtype="<f4").tobytes()


def decode_raw(body: bytes, encoding: str) -> np.ndarray:
    """Raw samples as float32 in [-1, 1] (int16 scaled by 1/32768)."""
    if encoding not in ENCODINGS:
        raise WireError(f"unknown encoding {encoding!r}; valid: {sorted(ENCODINGS)}")
    dtype = ENCODINGS[encoding]
    if len(body) % dtype.itemsize:
        raise WireError(f"{len(body)} bytes is not a whole number of {encoding} samples")
    samples = np.frombuffer(body, dtype=dtype)
    if encoding == "s16le":
        return samples.astype(np.float32) / 32768.0
    return samples.astype(np.float32)  # a copy: frombuffer's array is read-only


def encode_answer(
    arrays: dict[str, np.ndarray], num_samples: int, fmt: str = "safetensors", dtype: str = "float32"
) -> tuple[bytes, str]:
    """``(body, content type)`` of an answer; layers keep the order of ``arrays``."""
    if fmt not in FORMATS:
        raise WireError(f"unknown format {fmt!r}; valid: {sorted(FORMATS)}")
    if dtype not in DTYPES:
        raise WireError(f"unknown dtype {dtype!r}; valid: {list(DTYPES)}")
    cast = {k: np.ascontiguousarray(v, dtype=np.dtype(dtype).newbyteorder("<")) for k, v in arrays.items()}
    if fmt == "safetensors":
        meta = {"layers": json.dumps(list(cast)), "num_samples": str(int(num_samples))}
        return safetensors_bytes(cast, meta), SAFETENSORS
    layers = [
        {"name": k, "shape": list(v.shape), "dtype": dtype, "data": base64.b64encode(v.tobytes()).decode()}
        for k, v in cast.items()
    ]
    return json.dumps({"num_samples": int(num_samples), "layers": layers}).encode(), JSON


_ST_DTYPES = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<i2"): "I16"}


def safetensors_bytes(arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """``arrays`` (float32, float16 or int16) in the safetensors format, byte for byte the same for
    the same input: the header keeps the order given (safetensors' own writer orders its metadata
    by chance, so the same answer sent twice would differ)."""
    header: dict = {"__metadata__": metadata}
    offset, blobs = 0, []
    for name, arr in arrays.items():
        arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
        blob = arr.tobytes()
        header[name] = {"dtype": _ST_DTYPES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(blob)]}  # fmt: skip
        offset += len(blob)
        blobs.append(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return len(text).to_bytes(8, "little") + text + b"".join(blobs)


def decode_answer(body: bytes, content_type: str | None) -> tuple[dict[str, np.ndarray], int | None]:
    """``({layer: float32 (T, D)}, num_samples)`` from an answer's bytes, in the sender's layer order."""
    kind = media_type(content_type)
    if kind == SAFETENSORS:
        try:
            arrays = st_load(body)
            meta = _safetensors_metadata(body)
        except (SafetensorError, ValueError) as e:
            raise WireError(f"malformed safetensors answer ({e})") from None
        order = json.loads(meta["layers"]) if "layers" in meta else list(arrays)
        if sorted(order) != sorted(arrays):
            raise WireError(f"answer lists layers {order} but holds {sorted(arrays)}")
        out = {name: arrays[name] for name in order}
        samples = int(meta["num_samples"]) if "num_samples" in meta else None
    elif kind == JSON:
        try:
            doc = json.loads(body)
            out = {}
            for layer in doc["layers"]:
                raw = base64.b64decode(layer["data"], validate=True)
                dtype = np.dtype(layer["dtype"]).newbyteorder("<")
                out[layer["name"]] = np.frombuffer(raw, dtype=dtype).reshape(layer["shape"])
            samples = doc.get("num_samples")
        except (ValueError, KeyError, TypeError) as e:
            raise WireError(f"malformed JSON answer ({type(e).__name__}: {e})") from None
    else:
        raise WireError(f"answer of unknown type {content_type!r}; expected {SAFETENSORS} or {JSON}")
    for name, arr in out.items():
        if arr.ndim != 2:
            raise WireError(f"layer {name!r} has shape {arr.shape}, expected (frames, width)")
    return {k: v.astype(np.float32, copy=False) for k, v in out.items()}, samples


def _safetensors_metadata(body: bytes) -> dict[str, str]:
    if len(body) < 8:
        raise ValueError("too short")
    size = int.from_bytes(body[:8], "little")
    if size > len(body) - 8:
        raise ValueError("header larger than the body")
    return json.loads(body[8 : 8 + size]).get("__metadata__") or {}


def encode_clips(
    wavs: list[np.ndarray], keys: list[str | None] | None = None, sample_rate: int = 16000
) -> bytes:
    """A batch request's body: the clips as float32 tensors ``0`` .. ``n-1``."""
    meta = {"sample_rate": str(int(sample_rate))}
    if keys is not None:
        meta["idempotency_keys"] = json.dumps(list(keys))
    return safetensors_bytes({str(i): np.asarray(w, dtype="<f4") for i, w in enumerate(wavs)}, meta)


def decode_clips(body: bytes) -> tuple[list[tuple[bytes, str]], list[str | None], int]:
    """A batch request's clips, each as (raw little-endian samples, their encoding), its idempotency
    keys (None where a clip has none) and its sample rate."""
    try:
        tensors = st_load(body)
        meta = _safetensors_metadata(body)
    except (SafetensorError, ValueError) as e:
        raise WireError(f"malformed batch: not safetensors ({e})") from None
    n = len(tensors)
    if sorted(tensors) != sorted(str(i) for i in range(n)):
        raise WireError(f"a batch's tensors are named 0 .. n-1, got {sorted(tensors)[:5]}")
    clips = []
    for i in range(n):
        arr = tensors[str(i)]
        encoding = {np.dtype("float32"): "f32le", np.dtype("int16"): "s16le"}.get(arr.dtype)
        if encoding is None or arr.ndim != 1:
            raise WireError(f"clip {i}: 1-D float32 or int16 samples, got {arr.dtype} {arr.shape}")
        clips.append((np.ascontiguousarray(arr, arr.dtype.newbyteorder("<")).tobytes(), encoding))
    try:
        keys = json.loads(meta.get("idempotency_keys", "null")) or [None] * n
        rate = int(meta.get("sample_rate", "16000"))
    except ValueError as e:
        raise WireError(f"malformed batch metadata ({e})") from None
    if not isinstance(keys, list) or len(keys) != n or not all(k is None or isinstance(k, str) for k in keys):
        raise WireError(f"idempotency_keys: a list of {n} strings or nulls")
    return clips, keys, rate


def encode_batch_answer(
    results: list[tuple[dict[str, np.ndarray], int] | dict], fmt: str, dtype: str
) -> tuple[bytes, str]:
    """A batch's answer: per clip, ``(arrays, num_samples)`` or a problem document (a dict)."""
    if fmt not in FORMATS:
        raise WireError(f"unknown format {fmt!r}; valid: {sorted(FORMATS)}")
    np_dtype = np.dtype(dtype).newbyteorder("<")
    summary, arrays = [], {}
    for i, result in enumerate(results):
        if isinstance(result, dict):
            summary.append(result)
            continue
        layers, samples = result
        summary.append({"status": 200, "num_samples": int(samples), "layers": list(layers)})
        arrays.update({f"{i}/{k}": np.ascontiguousarray(v, dtype=np_dtype) for k, v in layers.items()})
    if fmt == "safetensors":
        return safetensors_bytes(arrays, {"results": json.dumps(summary)}), SAFETENSORS
    for i, item in enumerate(summary):
        if item["status"] == 200:
            item["layers"] = [
                {"name": k, "shape": list(arrays[f"{i}/{k}"].shape), "dtype": dtype,
                 "data": base64.b64encode(arrays[f"{i}/{k}"].tobytes()).decode()}
                for k in item["layers"]
            ]  # fmt: skip
    return json.dumps({"results": summary}).encode(), JSON


def decode_batch_answer(body: bytes, content_type: str | None) -> list[dict[str, np.ndarray] | dict]:
    """Per clip, its layers (float32) or the problem document that refused it (a dict with ``status``)."""
    if media_type(content_type) != SAFETENSORS:
        raise WireError(f"a batch answer is {SAFETENSORS}, got {content_type!r}")
    try:
        tensors = st_load(body)
        summary = json.loads(_safetensors_metadata(body)["results"])
    except (SafetensorError, ValueError, KeyError) as e:
        raise WireError(f"malformed batch answer ({type(e).__name__}: {e})") from None
    out = []
    for i, item in enumerate(summary):
        if item.get("status") != 200:
            out.append(item)
            continue
        try:
            out.append({k: tensors[f"{i}/{k}"].astype(np.float32, copy=False) for k in item["layers"]})
        except KeyError as e:
            raise WireError(f"batch answer lists layer {e} of clip {i} but holds none") from None
    return out
