"""chat.py: the streaming step against the official trace, the file-mode loop end to end, errors.

Oracles: the fixture's greedy streaming trace (made by the official implementation), and
reference.OfficialStyleLoop, a plain loop (growing cache by torch.cat, DepthGPT recomputed per
codebook, sort-based sampling) that is itself checked against the fixture first.
"""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

import chat
import reference
import kernels
from model import FLMAudio, FLMConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _small_cpu(monkeypatch):
    # keep tests fast on a shared 2-core machine: one thread, kernels eager (no compile warm-up)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(kernels, "COMPILE", False)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def official(official_dir, official_expected):
    return FLMAudio.from_pretrained(official_dir), official_expected


def run_stream(stream, listen):
    """Feed listen [B, 8, T] one frame per step; returns (outputs [B, 9, T-1], columns per step)."""
    outs, cols = [], []
    for t in range(listen.shape[2]):
        o = stream.step(listen[:, :, t])
        cols.append(stream.columns()[:, :, -2].clone())       # column t, as fed to the backbone
        if o is not None:
            outs.append(o)
    cols.append(stream.columns()[:, :, -1])                    # column T (rows 0..8 sampled last)
    return torch.stack(outs, -1), torch.stack(cols, -1)


def greedy(m, **kw):
    """The fixture's greedy trace: argmax without repetition penalty (the official sampler applies
    the penalty before the argmax, so temperature 0 alone is not plain argmax)."""
    return chat.LMStream(m, temp_text=0, temp_audio=0, repetition_penalty_text=1.0,
                         repetition_penalty_audio=1.0, **kw)


def test_greedy_trace_matches_official_fixture(official):
    m, e = official
    out, cache = run_stream(greedy(m), e["stream_listen"])
    assert torch.equal(out[0], e["stream_out"])
    T = e["stream_listen"].shape[2]
    ref = e["stream_cache"][..., :T + 1]
    assert (e["stream_cache"][..., T + 1:] == 0).all()         # the rest of the official buffer is unused
    # the listen semantic row of column T is written only by the next step (the official holds 0)
    assert ref[0, 9, T] == 0
    cache[0, 9, T] = 0
    assert torch.equal(cache, ref)


def test_cpu_layout_model_gives_the_same_trace(official):
    m, e = official
    fast = copy.deepcopy(m).cpu_layout_()           # weights stored transposed: same numbers, faster reads
    assert torch.equal(run_stream(greedy(fast), e["stream_listen"])[0][0], e["stream_out"])


def test_zeros_start_begins_from_an_all_zero_column(official):
    m, e = official
    s = greedy(m, start="zeros")
    assert (s.columns()[:, :, -1] == 0).all()
    assert not torch.equal(run_stream(s, e["stream_listen"])[0][0], e["stream_out"])   # a different start
    initial = torch.tensor([m.cfg.text_wait_token_id] + [m.cfg.aud_pad_token_id] * 16)
    assert torch.equal(greedy(m).columns()[0, :, -1], initial)
    with pytest.raises(ValueError, match="start"):
        greedy(m, start="silence")


def test_warmup_and_reset_restore_a_fresh_stream(official):
    m, e = official
    s = greedy(m).warmup()
    assert torch.equal(run_stream(s, e["stream_listen"])[0][0], e["stream_out"])
    s.reset()
    assert torch.equal(run_stream(s, e["stream_listen"])[0][0], e["stream_out"])


def test_official_style_loop_matches_fixture(official):
    m, e = official
    loop = reference.OfficialStyleLoop(m, temp_text=0, temp_audio=0, rep_text=1.0, rep_audio=1.0)
    outs = [loop.step(e["stream_listen"][:, :, t]) for t in range(e["stream_listen"].shape[2])]
    assert outs[0] is None
    assert torch.equal(torch.cat(outs[1:]).T, e["stream_out"])


def test_top_k_1_equals_greedy_and_sampling_reaches_the_sampler(official):
    m, e = official
    listen = e["stream_listen"]
    # temperature 1 with top-p off and top-k 1: the official sampler's precedence makes this argmax
    k1 = chat.LMStream(m, temp_text=1.0, temp_audio=1.0, top_k_text=1, top_k_audio=1, top_p_text=0,
                       top_p_audio=0, repetition_penalty_text=1.0, repetition_penalty_audio=1.0)
    assert torch.equal(run_stream(k1, listen)[0][0], e["stream_out"])
    # official defaults (top-p 0.9 sampling, temperature 0.5 on audio) do sample: not the greedy trace
    sampled = run_stream(chat.LMStream(m, seed=0), listen)[0][0]
    assert not torch.equal(sampled[1:], e["stream_out"][1:])
    # top-k 1 with top-p 0.9: top-p takes precedence (as officially), so this samples too
    k1p = chat.LMStream(m, temp_text=1.0, temp_audio=1.0, top_k_text=1, top_k_audio=1, seed=0)
    assert not torch.equal(run_stream(k1p, listen)[0][0], e["stream_out"])


def test_repetition_window_reaches_the_sampler(official):
    m, _ = official
    g = torch.Generator().manual_seed(1)
    listen = torch.randint(0, 2048, (1, 8, 30), generator=g)
    # a huge penalty over a 50-step window, argmax via top-k 1: no text token may repeat
    s = chat.LMStream(m, temp_text=1.0, top_k_text=1, top_p_text=0, repetition_penalty_text=1e6)
    text = run_stream(s, listen)[0][0, 0].tolist()
    assert len(set(text)) == len(text)
    plain = run_stream(greedy(m), listen)[0][0, 0].tolist()
    assert len(set(plain)) < len(plain)        # without the penalty this model does repeat itself


def test_penalty_applies_before_the_argmax_as_officially(official):
    m, e = official
    listen = e["stream_listen"]
    out = run_stream(chat.LMStream(m, temp_text=0, temp_audio=0), listen)[0][0]     # default penalties
    ref = reference.OfficialStyleLoop(m, temp_text=0, temp_audio=0)
    want = torch.cat([o for o in (ref.step(listen[:, :, t]) for t in range(listen.shape[2])) if o is not None]).T
    assert torch.equal(out, want) and not torch.equal(out, e["stream_out"])


def test_sliding_window_beyond_max_len_matches_windowed_reference(official):
    m, _ = official
    g = torch.Generator().manual_seed(2)
    listen = torch.randint(0, 2048, (1, 8, 26), generator=g)
    s = chat.LMStream(m, temp_text=0, temp_audio=0, max_len=8)         # default penalties on both sides
    before = [(b.data_ptr(), b.shape) for b in s.buffers()]
    out = run_stream(s, listen)[0][0]
    assert before == [(b.data_ptr(), b.shape) for b in s.buffers()]      # constant memory, same buffers
    ref = reference.OfficialStyleLoop(m, temp_text=0, temp_audio=0, attn_window=8)
    ref_out = torch.cat([o for o in (ref.step(listen[:, :, t]) for t in range(26)) if o is not None]).T
    assert torch.equal(out, ref_out)


def test_batch_rows_are_independent(official):
    m, e = official
    listen = torch.cat([e["stream_listen"], torch.randint(0, 2048, (1, 8, 16))])
    out = run_stream(greedy(m, batch_size=2), listen)[0]
    assert torch.equal(out[0], e["stream_out"])
    assert torch.equal(out[1], run_stream(greedy(m), listen[1:])[0][0])


def test_monologue_sentences_hand_worked():
    import tokenizer
    tok = tokenizer.load_tokenizer(None)
    w = 256
    mono = chat.Monologue(tok, w)
    for f, t in enumerate([w, ord("H"), ord("i"), w, w, ord("O"), ord("k")]):
        mono.push(t, f + 1)
    assert mono.finish(8) == [{"text": "Hi", "start": 0.16, "end": 0.32},
                              {"text": "Ok", "start": 0.48, "end": 0.64}]


# -----------------------------------------------------------------------------
# file mode end to end on a tiny random model and a short synthetic input


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from demo import codec as democodec
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    cfg = FLMConfig.preset("tiny")
    cfg.num_hidden_layers = 2
    FLMAudio(cfg).save_pretrained(d)
    t = torch.arange(24000 * 2) / 24000
    democodec.DemoCodec.fit([0.3 * torch.sin(2 * 3.1416 * 220 * t) + 0.05 * torch.randn(t.shape)],
                            iters=1).save(d / chat.DEMO_CODEC_FILE)
    return d


def test_file_mode_end_to_end(tiny_ckpt, tmp_path, capsys):
    # 0.7 s of stereo audio at 16 kHz; 0.96 s more; a 6-step attention window (< 21 frames)
    wav = 0.2 * torch.randn(11200, 2)
    sf.write(tmp_path / "user.wav", wav.numpy(), 16000)
    chat.main(["--checkpoint", str(tiny_ckpt), "--input", str(tmp_path / "user.wav"),
               "--output", str(tmp_path / "out.wav"), "--seconds", "0.96", "--max-len", "6",
               "--seed", "0", "--stats"])
    n_frames = 9 + 12                                          # ceil(16800 / 1920) + 0.96 s
    data, sr = sf.read(tmp_path / "out.wav")
    assert sr == 24000 and data.shape == (n_frames * 1920, 2)
    assert abs(data[:, 0]).max() > 0                          # the assistant said something
    assert abs(data[:16800, 1]).max() > 0 and abs(data[16800 + 100:, 1]).max() == 0  # user, then silence
    tr = json.loads((tmp_path / "out.json").read_text())
    assert tr["frames"] == n_frames and tr["channels"] == ["assistant", "user"]
    assert tr["sentences"], "the random model's monologue has no sentence"
    for s in tr["sentences"]:
        assert s["text"] and 0 <= s["start"] < s["end"] <= n_frames / 12.5
    err = capsys.readouterr().err
    assert "real-time factor" in err and "p99" in err


def test_transcript_path_option(tiny_ckpt, tmp_path):
    sf.write(tmp_path / "u.wav", (0.1 * torch.randn(4000)).numpy(), 24000)
    chat.main(["--checkpoint", str(tiny_ckpt), "--input", str(tmp_path / "u.wav"), "--output",
               str(tmp_path / "o.wav"), "--transcript", str(tmp_path / "t" / "T.json")])
    assert json.loads((tmp_path / "t" / "T.json").read_text())["frames"] == 3


# -----------------------------------------------------------------------------
# clear errors


def _error_of(argv, capsys):
    with pytest.raises(SystemExit) as ex:
        chat.main(argv)
    assert ex.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("chat.py: ")
    return err


def test_bad_paths_give_clear_errors(tiny_ckpt, tmp_path, capsys):
    sf.write(tmp_path / "x.wav", (0.1 * torch.randn(4000)).numpy(), 24000)
    x = str(tmp_path / "x.wav")
    err = _error_of(["--checkpoint", str(tmp_path / "nope"), "--input", x, "--output", "y.wav"], capsys)
    assert "nope" in err and "not found" in err
    err = _error_of(["--checkpoint", str(tiny_ckpt), "--input", str(tmp_path / "missing.wav"),
                     "--output", str(tmp_path / "y.wav")], capsys)
    assert "missing.wav" in err
    (tmp_path / "bad.wav").write_bytes(b"not audio at all")
    err = _error_of(["--checkpoint", str(tiny_ckpt), "--input", str(tmp_path / "bad.wav"),
                     "--output", str(tmp_path / "y.wav")], capsys)
    assert "bad.wav" in err
    err = _error_of(["--checkpoint", str(tiny_ckpt), "--mimi", str(tmp_path / "m.safetensors"),
                     "--input", x, "--output", "y.wav"], capsys)
    assert "m.safetensors" in err
    # a checkpoint without a codec file says which files it looked for
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in tiny_ckpt.iterdir():
        if f.name != chat.DEMO_CODEC_FILE:
            (bare / f.name).write_bytes(f.read_bytes())
    err = _error_of(["--checkpoint", str(bare), "--input", x, "--output", "y.wav"], capsys)
    assert chat.MIMI_FILE in err and chat.DEMO_CODEC_FILE in err and "--mimi" in err
    err = _error_of(["--checkpoint", str(tiny_ckpt), "--input", "x.wav"], capsys)
    assert "--output" in err


def test_default_checkpoint_and_train_out_dir(tiny_ckpt, tmp_path, monkeypatch, capsys):
    sf.write(tmp_path / "x.wav", (0.1 * torch.randn(4000)).numpy(), 24000)
    io = ["--input", str(tmp_path / "x.wav"), "--output", str(tmp_path / "y.wav")]
    monkeypatch.setattr(chat, "DEFAULT_CHECKPOINT", str(tmp_path / "out" / "tiny_demo"))
    err = _error_of(io, capsys)
    assert "python train.py" in err and "--checkpoint" in err
    # train.py's out_dir holds ckpt-N/ and a `latest` link: the directory itself is accepted
    out = tmp_path / "out" / "tiny_demo"
    out.mkdir(parents=True)
    (out / "latest").symlink_to(tiny_ckpt)
    chat.main(io)
    assert "quickstart" in capsys.readouterr().err and (tmp_path / "y.wav").is_file()


def test_live_mode_without_sounddevice_points_to_file_mode(tiny_ckpt, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sounddevice", None)      # import fails as if not installed
    err = _error_of(["--checkpoint", str(tiny_ckpt)], capsys)
    assert "sounddevice" in err and "--input" in err


def test_live_mode_without_devices_points_to_file_mode(tiny_ckpt, monkeypatch, capsys):
    class NoDevices:
        PortAudioError = OSError

        @staticmethod
        def query_devices():
            return []
    monkeypatch.setitem(sys.modules, "sounddevice", NoDevices)
    err = _error_of(["--checkpoint", str(tiny_ckpt)], capsys)
    assert "device" in err and "--input" in err


def test_cli_help_and_error_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "chat.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "--checkpoint" in r.stdout
    sf.write(tmp_path / "a.wav", (0.1 * torch.randn(4000)).numpy(), 24000)
    r = subprocess.run([sys.executable, "chat.py", "--checkpoint", str(tmp_path / "none"), "--input",
                        str(tmp_path / "a.wav"), "--output", "b.wav"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "none" in r.stderr


def test_compiled_step_equals_eager_without_recompiles(official, monkeypatch):
    """One torch.compile of the whole step (official sampling: the rejection sampler runs in the
    graph); positions are tensors, so later steps reuse the graph."""
    from torch._dynamo.utils import counters
    monkeypatch.setattr(kernels, "COMPILE", True)
    m, e = official
    listen = e["stream_listen"][:, :, :6]
    eager = run_stream(chat.LMStream(m, seed=0).warmup(), listen)[0]
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):   # warmup's inputs and the caller's alike
        compiled = run_stream(chat.LMStream(m, seed=0, compile=True).warmup(), listen)[0]
    assert torch.equal(compiled, eager)
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1


import codec as codec_module  # noqa: E402


def test_file_mode_streams_24khz_input_in_blocks_and_matches_the_in_memory_loop(tiny_ckpt, tmp_path, monkeypatch):
    """A 24 kHz input is read block by block and the output written frame by frame (memory does not
    grow with the input), with the same audio as the whole-wav loop, which keeps the timeline of
    the official-style reference (assistant frame f at f * 80 ms, frame 0 silent)."""
    wav = 0.2 * torch.randn(24000 + 700)                      # 13 frames, the last one partial
    sf.write(tmp_path / "u.wav", wav.numpy(), 24000)
    seen = {}
    real = chat.file_mode
    monkeypatch.setattr(chat, "file_mode", lambda args: (seen.setdefault("args", args), real(args))[1])
    monkeypatch.setattr(codec_module, "read_audio", lambda *a, **k: pytest.fail("a 24 kHz input was read whole"))
    chat.main(["--checkpoint", str(tiny_ckpt), "--input", str(tmp_path / "u.wav"), "--output",
               str(tmp_path / "o.wav"), "--seconds", "0.4", "--seed", "3"])
    got, _ = sf.read(tmp_path / "o.wav", dtype="float32")
    _, tok, codec, stream = chat.build(seen["args"])
    want, _ = chat.run_file(codec, stream, tok, torch.from_numpy(sf.read(tmp_path / "u.wav", dtype="float32")[0]),
                            seconds=0.4)
    assert got.shape == (18 * 1920, 2) and want.shape == (2, 18 * 1920)
    assert (torch.from_numpy(got) - want.clamp(-1, 1).T).abs().max() <= 1 / 32768 + 1e-6
    assert abs(want[0, :1920]).max() == 0 and abs(want[0]).max() > 0


def test_file_mode_memory_does_not_grow_with_the_input(tiny_ckpt, tmp_path):
    """Peak RSS of `chat.py --input` on 10 s and on 70 s of audio (each in a fresh process): within
    3 %. Holding input and output whole, resampled, as before, added ~35 MB per minute (>10 %)."""
    import subprocess
    peaks = []
    for seconds in (10, 70):
        wav = tmp_path / f"u{seconds}.wav"
        sf.write(wav, (0.1 * torch.randn(seconds * 24000)).numpy(), 24000, subtype="PCM_16")
        code = ("import resource, sys, chat; chat.main(sys.argv[1:]); "
                "print('peak_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
        out = subprocess.run([sys.executable, "-c", code, "--checkpoint", str(tiny_ckpt), "--input", str(wav),
                              "--output", str(tmp_path / f"o{seconds}.wav"), "--threads", "1", "--seed", "0"],
                             capture_output=True, text=True, cwd=Path(chat.__file__).parent, check=True)
        peaks.append(int(out.stdout.split("peak_kb")[-1]))
        assert sf.info(str(tmp_path / f"o{seconds}.wav")).frames == -(-seconds * 24000 // 1920) * 1920
    assert peaks[1] <= 1.03 * peaks[0], peaks


@pytest.mark.parametrize("rate", [44100, 16000, 24000])
def test_user_audio_read_in_pieces_equals_the_whole_file(tmp_path, rate):
    """chat.py reads and resamples the input piece by piece; the frames equal read_audio's
    whole-file resampling (stereo mixed to mono), across piece boundaries and at the end."""
    x = 0.3 * torch.randn(int(rate * 2.7), 2)
    sf.write(tmp_path / "in.wav", x.numpy(), rate, subtype="FLOAT")
    frames, n = chat._user_frames(tmp_path / "in.wav", seconds_per_read=1)
    got = torch.cat(list(frames))
    want = codec_module.read_audio(tmp_path / "in.wav").mean(0)
    assert n == -(-want.numel() // 1920) and got.numel() == want.numel()
    assert (got - want).abs().max() < 1e-5
