"""kernels.py — the two hot loops of FLM-Audio inference, fused, each next to a plain reference.

1. Attention (used by model.py for the backbone and DepthGPT):
   - `attention(q, k, v, causal=True)`: prefill / training. Flash-style: keys are visited tile by
     tile with an online softmax, so the [Tq, Tk] score matrix never exists in full; causal tiles
     that are entirely masked are skipped. Queries are aligned to the END of the keys (query i sits
     at key position Tk - Tq + i), which is what a chunked prefill on top of a KV cache needs.
   - `decode_attention(q, k_cache, v_cache, cache_len)`: one query per head against a static,
     preallocated KV cache of which only the first `cache_len` slots are valid. `cache_len` is a
     LongTensor, so the step never reads a device value on the host (no sync) and has the same
     shapes at every step: torch.compile / CUDA graphs can capture it.
   GQA (Hq = G * Hkv) is handled by folding the G query heads of one kv head into the row axis
   ([B, Hkv, G*Tq, D]): K and V are read once per kv head, never repeated in memory.
   On CPU the plain-PyTorch versions below run compiled by `torch.compile`; on CUDA, with Triton
   installed, a hand-written Triton kernel (same algorithm) runs instead.

2. Sampling (used by chat.py): `sample(logits, temperature, top_k, top_p, repetition_penalty,
   recent)` does repetition penalty, temperature, top-p or top-k filtering and a Gumbel-max draw
   for a batch of rows without a full-vocabulary sort and without host sync.

`attention_reference`, `sample_reference` are the plain textbook methods the tests compare to.
"""
import math
import os
import warnings

import torch
import torch.nn.functional as F

try:  # Triton is optional: only used for CUDA tensors.
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

# torch.compile on/off (FLM_KERNELS_COMPILE=0 runs the same code eagerly, e.g. for debugging).
COMPILE = os.environ.get("FLM_KERNELS_COMPILE", "1") != "0"
BLOCK_Q = 128  # query rows per tile (prefill; 128 measured fastest on CPU for head dims 16..128)
BLOCK_K = 128  # keys per tile (prefill)
MAX_TILES = 16  # per axis: tiles grow beyond 128 for long inputs so the unrolled graph stays small
# CPU decode with a cache smaller than this (elements of k_cache) calls SDPA with the same mask:
# there the step is call overhead, not memory traffic, and one aten call wins (bench.py, tiny layout)
SDPA_DECODE_MAX = 1 << 18


# ----------------------------------------------------------------------------------------------
# Attention: the reference (plain math, materialises everything)

def _check_attention(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"kernels.attention: q, k, v must be [B, H, T, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"kernels.attention: shapes do not match: q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"kernels.attention: {q.shape[1]} query heads is not a multiple of "
                         f"{k.shape[1]} kv heads")


def attention_reference(q, k, v, causal=True):
    """softmax(q k^T / sqrt(D) + mask) v in float32 with K/V repeated per query head."""
    _check_attention(q, k, v)
    G = q.shape[1] // k.shape[1]
    Tq, Tk = q.shape[2], k.shape[2]
    kf = k.float().repeat_interleave(G, dim=1)
    vf = v.float().repeat_interleave(G, dim=1)
    s = q.float() @ kf.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:  # query i sits at key position Tk - Tq + i
        qpos = torch.arange(Tq, device=q.device)[:, None] + (Tk - Tq)
        s = s.masked_fill(torch.arange(Tk, device=q.device)[None, :] > qpos, float("-inf"))
    return (s.softmax(-1) @ vf).to(q.dtype)


# ----------------------------------------------------------------------------------------------
# Attention: flash-style tiled prefill in plain PyTorch (the code torch.compile fuses on CPU)

def attention_tiled(q, k, v, causal=True, block_q=None, block_k=None):
    """Tiled attention with online softmax. Python loops over tiles are unrolled by torch.compile;
    tile bounds are Python ints, so a causal tile above the diagonal is skipped at trace time."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    block_q = block_q or max(BLOCK_Q, -(-Tq // MAX_TILES))
    block_k = block_k or max(BLOCK_K, -(-Tk // MAX_TILES))
    G = Hq // Hkv
    off = Tk - Tq
    scale = 1.0 / math.sqrt(D)
    qg = q.view(B, Hkv, G, Tq, D)
    tiles = []
    for t0 in range(0, Tq, block_q):
        t1 = min(t0 + block_q, Tq)
        n = t1 - t0
        # the G heads sharing a kv head become extra rows: K/V tiles are read once for all of them
        qt = (qg[:, :, :, t0:t1].float() * scale).reshape(B, Hkv, G * n, D)
        qpos = (torch.arange(t0, t1, device=q.device) + off).repeat(G)[:, None]  # [G*n, 1]
        k_end = min(Tk, t1 + off) if causal else Tk
        m = torch.full((B, Hkv, G * n, 1), float("-inf"), device=q.device)
        l = torch.zeros((B, Hkv, G * n, 1), device=q.device)
        acc = torch.zeros((B, Hkv, G * n, D), device=q.device)
        for k0 in range(0, k_end, block_k):
            k1 = min(k0 + block_k, k_end)
            s = qt @ k[:, :, k0:k1].float().transpose(-1, -2)  # [B, Hkv, G*n, k1-k0]
            if causal and k1 - 1 > t0 + off:  # the tile crosses the diagonal: mask its upper part
                s = s.masked_fill(torch.arange(k0, k1, device=q.device)[None, :] > qpos, float("-inf"))
            # key 0 is visible to every row (off >= 0), so m is finite after the first tile
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            p = torch.exp(s - m_new)
            corr = torch.exp(m - m_new)
            l = l * corr + p.sum(-1, keepdim=True)
            acc = acc * corr + p @ v[:, :, k0:k1].float()
            m = m_new
        tiles.append((acc / l).view(B, Hkv, G, n, D))
    return torch.cat(tiles, dim=3).reshape(B, Hq, Tq, D).to(q.dtype)


# ----------------------------------------------------------------------------------------------
# Attention: single-query decode against a static KV cache

def decode_attention_tiled(q, k_cache, v_cache, cache_len):
    """Decode step: q [B, Hq, 1, D], caches [B, Hkv, S, D], slots >= cache_len masked.
    At one query per head the whole score row is small, so the work is two memory-bound passes
    over the cache. Eagerly, two matmuls per kv head ([G, D] x [D, S]) do it; under torch.compile
    the same math is written as broadcast-multiply-reductions, which inductor fuses into loops that
    read each cache row once for all G heads (measured faster than both the matmul form and the
    flash-decoding form `decode_attention_split`, see bench.py)."""
    B, Hq, _, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    qg = q.float().reshape(B, Hkv, G, D) * (1.0 / math.sqrt(D))
    k, v = k_cache.float(), v_cache.float()
    fused = torch.compiler.is_compiling()
    s = (qg[:, :, :, None] * k[:, :, None]).sum(-1) if fused else qg @ k.transpose(-1, -2)  # [B, Hkv, G, S]
    valid = torch.arange(S, device=q.device) < cache_len  # cache_len stays on the device
    p = s.masked_fill(~valid, float("-inf")).softmax(-1)
    o = (p[..., None] * v[:, :, None]).sum(-2) if fused else p @ v  # [B, Hkv, G, D]
    return o.reshape(B, Hq, 1, D).to(q.dtype)


def decode_attention_split(q, k_cache, v_cache, cache_len, block=512):
    """Flash-decoding form: the cache is cut into blocks, each gives a partial (max, sum, output)
    and the partials are merged with the online-softmax rule. Kept for the benchmark comparison."""
    B, Hq, _, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    if S % block:
        return decode_attention_tiled(q, k_cache, v_cache, cache_len)
    nb = S // block
    qg = q.float().reshape(B, Hkv, 1, G, D) * (1.0 / math.sqrt(D))
    kb = k_cache.float().view(B, Hkv, nb, block, D)
    vb = v_cache.float().view(B, Hkv, nb, block, D)
    s = qg @ kb.transpose(-1, -2)  # [B, Hkv, nb, G, block]
    valid = (torch.arange(S, device=q.device) < cache_len).view(nb, 1, block)
    s = s.masked_fill(~valid, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # fully empty block: no NaN
    p = torch.exp(s - m)
    l, o = p.sum(-1, keepdim=True), p @ vb  # partial sums [.., G, 1], outputs [.., G, D]
    w = torch.exp(m - m.amax(2, keepdim=True)) * (l > 0)
    out = (w * o).sum(2) / (w * l).sum(2)  # [B, Hkv, G, D]
    return out.reshape(B, Hq, 1, D).to(q.dtype)


# ----------------------------------------------------------------------------------------------
# Attention: Triton kernel for CUDA (same algorithm; rows = G*Tq query rows of one kv head)

if HAS_TRITON:
    @triton.jit
    def _flash_fwd(Q, K, V, O, LEN,
                   sqb, sqh, sqt, sqd, skb, skh, skt, skd,
                   svb, svh, svt, svd, sob, soh, sot, sod,
                   Hkv, G, Tq, scale,
                   CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   D: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // Hkv
        hk = pid_bh % Hkv
        kv_len = tl.load(LEN)  # valid keys, read on the device (decode: the cache length)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < G * Tq
        g = rows // Tq
        t = rows % Tq
        hq = hk * G + g
        dims = tl.arange(0, D)
        q = tl.load(Q + b * sqb + hq[:, None] * sqh + t[:, None] * sqt + dims[None, :] * sqd,
                    mask=row_ok[:, None], other=0.0)
        qpos = t + kv_len - Tq  # queries aligned to the end of the keys
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        hi = kv_len
        if CAUSAL:
            hi = tl.minimum(kv_len, tl.max(tl.where(row_ok, qpos, 0)) + 1)
        for start in range(0, hi, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < kv_len
            kt = tl.load(K + b * skb + hk * skh + cols[None, :] * skt + dims[:, None] * skd,
                         mask=col_ok[None, :], other=0.0)  # [D, BLOCK_N]
            s = tl.dot(q, kt) * scale
            ok = col_ok[None, :] & row_ok[:, None]
            if CAUSAL:
                ok = ok & (cols[None, :] <= qpos[:, None])
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            vt = tl.load(V + b * svb + hk * svh + cols[:, None] * svt + dims[None, :] * svd,
                         mask=col_ok[:, None], other=0.0)  # [BLOCK_N, D]
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(O + b * sob + hq[:, None] * soh + t[:, None] * sot + dims[None, :] * sod,
                 out.to(O.dtype.element_ty), mask=row_ok[:, None])

_triton_ok = HAS_TRITON


def _use_triton(q, k, v):
    D = q.shape[-1]
    return (_triton_ok and q.is_cuda and D in (16, 32, 64, 128, 256)
            and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)))


def _attention_triton(q, k, v, causal, kv_len):
    B, Hq, Tq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    o = torch.empty_like(q)
    block_m = 16 if G * Tq <= 16 else 64
    grid = (triton.cdiv(G * Tq, block_m), B * Hkv)
    _flash_fwd[grid](q, k, v, o, kv_len, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                     Hkv, G, Tq, 1.0 / math.sqrt(D),
                     CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=64, D=D, num_warps=4)
    return o


def _try_triton(q, k, v, causal, kv_len):
    """Run the Triton kernel; if it fails to build on this machine, say so once and fall back."""
    global _triton_ok
    try:
        return _attention_triton(q, k, v, causal, kv_len)
    except Exception as e:  # a Triton/driver incompatibility must not stop inference
        _triton_ok = False
        warnings.warn(f"kernels.py: Triton attention failed ({type(e).__name__}: {e}); "
                      "using the compiled PyTorch version")
        return None


# ----------------------------------------------------------------------------------------------
# Attention: public entry points (compiled on first use; falls back to eager if compile fails)

_compiled = {}


def _compiled_fn(fn):
    if not COMPILE:
        return fn
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=False)
    return _compiled[fn]


def _run_compiled(fn, *args):
    global COMPILE
    if torch.compiler.is_compiling():  # inside the caller's own compiled graph: just inline
        return fn(*args)
    try:
        return _compiled_fn(fn)(*args)
    except Exception as e:  # e.g. no C++ compiler: correctness first, speed second
        if not COMPILE:
            raise
        COMPILE = False
        warnings.warn(f"kernels.py: torch.compile failed ({type(e).__name__}); running eagerly")
        return fn(*args)


def attention(q, k, v, causal=True):
    """q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] (Hq % Hkv == 0, Tq <= Tk when causal) -> [B, Hq, Tq, D]."""
    _check_attention(q, k, v)
    if causal and q.shape[2] > k.shape[2]:
        raise ValueError(f"kernels.attention: causal with more queries ({q.shape[2]}) "
                         f"than keys ({k.shape[2]})")
    if _use_triton(q, k, v):
        kv_len = torch.full((), k.shape[2], dtype=torch.long, device=q.device)
        o = _try_triton(q, k, v, causal, kv_len)
        if o is not None:
            return o
    return _run_compiled(attention_tiled, q, k, v, causal)


def decode_attention(q, k_cache, v_cache, cache_len):
    """q [B, Hq, 1, D], caches [B, Hkv, S, D], cache_len: LongTensor[] in 1..S (slots < cache_len
    are valid; the query sits at position cache_len - 1) -> [B, Hq, 1, D]."""
    _check_attention(q, k_cache, v_cache)
    if q.shape[2] != 1:
        raise ValueError(f"kernels.decode_attention: one query per head expected, got {q.shape[2]}")
    if not torch.is_tensor(cache_len):
        raise ValueError("kernels.decode_attention: cache_len must be a LongTensor (no host sync)")
    if cache_len.device != q.device or cache_len.dtype != torch.long:
        cache_len = cache_len.to(q.device, torch.long)
    if _use_triton(q, k_cache, v_cache):
        o = _try_triton(q, k_cache, v_cache, True, cache_len.reshape(()))
        if o is not None:
            return o
    if not q.is_cuda and k_cache.numel() < SDPA_DECODE_MAX:
        valid = (torch.arange(k_cache.shape[2], device=q.device) < cache_len)[None]  # [1, S]
        return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=valid, enable_gqa=True)
    return _run_compiled(decode_attention_tiled, q, k_cache, v_cache, cache_len)


# ----------------------------------------------------------------------------------------------
# Sampling
#
# Semantics (shared by `sample` and `sample_reference`), per row:
#   1. logits / temperature (temperature <= 0: by 1);
#   2. repetition penalty (CTRL): every distinct token id in `recent` (-1 = empty slot) gets its
#      logit divided by `repetition_penalty` if positive, multiplied by it otherwise (once, however
#      often it occurs). A positive scale commutes with this, so 1-2 equal the official order
#      (penalty, then temperature) up to float rounding;
#   3. temperature <= 0: return the argmax; otherwise probs = softmax;
#   4. filtering: if 0 < top_p < 1, nucleus filtering ONLY (top-p takes precedence over top-k, as
#      in the official sampler): in descending-probability order keep every token whose mass
#      strictly before it is <= top_p (the smallest prefix whose mass exceeds top_p);
#      else if 0 < top_k < V keep the top_k most probable tokens; else keep all;
#   5. draw an exact sample of the renormalised kept probabilities without torch.multinomial:
#      given `noise` ([N, V] Gumbel(0, 1), e.g. from `gumbel_noise`), the argmax over kept tokens
#      of logits / temperature + noise (Gumbel-max: both functions then return the same tokens);
#      otherwise the exponential race argmax(p / E), E ~ Exp(1) from `generator` (the same
#      distribution, drawn with one division per candidate instead of two logs).
# Ties between equal probabilities at the top-p/top-k boundary may keep different members of the
# tie than a sort would (a sort's order among ties is arbitrary too).

TOP_P_CANDIDATES = 256  # the fast path looks at this many most probable tokens
SORT_MAX_V = 32768  # the exact fallback sorts up to this vocabulary size (cheap), else radix-selects
SYNC_FREE = None  # None: branch-free (torch.where over both paths) on CUDA only; True/False: force


def gumbel_noise(shape, generator=None, device=None):
    """Gumbel(0, 1) noise, for reproducible draws: sample(..., noise=gumbel_noise(logits.shape))."""
    u = torch.rand(shape, device=device, generator=generator)
    return -torch.log(-torch.log(u))  # u = 0 gives -inf: never chosen


def _draw(x, p, keep, ids, noise, generator):
    """One kept candidate per row. x: scaled logits of the candidates, p: their probabilities
    (up to a factor), keep: mask or None (all), ids: [N, C] candidate token ids or None (= 0..V-1)."""
    if noise is not None:
        score = x + (noise if ids is None else noise.gather(1, ids))
        empty = float("-inf")
    else:
        score = p / torch.empty_like(p).exponential_(generator=generator).clamp_(min=1e-30)
        empty = -1.0
    if keep is not None:
        score = torch.where(keep, score, empty)
    pick = score.argmax(-1)
    return pick if ids is None else ids.gather(1, pick[:, None]).squeeze(1)


def _scaled_penalised(logits, temperature, recent, penalty):
    """logits / temperature (1 when temperature <= 0) with the CTRL penalty, in one pass over V:
    the division writes straight into a flat buffer with one spare slot at the end, and the penalty
    touches only the W window slots by take/put (empty slots point at the spare slot, so every
    write to one id carries the same value and duplicates are harmless). Dividing by the
    temperature before penalising equals the usual order exactly in real arithmetic; the reference
    uses the same order, so the two agree bit for bit."""
    N, V = logits.shape
    buf = torch.empty(N * V + 1, dtype=torch.float32, device=logits.device)
    x = buf[:N * V].view(N, V)
    logits = logits if logits.dtype == torch.float32 else logits.float()
    if temperature > 0:
        torch.div(logits, temperature, out=x)
    else:
        x.copy_(logits)
    if recent is not None and penalty != 1.0 and recent.shape[1] > 0:
        rows = torch.arange(N, device=logits.device)[:, None] * V
        idx = torch.where(recent >= 0, recent + rows, N * V).flatten()
        vals = buf.take(idx)
        buf.put_(idx, torch.where(vals > 0, vals / penalty, vals * penalty))
    return x


def _top_p_threshold(probs, top_p):
    """Exact nucleus boundary without sorting: the smallest float v with mass(probs > v) <= top_p,
    i.e. the probability of the last kept token; kept tokens are then probs >= v. Non-negative
    floats order like their int32 bit patterns, and probs <= 1.0 = 0x3F800000 < 2^30, so a radix
    select over 3 digits of 10 bits finds v exactly: per digit, one scatter-add of the mass into
    1024 bins (tokens outside the current prefix go to a spare bin), then a suffix sum over the
    bins picks the digit at which the mass from the top first exceeds top_p. Three passes over
    V instead of a sort; no host sync, fixed shapes."""
    N, V = probs.shape
    bits = probs.view(torch.int32)
    w = probs.double().flatten()  # float64 sums: closer to the exact mass than a float32 cumsum
    row = torch.arange(N, device=probs.device)[:, None] * 1025
    prefix = torch.zeros(N, 1, dtype=torch.int32, device=probs.device)
    above = torch.zeros(N, 1, dtype=torch.float64, device=probs.device)  # mass above the prefix
    for shift in (20, 10, 0):
        digit = torch.where((bits >> (shift + 10)) == prefix, (bits >> shift) & 1023, 1024)
        m = torch.zeros(N * 1025, dtype=torch.float64, device=probs.device)
        m = m.index_add_(0, (row + digit).flatten(), w).view(N, 1025)[:, :1024]
        c = above + m.flip(-1).cumsum(-1).flip(-1)  # mass of the prefix's tokens with digit >= d
        d = (c > top_p).sum(-1, keepdim=True) - 1  # c falls with d: the last d where c > top_p
        above = c.gather(1, d) - m.gather(1, d)
        prefix = (prefix << 10) | d.to(torch.int32)
    return prefix.view(torch.float32)


def _sample_top_p(x, top_p, generator, noise, candidates):
    """Fast path: the top `candidates` probabilities, sorted, hold the whole nucleus whenever their
    cumulative mass exceeds top_p (almost always for LM logits). Rows where it does not take the
    exact nucleus over the whole vocabulary: a sort for small V, else the radix-select threshold.
    On CUDA both results are computed and merged with torch.where (no host sync, graph-capturable);
    on CPU reading the flag costs nothing, so the slow path only runs for the rows that need it."""
    N, V = x.shape
    probs = torch.softmax(x, -1)
    pk, ik = probs.topk(min(candidates, V), -1)  # descending, as a sort would give them
    cs = pk.cumsum(-1)
    keep = (cs - pk) <= top_p
    tok = _draw(x.gather(1, ik), pk, keep, ik, noise, generator)
    covered = (cs[:, -1] > top_p) | (ik.shape[1] == V)

    def exact(p, xr, g):  # the exact nucleus over the whole vocabulary: sort when small
        if V <= SORT_MAX_V:
            ps, order = p.sort(-1, descending=True)
            keep = torch.zeros_like(p, dtype=torch.bool).scatter(1, order, (ps.cumsum(-1) - ps) <= top_p)
        else:
            keep = p >= _top_p_threshold(p, top_p)
        return _draw(xr, p, keep, None, g, generator)

    if x.is_cuda if SYNC_FREE is None else SYNC_FREE:
        return torch.where(covered, tok, exact(probs, x, noise))
    rows = (~covered).nonzero().squeeze(1)
    if len(rows):
        tok[rows] = exact(probs[rows], x[rows], noise[rows] if noise is not None else None)
    return tok


def _check_sample(logits, recent, noise):
    if logits.dim() != 2:
        raise ValueError(f"kernels.sample: logits must be [N, V], got {tuple(logits.shape)}")
    if recent is not None and (recent.dim() != 2 or recent.shape[0] != logits.shape[0]):
        raise ValueError(f"kernels.sample: recent must be [N, W] with N = {logits.shape[0]}, "
                         f"got {tuple(recent.shape)}")
    if noise is not None and noise.shape != logits.shape:
        raise ValueError(f"kernels.sample: noise must have the logits' shape {tuple(logits.shape)}")


def sample(logits, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, recent=None,
           generator=None, noise=None, candidates=TOP_P_CANDIDATES):
    """Fused sampler: logits [N, V] -> token ids [N] (long). See the semantics above."""
    _check_sample(logits, recent, noise)
    x = _scaled_penalised(logits, temperature, recent, repetition_penalty)
    if temperature <= 0:
        return x.argmax(-1)
    N, V = x.shape
    if 0 < top_p < 1:
        return _sample_top_p(x, top_p, generator, noise, candidates)
    if 0 < top_k < V:
        vals, ik = x.topk(top_k, -1)
        return _draw(vals, torch.softmax(vals, -1), None, ik, noise, generator)
    return _draw(x, torch.softmax(x, -1), None, None, noise, generator)


def sample_reference(logits, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                     recent=None, generator=None, noise=None):
    """The plain method: per-row gather/scatter penalty, full sort + cumsum for top-p, scatter the
    kept set back, then torch.multinomial (or, given `noise`, the Gumbel-max draw)."""
    _check_sample(logits, recent, noise)
    x = logits.float() / temperature if temperature > 0 else logits.float().clone()
    if recent is not None and repetition_penalty != 1.0:
        for n in range(x.shape[0]):
            ids = recent[n][recent[n] >= 0]
            vals = x[n, ids]
            x[n, ids] = torch.where(vals > 0, vals / repetition_penalty, vals * repetition_penalty)
    if temperature <= 0:
        return x.argmax(-1)
    probs = torch.softmax(x, -1)
    N, V = x.shape
    if 0 < top_p < 1:
        ps, order = probs.sort(-1, descending=True)
        keep_sorted = (ps.cumsum(-1) - ps) <= top_p
        keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    elif 0 < top_k < V:
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter(1, probs.topk(top_k, -1).indices, True)
    else:
        keep = torch.ones_like(probs, dtype=torch.bool)
    if noise is not None:
        return torch.where(keep, x + noise, float("-inf")).argmax(-1)
    kept = probs * keep
    return torch.multinomial(kept / kept.sum(-1, keepdim=True), 1, generator=generator).squeeze(1)


# ----------------------------------------------------------------------------------------------
# The streaming sampler: one token per stream per 80 ms step (chat.LMStream).
#
# Same semantics as `sample` above, but the draw is by inverse CDF from a few uniforms that the
# caller generates once per step (for 9 streams), instead of V exponentials or Gumbels per call,
# and with no data-dependent branch when compiled, so the whole depth loop of a step (8 codebooks
# with their sampling) is one graph.


def nucleus_args(top_k, top_p):
    """The official sampler's precedence: top_p > 0 means nucleus (top-k ignored; p >= 1 keeps
    everything), otherwise top_k > 0 means top-k, otherwise plain sampling."""
    if top_p > 0:
        return 0, min(float(top_p), 1.0)
    return int(top_k), 1.0


def sample_token(logits, u, temperature, top_k=0, top_p=1.0, penalty=1.0, recent=None, sort=True):
    """logits [B, V] -> token ids [B] (long), the semantics of kernels.sample: logits / temperature,
    the CTRL repetition penalty on the ids in recent [B, W] (divided by it if positive, multiplied
    otherwise, once per id; empty slots hold V), then top-p (keep the smallest most-probable prefix
    whose mass exceeds top_p) if 0 < top_p < 1, else top-k if 0 < top_k < V, else everything.
    Temperature <= 0 is the argmax of the raw logits. u [B, T] holds uniforms; draws are by inverse
    CDF (the first token whose cumulative probability exceeds u * total): a few random numbers
    instead of kernels.sample's V exponentials. Top-p two ways, same distribution:
      sort=True (eager): on the CPU first one rejection candidate (below), accepted with probability
        > top_p; rows that miss (and CUDA) sort the probabilities, keep the prefix and invert its
        CDF at a fresh uniform -- exact either way, and a sort in only ~10 % of the draws;
      sort=False: rejection, no sort (compiled: a sort is the one op that does not fuse). Each u
        gives a candidate from the full distribution; it is in the nucleus iff the mass of the tokens
        more probable than it is <= top_p; the first accepted one is the sample. The nucleus holds
        > top_p of the mass, so all T candidates miss with probability < (1 - top_p)^T (1e-16 for
        T = 16, p = 0.9); then the most probable token is taken. No branch on the data: the same
        graph every step."""
    if temperature <= 0:
        return logits.argmax(-1)
    x = logits.float() / temperature
    V = x.shape[1]
    if penalty != 1.0 and recent is not None:
        x = F.pad(x, (0, 1))                                    # column V: where empty slots point
        v = x.gather(1, recent)
        x = x.scatter(1, recent, torch.where(v > 0, v / penalty, v * penalty))[:, :V]
    if 0 < top_p < 1 and sort:
        p = torch.softmax(x, -1)
        if not p.is_cuda:   # first one rejection candidate (accepted with prob. > top_p); reading ok is free here
            cs = p.cumsum(-1)
            cand = torch.searchsorted(cs, u[:, :1] * cs[:, -1:], right=True).clamp_(max=V - 1)
            ok = torch.where(p > p.gather(1, cand), p, 0.0).sum(-1, keepdim=True) <= top_p
            if ok.all():
                return cand.squeeze(1)
        ps, ids = p.sort(-1, descending=True)
        cs = ps.cumsum(-1)
        last = (cs[:, :-1] <= top_p).sum(-1, keepdim=True)     # kept: mass before the token <= top_p
        j = torch.minimum(torch.searchsorted(cs, u[:, 1:2] * cs.gather(1, last), right=True), last)
        tok = ids.gather(1, j)                                  # (a fresh uniform: exact after a miss)
        return (tok if p.is_cuda else torch.where(ok, cand, tok)).squeeze(1)
    if 0 < top_p < 1:
        p = torch.softmax(x, -1)
        cs = p.cumsum(-1)
        cand = torch.searchsorted(cs, u * cs[:, -1:], right=True).clamp_(max=V - 1)    # [B, T]
        pc = p.gather(1, cand)
        above = torch.where(p[:, None, :] > pc[:, :, None], p[:, None, :], 0.0).sum(-1)
        ok = above <= top_p                                     # the candidate is in the nucleus
        tok = cand.gather(1, ok.to(torch.uint8).argmax(-1, keepdim=True)).squeeze(1)   # first accepted
        return torch.where(ok.any(-1), tok, p.argmax(-1))
    u, ids = u[:, :1], None
    if 0 < top_k < V:
        x, ids = x.topk(top_k, -1)
    cs = torch.softmax(x, -1).cumsum(-1)
    j = torch.searchsorted(cs, u * cs[:, -1:], right=True).clamp_(max=cs.shape[1] - 1)
    return (j if ids is None else ids.gather(1, j)).squeeze(1)
