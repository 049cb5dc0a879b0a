"""Recipes on tiny fixtures that copy each dataset's layout, plus the shared subsets and espeak-ng."""

import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechmimic.cli import recipe as recipe_cli
from speechmimic.recipes import (
    RECIPES,
    espeak,
    fluent,
    fsdd,
    iemocap,
    librispeech,
    shared,
    speech_commands,
    voxceleb1,
)
from speechmimic.tasks import SPLITS, load_task

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng)"
)


def noise(path, seconds=0.1, sr=16000, seed=0):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sf.write(path, (0.1 * rng.standard_normal(round(seconds * sr))).astype(np.float32), sr)
    return path


def ids(task, split):
    return [c.id for c in task.split(split)]


def labels(task, split):
    return {task.label(c) for c in task.split(split)}


# ---------------------------------------------------------------- Speech Commands

SC_SPEAKERS = ("0a7c2a8d", "0b09edd3", "0c40e715", "1d919a90")


def make_speech_commands(root, words=(*speech_commands.KEYWORDS, "bed", "cat"), lists=True):
    for w, word in enumerate(words):
        for i, spk in enumerate(SC_SPEAKERS):
            noise(root / word / f"{spk}_nohash_0.wav", seed=10 * w + i)
    noise(root / "_background_noise_" / "white_noise.wav", seconds=3.0)
    noise(root / "_background_noise_" / "pink_noise.wav", seconds=2.0, seed=1)
    listed = words if lists else words[1:]  # lists=False: the first word has no dev/test clip
    (root / "validation_list.txt").write_text("".join(f"{w}/{SC_SPEAKERS[1]}_nohash_0.wav\n" for w in listed))
    (root / "testing_list.txt").write_text("".join(f"{w}/{SC_SPEAKERS[2]}_nohash_0.wav\n" for w in listed))


def test_speech_commands_ks12_superb_protocol(tmp_path):
    make_speech_commands(tmp_path / "sc")
    (task,) = speech_commands.build(tmp_path / "sc", tmp_path / "out", seed=0, progress=False)
    assert (task.name, task.kind, task.label_key) == ("ks12", "classify", "keyword")
    assert set(task.classes) == set(speech_commands.KS12_CLASSES) and len(task.classes) == 12
    train, dev, test = (task.split(s) for s in SPLITS)
    assert len([c for c in dev if c.labels["keyword"] != "_silence_"]) == 12
    assert {c.labels["word"] for c in train if c.labels["keyword"] == "_unknown_"} == {"bed", "cat"}
    assert all(c.labels["keyword"] == c.labels["word"] for c in test if c.labels["word"] in ("yes", "go"))
    assert "bed-0c40e715_nohash_0" in ids(task, "test")  # from testing_list.txt
    for split, n_words in (("train", 24), ("dev", 12), ("test", 12)):
        crops = [c for c in task.split(split) if c.labels["keyword"] == "_silence_"]
        assert len(crops) == math.ceil(0.1 * n_words)
        for c in crops:
            assert c.duration == 1.0 and len(c.load()) == 16000
            assert c.offset + 1.0 <= sf.info(c.path).duration + 1e-9
    # Same seed, same crops; another seed moves them.
    again = speech_commands.build(tmp_path / "sc", tmp_path / "again", seed=0, progress=False)[0]
    other = speech_commands.build(tmp_path / "sc", tmp_path / "other", seed=1, progress=False)[0]
    offsets = [[c.offset for c in t.split("train")] for t in (task, again, other)]
    assert offsets[0] == offsets[1] != offsets[2]


def test_speech_commands_separate_test_set(tmp_path):
    make_speech_commands(tmp_path / "sc")
    for folder in ("yes", "_unknown_", "_silence_"):
        noise(tmp_path / "test_set" / folder / "0f00b000_nohash_0.wav")
    (task,) = speech_commands.build(
        tmp_path / "sc", tmp_path / "out", test_root=str(tmp_path / "test_set"), progress=False
    )
    assert len(task.split("test")) == 3
    assert labels(task, "test") == {"yes", "_unknown_", "_silence_"}
    noise(tmp_path / "test_set" / "maybe" / "0f00b000_nohash_0.wav")
    with pytest.raises(ValueError, match="maybe"):
        speech_commands.build(tmp_path / "sc", tmp_path / "o2", test_root=str(tmp_path / "test_set"))


def test_speech_commands_needs_background_noise_for_ks12(tmp_path):
    make_speech_commands(tmp_path / "sc")
    shutil.rmtree(tmp_path / "sc" / "_background_noise_")
    with pytest.raises(FileNotFoundError, match="_background_noise_"):
        speech_commands.build(tmp_path / "sc", tmp_path / "out", progress=False)


def test_speech_commands_words_split_rule(tmp_path):
    make_speech_commands(tmp_path / "full", words=("bed", "cat", "dog"))
    (task,) = speech_commands.build(tmp_path / "full", tmp_path / "o1", protocol="words", progress=False)
    assert (task.name, task.classes) == ("words", ["bed", "cat", "dog"])
    assert "validation_list" in task.description
    assert ids(task, "test") == [f"{w}-{SC_SPEAKERS[2]}_nohash_0" for w in ("bed", "cat", "dog")]

    # "bed" has no dev/test clip by the lists: auto switches to the per-word speaker split.
    make_speech_commands(tmp_path / "gappy", words=("bed", "cat", "dog"), lists=False)
    (task,) = speech_commands.build(tmp_path / "gappy", tmp_path / "o2", protocol="words", progress=False)
    assert "speaker hash" in task.description
    for s in SPLITS:
        assert labels(task, s) == {"bed", "cat", "dog"}
    assert [len(task.split(s)) for s in SPLITS] == [6, 3, 3]
    again = speech_commands.build(tmp_path / "gappy", tmp_path / "o3", protocol="words", progress=False)[0]
    assert all(ids(task, s) == ids(again, s) for s in SPLITS)

    with pytest.raises(ValueError, match="split applies to protocol 'words'"):
        speech_commands.build(tmp_path / "full", tmp_path / "o4", split="speaker")


# ---------------------------------------------------------------- VoxCeleb1


def test_voxceleb1_follows_iden_split(tmp_path):
    root = tmp_path / "vox1"
    lines = []
    for s, spk in enumerate(("id10001", "id10002")):
        for u, split in enumerate((1, 1, 2, 3)):
            rel = f"{spk}/vid{u % 2}/{u:05d}.wav"
            noise(root / "wav" / rel, seed=10 * s + u)
            lines.append(f"{split} {rel}")
    (root / "iden_split.txt").write_text("\n".join(lines) + "\n")
    (task,) = voxceleb1.build(root, tmp_path / "out", progress=False)
    assert (task.name, task.kind, task.classes) == ("sid", "classify", ["id10001", "id10002"])
    assert ids(task, "dev") == ["id10001-vid0-00002", "id10002-vid0-00002"]
    assert ids(task, "test") == ["id10001-vid1-00003", "id10002-vid1-00003"]
    assert len(task.split("train")) == 4

    (root / "iden_split.txt").write_text("1 id10003/vid0/00000.wav\n")
    with pytest.raises(ValueError, match=r"iden_split.txt:1"):
        voxceleb1.build(root, tmp_path / "o2", progress=False)
    (root / "iden_split.txt").write_text("4 id10001/vid0/00000.wav\n")
    with pytest.raises(ValueError, match="expected '<1|2|3>"):
        voxceleb1.build(root, tmp_path / "o3", progress=False)


def test_voxceleb1_verification_follows_the_trial_list(tmp_path):
    root = tmp_path / "vox1"
    lines = []
    for s, spk in enumerate(("id10001", "id10002", "id10003", "id10004")):
        for u, split in enumerate((1, 1, 2, 2, 3)):
            rel = f"{spk}/vid{u % 2}/{u:05d}.wav"
            noise(root / "wav" / rel, seed=10 * s + u)
            lines.append(f"{split} {rel}")
    (root / "iden_split.txt").write_text("\n".join(lines) + "\n")
    (root / "veri_test2.txt").write_text(
        "1 id10003/vid0/00000.wav id10003/vid1/00001.wav\n0 id10003/vid0/00000.wav id10004/vid0/00002.wav\n"
    )
    sid, asv = voxceleb1.build(
        root, tmp_path / "out", trials_file=str(root / "veri_test2.txt"), progress=False
    )
    assert sid.name == "sid" and (asv.name, asv.kind, asv.metric) == ("asv", "verify", "eer")
    assert asv.trials("test") == [
        (True, "id10003-vid0-00000", "id10003-vid1-00001"),
        (False, "id10003-vid0-00000", "id10004-vid0-00002"),
    ]
    assert ids(asv, "test") == ["id10003-vid0-00000", "id10003-vid1-00001", "id10004-vid0-00002"]
    # the background and dev speakers are the ones no trial names, from iden_split's sets 1 and 2
    assert {c.labels["speaker"] for s in ("train", "dev") for c in asv.split(s)} == {"id10001", "id10002"}
    assert len(asv.split("train")) == 4 and len(asv.split("dev")) == 4
    assert (True, "id10001-vid0-00002", "id10001-vid1-00003") in asv.trials("dev")

    (root / "veri_test2.txt").write_text("1 id10003/vid0/00000.wav\n")
    with pytest.raises(ValueError, match=r"veri_test2.txt:1"):
        voxceleb1.build(root, tmp_path / "o2", trials_file=str(root / "veri_test2.txt"), progress=False)


# ---------------------------------------------------------------- LibriSpeech

LIBRI = {
    "train-clean-100": {"19-198": ["HELLO WORLD", "THE WORLD"], "26-495": ["HELLO THE WORLD"]},
    "dev-clean": {"84-121": ["WORLD HELLO"]},
    "test-clean": {"61-70": ["THE HELLO", "ODD WORD"]},
}
LEXICON = ";;; tiny\nHELLO  HH AH0 L OW1\nHELLO(1)  HH EH0 L OW1\nWORLD  W ER1 L D\nTHE  DH AH0\n"


def make_librispeech(root):
    for subset, chapters in LIBRI.items():
        for chapter, texts in chapters.items():
            spk, chap = chapter.split("-")
            folder = root / subset / spk / chap
            for u in range(len(texts)):
                noise(folder / f"{chapter}-{u:04d}.flac", seed=u)
            (folder / f"{chapter}.trans.txt").write_text(
                "".join(f"{chapter}-{u:04d} {t}\n" for u, t in enumerate(texts))
            )
    (root / "lexicon.txt").write_text(LEXICON)


def test_librispeech_chars_and_lexicon_phones(tmp_path):
    make_librispeech(tmp_path / "ls")
    with pytest.raises(ValueError, match=r"lacks 2 word\(s\).*ODD"):
        librispeech.build(tmp_path / "ls", tmp_path / "o1", lexicon=str(tmp_path / "ls" / "lexicon.txt"))
    asr, pr = librispeech.build(
        tmp_path / "ls", tmp_path / "out", lexicon=str(tmp_path / "ls" / "lexicon.txt"), oov="skip"
    )
    assert (asr.name, asr.kind, pr.name, pr.kind) == ("asr", "chars", "pr", "phones")
    assert [asr.label(c) for c in asr.split("train")] == ["HELLO WORLD", "THE WORLD", "HELLO THE WORLD"]
    assert asr.tokens(asr.split("dev")[0]) == list("WORLD|HELLO")
    assert [pr.label(c) for c in pr.split("train")][0] == "HH AH L OW W ER L D"
    assert ids(pr, "test") == ["61-70-0000"] and ids(asr, "test") == ["61-70-0000", "61-70-0001"]
    assert "Dropped 1 utterance" in pr.description


@needs_espeak
def test_librispeech_espeak_phones(tmp_path):
    make_librispeech(tmp_path / "ls")
    _, pr = librispeech.build(tmp_path / "ls", tmp_path / "out", espeak="en-us", progress=False)
    assert pr.label(pr.split("dev")[0]) == espeak.phonemize("world hello", "en-us")
    assert len(pr.split("test")) == 2


def test_librispeech_speaker_split_without_transcripts(tmp_path, capsys):
    root = tmp_path / "subset"
    for s, spk in enumerate(("367", "533", "1688")):
        for u in range(5):
            noise(root / spk / f"{spk}-1000-{u:04d}.flac", seed=10 * s + u)
    with pytest.raises(ValueError, match="speaker_split"):
        librispeech.build(root, tmp_path / "o1", train=".", dev=".", test=".", progress=False)
    (task,) = librispeech.build(root, tmp_path / "out", speaker_split=True, seed=3, progress=False)
    assert "task asv not written: it needs utterances of >= 3 s" in capsys.readouterr().err
    assert (task.name, task.classes) == ("sid", ["1688", "367", "533"])
    for s, n in zip(SPLITS, (3, 1, 1), strict=True):
        assert len(task.split(s)) == 3 * n and labels(task, s) == {"1688", "367", "533"}
    again = librispeech.build(root, tmp_path / "again", speaker_split=True, seed=3, progress=False)[0]
    assert all(ids(task, s) == ids(again, s) for s in SPLITS)


# ---------------------------------------------------------------- IEMOCAP

IEMOCAP_LABELS = ("neu", "hap", "exc", "ang", "sad", "fru", "xxx", "neu")


def make_iemocap(root):
    for n in iemocap.SESSIONS:
        session = root / f"Session{n}"
        dialog = f"Ses0{n}F_impro01"
        lines = ["% header line, ignored", ""]
        for u, emotion in enumerate(IEMOCAP_LABELS):
            utt = f"{dialog}_{'FM'[u % 2]}{u:03d}"
            noise(session / "sentences" / "wav" / dialog / f"{utt}.wav", seed=10 * n + u)
            lines.append(f"[{u}.5000 - {u + 1}.2500]\t{utt}\t{emotion}\t[2.5000, 2.5000, 2.5000]")
            lines.append(f"C-E1:\t{emotion};\t()")
        evaluation = session / "dialog" / "EmoEvaluation" / f"{dialog}.txt"
        evaluation.parent.mkdir(parents=True)
        evaluation.write_text("\n".join(lines) + "\n")


def test_iemocap_leave_one_session_out(tmp_path):
    make_iemocap(tmp_path / "iemocap")
    tasks = iemocap.build(tmp_path / "iemocap", tmp_path / "out", seed=0, progress=False)
    assert [t.name for t in tasks] == [f"er_fold{k}" for k in range(1, 6)]
    for k, task in enumerate(tasks, 1):
        assert task.classes == ["ang", "hap", "neu", "sad"]
        assert {c.labels["session"] for c in task.split("test")} == {k}
        assert len(task.split("test")) == 6  # fru and xxx dropped
        assert k not in {c.labels["session"] for s in ("train", "dev") for c in task.split(s)}
        assert len(task.split("dev")) == round(0.1 * 24) and len(task.split("train")) == 24 - 2
        exc = next(c for c in task.split("test") if c.id.endswith("_F002"))
        assert task.label(exc) == "hap"
    again = iemocap.build(tmp_path / "iemocap", tmp_path / "again", seed=0, progress=False)
    other = iemocap.build(tmp_path / "iemocap", tmp_path / "other", seed=5, progress=False)
    assert ids(tasks[0], "dev") == ids(again[0], "dev")
    assert any(ids(a, "dev") != ids(b, "dev") for a, b in zip(tasks, other, strict=True))


# ---------------------------------------------------------------- Fluent Speech Commands


def test_fluent_intents(tmp_path):
    root = tmp_path / "fluent"
    rows = [("activate", "lights", "kitchen"), ("deactivate", "music", "none"), ("increase", "heat", "none")]
    for s, csv_name in enumerate(("train_data.csv", "valid_data.csv", "test_data.csv")):
        lines = [",path,speakerId,transcription,action,object,location"]
        for i, (a, o, loc) in enumerate(rows):
            rel = f"wavs/speakers/spk{s}/utt{i}.wav"
            noise(root / rel, seed=10 * s + i)
            lines.append(f'{i},{rel},spk{s},"Turn {o}, please",{a},{o},{loc}')
        (root / "data").mkdir(exist_ok=True)
        (root / "data" / csv_name).write_text("\n".join(lines) + "\n")
    (task,) = fluent.build(root, tmp_path / "out", progress=False)
    assert (task.name, task.kind, task.label_key) == ("ic", "classify", "intent")
    assert task.classes == sorted("|".join(r) for r in rows)
    clip = task.split("dev")[0]
    assert clip.labels["speaker"] == "spk1" and clip.labels["text"] == "Turn lights, please"
    (root / "data" / "test_data.csv").write_text(",path,speakerId\n0,x.wav,s\n")
    with pytest.raises(ValueError, match="test_data.csv: missing column"):
        fluent.build(root, tmp_path / "o2", progress=False)


# ---------------------------------------------------------------- FSDD


def test_fsdd_digits_and_speakers(tmp_path):
    for digit in (0, 1, 2):
        for spk in ("george", "theo"):
            for index in range(12):
                noise(tmp_path / "recordings" / f"{digit}_{spk}_{index}.wav", sr=8000, seed=index)
    digits, sid = fsdd.build(tmp_path, tmp_path / "out", sid=True, progress=False)
    assert (digits.name, digits.classes, sid.name, sid.classes) == (
        "digits",
        ["0", "1", "2"],
        "fsdd_sid",
        ["george", "theo"],
    )
    assert [len(digits.split(s)) for s in SPLITS] == [12, 30, 30]
    assert {c.labels["index"] for c in digits.split("test")} == set(range(5))
    assert {c.labels["index"] for c in digits.split("dev")} == set(range(5, 10))
    assert all(labels(sid, s) == {"george", "theo"} for s in SPLITS)


# ---------------------------------------------------------------- shared data


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared real-speech data not found at {SHARED}")
def test_shared_subsets(tmp_path):
    tasks = {t.name: t for t in shared.build(SHARED, tmp_path, progress=False)}
    assert sorted(tasks) == ["asv", "digits", "fsdd_sid", "sid", "words"]
    digits = tasks["digits"]
    assert digits.classes == [str(d) for d in range(10)]
    # The usual FSDD test split (take index 0-4): 6 speakers x 10 digits x 5 takes.
    assert len(digits.split("test")) == 300
    assert len(tasks["fsdd_sid"].classes) == 6
    assert len(tasks["sid"].classes) == 10 and [len(tasks["sid"].split(s)) for s in SPLITS] == [60, 20, 20]
    assert len(tasks["words"].classes) == 30
    assert all(len(labels(tasks["words"], s)) == 30 for s in SPLITS)
    assert load_task(tmp_path / "sid").classes == tasks["sid"].classes
    # Crops of the sid splits: no utterance on two sides; trials never pair crops of one utterance.
    crops = {s: tasks["asv"].split(s) for s in SPLITS}
    assert all(c.duration == 3.0 for s in SPLITS for c in crops[s])
    utterances = {s: {c.labels["utterance"] for c in crops[s]} for s in SPLITS}
    assert utterances["test"] <= {c.id for c in tasks["sid"].split("test")}
    assert not utterances["train"] & utterances["test"]
    asv = load_task(tmp_path / "asv")
    assert asv.metric == "eer"
    of = {c.id: c for c in asv.split("test")}
    trials = asv.trials("test")
    assert all(of[a].labels["utterance"] != of[b].labels["utterance"] for _, a, b in trials)
    assert all(t == (of[a].labels["speaker"] == of[b].labels["speaker"]) for t, a, b in trials)
    assert 0 < sum(t for t, _, _ in trials) < len(trials)


# ---------------------------------------------------------------- espeak-ng


def test_normalise_drops_marks_pauses_and_language_switches():
    assert espeak.normalise("h|@|l|'oU w|'3:|l|d\n_:|_:n|'a|s|a#  (fr)k|a|f|,eI(en) ,E|n|i|;") == (
        "h @ l oU w 3: l d n a s a# k a f eI E n i".split()
    )


@needs_espeak
def test_phonemize_is_stable():
    assert espeak.phonemize("hello world") == "h @ l oU w 3: l d"
    assert espeak.phonemize("Hello, world!") == espeak.phonemize("hello world")
    tokens = espeak.phonemize("the quick brown fox jumps over everything", "en-gb").split()
    assert tokens and not any(set(t) & set("',%=;_|") for t in tokens)
    with pytest.raises(ValueError, match="variant"):
        espeak.check_voices(["en-us+nosuchvariant"])


@needs_espeak
def test_espeak_corpus_split_by_voice(tmp_path):
    voices = "en-us+m3,en-gb+f2,en-029+croak"
    (task,) = espeak.build(tmp_path, n_utterances=12, seed=0, voices=voices, progress=False)
    assert (task.name, task.kind, task.label_key) == ("pr_espeak", "phones", "phones")
    assert [len(task.split(s)) for s in SPLITS] == [10, 1, 1]
    split_voices = [{c.labels["voice"] for c in task.split(s)} for s in SPLITS]
    assert [len(v) for v in split_voices] == [1, 1, 1] and set.union(*split_voices) == set(voices.split(","))
    clips = [c for s in SPLITS for c in task.split(s)]
    for clip in clips[:3]:
        assert clip.labels["phones"] == espeak.phonemize(clip.labels["text"], clip.labels["voice"])
        assert sf.info(clip.path).samplerate == 16000 and len(clip.load()) == clip.num_samples
    manifest = (tmp_path / "pr_espeak" / "train.jsonl").read_text()
    assert json.loads(manifest.splitlines()[0])["path"].startswith("audio/")
    # Idempotent: a rerun keeps every file.
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "pr_espeak" / "audio").iterdir()}
    again = espeak.build(tmp_path, n_utterances=12, seed=0, voices=voices, progress=False)[0]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "pr_espeak" / "audio").iterdir()} == mtimes
    assert [c.labels for c in again.split("train")] == [c.labels for c in task.split("train")]
    (task,) = espeak.build(tmp_path / "u", n_utterances=6, voices=voices, split="utterance", progress=False)
    assert [len(task.split(s)) for s in SPLITS] == [4, 1, 1]


# ---------------------------------------------------------------- CLI


def test_every_recipe_option_has_help():
    for name, recipe in RECIPES.items():
        assert set(recipe.parameters()) == set(recipe.options), name


def test_cli_recipe(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="speechmimic")
    recipe_cli.register(parser.add_subparsers(dest="command"))
    for digit in (0, 1):
        for index in range(12):
            noise(tmp_path / "fsdd" / f"{digit}_jackson_{index}.wav", sr=8000, seed=index)
    args = parser.parse_args(["recipe", "fsdd", str(tmp_path / "fsdd"), "--out", str(tmp_path / "out"),
                              "-o", "sid=true", "--no-progress"])  # fmt: skip
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "digits (classify, accuracy)" in out and "train 4, dev 10, test 10" in out and "fsdd_sid" in out
    assert load_task(tmp_path / "out" / "fsdd_sid").classes == ["jackson"]
    assert recipe_cli.parse_options("iemocap", ["dev_fraction=0.2"]) == {"dev_fraction": 0.2}
    with pytest.raises(ValueError, match="no option 'bogus'"):
        recipe_cli.parse_options("fsdd", ["bogus=1"])
    with pytest.raises(ValueError, match="expected true or false"):
        recipe_cli.parse_options("fsdd", ["sid=maybe"])
    args = parser.parse_args(["recipe", "voxceleb1", "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="needs the dataset folder ROOT"):
        args.func(args)
