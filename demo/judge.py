"""demo/judge.py -- the measures of a full-duplex conversation, from audio alone.

The demo is judged by what a user hears: the assistant's output audio (as the codec decoded it) on
the input's timeline, against the recording's `events` (demo/corpus.py); nothing here knows the
model. Full-Duplex-Bench's measures (v1 arXiv 2503.04721, v1.5 arXiv 2507.23159), from the papers'
definitions: 1. speech activity per 80 ms frame; 2. what was said: the answer set is closed, so a
`Recognizer` picks the nearest template (espeak through the same codec) by dynamic time warping;
3. per event: answer accuracy and latency, pause and backchannel takeover, barge-in stop latency,
yield and answer after yielding. Each result names its event, its times and what was recognised.

How it connects: train.py's final evaluation runs the val recordings through chat.py's `run_file`
(output row 0 = assistant), `judge`s each, `summarize`s all; the README's results table prints those.
"""
import math
from pathlib import Path

import numpy as np
import torch

from codec import FRAME_RATE, FRAME_SIZE, SAMPLE_RATE

# ----------------------------------------------------------------------------------------------
# 1. Speech activity. The evidence (espeak ASSISTANT renderings at peak 0.8, as in the corpus,
# through a demo codec fitted on them): speech frames have RMS 0.03-1.0 (median ~0.1; a word's
# first/last frame dips to ~0.02), decoded silence < 0.003, quiet frames inside an utterance < 0.02
# and up to 4 frames long (0.32 s: the commas of "Three, four, five, six."). So silences of <= 4
# frames are bridged, and one of >= 5 frames (0.4 s) is the shortest that means "it stopped"
# (for barge-ins too: a 0.24 s silence would find a "stop" at every comma of a count).

THRESHOLD = 0.02      # frame RMS above this is speech
MAX_GAP = 0.32        # silences up to this long are inside one utterance
STOP = 0.4            # a silence at least this long is a stop (used for backchannels and barge-ins)
WINDOW = 2.0          # a response must start within this many seconds of the question's end
MERGE = 1.0           # segments of one answer are less than this apart (e.g. "Hi! How can I help?")
SLACK = 0.24          # an answer this much shorter than its template is still complete (frame edges)
FRAME_S = 1 / FRAME_RATE


def _frame(t):                                   # the frame holding time t (s)
    return int(math.floor(t * FRAME_RATE + 1e-6))


def speech_frames(wav, threshold=THRESHOLD, max_gap=MAX_GAP):
    """wav [N] at 24 kHz -> bool [ceil(N / 1920)]: is frame f (f*80 ms .. (f+1)*80 ms) speech?"""
    x = np.asarray(wav, np.float64).reshape(-1)
    x = np.pad(x, (0, -len(x) % FRAME_SIZE)).reshape(-1, FRAME_SIZE)     # whole frames
    active = np.sqrt((x ** 2).mean(1)) > threshold
    on = np.flatnonzero(active)
    for a, b in zip(on[:-1], on[1:]):           # bridge short silences between two speech frames
        if 1 < b - a <= round(max_gap * FRAME_RATE) + 1:
            active[a + 1:b] = True
    return active


def segments(active):
    """bool per frame -> [(start s, end s)] of the runs of speech."""
    edges = np.diff(np.concatenate([[0], np.asarray(active, np.int8), [0]]))
    return [(float(a * FRAME_S), float(b * FRAME_S))
            for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1))]


def _speaking(active, t):                        # is t's frame speech?
    return bool(0 <= _frame(t) < len(active) and active[_frame(t)])


def _first_stop(active, t0, t1=math.inf, min_len=STOP):
    """The first time >= t0 (at frame resolution; t0 itself if a silence is under way) where a
    silence of >= min_len s begins, if by t1. Past the end of the audio is silence."""
    n = int(round(min_len * FRAME_RATE))
    silent = np.concatenate([~np.asarray(active, bool), np.ones(n, bool)])
    f = next((f for f in range(max(0, _frame(t0)), len(silent) - n + 1) if silent[f:f + n].all()), None)
    return None if f is None or f * FRAME_S > t1 else max(t0, f * FRAME_S)


# ----------------------------------------------------------------------------------------------
# 2. What was said: nearest template by DTW over log-mel features.

WIN, HOP, N_FFT, N_MELS = 600, 240, 1024, 40          # 25 ms window, 10 ms hop, 40 mel bands


def _mel_filterbank(n_mels=N_MELS, n_fft=N_FFT, sr=SAMPLE_RATE, lo=60.0, hi=7600.0):
    """HTK-mel triangles over rfft bins: [n_mels, n_fft // 2 + 1]."""
    mel = np.linspace(2595 * np.log10(1 + lo / 700), 2595 * np.log10(1 + hi / 700), n_mels + 2)
    hz = 700 * (10 ** (mel / 2595) - 1)
    bins = np.arange(n_fft // 2 + 1) * sr / n_fft
    up = (bins - hz[:-2, None]) / (hz[1:-1, None] - hz[:-2, None])
    down = (hz[2:, None] - bins) / (hz[2:, None] - hz[1:-1, None])
    return torch.tensor(np.maximum(0, np.minimum(up, down)), dtype=torch.float32)


_FB, _WINDOW = _mel_filterbank(), torch.hann_window(WIN)


def logmel(wav):
    """wav [N] at 24 kHz -> [T, 40] log-mel frames, leading/trailing quiet trimmed (energy 35 dB
    below the loudest frame), floored 40 dB below the loudest band (so the gain does not matter)
    and mean-normalised over the utterance (so neither does a fixed spectral tilt)."""
    x = torch.as_tensor(np.asarray(wav, np.float32)).reshape(-1)
    if x.numel() < N_FFT or not x.any():
        return torch.zeros(0, N_MELS)
    spec = torch.stft(x, N_FFT, HOP, WIN, _WINDOW, center=False, return_complex=True).abs() ** 2
    mel = (_FB @ spec).T                                          # [T, 40]
    loud = torch.nonzero(mel.sum(1) > mel.sum(1).max() * 10 ** -3.5)[:, 0]
    mel = mel[loud[0]:loud[-1] + 1]
    out = torch.log(mel + 1e-4 * mel.max() + 1e-12)
    return out - out.mean(0)


class Recognizer:
    """Closed-set recogniser: `recognize(wav)` -> (nearest template's text, margin to the runner-up).
    DTW with symmetric weights (diagonal step 2, vertical or horizontal 1: every path from (0, 0)
    to (n-1, L-1) weighs n + L, so dividing by n + L normalises by path length), the template taking
    at most one horizontal step per query frame (at most 2x faster than the query): each row then
    depends on the previous one only, one tensor op per query frame over all templates' frames."""

    def __init__(self, templates):
        self.texts = list(templates)
        self.seconds = {t: len(np.asarray(w).reshape(-1)) / SAMPLE_RATE for t, w in templates.items()}
        feats = [logmel(w) for w in templates.values()]
        if not feats or min(map(len, feats)) < 2:
            raise ValueError("Recognizer needs templates of at least 2 feature frames (~35 ms)")
        self.lengths = torch.tensor([len(f) for f in feats])
        self.flat = torch.cat(feats)                                      # [S, 40], end to end
        self.first = self.lengths.cumsum(0) - self.lengths                # flat index of frame 0
        local = torch.arange(len(self.flat)) - torch.repeat_interleave(self.first, self.lengths)
        # predecessors one / two frames back do not exist at a template's start: +inf there
        self.pen1, self.pen2 = (torch.where(local < k, math.inf, 0.0) for k in (1, 2))

    def distances(self, wav):
        """Normalised DTW distance of wav to every template: [K] (inf where no path fits)."""
        q, S, first = logmel(wav), len(self.flat), self.first
        if len(q) == 0:
            return torch.full((len(self.texts),), math.inf)
        buf = torch.full((S + 2,), math.inf)         # buf[j + 2] = previous row's acc[j]
        for a in range(0, len(q), 64):               # distances of 64 query frames at a time
            for i, d in enumerate(torch.cdist(q[a:a + 64], self.flat), a):
                if i == 0:                           # the start (weight 2), then one step right
                    buf[first + 2], buf[first + 3] = 2 * d[first], 2 * d[first] + d[first + 1]
                    continue
                prev, s1, s2 = buf[2:], buf[1:-1] + self.pen1, buf[:-2] + self.pen2
                d1 = torch.cat([d[:1], d[:-1]])      # d[i, j - 1]
                # min(from above, diagonal, diagonal then right) + d: the three step patterns
                buf[2:] = torch.minimum(prev, torch.minimum(s1 + d, s2 + 2 * d1)) + d
        return buf[2:][first + self.lengths - 1] / (len(q) + self.lengths)

    def recognize(self, wav):
        """-> (text of the nearest template or None, margin: runner-up distance minus the best)."""
        d = self.distances(wav)
        top = d.topk(min(2, len(d)), largest=False).values
        if not torch.isfinite(top[0]):
            return None, 0.0
        return self.texts[int(d.argmin())], float(top[1] - top[0]) if len(top) > 1 else math.inf


def answer_templates(texts, voice=None, codec=None, batch=32):
    """{text: wav}: each text rendered by corpus.synthesize (default voice: the ASSISTANT's) at peak
    0.8 as in the corpus. With `codec`, also through its round trip (to sound like the model's
    output); without, the clean renderings, which recognise codec-decoded speech as well (40/40
    re-rendered answers through the demo codec) in seconds instead of minutes of Griffin-Lim."""
    from demo import corpus
    voice = voice or corpus.ASSISTANT
    wavs = [0.8 * w / max(1e-9, np.abs(w).max()) for w in (corpus.synthesize(t, voice)[0] for t in texts)]
    if codec is None:
        return dict(zip(texts, wavs))
    delay = int(getattr(codec, "DELAY", 0))          # the demo codec's decoded audio lags 30 ms
    dev = next((t.device for t in codec.state_dict().values()), torch.device("cpu"))
    out = []
    for a in range(0, len(wavs), batch):
        chunk = wavs[a:a + batch]
        x = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(w) for w in chunk], batch_first=True)
        x = torch.nn.functional.pad(x, (0, -(x.shape[1] + delay) % FRAME_SIZE + delay))[:, None]  # whole frames
        with torch.inference_mode():
            y = codec.decode(codec.encode(x.to(dev))).float().cpu()[:, 0]
        out += [y[i, delay:delay + len(w)].numpy().copy() for i, w in enumerate(chunk)]
    return dict(zip(texts, out))


# ----------------------------------------------------------------------------------------------
# 3. Turn-taking, per event of one recording, then pooled over recordings.


def judge(events, assistant_wav, recognizer, user_wav=None):
    """Score one recording: its `events`, the assistant's output audio on the input's timeline (24 kHz),
    a Recognizer; user_wav, if given, ends an answer where the user speaks next. -> a dict per event."""
    wav = np.asarray(assistant_wav, np.float32).reshape(-1)
    active = speech_frames(wav)
    segs = segments(active)
    bcs = [(e["start"], e["end"]) for e in events if e["type"] == "backchannel"]
    barge_ins = [e["start"] for e in events if e["type"] == "barge_in"]
    # the user's turns: a pause's start (a question's first half), a barge-in, a question's end (at
    # the latest), and if we have the user's track, any of its speech that is not a backchannel
    turns = barge_ins + [e["start"] for e in events if e["type"] == "pause"]
    turns += [e["question_end"] for e in events if e["type"] == "answer"]
    if user_wav is not None:
        turns += [s for s, e in segments(speech_frames(user_wav)) if not any(s < b1 and e > b0 for b0, b1 in bcs)]

    def answer(t0):
        """The response to a question ending at t0: the first segment starting in t0's frame or
        later, by t0 + WINDOW, and the next ones less than MERGE s apart, up to the next user turn.
        -> (its fields, was it cut by a barge-in?)"""
        end = min([t for t in turns if t > t0], default=len(wav) / SAMPLE_RATE)
        cut = any(t0 < b <= end + FRAME_S for b in barge_ins)
        first = next((s for s in segs if _frame(s[0]) >= _frame(t0) and s[0] <= t0 + WINDOW), None)
        if first is None:
            return dict.fromkeys(("onset", "latency", "span", "recognized", "margin")), cut
        a, b = first
        for s, e in segs:
            b = e if a < s < end and s - b < MERGE else b
        b, pad = min(b, end), int(0.1 * SAMPLE_RATE)           # the frame grid may cut soft edges
        text, margin = recognizer.recognize(wav[max(0, int(a * SAMPLE_RATE) - pad):int(b * SAMPLE_RATE) + pad])
        return {"onset": a, "latency": max(0.0, a - t0), "span": (a, b), "recognized": text, "margin": margin}, cut

    out, answers = [], []
    for k, e in enumerate(events):
        r = {"event": e["type"], "index": k}
        if e["type"] in ("answer", "barge_in"):
            fields, cut = answer(e["question_end"])
            r.update(question_end=e["question_end"], expected=e["answer"], task=e.get("task"),
                     held_out=e.get("held_out"), **fields)
        if e["type"] == "answer":
            # an answer cut by a barge-in is meant to stop early: it counts for latency only
            r.update(took_turn=r["onset"] is not None, interrupted=cut,
                     correct=None if cut else r["recognized"] == e["answer"])
            answers.append(r)
        elif e["type"] == "pause":
            first = next((s for s, _ in segs if _frame(e["start"]) <= _frame(s) and s < e["end"]), None)
            r.update(start=e["start"], end=e["end"], onset=first, takeover=first is not None)
        elif e["type"] == "backchannel":
            r.update(start=e["start"], end=e["end"], **_backchannel(e, active, segs, wav, answers, recognizer))
        elif e["type"] == "barge_in":     # yielded: a silence of >= STOP s begins within WINDOW s
            stop = _first_stop(active, e["start"])
            r.update(start=e["start"], ref_stop=e.get("stop"), speaking_at_onset=_speaking(active, e["start"]),
                     stop=stop, stop_latency=None if stop is None else stop - e["start"],
                     yielded=stop is not None and stop - e["start"] <= WINDOW)
            r["answer_after_yield"] = r["yielded"] and r["recognized"] == e["answer"]
        out.append(r)
    return out


def _backchannel(e, active, segs, wav, answers, recognizer):
    """Speaking at the backchannel's onset, the assistant takes over (yields the floor) if a silence
    of >= STOP s begins in [start, end + 0.5 s] while its answer is incomplete: its speech from the
    answer's onset to that silence is shorter than the expected answer's template less SLACK (by
    duration: a count cut at a comma would be recognised as a valid shorter count). Not speaking at
    the onset, a response starting in [start, end] is a takeover."""
    r = {"speaking_at_onset": _speaking(active, e["start"]), "stop": None, "recognized": None, "complete": None}
    if not r["speaking_at_onset"]:
        r["onset"] = next((s for s, _ in segs if _frame(e["start"]) <= _frame(s) and s <= e["end"]), None)
        r["takeover"] = r["onset"] is not None
        return r
    r["stop"] = _first_stop(active, e["start"], e["end"] + 0.5)
    if r["stop"] is not None:
        ans = next((a for a in reversed(answers) if a["question_end"] <= e["start"]), {})
        onset = ans.get("onset")
        if onset is None or onset > e["start"]:  # then the start of the speech under way
            onset = next(s for s, t in segs if s <= e["start"] < t)
        r["recognized"], _ = recognizer.recognize(wav[int(onset * SAMPLE_RATE):int(r["stop"] * SAMPLE_RATE)])
        need = recognizer.seconds.get(ans.get("expected"), math.inf) - SLACK
        r["complete"] = bool(r["stop"] - onset >= need)
    r["takeover"] = r["complete"] is False
    return r


def summarize(results):
    """Per-event results (of any number of recordings, concatenated) -> the figures of the
    results table. Rates are fractions; None where no event of that kind was seen."""
    def _rate(flags):
        flags = list(flags)
        return sum(flags) / len(flags) if flags else None

    def _median(xs):
        xs = [x for x in xs if x is not None]
        return float(np.median(xs)) if xs else None

    by = {t: [r for r in results if r["event"] == t] for t in ("answer", "pause", "backchannel", "barge_in")}
    scored = [r for r in by["answer"] if r["correct"] is not None]
    groups = {str(h).lower(): [r["correct"] for r in scored if r["held_out"] == h] for h in (None, "combo", "voice")}
    acc = {h: {"n": len(c), "correct": sum(c), "accuracy": _rate(c)} for h, c in groups.items() if c}
    bi = by["barge_in"]
    return {"answers": len(scored), "answers_correct": sum(r["correct"] for r in scored),
            "answer_accuracy": _rate(r["correct"] for r in scored), "answer_accuracy_by_held_out": acc,
            "turns": len(by["answer"]), "turn_taken_rate": _rate(r["took_turn"] for r in by["answer"]),
            "latency_median_s": _median(r["latency"] for r in by["answer"]),
            "pauses": len(by["pause"]), "pause_takeover_rate": _rate(r["takeover"] for r in by["pause"]),
            "backchannels": len(by["backchannel"]),
            "backchannel_takeover_rate": _rate(r["takeover"] for r in by["backchannel"]),
            "barge_ins": len(bi), "barge_in_yield_rate": _rate(r["yielded"] for r in bi),
            "barge_in_stop_latency_median_s": _median(r["stop_latency"] for r in bi if r["yielded"]),
            "barge_in_answer_after_yield_rate": _rate(r["answer_after_yield"] for r in bi)}
