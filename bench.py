"""bench.py -- how fast the inference pieces are, each against its plain or official-style baseline.

Sections (every number of a table is measured in the same run, implementations taking turns, so
the ratios are comparable on a shared machine):
  prefill, decode  kernels.attention / decode_attention vs the eager tiles, the reference, SDPA
  sampler          kernels.sample (eager and compiled) vs the official sort-based sampler
  chat             one 80 ms step: chat.LMStream vs tests.reference.OfficialStyleLoop (eager, compiled)
  int8             quantize.py: weight bytes, logits against bf16, greedy traces, step time
  loop             one frame end to end (encode + step + decode), tiny model: real-time factor
  codec            our streaming Mimi vs the `moshi` package's (identical codes), 4 at once, the floor

    python bench.py                   # everything, 2 threads
    python bench.py --only sampler    # one section (repeatable)
    python bench.py --gpu             # on a CUDA machine: tests/test_cuda.py, then the 7B-shaped measures
"""
import argparse
import contextlib
import copy
import importlib.util
import math
import time
import zlib

import torch
import torch.nn.functional as F

import codec as codec_lib
import kernels
from chat import FRAME_RATE, FRAME_SIZE, SAMPLE_RATE, LMStream, Stats, _pct, frame_step
from model import FLMAudio, FLMConfig
from tests.reference import OfficialStyleLoop

# attention layouts: (name, q heads, kv heads, head dim, prefill length)
LAYOUTS = [("tiny", 4, 2, 16, 512), ("67M", 8, 2, 64, 512), ("7B", 28, 4, 128, 1024)]
DECODE_CACHE = 4096  # static cache size for the decode rows


def time_all(fns, budget_ms=3000.0, target_ms=3.0):
    """[(name, ms per call)] of the named callables. They take turns in short repeats of about
    target_ms and each keeps its best repeat: contention from other jobs only ever adds time."""
    est = []
    for _, fn in fns:
        fn()  # warm-up (and compile)
        t0 = time.perf_counter()
        fn()
        est.append(max((time.perf_counter() - t0) * 1e3, 1e-3))
    iters = [max(1, int(target_ms / ms)) for ms in est]
    rounds = max(3, min(30, int(budget_ms / sum(n * ms for n, ms in zip(iters, est)))))
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, (_, fn) in enumerate(fns):
            t0 = time.perf_counter()
            for _ in range(iters[i]):
                fn()
            best[i] = min(best[i], (time.perf_counter() - t0) / iters[i] * 1e3)
    return [(name, ms) for (name, _), ms in zip(fns, best)]


def print_table(rows):
    """Rows (case, implementation, ms) as markdown; the last column is this row's time over the
    case's first row: how many times faster the first implementation is."""
    print("| case | implementation | ms / call | first row's speed-up |\n|---|---|---:|---:|")
    first = {}
    for case, impl, ms in rows:
        first.setdefault(case, ms)
        print(f"| {case} | {impl} | {ms:.3f} | {ms / first[case]:.2f}x |")


# -----------------------------------------------------------------------------
# Kernels


def bench_prefill(args):
    """Causal prefill (Tq = Tk = T): compiled tiles vs eager tiles vs plain reference vs SDPA."""
    rows = []
    for name, hq, hkv, d, T in LAYOUTS:
        q, k, v = (torch.randn(1, h, T, d) for h in (hq, hkv, hkv))
        rows += [(f"prefill {name} {hq}/{hkv}x{d} T={T}", *r) for r in time_all([
            ("attention (compiled)", lambda: kernels.attention(q, k, v)),
            ("tiles (eager)", lambda: kernels.attention_tiled(q, k, v)),
            ("reference", lambda: kernels.attention_reference(q, k, v)),
            ("SDPA", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))])]
    return rows


def bench_decode(args):
    """One query against a static cache with cache - 96 valid slots (a LongTensor length): the
    eager entry (valid slots sliced), the compiled kernel a compiled step runs, references."""
    rows = []
    for name, hq, hkv, d, _ in LAYOUTS:
        q = torch.randn(1, hq, 1, d)
        kc, vc = torch.randn(1, hkv, DECODE_CACHE, d), torch.randn(1, hkv, DECODE_CACHE, d)
        n = DECODE_CACHE - 96
        length = torch.tensor([n])
        tiled = torch.compile(kernels.decode_attention_tiled, dynamic=False)
        rows += [(f"decode {name} {hq}/{hkv}x{d} S={DECODE_CACHE}", *r) for r in time_all([
            ("decode_attention (eager)", lambda: kernels.decode_attention(q, kc, vc, length)),
            ("tiles (compiled)", lambda: tiled(q, kc, vc, length)),
            ("reference", lambda: kernels.attention_reference(q, kc[:, :, :n], vc[:, :, :n])),
            ("SDPA masked cache", lambda: F.scaled_dot_product_attention(
                q, kc, vc, attn_mask=(torch.arange(DECODE_CACHE) < length)[None], enable_gqa=True))])]
    return rows


def lm_like_logits(n, vocab, seed=0):
    """Peaked logits like a trained LM's: N(0, 2) background plus 10 tokens lifted by ~15."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, vocab, generator=g) * 2
    return x.scatter_add(1, torch.randint(0, vocab, (n, 10), generator=g), 15 + 2 * torch.randn(n, 10, generator=g))


def bench_sampler(args):
    """Top-p 0.9 with a repetition penalty over 50 tokens (5 slots empty): kernels.sample vs the
    official sort-based method, on peaked (LM-like) and flat logits."""
    rows, compiled = [], torch.compile(kernels.sample, dynamic=False)
    for vocab, n, temp, pen in ((152064, 1, 1.0, 1.03), (152064, 8, 1.0, 1.03), (2050, 1, 0.5, 1.2)):
        for kind in ("peaked", "flat"):
            x = lm_like_logits(n, vocab) if kind == "peaked" else torch.randn(n, vocab)
            recent = torch.randint(0, vocab, (n, 50))
            recent[:, -5:] = vocab
            u = torch.rand(n, kernels.rejection_tries(0.9))
            rows += [(f"sample V={vocab} N={n} T={temp} {kind}", *r) for r in time_all([
                ("sample (eager)", lambda: kernels.sample(x, u, temp, 0.9, 0, pen, recent)),
                ("sample (compiled)", lambda: compiled(x, u, temp, 0.9, 0, pen, recent)),
                ("sort-based reference", lambda: kernels.sample_reference(x, temp, 0.9, 0, pen, recent))])]
    return rows


# -----------------------------------------------------------------------------
# The chat step: LMStream vs the official-style loop on one random model


def bench_config(name):
    if name == "tiny":
        return FLMConfig.preset("tiny")
    # ~67 M parameters: hidden 512, 8 layers, DepthGPT 4 x 256
    return FLMConfig(vocab_size=264, text_wait_token_id=256, hidden_size=512, intermediate_size=1536,
                     num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                     rope_theta=10000.0, max_position_embeddings=2048,
                     depth_n_layer=4, depth_n_head=4, depth_n_embd=256)


def streaming_model(cfg):
    """A random model as chat.py runs it on this machine (the CPU layout there)."""
    torch.manual_seed(0)
    m = FLMAudio(cfg).eval()
    return m.cpu_layout_() if next(m.parameters()).device.type == "cpu" else m


def bench_step(cfg, steps, compile, max_len=1000):
    """Sorted ms per step of LMStream and of OfficialStyleLoop (the released modules as they are),
    taking turns on the same inputs, and the parameter count."""
    ours = LMStream(streaming_model(cfg), max_len=max_len, compile=compile, seed=0).warmup()
    plain = FLMAudio(cfg).eval()
    loops, times = [ours.step, OfficialStyleLoop(plain).step], ([], [])
    torch.manual_seed(0)
    listen = torch.randint(0, 2048, (steps + 5, 1, cfg.aud_channel))
    for i in range(steps + 5):
        for step, ts in zip(loops, times):
            t0 = time.perf_counter()
            step(listen[i])
            if i >= 5:
                ts.append((time.perf_counter() - t0) * 1e3)
    return sorted(times[0]), sorted(times[1]), plain.num_params()


def bench_chat(args):
    print("\none 80 ms step, official sampling defaults, random weights, batch 1, attention window 1000")
    print("| config | LMStream | p50 ms | p99 ms | official-style p50 ms | p99 ms | speed-up (p50) |\n"
          "|---|---|---|---|---|---|---|")
    for name in args.chat_configs.split(","):
        for compiled in [False, True] if args.compile else [False]:
            o, b, n = bench_step(bench_config(name), args.steps, compiled)
            print(f"| {name} ({n / 1e6:.0f}M) | {'compiled' if compiled else 'eager'} | {_pct(o, 50):.1f} | "
                  f"{_pct(o, 99):.1f} | {_pct(b, 50):.1f} | {_pct(b, 99):.1f} | {_pct(b, 50) / _pct(o, 50):.1f}x |")
    return []


# -----------------------------------------------------------------------------
# int8 weights (quantize.py): size, logits against bf16, greedy traces, step time


def greedy_trace(m, steps, seed=0):
    s = LMStream(m, temp_text=0, temp_audio=0, repetition_penalty_text=1.0, repetition_penalty_audio=1.0, max_len=256)
    g = torch.Generator().manual_seed(seed)
    listen = torch.randint(0, m.cfg.aud_emp_token_id, (steps, 1, m.cfg.aud_channel), generator=g)
    return torch.stack([o for o in (s.step(listen[i]) for i in range(steps)) if o is not None])


def bench_int8(args):
    """Per config: weight bytes, relative logit error against bf16 (and bf16's own against float32),
    the share of a 40-step greedy trace that int8 leaves unchanged, and the eager CPU step."""
    import quantize
    from chat import load_checkpoint
    with torch.device("meta"):
        big = FLMAudio(FLMConfig()).to(torch.bfloat16)
    print(f"\n7B weights: bf16 {quantize.weight_bytes(big) / 1e9:.2f} GB, "
          f"int8 {quantize.weight_bytes(quantize.quantize_(big)) / 1e9:.2f} GB")
    print("| model | MB fp32 / int8 | logits rel. error: bf16 vs fp32 | int8 vs bf16 | greedy trace unchanged | "
          "step ms fp32 | int8 |\n|---|---|---|---|---|---|---|")
    models = [(n, lambda n=n: FLMAudio(bench_config(n)).eval()) for n in ("tiny", "67m")]
    if args.checkpoint:
        models.append((args.checkpoint, lambda: load_checkpoint(args.checkpoint)[0]))
    for name, make in models:
        torch.manual_seed(0)
        m = make()
        bf16 = copy.deepcopy(m).to(torch.bfloat16)
        q = quantize.quantize_(copy.deepcopy(m))
        tok = torch.randint(0, min(250, m.cfg.vocab_size), (2, 17, 48), generator=torch.Generator().manual_seed(1))
        tok[:, 1:] %= m.cfg.aud_emp_token_id                      # real codes of the model's codec
        with torch.no_grad():
            want, half, got = m.backbone(tok)[1], bf16.backbone(tok)[1], quantize.quantize_(copy.deepcopy(bf16)).backbone(tok)[1]
        rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
        same = (greedy_trace(m, 40) == greedy_trace(q, 40)).float().mean().item()
        listen = torch.randint(0, m.cfg.aud_emp_token_id, (1, m.cfg.aud_channel))
        ms = [t for _, t in time_all([(k, lambda s=LMStream(x, max_len=256, seed=0): s.step(listen))
                                      for k, x in (("fp32", m), ("int8", q))], budget_ms=2000)]
        print(f"| {name} ({m.num_params() / 1e6:.0f}M) | {quantize.weight_bytes(m) / 1e6:.0f} / "
              f"{quantize.weight_bytes(q) / 1e6:.0f} | {rel(half, want):.2e} | {rel(got, half):.2e} | {same:.0%} | "
              f"{ms[0]:.1f} | {ms[1]:.1f} |")
    return []


# -----------------------------------------------------------------------------
# Codecs: the full loop, and our Mimi against Kyutai's


def random_mimi(seed=0):
    """codec.Mimi with random weights (every tensor drawn from a generator seeded by its name):
    the released architecture and sizes, so the released speed."""
    mimi = codec_lib.Mimi()
    with torch.no_grad():
        for name, t in list(mimi.named_parameters()) + list(mimi.named_buffers()):
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + seed)
            if "cluster_usage" in name:
                t.copy_(1 + torch.rand(t.shape, generator=g))
            elif "embedding_sum" in name:
                t.copy_(torch.randn(t.shape, generator=g))
            elif "scale" in name:
                t.copy_(0.01 + 0.01 * torch.rand(t.shape, generator=g))
            elif t.dim() == 1:
                t.copy_(("norm" in name) + 0.02 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(t[0].numel()))
    return mimi


def bench_loop(args):
    """One frame end to end (encode + LMStream step + decode) on the tiny model, random audio."""
    from demo.codec import DemoCodec
    demo = DemoCodec.fit([0.1 * torch.randn(SAMPLE_RATE * 4, generator=torch.Generator().manual_seed(0))], iters=1)
    print("\nfull loop, tiny model (eager LMStream), one frame = encode + step + decode:")
    print("| codec | frames | codec p50 ms | step p50 ms | total p50 ms | total p99 ms | real-time factor |\n"
          "|---|---|---|---|---|---|---|")
    for name, codec in (("Mimi (random weights)", random_mimi()), ("DemoCodec", demo)):
        stream = LMStream(streaming_model(FLMConfig.preset("tiny")), max_len=1000, seed=0)
        stats, wav = Stats(), 0.1 * torch.randn(FRAME_SIZE * (args.steps + 5))
        with codec.streaming(1):
            for f in range(args.steps + 5):
                frame_step(codec, stream, wav[f * FRAME_SIZE:(f + 1) * FRAME_SIZE].view(1, 1, -1),
                           stats if f >= 5 else None)
        col = {k: sorted(r[k] * 1e3 for r in stats.rows) for k in ("codec", "model", "total")}
        rtf = sum(col["total"]) / 1e3 / (len(stats.rows) / FRAME_RATE)
        print(f"| {name} | {len(stats.rows)} | {_pct(col['codec'], 50):.1f} | {_pct(col['model'], 50):.1f} | "
              f"{_pct(col['total'], 50):.1f} | {_pct(col['total'], 99):.1f} | {rtf:.3f} |")
    return []


def machine_floor(threads):
    """(GFLOP/s of a 1024^3 GEMM, GB/s reading 256 MB) on this processor with `threads` threads."""
    torch.set_num_threads(threads)
    a, buf = torch.randn(1024, 1024), torch.randn(64 << 20)
    (_, gemm), (_, read) = time_all([("gemm", lambda: a @ a), ("read", buf.sum)], budget_ms=1000)
    return 2 * 1024 ** 3 / gemm / 1e6, buf.numel() * 4 / read / 1e6


def bench_codec(args):
    """Streaming encode then decode of each 80 ms frame, on 1 and 2 threads, taking turns: ours,
    moshi's (same weights, identical codes) and ours on 4 conversations at once; then the floor:
    the frame's FLOPs at this CPU's GEMM rate, its weight bytes (all read every frame) at its bandwidth."""
    try:
        from moshi.models import loaders
    except ImportError as e:
        print(f"\ncodec: skipped, the moshi package is needed ({e}); pip install --no-deps moshi einops sentencepiece")
        return []
    from torch.utils.flop_counter import FlopCounterMode
    ours = random_mimi()
    own = dict(ours.named_parameters()) | dict(ours.named_buffers())
    ref = loaders.get_mimi(None, device="cpu")
    sd = {k: torch.ones_like(v) if k.endswith("_initialized") else v for k, v in ref.state_dict().items()}
    for official, name in codec_lib.Mimi.official_names().items():
        sd[official] = own[name].reshape(sd[official].shape)         # 1x1 convs are Linear here
    ref.load_state_dict(sd)
    t = torch.arange((args.steps + 5) * FRAME_SIZE) / SAMPLE_RATE
    phase = 2 * math.pi * torch.cumsum(140 + 40 * torch.sin(2 * math.pi * 0.7 * t), 0) / SAMPLE_RATE
    wav = (sum(torch.sin(k * phase) / k for k in range(1, 6)) * 0.2)[None, None]
    with torch.inference_mode(), ours.streaming(1), FlopCounterMode(display=False) as flops:
        ours.decode(ours.encode(wav[..., :FRAME_SIZE]))
    gflop, mbytes = flops.get_total_flops() / 1e9, sum(v.numel() * v.element_size() for v in own.values()) / 1e6
    print(f"\nstreaming Mimi, {args.steps} frames of 80 ms, random weights (released sizes); {gflop:.2f} GFLOP "
          f"and {mbytes:.0f} MB of weights per frame")
    print("| threads | implementation | encode p50 ms | decode p50 ms | total p50 ms | real-time factor | codes identical |"
          "\n|---|---|---|---|---|---|---|")
    gains = torch.tensor([1, .8, .6, .4])[:, None, None]           # 4 conversations, the first as above
    impls = [("ours", ours, 1), ("moshi", ref, 1), ("ours, 4 conversations (each)", copy.deepcopy(ours), 4)]
    for threads in (1, 2):
        torch.set_num_threads(threads)
        times, same = {(k, part): [] for k, _, _ in impls for part in ("encode", "decode")}, True
        with torch.inference_mode(), contextlib.ExitStack() as stack:
            for _, m, b in impls:
                stack.enter_context(m.streaming(b))
            for i in range(args.steps + 5):
                codes = []
                for k, m, b in impls:
                    t0 = time.perf_counter()
                    codes.append(m.encode(wav[..., i * FRAME_SIZE:(i + 1) * FRAME_SIZE] * gains[:b]))
                    t1 = time.perf_counter()
                    m.decode(codes[-1])
                    if i >= 5:
                        times[k, "encode"].append((t1 - t0) * 1e3 / b)
                        times[k, "decode"].append((time.perf_counter() - t1) * 1e3 / b)
                same &= all(torch.equal(codes[0], c[:1]) for c in codes[1:])
        p50 = {k: _pct(sorted(v), 50) for k, v in times.items()}
        for k, _, _ in impls:
            e, d = p50[k, "encode"], p50[k, "decode"]
            print(f"| {threads} | {k} | {e:.1f} | {d:.1f} | {e + d:.1f} | {(e + d) / 80:.2f} | {same} |")
        ours_ms, moshi_ms = (p50[k, "encode"] + p50[k, "decode"] for k in ("ours", "moshi"))
        print(f"| {threads} | speed-up vs moshi (p50) | {p50['moshi', 'encode'] / p50['ours', 'encode']:.2f}x | "
              f"{p50['moshi', 'decode'] / p50['ours', 'decode']:.2f}x | {moshi_ms / ours_ms:.2f}x | | |")
        rate, bw = machine_floor(threads)
        print(f"| {threads} | floor: FLOPs at {rate:.0f} GFLOP/s / weights at {bw:.1f} GB/s | | | "
              f"{gflop / rate * 1e3:.1f} / {mbytes / bw:.1f} | ours {ours_ms / max(gflop / rate * 1e3, mbytes / bw):.1f}x "
              f"the larger | |")
    torch.set_num_threads(args.threads)
    return []


# -----------------------------------------------------------------------------
# GPU (`--gpu`): the CUDA tests, then the 7B-shaped numbers, one table, written as JSON too


def gpu_ms(fn, iters=50):
    """Median ms per call by CUDA events, after warm-up calls (the first compiles)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def gpu_bandwidth():
    """Bytes read + written per second by a 4 GiB device-to-device copy: the floor's denominator."""
    x = torch.empty(1 << 30, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    ms = gpu_ms(lambda: y.copy_(x), iters=10)
    del x, y
    return 2 * (1 << 32) / (ms / 1e3)


def random_7b(dtype=torch.bfloat16):
    """The released shape with random weights, built on the GPU directly (no host copy)."""
    with torch.device("meta"):
        m = FLMAudio(FLMConfig())
    m = m.to(dtype=dtype).to_empty(device="cuda")
    torch.manual_seed(0)
    with torch.no_grad():
        m.apply(m._init_weights)
    return m.eval()


def streamed_bytes(m):
    """Weight bytes one streaming step reads: every matrix and vector except the embedding tables,
    of which a step reads 17 rows (backbone) and one row per codebook (DepthGPT)."""
    tables = {id(t.weight) for t in [m.embed.table, m.depth_gpt.wpe, *m.depth_gpt.wtes]}
    return sum(p.numel() * p.element_size() for p in m.parameters() if id(p) not in tables)


def gpu_stream_step(res, steps):
    m, bw = random_7b(), res["bandwidth_GBps"] * 1e9
    floor = streamed_bytes(m) / bw * 1e3
    listen = torch.randint(0, 2048, (steps + 10, 1, 8), device="cuda")

    def per_step(step):
        ts = []
        for i in range(steps + 10):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(listen[i])
            torch.cuda.synchronize()
            if i >= 10:
                ts.append((time.perf_counter() - t0) * 1e3)
        return sorted(ts)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    graphed = LMStream(m, compile=True, seed=0).warmup()
    res["7B step compile s"] = time.perf_counter() - t0
    ours = per_step(graphed.step)
    res["7B step peak GB"] = torch.cuda.max_memory_allocated() / 1e9
    m.drop_cache()
    eager = per_step(LMStream(m, seed=0).step)
    m.drop_cache()
    official = per_step(OfficialStyleLoop(m).step)
    res.update({"7B step p50 ms": _pct(ours, 50), "7B step p99 ms": _pct(ours, 99), "7B step floor ms": floor,
                "7B step eager p50 ms": _pct(eager, 50), "7B official-style p50 ms": _pct(official, 50),
                "7B official-style p99 ms": _pct(official, 99), "7B weights GB": streamed_bytes(m) / 1e9})
    del m, graphed


def gpu_attention(res):
    for S in (4096, 32768):
        q = torch.randn(1, 28, 1, 128, device="cuda", dtype=torch.bfloat16)
        kc, vc = (torch.randn(1, 4, S, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        n = torch.tensor([S], device="cuda")
        tiled = torch.compile(kernels.decode_attention, dynamic=False)
        res[f"decode S={S} ours (Triton) us"] = 1e3 * gpu_ms(lambda: kernels.decode_attention(q, kc, vc, n), 200)
        res[f"decode S={S} ours (compiled) us"] = 1e3 * gpu_ms(lambda: tiled(q, kc, vc, n), 200)
        res[f"decode S={S} SDPA us"] = 1e3 * gpu_ms(
            lambda: F.scaled_dot_product_attention(q, kc, vc, enable_gqa=True), 200)
    for T in (1024, 4096):
        q, k, v = (torch.randn(1, h, T, 128, device="cuda", dtype=torch.bfloat16) for h in (28, 4, 4))
        with torch.no_grad():
            res[f"prefill T={T} ours (Triton) us"] = 1e3 * gpu_ms(lambda: kernels.attention(q, k, v))
            res[f"prefill T={T} SDPA us"] = 1e3 * gpu_ms(
                lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))


def gpu_training(res, layers=4, batch=4, T=2048):
    """A 7B-shaped backbone slice: float32 master weights, bf16 autocast, each layer compiled and
    checkpointed, fused AdamW; MFU counts 6 x parameters + 12 x L x H x T per token (PaLM's)."""
    from torch.utils.checkpoint import checkpoint

    import sizing
    from model import DecoderLayer, rope_cos_sin
    cfg = FLMConfig()
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(DecoderLayer(cfg) for _ in range(layers)).cuda()
    for b in blocks:
        b.compile()
    opt = torch.optim.AdamW(blocks.parameters(), lr=1e-5, fused=True)
    x = torch.randn(batch, T, cfg.hidden_size, device="cuda")
    cos, sin = rope_cos_sin(torch.arange(T, device="cuda"), cfg.head_dim, cfg.rope_theta)

    def step():
        with torch.autocast("cuda", torch.bfloat16):
            h = x
            for b in blocks:
                h = checkpoint(b, h, cos, sin, use_reentrant=False)
            loss = h.float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.reset_peak_memory_stats()
    ms = gpu_ms(step, iters=5)
    n = sum(p.numel() for p in blocks.parameters())
    flops = (6 * n + 12 * layers * cfg.hidden_size * T) * batch * T
    peak = sizing.guess_peak_flops(torch.device("cuda")) or 989e12
    inside = sizing.layer_bytes_per_column(cfg, 2)
    estimate = 18 * n + batch * T * (layers * 2 * cfg.hidden_size + inside)   # + bf16 copies, as memory_plan
    res.update({"train slice ms": ms, "train slice tokens/s": batch * T / ms * 1e3,
                "train slice MFU": flops / (ms / 1e3) / peak, "train slice peak GB": torch.cuda.max_memory_allocated() / 1e9,
                "train slice estimated GB": estimate / 1e9})


def gpu_lora_memory(res, window=1500):
    """The one-GPU LoRA recipe's peak memory on the 7B shape (config/finetune_flm_lora.py: bf16
    base, rank-16 adapters, checkpointing, one 2-minute window), beside sizing.py's estimate."""
    import functools

    from torch.utils.checkpoint import checkpoint

    import lora
    import sizing
    m = random_7b()
    lora.add(m, 16, 16.0)
    for layer in m.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4, fused=True)
    cfg = m.cfg
    tok = torch.randint(0, 2048, (1, 17, window + 1), device="cuda")
    tok[:, 0] = torch.randint(0, cfg.vocab_size, (1, window + 1), device="cuda")
    w = torch.ones(1, 9, window + 1, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(2):
        with torch.autocast("cuda", torch.bfloat16):
            loss, _ = m(tok, w)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    plan = sizing.memory_plan(cfg, 1, 1, window, "ddp", True, 2, m.lora)
    res.update({"7B LoRA step s": (time.perf_counter() - t0) / 2,
                "7B LoRA peak GB": torch.cuda.max_memory_allocated() / 1e9, "7B LoRA estimated GB": plan["total"]})
    del m, opt


def run_gpu(args):
    import json
    import subprocess
    import sys
    import traceback
    from pathlib import Path

    import sizing
    if not torch.cuda.is_available():
        raise SystemExit("bench.py --gpu: no CUDA device")
    name = torch.cuda.get_device_name()
    res = {"gpu": name, "torch": torch.__version__}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{name}, torch {torch.__version__}, triton {getattr(kernels, 'triton', None) and kernels.triton.__version__}")
    if args.tests:
        par = ["-n", "4"] if importlib.util.find_spec("xdist") else []   # the compiles are CPU work
        log = out.with_suffix(".tests.txt")
        with open(log, "w") as f:
            try:
                subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *par,
                                "tests/test_cuda.py"], stdout=f, stderr=subprocess.STDOUT, timeout=args.tests_timeout)
            except subprocess.TimeoutExpired:
                f.write(f"\ntimed out after {args.tests_timeout} s\n")
        lines = log.read_text().strip().splitlines() or ["no output"]
        print("\n".join(lines[-40:]))
        res["cuda tests"] = lines[-1]
    print("\nmemory per GPU of training the 7B (estimate, meta device), batch 1 x 1500 frames (2 min), checkpointing:")
    for world in (1, 2, 4, 8):
        plan = sizing.memory_plan(FLMConfig(), world, 1, 1500, "fsdp")
        print(sizing.memory_line(plan, world, 1, 1500, "fsdp", True))
        res[f"7B FSDP2 x{world} GB per GPU"] = plan["total"]
    res["bandwidth_GBps"] = gpu_bandwidth() / 1e9
    for section in (gpu_attention, lambda r: gpu_stream_step(r, args.steps), gpu_training, gpu_lora_memory):
        try:
            section(res)
        except Exception:
            traceback.print_exc()
        torch.cuda.empty_cache()
        out.write_text(json.dumps(res, indent=1))
    print(f"\n| measure | {name} |\n|---|---:|")
    for k, v in res.items():
        print(f"| {k} | {v:.3g} |" if isinstance(v, float) else f"| {k} | {v} |")
    checks = [("7B step p50 <= 12 ms", res.get("7B step p50 ms", 1e9) <= 12),
              ("7B step >= 3x official-style", res.get("7B official-style p50 ms", 0) >= 3 * res.get("7B step p50 ms", 1e9)),
              ("decode >= SDPA at 4k and 32k", all(res.get(f"decode S={S} ours (Triton) us", 1e9) <= res.get(f"decode S={S} SDPA us", 0)
                                                    for S in (4096, 32768))),
              ("training slice MFU >= 40 %", res.get("train slice MFU", 0) >= 0.4),
              ("7B LoRA fine-tuning <= 40 GB", res.get("7B LoRA peak GB", 1e9) <= 40)]
    print("\n" + "\n".join(f"target {'met' if ok else 'NOT met'}: {what}" for what, ok in checks))
    print(f"wrote {out}")


# -----------------------------------------------------------------------------
# Command line

SECTIONS = {"prefill": bench_prefill, "decode": bench_decode, "sampler": bench_sampler,
            "chat": bench_chat, "int8": bench_int8, "loop": bench_loop, "codec": bench_codec}


def processor():
    try:
        return next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown processor"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=list(SECTIONS), action="append", help="run only these sections (repeatable)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--chat-configs", default="tiny,67m", help="chat: model configs to time")
    ap.add_argument("--steps", type=int, default=50, help="chat, loop, codec: timed steps (80 ms frames)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="chat: also time the torch.compile'd step (default on)")
    ap.add_argument("--checkpoint", help="int8: also measure this trained checkpoint")
    ap.add_argument("--gpu", action="store_true", help="the CUDA tests, then the 7B-shaped GPU measures")
    ap.add_argument("--json", default="results/gpu.json", help="--gpu: where the table goes as JSON")
    ap.add_argument("--tests", action=argparse.BooleanOptionalAction, default=True, help="--gpu: run tests/test_cuda.py first")
    ap.add_argument("--tests-timeout", type=int, default=300, help="--gpu: seconds for the CUDA tests")
    args = ap.parse_args()
    if args.gpu:
        return run_gpu(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{processor()}, torch {torch.__version__}, {args.threads} threads, kernels compile={kernels.COMPILE}\n")
    rows = []
    for name in args.only or list(SECTIONS):
        rows += SECTIONS[name](args)
        if rows and name in ("prefill", "decode", "sampler"):
            print_table(rows)
            print()
            rows = []


if __name__ == "__main__":
    main()
