"""demo/codec.py -- the demo codec: a tiny log-mel + k-means RVQ codec with Mimi's interface (24 kHz audio <->
12.5 Hz x 8 codebooks x 2048 tokens), fitted in seconds on a CPU.

Why it exists: FLM-Audio speaks through Kyutai's Mimi (codec.py), whose weights are not always at
hand; this codec lets the whole pipeline (data.py prepare -> train.py -> chat.py) run as a CPU demo
without them. It is a stand-in, not a replacement: decoded speech is robotic Griffin-Lim audio.

How it works: encoder = log-mel of the 80 ms frame (4 sub-frames x 80 bands, each 40 ms Hann
window ending on a 20 ms grid, so it looks back 20 ms), standardised, then an 8-stage residual VQ
whose 2048-entry codebooks come from k-means (`DemoCodec.fit`). Decoder = RVQ reconstruction ->
mel -> linear magnitude (non-negative least squares) -> streaming Griffin-Lim (each frame refines
only its own samples against fixed, already emitted audio), so the decoded audio lags the input
by 30 ms (DemoCodec.DELAY samples).

How it connects: `DemoCodec` has the same interface as `codec.Mimi` (`encode`, `decode`,
`with codec.streaming(B):`, `reset_streaming`) and shares codec.py's constants and streaming base
classes. Callers get it through `data.load_codec(path)`, which recognises a demo-codec file;
`data.py prepare` fits one when no codec is given, `python data.py fit-codec` fits one from the
command line.
"""
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from codec import (CARDINALITY, FRAME_SIZE, N_CODEBOOKS, SAMPLE_RATE, _read_safetensors, _Streamable,
                   _StreamingCodec)

# ----------------------------------------------------------------------------------------------
# 1. Features (MelAnalysis) and their inverse (GriffinLimSynth)

N_MELS, SUB, WIN, SYN_HOP = 80, 4, 960, 240


def _mel_filterbank(n_mels=N_MELS, n_fft=WIN, sr=SAMPLE_RATE):
    """Slaney-style mel triangles (linear below 1 kHz, log above) over rfft bins: [n_mels, n_fft//2+1]."""
    def to_mel(f):
        f = np.asarray(f, dtype=np.float64)
        return np.where(f < 1000, f / (200 / 3), 15 + np.log(np.maximum(f, 1e-9) / 1000) / (np.log(6.4) / 27))

    def to_hz(m):
        return np.where(m < 15, m * 200 / 3, 1000 * np.exp((m - 15) * np.log(6.4) / 27))
    edges = to_hz(np.linspace(0, to_mel(sr / 2), n_mels + 2))
    bins = np.arange(n_fft // 2 + 1) * sr / n_fft
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    fb = np.maximum(0, np.minimum((bins - lo) / (mid - lo), (hi - bins) / (hi - mid)))
    return torch.tensor(fb, dtype=torch.float32)


class MelAnalysis(_Streamable):
    """wav [B, 1, 1920 F] -> log-mel features [B, F, 4*80]; streaming keeps the 480-sample look-back."""

    def __init__(self):
        super().__init__()
        self.register_buffer("window", torch.hann_window(WIN, periodic=True), persistent=False)
        self.register_buffer("fb", _mel_filterbank(), persistent=False)

    def init_state(self, batch_size):
        self.state = {"tail": None}

    def forward(self, wav):
        B, _, N = wav.shape
        look = WIN - FRAME_SIZE // SUB
        head = wav.new_zeros(B, 1, look) if self.state is None or self.state["tail"] is None \
            else self.state["tail"]
        x = torch.cat([head, wav], -1)[:, 0]
        if self.state is not None:
            self.state["tail"] = x[:, None, -look:]
        frames = x.unfold(-1, WIN, FRAME_SIZE // SUB)                     # [B, 4F, WIN]
        power = torch.fft.rfft(frames * self.window).abs() ** 2
        logmel = torch.log(power @ self.fb.T + 1e-6)                       # [B, 4F, 80]
        return logmel.reshape(B, N // FRAME_SIZE, SUB * N_MELS)


class GriffinLimSynth(_Streamable):
    """log-mel [B, F, 4*80] -> wav [B, 1, 1920 F], frame by frame (the batch path is the same loop).

    Synthesis grid: 960-sample Hann windows every 240 samples (8 per frame; the odd ones are the
    analysis windows, the even ones interpolate neighbouring sub-frames in log space). For frame f
    the segment [f*1920 - 1440, (f+1)*1920) is refined: its first 720 samples are fixed (already
    emitted), the rest is estimated with `iters` Griffin-Lim steps over the 11 windows that
    touch it; samples [f*1920 - 720, (f+1)*1920 - 720) are emitted, the last 720 stay provisional.
    """
    DELAY = WIN - SYN_HOP    # 720 samples = 30 ms

    def __init__(self, iters=24, nnls_iters=12, seed=0):
        super().__init__()
        self.iters, self.nnls_iters, self.seed = iters, nnls_iters, seed
        self.register_buffer("window", torch.hann_window(WIN, periodic=True), persistent=False)
        fb = _mel_filterbank()
        self.register_buffer("fb", fb, persistent=False)
        # starting point of the NNLS solve: each linear bin = weighted mean of the band energies
        # (band energy / band area), which is non-negative and has no pseudo-inverse ringing
        interp = (fb / fb.sum(1, keepdim=True).clamp(min=1e-8)).T
        self.register_buffer("interp", interp / interp.sum(1, keepdim=True).clamp(min=1e-8), persistent=False)
        n_win = 3 + 2 * SUB
        env = torch.zeros(SYN_HOP * (n_win - 1) + WIN)
        for m in range(n_win):
            env[m * SYN_HOP: m * SYN_HOP + WIN] += self.window ** 2
        self.register_buffer("env", env, persistent=False)

    def init_state(self, batch_size):
        g = torch.Generator().manual_seed(self.seed)
        self.state = {"audio": None, "prev_logmel": None, "prev_mag": None, "gen": g}

    def magnitudes(self, logmel):
        """log-mel [..., 80] -> linear magnitudes [..., 481]: NNLS by multiplicative updates."""
        mel = torch.exp(logmel).clamp(min=0)
        spec = mel @ self.interp.T
        target = mel @ self.fb                                   # M^T mel
        for _ in range(self.nnls_iters):
            spec = spec * target / ((spec @ self.fb.T) @ self.fb + 1e-9)
        return spec.sqrt()

    def forward(self, logmel):
        if self.state is None:           # batch = the streaming loop, so both give the same audio
            self.init_state(logmel.shape[0])
            try:
                return torch.cat([self.step(logmel[:, f]) for f in range(logmel.shape[1])], -1)
            finally:
                self.state = None
        return torch.cat([self.step(logmel[:, f]) for f in range(logmel.shape[1])], -1)

    def step(self, feats):
        """One frame of features [B, 320] -> 1920 samples [B, 1, 1920]."""
        st, B = self.state, feats.shape[0]
        sub = feats.view(B, SUB, N_MELS)
        prev = sub[:, :1] if st["prev_logmel"] is None else st["prev_logmel"]
        between = 0.5 * (torch.cat([prev, sub[:, :-1]], 1) + sub)            # even windows
        logmel8 = torch.stack([between, sub], 2).reshape(B, 2 * SUB, N_MELS)
        mag = self.magnitudes(logmel8)                                       # [B, 8, 481]
        prev_mag = mag.new_zeros(B, 3, mag.shape[-1]) if st["prev_mag"] is None else st["prev_mag"]
        target = torch.cat([prev_mag, mag], 1)                               # [B, 11, 481]
        fixed_len, seg_len = 2 * self.DELAY, 2 * self.DELAY + FRAME_SIZE
        if st["audio"] is None:
            st["audio"] = feats.new_zeros(B, 2 * self.DELAY)
        new = 1e-3 * torch.randn(B, FRAME_SIZE, generator=st["gen"]).to(feats.device)
        seg = torch.cat([st["audio"], new], 1)                               # [B, 3360]
        fixed = seg[:, : fixed_len - self.DELAY]
        for _ in range(self.iters):
            spec = torch.fft.rfft(seg.unfold(-1, WIN, SYN_HOP) * self.window)
            spec = target * torch.exp(1j * torch.angle(spec))
            frames = torch.fft.irfft(spec, n=WIN) * self.window
            ola = F.fold(frames.transpose(1, 2), (1, seg_len), (1, WIN), stride=(1, SYN_HOP))[:, 0, 0]
            seg = torch.cat([fixed, (ola / self.env.clamp(min=1e-3))[:, fixed.shape[1]:]], 1)
        st["audio"] = seg[:, -2 * self.DELAY:]
        st["prev_logmel"], st["prev_mag"] = sub[:, -1:], mag[:, -3:]
        return seg[:, fixed.shape[1]: fixed.shape[1] + FRAME_SIZE][:, None]


# ----------------------------------------------------------------------------------------------
# 2. Residual VQ: exact nearest codeword, k-means


def _scores(x, cb, cb_sq):
    """||c||^2 - 2 x.c for x [N, D], cb [K, D]: the squared distance up to the per-row ||x||^2,
    as one GEMM (fast; used by k-means and as the first pass of `_nearest`)."""
    return torch.addmm(cb_sq, x, cb.T, alpha=-2.0)


def _nearest(x, cb, tables=None, chunk=2048):
    """Index of the nearest row of cb [K, D] for every row of x [N, D], the same whatever N is.

    Plain torch.cdist was not: with > 25 rows or columns it uses the GEMM formula
    ||x||^2 - 2 x.c + ||c||^2, whose float32 rounding depends on the GEMM's shape (one frame
    live, thousands in data preparation) and is ~1e-5 for standardised silence (norm ~10), more
    than the gaps between near-identical "silence" centroids, so silent frames flipped codes.
    Here the float32 GEMM scores are trusted only where they prove the answer: the rounding of a
    score is at most 2 gamma_D |x| |c| + a few u (|c|^2 + |x| |c|) (length-D dot product in any
    summation order, ||c||^2 rounded once from float64, the addmm's add), so if the runner-up
    scores more than twice that bound above the best, the best is the true nearest. Other rows
    (rare near-ties) are decided by `_nearest_exact`. `tables` = `_nearest_tables(cb)`, cached
    by the caller."""
    cb_sq, cb64, cb64_sq, c_max = _nearest_tables(cb) if tables is None else tables
    u, out = 2.0 ** -24, []
    for a in range(0, x.shape[0], chunk):
        xa = x[a:a + chunk]
        top, cand = _scores(xa, cb, cb_sq).topk(min(2, cb.shape[0]), 1, largest=False)
        idx = cand[:, 0]
        if cb.shape[0] > 1:
            bound = (2 * cb.shape[1] + 16) * u * xa.norm(dim=1) * c_max + 8 * u * c_max ** 2
            unsure = top[:, 1] <= top[:, 0] + 2 * bound
            if unsure.any():
                idx[unsure] = _nearest_exact(xa[unsure].double(), cb64, cb64_sq, c_max)
        out.append(idx)
    return torch.cat(out) if out else x.new_zeros(0, dtype=torch.long)


def _nearest_tables(cb):
    """What `_nearest` needs besides cb: squared norms (float32, rounded once from float64, and
    float64), the float64 codebook, max |c|. A repeated codeword can never win (ties go to the
    lower index), so its squared norm is +inf: it drops out instead of making every row a tie."""
    cb64 = cb.double()
    sq = cb64.pow(2).sum(1)
    _, inverse = torch.unique(cb64, dim=0, return_inverse=True)
    k = len(inverse)
    first = torch.full((int(inverse.max()) + 1 if k else 0,), k, dtype=torch.long)
    first = first.scatter_reduce(0, inverse, torch.arange(k), "amin")      # first copy of each row
    sq = torch.where(torch.arange(k) == first[inverse], sq, torch.full_like(sq, float("inf")))
    finite = sq[torch.isfinite(sq)]
    return sq.float(), cb64, sq, finite.max().sqrt().item() if len(finite) else 0.0


def _nearest_exact(x64, cb64, cb64_sq, c_max, shortlist=8):
    """Nearest codeword by float64 squared distances computed elementwise (per row, so independent
    of the batch), among a float64-GEMM shortlist, or among all codewords when even the float64
    shortlist cannot be proven to hold the winner. Ties go to the lower index."""
    k = min(shortlist, int(torch.isfinite(cb64_sq).sum()))
    s, cand = (cb64_sq - 2 * x64 @ cb64.T).topk(k, 1, largest=False)
    cand = cand.sort(1).values
    d = (x64[:, None, :] - cb64[cand]).pow(2).sum(-1)
    best, pos = d.min(1)
    idx = cand.gather(1, pos[:, None])[:, 0]
    xn = x64.pow(2).sum(1)
    bound = (2 * cb64.shape[1] + 16) * 2.0 ** -53 * (xn.sqrt() * c_max + c_max ** 2)
    unsure = s[:, -1] - bound <= best - xn
    if k < cb64.shape[0] and unsure.any():
        dup = torch.isinf(cb64_sq)
        idx[unsure] = torch.stack([(r - cb64).pow(2).sum(-1).masked_fill(dup, float("inf")).argmin()
                                   for r in x64[unsure]])
    return idx


def _kmeans(x, k, iters, gen, w=None):
    """Weighted Lloyd k-means on x [N, D] -> k centroids [k, D], distinct in practice.

    Runs on distinct rows weighted by their counts (`w`, or found here): dialog audio is mostly
    digital silence, i.e. thousands of identical frames (identical zero residuals after stage 0).
    Drawn as starting points, they gave hundreds of identical centroids; ties always go to the
    first, so the copies stayed empty and were restarted at random points, again mostly silence.
    Here starts are distinct rows, and an empty cluster restarts at the worst-served row (largest
    distance to its centroid). With fewer distinct rows than k the extra centroids are
    midpoints of random pairs of rows (distinct, smaller steps for the residual quantiser)."""
    if w is None:
        x, w = torch.unique(x, dim=0, return_counts=True)
    w = w.float()
    n = x.shape[0]

    def midpoints(m):
        i = torch.randint(n, (m,), generator=gen)
        j = (i + torch.randint(1, max(n, 2), (m,), generator=gen)) % n      # j != i when n > 1
        return 0.5 * (x[i] + x[j])
    cent = x[torch.randperm(n, generator=gen)[:k]]
    if n < k:
        cent = torch.cat([cent, midpoints(k - n)])
    x_sq = x.pow(2).sum(1)
    for _ in range(iters):
        c_sq = cent.pow(2).sum(1)
        dist, assign = [], []
        for a in range(0, n, 4096):
            d, i = _scores(x[a:a + 4096], cent, c_sq).min(1)
            dist.append(d + x_sq[a:a + 4096]), assign.append(i)
        dist, assign = torch.cat(dist), torch.cat(assign)
        sums = torch.zeros_like(cent).index_add_(0, assign, x * w[:, None])
        counts = torch.zeros(k).index_add_(0, assign, w)
        cent = sums / counts.clamp(min=1e-9)[:, None]
        empty = torch.nonzero(counts == 0)[:, 0]
        if len(empty) and n >= k:
            # each empty cluster takes one of the rows farthest from their centroid
            worst = dist.topk(min(len(empty), n)).indices
            cent[empty[:len(worst)]] = x[worst]
        elif len(empty):
            cent[empty] = midpoints(len(empty))
    return cent


# ----------------------------------------------------------------------------------------------
# 3. The codec: fit, encode, decode, save / load


class DemoCodec(_StreamingCodec, nn.Module):
    """Log-mel + k-means RVQ codec with Mimi's interface (24 kHz, 12.5 Hz x 8 x 2048).
    Decoded audio is delayed by DELAY samples (30 ms) relative to the input."""
    DELAY = GriffinLimSynth.DELAY

    def __init__(self, mean=None, std=None, codebooks=None):
        super().__init__()
        dim = SUB * N_MELS
        self.register_buffer("mean", torch.zeros(dim) if mean is None else mean.float())
        self.register_buffer("std", torch.ones(dim) if std is None else std.float())
        self.register_buffer("codebooks", torch.zeros(N_CODEBOOKS, CARDINALITY, dim)
                             if codebooks is None else codebooks.float())
        self.analysis, self.synth = MelAnalysis(), GriffinLimSynth()
        self.eval()

    @classmethod
    def fit(cls, wavs, iters=8, max_frames=16384, seed=0, progress=False, n_codes=CARDINALITY):
        """Fit on a list of 1-D 24 kHz tensors: feature statistics + 8 stages of k-means with
        `n_codes` centroids each (at most Mimi's 2048; fewer, better-populated codes are easier
        for a small model to learn).

        Each stage is fitted on its own frames (disjoint random pools of the distinct frames: half,
        at most `max_frames`, for stage 0, the other half shared by stages 1-7, at most
        max_frames / 2 each). Fitting every stage on the same frames collapsed the later
        codebooks: with ~4 frames per cluster, stage 0-3 residuals of the training frames shrink
        to ~0 (many exactly 0), so stages 4-7 learnt 1-4 distinct codes that carry nothing on new
        audio. Residuals of frames a stage was not fitted on look like those of new audio."""
        if not wavs:
            raise ValueError("DemoCodec.fit needs at least one waveform")
        feats = []
        with torch.inference_mode():
            for w in wavs:
                w = torch.as_tensor(w, dtype=torch.float32).reshape(-1)
                if w.numel() >= FRAME_SIZE:
                    feats.append(MelAnalysis()(w[: w.numel() // FRAME_SIZE * FRAME_SIZE][None, None])[0])
        if not feats:
            raise ValueError(f"DemoCodec.fit: no waveform is at least one frame ({FRAME_SIZE} samples) long")
        x = torch.cat(feats)
        gen = torch.Generator().manual_seed(seed)
        mean, std = x.mean(0), x.std(0).clamp(min=1e-3) if x.shape[0] > 1 else torch.ones(x.shape[1])
        # distinct frames with their counts (silence is most of a dialog channel), shuffled
        x, w = torch.unique((x - mean) / std, dim=0, return_counts=True)
        perm = torch.randperm(x.shape[0], generator=gen)
        x, w = x[perm], w[perm]
        n0 = min(max(1, x.shape[0] // 2), max_frames)
        rest = slice(n0, None) if x.shape[0] > n0 else slice(None)     # one distinct frame: reuse it
        xr, wr = x[rest], w[rest]
        per = max(1, min(xr.shape[0] // (N_CODEBOOKS - 1), max_frames // 2))
        pools = [(x[:n0], w[:n0])] + [(xr[i * per:(i + 1) * per], wr[i * per:(i + 1) * per])
                                      if xr.shape[0] >= (i + 1) * per else (xr[-per:], wr[-per:])
                                      for i in range(N_CODEBOOKS - 1)]
        books = []
        stages = range(N_CODEBOOKS)
        if progress:
            from tqdm import tqdm
            stages = tqdm(stages, desc=f"k-means ({n0} + {N_CODEBOOKS - 1} x {per} distinct frames)")
        for s in stages:
            res, ws = pools[s]
            for cb in books:                               # this pool's residual after stages < s
                res = res - cb[_nearest(res, cb)]
            books.append(_kmeans(res, n_codes, iters, gen, ws))
        return cls(mean, std, torch.stack(books))

    @property
    def cardinality(self):          # codes per codebook (Mimi's 2048 or fewer)
        return self.codebooks.shape[1]

    def _tables(self):
        """`_nearest_tables` of each codebook, cached until the codebooks change."""
        cb = self.codebooks
        key = (cb.data_ptr(), cb._version, cb.device)
        if getattr(self, "_tables_key", None) != key:
            self._tables_cache, self._tables_key = [_nearest_tables(c) for c in cb], key
        return self._tables_cache

    def _quantize(self, z):
        B, T, D = z.shape
        # each distinct frame once: dialog channels are mostly digital silence, whose identical
        # frames sit next to quiet-noise centroids and so take `_nearest`'s slow exact path
        z = ((z - self.mean) / self.std).reshape(B * T, D)
        res, inverse = torch.unique(z, dim=0, return_inverse=True)
        codes = []
        for cb, tables in zip(self.codebooks, self._tables()):
            codes.append(_nearest(res, cb, tables))
            res = res - cb[codes[-1]]
        return torch.stack(codes, 1)[inverse].view(B, T, -1).transpose(1, 2)

    def dequantize(self, codes):
        """codes [B, 8, F] -> standardised feature vectors [B, F, 320] (sum of the 8 centroids)."""
        return sum(F.embedding(codes[:, i], self.codebooks[i]) for i in range(N_CODEBOOKS))

    @torch.inference_mode()
    def encode(self, wav):
        return self._quantize(self.analysis(self._check_wav(wav)))

    @torch.inference_mode()
    def decode(self, codes):
        feats = self.dequantize(self._check_codes(codes)) * self.std + self.mean
        return self.synth(feats)

    def save(self, path):
        from safetensors.torch import save_file
        path, tmp = Path(path), Path(path).with_name(Path(path).name + ".tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"demo_codec.mean": self.mean.contiguous(), "demo_codec.std": self.std.contiguous(),
                   "demo_codec.codebooks": self.codebooks.contiguous()}, str(tmp),
                  metadata={"format": "flm-demo-codec", "config": json.dumps(
                      {"n_mels": N_MELS, "sub_frames": SUB, "window": WIN, "sample_rate": SAMPLE_RATE})})
        os.replace(tmp, path)       # whole or not at all: a crash mid-write leaves no truncated codec

    @classmethod
    def load(cls, path):
        sd = _read_safetensors(path)
        names = ("demo_codec.mean", "demo_codec.std", "demo_codec.codebooks")
        if any(n not in sd for n in names):
            raise ValueError(f"{path}: not a demo-codec file (needs tensors {', '.join(names)})")
        dim = SUB * N_MELS
        books = sd[names[2]].shape
        if len(books) != 3 or books[0] != N_CODEBOOKS or not 0 < books[1] <= CARDINALITY or books[2] != dim \
                or sd[names[0]].shape != (dim,):
            raise ValueError(f"{path}: demo-codec tensors have shapes {tuple(books)}, "
                             f"expected ({N_CODEBOOKS}, <= {CARDINALITY}, {dim})")
        return cls(sd[names[0]], sd[names[1]], sd[names[2]])
