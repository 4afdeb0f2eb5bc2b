"""demo/corpus.py -- the embedded spoken-dialog corpus: what a user with no data trains on.

`python data.py demo --out DIR` (or `corpus.demo(DIR)`) synthesises, with libespeak-ng and no
downloads, a user talking to an assistant about a closed, checkable task set, and writes stereo
FLAC files (left = assistant, right = user) plus DIR/manifest.jsonl in our manifest format, which
`data.py prepare` turns into shards like any other data set. In the order the corpus is built:

  1. speech: libespeak-ng through ctypes (the `espeakng-loader` wheel ships the library and its
     voice data); its word events give word timings;
  2. the task set: repeat a phrase, count, add/subtract, short facts. Held-out items test what a
     small model can generalise: unseen combinations of known words, counts from unseen starts;
  3. voices: the user speaks in many voices, rates and pitches (one voice only validation hears),
     the assistant always in one;
  4. recordings: one to three words (short sentences teach the sound of each word before long
     ones must be aligned), single sentences, turn-taking dialogs, and the full-duplex phenomena of
     Full-Duplex-Bench: pauses
     inside a user turn (the assistant waits), backchannels while it speaks (it goes on), barge-ins
     (it stops within a few frames and answers the new question);
  5. rendering to a timeline: every manifest line carries sentence segments with word timings and
     `events`, the timeline the evaluation (demo/judge.py) scores the model's audio against.
"""
import ctypes
import json
import random
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from codec import SAMPLE_RATE, resample
from grid import SPEAKERS

# ----------------------------------------------------------------------------------------------
# 1. Speech. libespeak-ng in synchronous mode calls us back with blocks of 16-bit samples and
# events; a WORD event gives the word's character position in the text and its first sample.


class _Event(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", ctypes.c_char * 8)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))
_EVENT_END, _EVENT_WORD = 0, 1             # espeak_EVENT_TYPE: list terminated, word
_RATE, _PITCH, _RANGE = 1, 3, 4            # espeak_PARAMETER
_SYNCHRONOUS, _POS_CHARACTER, _CHARS_UTF8 = 2, 1, 1
_espeak = None


def _library():
    """Load and initialise libespeak-ng once per process (state is global to the library)."""
    global _espeak
    if _espeak is None:
        try:
            import espeakng_loader
        except ImportError:
            raise RuntimeError("the demo corpus needs the espeakng-loader package (pip install -r "
                               "requirements.txt), or bring your own manifest") from None
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        rate = lib.espeak_Initialize(_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
        if rate <= 0:
            raise RuntimeError(f"libespeak-ng failed to initialise ({rate})")
        state = {"samples": [], "words": []}

        def callback(wav, n, events):
            if n > 0:
                state["samples"].append(np.ctypeslib.as_array(wav, (n,)).copy())
            i = 0
            while events[i].type != _EVENT_END:
                if events[i].type == _EVENT_WORD:
                    e = events[i]
                    state["words"].append((e.text_position - 1, e.length, e.sample))
                i += 1
            return 0
        state["callback"] = _CALLBACK(callback)          # keep a reference: C holds only a pointer
        lib.espeak_SetSynthCallback(state["callback"])
        _espeak = (lib, rate, state)
    return _espeak


@dataclass(frozen=True)
class Voice:
    name: str          # espeak voice + variant, e.g. "en-us+m3"
    rate: int = 150    # words per minute
    pitch: int = 50    # 0..100
    range: int = 50    # pitch range 0..100


def synthesize(text, voice):
    """text -> (wav float32 [N] at 24 kHz, trimmed of silence at both ends, words [(word, start s,
    end s)]). A word ends where the next one starts (or where the audio ends)."""
    lib, rate, state = _library()
    if lib.espeak_SetVoiceByName(voice.name.encode()) != 0:
        raise RuntimeError(f"espeak-ng has no voice {voice.name!r}")
    for param, value in ((_RATE, voice.rate), (_PITCH, voice.pitch), (_RANGE, voice.range)):
        lib.espeak_SetParameter(param, value, 0)
    state["samples"], state["words"] = [], []
    raw = text.encode()
    err = lib.espeak_Synth(raw, len(raw) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
    if err != 0 or not state["samples"]:
        raise RuntimeError(f"espeak-ng failed on {text!r} (error {err})")
    wav = np.concatenate(state["samples"]).astype(np.float32) / 32768
    loud = np.flatnonzero(np.abs(wav) > 0.01 * np.abs(wav).max())
    a, b = int(loud[0]), int(loud[-1]) + 1
    starts = [(raw[p:p + n].decode(errors="replace"), max(0, s - a)) for p, n, s in state["words"]]
    ends = [s for _, s in starts[1:]] + [b - a]
    words = [(w, s / rate, max(s, min(e, b - a)) / rate) for (w, s), e in zip(starts, ends)]
    return resample(torch.from_numpy(wav[a:b]), rate, SAMPLE_RATE).numpy(), words


# ----------------------------------------------------------------------------------------------
# 2. The task set: every answer is determined by the question, so it can be checked.

NUM = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
       "fifteen sixteen seventeen eighteen").split()
ADJ = "red blue green small big happy old young".split()
NOUN = "cat dog bird fish horse cow".split()
VERB = "sleeps runs sings jumps waits swims".split()
FACTS = [("What is the capital of France?", "The capital of France is Paris."),
         ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
         ("What is the capital of Italy?", "The capital of Italy is Rome."),
         ("What is the capital of Spain?", "The capital of Spain is Madrid."),
         ("What color is the sky?", "The sky is blue."), ("What color is grass?", "Grass is green."),
         ("What color is snow?", "Snow is white."), ("How many legs does a dog have?", "A dog has four legs."),
         ("How many legs does a bird have?", "A bird has two legs."),
         ("How many days are in a week?", "There are seven days in a week."),
         ("What do cows drink?", "Cows drink water."), ("What do bees make?", "Bees make honey."),
         ("What is frozen water called?", "Frozen water is called ice."),
         ("Which animal says meow?", "A cat says meow."), ("Which animal barks?", "A dog barks."),
         ("What comes after Monday?", "Tuesday comes after Monday.")]
HELD_OUT_COUNT_STARTS = (3, 7)         # counts never start here in training
GREETING = ("Hello.", "Hi! How can I help?")
BACKCHANNELS = ("Uh-huh.", "Okay.", "Right.", "Yeah.", "Mm-hmm.")


def items(held_out):
    """Every (task, question, answer, pause_at) of the training set (held_out=False) or of the
    held-out set. `pause_at` is the word after which a user may pause mid-question."""
    out = []
    for a in ADJ:
        for n in NOUN:
            for v in VERB:
                if (zlib.crc32(f"{a} {n} {v}".encode()) % 6 == 0) == held_out:
                    out.append(("repeat", f"Repeat after me: the {a} {n} {v}.", f"The {a} {n} {v}.", 3))
    for s in range(1, 11):
        for k in range(3, 6):
            if (s in HELD_OUT_COUNT_STARTS) == held_out:
                out.append(("count", f"Count from {NUM[s]} to {NUM[s + k - 1]}.",
                            ", ".join(NUM[s:s + k]).capitalize() + ".", 3))
    if not held_out:               # unseen arithmetic facts are no fair test of a small model
        for a in range(10):
            for b in range(10):
                out.append(("arith", f"What is {NUM[a]} plus {NUM[b]}?", f"{NUM[a]} plus {NUM[b]} is {NUM[a + b]}."
                            .capitalize(), 4))
                if a >= b:
                    out.append(("arith", f"What is {NUM[a]} minus {NUM[b]}?",
                                f"{NUM[a]} minus {NUM[b]} is {NUM[a - b]}.".capitalize(), 4))
        out += [("fact", q, a, 2) for q, a in FACTS]
    return out


def vocabulary():
    """Every word of the task set, lower case (the short utterances of the "words" recordings)."""
    import re
    return sorted({w for h in (False, True) for _, q, a, _ in items(h) for w in re.findall(r"[a-z]+", (q + a).lower())})


def candidate_answers():
    """Every answer the corpus can ask for: the closed set a recogniser chooses from."""
    return sorted({a for h in (False, True) for _, _, a, _ in items(h)} | {GREETING[1]})


# ----------------------------------------------------------------------------------------------
# 3. Voices. espeak voices are an accent (en-us, en, ...) plus a variant (+m1 .. +f5); rate and
# pitch are drawn per utterance. Validation also hears a voice training never does.

USER_VOICES = ("en-us+m1", "en-us+f2", "en-us+m3", "en+f1", "en+m4", "en-gb-x-rp+m2", "en-gb-x-rp+f4",
               "en-029+m1", "en-029+f5", "en-gb-scotland+m3")
HELD_OUT_VOICE = "en-us-nyc+m6"
ASSISTANT = Voice("en-us+f3", 150, 50, 50)


def user_voice(rnd, held_out=False):
    return Voice(HELD_OUT_VOICE if held_out else rnd.choice(USER_VOICES), rnd.randint(135, 180),
                 rnd.randint(30, 70), rnd.randint(30, 70))


# ----------------------------------------------------------------------------------------------
# 4. Dialogs on a timeline. Times are seconds; an assistant answer starts 0.3-0.5 s after the
# question ends (a consistent, quick turn-taking rhythm), a barge-in cuts the assistant's audio
# 0.16-0.32 s after the user starts, and a backchannel never changes what the assistant does.


class Timeline:
    """Clips placed on two channels, with the manifest's segments and events."""

    def __init__(self):
        self.clips, self.segments, self.events = [], [], []

    def say(self, speaker, text, voice, at, cut=None, level=0.8):
        """Place `text` at `at`; `cut` stops the audio there (a barge-in). -> (start, end)."""
        wav, words = synthesize(text, voice)
        if cut is not None and cut < at + len(wav) / SAMPLE_RATE:
            n = max(1, int((cut - at) * SAMPLE_RATE))
            fade = min(n, SAMPLE_RATE // 100)
            wav = wav[:n].copy()
            wav[n - fade:] *= np.linspace(1, 0, fade, dtype=np.float32)
            words = [(w, s, min(e, n / SAMPLE_RATE)) for w, s, e in words if s < n / SAMPLE_RATE]
        start = round(at * SAMPLE_RATE) / SAMPLE_RATE
        end = start + len(wav) / SAMPLE_RATE
        self.clips.append((SPEAKERS.index(speaker), round(at * SAMPLE_RATE), level * wav / np.abs(wav).max()))
        self.segments.append({"speaker": speaker, "start": round(start, 4), "end": round(end, 4), "text": text,
                              "words": [[w, round(start + s, 4), round(start + e, 4)] for w, s, e in words]})
        return start, end

    def render(self, tail=2.0):
        """Stereo [2, N] float32, with `tail` seconds of silence after the last clip (room for
        a trailing monologue)."""
        n = max(at + len(w) for _, at, w in self.clips) + int(tail * SAMPLE_RATE)
        out = np.zeros((2, n), np.float32)
        for ch, at, w in self.clips:
            out[ch, at:at + len(w)] += w
        return out


def _gap(rnd):
    return rnd.uniform(0.3, 0.5)


def _exchange(tl, rnd, item, voice, at, held_out, pause=None):
    """User asks `item`'s question at `at` (optionally pausing mid-question), the assistant
    answers. -> (answer start, answer end)."""
    task, question, answer, pause_at = item
    if pause:
        words = question.split()
        _, p0 = tl.say("user", " ".join(words[:pause_at]), voice, at, level=rnd.uniform(0.5, 0.9))
        _, q_end = tl.say("user", " ".join(words[pause_at:]), voice, p0 + pause, level=rnd.uniform(0.5, 0.9))
        tl.events.append({"type": "pause", "start": round(p0, 4), "end": round(p0 + pause, 4)})
    else:
        _, q_end = tl.say("user", question, voice, at, level=rnd.uniform(0.5, 0.9))
    a0, a1 = tl.say("assistant", answer, ASSISTANT, q_end + _gap(rnd))
    tl.events.append({"type": "answer", "task": task, "question": question, "question_end": round(q_end, 4),
                      "answer": answer, "held_out": held_out})
    return a0, a1


def plan_dialog(rnd, kind, held_out=None):
    """One recording of `kind`: "words" (one speaker says one to three words of the task set),
    "utterance" (one speaker, one sentence), both for the ASR/TTS-style stages, "dialog"
    (turn-taking exchanges) or "duplex" (a pause, backchannel or barge-in). held_out: None
    (training items, training voices), "combo" (held-out items) or "voice" (the held-out voice)."""
    pool = items(held_out == "combo")
    voice = user_voice(rnd, held_out == "voice")
    tl = Timeline()
    if kind == "words":           # short sentences: the trailing text sits right after each word
        text = " ".join(rnd.choice(vocabulary()) for _ in range(rnd.choice([1, 1, 2, 3]))).capitalize() + "."
        if rnd.random() < 0.3:
            tl.say("assistant", text, ASSISTANT, rnd.uniform(0.2, 0.4))
        else:
            tl.say("user", text, voice, rnd.uniform(0.2, 0.4), level=rnd.uniform(0.5, 0.9))
        return tl, ["words"]
    if kind == "utterance":
        task, question, answer, _ = rnd.choice(pool)
        if rnd.random() < 0.5:
            tl.say("assistant", rnd.choice([answer, answer, GREETING[1]]), ASSISTANT, rnd.uniform(0.2, 0.5))
        else:
            tl.say("user", rnd.choice([question, question, answer, rnd.choice(BACKCHANNELS)]), voice,
                   rnd.uniform(0.2, 0.5), level=rnd.uniform(0.5, 0.9))
        return tl, [task]
    t, tasks = rnd.uniform(0.3, 0.8), []
    if kind == "dialog":
        if held_out is None and rnd.random() < 0.2:
            _, g = tl.say("user", GREETING[0], voice, t)
            _, t = tl.say("assistant", GREETING[1], ASSISTANT, g + _gap(rnd))
            t += rnd.uniform(0.6, 1.2)
        for _ in range(1 if held_out else rnd.choice([1, 1, 2])):
            item = rnd.choice(pool)
            tasks.append(item[0])
            _, t = _exchange(tl, rnd, item, voice, t, held_out)
            t += rnd.uniform(0.6, 1.2)
        return tl, tasks
    what = rnd.choice(["pause", "backchannel", "barge_in"])
    item = rnd.choice(pool)
    tasks.append(item[0])
    if what == "pause":
        _exchange(tl, rnd, item, voice, t, held_out, pause=rnd.uniform(0.6, 1.2))
        return tl, tasks + ["pause"]
    long_enough = [i for i in pool if i[0] in ("count", "arith", "fact")]
    item = rnd.choice(long_enough)          # answers of 1.5 s and more leave room to talk over
    tasks[0] = item[0]
    a0, a1 = _exchange(tl, rnd, item, voice, t, held_out)
    if what == "backchannel":
        at = rnd.uniform(a0 + 0.3, max(a0 + 0.3, a1 - 0.8))
        _, b1 = tl.say("user", rnd.choice(BACKCHANNELS), voice, at, level=rnd.uniform(0.4, 0.8))
        tl.events.append({"type": "backchannel", "start": round(at, 4), "end": round(b1, 4)})
        return tl, tasks + ["backchannel"]
    # barge-in: redo the answer, cut where the assistant yields, then answer the new question
    tl.clips.pop(), tl.segments.pop()
    onset = rnd.uniform(a0 + 0.3, max(a0 + 0.4, a1 - 0.5))
    stop = onset + rnd.uniform(0.16, 0.32)
    tl.say("assistant", item[2], ASSISTANT, a0, cut=stop)
    new = rnd.choice(pool)
    tasks.append(new[0])
    _, q_end = tl.say("user", new[1], voice, onset, level=rnd.uniform(0.6, 0.9))
    tl.say("assistant", new[2], ASSISTANT, q_end + _gap(rnd))
    tl.events.append({"type": "barge_in", "start": round(onset, 4), "stop": round(stop, 4), "task": new[0],
                      "question": new[1], "question_end": round(q_end, 4), "answer": new[2], "held_out": held_out})
    return tl, tasks + ["barge_in"]


# ----------------------------------------------------------------------------------------------
# 5. The corpus: every recording drawn from its own seeded generator (so any subset has the same
# texts, voices and gaps, in any order or process; espeak's samples themselves may differ by a few
# milliseconds between runs), written as FLAC (silence costs nothing), one manifest line each.


def plan(n_dialogs, n_duplex, n_utterances, n_val, n_words=0):
    """(id, split, kind, held_out) of every recording. Validation: single exchanges and duplex
    cases, half with held-out items in training voices, half with training items in the held-out
    voice."""
    out = [(f"dialog-{i:05d}", "train", "dialog", None) for i in range(n_dialogs)]
    out += [(f"words-{i:05d}", "train", "words", None) for i in range(n_words)]
    out += [(f"duplex-{i:05d}", "train", "duplex", None) for i in range(n_duplex)]
    out += [(f"utt-{i:05d}", "train", "utterance", None) for i in range(n_utterances)]
    for i in range(n_val):
        kind, held_out = ("dialog", "duplex")[i % 4 // 3], ("combo", "voice")[i % 2]
        out.append((f"val-{kind}-{held_out}-{i:04d}", "val", kind, held_out))
    return out


def _render(args):
    out, seed, rec_id, split, kind, held_out = args
    torch.set_num_threads(1)                         # one process per core
    rnd = random.Random(f"{seed}:{rec_id}")
    tl, tasks = plan_dialog(rnd, kind, held_out)
    import soundfile as sf
    sf.write(str(Path(out) / "wavs" / f"{rec_id}.flac"), tl.render(0.8 if kind == "words" else 2.0).T, SAMPLE_RATE,
             subtype="PCM_16")
    return {"id": rec_id, "audio": f"wavs/{rec_id}.flac", "split": split, "kind": kind, "held_out": held_out,
            "template": tasks, "segments": tl.segments, "events": tl.events}


def demo(out, n_dialogs=1200, n_duplex=600, n_utterances=1200, n_val=80, n_words=2000, seed=0, jobs=2, log=print):
    """Synthesise the corpus into `out`: wavs/*.flac (stereo, left = assistant) and
    manifest.jsonl (our format, with split, kind, held_out, segments with words, and events)."""
    from concurrent.futures import ProcessPoolExecutor
    from tqdm import tqdm
    out = Path(out)
    (out / "wavs").mkdir(parents=True, exist_ok=True)
    _library()                                       # fail early and clearly if espeak is missing
    todo = [(str(out), seed, *p) for p in plan(n_dialogs, n_duplex, n_utterances, n_val, n_words)]
    tmp = out / "manifest.jsonl.tmp"
    with ProcessPoolExecutor(max(1, jobs)) as ex, open(tmp, "w") as mf:
        for line in tqdm(ex.map(_render, todo, chunksize=16), total=len(todo), desc="synthesising"):
            mf.write(json.dumps(line) + "\n")
    tmp.replace(out / "manifest.jsonl")
    log(f"wrote {len(todo)} recordings and {out / 'manifest.jsonl'}")
    return out / "manifest.jsonl"


def ensure_prepared(root, counts, codec_codes, log=print):
    """train.py's `demo_corpus`: if `root` holds no prepared data, synthesise the corpus beside it
    (demo(**counts)) and prepare it with a BPE tokenizer and a demo codec of `codec_codes` entries."""
    import data   # here, not at the top: data.py does not need the corpus, the corpus needs data.py only here
    if (root / "index.json").is_file():
        codec = root / json.loads((root / "index.json").read_text()).get("codec", "")
        have = data.load_codec(codec).cardinality if codec.is_file() and data.codec_kind(codec) == "demo" else None
        if have not in (None, codec_codes):
            raise ValueError(f"{root}: prepared with a demo codec of {have} codes per codebook, the config asks "
                             f"for {codec_codes}; delete it to rebuild, or use it with --demo_codec_codes={have}")
        return
    demo_dir = root.parent
    log(f"no prepared data at {root}: synthesising the embedded corpus into {demo_dir} (python data.py "
        f"demo --out {demo_dir}) and preparing it (python data.py prepare --manifest {demo_dir}/manifest.jsonl "
        f"--out {root} --tokenizer bpe); a few minutes, once")
    manifest = demo_dir / "manifest.jsonl"
    if not manifest.is_file():
        try:
            demo(demo_dir, **counts, log=log)
        except RuntimeError as e:                    # espeak-ng missing or failing
            raise ValueError(str(e)) from None
    data.prepare(manifest, root, tokenizer="bpe", codec_codes=codec_codes, log=log)


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="Synthesise the demo corpus (same as `python data.py demo`).")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    demo(a.out)
