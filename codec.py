"""codec.py -- Kyutai's Mimi codec: 24 kHz waveform <-> 12.5 Hz x 8 codebooks x 2048 tokens.

FLM-Audio listens and speaks through Mimi. In the order audio flows:
  1. audio I/O (`read_audio`, `write_audio`) and a band-limited resampler (`resample`);
  2. `Mimi`: the released codec written out compactly, numerically the model of the `moshi`
     package (SEANet conv encoder -> causal transformer -> stride-2 conv -> split RVQ, and the
     mirror image to decode), batch and frame-by-frame streaming (`with mimi.streaming(B):`);
  3. reading weight files (`Mimi.from_pretrained` takes Kyutai's file as released).
demo/codec.py holds a small stand-in codec with the same interface for the CPU demo;
data.load_codec picks the right one for a file.
"""
import contextlib
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

SAMPLE_RATE = 24000
FRAME_SIZE = 1920          # samples per 80 ms frame
FRAME_RATE = 12.5
N_CODEBOOKS = 8
CARDINALITY = 2048

# ----------------------------------------------------------------------------------------------
# 1. Audio I/O and resampling


def _kaiser_sinc_filters(up, down, zeros=24, beta=12.0):
    """Polyphase windowed-sinc filter bank for rational resampling by up/down.

    Output sample j sits at input time t = j * down / up. Its value is sum_n x[n] h(t - n) with
    h a sinc low-passed at min(1, up/down) of the input Nyquist, Kaiser-windowed over +-`zeros`
    zero crossings. Because t - floor(t) only takes `up` distinct values, `up` filters suffice.
    """
    cutoff = min(1.0, up / down) * 0.97        # a little below Nyquist to leave a transition band
    half = math.ceil(zeros / cutoff)           # taps on each side, in input samples
    phases = torch.arange(up, dtype=torch.float64) * down % up / up         # frac(t) per phase
    taps = torch.arange(-half + 1, half + 1, dtype=torch.float64)           # n - floor(t)
    dist = phases[:, None] - taps[None, :]                                  # t - n
    window = torch.special.i0(beta * torch.sqrt((1 - (dist / (half + 1)) ** 2).clamp(min=0))) / float(np.i0(beta))
    filt = cutoff * torch.sinc(cutoff * dist) * window
    return filt.float(), half


def resample(wav, sr_in, sr_out):
    """Band-limited resampling of `wav` [..., N] from sr_in to sr_out Hz (windowed-sinc polyphase).

    All `up` phases run as one strided conv1d: phase p's filter is shifted inside a longer kernel
    by its own input offset, so every output channel reads the same input stride `down`."""
    wav = torch.as_tensor(wav, dtype=torch.float32)
    if sr_in == sr_out:
        return wav
    g = math.gcd(int(sr_in), int(sr_out))
    up, down = int(sr_out) // g, int(sr_in) // g
    filt, half = _kaiser_sinc_filters(up, down)
    shifts = [(p * down) // up for p in range(up)]          # floor(t) of output p, in input samples
    kernel = torch.zeros(up, 1, 2 * half + down)
    for p, s in enumerate(shifts):
        kernel[p, 0, s: s + 2 * half] = filt[p]
    shape, n = wav.shape[:-1], wav.shape[-1]
    n_out = math.ceil(n * up / down)
    n_blocks = math.ceil(n_out / up)
    # padded index i holds x[i - half]; output (k, p) starts reading at k*down + shift_p + 1
    right = max(0, (n_blocks - 1) * down + kernel.shape[-1] + 1 - (n + half))
    x = F.pad(wav.reshape(-1, 1, n), (half, right))[..., 1:]
    y = F.conv1d(x, kernel, stride=down)[..., :n_blocks]    # [rows, up, n_blocks]
    y = y.transpose(1, 2).reshape(x.shape[0], -1)[:, :n_out]
    return y.reshape(*shape, n_out)


def read_audio(path, sample_rate=SAMPLE_RATE):
    """Read any soundfile-readable audio file -> float32 tensor [channels, N] at `sample_rate`."""
    import soundfile as sf
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: audio file not found")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises several types for corrupt files
        raise ValueError(f"{path}: cannot decode audio ({str(e).splitlines()[0]})") from None
    if data.shape[0] == 0:
        raise ValueError(f"{path}: audio file is empty (0 samples)")
    wav = torch.from_numpy(np.ascontiguousarray(data.T))
    if not torch.isfinite(wav).all():
        raise ValueError(f"{path}: audio contains NaN or infinite samples")
    return resample(wav, sr, sample_rate)


def write_audio(path, wav, sample_rate=SAMPLE_RATE):
    """Write `wav` [C, N] or [N] (float, nominal range [-1, 1]) as a 16-bit PCM wav file."""
    import soundfile as sf
    wav = torch.as_tensor(wav).detach().float().cpu()
    wav = wav[None] if wav.dim() == 1 else wav
    if wav.dim() != 2 or wav.shape[-1] == 0:
        raise ValueError(f"{path}: expected audio of shape [channels, N] or [N], got {tuple(wav.shape)}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), wav.clamp(-1, 1).T.numpy(), int(sample_rate), subtype="PCM_16")


# ----------------------------------------------------------------------------------------------
# 2. Mimi. Every layer is causal, so streaming is just "remember the tail of your input":
# each conv keeps its last (kernel - stride) input samples, each attention its last 250 keys.


class _Streamable(nn.Module):
    """Base for layers with streaming state; `state` is None outside `codec.streaming(...)`."""
    state = None

    def init_state(self, batch_size):
        self.state = None


class CausalConv(_Streamable):
    """Conv1d left-padded so output t sees inputs <= t*stride. Padding is zeros, or a copy of the
    first sample (`replicate`, used by the 25 -> 12.5 Hz downsampler)."""

    def __init__(self, cin, cout, kernel, stride=1, bias=True, replicate=False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cout, cin, kernel))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.stride, self.replicate = stride, replicate
        self.pad = kernel - stride

    def init_state(self, batch_size):
        self.state = {"tail": None}

    def forward(self, x):
        if self.pad:
            if self.state is None or self.state["tail"] is None:
                if self.replicate:
                    head = x[..., :1].expand(-1, -1, self.pad)
                else:
                    head = x.new_zeros(x.shape[0], x.shape[1], self.pad)
            else:
                head = self.state["tail"]
            x = torch.cat([head, x], dim=-1)
            if self.state is not None:
                self.state["tail"] = x[..., -self.pad:]
        return _conv(x, self.weight, self.bias, self.stride)


def _conv(x, w, b, stride=1, groups=1):
    """conv1d; for the few output steps of a streaming call, as one matmul over the unfolded input:
    these layers are weight-bandwidth bound, and the generic CPU conv kernel is several times
    slower than a plain GEMM at T = 1..16 (weight as the left operand is the fastest layout)."""
    cout, cin_g, k = w.shape
    t_out = (x.shape[-1] - k) // stride + 1
    if groups > 1 or t_out > 16:
        return F.conv1d(x, w, b, stride, groups=groups)
    B = x.shape[0]
    cols = x.unfold(-1, k, stride).transpose(1, 2).reshape(B * t_out, cin_g * k).t()
    w = w.view(cout, cin_g * k)
    y = torch.mm(w, cols) if b is None else torch.addmm(b[:, None], w, cols)
    return y.view(cout, B, t_out).transpose(0, 1)


class CausalConvTranspose(_Streamable):
    """ConvTranspose1d with kernel = 2 * stride, right-trimmed to be causal (Mimi's upsamplers).

    Output block j (`stride` samples) = W[..., :S]^T x[j] + W[..., S:]^T x[j-1] + b, i.e. a causal
    kernel-2 convolution over the input that emits S samples per channel: computed that way it is
    one matmul and its streaming state is just the previous input column.
    """

    def __init__(self, cin, cout, stride, groups=1, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cin, cout // groups, 2 * stride))  # official layout
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.stride, self.groups, self.cout = stride, groups, cout
        self._cache = (None, None)

    def _conv_weight(self):
        # rebuild the equivalent conv weight whenever the parameter changed (e.g. after loading)
        key = (self.weight._version, self.weight.data_ptr())
        if self._cache[0] != key:
            G, S = self.groups, self.stride
            cin_g, cout_g = self.weight.shape[0] // G, self.weight.shape[1]
            w = self.weight.detach().view(G, cin_g, cout_g, 2, S)         # [.., prev/cur half, k]
            w = w.permute(0, 2, 4, 1, 3).flip(-1)                          # [G, cout_g, S, cin_g, 2]
            b = None if self.bias is None else self.bias.detach().repeat_interleave(S)
            self._cache = (key, (w.reshape(G * cout_g * S, cin_g, 2).contiguous(), b))
        return self._cache[1]

    def init_state(self, batch_size):
        self.state = {"tail": None}

    def forward(self, x):
        w, b = self._conv_weight()
        B, _, T = x.shape
        head = x.new_zeros(B, x.shape[1], 1) if self.state is None or self.state["tail"] is None \
            else self.state["tail"]
        x = torch.cat([head, x], dim=-1)
        if self.state is not None:
            self.state["tail"] = x[..., -1:]
        y = _conv(x, w, b, groups=self.groups)                             # [B, cout*S, T]
        return y.view(B, self.cout, self.stride, T).transpose(2, 3).reshape(B, self.cout, T * self.stride)


class ResBlock(nn.Module):
    """x + conv1x1(elu(conv3(elu(x)))), hidden width dim/2 (SEANet residual unit, true skip)."""

    def __init__(self, dim):
        super().__init__()
        self.conv1 = CausalConv(dim, dim // 2, 3)
        self.conv2 = CausalConv(dim // 2, dim, 1)

    def forward(self, x):
        return x + self.conv2(F.elu(self.conv1(F.elu(x))))


class SEANetEncoder(nn.Module):
    """1 -> 64 channels, then per stride r in (4, 5, 6, 8): ResBlock, ELU, conv(k=2r, stride r)
    doubling the width; then ELU, conv 1024 -> 512. Hop 960 samples: 24 kHz -> 25 Hz."""

    def __init__(self, ratios=(4, 5, 6, 8), n_filters=64, dim=512):
        super().__init__()
        self.stem = CausalConv(1, n_filters, 7)
        self.stages = nn.ModuleList()
        ch = n_filters
        for r in ratios:
            stage = nn.Module()
            stage.res, stage.resample = ResBlock(ch), CausalConv(ch, 2 * ch, 2 * r, stride=r)
            self.stages.append(stage)
            ch *= 2
        self.final = CausalConv(ch, dim, 3)

    def forward(self, x):
        x = self.stem(x)
        for s in self.stages:
            x = s.resample(F.elu(s.res(x)))
        return self.final(F.elu(x))


class SEANetDecoder(nn.Module):
    """Mirror of the encoder: conv 512 -> 1024, per stride r in (8, 6, 5, 4): ELU, transposed conv
    halving the width, ResBlock; then ELU, conv 64 -> 1."""

    def __init__(self, ratios=(8, 6, 5, 4), n_filters=64, dim=512):
        super().__init__()
        ch = n_filters * 2 ** len(ratios)
        self.stem = CausalConv(dim, ch, 7)
        self.stages = nn.ModuleList()
        for r in ratios:
            stage = nn.Module()
            stage.resample, stage.res = CausalConvTranspose(ch, ch // 2, r), ResBlock(ch // 2)
            self.stages.append(stage)
            ch //= 2
        self.final = CausalConv(ch, 1, 3)

    def forward(self, x):
        x = self.stem(x)
        for s in self.stages:
            x = s.res(s.resample(F.elu(x)))
        return self.final(F.elu(x))


def linear(x, w):
    """x [..., in] @ w[out, in]^T. For the few rows of a streaming step it is computed as
    (w @ x^T)^T with x row-major: MKL runs that layout 2-3x faster than F.linear's."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] > 16:
        return F.linear(x, w)
    y = torch.mm(w, rows.contiguous().t()).t().contiguous()
    return y.view(*x.shape[:-1], w.shape[0])


def rope_tables(pos0, T, D, device=None, max_period=10000.0):
    """cos, sin [T, 1, 1, D/2] of the rotary angles for positions pos0 .. pos0+T-1 (float32),
    shaped to broadcast over [B, T, q/k, heads, D/2]."""
    freqs = torch.exp(torch.arange(D // 2, dtype=torch.float32, device=device) * (-math.log(max_period) * 2 / D))
    angle = (pos0 + torch.arange(T, dtype=torch.float32, device=device))[:, None] * freqs
    return torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]


def rope(x, cos, sin):
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B, T, ..., D] by the angles of its step."""
    xr, xi = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([xr * cos - xi * sin, xr * sin + xi * cos], dim=-1).flatten(-2)


class Attention(_Streamable):
    """Causal multi-head self-attention with RoPE; each query sees the last `context` steps.

    Streaming keeps a ring buffer of the last `context` keys/values (as the moshi package does: the
    buffer holds exactly `context` entries including the new ones); the slots written this call and
    the mask come from the parent Transformer, shared by all layers."""

    def __init__(self, dim=512, heads=8, context=250):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.heads, self.context = heads, context

    def init_state(self, batch_size):
        self.state = {"k": None, "v": None}

    def forward(self, x, step):
        B, T, C = x.shape
        D = C // self.heads
        qkv = linear(x, self.qkv.weight).view(B, T, 3, self.heads, D)
        qk = rope(qkv[:, :, :2], step["cos"], step["sin"])
        q, k, v = qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
        if self.state is None:
            y = self._attend_chunked(q, k, v, step["qpos"])
        else:
            st = self.state
            if st["k"] is None:
                st["k"], st["v"] = (x.new_zeros(B, self.heads, self.context, D) for _ in range(2))
            st["k"].index_copy_(2, step["slots"], k)
            st["v"].index_copy_(2, step["slots"], v)
            # T queries against <= 250 keys: plain softmax attention beats the fused kernel's overhead
            scores = torch.matmul(q, st["k"].transpose(-1, -2)) * D ** -0.5
            y = torch.matmul(scores.masked_fill_(step["blocked"], float("-inf")).softmax(-1), st["v"])
        return linear(y.transpose(1, 2).reshape(B, T, C), self.out.weight)

    def _attend(self, q, k, v, qpos, kpos):
        delta = qpos[:, None] - kpos[None, :]
        mask = (delta >= 0) & (delta < self.context)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def _attend_chunked(self, q, k, v, qpos, chunk=256):
        # batch mode over long inputs: a query block only needs the previous `context` keys
        T = q.shape[2]
        outs = []
        for a in range(0, T, chunk):
            b, a0 = min(T, a + chunk), max(0, a - self.context + 1)
            outs.append(self._attend(q[:, :, a:b], k[:, :, a0:b], v[:, :, a0:b], qpos[a:b], qpos[a0:b]))
        return torch.cat(outs, dim=2)


class TransformerLayer(nn.Module):
    """Pre-norm block: x += s1 * attn(LN(x)); x += s2 * W2 gelu(W1 LN(x)) (s = layer scales)."""

    def __init__(self, dim=512, heads=8, ff=2048, context=250):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-5), nn.LayerNorm(dim, eps=1e-5)
        self.attn = Attention(dim, heads, context)
        self.ff1, self.ff2 = nn.Linear(dim, ff, bias=False), nn.Linear(ff, dim, bias=False)
        self.scale1, self.scale2 = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.ones(dim))

    def forward(self, x, step):
        x = torch.addcmul(x, self.scale1, self.attn(self.norm1(x), step))
        h = linear(F.gelu(linear(self.norm2(x), self.ff1.weight)), self.ff2.weight)
        return torch.addcmul(x, self.scale2, h)


class Transformer(_Streamable):
    """8 causal layers on [B, C, T] latents (conv layout in and out); tracks the stream position
    and, when streaming, the positions held by the layers' key/value ring buffers."""

    def __init__(self, dim=512, layers=8, heads=8, ff=2048, context=250):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(dim, heads, ff, context) for _ in range(layers))
        self.heads, self.context = heads, context

    def init_state(self, batch_size):
        self.state = {"pos": 0, "kpos": torch.full((self.context,), -1, dtype=torch.long)}

    def forward(self, x):
        B, C, T = x.shape
        pos0 = 0 if self.state is None else self.state["pos"]
        qpos = pos0 + torch.arange(T, device=x.device)
        cos, sin = rope_tables(pos0, T, C // self.heads, x.device)
        step = {"cos": cos, "sin": sin, "qpos": qpos}
        if self.state is not None:
            if T > self.context:
                raise ValueError(f"streaming chunks may hold at most {self.context // 2} frames")
            slots = qpos % self.context
            kpos = self.state["kpos"] = self.state["kpos"].to(x.device).index_copy_(0, slots, qpos)
            delta = qpos[:, None] - kpos[None, :]
            step["slots"] = slots
            step["blocked"] = (kpos[None, :] < 0) | (delta < 0) | (delta >= self.context)
            self.state["pos"] += T
        x = x.transpose(1, 2)
        for layer in self.layers:
            x = layer(x, step)
        return x.transpose(1, 2)


class SplitRVQ(nn.Module):
    """1 semantic codebook + 7 acoustic residual codebooks (2048 x 256 each), each group with its
    own 1x1 input/output projections 512 <-> 256. Codebook = embedding_sum / cluster_usage."""

    def __init__(self, dim=512, cb_dim=256, bins=CARDINALITY, n_q=N_CODEBOOKS):
        super().__init__()
        self.sem_in, self.sem_out = nn.Linear(dim, cb_dim, bias=False), nn.Linear(cb_dim, dim, bias=False)
        self.ac_in, self.ac_out = nn.Linear(dim, cb_dim, bias=False), nn.Linear(cb_dim, dim, bias=False)
        for i in range(n_q):
            self.register_buffer(f"embedding_sum_{i}", torch.zeros(bins, cb_dim))
            self.register_buffer(f"cluster_usage_{i}", torch.ones(bins))
        self.n_q = n_q

    def _tables(self):
        # codebooks (and their augmented forms for the distance matmul) are cached until a buffer
        # changes, e.g. when weights are loaded
        key = tuple(b._version for b in self.buffers()) + tuple(b.data_ptr() for b in self.buffers())
        if getattr(self, "_cache_key", None) != key:
            cbs = [getattr(self, f"embedding_sum_{i}") / getattr(self, f"cluster_usage_{i}").clamp(min=1e-5)[:, None]
                   for i in range(self.n_q)]
            # ||x - e||^2 = [-2x, |x|^2, 1] . [e, 1, |e|^2]: one matmul, the same one torch.cdist does
            aug = [torch.cat([c, torch.ones_like(c[:, :1]), c.pow(2).sum(-1, keepdim=True)], -1) for c in cbs]
            self._cache_key, self._cache = key, (cbs, aug)
        return self._cache

    def codebook(self, i):
        return self._tables()[0][i]

    def _nearest(self, x, i):
        xa = torch.cat([-2 * x, x.pow(2).sum(-1, keepdim=True), torch.ones_like(x[:, :1])], -1)
        d2 = torch.matmul(xa[None], self._tables()[1][i].mT[None])[0]
        return d2.clamp_min(0).sqrt().argmin(-1)

    def encode(self, x):
        """x [B, 512, T] -> codes [B, 8, T]."""
        B, _, T = x.shape
        x = x.transpose(1, 2).reshape(B * T, -1)
        codes = [self._nearest(linear(x, self.sem_in.weight), 0)]
        res = linear(x, self.ac_in.weight)
        for i in range(1, self.n_q):
            cb = self.codebook(i)
            codes.append(self._nearest(res, i))
            res = res - cb[codes[-1]]
        return torch.stack(codes, 1).view(B, T, -1).transpose(1, 2)

    def decode(self, codes):
        """codes [B, 8, T] -> latents [B, 512, T]."""
        sem = self.sem_out(F.embedding(codes[:, 0], self.codebook(0)))
        ac = sum(F.embedding(codes[:, i], self.codebook(i)) for i in range(1, self.n_q))
        return (sem + self.ac_out(ac)).transpose(1, 2)


class _StreamingCodec:
    """`with codec.streaming(batch_size):` state handling shared by Mimi and DemoCodec."""

    _stream_batch = None            # the batch size while streaming, else None

    @contextlib.contextmanager
    def streaming(self, batch_size=1):
        self._stream_batch = batch_size
        self.reset_streaming()
        try:
            yield self
        finally:
            for m in self.modules():
                if isinstance(m, _Streamable):
                    m.state = None
            self._stream_batch = None

    def reset_streaming(self):
        """Forget all history: the next frame starts a new conversation."""
        if not self.is_streaming:
            raise RuntimeError("reset_streaming() is only valid inside `with codec.streaming(batch_size):`")
        for m in self.modules():
            if isinstance(m, _Streamable):
                m.init_state(self._stream_batch)

    is_streaming = property(lambda self: self._stream_batch is not None)

    def _check_wav(self, wav):
        if wav.dim() != 3 or wav.shape[1] != 1:
            raise ValueError(f"encode expects mono audio [B, 1, N], got shape {tuple(wav.shape)}")
        if self.is_streaming and (wav.shape[-1] == 0 or wav.shape[-1] % FRAME_SIZE):
            raise ValueError(f"streaming encode takes a positive multiple of {FRAME_SIZE} samples, got {wav.shape[-1]}")
        return wav[..., : wav.shape[-1] // FRAME_SIZE * FRAME_SIZE].float()

    def _check_codes(self, codes):
        if codes.dim() != 3 or codes.shape[1] != N_CODEBOOKS:
            raise ValueError(f"decode expects codes [B, {N_CODEBOOKS}, F], got shape {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.cardinality):
            raise ValueError(f"codes must lie in [0, {self.cardinality}), got [{codes.min()}, {codes.max()}]")
        return codes.long()


def _in_chunks(module, x, step):
    """Batch-run a conv stack over a long input in pieces, carrying the streaming conv state
    between them: the same result as one call, with memory bounded by `step` (SEANet's first
    layers hold 64 channels at 24 kHz, 6 MB per second of audio)."""
    layers = [m for m in module.modules() if isinstance(m, _Streamable)]
    if x.shape[-1] <= step or any(m.state is not None for m in layers):
        return module(x)
    for m in layers:
        m.init_state(x.shape[0])
    try:
        return torch.cat([module(x[..., a:a + step]) for a in range(0, x.shape[-1], step)], -1)
    finally:
        for m in layers:
            m.state = None


class Mimi(_StreamingCodec, nn.Module):
    """Kyutai's Mimi (the released configuration). encode: [B, 1, N] -> [B, 8, N // 1920] codes;
    decode: [B, 8, F] -> [B, 1, F * 1920]. A trailing partial frame is dropped by encode."""
    cardinality = CARDINALITY       # codes per codebook

    def __init__(self, dim=512, context=250):
        super().__init__()
        self.encoder, self.decoder = SEANetEncoder(dim=dim), SEANetDecoder(dim=dim)
        self.encoder_transformer = Transformer(dim, context=context)
        self.decoder_transformer = Transformer(dim, context=context)
        self.downsample = CausalConv(dim, dim, 4, stride=2, bias=False, replicate=True)  # 25 -> 12.5 Hz
        self.upsample = CausalConvTranspose(dim, dim, 2, groups=dim, bias=False)         # depthwise
        self.quantizer = SplitRVQ(dim)
        self.eval().requires_grad_(False)

    @torch.inference_mode()
    def encode(self, wav):
        wav = self._check_wav(wav)
        z = self.downsample(self.encoder_transformer(_in_chunks(self.encoder, wav, 16 * FRAME_SIZE)))
        return self.quantizer.encode(z)

    @torch.inference_mode()
    def decode(self, codes):
        z = self.decoder_transformer(self.upsample(self.quantizer.decode(self._check_codes(codes))))
        return _in_chunks(self.decoder, z, 32)

    # -- loading Kyutai's checkpoint ---------------------------------------------------------
    @staticmethod
    def official_names(n_q=N_CODEBOOKS):
        """{official state-dict name: our name} for every tensor Mimi uses."""
        m = {}

        def conv(official, ours, kind="conv.conv", bias=True):
            m[f"{official}.{kind}.weight"] = f"{ours}.weight"
            if bias:
                m[f"{official}.{kind}.bias"] = f"{ours}.bias"
        for side in ("encoder", "decoder"):
            conv(f"{side}.model.0", f"{side}.stem")
            for i in range(4):
                res = 1 + 3 * i if side == "encoder" else 3 + 3 * i
                conv(f"{side}.model.{res}.block.1", f"{side}.stages.{i}.res.conv1")
                conv(f"{side}.model.{res}.block.3", f"{side}.stages.{i}.res.conv2")
                if side == "encoder":
                    conv(f"encoder.model.{res + 2}", f"encoder.stages.{i}.resample")
                else:
                    conv(f"decoder.model.{res - 1}", f"decoder.stages.{i}.resample", "convtr.convtr")
            conv(f"{side}.model.14", f"{side}.final")
            for layer in range(8):
                o, u = f"{side}_transformer.transformer.layers.{layer}.", f"{side}_transformer.layers.{layer}."
                for a, b in [("self_attn.in_projs.0", "attn.qkv"), ("self_attn.out_projs.0", "attn.out"),
                             ("linear1", "ff1"), ("linear2", "ff2")]:
                    m[o + a + ".weight"] = u + b + ".weight"
                for n in ("norm1", "norm2"):
                    m[o + n + ".weight"], m[o + n + ".bias"] = u + n + ".weight", u + n + ".bias"
                m[o + "layer_scale_1.scale"], m[o + "layer_scale_2.scale"] = u + "scale1", u + "scale2"
        conv("downsample.conv", "downsample", bias=False)
        conv("upsample.convtr", "upsample", "convtr.convtr", bias=False)
        for group, ours in (("rvq_first", "sem"), ("rvq_rest", "ac")):
            m[f"quantizer.{group}.input_proj.weight"] = f"quantizer.{ours}_in.weight"
            m[f"quantizer.{group}.output_proj.weight"] = f"quantizer.{ours}_out.weight"
        for i in range(n_q):
            o = "quantizer.rvq_first.vq.layers.0" if i == 0 else f"quantizer.rvq_rest.vq.layers.{i - 1}"
            m[f"{o}._codebook.embedding_sum"] = f"quantizer.embedding_sum_{i}"
            m[f"{o}._codebook.cluster_usage"] = f"quantizer.cluster_usage_{i}"
        return m

    @classmethod
    def from_pretrained(cls, path, device="cpu"):
        """Load Kyutai's Mimi safetensors file (official names, e.g.
        tokenizer-e351c8d8-checkpoint125.safetensors). Missing or misshapen tensors raise ValueError."""
        path = Path(path)
        sd = _read_safetensors(path)
        model = cls()
        ours = dict(model.named_parameters()) | dict(model.named_buffers())
        missing, bad = [], []
        for official, name in cls.official_names().items():
            if official not in sd:
                missing.append(official)
                continue
            t, target = sd[official], ours[name]
            if t.dim() == 3 and target.dim() == 2 and t.shape[-1] == 1:   # 1x1 conv -> linear
                t = t[..., 0]
            if t.shape != target.shape:
                bad.append(f"{official} {tuple(t.shape)} (expected {tuple(target.shape)})")
                continue
            target.data.copy_(t)
        if missing or bad:
            what = (f"{len(missing)} missing tensors (e.g. {missing[:3]})" if missing else "") + \
                   ("; " if missing and bad else "") + (f"misshapen: {bad[:3]}" if bad else "")
            raise ValueError(f"{path}: not a Mimi checkpoint: {what}")
        return model.to(device)


# ----------------------------------------------------------------------------------------------
# 3. Reading weight files

OFFICIAL_MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"   # its name in the FLM-Audio release


def _read_safetensors(path):
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: codec file not found")
    try:
        return load_file(str(path))
    except Exception as e:
        raise ValueError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
