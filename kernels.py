"""kernels.py -- the two hot loops of FLM-Audio inference, each next to a plain reference.

1. Attention of the backbone (model.Attention uses SDPA for training, which needs the backward,
   for DepthGPT's 8 positions, and for the full forward on CPU, where SDPA is as fast and needs
   no compile per sequence length):
   - `attention(q, k, v, causal=True)`: the full forward without grad on CUDA (prefill, evaluation).
     Flash-style: keys tile by tile with an online softmax, so the [Tq, Tk] score matrix never
     exists in full; fully masked causal tiles are skipped. Queries are aligned to the END of the
     keys (query i sits at key position Tk - Tq + i). With Triton a Triton kernel runs; otherwise
     (and on CPU, e.g. in bench.py) the plain-PyTorch tiles run compiled by `torch.compile`.
   - `decode_attention(q, k_cache, v_cache, cache_len)`: one query per head against the static KV
     cache (model.KVCache), whose first `cache_len` slots are valid. `cache_len` is a LongTensor, so
     a step has the same shapes at every position and reads nothing on the host when compiled:
     torch.compile / CUDA graphs capture it once. On CUDA the Triton kernel serves it eagerly,
     splitting a long cache into chunks of keys, one program each (flash-decoding).
   GQA (Hq = G * Hkv): the G query heads of one kv head are folded into the row axis, so K and V
   are read once per kv head, never repeated in memory.
2. Sampling (chat.LMStream, once per stream per 80 ms step): `sample(logits, uniforms, ...)`, with
   no sort and no data-dependent branch, runs eagerly and inside the compiled step alike.
`attention_reference` and `sample_reference` (the official sort-based sampler) are the plain
methods the tests compare to.
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
# compiled CPU decode with a cache smaller than this (elements of k_cache) calls SDPA with the mask:
# there the step is call overhead, not memory traffic, and one aten call wins (bench.py, tiny layout)
SDPA_DECODE_MAX = 1 << 18


# ----------------------------------------------------------------------------------------------
# Attention: the reference (plain math, materialises everything)

def _check_attention(q, k, v):
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or q.shape[::3] != k.shape[::3]:
        raise ValueError(f"kernels.attention: q, k, v must be [B, H, T, D] with matching B, D: {shapes}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"kernels.attention: {q.shape[1]} query heads is not a multiple of {k.shape[1]} kv heads")


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
    read each cache row once for all G heads."""
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


# ----------------------------------------------------------------------------------------------
# Attention: Triton kernel for CUDA (same algorithm; rows = G*Tq query rows of one kv head).
# A decode step has few query rows (G = 7 for the 7B), so one program per kv head would leave most
# of the GPU idle while it walks a long cache: the keys are then split into chunks, one program
# each (flash-decoding), which write their unnormalised partial sums; `_combine` merges them.

if HAS_TRITON:
    @triton.jit
    def _flash_fwd(Q, K, V, O, M, L, LEN,
                   sqb, sqh, sqt, sqd, skb, skh, skt, skd,
                   svb, svh, svt, svd, sob, soh, sot, sod,
                   Hkv, G, Tq, scale, keys_per_split,
                   CAUSAL: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   D: tl.constexpr, PRECISION: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        pid_s = tl.program_id(2)                            # which chunk of keys (0 without SPLIT)
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
        lo, hi = 0, kv_len
        if SPLIT:
            lo = pid_s * keys_per_split
            hi = tl.minimum(kv_len, lo + keys_per_split)
        if CAUSAL:
            hi = tl.minimum(hi, tl.max(tl.where(row_ok, qpos, 0)) + 1)
        for start in range(lo, hi, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < hi
            kt = tl.load(K + b * skb + hk * skh + cols[None, :] * skt + dims[:, None] * skd,
                         mask=col_ok[None, :], other=0.0)  # [D, BLOCK_N]
            s = tl.dot(q, kt, input_precision=PRECISION) * scale
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
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
            m_i = m_new
        if SPLIT:   # partial results [splits, B, Hq, Tq(, D)] in float32, merged by _combine
            part = (pid_s * tl.num_programs(1) * G + b * Hkv * G + hq) * Tq + t   # num_programs(1) = B*Hkv
            tl.store(M + part, m_i, mask=row_ok)
            tl.store(L + part, l_i, mask=row_ok)
            tl.store(O + part[:, None] * D + dims[None, :], acc, mask=row_ok[:, None])
        else:
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            tl.store(O + b * sob + hq[:, None] * soh + t[:, None] * sot + dims[None, :] * sod,
                     out.to(O.dtype.element_ty), mask=row_ok[:, None])

_triton_ok = HAS_TRITON
_n_sm = {}


def _use_triton(q, k, v):
    """CUDA, a supported head size, no grad; not inside a compiled graph (inductor writes its own)."""
    return (_triton_ok and q.is_cuda and q.shape[-1] in (16, 32, 64, 128, 256)
            and q.dtype in (torch.float16, torch.bfloat16, torch.float32) and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)))


def _keys_per_split(q, k, programs):
    """Keys per program so that about two programs run per multiprocessor; None: do not split."""
    if q.device.type != "cuda":
        sms = 4                                              # Triton's CPU interpreter (tests)
    else:
        if q.device not in _n_sm:                           # asked once per device, not per call
            _n_sm[q.device] = torch.cuda.get_device_properties(q.device).multi_processor_count
        sms = _n_sm[q.device]
    splits = min(-(-k.shape[2] // 256), max(1, 2 * sms // programs))
    return None if splits <= 1 else 64 * -(-k.shape[2] // (64 * splits))


def _combine(m, l, acc, dtype):
    """Merge the chunks' (max, sum, unnormalised output) into the softmax over all keys."""
    m_all = m.amax(0)                                        # chunk 0 holds key 0: finite
    w = torch.exp(m - m_all)                                 # empty chunks: exp(-inf) = 0
    return ((w[..., None] * acc).sum(0) / (w * l).sum(0)[..., None]).to(dtype)


def _attention_triton(q, k, v, causal, kv_len, keys_per_split=None):
    """Run the Triton kernel; if it fails to build on this machine, say so once and return None.
    `keys_per_split` (a multiple of 64) forces the split-key form; by default it is chosen for
    inputs with few query rows and many keys."""
    global _triton_ok
    B, Hq, Tq, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    block_m = 16 if G * Tq <= 16 else 64
    programs = triton.cdiv(G * Tq, block_m) * B * Hkv
    if keys_per_split is None and G * Tq <= 64:
        keys_per_split = _keys_per_split(q, k, programs)
    splits = 1 if keys_per_split is None else triton.cdiv(S, keys_per_split)
    try:
        if splits > 1:
            o = torch.empty(splits, B, Hq, Tq, D, device=q.device, dtype=torch.float32)
            m, l = torch.empty(2, splits, B, Hq, Tq, device=q.device, dtype=torch.float32)
        else:
            o = m = l = torch.empty_like(q)
        _flash_fwd[(triton.cdiv(G * Tq, block_m), B * Hkv, splits)](
            q, k, v, o, m, l, kv_len, *q.stride(), *k.stride(), *v.stride(), *o.stride()[-4:], Hkv, G, Tq,
            1.0 / math.sqrt(D), keys_per_split or S, CAUSAL=causal, SPLIT=splits > 1, BLOCK_M=block_m,
            BLOCK_N=64, D=D, num_warps=4, num_stages=2 if q.element_size() == 4 and D >= 128 else 3,
            # float32 products in full precision (Triton's default rounds them to TF32), as PyTorch
            # does; float32 tiles of 128-wide heads get two pipeline stages to fit in shared memory
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
        return _combine(m, l, o, q.dtype) if splits > 1 else o
    except Exception as e:  # a Triton/driver incompatibility must not stop inference
        _triton_ok = False
        warnings.warn(f"kernels.py: Triton attention failed ({type(e).__name__}: {e}); using PyTorch")
        return None


# ----------------------------------------------------------------------------------------------
# Attention: public entry points (compiled on first use; falls back to eager if compile fails)

_compiled = {}


def _run_compiled(fn, *args):
    global COMPILE
    if not COMPILE or torch.compiler.is_compiling():  # inside the caller's compiled graph: inline
        return fn(*args)
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=False)
    try:
        return _compiled[fn](*args)
    except Exception as e:  # e.g. no C++ compiler: correctness first, speed second
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
        o = _attention_triton(q, k, v, causal, torch.full((), k.shape[2], dtype=torch.long, device=q.device))
        if o is not None:
            return o
    return _run_compiled(attention_tiled, q, k, v, causal)


def decode_attention(q, k_cache, v_cache, cache_len):
    """q [B, Hq, 1, D], caches [B, Hkv, S, D], cache_len: a one-element LongTensor in 1..S (slots
    < cache_len are valid; the query sits at position cache_len - 1) -> [B, Hq, 1, D]."""
    if q.shape[2] != 1 or not torch.is_tensor(cache_len):
        raise ValueError(f"kernels.decode_attention: one query per head and a LongTensor cache_len "
                         f"expected, got q {tuple(q.shape)}, cache_len {cache_len!r}")
    if q.is_cuda:
        if _use_triton(q, k_cache, v_cache):
            o = _attention_triton(q, k_cache, v_cache, True, cache_len.reshape(()).to(q.device, torch.long))
            if o is not None:
                return o
    elif not torch.compiler.is_compiling():
        n = int(cache_len)   # eagerly on the CPU reading the length is free: attend to valid slots only
        return F.scaled_dot_product_attention(q, k_cache[:, :, :n], v_cache[:, :, :n], enable_gqa=True)
    elif k_cache.numel() < SDPA_DECODE_MAX:
        valid = (torch.arange(k_cache.shape[2], device=q.device) < cache_len)[None]  # [1, S]
        return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=valid, enable_gqa=True)
    return _run_compiled(decode_attention_tiled, q, k_cache, v_cache, cache_len)


# ----------------------------------------------------------------------------------------------
# Sampling. Semantics (the official sampler's), per row of logits [B, V]:
#   1. repetition penalty (CTRL): each distinct id in the window `recent` [B, W] has its logit
#      divided by `penalty` if positive, multiplied by it otherwise; empty window slots hold V
#      (one past the vocabulary), which is ignored;
#   2. temperature <= 0: the argmax of the penalised logits (the official order: penalty first);
#      otherwise probs = softmax(logits / temperature);
#   3. top_p > 0 takes precedence (as officially): if top_p < 1 keep the nucleus, the smallest
#      most-probable prefix whose mass exceeds top_p (a token is kept iff the mass strictly before
#      it in descending order is <= top_p); else if 0 < top_k < V keep the top_k; else keep all;
#   4. draw from the kept probabilities, renormalised.


def _penalise(x, recent, penalty):
    V = x.shape[1]
    x = F.pad(x, (0, 1))                              # column V: where empty slots point
    v = x.gather(1, recent)
    return x.scatter_(1, recent, torch.where(v > 0, v / penalty, v * penalty))[:, :V]


def rejection_tries(top_p, miss=1e-9, most=64):
    """Uniforms per draw so that all candidates miss the nucleus with probability < miss."""
    if not 0 < top_p < 1:
        return 1
    return max(1, min(most, math.ceil(math.log(miss) / math.log1p(-top_p))))


def sample(logits, uniforms, temperature, top_p=1.0, top_k=0, penalty=1.0, recent=None):
    """logits [B, V], uniforms [B, T] in [0, 1) -> token ids [B] (long); the semantics above.

    Top-p by rejection, without a sort: candidate j is token searchsorted(cdf, u_j) (inverse CDF
    over the whole distribution); it is in the nucleus iff the mass of the strictly more probable
    tokens is <= top_p (one sign/clamp/matmul pass over [T, V]), and the first accepted candidate
    is an exact draw from the nucleus. The nucleus holds more than top_p of the mass, so all T
    candidates miss with probability < (1 - top_p)^T (rejection_tries picks T for 1e-9); then the
    first candidate is taken as it is. Boundary decisions are exact up to float rounding, as with
    a sorted cumsum. Eager on CPU tests the first candidate alone first (it is accepted with
    probability > top_p), the others only where it misses. Top-k and plain sampling invert the
    CDF at uniforms[:, 0]."""
    x = logits.float()
    if penalty != 1.0 and recent is not None:
        x = _penalise(x, recent, penalty)
    if temperature <= 0:
        return x.argmax(-1)
    p, ids = torch.softmax(x / temperature, -1), None
    if top_p <= 0 and 0 < top_k < p.shape[1]:
        p, ids = p.topk(top_k, -1)
    nucleus = 0 < top_p < 1
    cdf = p.cumsum(-1)
    u = uniforms if nucleus else uniforms[:, :1]
    cand = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=p.shape[1] - 1)
    if nucleus:
        pc, rows = p.gather(1, cand), range(p.shape[0])
        if p.device.type == "cpu" and not torch.compiler.is_compiling():
            # eager on CPU: the first candidate is accepted with probability > top_p, so test it
            # alone (one pass over V) and all T only in the rows where it missed (2.5x at batch 1)
            rows = (torch.where(p > pc[:, :1], p, 0.0).sum(1) > top_p).nonzero()[:, 0].tolist()
        first = cand[:, :1].clone()
        for b in rows:   # row by row: a [T, V] temporary stays in cache, a [B, T, V] one did not
            ok = torch.mm((p[b:b + 1] - pc[b, :, None]).sign_().clamp_(min=0), p[b, :, None]).T <= top_p
            first[b] = cand[b].gather(0, ok[0].to(torch.uint8).argmax().view(1))   # the first accepted
        cand = first
    return cand[:, 0] if ids is None else ids.gather(1, cand[:, :1])[:, 0]


def sample_reference(logits, temperature, top_p=1.0, top_k=0, penalty=1.0, recent=None, generator=None):
    """The official method: penalty -> temperature -> softmax -> sort -> cumsum top-p (or top-k)
    -> torch.multinomial. Same arguments as `sample`, with a generator instead of uniforms."""
    x = logits.float().clone()
    if penalty != 1.0 and recent is not None:
        for row, ids in zip(x, recent):
            ids = ids[ids < x.shape[1]].unique()
            row[ids] = torch.where(row[ids] > 0, row[ids] / penalty, row[ids] * penalty)
    if temperature <= 0:
        return x.argmax(-1)
    probs = torch.softmax(x / temperature, -1)
    ps, order = probs.sort(-1, descending=True)
    if 0 < top_p < 1:
        ps = ps * ((ps.cumsum(-1) - ps) <= top_p)
    elif top_p <= 0 and 0 < top_k < x.shape[1]:
        ps[:, top_k:] = 0
    pick = torch.multinomial(ps / ps.sum(-1, keepdim=True), 1, generator=generator)
    return order.gather(1, pick)[:, 0]
