"""chat.py -- talk to FLM-Audio: the streaming full-duplex loop, live or over wav files.

Every 80 ms one frame of the user's voice comes in and one frame of the assistant's voice
(plus one token of its inner monologue) goes out:

    mic / wav -> codec.encode (8 codes) -> LMStream.step -> [text, 8 codes] -> codec.decode -> speaker / wav

`LMStream` is the per-frame step of the official inference (DESIGN.md section 2), written
gpt-fast style so one step is a fixed set of tensor ops on preallocated state:
  - the token grid lives in a small ring of columns in *delayed* coordinates (acoustic codebooks
    one column late), so a conversation of any length uses constant memory;
  - the backbone reads one column through the model's static KV cache (`m.setup_cache`, a
    sliding window once the conversation outgrows it);
  - DepthGPT keeps its own 8-slot KV cache, so codebook c costs one position, not c+1;
  - sampling is `kernels.sample` (no full-vocabulary sort, no host sync).
Then: the monologue -> sentences with timings, checkpoint/codec loading, file mode, live mode,
per-frame statistics, and a benchmark against an official-style eager loop (`--bench`).
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from model import DELAYS, FLMAudio, FLMConfig

FRAME_SIZE, SAMPLE_RATE, FRAME_RATE, CARDINALITY = 1920, 24000, 12.5, 2048   # = codec.py's constants
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"  # Kyutai's Mimi, as the release names it
DEMO_CODEC_FILE = "demo_codec.safetensors"                  # = data.DEMO_CODEC_FILE
DEFAULT_CHECKPOINT = "out/tiny_demo"       # train.py's default out_dir (the quickstart); uses its `latest`
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")

# -----------------------------------------------------------------------------
# 1. LMStream: one 80 ms step


def _nucleus_args(top_k, top_p):
    """The official sampler's precedence: top_p > 0 means nucleus (top-k ignored; p >= 1 keeps
    everything), otherwise top_k > 0 means top-k, otherwise plain sampling. kernels.sample applies
    top-k only when top_p is outside (0, 1), so translate."""
    if top_p > 0:
        return 0, min(float(top_p), 1.0)
    return int(top_k), 1.0


class LMStream(nn.Module):
    """Streaming inference state for one model. `step(listen [B, 8])` -> None or out [B, 9].

    Defaults are the official server's: text temperature 0.01, audio 0.5, top-p 0.9 (top-k is
    dormant behind top-p, as there), repetition penalty 1.03 on text and 1.2 on speak codebooks
    0..3 over the last 50 steps. A temperature of 0 is plain argmax (no penalty): the official
    greedy trace. The model's KV cache is (re)allocated here, so one model serves one LMStream.
    `max_len` is the attention window in steps (80 ms each); beyond it the oldest steps slide out.
    """

    def __init__(self, model, temp_text=0.01, temp_audio=0.5, top_k_text=1, top_k_audio=1,
                 top_p_text=0.9, top_p_audio=0.9, repetition_penalty_text=1.03,
                 repetition_penalty_audio=1.2, repetition_penalty_window_text=50,
                 repetition_penalty_window_audio=50, penalised_codebooks=4, batch_size=1,
                 max_len=None, compile=False, seed=None):
        super().__init__()
        cfg = model.cfg
        p = next(model.parameters())
        self.m, self.cfg, self.B = model, cfg, batch_size
        self.K = cfg.aud_channel
        self.max_delay = max(DELAYS)
        self.max_len = int(max_len or min(cfg.max_position_embeddings, 3000))
        self.text_args = dict(temperature=float(temp_text),
                              repetition_penalty=float(repetition_penalty_text) if temp_text > 0 else 1.0)
        self.text_args["top_k"], self.text_args["top_p"] = _nucleus_args(top_k_text, top_p_text)
        self.audio_args = dict(temperature=float(temp_audio),
                               repetition_penalty=float(repetition_penalty_audio) if temp_audio > 0 else 1.0)
        self.audio_args["top_k"], self.audio_args["top_p"] = _nucleus_args(top_k_audio, top_p_audio)
        self.n_pen = min(int(penalised_codebooks), self.K)
        dev, dt = p.device, p.dtype
        # token ring [R, B, 17]: column c of the delayed grid lives in slot c % R. A step touches
        # columns t and t + max_delay only, so max_delay + 2 slots suffice (one spare for reading)
        self.R = self.max_delay + 2
        self.register_buffer("ring", torch.zeros(self.R, batch_size, len(DELAYS), dtype=torch.long, device=dev))
        self.register_buffer("delays", torch.tensor(DELAYS, device=dev))
        self.register_buffer("listen_rows", torch.arange(1 + self.K, 1 + 2 * self.K, device=dev))
        self.register_buffer("out_rows", torch.arange(0, 1 + self.K, device=dev))
        self.register_buffer("pos", torch.zeros((), dtype=torch.long, device=dev))   # t, on the device
        # repetition windows: rings of the last W sampled tokens (-1 = empty; order is irrelevant)
        self.register_buffer("text_recent", torch.full(
            (batch_size, max(1, int(repetition_penalty_window_text))), -1, dtype=torch.long, device=dev))
        self.register_buffer("audio_recent", torch.full(
            (batch_size, self.n_pen, max(1, int(repetition_penalty_window_audio))), -1, dtype=torch.long, device=dev))
        # DepthGPT's own KV cache over the 8 codebook positions, per layer
        dg = model.depth_gpt
        nh, n = dg.blocks[0].attn.n_head, dg.n_embd
        self.register_buffer("dk", torch.zeros(len(dg.blocks), batch_size, nh, self.K, n // nh, device=dev, dtype=dt))
        self.register_buffer("dv", torch.zeros_like(self.dk))
        self.register_buffer("start_tok", torch.full((batch_size,), cfg.aud_emp_token_id, device=dev))
        self.generator = None
        if seed is not None:
            if compile:   # compiled graphs draw from the global generator
                torch.manual_seed(seed)
            else:
                self.generator = torch.Generator(device=dev).manual_seed(seed)
        model.setup_cache(batch_size, self.max_len, dev, dt)
        self.compiled = bool(compile)
        self._backbone, self._depth = self._backbone_part, self._depth_part
        if compile:
            cuda = dev.type == "cuda"
            if cuda:   # CUDA graphs need the mutated state at fixed addresses
                for b in [*self.buffers(), *model.buffers()]:
                    torch._dynamo.mark_static_address(b)
            if hasattr(kernels, "_compiled_fn"):
                # create kernels' inner compiled wrapper now: its cache changing during our first
                # trace would otherwise force a second full compile
                kernels._compiled_fn(kernels.decode_attention_tiled)
            mode = "reduce-overhead" if cuda else "default"
            self._backbone = torch.compile(self._backbone_part, mode=mode, dynamic=False)
            self._depth = torch.compile(self._depth_part, mode=mode, dynamic=False)
        self.reset()

    @torch.inference_mode()
    def reset(self):
        """Start a new conversation: empty caches, the initial column in slot 0."""
        self.m.reset_cache()
        self.ring.zero_()
        self.ring[0, :, 0] = self.cfg.text_wait_token_id      # initial column: text = <wait>,
        self.ring[0, :, 1:] = self.cfg.aud_pad_token_id       # every audio row = pad (listen
        self.pos.zero_()                                      # semantic is overwritten by frame 0)
        self.text_recent.fill_(-1)
        self.audio_recent.fill_(-1)
        self.t = 0

    @torch.inference_mode()
    def warmup(self, steps=3):
        """Run a few steps on silence-like input and reset: compiles (torch.compile here, kernels'
        compiled attention) happen now, not in the first frames of a conversation."""
        pad = torch.full((self.B, self.K), self.cfg.aud_pad_token_id, device=self.ring.device)
        for _ in range(steps):
            self.step(pad)
        self.reset()
        return self

    # the step in two parts (so --stats can time them); each is a fixed graph of tensor ops
    def _backbone_part(self, listen):
        t = self.pos
        # user frame t: codebook q goes to column t + delay (row 9 + q)
        slots = (t + self.delays[self.listen_rows]) % self.R
        self.ring[slots, :, self.listen_rows] = listen.T
        # (1-element index tensors, not 0-d ones: a 0-d index would be read on the host)
        col = self.ring[(t % self.R).view(1)][0]                           # column t, complete now
        h, text_logits = self.m.backbone_step(col[:, :, None], t)
        text = kernels.sample(text_logits[:, -1], recent=self.text_recent, generator=self.generator,
                              **self.text_args)
        return h[:, -1], text

    def _depth_part(self, h, text):
        t, dg, B, K = self.pos, self.m.depth_gpt, self.B, self.K
        x_in = dg.linear_in(h).view(B, K, dg.n_embd)                       # one input vector per position
        tok, toks = self.start_tok, []
        for c in range(K):                                                 # unrolled: static shapes
            x = dg.wtes[c](tok) + dg.wpe.weight[c] + x_in[:, c]
            for i, block in enumerate(dg.blocks):
                a = block.attn
                q, k, v = a.c_attn(block.ln_1(x)).view(B, 3, a.n_head, -1).unbind(1)
                self.dk[i, :, :, c] = k                                    # position c's key/value
                self.dv[i, :, :, c] = v
                y = F.scaled_dot_product_attention(q[:, :, None], self.dk[i, :, :, :c + 1], self.dv[i, :, :, :c + 1])
                x = x + a.c_proj(y.reshape(B, -1))
                x = x + block.mlps[c](block.ln_2(x))                       # this position's own MLP
            logits = dg.lm_heads[c](dg.ln_f(x))
            pen = c < self.n_pen
            # the audio vocabulary is small: rank all of it, so top-p never needs the bisection path
            tok = kernels.sample(logits, recent=self.audio_recent[:, c] if pen else None,
                                 generator=self.generator, candidates=logits.shape[-1],
                                 **(self.audio_args if pen else {**self.audio_args, "repetition_penalty": 1.0}))
            toks.append(tok)
        audio = torch.stack(toks, 1)                                       # [B, 8]
        # remember the samples for the repetition windows
        self.text_recent[:, (t % self.text_recent.shape[1]).view(1)] = text[:, None]
        self.audio_recent[:, :, (t % self.audio_recent.shape[2]).view(1)] = audio[:, :self.n_pen, None]
        # sampled tokens go to column t + 1; then read back one whole realigned frame
        self.ring[((t + 1) % self.R).view(1), :, :1 + K] = torch.cat([text[:, None], audio], 1)[None]
        slots = (t + 1 - self.max_delay + self.delays[self.out_rows]) % self.R
        out = self.ring[slots, :, self.out_rows].T                         # [B, 9]
        self.pos += 1                                                      # (t is this tensor: last)
        return out

    @torch.inference_mode()
    def step(self, listen, timings=None):
        """listen [B, 8] (user frame t, long) -> None while the delays fill, else [B, 9]: the text
        token and 8 speak codebooks of assistant frame t (realigned). `timings`, a dict, gets
        'backbone' and 'depth' seconds added (synchronising CUDA to measure)."""
        if listen.shape != (self.B, self.K):
            raise ValueError(f"LMStream.step: listen frame must be [{self.B}, {self.K}], got {tuple(listen.shape)}")
        listen = listen.to(self.ring.device, torch.long)
        t0 = time.perf_counter()
        h, text = self._backbone(listen)
        if timings is not None:
            _sync(listen)
            t1 = time.perf_counter()
            timings["backbone"] = timings.get("backbone", 0.0) + t1 - t0
        out = self._depth(h, text)
        if self.compiled:
            out = out.clone()        # CUDA graph outputs are overwritten by the next replay
        if timings is not None:
            _sync(listen)
            timings["depth"] = timings.get("depth", 0.0) + time.perf_counter() - t1
        self.t += 1
        return None if self.t <= self.max_delay else out

    def columns(self):
        """The ring unrolled after step t: [B, 17, R] = delayed-grid columns t+2-R .. t+1 (newest
        last; column t+1 has its text and speak rows, its listen semantic row comes next step)."""
        idx = (self.pos + 1 - self.R + torch.arange(self.R, device=self.pos.device)) % self.R
        return self.ring[idx].permute(1, 2, 0)


def _sync(x):
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


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


def load_checkpoint(path, device="cpu", dtype=torch.float32):
    """An official-layout directory (ours are the same) -> (model, tokenizer). The tokenizer comes
    from the directory's tokenizer files, else the byte-level default of data.py."""
    import data
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint directory not found")
    model = FLMAudio.from_pretrained(path, device=device, dtype=dtype)
    has_tok = any((path / f).is_file() for f in TOKENIZER_FILES)
    return model, data.load_tokenizer(path if has_tok else None)


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
    import codec as codec_lib
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")]
    ckpt = args.checkpoint
    if ckpt is None:
        if not Path(DEFAULT_CHECKPOINT).is_dir():
            raise FileNotFoundError(f"{DEFAULT_CHECKPOINT}: no --checkpoint given and the quickstart's demo "
                                    "checkpoint is missing; create it with `python train.py` (the tiny "
                                    "demo, ~15 min on 2 cores) or pass --checkpoint DIR")
        ckpt = DEFAULT_CHECKPOINT
    if not Path(ckpt).is_dir():
        raise FileNotFoundError(f"{ckpt}: checkpoint directory not found")
    if not (Path(ckpt) / "config.json").is_file() and (Path(ckpt) / "latest").is_dir():
        ckpt = str(Path(ckpt) / "latest")          # train.py's out_dir: its newest checkpoint
    if args.checkpoint is None:
        print(f"chat.py: no --checkpoint given, using the quickstart's {ckpt}", file=sys.stderr)
    codec_path = find_codec(ckpt, args.mimi)
    model, tok = load_checkpoint(ckpt, device, dtype)
    codec = codec_lib.load_codec(codec_path, device=device)
    compile_ = args.compile if args.compile is not None else device.startswith("cuda")
    stream = LMStream(model, temp_text=args.temp_text, temp_audio=args.temp_audio, top_k_text=args.top_k,
                      top_k_audio=args.top_k, top_p_text=args.top_p, top_p_audio=args.top_p,
                      repetition_penalty_text=args.rep_text, repetition_penalty_audio=args.rep_audio,
                      max_len=args.max_len, compile=compile_, seed=args.seed).warmup()
    return model, tok, codec, stream


# -----------------------------------------------------------------------------
# 4. One frame through the whole loop, and per-frame statistics


class Stats:
    """Per-frame seconds of codec (encode + decode), backbone, depth; p50/p99; real-time factor."""

    def __init__(self):
        self.rows = []

    def add(self, row):
        self.rows.append(row)

    def summary(self):
        if not self.rows:
            return "no frames"
        keys = ("codec", "backbone", "depth", "total")
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
        if int(speak.max()) < CARDINALITY:   # pad/empty ids are not audio: leave silence
            audio = codec.decode(speak.to(codes.device))[0, 0].float().cpu()
    t3 = time.perf_counter()
    if stats is not None:
        row.update(codec=(t1 - t0) + (t3 - t2), total=t3 - t0)
        stats.add(row)
    return out, audio


# -----------------------------------------------------------------------------
# 5. File mode: user.wav -> stereo out.wav (assistant left, user right) + transcript JSON


def run_file(codec, stream, tokenizer, wav, seconds=0.0, stats=None, echo=None):
    """wav [N] at 24 kHz (the user). Returns (stereo [2, F*1920], sentences). Assistant frame f is
    placed at f * 80 ms, the same timeline as the user (frame 0 is silence: it is never spoken)."""
    n_frames = math.ceil(wav.numel() / FRAME_SIZE) + int(round(seconds * FRAME_RATE))
    user = torch.zeros(n_frames * FRAME_SIZE)
    user[:wav.numel()] = wav
    assistant = torch.zeros_like(user)
    mono = Monologue(tokenizer, stream.cfg.text_wait_token_id, echo)
    dev = next(stream.m.parameters()).device
    with codec.streaming(1):
        for f in range(n_frames):
            frame = user[f * FRAME_SIZE:(f + 1) * FRAME_SIZE].view(1, 1, FRAME_SIZE).to(dev)
            out, audio = frame_step(codec, stream, frame, stats)
            if out is None:
                continue
            g = f - stream.max_delay + 1             # the assistant frame this output holds
            mono.push(out[0, 0], g)
            if audio is not None:
                assistant[g * FRAME_SIZE:(g + 1) * FRAME_SIZE] = audio
    return torch.stack([assistant, user]), mono.finish(n_frames)


def file_mode(args):
    import codec as codec_lib
    wav = codec_lib.read_audio(args.input).mean(0)          # any rate/channels -> mono 24 kHz
    model, tok, codec, stream = build(args)
    stats = Stats()
    stereo, sentences = run_file(codec, stream, tok, wav, args.seconds, stats, echo=sys.stdout)
    codec_lib.write_audio(args.output, stereo)
    transcript = Path(args.transcript) if args.transcript else Path(args.output).with_suffix(".json")
    transcript.parent.mkdir(parents=True, exist_ok=True)
    transcript.write_text(json.dumps({
        "input": str(args.input), "output": str(args.output), "sample_rate": SAMPLE_RATE,
        "frames": stereo.shape[1] // FRAME_SIZE, "seconds": stereo.shape[1] / SAMPLE_RATE,
        "channels": ["assistant", "user"], "sentences": sentences}, indent=2))
    print(f"wrote {args.output} ({stereo.shape[1] / SAMPLE_RATE:.2f} s stereo) and {transcript}", file=sys.stderr)
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
# 7. Benchmark: LMStream vs an official-style eager loop of the same model


class OfficialStyleLoop:
    """How the official inference computes one step: a per-layer KV cache that grows by torch.cat,
    GQA by repeating K/V, DepthGPT re-run over all previous codebooks for each of the 8 tokens, and a
    sort-based sampler. Same math as LMStream (its greedy trace is the same), used as the baseline."""

    def __init__(self, model, temp_text=0.01, temp_audio=0.5, top_p=0.9, rep_text=1.03, rep_audio=1.2, window=50,
                 attn_window=None):
        self.m, self.cfg, self.attn_window = model, model.cfg, attn_window   # attn_window: keep the last N keys
        self.temp_text, self.temp_audio, self.top_p = temp_text, temp_audio, top_p
        self.rep_text, self.rep_audio, self.window = rep_text, rep_audio, window
        self.kv = [None] * len(model.layers)
        cfg = self.cfg
        self.cols = [[cfg.text_wait_token_id] + [cfg.aud_pad_token_id] * 16]   # the delayed grid, per column
        self.text_hist, self.audio_hist, self.t = [], [], 0

    def _sample(self, logits, temp, rep, hist):
        if temp <= 0:
            return logits.argmax(-1)
        if hist and rep != 1.0:
            ids = torch.tensor(hist[-self.window:])[None]
            v = logits.gather(1, ids)
            logits = logits.scatter(1, ids, torch.where(v > 0, v / rep, v * rep))
        probs = torch.softmax(logits / temp, -1)
        ps, idx = probs.sort(-1, descending=True)
        ps = ps * ((ps.cumsum(-1) - ps) <= self.top_p)
        return idx.gather(1, torch.multinomial(ps / ps.sum(-1, keepdim=True), 1)).squeeze(1)

    @torch.inference_mode()
    def step(self, listen):                                     # listen [1, 8]
        m, t = self.m, self.t
        while len(self.cols) < t + 2:
            self.cols.append([0] * 17)
        for q in range(8):
            self.cols[t + DELAYS[9 + q]][9 + q] = int(listen[0, q])
        x = m.embed(torch.tensor(self.cols[t])[None, :, None])
        from model import rope_cos_sin, apply_rope
        cos, sin = rope_cos_sin(torch.tensor([t]), self.cfg.head_dim, self.cfg.rope_theta)
        for i, layer in enumerate(m.layers):
            a, hx = layer.self_attn, layer.input_layernorm(x)
            q = apply_rope(a.q_proj(hx).view(1, 1, a.n_head, -1).transpose(1, 2), cos, sin)
            k = apply_rope(a.k_proj(hx).view(1, 1, a.n_kv, -1).transpose(1, 2), cos, sin)
            v = a.v_proj(hx).view(1, 1, a.n_kv, -1).transpose(1, 2)
            if self.kv[i] is not None:
                k, v = torch.cat([self.kv[i][0], k], 2), torch.cat([self.kv[i][1], v], 2)
                if self.attn_window:
                    k, v = k[:, :, -self.attn_window:], v[:, :, -self.attn_window:]
            self.kv[i] = (k, v)
            g = a.n_head // a.n_kv
            s = q @ k.repeat_interleave(g, 1).transpose(-1, -2) / math.sqrt(a.head_dim)
            y = s.softmax(-1) @ v.repeat_interleave(g, 1)
            x = x + a.o_proj(y.transpose(1, 2).reshape(1, 1, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        h = m.norm(x)[:, 0]
        text = self._sample(m.lm_head(h), self.temp_text, self.rep_text, self.text_hist)
        prev = torch.zeros(1, 0, dtype=torch.long)
        for c in range(8):
            logits = m.depth_gpt(h, prev)[:, -1]
            hist = [a[c] for a in self.audio_hist] if c < 4 else []
            prev = torch.cat([prev, self._sample(logits, self.temp_audio, self.rep_audio, hist)[:, None]], 1)
        self.text_hist.append(int(text))
        self.audio_hist.append(prev[0].tolist())
        self.cols[t + 1][0] = int(text)
        self.cols[t + 1][1:9] = prev[0].tolist()
        self.t += 1
        if self.t <= 1:
            return None
        return torch.tensor([[self.cols[self.t - 1 + DELAYS[r]][r] for r in range(9)]])


def bench_config(name):
    if name == "tiny":
        return FLMConfig.preset("tiny")
    # ~67 M parameters (the size): hidden 512, 8 layers, DepthGPT 4 x 256
    return FLMConfig(vocab_size=264, text_wait_token_id=256, hidden_size=512, intermediate_size=1536,
                     num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                     rope_theta=10000.0, max_position_embeddings=2048,
                     depth_n_layer=4, depth_n_head=4, depth_n_embd=256)


def _time_steps(steps, n, warmup, K=8):
    """Per-step milliseconds of each step function, sorted; the functions take turns on the same
    inputs, so a change in machine load hits all of them alike."""
    torch.manual_seed(0)
    listen = torch.randint(0, 2048, (n + warmup, 1, K))
    times = [[] for _ in steps]
    for i in range(n + warmup):
        for step, ts in zip(steps, times):
            t0 = time.perf_counter()
            step(listen[i])
            if i >= warmup:
                ts.append((time.perf_counter() - t0) * 1e3)
    return [sorted(ts) for ts in times]


def bench_step(cfg, steps=40, compile=False, max_len=1000, warmup=None):
    """LMStream vs OfficialStyleLoop on one random model of config `cfg` (callable from bench.py):
    {'ours': sorted ms per step, 'official': sorted ms per step, 'params': count}."""
    torch.manual_seed(0)
    m = FLMAudio(cfg).eval()
    ours = LMStream(m, max_len=max_len, compile=compile, seed=0)
    # the baseline computes its own attention, so it can share the model with LMStream
    ours_t, off_t = _time_steps([ours.step, OfficialStyleLoop(m).step], steps, warmup or (10 if compile else 5))
    return {"ours": ours_t, "official": off_t, "params": m.num_params()}


def bench_full_loop(codec, cfg=None, steps=40, warmup=5):
    """One frame end to end (encode + LMStream step + decode) on a random model, default tiny,
    fed random audio: the Stats of the timed frames (callable from bench.py)."""
    torch.manual_seed(0)
    stream = LMStream(FLMAudio(cfg or FLMConfig.preset("tiny")).eval(), max_len=1000, seed=0)
    stats = Stats()
    wav = 0.1 * torch.randn(FRAME_SIZE * (steps + warmup))
    with codec.streaming(1):
        for f in range(steps + warmup):
            frame = wav[f * FRAME_SIZE:(f + 1) * FRAME_SIZE].view(1, 1, -1)
            frame_step(codec, stream, frame, stats if f >= warmup else None)
    return stats


def bench(args):
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.steps} steps after warm-up, "
          "official sampling defaults, random weights, batch 1")
    print("| config | LMStream | p50 ms | p99 ms | official-style p50 ms | p99 ms | speed-up (p50) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.bench_configs.split(","):
        for compiled in ([False, True] if args.compile else [False]):
            r = bench_step(bench_config(name), args.steps, compiled, args.max_len or 1000)
            o, b = r["ours"], r["official"]
            print(f"| {name} ({r['params'] / 1e6:.0f}M) | {'compiled' if compiled else 'eager'} | {_pct(o, 50):.1f} | "
                  f"{_pct(o, 99):.1f} | {_pct(b, 50):.1f} | {_pct(b, 99):.1f} | {_pct(b, 50) / _pct(o, 50):.1f}x |")
    if args.mimi or args.bench_codec:
        import codec as codec_lib
        g = torch.Generator().manual_seed(0)
        demo = codec_lib.DemoCodec.fit([0.1 * torch.randn(SAMPLE_RATE * 4, generator=g)], iters=1)
        mimi = codec_lib.load_codec(args.mimi) if args.mimi else codec_lib.Mimi()   # random weights: same cost
        print("\nfull loop, tiny model (eager LMStream), one frame = encode + step + decode:")
        print("| codec | frames | codec p50 ms | step p50 ms | total p50 ms | total p99 ms | real-time factor |")
        print("|---|---|---|---|---|---|---|")
        for name, codec in [("Mimi" + (f" ({Path(args.mimi).name})" if args.mimi else " (random weights)"), mimi),
                            ("DemoCodec", demo)]:
            rows = bench_full_loop(codec, steps=args.steps).rows
            col = {k: sorted(r.get(k, 0.0) * 1e3 for r in rows) for k in ("codec", "total")}
            step = sorted((r["backbone"] + r["depth"]) * 1e3 for r in rows)
            rtf = sum(col["total"]) / 1e3 / (len(rows) / FRAME_RATE)
            print(f"| {name} | {len(rows)} | {_pct(col['codec'], 50):.1f} | {_pct(step, 50):.1f} | "
                  f"{_pct(col['total'], 50):.1f} | {_pct(col['total'], 99):.1f} | {rtf:.3f} |")


# -----------------------------------------------------------------------------
# 8. Command line


def main(argv=None):
    ap = argparse.ArgumentParser(description="Talk to FLM-Audio. File mode: --input user.wav --output out.wav; "
                                 "live mode (microphone/speaker, needs sounddevice): no --input.")
    ap.add_argument("--checkpoint", help="checkpoint directory (official layout), or a train.py out_dir "
                    f"(its latest checkpoint is used); default {DEFAULT_CHECKPOINT}")
    ap.add_argument("--mimi", help=f"codec file (Kyutai's Mimi or a demo codec); default: {MIMI_FILE} "
                    f"or {DEMO_CODEC_FILE} in the checkpoint directory")
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
    ap.add_argument("--max-len", type=int, default=None, help="attention window in 80 ms steps")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="default bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the step (CUDA graphs on GPU); default on for CUDA")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads")
    ap.add_argument("--stats", action="store_true", help="print per-frame timings at the end")
    ap.add_argument("--bench", action="store_true", help="benchmark LMStream vs an official-style loop")
    ap.add_argument("--bench-configs", default="tiny,67m")
    ap.add_argument("--bench-codec", action="store_true", help="also time the full loop with a codec (random-weight Mimi or --mimi, and the demo codec)")
    ap.add_argument("--steps", type=int, default=50, help="benchmark steps")
    args = ap.parse_args(argv)
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.bench:
            args.threads = args.threads or 2
            return bench(args)
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
