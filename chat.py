"""chat.py -- talk to FLM-Audio: the streaming full-duplex loop, live or over wav files.

Every 80 ms one frame of the user's voice comes in and one frame of the assistant's voice
(plus one token of its inner monologue) goes out:

    mic / wav -> codec.encode (8 codes) -> LMStream.step -> [text, 8 codes] -> codec.decode -> speaker / wav

`LMStream` is the per-frame step of the official inference (DESIGN.md section 2), written
gpt-fast style so one step is a fixed set of tensor ops on preallocated state:
  - the token grid lives in a small ring of columns in *delayed* coordinates (acoustic codebooks
    one column late), so a conversation of any length uses constant memory;
  - the backbone reads one column through its own static ring-buffer KV cache (a sliding window
    once the conversation outgrows it), computed straight from the model's weights in few ops;
  - DepthGPT keeps its own 8-slot KV cache, so codebook c costs one position, not c+1;
  - sampling is kernels.sample_token: inverse CDF from a few uniforms (kernels.sample's semantics, no host sync).
Then: the monologue -> sentences with timings, checkpoint/codec loading, file mode, live mode,
per-frame statistics. (The benchmark against an official-style loop is in bench.py.)
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

from codec import CARDINALITY, FRAME_RATE, FRAME_SIZE, SAMPLE_RATE, OFFICIAL_MIMI_FILE as MIMI_FILE
from data import DEMO_CODEC_FILE, load_codec
from kernels import nucleus_args, sample_token
from grid import DELAYS
from model import FLMAudio

DEFAULT_CHECKPOINT = "out/tiny_demo"       # train.py's default out_dir (the quickstart); uses its `latest`
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")

# -----------------------------------------------------------------------------
# 1. LMStream: one 80 ms step
#
# At batch 1 a step reads each weight once (39 MB of matmul weights for the tiny model: ~4 ms on
# one CPU core, as they do not fit its L3) and runs many tiny ops, each a few microseconds of Python
# and dispatch (~1000 in a step written module by module). So the step below is written for few
# ops and fast weight reads: the weights are read directly (no nn.Module calls), on the CPU from
# fused [in, out] copies (q|k|v and gate|up one matmul each), RoPE is one multiply-add over q, k
# (and v, with cos 1 / sin 0), residual adds ride in the matmuls (addmm), and the sampler draws from
# a few uniforms without a full sort (kernels.sample_token). torch.compile (`compile=True`) then fuses the remaining
# elementwise ops and removes the dispatch.


def _rms(x, w, eps):
    """RMSNorm exactly as the model computes it (normalise in float32, scale in the input dtype)."""
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _mm(x, w, bias=None):
    """x @ w (+ bias) for w from LMStream._prep: one matrix, or a tuple of them (outputs concatenated)."""
    if isinstance(w, tuple):
        return torch.cat([_mm(x, wi, None if bias is None else bi) for wi, bi in zip(w, bias or w)], -1)
    return torch.mm(x, w) if bias is None else torch.addmm(bias, x, w)


class LMStream(nn.Module):
    """Streaming inference state for one model. `step(listen [B, 8])` -> None or out [B, 9].

    Defaults are the official server's: text temperature 0.01, audio 0.5, top-p 0.9 (top-k is
    dormant behind top-p, as there), repetition penalty 1.03 on text and 1.2 on speak codebooks
    0..3 over the last 50 steps. A temperature of 0 is plain argmax (no penalty): the official
    greedy trace. `max_len` is the attention window in steps (80 ms each); beyond it the oldest
    steps slide out. The stream keeps its own KV caches and, on the CPU, fused [in, out] copies of
    the matmul weights (one more copy of the non-embedding weights; see _prep); it never modifies
    the model, so several streams may share one model.
    """

    TRIES = 16            # uniforms per sampled token (top-p: rejection candidates)
    COPY_WEIGHTS = None   # fused/transposed weight copies (see _prep); None: on the CPU only

    def __init__(self, model, temp_text=0.01, temp_audio=0.5, top_k_text=1, top_k_audio=1,
                 top_p_text=0.9, top_p_audio=0.9, repetition_penalty_text=1.03,
                 repetition_penalty_audio=1.2, repetition_penalty_window_text=50,
                 repetition_penalty_window_audio=50, penalised_codebooks=4, batch_size=1,
                 max_len=None, compile=False, seed=None):
        super().__init__()
        cfg = model.cfg
        p = next(model.parameters())
        dev, dt = p.device, p.dtype
        self.m, self.cfg, self.B, self.K = model, cfg, batch_size, cfg.aud_channel
        self.max_delay = max(DELAYS)
        self.max_len = int(max_len or min(cfg.max_position_embeddings, 3000))
        # sampling settings per stream: (temperature, top_k, top_p, repetition penalty)
        self.text_cfg = (float(temp_text), *nucleus_args(top_k_text, top_p_text),
                         float(repetition_penalty_text))
        self.audio_cfg = (float(temp_audio), *nucleus_args(top_k_audio, top_p_audio),
                          float(repetition_penalty_audio))
        self.n_pen = min(int(penalised_codebooks), self.K)
        # token ring [R, B, 17]: column c of the delayed grid lives in slot c % R. A step touches
        # columns t and t + max_delay only, so max_delay + 2 slots suffice (one spare for reading)
        self.R = self.max_delay + 2
        rows_in, rows_out = torch.arange(1 + self.K, 1 + 2 * self.K), torch.arange(0, 1 + self.K)
        self.register_buffer("ring", torch.zeros(self.R, batch_size, len(DELAYS), dtype=torch.long, device=dev))
        self.register_buffer("listen_rows", rows_in.to(dev))
        self.register_buffer("listen_delays", torch.tensor(DELAYS)[rows_in].to(dev))
        self.register_buffer("out_rows", rows_out.to(dev))
        self.register_buffer("out_delays", torch.tensor(DELAYS)[rows_out].to(dev))
        self.register_buffer("pos", torch.zeros((), dtype=torch.long, device=dev))   # t, on the device
        # repetition windows: rings of the last W sampled tokens; empty = V, a spare column the
        # sampler appends (order within the window is irrelevant)
        self.register_buffer("text_recent", torch.full(
            (batch_size, max(1, int(repetition_penalty_window_text))), cfg.vocab_size, device=dev))
        self.register_buffer("audio_recent", torch.full(
            (batch_size, self.n_pen, max(1, int(repetition_penalty_window_audio))), cfg.aud_vocab_size, device=dev))
        # backbone KV cache [layers, k|v, B, kv heads, max_len, head_dim], a ring: step t in slot
        # t % max_len (keys after RoPE, so relative positions survive the wrap)
        a = model.layers[0].self_attn
        self.nh, self.nkv, self.hd = a.n_head, a.n_kv, a.head_dim
        # (one buffer per layer: compiled, an in-place write into a view of a shared buffer would
        # copy the whole buffer)
        for i in range(len(model.layers)):
            self.register_buffer(f"kv{i}", torch.zeros(2, batch_size, self.nkv, self.max_len, self.hd, device=dev, dtype=dt))
        self.register_buffer("slots", torch.arange(self.max_len, device=dev))
        # RoPE over the fused q|k|v output: per-channel frequency (0 for v: cos 1, sin 0) and the sign
        # of rotate-half (its first half is negated: x * cos + swap_halves(x) * sign * sin)
        inv = 1.0 / cfg.rope_theta ** (torch.arange(0, self.hd, 2, dtype=torch.float32) / self.hd)
        heads_qk = self.nh + self.nkv
        self.register_buffer("rope_freq", torch.cat([torch.cat([inv, inv]).repeat(heads_qk),
                                                     torch.zeros(self.nkv * self.hd)]).to(dev))
        half = torch.ones(self.hd)
        half[:self.hd // 2] = -1
        self.register_buffer("rope_sign", torch.cat([half.repeat(heads_qk), torch.zeros(self.nkv * self.hd)]).to(dev))
        # the weights, read directly: per layer (norm, q|k|v, its bias, o^T, norm, gate|up, down^T)
        self.copy_weights = dev.type == "cpu" if self.COPY_WEIGHTS is None else self.COPY_WEIGHTS
        self._layers = []
        for l in model.layers:
            a, mlp = l.self_attn, l.mlp
            self._layers.append((l.input_layernorm.weight, self._prep(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight),
                                 self._prep_bias(a.q_proj.bias, a.k_proj.bias, a.v_proj.bias), self._prep(a.o_proj.weight),
                                 l.post_attention_layernorm.weight, self._prep(mlp.gate_proj.weight, mlp.up_proj.weight),
                                 self._prep(mlp.down_proj.weight)))
        self._head = self._prep(model.lm_head.weight)
        self._eps = cfg.rms_norm_eps
        # DepthGPT: its own KV cache over the 8 codebook positions [layers, k|v, B, heads, 8, head_dim];
        # per codebook c, the token table with position c's embedding added (a + b, as the model
        # does it: exact) and the weights of position c's MLPs and head
        dg = model.depth_gpt
        self.dn, self.dnh = dg.n_embd, dg.blocks[0].attn.n_head
        for i in range(len(dg.blocks)):
            self.register_buffer(f"dkv{i}", torch.zeros(2, batch_size, self.dnh, self.K, self.dn // self.dnh,
                                                        device=dev, dtype=dt))
        with torch.no_grad():
            self._wte = [dg.wtes[c].weight + dg.wpe.weight[c] for c in range(self.K)]
        self._start = torch.full((batch_size,), cfg.aud_emp_token_id, device=dev)
        self._dblocks = [(b.ln_1.weight, self._prep(b.attn.c_attn.weight), self._prep(b.attn.c_proj.weight), b.ln_2.weight,
                          [self._prep(mlp.gate_proj.weight, mlp.up_proj.weight) for mlp in b.mlps],
                          [self._prep(mlp.down_proj.weight) for mlp in b.mlps]) for b in dg.blocks]
        self._dg = (self._prep(dg.linear_in.weight), dg.ln_f.weight, [self._prep(h.weight) for h in dg.lm_heads])
        self.generator = torch.Generator(device=dev)
        if seed is not None:
            self.generator.manual_seed(seed)
        self.sampling = self.text_cfg[0] > 0 or self.audio_cfg[0] > 0
        self.compiled = bool(compile)
        self._backbone, self._depth = self._backbone_part, self._depth_part
        if compile:
            cuda = dev.type == "cuda"
            if cuda:   # CUDA graphs: mutated state and weights at fixed addresses (else copied per replay)
                def flat(x):
                    return [t for y in x for t in flat(y)] if isinstance(x, (list, tuple)) else [x]
                for b in [*self.buffers(), *flat([self._layers, self._head, self._dblocks, self._dg, self._wte]),
                          self._start]:
                    if b is not None:
                        torch._dynamo.mark_static_address(b)
            mode = "reduce-overhead" if cuda else "default"
            self._backbone = torch.compile(self._backbone_part, mode=mode, dynamic=False)
            self._depth = torch.compile(self._depth_part, mode=mode, dynamic=False)
        self.reset()

    def _prep(self, *ws):
        """Weights [out, in] of matmuls that share their input -> the right operand of _mm. On the
        CPU: one contiguous [in, sum of outs] copy (one matmul instead of several, and the layout
        that streams fastest through a batch-1 matmul: the step is bound by reading weights and by
        op count). Elsewhere: the model's own weights as transposed views, no extra memory."""
        ws = [w.detach() for w in ws]
        if self.copy_weights:
            return torch.cat(ws).t().contiguous()
        return ws[0].t() if len(ws) == 1 else tuple(w.t() for w in ws)

    def _prep_bias(self, *bs):
        bs = [b.detach() for b in bs]
        return torch.cat(bs) if self.copy_weights else tuple(bs)

    @torch.inference_mode()
    def reset(self):
        """Start a new conversation: empty windows, the initial column in slot 0 (the KV caches
        need no clearing: step t reads only the slots written by steps <= t)."""
        self.ring.zero_()
        self.ring[0, :, 0] = self.cfg.text_wait_token_id      # initial column: text = <wait>,
        self.ring[0, :, 1:] = self.cfg.aud_pad_token_id       # every audio row = pad (listen
        self.pos.zero_()                                      # semantic is overwritten by frame 0)
        self.text_recent.fill_(self.cfg.vocab_size)
        self.audio_recent.fill_(self.cfg.aud_vocab_size)
        self.t = 0

    @torch.inference_mode()
    def warmup(self, steps=3):
        """Run a few steps on silence-like input and reset: compiles happen now, not in the first
        frames of a conversation."""
        pad = torch.full((self.B, self.K), self.cfg.aud_pad_token_id, device=self.ring.device)
        for _ in range(steps):
            self.step(pad)
        self.reset()
        return self

    # the step in two parts (so --stats can time them); each is a fixed graph of tensor ops
    def _backbone_part(self, listen, u, n_keys):
        """listen [B, 8], u [B, 9] uniforms or None, n_keys: the valid cache slots as an int (eager:
        attend to those only) or None (compiled: all slots, the rest masked) -> (h [B, H], text [B])."""
        t, B, m, eps = self.pos, self.B, self.m, self._eps
        nh, nkv, hd = self.nh, self.nkv, self.hd
        Q = nh * hd
        # user frame t: codebook q goes to column t + delay (row 9 + q); then read column t
        self.ring[(t + self.listen_delays) % self.R, :, self.listen_rows] = listen.T
        # (1-element index tensors, not 0-d ones: a 0-d index would be read on the host)
        col = self.ring[(t % self.R).view(1)][0].unbind(1)                 # 17 x [B]
        e = m.embed
        x = F.embedding(col[0], e.text.weight)
        for c in range(self.K):                                            # the model's order of sums
            x = x + F.embedding(col[1 + c], e.speak[c].weight) + F.embedding(col[1 + self.K + c], e.listen[c].weight)
        ang = t.float() * self.rope_freq                                   # once for every layer
        cos, sin = ang.cos(), ang.sin() * self.rope_sign
        slot = (t % self.max_len).view(1)
        if n_keys is None:
            bias = torch.where(self.slots <= t, 0.0, float("-inf")).to(x.dtype)   # slot filled yet?
        else:
            bias = x.new_zeros(())
        scale = 1.0 / math.sqrt(hd)
        for i, (ln1, wqkv, bqkv, wo, ln2, wgu, wd) in enumerate(self._layers):
            y = _mm(_rms(x, ln1, eps), wqkv, bqkv)             # [B, q | k | v]
            swapped = y.view(B, -1, 2, hd // 2).flip(2).view(B, -1)
            y = torch.addcmul(y * cos, swapped, sin).to(x.dtype)           # RoPE on q and k, v as is
            kv = getattr(self, f"kv{i}")
            kv.index_copy_(3, slot, y[:, Q:].view(B, 2, nkv, 1, hd).transpose(0, 1))
            k, v = (kv[0], kv[1]) if n_keys is None else (kv[0, :, :, :n_keys], kv[1, :, :, :n_keys])
            q = y[:, :Q].reshape(B * nkv, nh // nkv, hd)                   # GQA: query groups per kv head
            s = torch.baddbmm(bias, q, k.reshape(B * nkv, -1, hd).transpose(1, 2), alpha=scale)
            o = torch.bmm(torch.softmax(s, -1), v.reshape(B * nkv, -1, hd))
            x = torch.addmm(x, o.view(B, Q), wo)
            gu = _mm(_rms(x, ln2, eps), wgu)
            x = torch.addmm(x, F.silu(gu[:, :gu.shape[1] // 2]) * gu[:, gu.shape[1] // 2:], wd)
        h = _rms(x, m.norm.weight, eps)
        text_logits = _mm(h, self._head)
        text = sample_token(text_logits, u[:, 0] if u is not None else None, *self.text_cfg, self.text_recent,
                            sort=not self.compiled)
        return h, text

    def _depth_part(self, h, text, u):
        """h [B, H], text [B], u [B, 9] or None -> the realigned frame out [B, 9]; advances t."""
        t, B, K, n, nh = self.pos, self.B, self.K, self.dn, self.dnh
        hd, eps, scale = n // nh, 1e-6, 1.0 / math.sqrt(n // nh)
        w_in, ln_f, heads = self._dg
        x_in = _mm(h, w_in).view(B, K, n)                               # one input vector per position
        tok, toks = self._start, [text]
        for c in range(K):                                                 # unrolled: static shapes
            x = F.embedding(tok, self._wte[c]) + x_in[:, c]
            for i, (ln1, w_attn, wp, ln2, wgu, wd) in enumerate(self._dblocks):
                y = _mm(_rms(x, ln1, eps), w_attn).view(B, 3, nh, hd)
                kv = getattr(self, f"dkv{i}")
                kv[:, :, :, c] = y[:, 1:].transpose(0, 1)                  # position c's key and value
                if c == 0:                                                 # one key: attention = its value
                    o = y[:, 2].reshape(B, n)
                else:
                    s = torch.baddbmm(x.new_zeros(()), y[:, 0].reshape(B * nh, 1, hd),
                                      kv[0, :, :, :c + 1].reshape(B * nh, c + 1, hd).transpose(1, 2), alpha=scale)
                    o = torch.bmm(torch.softmax(s, -1), kv[1, :, :, :c + 1].reshape(B * nh, c + 1, hd)).view(B, n)
                x = torch.addmm(x, o, wp)
                gu = _mm(_rms(x, ln2, eps), wgu[c])      # this position's own MLP
                x = torch.addmm(x, F.silu(gu[:, :gu.shape[1] // 2]) * gu[:, gu.shape[1] // 2:], wd[c])
            logits = _mm(_rms(x, ln_f, eps), heads[c])
            pen = c < self.n_pen
            tok = sample_token(logits, u[:, 1 + c] if u is not None else None, *self.audio_cfg[:3],
                               self.audio_cfg[3] if pen else 1.0, self.audio_recent[:, c] if pen else None,
                               sort=not self.compiled)
            toks.append(tok)
        new = torch.stack(toks, 1)                                         # [B, 9]: text, 8 speak codes
        # remember the samples for the repetition windows
        self.text_recent[:, (t % self.text_recent.shape[1]).view(1)] = text[:, None]
        self.audio_recent[:, :, (t % self.audio_recent.shape[2]).view(1)] = new[:, 1:1 + self.n_pen, None]
        # sampled tokens go to column t + 1; then read back one whole realigned frame
        self.ring[((t + 1) % self.R).view(1), :, :1 + K] = new[None]
        out = self.ring[(t + 1 - self.max_delay + self.out_delays) % self.R, :, self.out_rows].T   # [B, 9]
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
        u = torch.rand(self.B, 1 + self.K, self.TRIES, generator=self.generator,
                       device=self.ring.device) if self.sampling else None
        h, text = self._backbone(listen, u, None if self.compiled else min(self.t + 1, self.max_len))
        if timings is not None:
            _sync(listen)
            t1 = time.perf_counter()
            timings["backbone"] = timings.get("backbone", 0.0) + t1 - t0
        out = self._depth(h, text, u)
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
    codec = load_codec(codec_path, device=device)
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
# 7. Command line


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
