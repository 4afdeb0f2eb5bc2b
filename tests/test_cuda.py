"""The CUDA paths, each against an independent reference; skipped where no GPU is present.

`python bench.py --gpu` runs this file first, then measures. Oracles: torch's SDPA (attention), a
sort-based sampler written here that consumes the same uniforms (sampler), the official fixture's
greedy trace (streaming, eager and under CUDA graphs), the float32 CPU loop (bf16 training with
FSDP2 in one process), and the CPU copy of the weights (checkpoints written from the GPU).
"""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import chat
import kernels
import reference
from model import FLMAudio

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ROOT = Path(__file__).resolve().parents[1]
CUDA = "cuda"
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def qkv(B, Hq, Hkv, Tq, Tk, D, dtype, seed=0):
    g = torch.Generator(CUDA).manual_seed(seed)
    return tuple(torch.randn(B, h, t, D, generator=g, device=CUDA).to(dtype) for h, t in ((Hq, Tq), (Hkv, Tk), (Hkv, Tk)))


def sdpa(q, k, v, causal=True):
    """float32 SDPA with the kernels' conventions: GQA, causal mask aligned to the end of the keys."""
    Tq, Tk = q.shape[2], k.shape[2]
    mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq) if causal else None
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)


# ---------------------------------------------------------------------------------------------
# attention: the Triton kernel (eager entry points) and the compiled PyTorch tiles

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hkv,Tq,Tk,D", [
    (2, 8, 2, 300, 300, 64),        # GQA, lengths not multiples of the tiles
    (1, 28, 4, 1024, 1024, 128),    # the 7B's head layout, a prefill
    (1, 28, 4, 80, 2048, 128),      # a chunk of queries aligned to the end of a longer key range
])
def test_prefill_attention_matches_sdpa(dtype, B, Hq, Hkv, Tq, Tk, D):
    q, k, v = qkv(B, Hq, Hkv, Tq, Tk, D, dtype)
    want = sdpa(q, k, v)
    assert kernels._use_triton(q, k, v)
    with torch.no_grad():
        o = kernels._attention_triton(q, k, v, True, torch.tensor(Tk, device=CUDA))
        assert o is not None, "the Triton kernel failed to run (see the warning)"
        torch.testing.assert_close(o.float(), want, atol=TOL[dtype], rtol=TOL[dtype])
        torch.testing.assert_close(kernels.attention(q, k, v).float(), want, atol=TOL[dtype], rtol=TOL[dtype])
        tiles = torch.compile(kernels.attention_tiled, dynamic=False)
        torch.testing.assert_close(tiles(q, k, v).float(), want, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("S,n", [(96, 70), (4096, 4000), (32768, 30001)])
def test_decode_attention_matches_sdpa(dtype, S, n):
    """The 7B layout against a static cache whose slots >= n hold garbage: the Triton kernel (split
    into chunks of keys for long caches) and the compiled form a compiled step runs."""
    q, kc, vc = qkv(1, 28, 4, 1, S, 128, dtype, seed=S)
    kc[:, :, n:] = 1e4
    want = sdpa(q, kc[:, :, :n], vc[:, :, :n])
    length = torch.tensor([n], device=CUDA)
    with torch.no_grad():
        torch.testing.assert_close(kernels.decode_attention(q, kc, vc, length).float(), want,
                                   atol=TOL[dtype], rtol=TOL[dtype])
        assert kernels._triton_ok, "the Triton kernel failed and was switched off (see the warning)"
        traced = torch.compile(kernels.decode_attention, fullgraph=True, dynamic=False)
        torch.testing.assert_close(traced(q, kc, vc, length).float(), want, atol=TOL[dtype], rtol=TOL[dtype])


def test_triton_kernel_is_used_and_agrees_unsplit():
    """The split-key form and the one-program-per-head form give the same numbers."""
    q, kc, vc = qkv(2, 28, 4, 1, 8192, 128, torch.float32, seed=3)
    n = torch.tensor(5000, device=CUDA)
    split = kernels._attention_triton(q, kc, vc, True, n)
    whole = kernels._attention_triton(q, kc, vc, True, n, keys_per_split=8192)
    assert split is not None and whole is not None
    torch.testing.assert_close(split, whole, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# the sampler: the same uniforms give the same tokens as a sort-based reference

def sorted_nucleus_draw(logits, uniforms, temp, top_p, penalty, recent):
    """Reference, row by row in float64 on the CPU: penalty, softmax, the nucleus by a descending
    sort (a token is in if the mass strictly before it is <= top_p); candidate j is the inverse CDF
    (vocabulary order) at uniforms[j]; the first candidate inside the nucleus is the draw."""
    out = []
    for x, u, rec in zip(logits.double().cpu(), uniforms.double().cpu(), recent.cpu()):
        x = x.clone()
        ids = rec[rec < x.numel()].unique()
        x[ids] = torch.where(x[ids] > 0, x[ids] / penalty, x[ids] * penalty)
        p = torch.softmax(x / temp, -1)
        ps, order = p.sort(descending=True)
        inside = torch.zeros_like(p, dtype=torch.bool)
        inside[order] = (ps.cumsum(0) - ps) <= top_p
        cdf = p.cumsum(0)
        cands = [min(int(torch.searchsorted(cdf, uj * cdf[-1], right=True)), p.numel() - 1) for uj in u]
        out.append(next((c for c in cands if inside[c]), cands[0]))
    return torch.tensor(out)


@pytest.mark.parametrize("vocab,temp,pen", [(152064, 1.0, 1.03), (2050, 0.5, 1.2)])
def test_sampler_on_gpu_matches_the_reference_with_the_same_noise(vocab, temp, pen):
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(64, vocab, generator=g) * 2
    x[::2, :20] += 10                                            # peaked rows and flat rows
    recent = torch.randint(0, vocab, (64, 50), generator=g)
    recent[:, -5:] = vocab                                       # empty window slots
    u = torch.rand(64, kernels.rejection_tries(0.9), generator=g)
    want = sorted_nucleus_draw(x, u, temp, 0.9, pen, recent)
    xc, uc, rc = x.to(CUDA), u.to(CUDA), recent.to(CUDA)
    eager = kernels.sample(xc, uc, temp, 0.9, 0, pen, rc)
    compiled = torch.compile(kernels.sample, fullgraph=True, dynamic=False)(xc, uc, temp, 0.9, 0, pen, rc)
    assert eager.is_cuda and torch.equal(eager.cpu(), want) and torch.equal(compiled, eager)


# ---------------------------------------------------------------------------------------------
# streaming: the official fixture's greedy trace, eagerly and as one CUDA graph

def greedy(m, **kw):
    return chat.LMStream(m, temp_text=0, temp_audio=0, repetition_penalty_text=1.0,
                         repetition_penalty_audio=1.0, **kw)


def trace(stream, listen):
    outs = [stream.step(listen[:, :, t].to(CUDA)) for t in range(listen.shape[2])]
    return torch.stack([o for o in outs if o is not None], -1).cpu()


def graphed_trace(m, listen):
    """The greedy trace of a compiled stream, checked to run as one CUDA graph without recompiles
    (graphs of earlier tests are reset first)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = trace(greedy(m, compile=True).warmup(), listen)
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1
    assert not counters["inductor"].get("cudagraph_skips", 0), dict(counters["inductor"])
    return out


def test_streaming_trace_on_gpu_eager_and_cuda_graphs_equals_the_official(official_dir, official_expected):
    e = official_expected
    m = FLMAudio.from_pretrained(official_dir, device=CUDA)
    assert torch.equal(trace(greedy(m), e["stream_listen"])[0], e["stream_out"])
    assert torch.equal(graphed_trace(m, e["stream_listen"])[0], e["stream_out"])
    # and the official-style loop, on the same GPU, agrees too (bench.py's baseline)
    loop = reference.OfficialStyleLoop(m, temp_text=0, temp_audio=0, rep_text=1.0, rep_audio=1.0)
    outs = [loop.step(e["stream_listen"][:, :, t]) for t in range(e["stream_listen"].shape[2])]
    assert torch.equal(torch.cat(outs[1:]).T, e["stream_out"])


def test_bf16_stream_runs_as_one_cuda_graph(official_dir, official_expected):
    """bf16 (chat.py's default on CUDA) is not bit-equal to float32, and a greedy trace of random
    weights diverges at the first near-tie, so this checks that it runs as one graph, without
    recompiles, and yields tokens of the right ranges."""
    e = official_expected
    m = FLMAudio.from_pretrained(official_dir, device=CUDA, dtype=torch.bfloat16)
    out = graphed_trace(m, e["stream_listen"])[0]
    assert out.shape == e["stream_out"].shape
    assert (out[0] < m.cfg.vocab_size).all() and (out[1:] < m.cfg.aud_vocab_size).all() and (out >= 0).all()


# ---------------------------------------------------------------------------------------------
# training: bf16 with FSDP2 in one process against the float32 loop

def test_bf16_fsdp2_training_in_one_process_follows_float32(tmp_path):
    from test_train import losses, make_data, micro_preset
    data = make_data(tmp_path / "data")
    preset = micro_preset(tmp_path, data, steps=(3, 3))
    runs = {"fp32": ["--dtype=float32", "--parallel=ddp"],
            "bf16-fsdp": ["--dtype=bfloat16", "--parallel=fsdp", "--activation_checkpointing=True"]}
    for name, extra in runs.items():
        r = subprocess.run([sys.executable, str(ROOT / "train.py"), preset, f"--out_dir={tmp_path / name}",
                            "--device=cuda", "--eval_interval=6", "--eval_batches=1", "--eval_decode=2", *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = losses(tmp_path / "fp32"), losses(tmp_path / "bf16-fsdp")
    assert sorted(a) == sorted(b) == list(range(1, 7)) and a[1] != a[6]
    for s in a:
        assert abs(a[s] - b[s]) < 0.03 * abs(a[s]), (s, a[s], b[s])
    # the checkpoint FSDP2 wrote loads back as the official layout
    m = FLMAudio.from_pretrained(tmp_path / "bf16-fsdp" / "latest")
    assert json.loads((tmp_path / "bf16-fsdp" / "latest" / "config.json").read_text())["model_type"] == "FLMAudio"
    assert all(torch.isfinite(p).all() for p in m.parameters())


# ---------------------------------------------------------------------------------------------
# checkpoints written from the GPU

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_and_load_on_gpu(official_dir, tmp_path, dtype):
    cpu = FLMAudio.from_pretrained(official_dir, dtype=dtype)
    gpu = FLMAudio.from_pretrained(official_dir, device=CUDA, dtype=dtype)
    gpu.save_pretrained(tmp_path / "from-gpu")
    copy.deepcopy(cpu).save_pretrained(tmp_path / "from-cpu")
    for f in ("model.safetensors", "config.json"):
        assert (tmp_path / "from-gpu" / f).read_bytes() == (tmp_path / "from-cpu" / f).read_bytes()
    back = FLMAudio.from_pretrained(tmp_path / "from-gpu", device=CUDA, dtype=dtype)
    sd = cpu.state_dict()
    assert all(t.is_cuda and torch.equal(t.cpu(), sd[k]) for k, t in back.state_dict().items())


# ---------------------------------------------------------------------------------------------
# LoRA and int8 on the GPU

def test_lora_in_bf16_with_fsdp2_trains_adapters_and_chat_serves_them(tmp_path, official_dir):
    """The one-GPU recipe (config/finetune_flm_lora.py): a bf16 base, float32 adapters, FSDP2 in one
    process, checkpointing; the adapter-only checkpoint is served on the GPU."""
    import lora
    from test_lora import _lora_preset
    args = _lora_preset(tmp_path, official_dir, steps=(2, 1))
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, f"--out_dir={tmp_path / 'o'}", "--device=cuda",
                        "--dtype=bfloat16", "--parallel=fsdp", "--activation_checkpointing=True"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    settings, tensors = lora.read(tmp_path / "o" / "latest" / lora.ADAPTER_FILE)
    assert settings["rank"] == 4 and all(t.dtype == torch.float32 for t in tensors.values())
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if k.endswith(".B"))   # the adapters moved
    m, _ = chat.load_checkpoint(tmp_path / "o" / "latest", device=CUDA, dtype=torch.bfloat16)
    assert next(m.parameters()).is_cuda and not any(".lora." in k for k in m.state_dict())


def test_int8_on_gpu_streams_as_one_graph_and_stays_close(official_dir, official_expected):
    import quantize
    m = FLMAudio.from_pretrained(official_dir, device=CUDA)
    q = quantize.quantize_(copy.deepcopy(m))
    tok = official_expected["stream_cache"][..., :24].to(CUDA)
    with torch.no_grad():
        want, got = m.backbone(tok)[1], q.backbone(tok)[1]
    assert ((got - want).norm() / want.norm()) < 3e-2
    out = graphed_trace(q, official_expected["stream_listen"])[0]
    assert out.shape == official_expected["stream_out"].shape
