"""chat.py -- talk to FLM-Audio: the streaming full-duplex loop, live or over wav files.

Every 80 ms one frame of the user's voice comes in and one frame of the assistant's voice
(plus one token of its inner monologue) goes out:

    mic / wav -> codec.encode (8 codes) -> LMStream.step -> [text, 8 codes] -> codec.decode -> speaker / wav

`LMStream` adds to the model only what streaming needs: the token grid as a small ring of columns
in *delayed* coordinates (grid.py: acoustic codebooks one column late), the repetition-penalty
windows, the random numbers, and the realignment of the outputs. The model math is the model's
own: `FLMAudio.step` reads one column through the backbone's ring KV cache, `DepthGPT.step` makes
one codebook per cached position, and `kernels.sample` draws every token. Then: the monologue ->
sentences with timings, checkpoint/codec loading, file mode, live mode, per-frame statistics.
(bench.py times the step against an official-style loop.)
"""
import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

import lora
import quantize
import tokenizer
from codec import FRAME_RATE, FRAME_SIZE, SAMPLE_RATE, OFFICIAL_MIMI_FILE as MIMI_FILE
from data import DEMO_CODEC_FILE, load_codec
from grid import DELAYS
from kernels import rejection_tries, sample
from model import FLMAudio

DEFAULT_CHECKPOINT = "out/tiny_demo"       # train.py's default out_dir (the quickstart); uses its `latest`

# -----------------------------------------------------------------------------
# 1. LMStream: one 80 ms step


@dataclass(frozen=True)
class Sampling:
    """How one stream's tokens are drawn (kernels.sample: penalty, temperature, top-p / top-k)."""
    temperature: float
    top_p: float
    top_k: int
    penalty: float

    def draw(self, logits, uniforms, recent=None):
        return sample(logits, uniforms, self.temperature, self.top_p, self.top_k, self.penalty, recent)


class LMStream(nn.Module):
    """Streaming inference with one model: `step(listen [B, 8])` -> None while the delays fill,
    else out [B, 9], the text token and 8 speak codebooks of one assistant frame (realigned).
    Defaults are the official server's: temperature 0.01 (text) / 0.5 (audio), top-p 0.9 (top-k
    dormant behind it), repetition penalty 1.03 (text) / 1.2 (speak codebooks 0..3) over 50 steps,
    before the argmax of temperature 0 too. `max_len`: the attention window in steps (default the
    model's context); beyond it the ring KV cache slides. `start`: "initial" (default) begins from
    the `<wait>`/pad column of the training grids (grid.py), the start a model trained here knows;
    "zeros" from an all-zero column, as the official server does. The stream sets up the model's
    caches (one stream per model at a time); `compile=True` makes the step one graph."""

    def __init__(self, model, temp_text=0.01, temp_audio=0.5, top_k_text=1, top_k_audio=1,
                 top_p_text=0.9, top_p_audio=0.9, repetition_penalty_text=1.03,
                 repetition_penalty_audio=1.2, repetition_penalty_window_text=50,
                 repetition_penalty_window_audio=50, penalised_codebooks=4, batch_size=1,
                 max_len=None, start="initial", compile=False, seed=None):
        super().__init__()
        if start not in ("initial", "zeros"):
            raise ValueError(f"LMStream: start={start!r}; choose 'initial' or 'zeros'")
        cfg, device = model.cfg, next(model.parameters()).device
        self.model, self.cfg, self.batch_size, self.start = model, cfg, batch_size, start
        self.n_codebooks = n_cb = cfg.aud_channel
        self.max_delay, self.max_len = max(DELAYS), int(max_len or cfg.max_position_embeddings)
        self.text = Sampling(float(temp_text), float(top_p_text), int(top_k_text), float(repetition_penalty_text))
        self.audio = Sampling(float(temp_audio), float(top_p_audio), int(top_k_audio), float(repetition_penalty_audio))
        self.n_penalised = min(int(penalised_codebooks), n_cb)
        self.tries = max(rejection_tries(self.text.top_p), rejection_tries(self.audio.top_p))
        # token ring [slots, B, 17]: column c of the delayed grid in slot c % slots; a step touches
        # columns t..t + max_delay only. Repetition windows hold the last W samples, empty slots V.
        self.slots = self.max_delay + 2
        delays, rows = torch.tensor(DELAYS), torch.arange(1 + 2 * n_cb)
        out_rows, listen_rows = rows[:1 + n_cb], rows[1 + n_cb:]      # text + speak out, listen in
        for name, t in dict(ring=torch.zeros(self.slots, batch_size, len(DELAYS), dtype=torch.long),
                            listen_rows=listen_rows, listen_delays=delays[listen_rows], out_rows=out_rows,
                            out_delays=delays[out_rows], pos=torch.zeros((), dtype=torch.long),
                            text_recent=torch.zeros(batch_size, max(1, int(repetition_penalty_window_text))),
                            audio_recent=torch.zeros(batch_size, self.n_penalised,
                                                     max(1, int(repetition_penalty_window_audio)))).items():
            self.register_buffer(name, t.to(device, torch.long))
        model.setup_cache(batch_size, self.max_len)
        self.generator = torch.Generator(device=device)
        if seed is not None:
            self.generator.manual_seed(seed)
        self.compiled, self._step = bool(compile), self._forward
        if compile:
            cuda = device.type == "cuda"
            if cuda:   # CUDA graphs replay fixed addresses: mutated state must stay where it is
                for b in self.buffers():
                    torch._dynamo.mark_static_address(b)
            self._step = torch.compile(self._forward, mode="reduce-overhead" if cuda else "default", dynamic=False)
        self.reset()

    @torch.inference_mode()
    def reset(self):
        """A new conversation: empty windows, the start column in slot 0 (the KV caches need no
        clearing: step t reads only the slots written by steps <= t)."""
        self.ring.zero_()
        if self.start == "initial":   # the listen semantic row is overwritten by frame 0
            self.ring[0, :, 0] = self.cfg.text_wait_token_id
            self.ring[0, :, 1:] = self.cfg.aud_pad_token_id
        self.pos.zero_()
        self.text_recent.fill_(self.cfg.vocab_size)
        self.audio_recent.fill_(self.cfg.aud_vocab_size)
        self.t = 0

    @torch.inference_mode()
    def warmup(self, steps=3):
        """A few steps on pad input, then reset: compiles happen now, not in the first frames."""
        for _ in range(steps):
            self.step(torch.full((self.batch_size, self.n_codebooks), self.cfg.aud_pad_token_id))
        self.reset()
        return self

    def _forward(self, listen, uniforms):
        """Step t as one graph of tensor ops (t is the tensor self.pos): user frame t in, out [B, 9]."""
        t, slots = self.pos, self.slots
        # user frame t: codebook q goes to column t + delay (row 9 + q); then column t is the input
        self.ring[(t + self.listen_delays) % slots, :, self.listen_rows] = listen.T
        h, logits = self.model.step(self.ring[(t % slots).view(1)][0], t)   # [1]-index: no host read
        new = [self.text.draw(logits, uniforms[:, 0], self.text_recent)]
        depth, inputs = self.model.depth_gpt, self.model.depth_gpt.frame_inputs(h)
        for c in range(self.n_codebooks):                 # unrolled: codebook c = one cached position
            logits = depth.step(inputs, new[-1] if c else None, c)
            recent = self.audio_recent[:, c] if c < self.n_penalised else None
            new.append(self.audio.draw(logits, uniforms[:, 1 + c], recent))
        new = torch.stack(new, 1)                         # [B, 9]: text, 8 speak codes
        self.text_recent[:, (t % self.text_recent.shape[1]).view(1)] = new[:, :1]
        self.audio_recent[:, :, (t % self.audio_recent.shape[2]).view(1)] = new[:, 1:1 + self.n_penalised, None]
        # sampled tokens go to column t + 1; then read back one whole realigned frame
        self.ring[((t + 1) % slots).view(1), :, :1 + self.n_codebooks] = new[None]
        out = self.ring[(t + 1 - self.max_delay + self.out_delays) % slots, :, self.out_rows].T
        self.pos += 1
        return out

    @torch.inference_mode()
    def step(self, listen, timings=None):
        """listen [B, 8] (user frame t) -> None or out [B, 9]. `timings`, a dict, gets the step's
        seconds added under 'model' (synchronising CUDA to measure)."""
        batch, n_cb = self.batch_size, self.n_codebooks
        if listen.shape != (batch, n_cb):
            raise ValueError(f"LMStream.step: listen frame must be [{batch}, {n_cb}], got {list(listen.shape)}")
        t0 = time.perf_counter()
        uniforms = torch.rand(batch, 1 + n_cb, self.tries, generator=self.generator, device=self.ring.device)
        # a copy in inference mode, whatever the caller passed: the compiled step sees what warmup()
        # gave it and does not recompile; its output is cloned (a CUDA graph's is overwritten)
        out = self._step(listen.to(self.ring.device, torch.long, copy=True), uniforms)
        out = out.clone() if self.compiled else out
        if timings is not None:
            if out.is_cuda:
                torch.cuda.synchronize(out.device)
            timings["model"] = timings.get("model", 0.0) + time.perf_counter() - t0
        self.t += 1
        return None if self.t <= self.max_delay else out

    def columns(self):
        """The ring after step t: [B, 17, slots] = delayed-grid columns t+2-slots .. t+1, newest last."""
        idx = (self.pos + 1 - self.slots + torch.arange(self.slots, device=self.pos.device)) % self.slots
        return self.ring[idx].permute(1, 2, 0)


# -----------------------------------------------------------------------------
# 2. The monologue as text: sentences are the runs of tokens between <wait>s


class Monologue:
    """Collects the text row, one token per frame; prints it as it appears (optional)."""

    def __init__(self, tokenizer, wait_id, echo=None):
        self.enc, self.wait, self.echo = tokenizer, wait_id, echo
        self.skip = {tokenizer.encode_single_token(s) for s in tokenizer.special_tokens_set}
        self.sentences, self._bytes, self._start = [], None, None

    def push(self, token, frame):
        """token of column `frame` (its time is frame / 12.5 s)."""
        token = int(token)
        if token == self.wait:
            return self._close(frame)
        if self._bytes is None:
            self._bytes, self._start = b"", frame
        if token in self.skip:
            return
        try:
            piece = self.enc.decode_single_token_bytes(token)
        except KeyError:          # an id the model has but the tokenizer does not (unused rows)
            return
        if self.echo:
            self.echo.write(piece.decode("utf-8", errors="replace"))
            self.echo.flush()
        self._bytes += piece

    def _close(self, frame):
        if self._bytes is None:
            return
        text = self._bytes.decode("utf-8", errors="replace").strip()
        if text:
            self.sentences.append({"text": text, "start": round(self._start / FRAME_RATE, 3),
                                   "end": round(frame / FRAME_RATE, 3)})
        if self.echo:
            self.echo.write("\n")
            self.echo.flush()
        self._bytes = None

    def finish(self, frame):
        self._close(frame)
        return self.sentences


# -----------------------------------------------------------------------------
# 3. Loading: checkpoint directory -> model, tokenizer, codec


def load_checkpoint(path, device="cpu", dtype=torch.float32, adapter=None, int8=False):
    """An official-layout directory (ours are the same) -> (model, tokenizer). A train.py LoRA
    checkpoint (adapters only) is merged with its base; `adapter` merges an adapter file over the
    checkpoint; `int8` loads (or makes, once) its int8 weights (quantize.py). The tokenizer comes
    from the directory's tokenizer files, else the byte-level default (tokenizer.py)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint directory not found")
    if (path / lora.ADAPTER_FILE).is_file() and not (path / "config.json").is_file():
        model = lora.load_merged(path, device, dtype)
    elif int8 and not adapter:
        model = quantize.load_or_convert(path, device, dtype, log=lambda m: print(m, file=sys.stderr))
    else:
        model = FLMAudio.from_pretrained(path, device=device, dtype=dtype)
        if adapter:
            model = lora.merge_(lora.load(model, adapter))
    if int8 and not getattr(model, "int8", False):
        model = quantize.quantize_(model)
    has_tok = any((path / f).is_file() for f in tokenizer.TOKENIZER_FILES)
    return model, tokenizer.load_tokenizer(path if has_tok else None)


def find_codec(checkpoint, mimi=None):
    """--mimi if given, else the codec file inside the checkpoint directory."""
    if mimi:
        if not Path(mimi).is_file():
            raise FileNotFoundError(f"{mimi}: codec file not found (--mimi)")
        return Path(mimi)
    for name in (MIMI_FILE, DEMO_CODEC_FILE):
        if (Path(checkpoint) / name).is_file():
            return Path(checkpoint) / name
    raise FileNotFoundError(f"{checkpoint}: no codec in the checkpoint directory (expected {MIMI_FILE} "
                            f"or {DEMO_CODEC_FILE}); pass --mimi PATH")


def build(args):
    """Model, tokenizer, codec, LMStream from the command line arguments."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")]
    ckpt = args.checkpoint
    if ckpt is None:
        if not Path(DEFAULT_CHECKPOINT).is_dir():
            raise FileNotFoundError(f"{DEFAULT_CHECKPOINT}: no --checkpoint given and the quickstart's demo "
                                    "checkpoint is missing; create it with `python train.py` (the tiny "
                                    "demo, ~25 min on 2 cores) or pass --checkpoint DIR")
        ckpt = DEFAULT_CHECKPOINT
    if not Path(ckpt).is_dir():
        raise FileNotFoundError(f"{ckpt}: checkpoint directory not found")
    if not (Path(ckpt) / "config.json").is_file() and (Path(ckpt) / "latest").is_dir():
        ckpt = str(Path(ckpt) / "latest")          # train.py's out_dir: its newest checkpoint
    if args.checkpoint is None:
        print(f"chat.py: no --checkpoint given, using the quickstart's {ckpt}", file=sys.stderr)
    codec_path = find_codec(ckpt, args.mimi)
    model, tok = load_checkpoint(ckpt, device, dtype, args.adapter, args.int8)
    if device == "cpu":
        model.cpu_layout_()                  # weights stored for fast batch-1 reads (model.py)
    codec = load_codec(codec_path, device=device)
    compile_ = args.compile if args.compile is not None else device.startswith("cuda")
    stream = LMStream(model, temp_text=args.temp_text, temp_audio=args.temp_audio, top_k_text=args.top_k,
                      top_k_audio=args.top_k, top_p_text=args.top_p, top_p_audio=args.top_p,
                      repetition_penalty_text=args.rep_text, repetition_penalty_audio=args.rep_audio,
                      max_len=args.max_len, start=args.start, compile=compile_, seed=args.seed).warmup()
    return model, tok, codec, stream


# -----------------------------------------------------------------------------
# 4. One frame through the whole loop, and per-frame statistics


class Stats:
    """Per-frame seconds of codec (encode + decode), model step, total; p50/p99; real-time factor."""

    def __init__(self):
        self.rows = []

    def add(self, row):
        self.rows.append(row)

    def summary(self):
        if not self.rows:
            return "no frames"
        keys = ("codec", "model", "total")
        lines = [f"{len(self.rows)} frames ({len(self.rows) / FRAME_RATE:.1f} s of audio)",
                 f"{'ms/frame':>10} {'p50':>8} {'p99':>8} {'mean':>8}"]
        for k in keys:
            v = sorted(r.get(k, 0.0) * 1e3 for r in self.rows)
            lines.append(f"{k:>10} {_pct(v, 50):8.2f} {_pct(v, 99):8.2f} {sum(v) / len(v):8.2f}")
        rtf = sum(r["total"] for r in self.rows) / (len(self.rows) / FRAME_RATE)
        lines.append(f"real-time factor {rtf:.3f} (processing time / audio time; < 1 keeps up)")
        return "\n".join(lines)


def _pct(sorted_vals, q):
    return sorted_vals[min(len(sorted_vals) - 1, int(math.ceil(q / 100 * len(sorted_vals))) - 1)]


def frame_step(codec, stream, wav_frame, stats=None):
    """wav_frame [1, 1, 1920] -> (out [1, 9] or None, assistant audio [1920] or None)."""
    row = {}
    t0 = time.perf_counter()
    codes = codec.encode(wav_frame)[:, :, 0]
    t1 = time.perf_counter()
    out = stream.step(codes, timings=row)
    t2 = time.perf_counter()
    audio = None
    if out is not None:
        speak = out[:, 1:, None]
        if int(speak.max()) < codec.cardinality:   # pad/empty ids are not audio: leave silence
            audio = codec.decode(speak.to(codes.device))[0, 0].float().cpu()
    t3 = time.perf_counter()
    if stats is not None:
        row.update(codec=(t1 - t0) + (t3 - t2), total=t3 - t0)
        stats.add(row)
    return out, audio


# -----------------------------------------------------------------------------
# 5. File mode: user.wav -> stereo out.wav (assistant left, user right) + transcript JSON


def converse(codec, stream, tokenizer, frames, n_frames, write, stats=None, echo=None):
    """Stream n_frames user frames (an iterable of [<=1920] tensors at 24 kHz; silence after it
    ends) through the loop. write(stereo [2, 1920]) receives, in order, frame f of the assistant
    (left) and of the user (right), both at f * 80 ms; assistant frames the model has not produced
    (frame 0, and the last ones still in its delay) are silence. Memory does not grow with the
    length. Returns the monologue's sentences."""
    mono = Monologue(tokenizer, stream.cfg.text_wait_token_id, echo)
    dev = next(stream.model.parameters()).device
    silence, frames, pending, written = torch.zeros(FRAME_SIZE), iter(frames), [], 0
    with codec.streaming(1):
        for f in range(n_frames):
            x = next(frames, silence).float().cpu()
            user = torch.nn.functional.pad(x, (0, FRAME_SIZE - x.numel()))
            pending.append(user)
            out, audio = frame_step(codec, stream, user.view(1, 1, FRAME_SIZE).to(dev), stats)
            if out is None:
                continue
            g = f - stream.max_delay + 1             # the assistant frame this output holds
            mono.push(out[0, 0], g)
            for k in range(written, g + 1):
                write(torch.stack([audio if k == g and audio is not None else silence, pending.pop(0)]))
            written = g + 1
    for user in pending:
        write(torch.stack([silence, user]))
    return mono.finish(n_frames)


def run_file(codec, stream, tokenizer, wav, seconds=0.0, stats=None, echo=None):
    """wav [N] at 24 kHz (the user), in memory -> (stereo [2, F*1920], sentences); see converse."""
    n_frames = math.ceil(wav.numel() / FRAME_SIZE) + int(round(seconds * FRAME_RATE))
    chunks = []
    sentences = converse(codec, stream, tokenizer, wav.split(FRAME_SIZE), n_frames, chunks.append, stats, echo)
    return torch.cat(chunks, 1), sentences


def _user_frames(path, seconds_per_read=10):
    """(the user's audio as mono 24 kHz frames [<=1920], their count), read and resampled in pieces
    of about `seconds_per_read` s, so memory does not grow with the file. Each piece is resampled
    with enough input on both sides for the filter, so the result is the whole-file resampling."""
    import soundfile as sf
    from codec import _kaiser_sinc_filters, resample
    try:
        info = sf.info(str(path))
    except Exception as e:
        raise ValueError(f"{path}: cannot decode audio ({str(e).splitlines()[0]})") from None
    if info.frames <= 0:
        raise ValueError(f"{path}: audio file is empty (0 samples)")
    n_in, sr = info.frames, info.samplerate
    g = math.gcd(sr, SAMPLE_RATE)
    up, down = SAMPLE_RATE // g, sr // g
    step = down * max(1, seconds_per_read * sr // down)            # input samples per piece
    half = 0 if up == down else _kaiser_sinc_filters(up, down)[1]  # the filter's reach, in input samples
    ctx = down * math.ceil((half + down + 1) / down)

    def frames():
        rest = torch.zeros(0)
        with sf.SoundFile(str(path)) as f:
            for a in range(0, n_in, step):
                lo, hi = max(0, a - ctx), min(n_in, a + step + ctx)
                f.seek(lo)
                x = torch.from_numpy(f.read(hi - lo, dtype="float32", always_2d=True).mean(1))
                if not torch.isfinite(x).all():
                    raise ValueError(f"{path}: audio contains NaN or infinite samples")
                y = resample(x, sr, SAMPLE_RATE)[(a - lo) * up // down:]
                if a + step < n_in:
                    y = y[:step * up // down]
                rest = torch.cat([rest, y])
                while rest.numel() >= FRAME_SIZE:
                    yield rest[:FRAME_SIZE]
                    rest = rest[FRAME_SIZE:]
        if rest.numel():
            yield rest
    return frames(), math.ceil(math.ceil(n_in * up / down) / FRAME_SIZE)


def file_mode(args):
    import soundfile as sf
    frames, n_in = _user_frames(args.input)
    model, tok, codec, stream = build(args)
    stats, n_frames = Stats(), n_in + int(round(args.seconds * FRAME_RATE))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    with sf.SoundFile(str(args.output), "w", SAMPLE_RATE, 2, subtype="PCM_16") as out:
        sentences = converse(codec, stream, tok, frames, n_frames, lambda x: out.write(x.clamp(-1, 1).T.numpy()),
                             stats, echo=sys.stdout)
    transcript = Path(args.transcript) if args.transcript else Path(args.output).with_suffix(".json")
    transcript.parent.mkdir(parents=True, exist_ok=True)
    transcript.write_text(json.dumps({
        "input": str(args.input), "output": str(args.output), "sample_rate": SAMPLE_RATE,
        "frames": n_frames, "seconds": n_frames * FRAME_SIZE / SAMPLE_RATE,
        "channels": ["assistant", "user"], "sentences": sentences}, indent=2))
    print(f"wrote {args.output} ({n_frames * FRAME_SIZE / SAMPLE_RATE:.2f} s stereo) and {transcript}", file=sys.stderr)
    if args.stats:
        print(stats.summary(), file=sys.stderr)


# -----------------------------------------------------------------------------
# 6. Live mode: microphone -> loop -> speaker, full duplex (it keeps listening while it speaks)


def live_mode(args):
    import queue
    try:
        import sounddevice as sd
    except (ImportError, OSError) as e:
        raise RuntimeError(f"live mode needs the sounddevice package and an audio device ({type(e).__name__}: "
                           f"{e}); use file mode: python chat.py --input user.wav --output out.wav") from None
    try:
        devices = sd.query_devices()
        if not any(d["max_input_channels"] > 0 for d in devices) or \
                not any(d["max_output_channels"] > 0 for d in devices):
            raise OSError("no audio input/output device")
    except Exception as e:
        raise RuntimeError(f"live mode: no usable audio device ({e}); "
                           "use file mode: python chat.py --input user.wav --output out.wav") from None
    model, tok, codec, stream = build(args)
    mic, spk = queue.Queue(), queue.Queue()
    dev = next(model.parameters()).device

    def callback(indata, outdata, frames, time_info, status):   # audio thread: never blocks
        mic.put(torch.from_numpy(indata[:, 0].copy()))
        try:
            outdata[:, 0] = spk.get_nowait().numpy()
        except queue.Empty:
            outdata.fill(0)

    mono, stats, f = Monologue(tok, stream.cfg.text_wait_token_id, sys.stdout), Stats(), 0
    print("listening (Ctrl-C to stop) ...", file=sys.stderr)
    try:
        with codec.streaming(1), sd.Stream(samplerate=SAMPLE_RATE, blocksize=FRAME_SIZE, channels=1,
                                           dtype="float32", callback=callback):
            while True:
                frame = mic.get()
                if mic.qsize() == 25:      # 2 s of backlog: the model is slower than real time here
                    print("\nchat.py: falling behind real time (try --device cuda, or a smaller model)",
                          file=sys.stderr)
                out, audio = frame_step(codec, stream, frame.view(1, 1, -1).to(dev), stats)
                if out is not None:
                    mono.push(out[0, 0], f)
                    spk.put(audio if audio is not None else torch.zeros(FRAME_SIZE))
                f += 1
    except KeyboardInterrupt:
        mono.finish(f)
    except sd.PortAudioError as e:
        raise RuntimeError(f"live mode: audio device error ({e}); use file mode: "
                           "python chat.py --input user.wav --output out.wav") from None
    if args.stats:
        print(stats.summary(), file=sys.stderr)


# -----------------------------------------------------------------------------
# 7. Command line


def main(argv=None):
    ap = argparse.ArgumentParser(description="Talk to FLM-Audio. File mode: --input user.wav --output out.wav; "
                                 "live mode (microphone/speaker, needs sounddevice): no --input.")
    ap.add_argument("--checkpoint", help="checkpoint directory (official layout), or a train.py out_dir "
                    f"(its latest checkpoint is used); default {DEFAULT_CHECKPOINT}")
    ap.add_argument("--mimi", help=f"codec file (Kyutai's Mimi or a demo codec); default: {MIMI_FILE} "
                    f"or {DEMO_CODEC_FILE} in the checkpoint directory")
    ap.add_argument("--adapter", help="LoRA adapter file (train.py with lora_rank) merged over --checkpoint")
    ap.add_argument("--int8", action="store_true", help="int8 weights (converted once, kept in the checkpoint)")
    ap.add_argument("--input", help="user audio (any rate; channels are mixed to mono): file mode")
    ap.add_argument("--output", help="stereo wav to write (assistant left, user right)")
    ap.add_argument("--transcript", help="transcript JSON (default: beside --output)")
    ap.add_argument("--seconds", type=float, default=0.0, help="keep going this long after the input ends")
    ap.add_argument("--temp-text", type=float, default=0.01)
    ap.add_argument("--temp-audio", type=float, default=0.5)
    ap.add_argument("--top-k", type=int, default=1, help="used only when --top-p is 0 (official precedence)")
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--rep-text", type=float, default=1.03, help="repetition penalty, text (50-step window)")
    ap.add_argument("--rep-audio", type=float, default=1.2, help="repetition penalty, speak codebooks 0..3")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--max-len", type=int, default=None,
                    help="attention window in 80 ms steps (default: the model's context; slides beyond)")
    ap.add_argument("--start", choices=["initial", "zeros"], default="initial",
                    help="first column: <wait>/pad as in training (default) or all zeros as the official server")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="default bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the step (CUDA graphs on GPU); default on for CUDA")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads")
    ap.add_argument("--stats", action="store_true", help="print per-frame timings at the end")
    args = ap.parse_args(argv)
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.seconds < 0 or (args.max_len is not None and args.max_len < 1):
            raise ValueError("--seconds must be >= 0 and --max-len >= 1")
        if args.input or args.output:
            if not (args.input and args.output):
                raise ValueError("file mode needs both --input and --output")
            return file_mode(args)
        return live_mode(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"chat.py: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
