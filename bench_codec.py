"""Streaming speed of codec.Mimi vs the `moshi` package's Mimi, same weights, same run.

Per 80 ms frame: streaming encode of 1920 samples, then streaming decode of its 8 codes. Ours and
moshi's alternate frame by frame, so load from other processes hits both alike; medians are
reported, plus a check that both produce identical codes. Without --weights the fixture's seeded
weights are used (same architecture and sizes as the release, so the same speed).

    python bench_codec.py --threads 2 --frames 60            # needs: pip install --no-deps moshi; einops, sentencepiece
    python bench_codec.py --profile                          # where our time goes (torch profiler)
"""
import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

import codec

def seeded_weights(path):
    """Write the fixture README's seeded Mimi weights (official names) to `path`: the same rule the
    parity tests use, taken from them so there is one copy of it."""
    from safetensors.torch import save_file
    from tests.conftest import seeded_mimi_state
    save_file(seeded_mimi_state(), str(path))
    return path


def test_signal(frames, seed=0):
    """Speech-like test input: a few harmonics with a moving pitch plus noise."""
    t = torch.arange(frames * codec.FRAME_SIZE) / codec.SAMPLE_RATE
    f0 = 140 + 40 * torch.sin(2 * math.pi * 0.7 * t)
    phase = 2 * math.pi * torch.cumsum(f0, 0) / codec.SAMPLE_RATE
    x = sum(torch.sin(k * phase) / k for k in range(1, 6)) * 0.2
    return (x + 0.01 * torch.randn(len(t), generator=torch.Generator().manual_seed(seed)))[None, None]


def timed(fn):
    """(result, wall seconds, CPU seconds of this process): on a shared machine the CPU time is
    the steadier number, the wall time is what a live loop feels."""
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, (time.perf_counter() - t, time.process_time() - c)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", help="Mimi safetensors (default: the fixture's seeded weights)")
    p.add_argument("--frames", type=int, default=60, help="80 ms frames to stream")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-moshi", action="store_true", help="time ours only")
    p.add_argument("--profile", action="store_true", help="print a torch profile of ours")
    args = p.parse_args(argv)
    tmp = tempfile.TemporaryDirectory()
    weights = args.weights or seeded_weights(Path(tmp.name) / "seeded.safetensors")
    torch.set_num_threads(args.threads)   # after the test module's import, which pins one thread
    ours = codec.Mimi.from_pretrained(weights)
    wav = test_signal(args.frames + args.warmup)
    n = wav.shape[-1] // codec.FRAME_SIZE
    frames = [wav[..., i * codec.FRAME_SIZE:(i + 1) * codec.FRAME_SIZE] for i in range(n)]
    ref = None
    if not args.no_moshi:
        try:
            from moshi.models import loaders
        except ImportError as e:
            raise SystemExit(f"error: the moshi package is needed for the comparison ({e}); "
                             "pip install --no-deps moshi einops sentencepiece, or pass --no-moshi")
        from safetensors.torch import load_file
        ref = loaders.get_mimi(None, device="cpu")
        ref.load_state_dict(load_file(str(weights)))
    if args.profile:
        from torch.profiler import profile
        with ours.streaming(1):
            for f in frames[: args.warmup]:
                ours.decode(ours.encode(f))
            with profile() as prof:
                for f in frames[args.warmup:]:
                    ours.decode(ours.encode(f))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
        return
    stats = {k: [] for k in ("ours_enc", "ours_dec", "moshi_enc", "moshi_dec")}
    same, max_diff = True, 0.0
    with torch.inference_mode(), ours.streaming(1), (ref.streaming(1) if ref else torch.no_grad()):
        for i, f in enumerate(frames):
            c, te = timed(lambda: ours.encode(f))
            y, td = timed(lambda: ours.decode(c))
            if ref is not None:
                rc, rte = timed(lambda: ref.encode(f))
                ry, rtd = timed(lambda: ref.decode(rc))
                same &= torch.equal(c, rc)
                max_diff = max(max_diff, (y - ry).abs().max().item())
            if i >= args.warmup:
                stats["ours_enc"].append(te), stats["ours_dec"].append(td)
                if ref is not None:
                    stats["moshi_enc"].append(rte), stats["moshi_dec"].append(rtd)
    med = {k: [1000 * statistics.median(x[j] for x in v) for j in (0, 1)] for k, v in stats.items() if v}
    print(f"streaming Mimi, {args.frames} frames of 80 ms, torch threads = {args.threads}, "
          f"weights = {'seeded (fixture rule)' if not args.weights else args.weights}")
    print("| implementation | encode ms/frame | decode ms/frame | total ms/frame (wall) "
          "| total CPU ms/frame | wall / real time |")
    print("|---|---|---|---|---|---|")
    tot = {}
    for who in ("ours", "moshi"):
        if f"{who}_enc" in med:
            e, d = med[f"{who}_enc"], med[f"{who}_dec"]
            tot[who] = (e[0] + d[0], e[1] + d[1])
            print(f"| {who} | {e[0]:.1f} | {d[0]:.1f} | {tot[who][0]:.1f} | {tot[who][1]:.1f} "
                  f"| {tot[who][0] / 80:.2f} |")
    if ref is not None:
        print(f"speed-up vs moshi: {tot['moshi'][0] / tot['ours'][0]:.2f}x wall, "
              f"{tot['moshi'][1] / tot['ours'][1]:.2f}x CPU; identical codes: {same}; "
              f"max |decoded diff| = {max_diff:.2e}")


if __name__ == "__main__":
    main()
