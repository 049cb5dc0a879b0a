"""The errors speechmimic raises on purpose.

Each says what the user gave (a setting, a spec, a file, a dataset) or met (a target, an API, a
ledger on disk) that stops the work, and what to change. The command line prints these as one line;
anything else is a bug, and prints its traceback (``speechmimic --traceback`` prints it for these
too). The families: :class:`InputError` here, ``AudioError`` (:mod:`speechmimic.audio`: a clip that
does not decode), ``TargetError`` (:mod:`speechmimic.targets`: a target that did not answer),
``LedgerError`` (:mod:`speechmimic.ledger`: paid answers that cannot be used), ``WireError``
(:mod:`speechmimic.targets.wire`: bytes that are not our wire format).
"""

from __future__ import annotations


class SpeechmimicError(Exception):
    """Base of every error speechmimic raises on purpose."""


class InputError(SpeechmimicError, ValueError):
    """A setting, spec, manifest, file or dataset that cannot work as given. Also a ValueError, so
    code that caught ValueError catches it still."""


class NotFound(SpeechmimicError, KeyError):
    """Something named that is not there: an API key, a clip's paid answer, a clip's label."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
