"""demo/judge.py: speech activity on a constructed signal and on espeak speech through a fitted demo
codec, the DTW recogniser (against a plain loop, and on espeak renderings in another rate and pitch),
the templates (clean or through a codec), and every turn-taking measure on hand-made
timelines whose answers are worked out by hand below.

The timing tests place tones on the assistant's track at times on the 80 ms grid, so every
onset and stop is exact, and read them with `ToneRecognizer` (text = the tone's frequency), so
the answers do not depend on the recogniser; one test then uses real renderings and the real one.
"""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from codec import FRAME_SIZE, SAMPLE_RATE  # noqa: E402
from demo import judge  # noqa: E402

torch.set_num_threads(1)   # the test machine is shared; one thread avoids oversubscription
SR = SAMPLE_RATE


def place(n_seconds, *clips):
    """A track of n_seconds with each (start s, wav) added at its start."""
    out = np.zeros(int(round(n_seconds * SR)), np.float32)
    for t, w in clips:
        a = int(round(t * SR))
        out[a:a + len(w)] += w
    return out


def tone(seconds, hz, amp=0.3):
    return (amp * np.sin(2 * np.pi * hz * np.arange(int(round(seconds * SR))) / SR)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Speech activity


def test_speech_frames_and_segments_on_constructed_signal():
    rng = np.random.default_rng(0)
    noise = lambda s: (0.1 * rng.standard_normal(int(round(s * SR)))).astype(np.float32)  # noqa: E731
    # on the grid: bursts 0.40-0.80 and 1.12-1.60 (a 0.32 s gap: one utterance), then 2.00-2.40
    # (a 0.40 s gap: a new one); off the grid: a tone 3.05-3.71; a -46 dBFS floor everywhere
    wav = place(4.5, (0.40, noise(0.40)), (1.12, noise(0.48)), (2.00, noise(0.40)), (3.05, tone(0.66, 440)))
    wav += (0.005 * rng.standard_normal(len(wav))).astype(np.float32)
    active = judge.speech_frames(wav)
    assert active.dtype == bool and len(active) == math.ceil(len(wav) / FRAME_SIZE)
    segs = judge.segments(active)
    assert segs[:2] == [pytest.approx((0.40, 1.60)), pytest.approx((2.00, 2.40))]
    assert len(segs) == 3 and abs(segs[2][0] - 3.05) <= 0.08 and abs(segs[2][1] - 3.71) <= 0.08
    assert not judge.speech_frames(wav, max_gap=0)[10:14].any()     # the 0.32 s gap, unbridged
    assert judge.segments([True, False, True]) == [(0.0, 0.08), (0.16, 0.24)]


@pytest.fixture(scope="module")
def espeak():
    pytest.importorskip("espeakng_loader")
    from demo import corpus
    return corpus


@pytest.fixture(scope="module")
def demo_codec(espeak):
    from demo.codec import DemoCodec
    wavs = [espeak.synthesize(t, espeak.ASSISTANT)[0] for t in ("Three, four, five, six.", "The red cat sleeps.")]
    return DemoCodec.fit([torch.from_numpy(place(len(w) / SR + 0.8, (0.4, 0.8 * w / np.abs(w).max())))
                          for w in wavs], iters=2)


def test_threshold_on_speech_through_the_demo_codec(espeak, demo_codec):
    # The threshold's evidence: a count (commas: pauses of up to 0.32 s) through the codec is one
    # segment where it was placed; the decoded silence around it is far below the threshold.
    w = espeak.synthesize("Three, four, five, six.", espeak.ASSISTANT)[0]
    x = place(4.0, (0.61, 0.8 * w / np.abs(w).max()))
    y = demo_codec.decode(demo_codec.encode(torch.from_numpy(x)[None, None]))[0, 0].numpy()
    y = np.pad(y[demo_codec.DELAY:], (0, demo_codec.DELAY))          # on the input's timeline
    segs = judge.segments(judge.speech_frames(y))
    assert len(segs) == 1, segs
    assert abs(segs[0][0] - 0.61) <= 0.16 and abs(segs[0][1] - (0.61 + len(w) / SR)) <= 0.16
    rms = np.sqrt((y.reshape(-1, FRAME_SIZE) ** 2).mean(1))
    assert rms[:6].max() < 0.2 * judge.THRESHOLD and rms[-6:].max() < 0.2 * judge.THRESHOLD   # silence
    assert np.median(rms[judge.speech_frames(y, max_gap=0)]) > 2 * judge.THRESHOLD            # speech
    assert len(judge.segments(judge.speech_frames(y, max_gap=0))) > 1    # the commas: bridged above


# ---------------------------------------------------------------------------------------------
# Recogniser

FAMILY = ["The red cat sleeps.", "The red dog sleeps.", "The red bird sleeps.", "The red fish sleeps.",
          "The red cow sleeps.", "The blue cat sleeps.", "The green cat sleeps.", "The red cat runs.",
          "The red cat sings.", "The red dog swims."]
COUNTS = ["One, two, three.", "One, two, three, four.", "One, two, three, four, five.", "Two, three, four.",
          "Three, four, five.", "Three, four, five, six.", "Four, five, six.", "Two plus three is five.",
          "Two plus four is six.", "Three plus three is six."]


@pytest.fixture(scope="module")
def recognizer(espeak):
    return judge.Recognizer({t: espeak.synthesize(t, espeak.ASSISTANT)[0] for t in FAMILY + COUNTS})


def _plain_dtw(q, t):
    """The same recursion cell by cell: symmetric weights, at most one step right per query row."""
    d = torch.cdist(q, t).double().numpy()
    n, L = d.shape
    acc = np.full((n, L), np.inf)
    acc[0, 0] = 2 * d[0, 0]
    if L > 1:
        acc[0, 1] = acc[0, 0] + d[0, 1]
    for i in range(1, n):
        for j in range(L):
            c = [acc[i - 1, j] + d[i, j]]
            if j >= 1:
                c.append(acc[i - 1, j - 1] + 2 * d[i, j])
            if j >= 2:
                c.append(acc[i - 1, j - 2] + 2 * d[i, j - 1] + d[i, j])
            acc[i, j] = min(c)
    return acc[-1, -1] / (n + L)


def test_vectorised_dtw_equals_the_plain_loop():
    rng = np.random.default_rng(1)
    wavs = {f"t{k}": (0.1 * rng.standard_normal(int(SR * s))).astype(np.float32) * np.hanning(int(SR * s))
            .astype(np.float32) for k, s in enumerate((0.3, 0.45, 0.7, 1.2))}
    query = wavs["t1"][::-1].copy() + 0.01
    rec = judge.Recognizer(wavs)
    got = rec.distances(query).numpy()
    want = [_plain_dtw(judge.logmel(query), judge.logmel(w)) for w in wavs.values()]
    assert np.isinf(want[3]) and np.isinf(got[3])          # a template over 2x the query's length: no path
    np.testing.assert_allclose(got[:3], want[:3], rtol=1e-4)


def test_recognizer_picks_the_right_template_at_another_rate_and_pitch(espeak, recognizer):
    other = espeak.Voice("en-us+f3", 170, 60)
    best = {}
    for t in FAMILY + COUNTS:
        q = espeak.synthesize(t, other)[0]
        best[t] = (recognizer.recognize(q), float(recognizer.distances(q).min()))
    wrong = {t: g for t, ((g, _), _) in best.items() if g != t}
    assert len(wrong) <= 1, wrong
    assert all(m > 0 for (_, m), _ in best.values())
    # a sentence of a family the templates lack ends far from every template, further than any
    # of the queries above from theirs: it is not taken for one of them (a threshold rejects it)
    for t in ("The capital of France is Paris.", "Bees make honey."):
        assert recognizer.distances(espeak.synthesize(t, other)[0]).min() > 1.5 * max(d for _, d in best.values())


class DelayCodec(torch.nn.Module):
    """A codec whose round trip is the identity, late by DELAY samples (as the demo codec's)."""
    DELAY = 720

    def encode(self, wav):
        return wav

    def decode(self, codes):
        return torch.nn.functional.pad(codes, (self.DELAY, 0))[..., :codes.shape[-1]]


def test_answer_templates_are_the_renderings_through_the_codec_delay_trimmed(espeak):
    texts = ["The red cat sleeps.", "Three, four, five, six."]
    for t in (judge.answer_templates(texts, codec=DelayCodec(), batch=1), judge.answer_templates(texts)):
        for text in texts:
            # espeak-ng is not bit-reproducible (two renderings may differ by a few milliseconds, more
            # after other voices were used), so the rendering is checked by its length, level and edges
            w = t[text]
            assert abs(len(w) - len(espeak.synthesize(text, espeak.ASSISTANT)[0])) <= 240
            assert np.abs(w).max() == pytest.approx(0.8, abs=1e-6) and np.abs(w[:24]).max() > 0.001


# ---------------------------------------------------------------------------------------------
# Turn-taking on hand-made timelines

TONES = {"A": (300.0, 0.8), "B": (500.0, 0.8), "Long": (700.0, 2.96), "Short": (900.0, 1.36)}


class ToneRecognizer:
    """Text = the tone nearest the spectrum's peak; `seconds` = each answer's template length."""
    seconds = {t: s for t, (_, s) in TONES.items()}

    def recognize(self, wav):
        if np.sqrt(np.mean(wav ** 2)) < 1e-3:
            return None, 0.0
        hz = np.argmax(np.abs(np.fft.rfft(wav))) * SR / len(wav)
        return min(TONES, key=lambda t: abs(TONES[t][0] - hz)), 1.0


def say(text, seconds):
    return tone(seconds, TONES[text][0])


def ans(qe, answer, held_out=None):
    return {"type": "answer", "task": "t", "question": "q", "question_end": qe, "answer": answer,
            "held_out": held_out}


def test_answers_and_latency():
    # 1: "A" 0.44 s after the question, in two parts 0.4 s apart (one answer); 2: "A" instead of
    # "B", 0.8 s late; 3: it answers only 2.4 s after the question: it never took the turn.
    events = [ans(1.0, "A"), ans(4.0, "B", "combo"), ans(8.0, "A", "voice")]
    wav = place(12, (1.44, say("A", 0.56)), (2.40, say("A", 0.64)), (4.80, say("A", 0.8)), (10.40, say("A", 0.8)))
    r = judge.judge(events, wav, ToneRecognizer())
    assert [x["event"] for x in r] == ["answer"] * 3
    assert r[0]["latency"] == pytest.approx(0.44) and r[0]["span"] == pytest.approx((1.44, 3.04))
    assert r[0]["correct"] and r[1]["recognized"] == "A" and r[1]["correct"] is False
    assert r[1]["latency"] == pytest.approx(0.8)
    assert r[2]["onset"] is None and r[2]["took_turn"] is False and r[2]["correct"] is False
    s = judge.summarize(r)
    assert (s["answers"], s["answers_correct"]) == (3, 1) and s["answer_accuracy"] == pytest.approx(1 / 3)
    assert s["answer_accuracy_by_held_out"] == {"none": {"n": 1, "correct": 1, "accuracy": 1.0},
                                               "combo": {"n": 1, "correct": 0, "accuracy": 0.0},
                                               "voice": {"n": 1, "correct": 0, "accuracy": 0.0}}
    assert s["turn_taken_rate"] == pytest.approx(2 / 3) and s["latency_median_s"] == pytest.approx(0.62)


def test_answer_ends_at_the_next_user_turn():
    # the assistant speaks 1.44-3.04; without the user's track that is the answer, with the user
    # speaking again at 2.80 the answer ends there (the rest talks over the user's next turn)
    events = [ans(1.0, "A")]
    wav = place(6, (1.44, say("A", 1.6)))
    user = place(6, (2.80, tone(0.8, 200)))
    assert judge.judge(events, wav, ToneRecognizer())[0]["span"] == pytest.approx((1.44, 3.04))
    assert judge.judge(events, wav, ToneRecognizer(), user)[0]["span"] == pytest.approx((1.44, 2.80))


def test_pause_takeover():
    # pause 1.0-2.0: it starts at 1.6 (takeover); pause 5.0-6.0: it starts only at 6.08 (none)
    events = [{"type": "pause", "start": 1.0, "end": 2.0}, {"type": "pause", "start": 5.0, "end": 6.0}]
    wav = place(8, (1.60, say("A", 0.8)), (6.08, say("A", 0.8)))
    r = judge.judge(events, wav, ToneRecognizer())
    assert [x["takeover"] for x in r] == [True, False] and r[0]["onset"] == pytest.approx(1.6)
    assert judge.summarize(r)["pause_takeover_rate"] == 0.5


def test_backchannel_takeover():
    bc = {"type": "backchannel", "start": 2.0, "end": 2.4}
    cases = [  # (expected answer, assistant clips, takeover)
        ("Long", [(1.04, say("Long", 2.96))], False),                       # talks on through it
        ("Long", [(1.04, say("Long", 1.36)), (2.80, say("Long", 1.6))], True),   # stops 0.4 s at 2.4: 1.36 s of 2.96
        ("Short", [(1.04, say("Short", 1.36))], False),                     # stops at 2.4: answer complete
        ("Long", [(2.24, say("Long", 2.96))], True),                        # silent at onset, starts inside
        ("Long", [(2.56, say("Long", 2.96))], False),                       # starts after it: no takeover
        ("Long", [(1.04, say("Long", 1.36)), (2.72, say("Long", 1.6))], False),  # a 0.32 s gap is no stop
    ]
    results = []
    for expected, clips, takeover in cases:
        r = judge.judge([ans(0.6, expected), bc], place(8, *clips), ToneRecognizer())
        assert r[1]["event"] == "backchannel" and r[1]["takeover"] is takeover, (expected, r[1])
        results += r
    assert results[3]["stop"] == pytest.approx(2.4) and results[3]["complete"] is False
    assert results[5]["stop"] == pytest.approx(2.4) and results[5]["complete"] is True
    assert results[7]["speaking_at_onset"] is False and results[7]["onset"] == pytest.approx(2.24)
    assert judge.summarize(results)["backchannel_takeover_rate"] == pytest.approx(2 / 6)


def test_barge_in():
    # the user barges in at 2.0 (new question ends at 4.0, answer "B"). 1: stops at 2.24, answers
    # "B" at 4.4; 2: talks on to 5.04 (stops 3.04 s late: no yield); 3: stops at 2.56, answers "A".
    events = [ans(1.0, "Long"), {"type": "barge_in", "start": 2.0, "stop": 2.2, "task": "t", "question": "q",
                                 "question_end": 4.0, "answer": "B", "held_out": None}]
    runs = [[(1.44, say("Long", 0.80)), (4.40, say("B", 0.8))],
            [(1.44, say("Long", 3.60))],
            [(1.44, say("Long", 1.12)), (4.40, say("A", 0.8))]]
    results = []
    for clips in runs:
        results += judge.judge(events, place(8, *clips), ToneRecognizer())
    first, bi = results[0::2], results[1::2]
    assert all(r["interrupted"] and r["correct"] is None and r["latency"] == pytest.approx(0.44) for r in first)
    assert [r["stop_latency"] for r in bi] == pytest.approx([0.24, 3.04, 0.56])
    assert [r["yielded"] for r in bi] == [True, False, True]
    assert [r["recognized"] for r in bi] == ["B", None, "A"]
    assert [r["answer_after_yield"] for r in bi] == [True, False, False]
    assert all(r["speaking_at_onset"] for r in bi)
    s = judge.summarize(results)
    assert s["answers"] == 0 and s["answer_accuracy"] is None and s["turns"] == 3
    assert s["barge_ins"] == 3 and s["barge_in_yield_rate"] == pytest.approx(2 / 3)
    assert s["barge_in_stop_latency_median_s"] == pytest.approx(0.40)
    assert s["barge_in_answer_after_yield_rate"] == pytest.approx(1 / 3)
    json.dumps([results, s])                # plain Python values: the results can be written out


def test_judge_on_renderings(espeak, recognizer):
    # real speech, the real recogniser: an answer 0.4 s after the question; a count that goes on
    # through a backchannel (its commas are no stop); a count cut after "three" at a backchannel
    A = espeak.ASSISTANT
    full = espeak.synthesize("One, two, three, four, five.", A)[0]
    cut = espeak.synthesize("One, two, three.", A)[0]
    r = judge.judge([ans(1.0, "The red dog sleeps.")], place(4, (1.4, espeak.synthesize("The red dog sleeps.", A)[0])),
                    recognizer)[0]
    assert r["correct"] and r["recognized"] == "The red dog sleeps." and abs(r["latency"] - 0.4) <= 0.08
    bc = {"type": "backchannel", "start": 1.8, "end": 2.2}     # the cut count ends at ~2.6
    on = judge.judge([ans(0.6, "One, two, three, four, five."), bc], place(6, (1.0, full)), recognizer)[1]
    assert on["speaking_at_onset"] and on["stop"] is None and on["takeover"] is False
    off = judge.judge([ans(0.6, "One, two, three, four, five."), bc], place(6, (1.0, cut)), recognizer)[1]
    assert off["takeover"] is True and off["complete"] is False and off["recognized"] == "One, two, three."


def test_the_corpus_reference_track_scores_perfectly(espeak):
    # the corpus's own assistant channel is the ideal model: every answer right, no takeover, every
    # barge-in yielded about where the reference stopped, then answered
    import random
    recs = {}
    for i in range(40):
        tl, tasks = espeak.plan_dialog(random.Random(f"judge:{i}"), "duplex")
        recs.setdefault(tasks[-1], tl)
        if len(recs) == 3:
            break
    texts = {e["answer"] for tl in recs.values() for e in tl.events if "answer" in e} | set(FAMILY + COUNTS)
    rec = judge.Recognizer({t: espeak.synthesize(t, espeak.ASSISTANT)[0] for t in sorted(texts)})
    results = []
    for tl in recs.values():
        stereo = tl.render()
        results += judge.judge(tl.events, stereo[0], rec, user_wav=stereo[1])
    s = judge.summarize(results)
    assert (s["pauses"], s["backchannels"], s["barge_ins"]) == (1, 1, 1)
    assert s["answer_accuracy"] == 1.0 and s["turn_taken_rate"] == 1.0 and 0.25 <= s["latency_median_s"] <= 0.55
    assert s["pause_takeover_rate"] == 0 and s["backchannel_takeover_rate"] == 0
    assert s["barge_in_yield_rate"] == 1.0 and s["barge_in_answer_after_yield_rate"] == 1.0
    bi = next(r for r in results if r["event"] == "barge_in")
    assert abs(bi["stop_latency"] - (bi["ref_stop"] - bi["start"])) <= 0.16
