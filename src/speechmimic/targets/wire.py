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
