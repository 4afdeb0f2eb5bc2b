"""demo/corpus.py: speech with word timings from libespeak-ng, a held-out set that shares no item
with training, and recordings whose audio, segments and events agree."""
import json
import random

import numpy as np
import pytest
import soundfile as sf

import data
from demo import corpus

pytest.importorskip("espeakng_loader")


def test_synthesize_gives_speech_and_word_timings():
    wav, words = corpus.synthesize("Count from three to six.", corpus.ASSISTANT)
    assert wav.dtype == np.float32 and 1.0 < len(wav) / 24000 < 3.0
    assert np.abs(wav[:240]).max() > 0.005 and np.abs(wav[-240:]).max() > 0.005     # trimmed, not clipped
    assert [w for w, _, _ in words] == ["Count", "from", "three", "to", "six"]
    starts, ends = [s for _, s, _ in words], [e for _, _, e in words]
    assert starts[0] == 0 and starts == sorted(starts) and ends[-1] == pytest.approx(len(wav) / 24000, abs=0.01)
    faster, _ = corpus.synthesize("Count from three to six.", corpus.Voice("en-us+f3", 220, 50, 50))
    assert len(faster) < 0.85 * len(wav)                      # the rate reaches the synthesiser
    with pytest.raises(RuntimeError, match="no voice"):
        corpus.synthesize("hi", corpus.Voice("xx-nonexistent"))


def test_held_out_items_share_no_question_with_training():
    train, held = corpus.items(False), corpus.items(True)
    assert held and not {q for _, q, _, _ in train} & {q for _, q, _, _ in held}
    # held-out combinations use known words only; counts start where training counts never do
    train_words = {w for _, q, a, _ in train for w in (q + " " + a).lower().replace(".", "").split()}
    assert all(set(a.lower().strip(".").split()) <= train_words for t, _, a, _ in held if t == "repeat")
    starts = {q.split()[2] for t, q, _, _ in held if t == "count"}
    assert starts == {corpus.NUM[s] for s in corpus.HELD_OUT_COUNT_STARTS}
    assert not starts & {q.split()[2] for t, q, _, _ in train if t == "count"}
    assert set(corpus.candidate_answers()) >= {a for _, _, a, _ in train + held}


def test_plan_keeps_validation_apart():
    recs = corpus.plan(5, 5, 5, 8, 5)
    val = [r for r in recs if r[1] == "val"]
    assert len(val) == 8 and {r[3] for r in val} == {"combo", "voice"} and {r[2] for r in val} == {"dialog", "duplex"}
    assert all(r[3] is None for r in recs if r[1] == "train")
    rnd = random.Random(0)
    assert corpus.user_voice(rnd, held_out=True).name == corpus.HELD_OUT_VOICE
    assert all(corpus.user_voice(rnd).name != corpus.HELD_OUT_VOICE for _ in range(50))


def test_demo_corpus_recordings_agree_with_their_manifest(tmp_path):
    man = corpus.demo(tmp_path, n_dialogs=2, n_duplex=6, n_utterances=2, n_val=4, n_words=2, jobs=1,
                      log=lambda *a: None)
    lines = [json.loads(x) for x in man.read_text().splitlines()]
    assert len(lines) == 16 and {x["kind"] for x in lines} == {"dialog", "duplex", "utterance", "words"}
    seen = set()
    for x in lines:
        wav, sr = sf.read(tmp_path / x["audio"], always_2d=True)
        assert sr == 24000 and wav.shape[1] == 2
        active = np.zeros(wav.shape, bool)           # each voice is only heard inside its segments
        for s in x["segments"]:
            ch = data.SPEAKERS.index(s["speaker"])
            a, b = int(s["start"] * 24000), int(s["end"] * 24000)
            assert np.abs(wav[a:b, ch]).max() > 0.3
            assert s["words"] and s["words"][0][1] == pytest.approx(s["start"], abs=1e-3)
            active[max(0, a - 48):b + 48, ch] = True
        assert np.abs(wav[~active]).max() < 1e-3
        user = [s for s in x["segments"] if s["speaker"] == "user"]
        assistant = [s for s in x["segments"] if s["speaker"] == "assistant"]
        for e in x["events"]:
            seen.add(e["type"])
            if e["type"] == "answer":                # the answer follows its question in 0.3-0.5 s
                nxt = min((s for s in assistant if s["start"] > e["question_end"]), key=lambda s: s["start"])
                assert nxt["text"] == e["answer"] and 0.29 < nxt["start"] - e["question_end"] < 0.51
            elif e["type"] == "pause":               # silence inside the user's turn, assistant quiet
                assert any(abs(s["end"] - e["start"]) < 1e-3 for s in user)
                assert not any(s["start"] < e["end"] and s["end"] > e["start"] for s in assistant)
            elif e["type"] == "backchannel":         # said while the assistant speaks
                assert any(s["start"] < e["start"] and s["end"] > e["end"] for s in assistant)
            elif e["type"] == "barge_in":            # the assistant is cut 0.16-0.32 s after the onset
                cut = [s for s in assistant if s["start"] < e["start"] < s["end"] + 0.01]
                assert len(cut) == 1 and cut[0]["end"] == pytest.approx(e["stop"], abs=2e-3)
                assert 0.15 < e["stop"] - e["start"] < 0.33
        if x["split"] == "val":
            assert x["held_out"] in ("combo", "voice")
    assert seen == {"answer", "pause", "backchannel", "barge_in"}
    recs = data.read_manifest(man)                   # and data.py reads it, word timings included
    assert len(recs) == 16 and all("words" in s for r in recs for s in r["segments"])


def test_train_py_builds_the_demo_data_once(tmp_path):
    """train.py's `demo_corpus`: synthesise and prepare into data_dir when it holds nothing, then
    leave it alone (a second call reads nothing and writes nothing)."""
    root, said = tmp_path / "demo" / "prepared", []
    counts = dict(n_dialogs=2, n_duplex=1, n_utterances=2, n_val=2, n_words=0, jobs=1)
    corpus.ensure_prepared(root, counts, codec_codes=16, log=said.append)
    index = json.loads((root / "index.json").read_text())
    assert index["tokenizer_wait_id"] is not None and index["shards"] and (tmp_path / "demo" / "manifest.jsonl").is_file()
    stamp, said[:] = (root / "index.json").stat().st_mtime_ns, []
    corpus.ensure_prepared(root, counts, codec_codes=16, log=said.append)
    assert said == [] and (root / "index.json").stat().st_mtime_ns == stamp
    assert index["codec"] == data.DEMO_CODEC_FILE               # relative: the prepared folder can move
    with pytest.raises(ValueError, match="16 codes per codebook, the config asks for 64"):
        corpus.ensure_prepared(root, counts, codec_codes=64)    # data of another codec is not reused silently
    data.prepare(tmp_path / "demo" / "manifest.jsonl", root, tokenizer="bpe", codec_codes=8, log=said.append)
    assert data.load_codec(root / data.DEMO_CODEC_FILE).cardinality == 8   # nor is a codec fitted at another size
