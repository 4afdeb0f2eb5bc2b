"""Tests for kernels.py: attention against torch's SDPA (float32 and bf16, GQA, causal with queries
aligned to the end of the keys, lengths that are not multiples of the tile), decode against a static
cache, and the fused sampler against the plain sort-based reference (same noise -> same tokens) and
against hand-computed distributions (chi-square). torch.compile is slow on CPU, so only a few shapes
go through the compiled path; the eager path (same code) covers the rest with small tiles."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kernels  # noqa: E402


def sdpa(q, k, v, causal=True):
    """torch's attention with the same conventions: GQA, causal mask aligned to the end of keys."""
    Tq, Tk = q.shape[2], k.shape[2]
    mask = torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq) if causal else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def qkv(B, Hq, Hkv, Tq, Tk, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, t, D, generator=g).to(dtype)
                 for h, t in ((Hq, Tq), (Hkv, Tk), (Hkv, Tk)))


TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}

# ---------------------------------------------------------------------------------------------
# attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hkv,Tq,Tk,D,causal", [
    (2, 4, 2, 37, 37, 16, True),    # GQA, length not a multiple of the tile
    (1, 6, 2, 21, 50, 32, True),    # chunked prefill: queries aligned to the end of the keys
    (1, 4, 4, 16, 64, 16, True),    # MHA, exact tile multiples
    (2, 8, 2, 33, 45, 16, False),   # non-causal
    (1, 3, 1, 1, 29, 64, True),     # a single query (MQA)
])
def test_tiled_attention_matches_sdpa(dtype, B, Hq, Hkv, Tq, Tk, D, causal):
    q, k, v = qkv(B, Hq, Hkv, Tq, Tk, D, dtype)
    want = sdpa(q.float(), k.float(), v.float(), causal)
    got = kernels.attention_tiled(q, k, v, causal, block_q=16, block_k=16)  # many small tiles
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), want, atol=TOL[dtype], rtol=TOL[dtype])
    if dtype == torch.bfloat16:  # and as close to torch's own bf16 attention as that is to fp32
        torch.testing.assert_close(got.float(), sdpa(q, k, v, causal).float(), atol=3e-2, rtol=3e-2)
    ref = kernels.attention_reference(q, k, v, causal)
    torch.testing.assert_close(ref.float(), want, atol=TOL[dtype], rtol=TOL[dtype])


def test_compiled_attention_matches_sdpa():
    # 300 = two full 128 tiles + a partial one, on both axes; GQA 4 -> 2; then a chunk of 40 queries
    for Tq in (300, 40):
        q, k, v = qkv(1, 4, 2, Tq, 300, 16, seed=Tq)
        torch.testing.assert_close(kernels.attention(q, k, v), sdpa(q, k, v), atol=2e-5, rtol=2e-5)


TRITON_CHECK = """
import torch, torch.nn.functional as F, kernels
def sdpa(q, k, v, causal):
    m = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(k.shape[2] - q.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m if causal else None, enable_gqa=True)
torch.manual_seed(0)
for B, Hq, Hkv, Tq, Tk, D, causal in [(2, 4, 2, 37, 37, 16, True), (1, 6, 2, 21, 70, 32, True),
                                      (1, 4, 4, 20, 45, 16, False)]:
    q, k, v = torch.randn(B, Hq, Tq, D), torch.randn(B, Hkv, Tk, D), torch.randn(B, Hkv, Tk, D)
    o = kernels._attention_triton(q, k, v, causal, torch.tensor(Tk))
    torch.testing.assert_close(o, sdpa(q, k, v, causal), atol=2e-5, rtol=2e-5)
q, kc, vc = torch.randn(2, 28, 1, 32), torch.randn(2, 4, 100, 32), torch.randn(2, 4, 100, 32)
kc[:, :, 61:] = 1e4  # garbage beyond the valid length
o = kernels._attention_triton(q, kc, vc, True, torch.tensor(61))
torch.testing.assert_close(o, sdpa(q, kc[:, :, :61], vc[:, :, :61], True), atol=2e-5, rtol=2e-5)
print("ok")
"""


def test_triton_kernel_in_interpreter():
    """The CUDA kernel's logic, run by Triton's CPU interpreter (only where triton is installed)."""
    pytest.importorskip("triton")
    path = os.pathsep.join([str(Path(kernels.__file__).parent)] + sys.path)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    r = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_tiled_attention_gradients():
    """Training goes through the same tiles: gradients equal the plain reference's."""
    grads = []
    for fn in (lambda *a: kernels.attention_tiled(*a, block_q=16, block_k=16), kernels.attention_reference):
        q, k, v = (t.requires_grad_() for t in qkv(1, 4, 2, 40, 40, 16, seed=9))
        fn(q, k, v).square().sum().backward()
        grads.append([t.grad for t in (q, k, v)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_attention_rejects_bad_shapes():
    q, k, v = qkv(1, 3, 2, 4, 4, 16)
    with pytest.raises(ValueError, match="multiple"):
        kernels.attention(q, k, v)
    q, k, v = qkv(1, 4, 2, 8, 4, 16)
    with pytest.raises(ValueError, match="more queries"):
        kernels.attention(q, k, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sdpa_max", [0, 1 << 18])  # our compiled kernel; SDPA for small caches
def test_decode_attention_static_cache(dtype, sdpa_max, monkeypatch):
    """Slots >= cache_len hold garbage and must be ignored; cache_len is a tensor, so a new length
    must not recompile the graph (the step is capturable)."""
    monkeypatch.setattr(kernels, "SDPA_DECODE_MAX", sdpa_max)
    q, kc, vc = qkv(2, 28, 4, 1, 96, 32, dtype)
    kc[:, :, 70:] = 1e4  # garbage beyond the valid length
    decode = kernels.decode_attention
    for n in (70, 1, 96):
        want = sdpa(q.float(), kc[:, :, :n].float(), vc[:, :, :n].float())
        if n == 96:
            want = sdpa(q.float(), kc.float(), vc.float())
        with torch._dynamo.config.patch(error_on_recompile=n != 70):
            got = decode(q, kc, vc, torch.tensor(n))
        torch.testing.assert_close(got.float(), want, atol=TOL[dtype], rtol=TOL[dtype])
        eager = kernels.decode_attention_tiled(q, kc, vc, torch.tensor(n))
        torch.testing.assert_close(eager.float(), want, atol=TOL[dtype], rtol=TOL[dtype])
        split = kernels.decode_attention_split(q, kc, vc, torch.tensor(n), block=32)
        torch.testing.assert_close(split.float(), want, atol=TOL[dtype], rtol=TOL[dtype])


def test_prefill_then_decode_equals_full_attention():
    """What model.py does: prefill 10 positions, then decode 3 more one by one from the cache."""
    q, k, v = qkv(1, 4, 2, 13, 13, 16, seed=3)
    full = sdpa(q, k, v)
    kc, vc = torch.zeros(1, 2, 32, 16), torch.zeros(1, 2, 32, 16)
    kc[:, :, :10], vc[:, :, :10] = k[:, :, :10], v[:, :, :10]
    outs = [kernels.attention_tiled(q[:, :, :10], k[:, :, :10], v[:, :, :10], block_q=4, block_k=4)]
    for t in range(10, 13):
        kc[:, :, t], vc[:, :, t] = k[:, :, t], v[:, :, t]
        outs.append(kernels.decode_attention_tiled(q[:, :, t:t + 1], kc, vc, torch.tensor(t + 1)))
    torch.testing.assert_close(torch.cat(outs, 2), full, atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------------------------------------
# sampling


def test_repetition_penalty_hand_worked():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -0.5]])
    recent = torch.tensor([[0, 1, 1, -1, 4]])  # duplicates and an empty slot
    want = torch.tensor([[1.0, -2.0, 0.5, 3.0, -1.0]])  # positive / 2, negative * 2, once each
    assert torch.equal(kernels._scaled_penalised(logits, 0.0, recent, 2.0), want)
    # temperature 0 is the argmax AFTER the penalty
    x = torch.tensor([[2.0, -1.0, 1.5], [-1.0, -1.5, -3.0]])
    rec = torch.tensor([[0, -1], [0, 0]])
    for fn in (kernels.sample, kernels.sample_reference):
        assert fn(x, 0.0, 0, 1.0, 2.0, rec).tolist() == [2, 1]
        assert fn(x, 0.0, 0, 1.0, 1.0, rec).tolist() == [0, 0]


def _rows(n, vocab, seed):
    """A batch mixing peaked rows (nucleus inside the fast path's candidates) and flat rows (not)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, vocab, generator=g) * torch.linspace(0.5, 4, n)[:, None]
    x[::3, :5] += 12
    recent = torch.randint(-1, vocab, (n, 20), generator=g)
    noise = kernels.gumbel_noise((n, vocab), g)
    return x, recent, noise


@pytest.mark.parametrize("vocab,temp,top_k,top_p,pen,cand,sort_max", [
    (2050, 0.5, 0, 0.9, 1.2, 256, 32768),    # audio settings
    (2050, 1.0, 0, 0.9, 1.0, 256, 32768),    # flat rows take the exact (sort) fallback
    (2050, 1.0, 0, 0.9, 1.0, 256, 0),        # ... or the radix-select fallback
    (1000, 0.8, 0, 0.5, 1.1, 4, 0),          # tiny candidate set: mostly fallback
    (3000, 1.0, 50, 0.0, 1.1, 256, 32768),   # top-k only
    (3000, 1.0, 50, 0.8, 1.1, 256, 32768),   # both set: top-p wins
    (500, 1.3, 0, 1.0, 1.5, 256, 32768),     # no filtering
])
def test_sample_matches_reference_given_the_same_noise(vocab, temp, top_k, top_p, pen, cand, sort_max,
                                                       monkeypatch):
    monkeypatch.setattr(kernels, "SORT_MAX_V", sort_max)
    x, recent, noise = _rows(48, vocab, seed=vocab)
    got = kernels.sample(x, temp, top_k, top_p, pen, recent, noise=noise, candidates=cand)
    want = kernels.sample_reference(x, temp, top_k, top_p, pen, recent, noise=noise)
    assert got.dtype == torch.long and torch.equal(got, want)


def test_sync_free_path_matches_reference(monkeypatch):
    """The CUDA form (both paths computed, merged by torch.where, no host branch), run on CPU."""
    monkeypatch.setattr(kernels, "SYNC_FREE", True)
    monkeypatch.setattr(kernels, "SORT_MAX_V", 0)
    x, recent, noise = _rows(24, 1000, seed=7)
    got = kernels.sample(x, 0.8, 0, 0.9, 1.1, recent, noise=noise, candidates=16)
    assert torch.equal(got, kernels.sample_reference(x, 0.8, 0, 0.9, 1.1, recent, noise=noise))


def test_text_vocab_fast_path_matches_reference():
    x, recent, noise = _rows(2, 152064, seed=1)
    x[1, :5] += 30  # both rows peaked
    got = kernels.sample(x, 1.0, 0, 0.9, 1.03, recent, noise=noise)
    assert torch.equal(got, kernels.sample_reference(x, 1.0, 0, 0.9, 1.03, recent, noise=noise))


def test_top_p_threshold_equals_sorted_boundary():
    g = torch.Generator().manual_seed(0)
    probs = (torch.randn(16, 700, generator=g) * 2).softmax(-1)
    for top_p in (0.1, 0.5, 0.9, 0.99):
        ps, order = probs.sort(-1, descending=True)
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter(1, order, (ps.cumsum(-1) - ps) <= top_p)
        assert torch.equal(probs >= kernels._top_p_threshold(probs, top_p), keep)


def test_top_k_one_is_argmax():
    x, recent, _ = _rows(16, 3000, seed=5)
    penalised = kernels._scaled_penalised(x, 0.7, recent, 1.3)
    got = kernels.sample(x, 0.7, 1, 0.0, 1.3, recent, generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, penalised.argmax(-1))


def filtered_distribution(logits, temp, top_k, top_p, pen, recent):
    """The target distribution, by hand in plain Python (independent of both implementations)."""
    x = [(l / pen if l > 0 else l * pen) if i in recent else l for i, l in enumerate(logits)]
    z = [math.exp(v / temp) for v in x]
    p = [v / sum(z) for v in z]
    order = sorted(range(len(p)), key=lambda i: -p[i])
    if 0 < top_p < 1:
        kept, mass = [], 0.0
        for i in order:
            if mass > top_p:
                break
            kept.append(i)
            mass += p[i]
    elif top_k > 0:
        kept = order[:top_k]
    else:
        kept = order
    total = sum(p[i] for i in kept)
    return [p[i] / total if i in kept else 0.0 for i in range(len(p))]


@pytest.mark.parametrize("temp,top_k,top_p,pen,cand", [
    (0.9, 0, 0.75, 1.5, 256),  # fast path
    (0.9, 0, 0.75, 1.5, 2),    # exact fallback (2 candidates never hold the nucleus)
    (1.2, 4, 0.0, 1.0, 256),   # top-k
    (1.0, 0, 1.0, 1.0, 256),   # plain softmax
])
def test_sample_distribution_chi_square(temp, top_k, top_p, pen, cand):
    logits = [1.0, 2.5, 0.3, -0.4, 2.2, 1.7, -1.0, 0.9, 3.0, 0.0]
    recent = [8, 8, 1, -1]
    want = torch.tensor(filtered_distribution(logits, temp, top_k, top_p, pen, recent), dtype=torch.float64)
    n = 40000
    x = torch.tensor(logits).expand(n, -1).contiguous()
    rec = torch.tensor(recent).expand(n, -1)
    g = torch.Generator().manual_seed(1234)
    draws = {  # the exponential race (default) and the Gumbel-max form with explicit noise
        "race": kernels.sample(x, temp, top_k, top_p, pen, rec, generator=g, candidates=cand),
        "gumbel": kernels.sample(x, temp, top_k, top_p, pen, rec, candidates=cand,
                                 noise=kernels.gumbel_noise(x.shape, g)),
    }
    kept = want > 0
    df = int(kept.sum()) - 1
    for name, toks in draws.items():
        counts = torch.bincount(toks, minlength=len(logits)).double()
        assert counts[~kept].sum() == 0, f"{name}: sampled a filtered-out token"
        expected = want[kept] * n
        chi2 = ((counts[kept] - expected) ** 2 / expected).sum().item()
        assert chi2 < df + 6 * math.sqrt(2 * df) + 6, (name, chi2, df)  # far past the 0.999 quantile
    # and the sort-based reference with torch.multinomial follows the same distribution
    ref = kernels.sample_reference(x, temp, top_k, top_p, pen, rec, generator=g)
    tv = 0.5 * (torch.bincount(ref, minlength=len(logits)).double() / n - want).abs().sum()
    assert tv < 0.02
