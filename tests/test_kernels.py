"""Tests for kernels.py: attention against torch's SDPA (float32 and bf16, GQA, causal with queries
aligned to the end of the keys, lengths that are not multiples of the tile), decode against a static
cache, and the sampler against hand-computed distributions (chi-square) and the official sort-based
reference. torch.compile is slow on CPU, so only a few shapes go through the compiled path; the eager
path (same code) covers the rest with small tiles."""
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

torch.set_num_threads(1)   # a shared 2-core machine: a second thread mostly waits for the first


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
# keys split into chunks of 64 (flash-decoding): chunk 1 partly valid, chunk 2 empty
assert kernels._keys_per_split(q, torch.empty(1, 4, 4096, 32), 4) == 2048
kc, vc = torch.randn(2, 4, 100, 32), torch.randn(2, 4, 100, 32)
for n, Tq in ((61, 1), (100, 1), (90, 3)):
    q = torch.randn(2, 28, Tq, 32)
    for causal in (True, False):
        o = kernels._attention_triton(q, kc, vc, causal, torch.tensor(n), keys_per_split=64)
        torch.testing.assert_close(o, sdpa(q, kc[:, :, :n], vc[:, :, :n], causal), atol=2e-5, rtol=2e-5)
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
def test_decode_attention_static_cache(dtype, monkeypatch):
    """Slots >= cache_len hold garbage and must be ignored: eagerly (valid slots sliced), and as
    traced into a compiled step (masked SDPA for small caches, the fused kernel for large ones),
    where cache_len is a tensor, so a new length must not recompile the graph."""
    q, kc, vc = qkv(2, 28, 4, 1, 96, 32, dtype)
    kc[:, :, 70:] = 1e4  # garbage beyond the valid length
    for sdpa_max in (0, 1 << 18):
        monkeypatch.setattr(kernels, "SDPA_DECODE_MAX", sdpa_max)
        torch._dynamo.reset()
        traced = torch.compile(kernels.decode_attention, backend="eager", fullgraph=True)
        for n in (70, 1, 96):
            want = sdpa(q.float(), kc[:, :, :n].float(), vc[:, :, :n].float())
            with torch._dynamo.config.patch(error_on_recompile=n != 70):
                got = traced(q, kc, vc, torch.tensor([n]))
            for out in (got, kernels.decode_attention(q, kc, vc, torch.tensor([n])),
                        kernels.decode_attention_tiled(q, kc, vc, torch.tensor(n))):
                torch.testing.assert_close(out.float(), want, atol=TOL[dtype], rtol=TOL[dtype])


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
    recent = torch.tensor([[0, 1, 1, 5, 4]])             # duplicates and an empty slot (V = 5)
    want = torch.tensor([[1.0, -2.0, 0.5, 3.0, -1.0]])   # positive / 2, negative * 2, once each
    assert torch.equal(kernels._penalise(logits, recent, 2.0), want)


def test_repetition_penalty_then_argmax_hand_worked():
    # temperature 0 is the argmax AFTER the penalty (the official order); V = 3 marks an empty slot
    x = torch.tensor([[2.0, -1.0, 1.5], [-1.0, -1.5, -3.0]])
    rec = torch.tensor([[0, 3], [0, 0]])
    u = torch.rand(2, 1)
    for draw in (lambda **kw: kernels.sample(x, u, 0.0, **kw), lambda **kw: kernels.sample_reference(x, 0.0, **kw)):
        assert draw(penalty=2.0, recent=rec).tolist() == [2, 1]
        assert draw(penalty=1.0, recent=rec).tolist() == [0, 0]


def test_rejection_tries_make_a_miss_negligible():
    for top_p in (0.5, 0.8, 0.9, 0.95):
        assert (1 - top_p) ** kernels.rejection_tries(top_p) < 1e-9
    assert kernels.rejection_tries(1.0) == kernels.rejection_tries(0.0) == 1


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
    elif top_p <= 0 and top_k > 0:
        kept = order[:top_k]
    else:
        kept = order
    total = sum(p[i] for i in kept)
    return [p[i] / total if i in kept else 0.0 for i in range(len(p))]


@pytest.mark.parametrize("temp,top_k,top_p,pen", [
    (0.9, 0, 0.75, 1.5),    # nucleus (rejection) with the penalty
    (0.5, 0, 0.3, 1.0),     # a small nucleus: most candidates are rejected
    (1.2, 4, 0.0, 1.0),     # top-k (top-p off)
    (1.0, 3, 1.0, 1.0),     # top-p >= 1 takes precedence over top-k: keep everything
])
def test_sample_distribution_chi_square(temp, top_k, top_p, pen):
    logits = [1.0, 2.5, 0.3, -0.4, 2.2, 1.7, -1.0, 0.9, 3.0, 0.0]
    V, recent = len(logits), [8, 8, 1]
    want = torch.tensor(filtered_distribution(logits, temp, top_k, top_p, pen, recent), dtype=torch.float64)
    n = 40000
    x = torch.tensor(logits).expand(n, -1)
    rec = torch.tensor(recent + [V]).expand(n, -1)                # V: an empty window slot
    g = torch.Generator().manual_seed(1234)
    u = torch.rand(n, kernels.rejection_tries(top_p), generator=g)
    toks = kernels.sample(x, u, temp, top_p, top_k, pen, rec)
    kept = want > 0
    df = int(kept.sum()) - 1
    counts = torch.bincount(toks, minlength=V).double()
    assert toks.dtype == torch.long and counts[~kept].sum() == 0  # nothing outside the kept set
    expected = want[kept] * n
    chi2 = ((counts[kept] - expected) ** 2 / expected).sum().item()
    assert chi2 < df + 6 * math.sqrt(2 * df) + 6, (chi2, df)      # far past the 0.999 quantile
    # the official sort-based reference with torch.multinomial follows the same distribution
    ref = kernels.sample_reference(x, temp, top_p, top_k, pen, rec, generator=g)
    tv = 0.5 * (torch.bincount(ref, minlength=V).double() / n - want).abs().sum()
    assert tv < 0.02


def test_sampler_compiled_equals_eager_and_text_vocab_stays_in_the_nucleus():
    """At the text vocabulary (152,064): every draw lies in the reference's nucleus, and the
    compiled sampler (no graph break) draws the same tokens from the same uniforms."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 152064, generator=g) * 2
    x[:2, :10] += 12                                              # two peaked rows, two flat ones
    recent = torch.randint(0, 152064, (4, 50), generator=g)
    u = torch.rand(4, kernels.rejection_tries(0.9), generator=g)
    eager = kernels.sample(x, u, 1.0, 0.9, 0, 1.03, recent)
    p = torch.softmax(kernels._penalise(x, recent, 1.03), -1)
    ps, order = p.sort(-1, descending=True)
    nucleus = torch.zeros_like(p, dtype=torch.bool).scatter(1, order, (ps.cumsum(-1) - ps) <= 0.9)
    assert nucleus.gather(1, eager[:, None]).all()
    compiled = torch.compile(kernels.sample, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x, u, 1.0, 0.9, 0, 1.03, recent), eager)


def test_sampler_takes_the_first_accepted_candidate_when_the_first_misses():
    """Token 0 holds 95% of the mass, so the top-0.9 nucleus is {0}. The first uniform (0.99) lands
    past token 0 (a miss), the second (0.5) on it: the draw is 0, from the first accepted; a row
    whose first candidate is accepted keeps it; eager (first candidate alone first) and compiled agree."""
    x = torch.full((2, 1000), math.log(0.05 / 999))              # 999 tokens of 0.05/999 each ...
    x[:, 0] = 0.0                                                # ... against token 0's 1: p0 = 1 / 1.05
    u = torch.tensor([[0.99, 0.5, 0.2], [0.3, 0.99, 0.99]])
    assert kernels.sample(x, u, 1.0, 0.9).tolist() == [0, 0]
    u[1] = torch.tensor([0.999, 0.99, 0.98])                     # every candidate misses: the first is taken
    first = torch.searchsorted(torch.softmax(x[1], -1).cumsum(-1), torch.tensor([0.999]), right=True)
    assert kernels.sample(x, u, 1.0, 0.9).tolist() == [0, int(first)]
    compiled = torch.compile(kernels.sample, backend="eager", fullgraph=True)   # tests every candidate
    assert compiled(x, u, 1.0, 0.9).tolist() == [0, int(first)]
    u[1] = torch.tensor([0.99, 0.5, 0.2])
    assert compiled(x, u, 1.0, 0.9).tolist() == [0, 0]
