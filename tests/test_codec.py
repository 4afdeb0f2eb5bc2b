"""codec.py tests: Mimi against the official fixture (seeded weights), audio I/O and resampling
against analytic signals, `load_codec` on a Mimi file. The demo codec, and the command line (run
with a demo-codec file), are tested in tests/test_democodec.py."""
import json
import math
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import codec  # noqa: E402

from conftest import MIMI_FIXTURE as MIMI, seeded_mimi_state  # noqa: E402
import data  # noqa: E402
torch.set_num_threads(1)   # the test machine is shared; one thread avoids oversubscription


@pytest.fixture(scope="module")
def seeded_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("mimi") / "seeded.safetensors"
    save_file(seeded_mimi_state(), str(path))
    return path


@pytest.fixture(scope="module")
def mimi(seeded_file):
    return codec.Mimi.from_pretrained(seeded_file)


@pytest.fixture(scope="module")
def expected():
    return load_file(str(MIMI / "expected.safetensors"))


# ---------------------------------------------------------------------------------------------
# Mimi: exact against the official implementation's outputs


def test_mimi_batch_matches_fixture(mimi, expected):
    codes = mimi.encode(expected["wav"])
    assert codes.dtype == torch.long and codes.shape == (1, 8, 25)
    assert torch.equal(codes, expected["codes"])
    wav = mimi.decode(expected["codes"])
    assert wav.shape == (1, 1, 48000)
    assert (wav - expected["decoded"]).abs().max() < 1e-4


def test_mimi_streaming_matches_fixture_and_resets(mimi, expected):
    wav, ref = expected["wav"], expected["codes"]
    with mimi.streaming(1):
        for _ in range(2):      # second pass: reset_streaming starts a fresh conversation
            codes = torch.cat([mimi.encode(wav[..., i * 1920:(i + 1) * 1920]) for i in range(25)], -1)
            assert torch.equal(codes, ref)
            mimi.reset_streaming()
        out = torch.cat([mimi.decode(ref[..., i:i + 1]) for i in range(25)], -1)
        assert (out - expected["stream_decoded"]).abs().max() < 1e-4
        with pytest.raises(ValueError, match="multiple of 1920"):
            mimi.encode(wav[..., :1000])
    assert not mimi.is_streaming


def test_mimi_streams_several_conversations_at_once(mimi, expected):
    """Batch streaming: three conversations framed together. The first is the fixture's (its codes
    and stream decode must be the official ones); the others (a reversed and a shifted copy, quieter)
    must get the codes and audio they get when encoded whole on their own."""
    wav = expected["wav"]
    others = torch.cat([0.5 * wav.flip(-1), 0.3 * wav.roll(7000, -1)])
    with torch.no_grad():
        alone_codes = mimi.encode(others)
    batch = torch.cat([wav, others])
    with mimi.streaming(3):
        codes = torch.cat([mimi.encode(batch[..., i * 1920:(i + 1) * 1920]) for i in range(25)], -1)
        out = torch.cat([mimi.decode(codes[..., i:i + 1]) for i in range(25)], -1)
    assert torch.equal(codes[:1], expected["codes"])
    assert torch.equal(codes[1:], alone_codes)
    assert (out[:1] - expected["stream_decoded"]).abs().max() < 1e-4
    with torch.no_grad():
        assert (out[1:] - mimi.decode(alone_codes)).abs().max() < 1e-4


def test_mimi_batch_shapes_and_errors(mimi):
    assert mimi.encode(torch.zeros(2, 1, 1920 * 3 + 100)).shape == (2, 8, 3)   # partial frame dropped
    with pytest.raises(ValueError, match=r"\[B, 1, N\]"):
        mimi.encode(torch.zeros(1, 2, 1920))
    with pytest.raises(ValueError, match="codes must lie"):
        mimi.decode(torch.full((1, 8, 2), 2048))


def test_mimi_loader_reports_missing_and_misshapen(tmp_path):
    sd = seeded_mimi_state()
    del sd["decoder.model.14.conv.conv.bias"]
    sd["encoder.model.0.conv.conv.weight"] = torch.zeros(64, 1, 5)
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    pattern = r"bad\.safetensors.*missing.*decoder\.model\.14.*misshapen.*encoder\.model\.0"
    with pytest.raises(ValueError, match=pattern):
        codec.Mimi.from_pretrained(bad)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors"):
        data.load_codec(junk)
    with pytest.raises(FileNotFoundError, match="nothere"):
        codec.Mimi.from_pretrained(tmp_path / "nothere.safetensors")


def test_mimi_past_attention_context_matches_moshi(mimi):
    """Beyond the fixture: inputs longer than the attention context, batch and streaming, vs the
    moshi package. The context is shrunk from 250 to 16 steps (both sides) to keep this fast."""
    pytest.importorskip("einops")
    loaders = pytest.importorskip("moshi.models.loaders")
    cfg = dict(loaders._mimi_config, transformer=dict(loaders._mimi_config["transformer"], context=16))
    ref = loaders.get_mimi(None, cfg, device="cpu")
    ref.load_state_dict(seeded_mimi_state())
    ours = codec.Mimi(context=16)
    ours.load_state_dict(mimi.state_dict())
    g = torch.Generator().manual_seed(0)
    n = 20                                                    # 40 steps at 25 Hz > 16
    wav = 0.3 * torch.randn(1, 1, n * 1920, generator=g)
    with torch.no_grad():
        want = ref.encode(wav)
        assert torch.equal(ours.encode(wav), want)
        assert (ours.decode(want) - ref.decode(want)).abs().max() < 1e-4
        with ref.streaming(1), ours.streaming(1):
            for i in range(n):
                frame = wav[..., i * 1920:(i + 1) * 1920]
                assert torch.equal(ours.encode(frame), ref.encode(frame)), f"frame {i}"
            for i in range(n):
                c = want[..., i:i + 1]
                assert (ours.decode(c) - ref.decode(c)).abs().max() < 1e-4, f"frame {i}"


# ---------------------------------------------------------------------------------------------
# Audio I/O and resampling


@pytest.mark.parametrize("sr,freq", [(16000, 1000.0), (44100, 5000.0), (48000, 7000.0)])
def test_resample_keeps_frequency_and_level(sr, freq):
    t = torch.arange(int(1.5 * sr), dtype=torch.float64) / sr
    y = codec.resample((0.5 * torch.sin(2 * math.pi * freq * t)).float(), sr, 24000)
    assert y.shape[-1] == 36000
    # independent reference: the same sine sampled directly at 24 kHz (edges excluded)
    t24 = torch.arange(36000, dtype=torch.float64) / 24000
    want = 0.5 * torch.sin(2 * math.pi * freq * t24)
    mid = slice(2000, -2000)
    assert (y[mid].double() - want[mid]).abs().max() < 3e-3
    spectrum = np.abs(np.fft.rfft(y[mid].numpy() * np.hanning(32000)))
    assert abs(np.argmax(spectrum) * 24000 / 32000 - freq) <= 1
    assert abs(y[mid].pow(2).mean().sqrt().item() / (0.5 / math.sqrt(2)) - 1) < 0.01


def test_resample_removes_content_above_new_nyquist():
    t = torch.arange(44100) / 44100
    y = codec.resample(torch.sin(2 * math.pi * 15000 * t), 44100, 24000)
    assert y[1000:-1000].pow(2).mean().sqrt() < 0.01        # a 15 kHz tone cannot exist at 24 kHz


def test_read_write_audio(tmp_path):
    import soundfile as sf
    t = np.arange(44100) / 44100
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 440 * t), 0.2 * np.sin(2 * np.pi * 880 * t)], 1)
    sf.write(tmp_path / "s.wav", stereo, 44100)
    wav = codec.read_audio(tmp_path / "s.wav")
    assert wav.shape == (2, 24000) and wav.dtype == torch.float32
    codec.write_audio(tmp_path / "o.wav", wav[0])
    back, sr = sf.read(tmp_path / "o.wav")
    assert sr == 24000 and np.abs(back - wav[0].numpy()).max() < 1e-4


def test_bad_audio_gives_clear_errors(tmp_path):
    import soundfile as sf
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00garbage" * 10)
    with pytest.raises(ValueError, match="corrupt.wav: cannot decode audio"):
        codec.read_audio(tmp_path / "corrupt.wav")
    sf.write(tmp_path / "empty.wav", np.zeros((0, 1)), 24000)
    with pytest.raises(ValueError, match="empty.wav: audio file is empty"):
        codec.read_audio(tmp_path / "empty.wav")
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        codec.read_audio(tmp_path / "missing.wav")
    with pytest.raises(ValueError, match="shape.wav: expected audio of shape"):
        codec.write_audio(tmp_path / "shape.wav", torch.zeros(1, 1, 100))


# ---------------------------------------------------------------------------------------------
# load_codec tells the two kinds of file apart (the demo-codec side: tests/test_democodec.py)


def test_load_codec_detects_mimi(seeded_file):
    assert isinstance(data.load_codec(seeded_file), codec.Mimi)
