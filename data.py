"""data.py -- from recordings + sentence timings to the [B, 17, T] token grids train.py eats.

A dialog is two audio channels (assistant, user) plus sentence segments `{speaker, start, end,
text}`. `prepare` turns each channel into codec codes (8 codebooks per 80 ms frame) and each
sentence into text tokens, once, into memory-mapped shards; `ShardDataset.get_batch` then cuts
windows and lays them out as grids (grid.py), choosing the monologue placement per sample, so one
prepared data set serves every stage of dual training.

Data flow, in file order (the text tokenizer is tokenizer.py):
  1. codec files: Kyutai's Mimi or the demo codec (`load_codec`)
  2. dataset formats (our manifest, moshi-finetune's) -> dialog records
  3. `prepare`: audio -> codec codes -> memory-mappable shards + JSON index
  4. `ShardDataset.get_batch`: windows for train.py
  5. the command line: `prepare`, `demo` (the embedded corpus, demo/corpus.py), codec `encode`,
     `decode` and `fit-codec`
"""
import argparse
import json
import math
import os
import shutil
import sys
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from codec import FRAME_RATE, FRAME_SIZE, N_CODEBOOKS, OFFICIAL_MIMI_FILE, SAMPLE_RATE, Mimi, read_audio, write_audio
from demo.codec import DemoCodec
from grid import DELAYS, PLACEMENTS, SPEAKERS, as_task, dialog_grid, grid_window, place_monologue, sentence_frames, thin_silence
from tokenizer import TOKENIZER_FILES, WAIT_TOKEN, encode_text, load_tokenizer, save_bpe, train_bpe, word_tokens


# ----------------------------------------------------------------------------------------------
# 1. Codec files. A checkpoint or data set names its codec file; its tensor names tell which
# codec it is. Inside a checkpoint directory each has a fixed name.

DEMO_CODEC_FILE = "demo_codec.safetensors"
CODEC_FILES = {"mimi": OFFICIAL_MIMI_FILE, "demo": DEMO_CODEC_FILE}


def codec_kind(path):
    """'mimi' or 'demo', from the tensor names of a safetensors file."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: codec file not found")
    try:
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
    except Exception as e:
        raise ValueError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    if "demo_codec.codebooks" in keys:
        return "demo"
    if any(k.startswith("encoder.model.") for k in keys):
        return "mimi"
    raise ValueError(f"{path}: neither a Mimi checkpoint nor a demo-codec file")


def load_codec(path, device="cpu"):
    """Kyutai's Mimi file or a fitted demo-codec file -> Mimi | DemoCodec (same interface)."""
    if codec_kind(path) == "demo":
        return DemoCodec.load(path).to(device)
    return Mimi.from_pretrained(path, device)

# ----------------------------------------------------------------------------------------------
# 2. Dataset formats -> dialog records {id, source, audio, segments, split, kind}, where audio is
# {"stereo": path} or {"assistant": path, "user": path} (either may be missing = silence).

SENTENCE_END = tuple(".?!。？！…")


def _join(a, b):
    cjk = a and b and ord(a[-1]) >= 0x2E80 and ord(b[0]) >= 0x2E80
    return a + b if cjk or not a else a + " " + b


def words_to_sentences(words, pause=0.8):
    """[[word, [start, end], speaker], ...] -> sentence segments (with their words), per speaker: a
    sentence ends at sentence punctuation or before a pause longer than `pause` seconds."""
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
                cur = {"speaker": spk, "start": float(s), "end": float(e), "text": w.strip(), "words": []}
            else:
                cur["text"], cur["end"] = _join(cur["text"], w.strip()), max(cur["end"], float(e))
            cur["words"].append([w.strip(), float(s), float(e)])
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
        seg = {"speaker": s["speaker"], "start": start, "end": end, "text": s["text"].strip()}
        if "words" in s:            # optional word timings (the word-aligned monologue needs them)
            try:
                seg["words"] = [[str(w), float(a), float(b)] for w, a, b in s["words"]]
            except (TypeError, ValueError):
                raise ValueError(f"{where}: segment {i} has bad words (expected [[word, start, end], ...])") from None
            if any(not start - 0.01 <= a <= b <= end + 0.01 for _, a, b in seg["words"]):
                raise ValueError(f"{where}: segment {i} has word times outside {start}..{end}")
        out.append(seg)
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
                   "kind": obj.get("kind", "dialog"), "segments": _check_segments(obj["segments"], where),
                   "held_out": obj.get("held_out"), "events": obj.get("events", [])}
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
# 3. prepare: manifest -> shards. A shard = `NAME.codes.npy` (int16 [2, 8, frames], assistant then
# user, dialogs concatenated; memory-mapped at load) + `NAME.json` (dialog offsets, sentences with
# their token ids, a CRC of the codes). The JSON is written last, atomically, so a shard with a
# JSON is finished: a re-run skips it. `index.json` lists shards, codec and tokenizer.

def _atomic_write(path, write):
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _crc(arr):
    return zlib.crc32(np.ascontiguousarray(arr).view(np.uint8).reshape(-1).data)


def _split_of(rec, val_frac):
    return rec["split"] or ("val" if zlib.crc32(rec["id"].encode()) % 10000 < val_frac * 10000 else "train")


@torch.no_grad()
def encode_channels(codec, wavs, max_batch_samples=SAMPLE_RATE * 240):
    """Codes [8, ceil(n / 1920)] (int16) for each 1-D wav, encoding similar lengths together
    (zero-padded at the end: the codec is causal, so padding never changes earlier frames)."""
    order = sorted(range(len(wavs)), key=lambda i: len(wavs[i]))
    out, i = [None] * len(wavs), 0
    while i < len(order):
        j = i + 1
        while j < len(order) and (j - i + 1) * len(wavs[order[j]]) <= max_batch_samples:
            j += 1
        n = math.ceil(len(wavs[order[j - 1]]) / FRAME_SIZE) * FRAME_SIZE
        batch = torch.zeros(j - i, 1, n)
        for b, k in enumerate(order[i:j]):
            batch[b, 0, :len(wavs[k])] = wavs[k]
        codes = codec.encode(batch)
        for b, k in enumerate(order[i:j]):
            out[k] = codes[b, :, :math.ceil(len(wavs[k]) / FRAME_SIZE)].numpy().astype(np.int16)
        i = j
    return out


def prepare(manifest, out, codec=None, tokenizer=None, shard_dialogs=64, val_frac=0.05,
            max_tail=50, pause=0.8, fit_seconds=1800.0, codec_codes=2048, log=print):
    """Write pre-tokenised shards of `manifest` into `out` (see section comment). `codec`: path
    of Kyutai's Mimi or a demo-codec file; None fits the demo codec (`codec_codes` entries per
    codebook) on up to `fit_seconds` of training audio. `tokenizer`: a directory, "bpe" (learn one
    on the training sentences) or None (byte-level)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    recs = read_manifest(manifest, pause)
    # From here until the new index is written the folder holds no data set: a run that dies
    # half-way leaves none, never a mix of old and new shards under the old index.
    (out / "index.json").unlink(missing_ok=True)
    for r in recs:
        r["split"] = _split_of(r, val_frac)
    if tokenizer == "bpe":              # learn merges on the training sentences (tokenizer.py)
        train_text = [s["text"] for r in recs if r["split"] == "train" for s in r["segments"]]
        save_bpe(out / "tokenizer", train_bpe(train_text))
        tokenizer = out / "tokenizer"
        log(f"trained a byte-level BPE on {len(train_text)} training sentences: {tokenizer / 'tokenizer.json'}")
    enc = load_tokenizer(tokenizer)
    for r in recs:
        for s in r["segments"]:
            s["tokens"] = encode_text(enc, s["text"])
            if "words" in s:
                s["word_tokens"] = word_tokens(enc, s["text"], s["words"], r["source"])
    if tokenizer is not None and Path(tokenizer).resolve() != (out / "tokenizer").resolve():
        (out / "tokenizer").mkdir(exist_ok=True)     # the data set carries its tokenizer, as checkpoints do
        for f in TOKENIZER_FILES:
            if (Path(tokenizer) / f).is_file():
                shutil.copy(Path(tokenizer) / f, out / "tokenizer" / f)
    fitted = out / DEMO_CODEC_FILE                  # a demo codec fitted here before is reused if its size fits
    if codec is None and fitted.is_file() and load_codec(fitted).cardinality == codec_codes:
        codec = fitted
        log(f"using the demo codec fitted earlier: {codec}")
    if codec is None:
        wavs, total = [], 0.0
        pool = [r for r in recs if r["split"] == "train"] or recs
        for r in tqdm(np.random.default_rng(0).permutation(pool), desc="reading audio to fit codec"):
            if total >= fit_seconds:
                break
            w = load_dialog_audio(r)
            wavs += [c for c in w if c.abs().max() > 0]
            total += w.shape[1] / SAMPLE_RATE
        model, codec = DemoCodec.fit(wavs, n_codes=codec_codes), fitted
        model.save(fitted)
        log(f"no --codec given: fitted the demo codec on {total:.0f} s of audio, saved to {codec}")
    else:
        model = load_codec(codec)
    codec = Path(codec).resolve()
    settings = {"codec": str(codec), "codec_size": codec.stat().st_size,
                "tokenizer": str(Path(tokenizer).resolve()) if tokenizer else "bytes"}
    shards = []
    for split in ("train", "val"):
        mine = [r for r in recs if r["split"] == split]
        for k in range(0, len(mine), shard_dialogs):
            shards.append((f"{split}_{k // shard_dialogs:05d}", split, mine[k:k + shard_dialogs]))
    wait_id = enc.encode_single_token(WAIT_TOKEN) if WAIT_TOKEN in enc.special_tokens_set else None
    index = {"version": 1, "frame_rate": FRAME_RATE, "n_codebooks": N_CODEBOOKS, "max_tail": max_tail,
             "codec": DEMO_CODEC_FILE if codec == fitted.resolve() else str(codec),   # the folder can move
             "codec_cardinality": model.cardinality, "tokenizer": "tokenizer" if tokenizer else None,
             "tokenizer_n_vocab": enc.n_vocab, "tokenizer_wait_id": wait_id, "shards": []}
    drift = {p: [] for p in PLACEMENTS}
    for name, split, group in tqdm(shards, desc="shards"):
        meta_path = out / f"{name}.json"
        want = {**settings, "content": zlib.crc32(json.dumps(     # same dialogs, texts, tokens and audio files
            [(r["id"], sorted((k, str(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for k, p in r["audio"].items()),
              r["segments"], r.get("held_out"), r.get("events")) for r in group]).encode())}
        try:                                    # reused only if its inputs are unchanged and it verifies
            meta = _open_shard(out, name, verify=True)[0]
        except ValueError:
            meta = None
        if not meta or meta.get("settings") != want:
            meta = _write_shard(out, name, split, group, model, want)
        else:
            tqdm.write(f"{name}: already done, verified, skipped")
        for d in meta["dialogs"]:       # every dialog must fit both placements before training
            for placement in PLACEMENTS:
                for spk in SPEAKERS:
                    sents = [s for s in d["sentences"] if s["speaker"] == spk]
                    if not placement.startswith("word") or all("word_tokens" in s for s in sents):
                        drift[placement] += place_monologue(sents, d["n_frames"], placement, 0, 0, max_tail,
                                                            d["source"])[1]
        index["shards"].append({"name": name, "split": split, "n_dialogs": len(meta["dialogs"]),
                                "n_frames": sum(d["n_frames"] for d in meta["dialogs"])})
    for key, v in drift.items():
        index[f"drift_{key}"] = {"mean": float(np.mean(v)) if v else 0.0, "max": int(max(v, default=0))}
        log(f"text drift ({key}): mean {index[f'drift_{key}']['mean']:.2f} frames, "
            f"max {index[f'drift_{key}']['max']} frames over {len(v)} {'words' if key.startswith('word') else 'sentences'}")
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
                        "n_frames": a.shape[1], "sentences": r["segments"], "held_out": r.get("held_out"),
                        "events": r.get("events", []),       # absolute: train.py may run from anywhere
                        "audio": {k: str(Path(p).resolve()) for k, p in r["audio"].items()}})
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
# 4. Loading. Shards are checked on open (shape against the JSON, file size, CRC) so a truncated
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

    def grid(self, i, cfg, task="dialog", placement="lead", start=0, n_columns=None):
        """Dialog i as (tokens [17, T], weights [9, T], drifts) numpy arrays (whole by default)."""
        d = self.dialogs[i][0]
        return dialog_grid(d["sentences"], self.codes(i), cfg, task, placement, start, n_columns,
                           self.max_tail, d["source"])

    def get_batch(self, batch_size, window_frames, cfg, task="dialog", placement=None, rng=None,
                  silence_keep=1.0, silence_rng=None):
        """(tokens [B, 17, T] long, weights [B, 9, T] float), T = window_frames columns. `task`: a Task, a
        TASKS name or a dict of Task fields; `placement` overrides the task's; `silence_keep` < 1 thins
        the speak loss where the speaker is silent (grid.thin_silence; draws from `silence_rng` or rng)."""
        if self.max_token >= cfg.vocab_size:
            raise ValueError(f"{self.root}: text token id {self.max_token} >= model vocab_size "
                             f"{cfg.vocab_size}: prepared with a different tokenizer?")
        task, rng = as_task(task), rng if rng is not None else self.rng
        task = task if placement is None else replace(task, placement=placement)
        toks = np.empty((batch_size, 17, window_frames), dtype=np.int64)
        wts = np.empty((batch_size, 9, window_frames), dtype=np.float32)
        picks = rng.choice(len(self.dialogs), size=batch_size, p=self.lengths / self.lengths.sum())
        for b, i in enumerate(picks):
            placement = task.draw(rng)
            d, all_codes = self.dialogs[i]
            row, drifts = place_monologue(d["sentences"], d["n_frames"], task.row_placement(placement),
                                          cfg.text_wait_token_id, task.offset, self.max_tail, d["source"])
            self.drift = {"n": self.drift["n"] + len(drifts), "sum": self.drift["sum"] + sum(drifts),
                          "max": max([self.drift["max"], *drifts])}
            # the window starts up to a quarter of its length before a random sentence's first frame,
            # so a sentence is rarely cut (its text would depend on audio the window lacks)
            last = max(0, max(len(row), d["n_frames"] + 1) - window_frames)     # latest useful start
            anchor = d["sentences"][rng.integers(len(d["sentences"]))]
            first = sentence_frames(anchor["start"], anchor["end"])[0]
            start = int(np.clip(first - rng.integers(0, window_frames // 4 + 1), 0, last))
            lo, hi = max(0, start - 1), min(d["n_frames"], start + window_frames)   # frames used
            c = np.asarray(all_codes[:, :, d["offset"] + lo:d["offset"] + max(lo, hi)], dtype=np.int64)
            codes = {"assistant": c[0], "user": c[1]}
            toks[b], wts[b] = grid_window(row, codes.get(task.speak), codes.get(task.listen), start,
                                          window_frames, cfg, task.text_weight, task.audio_weight, lo)
            if silence_keep < 1 and task.speak:
                wts[b, 1:] *= thin_silence(d["sentences"], task.speak, start, window_frames, silence_keep, silence_rng or rng)
        return torch.from_numpy(toks), torch.from_numpy(wts)


# ----------------------------------------------------------------------------------------------
# 5. The command line. Besides `prepare` and `demo`: a codec on its own (encode / decode stream in
# chunks of frames, as live; fit-codec fits a demo codec on manifests, folders or audio files).

def _audio_inputs(paths):
    """Every non-silent channel of the audio named by manifests (.jsonl), folders or files."""
    wavs = []
    for p in map(Path, paths):
        if p.suffix == ".jsonl":
            wavs += [c for r in read_manifest(p) for c in load_dialog_audio(r)]
        else:
            files = sorted(q for q in p.rglob("*") if q.suffix.lower() in (".wav", ".flac", ".ogg")) \
                if p.is_dir() else [p]
            wavs += [c for f in files for c in read_audio(f)]
    wavs = [w for w in wavs if w.abs().max() > 0]
    if not wavs:
        raise ValueError(f"no audio found in {', '.join(map(str, paths))}")
    return wavs


def _stream(total, chunk, fn, desc):
    """fn(a, b) over [0, total) frames in chunks, inside one stream, with a progress bar."""
    spans = [(a, min(total, a + chunk)) for a in range(0, total, chunk)]
    return torch.cat([fn(a, b) for a, b in tqdm(spans, desc=desc, disable=total < 125, file=sys.stderr)], -1)


def cli_codec(args):
    if args.chunk < 1:
        raise ValueError("--chunk must be >= 1")
    codec = load_codec(args.codec)
    if args.cmd == "encode":
        wav = read_audio(args.input)                                    # [C, N] at 24 kHz
        n = wav.shape[-1] // FRAME_SIZE
        if n == 0:
            raise ValueError(f"{args.input}: shorter than one 80 ms frame ({FRAME_SIZE} samples at 24 kHz)")
        x = wav[:, None, :n * FRAME_SIZE]
        with codec.streaming(x.shape[0]):
            codes = _stream(n, args.chunk, lambda a, b: codec.encode(x[..., a * FRAME_SIZE:b * FRAME_SIZE]),
                            f"encode {Path(args.input).name}")
        np.save(args.output, codes.numpy().astype(np.int16))
        return print(f"{args.output}: codes {tuple(codes.shape)} (channels, codebooks, frames at 12.5 Hz)")
    try:
        codes = torch.from_numpy(np.load(args.input).astype(np.int64))
    except Exception as e:
        raise ValueError(f"{args.input}: cannot read codes ({str(e).splitlines()[0]})") from None
    codes = codes[None] if codes.dim() == 2 else codes
    if codes.dim() != 3 or codes.shape[1] != N_CODEBOOKS or codes.shape[2] == 0 \
            or not 0 <= codes.min() <= codes.max() < codec.cardinality:
        raise ValueError(f"{args.input}: expected codes [{N_CODEBOOKS}, F] or [C, {N_CODEBOOKS}, F] "
                         f"in [0, {codec.cardinality}), got {tuple(codes.shape)}")
    with codec.streaming(codes.shape[0]):
        wav = _stream(codes.shape[-1], args.chunk, lambda a, b: codec.decode(codes[..., a:b]),
                      f"decode {Path(args.input).name}")
    write_audio(args.output, wav[:, 0])
    print(f"{args.output}: {wav.shape[-1] / SAMPLE_RATE:.2f} s, {wav.shape[0]} channel(s), 24 kHz")


def main(argv=None):
    ap = argparse.ArgumentParser(description="Prepare FLM-Audio training data, synthesise the demo corpus, "
                                 "or run a codec on its own.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="manifest (ours or moshi-finetune's) -> pre-tokenised shards")
    p.add_argument("--manifest", required=True, help="JSONL manifest (format detected per line)")
    p.add_argument("--out", required=True, help="output directory for shards + index.json")
    p.add_argument("--codec", default=None, help="Mimi safetensors or demo-codec file (default: fit the demo codec)")
    p.add_argument("--tokenizer", default=None, help="Qwen2-style tokenizer dir, or 'bpe' to learn a byte-level "
                   "BPE on the training sentences (default: byte-level)")
    p.add_argument("--shard_dialogs", type=int, default=64, help="dialogs per shard")
    p.add_argument("--val_frac", type=float, default=0.05, help="val fraction for lines without 'split'")
    p.add_argument("--max_tail", type=int, default=50, help="frames text may run past the audio end")
    p.add_argument("--pause", type=float, default=0.8, help="moshi format: pause (s) that ends a sentence")
    p.add_argument("--codec_codes", type=int, default=2048, help="entries per codebook of a fitted demo codec")
    d = sub.add_parser("demo", help="synthesise the embedded spoken corpus (demo/corpus.py)")
    d.add_argument("--out", required=True, help="output directory (wavs/ + manifest.jsonl)")
    d.add_argument("--n_dialogs", type=int, default=1200, help="turn-taking dialogs")
    d.add_argument("--n_duplex", type=int, default=600, help="dialogs with a pause, backchannel or barge-in")
    d.add_argument("--n_utterances", type=int, default=1200, help="single-speaker utterances (ASR/TTS stages)")
    d.add_argument("--n_val", type=int, default=80, help="validation recordings (held-out items and voice)")
    d.add_argument("--n_words", type=int, default=2000, help="recordings of one to three words (ASR/TTS stages)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--jobs", type=int, default=2, help="parallel synthesis processes")
    for name, what in (("encode", "audio file -> codes .npy [channels, 8, frames] (int16)"),
                       ("decode", "codes .npy ([8, F] or [C, 8, F]) -> 24 kHz wav")):
        c = sub.add_parser(name, help=what)
        c.add_argument("input"), c.add_argument("output")
        c.add_argument("--codec", default=OFFICIAL_MIMI_FILE, help="Kyutai's Mimi file or a demo-codec file "
                       f"(default ./{OFFICIAL_MIMI_FILE})")
        c.add_argument("--chunk", type=int, default=1, help="frames per streaming call (default 1, as live)")
    f = sub.add_parser("fit-codec", help="fit a demo codec on manifests, folders of audio or audio files")
    f.add_argument("inputs", nargs="+")
    f.add_argument("--out", required=True, help="output .safetensors")
    f.add_argument("--iters", type=int, default=8, help="k-means iterations per stage")
    f.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 4))
    try:
        if args.cmd == "prepare":
            prepare(args.manifest, args.out, args.codec, args.tokenizer, args.shard_dialogs, args.val_frac,
                    args.max_tail, args.pause, codec_codes=args.codec_codes)
        elif args.cmd == "demo":
            from demo import corpus
            corpus.demo(args.out, args.n_dialogs, args.n_duplex, args.n_utterances, args.n_val, args.n_words, args.seed,
                        args.jobs)
        elif args.cmd == "fit-codec":
            wavs = _audio_inputs(args.inputs)
            DemoCodec.fit(wavs, iters=args.iters, seed=args.seed, progress=True).save(args.out)
            print(f"{args.out}: demo codec fitted on {len(wavs)} signals, "
                  f"{sum(w.numel() for w in wavs) / SAMPLE_RATE:.1f} s of audio")
        else:
            cli_codec(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
