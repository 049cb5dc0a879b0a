"""What the server has promised and not yet charged, per API key.

A request is charged only once its answer is ready, so while it is being answered its key's usage
in the store does not show it. The quota check adds what is reserved here, so that concurrent
requests of one key cannot together pass its quota; the ``Idempotency-Key`` values being answered
are kept too, so a retry arriving meanwhile is told to wait (409) instead of being answered twice.

Everything runs on the server's event loop (no awaits inside), so no lock is needed.
"""

from __future__ import annotations

from speechmimic.serve.keys import Key, QuotaExceeded


class Hold:
    """One request's reservation: its key's requests and samples, and its idempotency key."""

    def __init__(self, owner: Reservations, key_id: int, samples: int, idem: str | None):
        self._owner, self.key_id, self.samples, self.idem = owner, key_id, samples, idem
        self._released = False

    def release(self) -> None:
        """Give back the reserved request and samples (once; later calls do nothing). Called before
        the charge commits: the key's usage then counts the request and must not count it twice."""
        if not self._released:
            held = self._owner._held[self.key_id]
            held[0] -= 1
            held[1] -= self.samples
            self._released = True

    def close(self) -> None:
        """Release, and let the idempotency key be asked again."""
        self.release()
        self._owner._in_flight.discard((self.key_id, self.idem))

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Reservations:
    def __init__(self):
        self._held: dict[int, list[int]] = {}  # key id -> [requests, samples] being answered now
        self._in_flight: set[tuple[int, str]] = set()

    def held(self, key_id: int) -> tuple[int, int]:
        """The requests and samples of ``key_id`` being answered now."""
        requests, samples = self._held.get(key_id, (0, 0))
        return requests, samples

    def in_flight(self, key_id: int, idem: str | None) -> bool:
        """Whether a request of ``key_id`` with this ``Idempotency-Key`` is being answered now."""
        return idem is not None and (key_id, idem) in self._in_flight

    def reserve(self, key: Key, samples: int, idem: str | None = None) -> Hold:
        """Reserve one request of ``samples`` for ``key``; raises :class:`QuotaExceeded` (nothing
        reserved) if its usage, what is held and this request together would pass its quota."""
        held = self._held.setdefault(key.id, [0, 0])
        exceeded = key.over_quota(key.requests + held[0] + 1, key.samples + held[1] + samples)
        if exceeded:
            raise QuotaExceeded(exceeded)
        held[0] += 1
        held[1] += samples
        if idem is not None:
            self._in_flight.add((key.id, idem))
        return Hold(self, key.id, samples, idem)
