"""data.py -- from recordings + sentence timings to the [B, 17, T] token grids train.py eats.

The paper's method lives here. A dialog is two audio channels (assistant, user) plus sentence
segments `{speaker, start, end, text}`. The codec turns each channel into 8 codebooks per 80 ms
frame; the tokenizer turns each sentence into text tokens; the grid builder lays them out as
DESIGN.md section 2 says: row 0 = the *natural monologue* (each sentence's tokens contiguous,
`<wait>` everywhere else), rows 1..8 = speak codebooks, 9..16 = listen codebooks, acoustic
codebooks one column late, column 0 = the initial column. Where a sentence's text sits relative
to its audio (`lead` or `trail`) is chosen when a batch is drawn, so one prepared data set serves
every stage of dual training.

Data flow, in file order:
  1. tokenizer (tiktoken): Qwen2-style files or the byte-level default
  2. timings -> frames, monologue placement, the grid in delayed coordinates, tasks
  3. dataset formats (our manifest, moshi-finetune's) -> dialog records
  4. `prepare`: audio -> codec codes -> memory-mappable shards + JSON index
  5. `ShardDataset.get_batch`: windows for train.py
  6. `python data.py demo`: the embedded spoken corpus (synthesised by corpus.py with espeak-ng)
"""
import argparse
import json
import math
import os
import shutil
import sys
import unicodedata
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import tiktoken
import torch

from codec import FRAME_RATE, FRAME_SIZE, N_CODEBOOKS, SAMPLE_RATE
from model import DELAYS

SPEAKERS = ("assistant", "user")        # stereo channel 0 = assistant (left), 1 = user (right)

# ----------------------------------------------------------------------------------------------
# 1. Tokenizer. Qwen2 is GPT-2-style byte-level BPE: text is split by a regex, each piece is
# UTF-8 bytes, and merges join adjacent byte strings. tiktoken runs exactly that if each token's
# rank (= its id) orders merges the way the merge list does, which holds when ids were assigned
# in merge order (true for Qwen2 and for any `tokenizers`-trained BPE); we check it.

QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
WAIT_TOKEN = "<|wait|>"
BYTE_SPECIALS = {WAIT_TOKEN: 256, "<|endoftext|>": 257, "<|pad|>": 258}
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "added_tokens.json", "special_tokens_map.json")


def _bytes_to_unicode():
    """GPT-2's reversible map byte -> printable character (printable bytes map to themselves,
    the rest to chr(256 + k)), which is how byte-level BPE vocab files spell raw bytes."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
            *range(ord("\xae"), ord("\xff") + 1)]
    out, k = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b], k = chr(256 + k), k + 1
    return out


def _split_regex(pre, name):
    """The pre-tokenisation regex of a tokenizer.json `pre_tokenizer` entry (None if absent)."""
    if not pre:
        return None
    if pre.get("type") == "Sequence":
        found = [_split_regex(p, name) for p in pre.get("pretokenizers", [])]
        return next((f for f in found if f), None)
    if pre.get("type") == "Split":
        return pre.get("pattern", {}).get("Regex")
    if pre.get("type") == "ByteLevel":
        if pre.get("add_prefix_space"):
            raise ValueError(f"{name}: ByteLevel add_prefix_space=true is not supported")
        return GPT2_PATTERN if pre.get("use_regex", True) else None
    return None


def load_tokenizer(path=None):
    """tiktoken.Encoding from a Qwen2-style directory (tokenizer.json, or vocab.json + merges.txt,
    with added/special tokens from tokenizer.json / tokenizer_config.json / added_tokens.json);
    `None` gives the byte-level default: ids 0..255 = bytes, then BYTE_SPECIALS."""
    if path is None:
        return tiktoken.Encoding("flm-bytes", pat_str=QWEN2_PATTERN, special_tokens=BYTE_SPECIALS,
                                 mergeable_ranks={bytes([i]): i for i in range(256)})
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: tokenizer directory not found")
    pattern, added = QWEN2_PATTERN, {}
    try:
        if (d / "tokenizer.json").is_file():
            name = d / "tokenizer.json"
            tj = json.loads(name.read_text(encoding="utf-8"))
            model = tj.get("model") or {}
            if model.get("type", "BPE") != "BPE":
                raise ValueError(f"{name}: model type {model.get('type')!r} is not BPE")
            vocab, merges = model["vocab"], model["merges"]
            pattern = _split_regex(tj.get("pre_tokenizer"), name) or pattern
            added = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
        elif (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            name = d / "vocab.json"
            vocab = json.loads(name.read_text(encoding="utf-8"))
            merges = [m for m in (d / "merges.txt").read_text(encoding="utf-8").splitlines()
                      if m and not m.startswith("#version")]
        else:
            raise FileNotFoundError(f"{d}: no tokenizer.json and no vocab.json + merges.txt")
        if (d / "tokenizer_config.json").is_file():
            cfg = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
            added.update({v["content"]: int(k) for k, v in cfg.get("added_tokens_decoder", {}).items()})
        if (d / "added_tokens.json").is_file():
            added.update(json.loads((d / "added_tokens.json").read_text(encoding="utf-8")))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{d}: malformed tokenizer files ({type(e).__name__}: {e})") from None
    to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    ranks = {}
    for tok, i in vocab.items():
        if tok in added:
            continue
        try:
            ranks[bytes(to_byte[c] for c in tok)] = int(i)
        except KeyError:
            raise ValueError(f"{name}: token {tok!r} is not byte-level BPE") from None
    last = -1                       # merge k must produce a token whose id grows with k
    for m in merges:
        a, b = m.split(" ") if isinstance(m, str) else m
        i = vocab.get(a + b)
        if i is None or i <= last:
            raise ValueError(f"{name}: merge {a!r}+{b!r} is not in vocab-id order; "
                             "tiktoken cannot reproduce this tokenizer")
        last = i
    specials = {t: int(i) for t, i in added.items()}
    return tiktoken.Encoding(d.name or "tokenizer", pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens=specials)


def encode_text(enc, text):
    """Token ids of one sentence: NFC (as Qwen2's normalizer), added tokens recognised."""
    return enc.encode(unicodedata.normalize("NFC", text), allowed_special="all")


# ----------------------------------------------------------------------------------------------
# 2. The grid. Timing convention (seconds -> frames at 12.5 Hz, frame f covers [f, f+1) * 80 ms):
#   first frame of a sentence  = floor(start * 12.5)
#   frame after its audio      = ceil(end * 12.5)   (at least first frame + 1)
#   lead target = first frame + offset;  trail target = frame after audio + offset
# Targets are clamped to >= 1 because column 0 of any window is overwritten by the initial
# column; a sentence whose target is taken by the previous sentence's text starts right after it.

def sentence_frames(start, end):
    first = math.floor(start * FRAME_RATE + 1e-6)
    return first, max(first + 1, math.ceil(end * FRAME_RATE - 1e-6))


def place_monologue(sentences, n_frames, lead, wait_id, offset=0, max_tail=50, name="dialog"):
    """Row 0 in frame coordinates. `sentences`: dicts with start, end (s) and tokens, in time
    order. Returns (row int64 [L], drifts) with L = max(n_frames, end of last text) and drifts[i]
    = frames sentence i's text starts after its target. Text may run up to `max_tail` frames past
    the audio (no audio loss there); beyond that the dialog cannot fit and we say so."""
    free, spans, drifts = 1, [], []
    for s in sentences:
        first, after = sentence_frames(s["start"], s["end"])
        target = max(1, (first if lead else after) + offset)
        at = max(target, free)
        spans.append((at, s["tokens"]))
        drifts.append(at - target)
        free = at + len(s["tokens"])
    if free > n_frames + max_tail:
        raise ValueError(f"{name}: monologue text ends at frame {free}, more than {max_tail} frames "
                         f"past the audio ({n_frames} frames) ({'lead' if lead else 'trail'} placement)")
    row = np.full(max(n_frames, free), wait_id, dtype=np.int64)
    for at, toks in spans:
        row[at:at + len(toks)] = toks
    return row, drifts


def grid_window(text_row, speak, listen, start, n_columns, cfg, text_weight=1.0, audio_weight=1.0,
                codes_start=0):
    """Tokens [17, T] and loss weights [9, T] (numpy) for the window whose column c holds text and
    semantic tokens of frame start + c and acoustic tokens of frame start + c - 1 (delays).
    `speak`/`listen`: codes [8, n] of frames codes_start.. (the dialog's end), or None (-> aud_pad).
    Positions outside the dialog get the padding tokens and weight 0; column 0 becomes the initial
    column (row 9 keeps the user's semantic token of frame `start`, as in streaming inference)."""
    wait, pad = cfg.text_wait_token_id, cfg.aud_pad_token_id
    frames = start + np.arange(n_columns)
    tokens = np.empty((17, n_columns), dtype=np.int64)
    weights = np.zeros((9, n_columns), dtype=np.float32)
    ok = frames < len(text_row)
    tokens[0] = np.where(ok, text_row[np.minimum(frames, len(text_row) - 1)], wait)
    weights[0] = ok * text_weight
    for base, codes in ((1, speak), (9, listen)):
        for q in range(N_CODEBOOKS):
            f = frames - DELAYS[base + q] - codes_start
            if codes is None or codes.shape[1] == 0:
                tokens[base + q] = pad
                continue
            ok = (f >= 0) & (f < codes.shape[1])
            tokens[base + q] = np.where(ok, codes[q, np.clip(f, 0, codes.shape[1] - 1)], pad)
            if base == 1:
                weights[1 + q] = ok * audio_weight
    tokens[0, 0], tokens[1:9, 0], tokens[10:17, 0] = wait, pad, pad
    weights[:, 0] = 0
    return tokens, weights


@dataclass
class Task:
    """Routing of one training task. Speakers are named "assistant"/"user" (None = nothing):
    `monologue` = whose sentences fill row 0, `speak` = whose audio the model predicts (rows 1..8),
    `listen` = whose audio it hears (rows 9..16). `placement`: "lead", "trail", "mix" or P(lead),
    drawn per sample. `offset` shifts text targets by whole frames."""
    monologue: str = "assistant"
    speak: str = "assistant"
    listen: str = "user"
    placement: object = "lead"
    offset: int = 0
    text_weight: float = 1.0
    audio_weight: float = 1.0

    def __post_init__(self):
        for k in ("monologue", "speak", "listen"):
            if getattr(self, k) not in (*SPEAKERS, None):
                raise ValueError(f"task {k}={getattr(self, k)!r}: expected 'assistant', 'user' or None")

    def p_lead(self):
        p = {"lead": 1.0, "trail": 0.0, "mix": 0.5}.get(self.placement, self.placement)
        if isinstance(p, str) or not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"placement {self.placement!r}: expected lead, trail, mix or a probability")
        return float(p)


TASKS = {   # the paper's stages: ASR-style, TTS-style, dialog SFT
    "asr": Task(monologue="user", speak=None, listen="user", placement="trail", audio_weight=0.0),
    "tts": Task(monologue="assistant", speak="assistant", listen=None, placement="lead"),
    "dialog": Task(),
}


def as_task(task):
    if isinstance(task, Task):
        return task
    if isinstance(task, str):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}: choose from {sorted(TASKS)} or pass a Task")
        return TASKS[task]
    try:
        return replace(TASKS["dialog"], **dict(task))
    except TypeError as e:
        raise ValueError(f"bad task settings {task!r}: {e}") from None


def dialog_grid(sentences, codes, cfg, task="dialog", lead=True, start=0, n_columns=None,
                max_tail=50, name="dialog"):
    """One dialog (or window of it) as (tokens [17, T], weights [9, T], drifts), numpy.
    `sentences`: dicts {speaker, start, end, tokens}; `codes`: {"assistant": [8, F], "user": [8, F]}.
    Default n_columns covers the whole dialog, including the last frame's acoustic tokens."""
    task = as_task(task)
    n_frames = max(c.shape[1] for c in codes.values())
    mine = sorted((s for s in sentences if s["speaker"] == task.monologue), key=lambda s: s["start"])
    row, drifts = place_monologue(mine, n_frames, lead, cfg.text_wait_token_id, task.offset, max_tail, name)
    n_columns = max(len(row), n_frames + 1) - start if n_columns is None else n_columns
    tokens, weights = grid_window(row, codes.get(task.speak), codes.get(task.listen), start, n_columns,
                                  cfg, task.text_weight, task.audio_weight)
    return tokens, weights, drifts


# ----------------------------------------------------------------------------------------------
# 3. Dataset formats -> dialog records {id, source, audio, segments, split, kind}, where audio is
# {"stereo": path} or {"assistant": path, "user": path} (either may be missing = silence).

SENTENCE_END = tuple(".?!。？！…")


def _join(a, b):
    cjk = a and b and ord(a[-1]) >= 0x2E80 and ord(b[0]) >= 0x2E80
    return a + b if cjk or not a else a + " " + b


def words_to_sentences(words, pause=0.8):
    """[[word, [start, end], speaker], ...] -> sentence segments, per speaker: a sentence ends at
    sentence punctuation or before a pause longer than `pause` seconds."""
    out = []
    for spk in dict.fromkeys(w[2] for w in words):
        cur = None
        for w, (s, e), _ in sorted((w for w in words if w[2] == spk), key=lambda w: w[1][0]):
            if not w.strip():
                continue
            if cur and (s - cur["end"] > pause or cur["text"].endswith(SENTENCE_END)):
                out.append(cur)
                cur = None
            if cur is None:
                cur = {"speaker": spk, "start": float(s), "end": float(e), "text": w.strip()}
            else:
                cur["text"], cur["end"] = _join(cur["text"], w.strip()), max(cur["end"], float(e))
        if cur:
            out.append(cur)
    return sorted(out, key=lambda s: s["start"])


def _check_segments(segments, where):
    out = []
    for i, s in enumerate(segments):
        if not isinstance(s, dict) or not {"speaker", "start", "end", "text"} <= set(s):
            raise ValueError(f"{where}: segment {i} needs speaker, start, end, text")
        if s["speaker"] not in SPEAKERS:
            raise ValueError(f"{where}: segment {i} has unknown speaker {s['speaker']!r} "
                             f"(expected 'assistant' or 'user')")
        try:
            start, end = float(s["start"]), float(s["end"])
        except (TypeError, ValueError):
            start = end = -1.0
        if not 0 <= start <= end:
            raise ValueError(f"{where}: segment {i} has bad times start={s['start']!r} end={s['end']!r}")
        if not isinstance(s["text"], str) or not s["text"].strip():
            raise ValueError(f"{where}: segment {i} has empty text")
        out.append({"speaker": s["speaker"], "start": start, "end": end, "text": s["text"].strip()})
    return out


def _moshi_record(obj, base, pause):
    wav = Path(obj["path"]) if Path(obj["path"]).is_absolute() else base / obj["path"]
    tr = wav.with_suffix(".json")
    if not tr.is_file():
        raise FileNotFoundError(f"{tr}: transcript (alignments) missing for {wav}")
    try:
        words = json.loads(tr.read_text(encoding="utf-8"))["alignments"]
        words = [[str(w), [float(t[0]), float(t[1])], spk] for w, t, spk in words]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{tr}: expected {{\"alignments\": [[word, [start, end], speaker], ...]}} "
                         f"({type(e).__name__}: {e})") from None
    for w in words:     # moshi-finetune: SPEAKER_MAIN is the model (left channel), others the user
        if not (isinstance(w[2], str) and w[2].startswith("SPEAKER_")):
            raise ValueError(f"{tr}: unknown speaker {w[2]!r} (expected SPEAKER_MAIN or SPEAKER_*)")
        w[2] = "assistant" if w[2] == "SPEAKER_MAIN" else "user"
    return {"id": str(obj["path"]), "audio": {"stereo": wav}, "kind": obj.get("kind", "dialog"),
            "segments": _check_segments(words_to_sentences(words, pause), tr), "split": obj.get("split")}


def read_manifest(path, pause=0.8):
    """Dialog records of a JSONL manifest; each line's format is detected from its keys:
    ours has "segments", moshi-finetune's has "path" (+ "duration") and a .json beside the wav."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found")
    base, out = path.parent, []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object")
        if "path" in obj and "segments" not in obj:
            rec = _moshi_record(obj, base, pause)
        else:
            audio = {k: obj[k] for k in ("audio", "assistant_audio", "user_audio") if obj.get(k)}
            if not audio:
                raise ValueError(f"{where}: no audio (give 'audio' (stereo) or 'assistant_audio'/'user_audio')")
            if "segments" not in obj:
                raise ValueError(f"{where}: no 'segments' (transcript) for {next(iter(audio.values()))}")
            audio = {"stereo" if k == "audio" else k.split("_")[0]: base / v for k, v in audio.items()}
            rec = {"id": str(obj.get("id", f"{path.stem}-{n}")), "audio": audio, "split": obj.get("split"),
                   "kind": obj.get("kind", "dialog"), "segments": _check_segments(obj["segments"], where)}
        if rec["split"] not in (None, "train", "val"):
            raise ValueError(f"{where}: split must be 'train' or 'val', got {rec['split']!r}")
        rec["source"] = where
        out.append(rec)
    if not out:
        raise ValueError(f"{path}: manifest has no dialogs")
    if len({r["id"] for r in out}) != len(out):
        raise ValueError(f"{path}: dialog ids are not unique")
    return out


def load_dialog_audio(rec, sample_rate=SAMPLE_RATE):
    """[2, N] float tensor (assistant, user) at 24 kHz; checks segments end inside the audio."""
    from codec import read_audio
    a = rec["audio"]
    if "stereo" in a:
        wav = read_audio(a["stereo"], sample_rate)
        if wav.shape[0] != 2:
            raise ValueError(f"{a['stereo']}: expected stereo (left = assistant, right = user), "
                             f"got {wav.shape[0]} channel(s)")
    else:
        chans = {k: read_audio(p, sample_rate).mean(0) for k, p in a.items()}
        n = max(c.shape[0] for c in chans.values())
        wav = torch.zeros(2, n)
        for i, k in enumerate(SPEAKERS):
            if k in chans:
                wav[i, :chans[k].shape[0]] = chans[k]
    dur = wav.shape[1] / sample_rate
    for i, s in enumerate(rec["segments"]):
        if s["end"] > dur + 1 / FRAME_RATE:
            raise ValueError(f"{rec['source']}: segment {i} ends at {s['end']:.2f}s, past the end of "
                             f"the audio {next(iter(a.values()))} ({dur:.2f}s)")
    return wav


# ----------------------------------------------------------------------------------------------
# 4. prepare: manifest -> shards. A shard = `NAME.codes.npy` (int16 [2, 8, frames], assistant then
# user, dialogs concatenated; memory-mapped at load) + `NAME.json` (dialog offsets, sentences with
# their token ids, a CRC of the codes). The JSON is written last, atomically, so a shard with a
# JSON is finished: a re-run skips it. `index.json` lists shards, codec and tokenizer.

DEMO_CODEC_FILE = "demo_codec.safetensors"


def _atomic_write(path, write):
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _crc(arr):
    return zlib.crc32(np.ascontiguousarray(arr).view(np.uint8).reshape(-1).data)


def _split_of(rec, val_frac):
    if rec["split"]:
        return rec["split"]
    return "val" if zlib.crc32(rec["id"].encode()) % 10000 < val_frac * 10000 else "train"


@torch.no_grad()
def encode_channels(codec, wavs, max_batch_samples=SAMPLE_RATE * 240):
    """Codes [8, ceil(n / 1920)] (int16) for each 1-D wav, encoding similar lengths together
    (zero-padded at the end: the codec is causal, so padding never changes earlier frames)."""
    frame = FRAME_SIZE
    order = sorted(range(len(wavs)), key=lambda i: len(wavs[i]))
    out, i = [None] * len(wavs), 0
    while i < len(order):
        j = i + 1
        while j < len(order) and (j - i + 1) * len(wavs[order[j]]) <= max_batch_samples:
            j += 1
        n = math.ceil(len(wavs[order[j - 1]]) / frame) * frame
        batch = torch.zeros(j - i, 1, n)
        for b, k in enumerate(order[i:j]):
            batch[b, 0, :len(wavs[k])] = wavs[k]
        codes = codec.encode(batch)
        for b, k in enumerate(order[i:j]):
            out[k] = codes[b, :, :math.ceil(len(wavs[k]) / frame)].numpy().astype(np.int16)
        i = j
    return out


def prepare(manifest, out, codec=None, tokenizer=None, shard_dialogs=64, val_frac=0.05,
            max_tail=50, pause=0.8, fit_seconds=1800.0, log=print):
    """Write pre-tokenised shards of `manifest` into `out` (see section comment). `codec`: path
    of Kyutai's Mimi or a demo-codec file; None fits the demo codec on the train audio."""
    from tqdm import tqdm
    import codec as codec_mod
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    recs = read_manifest(manifest, pause)
    enc = load_tokenizer(tokenizer)
    for r in recs:
        for s in r["segments"]:
            s["tokens"] = encode_text(enc, s["text"])
    if tokenizer is not None:           # the data set carries its tokenizer, as checkpoints do
        (out / "tokenizer").mkdir(exist_ok=True)
        for f in TOKENIZER_FILES:
            if (Path(tokenizer) / f).is_file():
                shutil.copy(Path(tokenizer) / f, out / "tokenizer" / f)
    for r in recs:
        r["split"] = _split_of(r, val_frac)
    if codec is None and (out / DEMO_CODEC_FILE).is_file():
        codec = out / DEMO_CODEC_FILE
        log(f"using the demo codec fitted earlier: {codec}")
    if codec is None:
        wavs, total = [], 0.0
        for r in tqdm([r for r in recs if r["split"] == "train"] or recs, desc="reading audio to fit codec"):
            if total >= fit_seconds:
                break
            w = load_dialog_audio(r)
            wavs += [c for c in w if c.abs().max() > 0]
            total += w.shape[1] / SAMPLE_RATE
        import democodec
        model = democodec.DemoCodec.fit(wavs)
        model.save(out / DEMO_CODEC_FILE)
        codec = out / DEMO_CODEC_FILE
        log(f"no --codec given: fitted the demo codec on {total:.0f} s of audio, saved to {codec}")
    else:
        model = codec_mod.load_codec(codec)
    codec = Path(codec)
    settings = {"codec": str(codec.resolve()), "codec_size": codec.stat().st_size,
                "tokenizer": str(Path(tokenizer).resolve()) if tokenizer else "bytes"}
    shards = []
    for split in ("train", "val"):
        mine = [r for r in recs if r["split"] == split]
        for k in range(0, len(mine), shard_dialogs):
            shards.append((f"{split}_{k // shard_dialogs:05d}", split, mine[k:k + shard_dialogs]))
    wait_id = enc.encode_single_token(WAIT_TOKEN) if WAIT_TOKEN in enc.special_tokens_set else None
    index = {"version": 1, "frame_rate": FRAME_RATE, "n_codebooks": N_CODEBOOKS, "max_tail": max_tail,
             "codec": str(codec.resolve()), "tokenizer": "tokenizer" if tokenizer else None,
             "tokenizer_n_vocab": enc.n_vocab, "tokenizer_wait_id": wait_id, "shards": []}
    drift = {"lead": [], "trail": []}
    for name, split, group in tqdm(shards, desc="shards"):
        meta_path = out / f"{name}.json"
        want = {**settings, "content": zlib.crc32(json.dumps(     # same dialogs, texts and tokens
            [(r["id"], sorted((k, str(p)) for k, p in r["audio"].items()), r["segments"]) for r in group]).encode())}
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            meta = None
        if not (meta and meta.get("settings") == want and (out / meta["codes"]).is_file()):
            meta = _write_shard(out, name, split, group, model, want)
        else:
            tqdm.write(f"{name}: already done, skipped")
        for d in meta["dialogs"]:       # every dialog must fit both placements before training
            for lead, key in ((True, "lead"), (False, "trail")):
                for spk in SPEAKERS:
                    sents = [s for s in d["sentences"] if s["speaker"] == spk]
                    drift[key] += place_monologue(sents, d["n_frames"], lead, 0, 0, max_tail, d["source"])[1]
        index["shards"].append({"name": name, "split": split, "n_dialogs": len(meta["dialogs"]),
                                "n_frames": sum(d["n_frames"] for d in meta["dialogs"])})
    for key, v in drift.items():
        index[f"drift_{key}"] = {"mean": float(np.mean(v)) if v else 0.0, "max": int(max(v, default=0))}
        log(f"text drift ({key}): mean {index[f'drift_{key}']['mean']:.2f} frames, "
            f"max {index[f'drift_{key}']['max']} frames over {len(v)} sentences")
    _atomic_write(out / "index.json", lambda p: p.write_text(json.dumps(index, indent=1)))
    n = {s: sum(x["n_dialogs"] for x in index["shards"] if x["split"] == s) for s in ("train", "val")}
    log(f"wrote {len(shards)} shards to {out}: {n['train']} train / {n['val']} val dialogs")
    return index


def _write_shard(out, name, split, group, model, settings):
    wavs = [load_dialog_audio(r) for r in group]
    codes = encode_channels(model, [c for w in wavs for c in w])
    dialogs, parts, offset = [], [], 0
    for i, r in enumerate(group):
        a, u = codes[2 * i], codes[2 * i + 1]
        parts.append(np.stack([a, u]))
        dialogs.append({"id": r["id"], "kind": r["kind"], "source": r["source"], "offset": offset,
                        "n_frames": a.shape[1], "sentences": r["segments"]})
        offset += a.shape[1]
    arr = np.concatenate(parts, axis=2) if parts else np.zeros((2, N_CODEBOOKS, 0), np.int16)
    def save(p):
        with open(p, "wb") as f:        # a file object: np.save would append .npy to a path
            np.save(f, arr)
    _atomic_write(out / f"{name}.codes.npy", save)
    meta = {"version": 1, "split": split, "settings": settings, "codes": f"{name}.codes.npy",
            "shape": list(arr.shape), "crc32": _crc(arr), "dialogs": dialogs}
    _atomic_write(out / f"{name}.json", lambda p: p.write_text(json.dumps(meta)))
    return meta


# ----------------------------------------------------------------------------------------------
# 5. Loading. Shards are checked on open (shape against the JSON, file size, CRC) so a truncated
# or corrupt file fails with its name instead of training on garbage. get_batch draws dialogs in
# proportion to their length, a window start, and lead/trail per sample, all from one numpy
# Generator whose state is picklable (state_dict / load_state_dict) so train.py resumes exactly.

def _open_shard(root, name, verify):
    meta_path = root / f"{name}.json"
    try:
        meta = json.loads(meta_path.read_text())
        codes_path = root / meta["codes"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{meta_path}: missing or corrupt shard index ({type(e).__name__}); "
                         "re-run `python data.py prepare`") from None
    try:
        codes = np.load(codes_path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise ValueError(f"{codes_path}: truncated or corrupt shard ({e}); re-run prepare") from None
    if list(codes.shape) != meta["shape"] or codes.dtype != np.int16:
        raise ValueError(f"{codes_path}: shard has shape {list(codes.shape)} {codes.dtype}, "
                         f"index says {meta['shape']} int16; re-run prepare")
    if verify and _crc(codes) != meta["crc32"]:
        raise ValueError(f"{codes_path}: checksum mismatch (corrupt shard); re-run prepare")
    return meta, codes


class ShardDataset:
    """Dialogs of one split of a prepared directory. `kind` keeps only dialogs of that kind
    (e.g. "dialog" or "utterance", as written in the manifest); `speaker` keeps only those where
    that speaker says something (e.g. user-voice utterances for the ASR-style task)."""

    def __init__(self, root, split="train", kind=None, speaker=None, seed=0, verify=True):
        self.root = Path(root)
        try:
            self.index = json.loads((self.root / "index.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise FileNotFoundError(f"{self.root / 'index.json'}: missing or unreadable ({type(e).__name__}); "
                                    "run `python data.py prepare` first") from None
        self.max_tail = self.index.get("max_tail", 50)
        self.dialogs = []
        for sh in self.index["shards"]:
            if sh["split"] != split:
                continue
            meta, codes = _open_shard(self.root, sh["name"], verify)
            for d in meta["dialogs"]:
                if (kind is None or d["kind"] == kind) and \
                        (speaker is None or any(s["speaker"] == speaker for s in d["sentences"])):
                    self.dialogs.append((d, codes))
        if not self.dialogs:
            raise ValueError(f"{self.root}: no {split} dialogs" + (f" of kind {kind!r}" if kind else "")
                             + (f" with speaker {speaker!r}" if speaker else ""))
        self.max_token = max((max(s["tokens"], default=-1) for d, _ in self.dialogs for s in d["sentences"]),
                             default=-1)
        self.lengths = np.array([d["n_frames"] for d, _ in self.dialogs], dtype=np.float64)
        self.rng = np.random.default_rng(seed)
        self.drift = {"n": 0, "sum": 0, "max": 0}   # text drift (frames) of sentences placed so far

    def __len__(self):
        return len(self.dialogs)

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state["rng"]

    def codes(self, i):
        d, codes = self.dialogs[i]
        c = np.asarray(codes[:, :, d["offset"]:d["offset"] + d["n_frames"]], dtype=np.int64)
        return {"assistant": c[0], "user": c[1]}

    def grid(self, i, cfg, task="dialog", lead=True, start=0, n_columns=None):
        """Dialog i as (tokens [17, T], weights [9, T], drifts) numpy arrays (whole by default)."""
        d = self.dialogs[i][0]
        return dialog_grid(d["sentences"], self.codes(i), cfg, task, lead, start, n_columns,
                           self.max_tail, d["source"])

    def get_batch(self, batch_size, window_frames, cfg, task="dialog", placement=None, rng=None):
        """(tokens [B, 17, T] long, weights [B, 9, T] float), T = window_frames columns. `task`: a
        Task, a TASKS name or a dict of Task fields; `placement` overrides the task's."""
        if self.max_token >= cfg.vocab_size:
            raise ValueError(f"{self.root}: text token id {self.max_token} >= model vocab_size "
                             f"{cfg.vocab_size}: prepared with a different tokenizer?")
        task, rng = as_task(task), rng if rng is not None else self.rng
        task = task if placement is None else replace(task, placement=placement)
        p_lead = task.p_lead()
        toks = np.empty((batch_size, 17, window_frames), dtype=np.int64)
        wts = np.empty((batch_size, 9, window_frames), dtype=np.float32)
        picks = rng.choice(len(self.dialogs), size=batch_size, p=self.lengths / self.lengths.sum())
        for b, i in enumerate(picks):
            lead = bool(rng.random() < p_lead)
            d, all_codes = self.dialogs[i]
            mine = sorted((s for s in d["sentences"] if s["speaker"] == task.monologue), key=lambda s: s["start"])
            row, drifts = place_monologue(mine, d["n_frames"], lead, cfg.text_wait_token_id, task.offset,
                                          self.max_tail, d["source"])
            self.drift = {"n": self.drift["n"] + len(drifts), "sum": self.drift["sum"] + sum(drifts),
                          "max": max([self.drift["max"], *drifts])}
            last = max(len(row), d["n_frames"] + 1) - window_frames      # latest useful start
            start = int(rng.integers(0, max(0, last) + 1))
            lo, hi = max(0, start - 1), min(d["n_frames"], start + window_frames)   # frames used
            c = np.asarray(all_codes[:, :, d["offset"] + lo:d["offset"] + max(lo, hi)], dtype=np.int64)
            codes = {"assistant": c[0], "user": c[1]}
            toks[b], wts[b] = grid_window(row, codes.get(task.speak), codes.get(task.listen), start,
                                          window_frames, cfg, task.text_weight, task.audio_weight, lo)
        return torch.from_numpy(toks), torch.from_numpy(wts)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Prepare FLM-Audio training data or synthesise the demo corpus.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="manifest (ours or moshi-finetune's) -> pre-tokenised shards")
    p.add_argument("--manifest", required=True, help="JSONL manifest (format detected per line)")
    p.add_argument("--out", required=True, help="output directory for shards + index.json")
    p.add_argument("--codec", default=None, help="Mimi safetensors or demo-codec file (default: fit the demo codec)")
    p.add_argument("--tokenizer", default=None, help="Qwen2-style tokenizer dir (default: byte-level)")
    p.add_argument("--shard_dialogs", type=int, default=64, help="dialogs per shard")
    p.add_argument("--val_frac", type=float, default=0.05, help="val fraction for lines without 'split'")
    p.add_argument("--max_tail", type=int, default=50, help="frames text may run past the audio end")
    p.add_argument("--pause", type=float, default=0.8, help="moshi format: pause (s) that ends a sentence")
    d = sub.add_parser("demo", help="synthesise the embedded spoken corpus with espeak-ng")
    d.add_argument("--out", required=True, help="output directory (wavs/ + manifest.jsonl)")
    d.add_argument("--n_dialogs", type=int, default=400)
    d.add_argument("--n_utterances", type=int, default=200, help="single-speaker utterances (ASR/TTS stages)")
    d.add_argument("--n_val", type=int, default=40, help="held-out validation dialogs")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--jobs", type=int, default=2, help="parallel espeak-ng processes")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "prepare":
            prepare(args.manifest, args.out, args.codec, args.tokenizer, args.shard_dialogs, args.val_frac,
                    args.max_tail, args.pause)
        else:
            import corpus   # the embedded corpus lives in corpus.py; `python data.py demo` stays its entry point
            corpus.demo(args.out, args.n_dialogs, args.n_utterances, args.n_val, args.seed, args.jobs)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
