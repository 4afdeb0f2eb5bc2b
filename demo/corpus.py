"""demo/corpus.py -- the embedded spoken-dialog corpus: what a user with no data trains on.

`python data.py demo --out DIR` (or `corpus.demo(DIR)`) synthesises, with espeak-ng and no downloads,
two distinct voices (user, assistant) talking in templates whose answers are checkable: arithmetic,
repeating a phrase, counting, short facts; plus single-speaker utterances for the ASR/TTS-style
stages. It writes stereo wavs (left = assistant, right = user) and DIR/manifest.jsonl in our
manifest format, which `data.py prepare` turns into shards like any other data set.

Sentence timings are exact: each sentence is synthesised alone, trimmed of its own silence, and
placed at a known sample. About 1/6 of the number/phrase combinations are held out: validation
dialogs use only those and training never sees them, so answer accuracy measures learning.
"""
import json
import random
import shutil
import subprocess
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from codec import SAMPLE_RATE
from grid import SPEAKERS

NUM = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
       "fifteen sixteen seventeen eighteen").split()
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
ADJ, NOUN, VERB = ("red blue green small happy old".split(), "cat dog bird fish horse".split(),
                   "sleeps runs sings jumps waits".split())
VOICES = {"user": ("en-us", 150), "assistant": ("en-us+f3", 140)}   # (espeak voice, words/minute)


def _held_out(key):
    return zlib.crc32(repr(key).encode()) % 6 == 0


def _exchange(rnd, split):
    """(template, question, answer) whose number/phrase combination belongs to `split`."""
    while True:
        t = rnd.choice(["arith", "arith", "repeat", "count"] + (["fact"] if split == "train" else []))
        if t == "arith":
            a, b, op = rnd.randrange(10), rnd.randrange(10), rnd.choice(["plus", "minus"])
            a, b = (b, a) if op == "minus" and a < b else (a, b)
            key, q = (t, a, op, b), f"What is {NUM[a]} {op} {NUM[b]}?"
            ans = f"{NUM[a]} {op} {NUM[b]} is {NUM[a + b if op == 'plus' else a - b]}.".capitalize()
        elif t == "repeat":
            key = (t, rnd.choice(ADJ), rnd.choice(NOUN), rnd.choice(VERB))
            q, ans = f"Repeat after me: the {' '.join(key[1:])}.", f"The {' '.join(key[1:])}."
        elif t == "count":
            s, n = rnd.randrange(1, 11), rnd.randrange(3, 6)
            key, q = (t, s, n), f"Count from {NUM[s]} to {NUM[s + n - 1]}."
            ans = (", ".join(NUM[s:s + n]) + ".").capitalize()
        else:
            key = (t, *rnd.choice(FACTS))
            q, ans = key[1:]
        if t == "fact" or _held_out(key) == (split == "val"):
            return t, q, ans


def _demo_plan(n_dialogs, n_utterances, n_val, seed):
    """Manifest entries without audio: each has a list of (speaker, text, gap before it)."""
    rnd, plan = random.Random(seed), []
    for split, n in (("train", n_dialogs), ("val", n_val)):
        for i in range(n):
            turns, names = [], []
            if rnd.random() < 0.2:
                turns += [("user", "Hello.", rnd.uniform(0.3, 0.8)), ("assistant", "Hi! How can I help?", 0.4)]
            for _ in range(rnd.choice([1, 1, 2])):
                t, q, a = _exchange(rnd, split)
                names.append(t)
                turns += [("user", q, rnd.uniform(0.6, 1.2) if turns else rnd.uniform(0.3, 0.8)),
                          ("assistant", a, rnd.uniform(0.3, 0.8))]
            plan.append({"id": f"{split}-{i:04d}", "split": split, "kind": "dialog", "template": names, "turns": turns})
    for i in range(n_utterances):
        t, q, a = _exchange(rnd, "train")
        spk = rnd.choice(SPEAKERS)
        plan.append({"id": f"utt-{i:04d}", "split": "train", "kind": "utterance", "template": [t],
                     "turns": [(spk, rnd.choice([q, a]), rnd.uniform(0.3, 0.8))]})
    return plan


def demo(out, n_dialogs=400, n_utterances=200, n_val=40, seed=0, jobs=2, log=print):
    """Synthesise the embedded corpus into `out`: wavs/*.wav (stereo, left = assistant) and
    manifest.jsonl (our format, with split and kind fields). Requires espeak-ng."""
    from codec import read_audio, write_audio
    from tqdm import tqdm
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng not found: the demo corpus is synthesised with it; install it "
                           "(Debian/Ubuntu: apt-get install espeak-ng) or bring your own manifest")
    out = Path(out)
    (out / "wavs").mkdir(parents=True, exist_ok=True)
    plan = _demo_plan(n_dialogs, n_utterances, n_val, seed)
    wanted = sorted({(spk, text) for p in plan for spk, text, _ in p["turns"]})
    tmp = Path(tempfile.mkdtemp(prefix="flm-espeak-"))

    def say(k):
        spk, text = wanted[k]
        path = tmp / f"{k}.wav"
        r = subprocess.run(["espeak-ng", "-v", VOICES[spk][0], "-s", str(VOICES[spk][1]), "-w", str(path), text],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"espeak-ng failed on {text!r}: {r.stderr.strip()[:200]}")
        w = read_audio(path)[0]
        loud = (w.abs() > 0.01 * w.abs().max()).nonzero()[:, 0]     # trim espeak's own silence
        return w[int(loud[0]):int(loud[-1]) + 1]

    try:
        with ThreadPoolExecutor(jobs) as ex:
            clips = dict(zip(wanted, tqdm(ex.map(say, range(len(wanted))), total=len(wanted), desc="espeak-ng")))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    with open(out / "manifest.jsonl", "w") as mf:
        for p in tqdm(plan, desc="dialogs"):
            pos, segs, pieces = 0, [], []
            for spk, text, gap in p["turns"]:
                pos += int(gap * SAMPLE_RATE)
                clip = clips[(spk, text)]
                pieces.append((SPEAKERS.index(spk), pos, clip))
                segs.append({"speaker": spk, "start": round(pos / SAMPLE_RATE, 4),
                             "end": round((pos + len(clip)) / SAMPLE_RATE, 4), "text": text})
                pos += len(clip)
            wav = torch.zeros(2, pos + 2 * 24000)       # trailing silence leaves room for trail text
            for ch, at, clip in pieces:
                wav[ch, at:at + len(clip)] = 0.9 * clip / clip.abs().max()
            write_audio(out / "wavs" / f"{p['id']}.wav", wav)
            mf.write(json.dumps({"id": p["id"], "audio": f"wavs/{p['id']}.wav", "split": p["split"],
                                 "kind": p["kind"], "template": p["template"], "segments": segs}) + "\n")
    log(f"wrote {len(plan)} recordings ({len(wanted)} distinct sentences) and {out / 'manifest.jsonl'}")
    return out / "manifest.jsonl"


