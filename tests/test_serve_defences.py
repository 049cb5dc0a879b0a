"""A defended spec behind a real server on loopback: each key answered through its own defences (as
in-process), the detector's refusals free and kept across a restart, /v1/info what clients get."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from speechmimic.defences import Chain, Defended, parse_chain
from speechmimic.serve.config import ServeConfig
from speechmimic.serve.process import ServerProcess as Server
from speechmimic.targets import load_backend, wire

EMBED = "/v1/embed"
# two of the three layers, a secret shuffle per key (4 padding dimensions), and a detector that
# flags any key once it has 3 nearest-neighbour distances (4 distinct clips): W < 0.999 for real
# speech, deterministically
SPEC = (
    "resemblyzer?layers=all|layers?keep=lstm1,lstm3|transform?kind=shuffle&pad=4&seed=3"
    "|prada?min_queries=3&threshold=0.999&action=refuse"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with Server(tmp_path_factory.mktemp("serve_defences"), SPEC, "--max-delay-ms", "5") as s:
        yield s


@pytest.fixture(scope="module")
def local():
    return load_backend(parse_chain(SPEC)[0])


@pytest.fixture(scope="module")
def wavs(speech_clips):
    return [c.load() for c in speech_clips[0] if c.labels["kind"] == "keyword"][:8]  # half a second each


def ask(server, token, wav, **headers):
    r = httpx.post(
        server.url + EMBED,
        content=wire.encode_raw(wav),
        headers={"Content-Type": wire.RAW, "Authorization": f"Bearer {token}", **headers},
        timeout=30,
    )
    return r


def answer(r) -> dict[str, np.ndarray]:
    assert r.status_code == 200, r.text
    return wire.decode_answer(r.content, r.headers["content-type"])[0]


def in_process(local, account, wav) -> dict[str, np.ndarray]:
    return Defended(local, parse_chain(SPEC)[1], account=account)([wav])[0]


def refused(r) -> None:
    assert r.status_code == 403, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/problem+json"
    doc = r.json()
    assert doc["type"] == "urn:speechmimic:problem:refused-by-defence", doc
    assert "flagged by the extraction detector" in doc["detail"]


def usage(server, token) -> dict:
    return httpx.get(server.url + "/v1/usage", headers={"Authorization": f"Bearer {token}"}).json()


def test_each_key_gets_its_own_defended_answer_as_in_process_and_the_same_again(server, local, wavs):
    alice, bob = server.key("alice"), server.key("bob")
    a, b = answer(ask(server, alice, wavs[0])), answer(ask(server, bob, wavs[0]))
    assert list(a) == list(b) == ["lstm1", "lstm3"]
    assert not np.allclose(a["lstm1"], b["lstm1"])  # the two keys' answers do not pool
    for name, got in (("alice", a), ("bob", b)):
        expected = in_process(local, name, wavs[0])
        for layer in expected:
            np.testing.assert_allclose(got[layer], expected[layer], rtol=1e-4, atol=1e-5)
    # the same key asking again gets the same answer: the same request again (replayed from the
    # store, free), then under an Idempotency-Key (computed and charged) and again (replayed, free)
    again = answer(ask(server, alice, wavs[0]))
    first = ask(server, alice, wavs[0], **{"Idempotency-Key": "alice-0"})
    replay = ask(server, alice, wavs[0], **{"Idempotency-Key": "alice-0"})
    assert replay.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first.headers
    for got in (again, answer(first), answer(replay)):
        assert all(np.array_equal(got[k], a[k]) for k in a)
    assert usage(server, alice)["requests"] == 2  # the replays were free


def test_a_flagged_key_is_refused_free_and_stays_refused_after_a_restart(server, wavs):
    thief, honest = server.key("thief"), server.key("honest")
    for wav in wavs[:4]:  # the 4th distinct clip raises the alarm; it is still answered
        answer(ask(server, thief, wav))
    refused(ask(server, thief, wavs[4]))
    refused(ask(server, thief, wavs[5], **{"Idempotency-Key": "t-5"}))
    assert usage(server, thief)["requests"] == 4  # the refusals were not charged
    answer(ask(server, thief, wavs[0]))  # what it was answered before it may have again, free
    for wav in wavs[:2]:
        answer(ask(server, honest, wav))

    server.stop()
    server.start()  # same database, same defence state beside it
    assert (server.root / "serve.defences.sqlite").exists()
    refused(ask(server, thief, wavs[6]))
    assert usage(server, thief)["requests"] == 4
    answer(ask(server, honest, wavs[2]))  # three distinct clips: never tested, never flagged
    assert usage(server, honest)["requests"] == 3


def test_info_describes_the_defended_answers(server, local, wavs):
    info = httpx.get(server.url + "/v1/info").json()
    got = answer(ask(server, server.key("info"), wavs[7]))
    assert info["layers"] == list(got) == ["lstm1", "lstm3"]
    assert info["widths"] == {k: v.shape[1] for k, v in got.items()} == {"lstm1": 260, "lstm3": 260}
    served = json.loads((server.root / "ready.json").read_text())["target"]
    assert served == f"{local.spec}|{Chain(parse_chain(SPEC)[1]).spec}"
    assert served.startswith("resemblyzer?layers=1,2,3|layers?keep=lstm1,lstm3|transform?kind=shuffle")


def test_serve_refuses_an_account_segment_and_puts_the_state_beside_the_db(tmp_path):
    with pytest.raises(ValueError, match="answers each request as its API key"):
        ServeConfig(target=f"{SPEC}|account?name=alice").check()
    cfg = ServeConfig(target=SPEC, db=str(tmp_path / "keys.sqlite"))
    cfg.check()
    assert cfg.defence_state_path() == str(tmp_path / "keys.defences.sqlite")
    assert ServeConfig(target=SPEC, defence_state="s.sqlite").defence_state_path() == "s.sqlite"
