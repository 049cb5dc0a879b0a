"""What the server holds for requests being answered and not yet charged.

- **Quota**: a request is charged only once its answer is ready, so while it is being answered its
  key's usage in the store does not show it. The quota check adds what is reserved here
  (:meth:`Reservations.reserve`), so concurrent requests of one key cannot together pass its quota.
- **One computation per answer**: the first request for a stored answer's name (its
  ``Idempotency-Key``, or its content) claims it (:meth:`Reservations.claim`); a duplicate arriving
  meanwhile waits for the claim to end (:meth:`Reservations.answering`) and is then answered from
  the store, free.
- **Bytes in flight**: request bodies held at once, per key and all keys together
  (:meth:`Reservations.take_bytes`), so many large uploads cannot exhaust memory.

Everything runs on the server's event loop (nothing here awaits), so no lock is needed.
"""

from __future__ import annotations

import asyncio

from speechmimic.serve.keys import Key, QuotaExceeded


class Hold:
    """One request's reservation of its key's quota: a request and its samples."""

    def __init__(self, owner: Reservations, key_id: int, samples: int):
        self._owner, self.key_id, self.samples = owner, key_id, samples
        self._released = False

    def release(self) -> None:
        """Give back the reserved request and samples (once; later calls do nothing). Called before
        the charge commits: the key's usage then counts the request and must not count it twice."""
        if not self._released:
            held = self._owner._held[self.key_id]
            held[0] -= 1
            held[1] -= self.samples
            self._released = True

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Claim:
    """The right to compute the answer stored under ``name`` for a key; ending it (``with``) lets
    the requests that waited for it go on."""

    def __init__(self, owner: Reservations, key_id: int, name: str):
        self._owner, self.key_id, self.name = owner, key_id, name
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc) -> None:
        self._owner._claims.pop((self.key_id, self.name), None)
        if not self.done.done():
            self.done.set_result(None)


class Reservations:
    def __init__(self):
        self._held: dict[int, list[int]] = {}  # key id -> [requests, samples] being answered now
        self._claims: dict[tuple[int, str], Claim] = {}
        self._bytes: dict[int, int] = {}  # key id -> body bytes held
        self.bytes_held = 0  # all keys

    # -- quota -----------------------------------------------------------------------------------------
    def held(self, key_id: int) -> tuple[int, int]:
        """The requests and samples of ``key_id`` being answered now."""
        requests, samples = self._held.get(key_id, (0, 0))
        return requests, samples

    def reserve(self, key: Key, samples: int) -> Hold:
        """Reserve one request of ``samples`` for ``key``; raises :class:`QuotaExceeded` (nothing
        reserved) if its usage, what is held and this request together would pass its quota."""
        held = self._held.setdefault(key.id, [0, 0])
        exceeded = key.over_quota(key.requests + held[0] + 1, key.samples + held[1] + samples)
        if exceeded:
            raise QuotaExceeded(exceeded)
        held[0] += 1
        held[1] += samples
        return Hold(self, key.id, samples)

    # -- one computation per answer ------------------------------------------------------------------
    def answering(self, key_id: int, name: str) -> asyncio.Future | None:
        """The end of the claim on ``name`` for ``key_id``, if a request is computing it now."""
        claim = self._claims.get((key_id, name))
        return None if claim is None else claim.done

    def claim(self, key_id: int, name: str) -> Claim:
        """Claim ``name`` for ``key_id``; the caller checked :meth:`answering` first (no await between)."""
        assert (key_id, name) not in self._claims, "claimed twice"
        claim = self._claims[(key_id, name)] = Claim(self, key_id, name)
        return claim

    # -- bytes in flight -------------------------------------------------------------------------------
    def take_bytes(self, key_id: int, n: int, key_limit: int, total_limit: int) -> str | None:
        """Hold ``n`` more body bytes for ``key_id``: None if that fits both limits, else which one it
        would pass (``"key"`` or ``"total"``; nothing is taken then)."""
        mine = self._bytes.get(key_id, 0)
        if mine + n > key_limit:
            return "key"
        if self.bytes_held + n > total_limit:
            return "total"
        self._bytes[key_id] = mine + n
        self.bytes_held += n
        return None

    def give_bytes(self, key_id: int, n: int) -> None:
        """Give back ``n`` body bytes of ``key_id`` (its body was decoded, or refused)."""
        left = self._bytes.get(key_id, 0) - n
        if left > 0:
            self._bytes[key_id] = left
        else:
            self._bytes.pop(key_id, None)
        self.bytes_held -= n
