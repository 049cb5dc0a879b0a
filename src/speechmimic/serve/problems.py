"""Error answers of the API: RFC 9457 problem documents (``application/problem+json``)."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from speechmimic import audio

PROBLEM = "application/problem+json"
# AudioError subclasses -> (status, problem kind); the first match wins, so subclasses come first.
AUDIO_PROBLEMS = (
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

    @classmethod
    def of_audio(cls, e: audio.AudioError) -> Problem:
        """The answer to a clip the audio layer refused."""
        status, kind = next((s, k) for c, s, k in AUDIO_PROBLEMS if isinstance(e, c))
        return cls(status, kind, e.reason)

    def document(self) -> dict:
        return {
            "type": f"urn:speechmimic:problem:{self.kind}",
            "title": self.kind.replace("-", " "),
            "status": self.status,
            "detail": self.detail,
        }

    def response(self) -> JSONResponse:
        return JSONResponse(
            self.document(), status_code=self.status, headers=self.headers, media_type=PROBLEM
        )
