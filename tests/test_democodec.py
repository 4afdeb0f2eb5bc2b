"""demo/codec.py tests: the demo codec's word-identity probe (libespeak-ng words), round trip and
streaming == batch, exact nearest-codeword search, codebook use after `fit`, and data.py's codec
command line run with a demo-codec file (Kyutai's weights are not among the fixtures)."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import codec  # noqa: E402
import data  # noqa: E402
from demo import codec as democodec  # noqa: E402
from demo import corpus  # noqa: E402

torch.set_num_threads(1)   # the test machine is shared; one thread avoids oversubscription


# ---------------------------------------------------------------------------------------------
# Demo codec


WORDS = ["apple", "river", "table", "window", "yellow", "garden"]
VOICES = [("en-us", 140), ("en-gb-x-rp", 190), ("en+f3", 160), ("en-gb-scotland", 130)]


@pytest.fixture(scope="module")
def spoken_words():
    items = []
    for voice, speed in VOICES:
        for w in WORDS:
            wav = torch.as_tensor(corpus.synthesize(w, corpus.Voice(voice, speed))[0], dtype=torch.float32)
            items.append((w, voice, torch.nn.functional.pad(wav, (0, -len(wav) % 1920 + 1920))))
    return items


@pytest.fixture(scope="module")
def demo(spoken_words):
    return democodec.DemoCodec.fit([w for _, _, w in spoken_words])


def _dtw(a, b):
    d = torch.cdist(a, b).numpy()
    acc = np.full((len(a) + 1, len(b) + 1), np.inf)
    acc[0, 0] = 0
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            acc[i, j] = d[i - 1, j - 1] + min(acc[i - 1, j], acc[i, j - 1], acc[i - 1, j - 1])
    return acc[-1, -1] / (len(a) + len(b))


def test_demo_codec_tokens_separate_words(spoken_words, demo):
    """1-nearest-neighbour word identity across voices, from the tokens' codebook embeddings."""
    feats = [demo.dequantize(demo.encode(w[None, None]))[0] for _, _, w in spoken_words]
    hits = 0
    for i, (word, voice, _) in enumerate(spoken_words):
        others = [j for j, (_, v, _) in enumerate(spoken_words) if v != voice]
        best = min(others, key=lambda j: _dtw(feats[i], feats[j]))
        hits += spoken_words[best][0] == word
    accuracy = hits / len(spoken_words)
    assert accuracy >= 0.75, accuracy          # chance is 1/6


def test_demo_codec_round_trip_streaming_and_files(spoken_words, demo, tmp_path):
    wav = torch.cat([w for _, _, w in spoken_words[:4]])[None, None]
    codes = demo.encode(wav)
    n = wav.shape[-1] // 1920
    assert codes.shape == (1, 8, n) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < 2048
    out = demo.decode(codes)
    assert out.shape == (1, 1, n * 1920)
    with demo.streaming(1):
        stream_codes = torch.cat([demo.encode(wav[..., i * 1920:(i + 1) * 1920]) for i in range(n)], -1)
        stream_out = torch.cat([demo.decode(codes[..., i:i + 1]) for i in range(n)], -1)
    assert torch.equal(stream_codes, codes)
    assert (stream_out - out).abs().max() < 1e-5
    # the decoded audio has the input's spectrogram (shifted by the codec's 30 ms delay)
    x, y = wav[0, 0, : -demo.DELAY], out[0, 0, demo.DELAY:]
    spec = lambda s: torch.stft(s, 960, 240, window=torch.hann_window(960), return_complex=True).abs().log1p()
    corr = torch.corrcoef(torch.stack([spec(x).flatten(), spec(y).flatten()]))[0, 1]
    assert corr > 0.8, corr
    demo.save(tmp_path / "demo.safetensors")
    loaded = data.load_codec(tmp_path / "demo.safetensors")
    assert isinstance(loaded, democodec.DemoCodec) and torch.equal(loaded.encode(wav), codes)


def test_demo_codec_fit_errors():
    with pytest.raises(ValueError, match="at least one frame"):
        democodec.DemoCodec.fit([torch.zeros(100)])


# ---------------------------------------------------------------------------------------------
# codec.py's command line, run with a demo-codec file


def test_cli_encode_decode_and_errors(spoken_words, demo, tmp_path, capsys):
    demo.save(tmp_path / "demo.safetensors")
    codec.write_audio(tmp_path / "in.wav", spoken_words[0][2])
    w = ["--codec", str(tmp_path / "demo.safetensors")]
    data.main(["encode", str(tmp_path / "in.wav"), str(tmp_path / "c.npy")] + w)
    codes = np.load(tmp_path / "c.npy")
    assert codes.shape == (1, 8, len(spoken_words[0][2]) // 1920)
    data.main(["decode", str(tmp_path / "c.npy"), str(tmp_path / "out.wav")] + w)
    assert codec.read_audio(tmp_path / "out.wav").shape == (1, codes.shape[-1] * 1920)
    np.save(tmp_path / "bad.npy", np.zeros((3, 5), dtype=np.int16))
    with pytest.raises(SystemExit) as e:
        data.main(["decode", str(tmp_path / "bad.npy"), str(tmp_path / "x.wav")] + w)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.npy" in err[0] and "expected codes" in err[0]


# ---------------------------------------------------------------------------------------------
# Demo codec: streaming == batch through silence, and every codebook in use after `fit`


def _synthetic_speechlike(seconds, seed, silence=True):
    """Random segments (0.1-0.8 s) of harmonic 'vowels' (f0 80-400 Hz, random formant-like
    harmonic weights, attack/decay), spectrally shaped noise bursts, and, if `silence`, digital
    silence and very low-level noise (1e-5 .. 1e-3): what a dialog channel looks like."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.rand(*s, generator=g)
    out, total = [], int(seconds * 24000)
    while sum(len(o) for o in out) < total:
        n = int((0.1 + 0.7 * rnd(1).item()) * 24000)
        kind = int(rnd(1).item() * (4 if silence else 2))
        t = torch.arange(n) / 24000
        if kind == 0:
            f0 = 80 + 320 * rnd(1).item()
            h = torch.arange(1, int(11000 / f0) + 1)
            formant = 500 + 2500 * rnd(1).item()
            amp = torch.exp(-((h * f0 - formant) / (300 + 1200 * rnd(1))) ** 2) + 0.05 * rnd(len(h))
            seg = (amp[:, None] * torch.sin(2 * math.pi * f0 * h[:, None] * t + 6.3 * rnd(len(h), 1))).sum(0)
            seg = seg / seg.abs().max() * (0.05 + 0.5 * rnd(1)) * torch.clamp(t / 0.02, max=1) * torch.exp(-t * 3 * rnd(1))
        elif kind == 1:
            spec = torch.fft.rfft(torch.randn(n, generator=g))
            f = torch.fft.rfftfreq(n, 1 / 24000)
            spec = spec * torch.exp(-((f - 12000 * rnd(1)) / (200 + 4000 * rnd(1))) ** 2)
            seg = torch.fft.irfft(spec, n=n)
            seg = seg / seg.abs().max().clamp(min=1e-9) * (0.02 + 0.3 * rnd(1))
        elif kind == 2:
            seg = torch.zeros(n)
        else:
            seg = 10 ** (-5 + 2 * rnd(1)) * torch.randn(n, generator=g)
        out.append(seg)
    return torch.cat(out)[:total].float()


@pytest.fixture(scope="module")
def demo_varied():
    """A demo codec fitted on 10 min of synthetic dialog-like audio (silences included)."""
    return democodec.DemoCodec.fit([_synthetic_speechlike(120, seed) for seed in range(5)])


def test_nearest_is_exact_and_independent_of_batch_size():
    """`_nearest` against a plain float64 brute force, on the hard case: large-norm vectors (like
    standardised silence) and 64 near-identical copies of each (gaps 1e-5 .. 1e-3): far more
    candidates than the shortlist within float32 GEMM rounding of each other, plus exact repeats."""
    g = torch.Generator().manual_seed(0)
    base = 2 * torch.randn(8, 320, generator=g)                         # norm ~36
    cb = torch.cat([base + 1e-5 * 10 ** (2 * torch.rand(8, 1, generator=g)) * torch.randn(8, 320, generator=g)
                    for _ in range(64)] + [torch.randn(1530, 320, generator=g)])
    cb = torch.cat([cb[:3], cb, cb[:3]])                                 # exact repeats: lower index wins
    x = torch.cat([base[torch.randint(8, (600,), generator=g)] + 1e-4 * torch.randn(600, 320, generator=g),
                   torch.randn(400, 320, generator=g)])
    want = torch.cdist(x.double(), cb.double(), compute_mode="donot_use_mm_for_euclid_dist").argmin(1)
    batch = democodec._nearest(x, cb)
    assert torch.equal(batch, want)
    assert torch.equal(torch.cat([democodec._nearest(x[i:i + 1], cb) for i in range(len(x))]), batch)
    assert torch.equal(torch.cat([democodec._nearest(x[i:i + 4], cb) for i in range(0, len(x), 4)]), batch)


def test_demo_codec_streaming_equals_batch_through_silence(demo_varied):
    """Long digital silence, low-level noise and tones, from the very first frame: frame-by-frame
    streaming codes == batch codes exactly (also for a batch of 2 and a 3-frame chunk), and
    streaming decode == batch decode. (The old codec's torch.cdist flipped silent frames.)"""
    dc = demo_varied
    n = 150
    t = torch.arange(n * 1920) / 24000
    a = torch.zeros(n * 1920)
    a[30 * 1920:60 * 1920] = 3e-5 * torch.randn(30 * 1920, generator=torch.Generator().manual_seed(1))
    a[70 * 1920:100 * 1920] = 0.3 * torch.sin(2 * math.pi * 220 * t[:30 * 1920]) * torch.sin(2 * math.pi * 3 * t[:30 * 1920])
    a[110 * 1920:] = 1e-3 * torch.randn(40 * 1920, generator=torch.Generator().manual_seed(2))
    b = _synthetic_speechlike(n * 1920 / 24000, seed=99)
    x = torch.stack([a, b])[:, None]
    codes = dc.encode(x)
    assert torch.equal(dc.encode(x[:1]), codes[:1])                       # batch of 1 == batch of 2
    with dc.streaming(2):
        stream = torch.cat([dc.encode(x[..., i * 1920:(i + 1) * 1920]) for i in range(n)], -1)
    assert torch.equal(stream, codes), (stream == codes).float().mean(-1)
    with dc.streaming(1):
        stream1 = torch.cat([dc.encode(x[:1, :, i * 1920:(i + 3) * 1920]) for i in range(0, n, 3)], -1)
        dec = torch.cat([dc.decode(codes[:1, :, i:i + 1]) for i in range(40)], -1)
    assert torch.equal(stream1, codes[:1])
    assert (dec - dc.decode(codes[:1, :, :40])).abs().max() < 1e-5
    assert len(torch.unique(codes[0, 0, :30])) == 1                        # digital silence: one code


def test_demo_codec_fit_uses_every_codebook(demo_varied):
    """On held-out audio every codebook uses many codes and each stage lowers the error.
    (The old fit, every stage on the same 8192 frames, left stages 4-7 with 1-4 codes.)"""
    dc = demo_varied
    x = _synthetic_speechlike(90, seed=1234, silence=False)
    x = x[: len(x) // 1920 * 1920]
    codes = dc.encode(x[None, None])[0]                                   # [8, 1125]
    used = [len(torch.unique(c)) for c in codes]
    assert min(used) > 0.2 * codes.shape[1], used
    z = ((dc.analysis(x[None, None])[0] - dc.mean) / dc.std)
    err, rec = [z.pow(2).mean().item()], torch.zeros_like(z)
    for q in range(8):
        rec = rec + dc.codebooks[q][codes[q]]
        err.append((z - rec).pow(2).mean().item())
    assert all(b < a for a, b in zip(err, err[1:])), err
    assert err[-1] < 0.8 * err[1], err                                   # stages 1-7 matter
