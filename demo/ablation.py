"""demo/ablation.py -- the paper's two claims, tested at small scale on the CPU demo.

    python demo/ablation.py             # 4 arms x 3 seeds, 2 runs at a time: about 2.5 h on 2 cores
    python demo/ablation.py --quick     # 1 seed, a few steps each: minutes (a test runs this)
    python demo/ablation.py --summary   # the table of the runs finished so far (trains nothing)

The claims (FLM-Audio, arXiv 2509.02521): (1) a *natural* monologue, each sentence's text
contiguous, keeps the language model's ability that Moshi-style word alignment erodes; (2) *dual*
training, post-training stages whose monologue alternately trails and leads the audio, beats a
single placement. The arms share data, model, steps, learning rates and seeds, and differ only in
where the monologue's text goes (grid.py placements):

    dual    post-training stages alternate trail, lead, trail, lead; SFT lead (the paper)
    lead    every stage lead
    trail   every post-training stage trail; SFT lead
    word    word-aligned monologue (Moshi-style), the same stages as dual: post-training alternates
            word-trail and word-lead, SFT word-lead (each word's tokens where its audio starts)

In every arm the dialog stages' monologue also writes the user's words as heard (`Task.heard`),
right after them: sentence by sentence (trail) in the natural arms, word by word in the word arm.

Each run is `python train.py config/tiny_demo.py ...` in its own process, in RUNS/ARM-sSEED; a
finished run keeps its final evaluation in result.json and is skipped when the study is run again,
an interrupted one resumes from its latest checkpoint. The study writes OUT/runs.json (every
run's measures), OUT/table.md (mean +- standard deviation per arm, and which differences exceed the
seed spread) and OUT/figure.png (if matplotlib is installed). Extra arguments go to train.py.
"""
import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ARMS = {  # (post-training placements, cycled over the post stages; SFT placement; heard placement)
    "dual": (("trail", "lead"), "lead", "trail"),
    "lead": (("lead",), "lead", "trail"),
    "trail": (("trail",), "lead", "trail"),
    "word": (("word-trail", "word-lead"), "word-lead", "word-trail"),
}
FULL = dict(post=4, post_steps=100, sft_steps=200, duplex_steps=80, seeds=3, spoken=40)
QUICK = dict(post=2, post_steps=3, sft_steps=3, duplex_steps=2, seeds=1, spoken=4)

# (name, how to read it from a run's final evaluation, True if higher is better)
MEASURES = [
    ("spoken answers", lambda ev: ev.get("spoken", {}).get("answer_accuracy"), True),
    ("monologue answers, held out", lambda ev: _share(ev, "monologue_val_"), True),
    ("monologue answers, training", lambda ev: _share(ev, "monologue_train_"), True),
    ("ASR-style CER", lambda ev: ev.get("asr_cer"), False),
    ("language loss (text only)", lambda ev: ev.get("language_loss"), False),
    ("answer loss (own audio)", lambda ev: ev.get("answer_loss"), False),
    ("response latency, median s", lambda ev: ev.get("spoken", {}).get("latency_median_s"), False),
    ("takeover on pauses", lambda ev: ev.get("spoken", {}).get("pause_takeover_rate"), False),
    ("takeover on backchannels", lambda ev: ev.get("spoken", {}).get("backchannel_takeover_rate"), False),
    ("barge-ins yielded", lambda ev: ev.get("spoken", {}).get("barge_in_yield_rate"), True),
]


def _share(ev, prefix):
    """'a/b' counts of every group under prefix -> one fraction (None if nothing was asked)."""
    right = total = 0
    for k, v in ev.items():
        if k.startswith(prefix):
            a, b = map(int, v.split("/"))
            right, total = right + a, total + b
    return right / total if total else None


def stages(arm, size):
    """The stage list of one arm: post-training on speech and dialogs, then the two SFT stages."""
    post, sft, heard = ARMS[arm]
    heard_task = dict(heard=heard)
    out = [dict(name=f"post-{k + 1}-{post[k % len(post)]}", steps=size["post_steps"], lr=1e-3, min_lr=5e-4,
                placement=post[k % len(post)],
                mix=[dict(task="asr"), dict(task="tts"), dict(task=heard_task, kind="dialog")])
           for k in range(size["post"])]
    return out + [
        dict(name="sft-dialog", steps=size["sft_steps"], lr=8e-4, min_lr=2e-4, warmup=10, placement=sft,
             mix=[dict(task=heard_task, kind="dialog", weight=2.0), dict(task=heard_task, kind="duplex")]),
        dict(name="sft-duplex", steps=size["duplex_steps"], lr=2e-4, min_lr=5e-5, warmup=5, placement=sft,
             mix=[dict(task=heard_task, kind="duplex", weight=2.0), dict(task=heard_task, kind="dialog")])]


def run_one(arm, seed, size, runs, extra):
    """Train and evaluate one (arm, seed), or pick up where it stopped; -> its final evaluation."""
    out = runs / f"{arm}-s{seed}"
    done = out / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    resume, plan = any(out.glob("ckpt-*")), stages(arm, size)
    argv = [sys.executable, str(ROOT / "train.py"), str(ROOT / "config" / "tiny_demo.py"), f"--out_dir={out}",
            f"--seed={seed}", f"--stages={plan!r}", f"--eval_spoken={size['spoken']}",
            f"--eval_interval={sum(s['steps'] for s in plan)}", "--ckpt_interval=50",
            *(["--init_from=resume"] if resume else []), *extra]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.log", "a") as logf:
        rc = subprocess.run(argv, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if rc:
        raise RuntimeError(f"{out}: train.py failed (exit {rc}); see {out / 'train.log'}")
    evals = [json.loads(x)["eval"] for x in (out / "log.jsonl").read_text().splitlines() if '"eval"' in x]
    final = next((e for e in reversed(evals) if "spoken" in e), None)
    if final is None:
        raise RuntimeError(f"{out}: train.py finished without a final evaluation; see {out / 'train.log'}")
    done.write_text(json.dumps(final, indent=1))
    return final


def summarise(results, seeds):
    """{arm: {measure: (mean, std, n)}} and the table's markdown."""
    stats = {}
    for arm in ARMS:
        stats[arm] = {}
        for name, get, _ in MEASURES:
            xs = [get(results[arm, s]) for s in seeds if (arm, s) in results]
            xs = [x for x in xs if x is not None]
            stats[arm][name] = (float(np.mean(xs)), float(np.std(xs)), len(xs)) if xs else (None, None, 0)
    lines = ["| measure | " + " | ".join(ARMS) + " |", "|---|" + "---|" * len(ARMS)]
    for name, _, _ in MEASURES:
        cells = [("-" if m is None else f"{m:.3f} ± {s:.3f}") for m, s, _ in (stats[a][name] for a in ARMS)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    # a difference counts only where the two arms' means lie further apart than both spreads together
    notes = []
    for name, _, higher in MEASURES:
        for other in ("lead", "trail", "word"):
            (m1, s1, n1), (m2, s2, n2) = stats["dual"][name], stats[other][name]
            if m1 is not None and m2 is not None and n1 > 1 and n2 > 1 and abs(m1 - m2) > s1 + s2:
                better = (m1 > m2) == higher
                notes.append(f"- {name}: dual {'better' if better else 'worse'} than {other} "
                             f"({m1:.3f} vs {m2:.3f}, beyond the seed spread)")
    runs_per_arm = sorted({sum((a, s) in results for s in seeds) for a in ARMS})
    lines += ["", f"Seeds per arm: {'/'.join(map(str, runs_per_arm))} of {len(seeds)}. Differences beyond the seed spread "
              "(|mean difference| > sum of the standard deviations):", *(notes or ["- none"])]
    return stats, "\n".join(lines)


def figure(stats, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(2, 5, figsize=(17, 6.5))
    for ax, (name, _, higher) in zip(axes.flat, MEASURES):
        ms = [stats[a][name][0] for a in ARMS]
        ss = [stats[a][name][1] for a in ARMS]
        ax.bar(list(ARMS), [np.nan if m is None else m for m in ms],
               yerr=[0 if s is None else s for s in ss], capsize=4, color=["C0", "C1", "C2", "C3"])
        ax.set_title(f"{name} ({'higher' if higher else 'lower'} is better)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description="Ablate the natural monologue and dual training on the CPU demo.")
    ap.add_argument("--quick", action="store_true", help="one seed, a few steps per stage")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per arm (default 3, --quick 1)")
    ap.add_argument("--runs", default="out/ablation", help="one directory per run (checkpoints, logs)")
    ap.add_argument("--out", default="results/ablation", help="where runs.json, table.md, figure.png go")
    ap.add_argument("--jobs", type=int, default=2, help="runs trained at the same time")
    ap.add_argument("--summary", action="store_true", help="train nothing: tabulate the runs finished so far")
    args, extra = ap.parse_known_args(argv)
    size = dict(QUICK if args.quick else FULL)
    seeds = [1337 + k for k in range(args.seeds or size["seeds"])]
    runs, out = Path(args.runs), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(arm, s) for s in seeds for arm in ARMS]
    if args.summary:
        done = {(a, s): json.loads((runs / f"{a}-s{s}" / "result.json").read_text()) for a, s in jobs
                if (runs / f"{a}-s{s}" / "result.json").is_file()}
    else:
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            done = dict(zip(jobs, pool.map(lambda j: run_one(*j, size, runs, extra), jobs)))
    stats, md = summarise(done, seeds)
    (out / "runs.json").write_text(json.dumps({f"{a}-s{s}": ev for (a, s), ev in done.items()}, indent=1))
    (out / "table.md").write_text(md + "\n")
    drew = figure(stats, out / "figure.png")
    print(md + f"\n\nwrote {out / 'runs.json'}, {out / 'table.md'}" + (f", {out / 'figure.png'}" if drew else
                                                                        " (no figure: pip install matplotlib)"))
    return stats


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
