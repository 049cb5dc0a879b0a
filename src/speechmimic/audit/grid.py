"""The audit's grid: every budget x defence x attacker is one extraction, plus every defence priced
on honest traffic; each cached under ``root`` and resumable.

    reference.json                    probe scores of the target (undefended) and MFCC (and, with a
                                      watermark secret, of the unmarked original)
    calibration.npz                   the owner's statistics of ordinary answers (held-out clips)
    ledgers/clean-*/                  the target's own answers, computed once (the owner's, unpaid)
    cells/<defence>/<attacker>/<budget>/   one thief: its ledger, defence state, student, cell.json
                                      (and proof.json: watermark and dataset inference on its copy)
    benign/<defence>/benign.json      each application's task score and alarms through the defence

A thief is a fresh set of API keys (``<attacker>-<budget>-k<j>``) on a fresh defence state: the
grid's cells never see each other. In-process, the target's answers are computed once per clip and
replayed through each defence chain, exactly as the chain would treat them behind the API. With
``http``, every thief pays over the wire instead: each defence is served by ``speechmimic serve`` on
a loopback port (``servers/<defence>``), each thief key is an API key there, and the detector's
statistics are read from the server's own defence state; honest traffic stays in-process (the same
chain code the server runs).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from speechmimic import budget, records
from speechmimic.audio import SAMPLE_RATE
from speechmimic.audit.suites import Suite
from speechmimic.config import option
from speechmimic.defences import (
    Chain,
    Defended,
    Query,
    Refused,
    calibrate,
    digest,
    load_target,
    parse_defences,
)
from speechmimic.defences.prada import Prada
from speechmimic.distill import DistillConfig
from speechmimic.errors import InputError
from speechmimic.evaluate import compare
from speechmimic.extract import ExtractConfig, extract
from speechmimic.ledger import Ledger, content_key, query_clips
from speechmimic.probe.pooled import ProbeSet, cv_by_state, state_scores, verification_eer
from speechmimic.proof import examine, load_secret
from speechmimic.serve.process import ServerProcess
from speechmimic.student import PRESETS
from speechmimic.sybil import Sybils
from speechmimic.targets import Target
from speechmimic.upstream import load_upstream

CALIBRATION = "{calibration}"  # in a defence's chain: the owner's calibration file


@dataclass(frozen=True)
class Attacker:
    """How a thief adapts: ``keys`` API keys pooled by ``anchors`` shared clips; ``augment``: share of
    training clips seen as augmented views of the paid ones."""

    keys: int = 1
    anchors: int = 8
    augment: float = 0.0


ATTACKERS = {
    "naive": Attacker(),
    "sybils": Attacker(keys=4),
    "augment": Attacker(augment=0.5),
}


DEFAULT_TARGET = "resemblyzer?layers=all"


@dataclass
class AuditConfig:
    """Everything that decides an audit's result (``report.json`` records it under ``config``)."""

    target: str = option(DEFAULT_TARGET, "target spec", metavar="SPEC")
    corpus: str = option(
        "demo",
        "'demo' (the corpus shipped in the package) or a folder laid out as ../shared/data (FSDD, the "
        "LibriSpeech subset, Speech Commands)",
    )
    budgets: list[str] = option(
        help="budgets, comma-separated: N%, N clips or Ns/Nm", metavar="B,B", factory=lambda: ["10%", "40%"]
    )
    # name -> chain written after the target ("" for none); empty: the CPU-sized default grid
    defences: dict[str, str] = option(help="defences by name", factory=dict)
    attackers: list[str] = option(
        help=f"comma-separated, of {', '.join(ATTACKERS)}: sybils pool 4 keys through 8 anchor clips, "
        "augment trains on augmented views of half the clips",
        metavar="A,A",
        factory=lambda: ["naive", "sybils"],
    )
    steps: int = option(100, "stage-2 steps of every thief")
    seed: int = option(0, "seed of every random choice")
    preset: str = option("small", "the thieves' student preset", choices=tuple(PRESETS))
    streams: int = option(8, "honest streams per application, for the detector's false-positive rate")
    fpr: float = option(0.05, "the false-positive rate at which the detector's true-positive rate is stated")
    secret: str | None = option(
        None,
        "the watermark secret of the target (from 'speechmimic watermark mark', the target then served "
        "as 'SPEC|mark?secret=FILE', or 'watermark fingerprint'): every stolen copy is tested for the "
        "mark and by dataset inference, and the report adds what the mark costs on the probes",
        metavar="FILE",
    )
    proof: bool = option(False, "dataset inference on every stolen copy (implied by --secret)")
    http: bool = option(
        False,
        "thieves pay over the wire: each defence served by 'speechmimic serve' on a loopback port "
        "(OUT/servers), each thief key an API key there; the report adds what the server charged",
    )

    def __post_init__(self):
        unknown = [a for a in self.attackers if a not in ATTACKERS]
        if unknown:
            raise InputError(f"unknown attackers {unknown}; choose from {sorted(ATTACKERS)}")
        if not self.budgets:
            raise InputError("an audit needs at least one budget")
        for b in self.budgets:
            budget.check(b)
        for chain in self.defences.values():
            if chain:  # a typo fails now, not after hours of the grid (the calibration comes later)
                parse_defences(uncalibrated(chain))


def uncalibrated(chain: str) -> str:
    """``chain`` without its calibration placeholder: checkable before the calibration exists."""
    return re.sub(r"calibration=\{calibration\}&?", "", chain).rstrip("?&")


def _best(scores: dict[str, float]) -> float:
    return max(scores.values())


def answer_scores(answers: list[dict[str, np.ndarray]], ps: ProbeSet) -> dict[str, float]:
    """The probe set's score on each returned layer of these answers (pooled as the probes pool)."""
    feats = {
        k: np.stack([np.concatenate([a[k].mean(0), a[k].std(0)]) for a in answers]).astype(np.float32)
        for k in answers[0]
    }
    if ps.task == "verify":
        return {k: round(1 - verification_eer(x, ps.labels, ps.groups), 4) for k, x in feats.items()}
    return cv_by_state(feats, ps.labels, groups=ps.groups)


class _Replayed:
    """The target's own answers to the pool, computed once into a ledger and replayed: the defence
    chain then treats them exactly as it treats a fresh answer behind the API."""

    def __init__(self, target: Target, ledger: Ledger):
        self.ledger = ledger
        self.spec, self.frame_rate, self.layers = target.spec, target.frame_rate, target.layers
        self.padding, self.min_samples = target.padding, target.min_samples

    def __call__(self, wavs, keys=None):
        return [self.ledger.get(content_key(w)) for w in wavs]


class Audit:
    def __init__(self, target: Target, suite: Suite, root: str | Path, cfg: AuditConfig, progress=True):
        """``target``: the encoder ``cfg.target`` names, loaded."""
        self.suite, self.cfg, self.progress, self.http = suite, cfg, progress, cfg.http
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.target = target
        self._clean: dict[str, Ledger] = {}
        self._servers: dict[str, ServerProcess] = {}

    def clean(self, part: str, clips) -> Ledger:
        """The target's undefended answers to ``clips`` (the owner's own, in a float32 ledger)."""
        if part not in self._clean:
            led = Ledger(self.root / "ledgers" / f"clean-{part}", store="float32")
            query_clips(self.target, list(clips), led, progress=self.progress)
            self._clean[part] = led
        return self._clean[part]

    def replayed(self) -> _Replayed:
        return _Replayed(self.target, self.clean("pool", self.suite.pool))

    # -- the owner's side: calibration and reference scores --------------------------------------------
    def calibration(self) -> Path:
        path = self.root / "calibration.npz"
        if not path.exists():
            led = self.clean("heldout", self.suite.heldout)
            keys = [led.key_of(c.id) for c in self.suite.heldout]
            calibrate([led.get(k) for k in keys if k], path)
        return path

    def chain(self, defence: str) -> str:
        return self.cfg.defences[defence].replace(CALIBRATION, str(self.calibration()))

    def reference(self) -> dict:
        path = self.root / "reference.json"
        made_by = {
            "wanted": {"target": self.target.spec, "suite": self.suite.name, "secret": self.cfg.secret}
        }
        if (record := records.read(path, made_by)) is not None:
            return record["scores"]
        clips = [c for ps in self.suite.probes.values() for c in ps.clips]
        led = self.clean("probes", clips)
        ref = {
            "target": state_scores(load_upstream(self.target, ledger=led), self.suite.probes),
            "mfcc": state_scores(load_upstream("mfcc"), self.suite.probes),
        }
        if self.cfg.secret:  # what the mark costs the owner: the same probes on the unmarked encoder
            original = load_secret(self.cfg.secret).original
            led = Ledger(self.root / "ledgers" / "original-probes", store="float32")
            ref["original"] = state_scores(load_upstream(original, ledger=led), self.suite.probes)
        return records.write(path, made_by, {"scores": ref})["scores"]

    # -- proof of theft on each stolen copy --------------------------------------------------------------
    def proof(self, budget: str, defence: str, attacker: str, cell: dict) -> dict | None:
        """The watermark test and dataset inference on the cell's student: private clips are the
        owner's held-out ones (the trigger is mixed into them too), public ones 128 pool clips this
        thief never paid for."""
        if cell["student"] is None or not (self.cfg.proof or self.cfg.secret):
            return None
        path = self.cell_dir(budget, defence, attacker) / "proof.json"
        secret_file = Path(self.cfg.secret) if self.cfg.secret else None
        wanted = {
            "secret": str(secret_file),
            "secret_sha256": hashlib.sha256(secret_file.read_bytes()).hexdigest() if secret_file else None,
            "student": cell["student"],
            "seed": self.cfg.seed,
        }
        if (record := records.read(path, {"wanted": wanted})) is not None:
            return record["proof"]
        paid = Ledger(self.cell_dir(budget, defence, attacker) / "ledger")
        unpaid = [c for c in self.suite.pool if paid.key_of(c.id) is None]
        order = np.random.default_rng(self.cfg.seed).permutation(len(unpaid))[:128]
        private = [c.load() for c in self.suite.heldout]
        found = examine(
            load_upstream(cell["student"]),
            load_secret(secret_file) if secret_file else None,
            private[:64],
            private,
            [unpaid[i].load() for i in order],
            groups=[c.path for c in self.suite.heldout],
            seed=self.cfg.seed,
        )
        return records.write(path, {"wanted": wanted}, {"proof": found})["proof"]

    # -- one thief ------------------------------------------------------------------------------------
    def cell_dir(self, budget: str, defence: str, attacker: str) -> Path:
        return self.root / "cells" / defence / attacker / budget.replace("%", "pct")

    def cell(self, budget: str, defence: str, attacker: str) -> dict:
        out = self.cell_dir(budget, defence, attacker)
        wanted = {"budget": budget, "defence": defence, "chain": self.cfg.defences[defence],
                  "attacker": attacker, "settings": asdict(ATTACKERS[attacker]),
                  "steps": self.cfg.steps, "seed": self.cfg.seed, "preset": self.cfg.preset}  # fmt: skip
        done, started = out / "cell.json", out / "wanted.json"
        if (record := records.read(done, {"wanted": wanted})) is not None:
            return record
        if started.exists() and json.loads(started.read_text()) != wanted:
            shutil.rmtree(out)  # another thief was here: a fresh one (an interrupted same one resumes)
        out.mkdir(parents=True, exist_ok=True)
        started.write_text(json.dumps(wanted))
        t0 = time.time()
        a = ATTACKERS[attacker]
        chain = self.chain(defence)
        accounts = [f"{attacker}-{budget}-k{j}" for j in range(a.keys)]
        if self.http:
            server = self.server(defence)
            keys = [self._http_key(server, account, out) for account in accounts]
            state = server.root / "serve.defences.sqlite"
        else:
            state = out / "defence.sqlite"
            keys = [Defended(self.replayed(), parse_defences(chain), acc, state) for acc in accounts]
        target = keys[0] if a.keys == 1 else Sybils(keys, a.anchors, store=out / "sybil_anchors.npz")
        cfg = ExtractConfig(
            budget=budget,
            strategy="random",
            seed=self.cfg.seed,
            preset=self.cfg.preset,
            distill=DistillConfig(steps=self.cfg.steps, seed=self.cfg.seed, augment=a.augment),
        )
        record = {}
        try:
            result = extract(target, self.suite.pool, out, cfg, progress=self.progress)
            student = result["student"]["path"]
        except ValueError as e:  # every selected clip refused: nothing to train on
            if "usable paid response" not in str(e):
                raise
            result, student = None, None
        ledger = Ledger(out / "ledger")
        spent = ledger.spent_samples / SAMPLE_RATE + getattr(target, "extra_seconds", 0.0)
        gate = Chain(parse_defences(chain), state)  # reads the keys' state as the defences left it
        record.update(
            selected=result["queries"] if result else None,
            answered=len(ledger),
            spent_seconds=round(spent, 2),
            student=student,
            probes=self._student_probes(student),
            keys={acc: gate.status(acc) for acc in accounts},
            detector=[h for acc in accounts for h in _w_history(gate, acc)] or None,
            seconds=round(time.time() - t0, 1),
        )
        if self.http:
            record["server_charged_seconds"] = round(
                sum(server.usage(acc).samples for acc in accounts) / SAMPLE_RATE, 2
            )
        gate.store.close()
        return records.write(done, {"wanted": wanted}, record)

    def server(self, defence: str) -> ServerProcess:
        """The defence served on a loopback port (kept across reruns, so the thieves' ledgers,
        which record the URL, resume)."""
        if defence not in self._servers:
            root = self.root / "servers" / re.sub(r"[^A-Za-z0-9_.-]", "_", defence)
            chain = self.chain(defence)
            spec = f"{self.target.spec}|{chain}" if chain else self.target.spec
            port_file = root / "port"
            port = int(port_file.read_text()) if port_file.exists() else None
            server = ServerProcess(root, spec, port=port).start()
            port_file.write_text(str(server.port))
            self._servers[defence] = server
        return self._servers[defence]

    def _http_key(self, server: ServerProcess, account: str, out: Path) -> Target:
        """An ``http://`` target paying through the API key ``account`` (made once, kept in ``out``)."""
        tokens = out / "keys.json"
        known = json.loads(tokens.read_text()) if tokens.exists() else {}
        if account not in known:
            known[account] = server.key(account)
            tokens.write_text(json.dumps(known))
            tokens.chmod(0o600)
        env = "SPEECHMIMIC_AUDIT_KEY_" + re.sub(r"[^A-Za-z0-9]", "_", account).upper()
        os.environ[env] = known[account]
        return load_target(f"{server.url}?key_env={env}")

    def close(self) -> None:
        for server in self._servers.values():
            server.stop()
        self._servers.clear()

    def _student_probes(self, student: str | None) -> dict | None:
        if student is None:
            return None
        upstream = load_upstream(student)
        return state_scores(upstream, self.suite.probes, keep=lambda s: s.startswith("pred."))

    # -- honest applications ---------------------------------------------------------------------------
    def benign(self, defence: str) -> dict:
        """Each application's task score on clean and on defended answers (its full traffic through
        one key), and the detector's statistic on ``streams`` keys, each a seeded random half of the
        application's clips in a seeded random order."""
        out = self.root / "benign" / defence.replace("/", "_")
        done = out / "benign.json"
        chain = self.chain(defence)
        wanted = {"chain": self.cfg.defences[defence], "streams": self.cfg.streams, "seed": self.cfg.seed}
        if (record := records.read(done, {"wanted": wanted})) is not None:
            return record
        shutil.rmtree(out, ignore_errors=True)  # a fresh server: no state of an interrupted run
        out.mkdir(parents=True)
        defences = parse_defences(chain)
        gate = Chain(defences, out / "state.sqlite")
        apps = {}
        for app, ps in self.suite.benign.items():
            led = self.clean(f"app-{app.replace(' ', '-')}", ps.clips)
            clean = [led.get(led.key_of(c.id)) for c in ps.clips]
            wavs = [c.load() for c in ps.clips]
            rng = np.random.default_rng(self.cfg.seed)
            streams = [np.arange(len(wavs))] + [
                rng.permutation(len(wavs))[: len(wavs) // 2] for _ in range(self.cfg.streams)
            ]
            got, refused, detector = None, [], []
            for s, order in enumerate(tqdm(streams, desc=f"benign {app}", disable=not self.progress)):
                account = f"{app}#{s}"
                answers: dict[int, dict] = {}
                for i in order:
                    q = Query(account, wavs[i], digest(wavs[i]))
                    try:
                        gate.admit(q)
                        answers[i] = gate.apply(q, clean[i])
                    except Refused:
                        if s == 0:
                            refused.append(int(i))
                if s == 0:
                    got = answers
                detector += _w_history(gate, account)
            # a refused request is a failed one: the app has no embedding of that clip (zeros)
            served = [
                got.get(i, {k: np.zeros_like(v) for k, v in clean[i].items()}) for i in range(len(clean))
            ]
            apps[app] = {
                "task": ps.task,
                "clips": len(ps.clips),
                "clean": _best(answer_scores(clean, ps)),
                "defended": _best(answer_scores(served, ps)),
                "refused": len(refused),
                "detector": detector or None,
            }
        return records.write(done, {"wanted": wanted}, {"apps": apps})

    # -- everything ------------------------------------------------------------------------------------
    def run(self) -> dict:
        reference = self.reference()
        cells = [(b, d, a) for d in self.cfg.defences for a in self.cfg.attackers for b in self.cfg.budgets]
        records = []
        bar = tqdm(cells, desc="audit", unit="thief", disable=not self.progress)
        try:
            for b, d, a in bar:
                bar.set_postfix_str(f"{d} / {a} / {b}")
                record = self.cell(b, d, a)
                record["proof"] = self.proof(b, d, a, record)
                records.append(record)
        finally:
            self.close()
        benign = {d: self.benign(d) for d in self.cfg.defences}
        return {"reference": reference, "cells": records, "benign": benign}


def _w_history(chain: Chain, account: str) -> list[dict]:
    """The detector's W after each of ``account``'s new clips, and the audio-seconds by then."""
    out = []
    for slot, d in zip(chain.slots, chain.defences, strict=True):
        state = chain.store.load(account).get(slot)
        if isinstance(d, Prada) and state is not None:
            out.append({"account": account, "w": _floats(state["w"]), "seconds": _floats(state["seconds"])})
    return out


def _floats(a) -> list[float | None]:
    return [None if np.isnan(x) else round(float(x), 5) for x in np.asarray(a, np.float64)]


def recovered(reference: dict, probes: dict | None) -> dict[str, float | None]:
    """Per probe, the student's share of the target's advantage over MFCC (0 without a student)."""
    out = {}
    for name in reference["target"]:
        t, m = _best(reference["target"][name]), _best(reference["mfcc"][name])
        if probes is None:
            out[name] = 0.0
            continue
        s = compare({"target": t, "student": _best(probes[name]), "baseline": m}, "accuracy")
        out[name] = s["recovered"]
    return out
