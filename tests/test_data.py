"""Tests of data.py: hand-worked grids, formats, tokenizer parity, bad inputs, prepare/load, demo."""
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
from conftest import FLM_FIXTURE  # noqa: E402
import grid  # noqa: E402
import tokenizer  # noqa: E402

torch.set_num_threads(1)
W, PAD = 256, 2049
CFG = SimpleNamespace(text_wait_token_id=W, aud_pad_token_id=PAD, aud_emp_token_id=2048, vocab_size=264)


# ---------------------------------------------------------------------------- timings and grids

def test_sentence_frames_convention():
    assert grid.sentence_frames(0.5, 1.7) == (6, 22)      # 6.25 -> 6; 21.25 -> first frame after = 22
    assert grid.sentence_frames(0.16, 0.24) == (2, 3)     # exact frame boundaries
    assert grid.sentence_frames(0.0, 0.0) == (0, 1)       # never an empty span


def _codes(F):
    """Distinct recognisable codes: assistant 100*q + f, user 1000 + 100*q + f."""
    q, f = np.arange(8)[:, None], np.arange(F)[None, :]
    return {"assistant": 100 * q + f, "user": 1000 + 100 * q + f}


# two assistant sentences: S1 at 0.1-0.5 s (frames 1..6, frame after = 7), 8 tokens;
# S2 at 0.6-0.7 s (frames 7..8, frame after = 9), 2 tokens; 12 frames of audio.
S1, S2 = [11, 12, 13, 14, 15, 16, 17, 18], [21, 22]
SENTS = [{"speaker": "assistant", "start": 0.1, "end": 0.5, "tokens": S1},
         {"speaker": "assistant", "start": 0.6, "end": 0.7, "tokens": S2},
         {"speaker": "user", "start": 0.0, "end": 0.3, "tokens": [5, 6]}]


def _check_audio_rows(tok, wts, codes, n_audio=12):
    for c in range(tok.shape[1]):
        for q in range(8):
            d = 0 if q == 0 else 1                 # acoustic codebooks one column late
            f = c - d
            a_ok = c > 0 and 0 <= f < n_audio
            assert tok[1 + q, c] == (codes["assistant"][q, f] if a_ok else PAD), (q, c)
            assert wts[1 + q, c] == (1.0 if a_ok else 0.0), (q, c)
            u_ok = (c > 0 or q == 0) and 0 <= f < n_audio
            assert tok[9 + q, c] == (codes["user"][q, f] if u_ok else PAD), (q, c)


def test_grid_lead_hand_worked():
    codes = _codes(12)
    tok, wts, drifts = grid.dialog_grid(SENTS, codes, CFG, "dialog", placement="lead")
    # S1 at its first frame 1; S2's target (7) is taken by S1 (1..8) -> starts at 9, drift 2
    assert tok[0].tolist() == [W, 11, 12, 13, 14, 15, 16, 17, 18, 21, 22, W, W]
    assert drifts == [0, 2]
    assert wts[0].tolist() == [0] + [1] * 11 + [0]        # column 12 = frame 12: past the dialog
    _check_audio_rows(tok, wts, codes)


def test_grid_trail_hand_worked_overlap_and_tail():
    codes = _codes(12)
    tok, wts, drifts = grid.dialog_grid(SENTS, codes, CFG, "dialog", placement="trail")
    # S1 from the frame after its audio (7) to 14; S2 target 9 -> pushed to 15..16 (drift 6),
    # running 5 frames past the audio: text weight 1, audio rows padded with weight 0
    assert tok[0].tolist() == [W] * 7 + S1 + S2
    assert drifts == [0, 6]
    assert wts[0].tolist() == [0] + [1] * 16
    _check_audio_rows(tok, wts, codes)
    with pytest.raises(ValueError, match=r"my-dialog.*frame 17.*4 frames past"):
        grid.dialog_grid(SENTS, codes, CFG, "dialog", placement="trail", max_tail=4, name="my-dialog")


def test_grid_offset_and_routing():
    codes = _codes(12)
    tok, _, drifts = grid.dialog_grid(SENTS, codes, CFG, grid.Task(offset=2), placement="lead")
    assert tok[0].tolist() == [W, W, W] + S1 + S2 and drifts == [0, 2]  # S1 at 1+2, S2 pushed 9 -> 11
    tok, _, drifts = grid.dialog_grid(SENTS, codes, CFG, grid.Task(offset=-3), placement="lead")
    assert tok[0, :4].tolist() == [W, 11, 12, 13] and drifts == [0, 5]   # target clamped to 1
    tok, wts, _ = grid.dialog_grid(SENTS, codes, CFG, "asr", placement="trail")  # user text trails user audio
    assert tok[0].tolist()[:7] == [W, W, W, W, 5, 6, W]                  # 0.3 s -> frame after = 4
    assert (tok[1:9] == PAD).all() and (wts[1:] == 0).all()
    assert tok[9, 3] == codes["user"][0, 3]
    tok, wts, _ = grid.dialog_grid(SENTS, codes, CFG, "tts", placement="lead")
    assert (tok[9:] == PAD).all() and wts[1, 3] == 1


def test_grid_word_aligned_hand_worked():
    """The word-aligned layouts: each word's tokens from its own first frame (word-lead) or from the
    frame after it (word-trail), <wait> between."""
    words = [dict(SENTS[0], words=[["a", 0.1, 0.3], ["b", 0.4, 0.5]], word_tokens=[[11, 12, 13], [14]]),
             dict(SENTS[1], words=[["c", 0.6, 0.7]], word_tokens=[[21, 22]])]
    tok, _, drifts = grid.dialog_grid(words + SENTS[2:], _codes(12), CFG, "dialog", placement="word-lead")
    # a: frame 1 (1..3); b: frame 5; c: frame 7
    assert tok[0].tolist() == [W, 11, 12, 13, W, 14, W, 21, 22, W, W, W, W] and drifts == [0, 0, 0]
    tok, _, drifts = grid.dialog_grid(words + SENTS[2:], _codes(12), CFG, "dialog", placement="word-trail")
    # a ends 0.3 s -> frame 4 (4..6); b ends 0.5 s -> 7, pushed to 7 (free); c ends 0.7 s -> 9
    assert tok[0].tolist() == [W, W, W, W, 11, 12, 13, 14, W, 21, 22, W, W] and drifts == [0, 0, 0]
    with pytest.raises(ValueError, match="word timings"):
        grid.dialog_grid(SENTS, _codes(12), CFG, "dialog", placement="word-lead")
    task = grid.Task(placement="word-trail")
    assert {task.draw(np.random.default_rng(s)) for s in range(5)} == {"word-trail"}
    mix = grid.Task(placement=0.5)
    assert {mix.draw(np.random.default_rng(s)) for s in range(20)} == {"lead", "trail"}


def test_grid_heard_words_beside_the_assistants_sentences():
    """Task.heard: the user's words trail each word in row 0, the assistant's sentences lead."""
    user = dict(SENTS[2], words=[["x", 0.0, 0.1], ["y", 0.16, 0.3]], word_tokens=[[5], [6]])
    tok, _, drifts = grid.dialog_grid(SENTS[:2] + [user], _codes(12), CFG, grid.Task(heard="word-trail"),
                                      placement="lead")
    # x ends 0.1 s -> frame 2; y ends 0.3 s -> 4; S1 leads at 1 (1..8) so x, y are pushed to 9, 10;
    # S2 (target 7) follows them at 11
    assert tok[0].tolist() == [W] + S1 + [5, 6] + S2 and drifts == [0, 7, 6, 4]
    assert grid.Task(heard="trail", listen=None).row_placement("lead") == {"user": "trail", "assistant": "lead"}
    assert grid.Task(heard="trail", listen="assistant").row_placement("lead") == {"assistant": "lead"}
    # text only (no audio rows): the question's text, then the answer's, as the language probe reads them
    tok, w, _ = grid.dialog_grid(SENTS[:3], _codes(12), CFG, grid.Task(heard="trail", speak=None, listen=None),
                                 placement="lead")
    assert (tok[1:] == CFG.aud_pad_token_id).all() and (w[1:] == 0).all() and set(tok[0].tolist()) > {W}


def test_window_starts_with_initial_column():
    codes = _codes(12)
    full, fw, _ = grid.dialog_grid(SENTS, codes, CFG, placement="lead")
    win, ww, _ = grid.dialog_grid(SENTS, codes, CFG, placement="lead", start=3, n_columns=6)
    assert (win[:, 1:] == full[:, 4:9]).all() and (ww[:, 1:] == fw[:, 4:9]).all()
    assert win[0, 0] == W and (win[1:9, 0] == PAD).all() and (win[10:, 0] == PAD).all()
    assert win[9, 0] == codes["user"][0, 3] and (ww[:, 0] == 0).all()


def test_thin_silence_hand_worked():
    """The assistant talks 1.0-1.4 s: frames 12..17 (12.5 -> 12, 17.5 -> frame after 18), widened by
    2 frames: 10..19 always count. Elsewhere (the user's sentence is not the speaker's) a column
    weighs 0 or 1/keep, kept at about the asked share, so the expected weight stays 1."""
    sents = [dict(speaker="assistant", start=1.0, end=1.4), dict(speaker="user", start=0.0, end=0.7)]
    f = np.stack([grid.thin_silence(sents, "assistant", 0, 40, 0.25, np.random.default_rng(i)) for i in range(400)])
    assert (f[:, 10:20] == 1).all()
    silent = np.r_[f[:, :10].ravel(), f[:, 20:].ravel()]
    assert set(np.unique(silent)) == {0.0, 4.0} and abs(silent.mean() - 1) < 0.05
    f = grid.thin_silence(sents, "assistant", 8, 6, 0.5, np.random.default_rng(0))   # frames 8..13
    assert (f[2:] == 1).all() and set(f[:2]) <= {0.0, 2.0}
    f = grid.thin_silence(sents, "user", 0, 40, 0.25, np.random.default_rng(0))   # user: frames 0..8 (+2)
    assert (f[:11] == 1).all() and set(f[11:]) == {0.0, 4.0}
    assert (grid.thin_silence(sents, "assistant", 0, 40, 1.0, np.random.default_rng(0)) == 1).all()


def test_grid_layout_matches_official_streaming_buffer():
    """The official streaming loop's token buffer (fixture) is a grid in delayed coordinates: the
    model's frame f >= 1 (= stream_out column f-1) has text + semantic at column f, acoustic at f+1;
    user frame f has semantic at column f, acoustic at f+1; column 0 = the initial column."""
    from safetensors.numpy import load_file
    fx = FLM_FIXTURE
    e = load_file(str(fx / "expected.safetensors"))
    wait = json.loads((fx / "config.json").read_text())["mm_token_info"]["text_wait_token_id"]
    cache, listen, out = e["stream_cache"][0], e["stream_listen"][0], e["stream_out"]
    speak = np.zeros((8, 16), np.int64)
    speak[:, 1:] = out[1:]
    speak[1:, 0] = cache[2:9, 1]                  # frame 0's acoustic tokens never reach stream_out
    text = np.concatenate([[wait], out[0]])
    cfg = SimpleNamespace(text_wait_token_id=wait, aud_pad_token_id=2049)
    tok, _ = grid.grid_window(text, speak, listen, 0, 16, cfg)
    assert np.array_equal(tok, cache[:, :16])


def test_words_to_sentences():
    words = [["Hello", [0.1, 0.3], "A"], ["there.", [0.35, 0.6], "A"], ["How", [0.7, 0.8], "A"],
             ["are", [0.85, 0.9], "A"], ["you", [0.95, 1.1], "A"], ["Fine", [2.5, 2.7], "A"],
             ["好", [0.2, 0.3], "B"], ["的", [0.3, 0.4], "B"]]
    out = data.words_to_sentences(words, pause=0.8)
    assert [(s["speaker"], s["text"], s["start"], s["end"]) for s in out] == [
        ("A", "Hello there.", 0.1, 0.6), ("B", "好的", 0.2, 0.4), ("A", "How are you", 0.7, 1.1),
        ("A", "Fine", 2.5, 2.7)]


def _tone(n, freq, sr=24000):
    return 0.3 * np.sin(2 * np.pi * freq * np.arange(n) / sr).astype(np.float32)


@pytest.fixture(scope="module")
def rand_codec(tmp_path_factory):
    """A demo-codec file with random codebooks (fitting one is tested separately)."""
    from demo import codec as democodec
    g = torch.Generator().manual_seed(0)
    dim = democodec.SUB * democodec.N_MELS
    path = tmp_path_factory.mktemp("codec") / "rand.safetensors"
    democodec.DemoCodec(torch.zeros(dim), torch.ones(dim) * 3, torch.randn(8, 2048, dim, generator=g)).save(path)
    return path


def test_moshi_format_prepare_and_load(tmp_path, rand_codec):
    import codec
    wav = np.stack([_tone(36480, 220), _tone(36480, 330)], 1)     # 19 frames, stereo, 24 kHz
    sf.write(tmp_path / "a.wav", wav, 24000)
    (tmp_path / "a.json").write_text(json.dumps({"alignments": [
        ["Hi", [0.1, 0.2], "SPEAKER_MAIN"], ["there.", [0.25, 0.5], "SPEAKER_MAIN"],
        ["Yes", [0.3, 0.5], "SPEAKER_OTHER"], ["Bye", [0.9, 1.2], "SPEAKER_MAIN"]]}))
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": "a.wav", "duration": 1.5}) + "\n")
    recs = data.read_manifest(tmp_path / "m.jsonl")
    assert [(s["speaker"], s["text"]) for s in recs[0]["segments"]] == [
        ("assistant", "Hi there."), ("user", "Yes"), ("assistant", "Bye")]
    out = tmp_path / "prep"
    data.prepare(tmp_path / "m.jsonl", out, codec=rand_codec, val_frac=0.0, log=lambda *a: None)
    ds = data.ShardDataset(out, "train")
    stored = codec.read_audio(tmp_path / "a.wav")                  # the 16-bit file, both channels
    want = data.load_codec(rand_codec).encode(stored[:, None])     # [2, 8, 19], one channel per item
    got = ds.codes(0)
    assert np.array_equal(got["assistant"], want[0].numpy()) and np.array_equal(got["user"], want[1].numpy())
    tok, wts, _ = ds.grid(0, CFG, "dialog", placement="lead")
    # "Hi there." from frame floor(0.1*12.5)=1; "Bye" from floor(0.9*12.5)=11
    assert tok[0, 1:10].tolist() == list(b"Hi there.") and tok[0, 11:14].tolist() == list(b"Bye")
    assert tok[2, 5] == want[0, 1, 4] and tok[9, 0] == want[1, 0, 0]


def _write_ours(tmp_path, segments, audio="d.wav", n=48000):
    if audio == "d.wav":
        sf.write(tmp_path / "d.wav", np.stack([_tone(n, 200), _tone(n, 300)], 1), 24000)
    line = {"id": "d1", "audio": audio, "segments": segments}
    (tmp_path / "m.jsonl").write_text(json.dumps(line) + "\n")
    return tmp_path / "m.jsonl"


def test_prepare_resume_corrupt_and_batches(tmp_path, rand_codec):
    segs = [{"speaker": "user", "start": 0.2, "end": 0.8, "text": "What is one plus one?"},
            {"speaker": "assistant", "start": 1.0, "end": 1.6, "text": "Two."}]
    m = _write_ours(tmp_path, segs)
    out = tmp_path / "prep"
    logs = []
    data.prepare(m, out, codec=rand_codec, val_frac=0.0, log=logs.append)
    codes_file = out / "train_00000.codes.npy"
    mtime = codes_file.stat().st_mtime_ns
    data.prepare(m, out, codec=rand_codec, val_frac=0.0, log=logs.append)
    assert codes_file.stat().st_mtime_ns == mtime                  # finished shard skipped
    ds = data.ShardDataset(out, "train", seed=1)
    assert len(ds) == 1 and len(data.ShardDataset(out, "train", kind="dialog", speaker="user")) == 1
    with pytest.raises(ValueError, match="no train dialogs of kind 'utterance'"):
        data.ShardDataset(out, "train", kind="utterance")
    state = ds.state_dict()
    t1, w1 = ds.get_batch(3, 20, CFG, "dialog", placement="mix")
    assert t1.shape == (3, 17, 20) and t1.dtype == torch.long and w1.shape == (3, 9, 20)
    ds2 = data.ShardDataset(out, "train", seed=99)
    ds2.load_state_dict(state)
    t2, w2 = ds2.get_batch(3, 20, CFG, "dialog", placement="mix")
    assert torch.equal(t1, t2) and torch.equal(w1, w2)             # resumable from the state
    for place in ("lead", "trail"):                               # each sample = some window of the dialog
        full, _, _ = ds.grid(0, CFG, "dialog", placement=place)
        windows = [ds.grid(0, CFG, "dialog", placement=place, start=s, n_columns=20) for s in range(full.shape[1])]
        tb, wb = ds.get_batch(6, 20, CFG, "dialog", placement=place)
        for b in range(6):
            assert any(np.array_equal(tb[b].numpy(), t) and np.array_equal(wb[b].numpy(), w)
                       for t, w, _ in windows)
    with pytest.raises(ValueError, match="vocab_size"):
        ds.get_batch(1, 20, SimpleNamespace(**{**vars(CFG), "vocab_size": 100}))
    raw = codes_file.read_bytes()
    codes_file.write_bytes(raw[:-7])                               # truncated
    with pytest.raises(ValueError, match="train_00000.codes.npy"):
        data.ShardDataset(out, "train")
    codes_file.write_bytes(raw[:-2] + b"\x07\x00")                 # same size, flipped content
    with pytest.raises(ValueError, match="train_00000.codes.npy.*checksum"):
        data.ShardDataset(out, "train")


def test_prepare_fits_demo_codec_when_none_given(tmp_path):
    m = _write_ours(tmp_path, [{"speaker": "assistant", "start": 0.1, "end": 1.0, "text": "Hi."}], n=24000)
    logs = []
    data.prepare(m, tmp_path / "p", val_frac=0.0, log=logs.append)
    assert (tmp_path / "p" / data.DEMO_CODEC_FILE).is_file()
    assert any("fitted the demo codec" in x for x in logs)


# ---------------------------------------------------------------------------- bad inputs

def test_bad_inputs_name_the_file(tmp_path, rand_codec):
    out = tmp_path / "p"
    seg = {"speaker": "user", "start": 0.1, "end": 0.5, "text": "Hello."}
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "x", "audio": "d.wav"}) + "\n")
    with pytest.raises(ValueError, match=r"m.jsonl:1.*segments"):
        data.prepare(tmp_path / "m.jsonl", out, codec=rand_codec)
    m = _write_ours(tmp_path, [{**seg, "end": 5.0}], n=24000)
    with pytest.raises(ValueError, match=r"m.jsonl:1: segment 0 ends at 5.00s, past the end.*d.wav"):
        data.prepare(m, out, codec=rand_codec)
    m = _write_ours(tmp_path, [{**seg, "speaker": "bob"}])
    with pytest.raises(ValueError, match=r"m.jsonl:1.*unknown speaker 'bob'"):
        data.prepare(m, out, codec=rand_codec)
    (tmp_path / "notaudio.wav").write_text("hello, I am text")
    m = _write_ours(tmp_path, [seg], audio="notaudio.wav")
    with pytest.raises(ValueError, match=r"notaudio.wav"):
        data.prepare(m, out, codec=rand_codec)
    sf.write(tmp_path / "s.wav", np.zeros((24000, 2), np.float32), 24000)   # moshi: no .json beside
    (tmp_path / "mm.jsonl").write_text(json.dumps({"path": "s.wav", "duration": 1.0}) + "\n")
    with pytest.raises(FileNotFoundError, match=r"s.json: transcript"):
        data.read_manifest(tmp_path / "mm.jsonl")
    (tmp_path / "s.json").write_text(json.dumps({"alignments": [["hi", [0.1, 0.2], "bob"]]}))
    with pytest.raises(ValueError, match=r"s.json: unknown speaker 'bob'"):
        data.read_manifest(tmp_path / "mm.jsonl")
    r = subprocess.run([sys.executable, str(ROOT / "data.py"), "prepare", "--manifest", str(m),
                        "--out", str(out), "--codec", str(rand_codec)], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "notaudio.wav" in r.stderr


def test_prepare_is_transactional_and_reuses_only_verified_shards(tmp_path, rand_codec):
    """A re-prepare that dies half-way leaves no data set (never old index + new shards); a corrupt
    shard is rewritten by the next prepare; audio re-recorded under the same path is re-encoded."""
    segs = [{"speaker": "user", "start": 0.2, "end": 0.8, "text": "What is one plus one?"},
            {"speaker": "assistant", "start": 1.0, "end": 1.6, "text": "Two."}]
    m = _write_ours(tmp_path, segs)
    lines = [json.loads(m.read_text())]
    for k in range(2, 5):                                            # 4 dialogs, one shard each
        sf.write(tmp_path / f"d{k}.wav", np.stack([_tone(48000, 100 * k), _tone(48000, 150 * k)], 1), 24000)
        lines.append({**lines[0], "id": f"d{k}", "audio": f"d{k}.wav"})
    m.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out, quiet = tmp_path / "prep", (lambda *a: None)
    data.prepare(m, out, codec=rand_codec, val_frac=0.0, shard_dialogs=1, log=quiet)
    first = (out / "train_00000.codes.npy").read_bytes()
    # 1. a changed manifest whose third dialog's audio is unreadable: prepare fails mid-way ...
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    changed = [{**x, "id": x["id"] + "b"} for x in lines]
    changed[2]["audio"] = "bad.wav"
    m.write_text("".join(json.dumps(x) + "\n" for x in changed))
    with pytest.raises(ValueError, match="bad.wav"):
        data.prepare(m, out, codec=rand_codec, val_frac=0.0, shard_dialogs=1, log=quiet)
    with pytest.raises(FileNotFoundError, match="index.json"):      # ... and leaves no data set to train on
        data.ShardDataset(out, "train")
    # 2. the original manifest again: all shards verify or are rewritten; a corrupted one is rewritten
    m.write_text("".join(json.dumps(x) + "\n" for x in lines))
    data.prepare(m, out, codec=rand_codec, val_frac=0.0, shard_dialogs=1, log=quiet)
    assert [d[0]["id"] for d in data.ShardDataset(out, "train").dialogs] == ["d1", "d2", "d3", "d4"]
    raw = (out / "train_00001.codes.npy").read_bytes()
    (out / "train_00001.codes.npy").write_bytes(raw[:-2] + bytes([raw[-2] ^ 1, raw[-1]]))
    data.prepare(m, out, codec=rand_codec, val_frac=0.0, shard_dialogs=1, log=quiet)
    assert (out / "train_00001.codes.npy").read_bytes() == raw and len(data.ShardDataset(out, "train")) == 4
    # 3. new audio under the same path: its shard is encoded again
    sf.write(tmp_path / "d.wav", np.stack([_tone(48000, 700), _tone(48000, 900)], 1), 24000)
    data.prepare(m, out, codec=rand_codec, val_frac=0.0, shard_dialogs=1, log=quiet)
    assert (out / "train_00000.codes.npy").read_bytes() != first
