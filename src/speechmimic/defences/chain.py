"""Defences in a row between a target and the keys that ask it, and the spec that names them.

A defended spec is a target spec followed by ``|``-separated defences, each ``kind[?key=value&...]``,
applied to answers in the order written (each sees the answer as the one before left it), and
optionally an ``account?name=N&state=FILE`` segment: the API key an in-process target answers as
(default ``local``) and the SQLite file keeping per-key state (default: in memory)::

    resemblyzer?layers=all|noise?snr=20
    hf:/models/hubert?layers=4,8,12|transform?kind=rotate&seed=7|b4b?planes=8|account?name=alice&state=s.sqlite

A ledger records the whole spec, so every paid answer says what it was answered through. Behind
``serve`` the same chain runs per request with the request's key as the account
(:class:`Chain`); in-process, :class:`Defended` is a :class:`~speechmimic.targets.Target` like any.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np

from speechmimic.defences.b4b import B4B
from speechmimic.defences.base import Defence, Query, Refused, digest
from speechmimic.defences.mark import Mark
from speechmimic.defences.perturb import Layers, Noise, Round
from speechmimic.defences.prada import Prada
from speechmimic.defences.quota import Quota
from speechmimic.defences.state import StateStore
from speechmimic.defences.transform import Transform
from speechmimic.errors import InputError
from speechmimic.targets import Target, load_backend, parse_spec
from speechmimic.targets.base import PartialAnswers, TargetError
from speechmimic.targets.registry import parse_options

DEFENCES: dict[str, type[Defence]] = {
    d.kind: d for d in (Noise, Round, Layers, Transform, B4B, Prada, Quota, Mark)
}
ACCOUNT = "account"
DEFAULT_ACCOUNT = "local"


def _options(segment: str) -> tuple[str, dict[str, str]]:
    kind, _, query = segment.strip().partition("?")
    return kind, parse_options(query, repr(segment))


def parse_chain(spec: str) -> tuple[str, list[Defence], str | None, str | None]:
    """``(target spec, defences, account, state file)`` of a defended spec (account and state None
    where the spec has no ``account`` segment). A plain spec is checked and has no defences."""
    base, _, chain = spec.partition("|")
    parse_spec(base.strip())
    return (base.strip(), *_segments(chain, spec))


def parse_defences(chain: str) -> list[Defence]:
    """The defences of a chain written without its target (``noise?snr=10|prada``)."""
    defences, account, _ = _segments(chain, chain)
    if account is not None:
        raise InputError(f"a chain of defences names no account: {chain!r}")
    return defences


def _segments(chain: str, spec: str) -> tuple[list[Defence], str | None, str | None]:
    segments = chain.split("|") if chain.strip() else []
    defences: list[Defence] = []
    account = state = None
    for i, segment in enumerate(segments):
        kind, options = _options(segment)
        if kind == ACCOUNT:
            if i != len(segments) - 1:
                raise InputError(f"the {ACCOUNT} segment comes last in a defended spec: {spec!r}")
            unknown = sorted(set(options) - {"name", "state"})
            if unknown:
                raise InputError(
                    f"unknown option {unknown[0]!r} of {ACCOUNT}; valid options: ['name', 'state']"
                )
            account, state = options.get("name"), options.get("state")
            continue
        if kind not in DEFENCES:
            raise InputError(f"unknown defence {kind!r} in {spec!r}; valid defences: {sorted(DEFENCES)}")
        defences.append(DEFENCES[kind](**options))
    return defences, account, state


class Chain:
    """The defences of a spec with their per-account state: what ``serve`` runs per request."""

    def __init__(self, defences: list[Defence], state: str | Path | StateStore | None = None):
        self.defences = defences
        self.store = state if isinstance(state, StateStore) else StateStore(state)
        self.slots = [f"{i}.{d.kind}" for i, d in enumerate(defences)]

    def layers(self, layers: list[str] | None) -> list[str] | None:
        for d in self.defences:
            layers = d.layers(layers)
        return layers

    def _states(self, account: str) -> dict[str, dict[str, np.ndarray]]:
        # copies: a defence that fails half-way leaves the saved state as it was
        saved = self.store.load(account)
        return {
            slot: {k: v.copy() for k, v in saved[slot].items()} if slot in saved else d.new_state()
            for slot, d in zip(self.slots, self.defences, strict=True)
            if d.stateful
        }

    def admit(self, q: Query) -> None:
        """Raise :class:`Refused` if a defence turns ``q`` away (a quota reserves its seconds here)."""
        with self.store.lock:
            states = self._states(q.account)
            for slot, d in zip(self.slots, self.defences, strict=True):
                d.admit(q, states.get(slot, {}))
            if states:
                self.store.save(q.account, states)

    def apply(self, q: Query, answer: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The answer ``q``'s account receives, its state updated and saved."""
        with self.store.lock:
            states = self._states(q.account)
            for slot, d in zip(self.slots, self.defences, strict=True):
                answer = d.answer(q, answer, states.get(slot, {}))
            if states:
                self.store.save(q.account, states)
            return answer

    def status(self, account: str) -> dict[str, dict]:
        """Per defence, what the owner reads off ``account``'s state."""
        with self.store.lock:
            states = self._states(account)
            return {
                slot: d.status(states.get(slot, {}))
                for slot, d in zip(self.slots, self.defences, strict=True)
                if d.stateful
            }

    @property
    def spec(self) -> str:
        return "|".join(d.spec for d in self.defences)


class Defended:
    """A target answering through a :class:`Chain`, as ``account``: a :class:`Target` itself."""

    def __init__(
        self,
        target: Target,
        defences: list[Defence],
        account: str = DEFAULT_ACCOUNT,
        state: str | Path | StateStore | None = None,
    ):
        self.inner = target
        self.chain = Chain(defences, state)
        self.account = account
        self.frame_rate = target.frame_rate
        self.padding = target.padding
        self.min_samples = target.min_samples
        self.max_samples = getattr(target, "max_samples", None)
        self.layers = self.chain.layers(target.layers)
        self._takes_keys = "keys" in inspect.signature(target.__call__).parameters

    @property
    def spec(self) -> str:
        where = f"&state={self.chain.store.path}" if self.chain.store.path is not None else ""
        chain = f"|{self.chain.spec}" if self.chain.defences else ""
        return f"{self.inner.spec}{chain}|{ACCOUNT}?name={self.account}{where}"

    def __call__(self, wavs: list[np.ndarray], keys: list[str] | None = None) -> list[dict[str, np.ndarray]]:
        queries = [Query(self.account, np.asarray(w, np.float32), digest(w)) for w in wavs]
        errors: dict[int, TargetError] = {}
        admitted = []
        for i, q in enumerate(queries):
            try:
                self.chain.admit(q)
                admitted.append(i)
            except Refused as e:
                errors[i] = e
        out: list[dict[str, np.ndarray] | None] = [None] * len(wavs)
        if admitted:
            batch = [queries[i].wav for i in admitted]
            sub_keys = [keys[i] for i in admitted] if keys is not None else None
            try:
                answers = self.inner(batch, keys=sub_keys) if self._takes_keys else self.inner(batch)
            except PartialAnswers as e:
                answers = e.answers
                errors.update({admitted[j]: err for j, err in e.errors.items()})
            for i, answer in zip(admitted, answers, strict=True):
                if answer is not None:
                    out[i] = self.chain.apply(queries[i], answer)
        if errors:
            raise PartialAnswers(out, errors)
        return out


def load_target(
    spec: str, device: str = "cpu", account: str | None = None, state: str | Path | None = None
) -> Target:
    """Any spec, plain (:func:`speechmimic.targets.load_backend`) or defended, as a target; ``account`` and
    ``state`` apply where the spec does not name them."""
    if "|" not in spec:
        return load_backend(spec, device=device)
    base, defences, spec_account, spec_state = parse_chain(spec)
    return Defended(
        load_backend(base, device=device),
        defences,
        account=spec_account or account or DEFAULT_ACCOUNT,
        state=spec_state or state,
    )
