"""evaluate.py -- how a checkpoint is measured: from teacher-forced losses to what a user hears.

train.py calls `evaluate` during and after training; `python evaluate.py --checkpoint DIR` (or
`python train.py --eval_only --init_from=resume`) prints the same table for any checkpoint.
In the order of the table, from the model's inside to its outside:
  1. per-stream validation losses of each task, and the listening probe: the answers' text loss
     with the user's own audio against another user's (a model that does not listen scores the same);
  2. ASR-style CER (hear the user, write their words trailing them) and TTS-style semantic accuracy;
  3. the monologue: greedy full-duplex decoding of whole validation dialogs (the model thinks and
     speaks, only the user is given); does its monologue hold each expected answer?
  4. spoken: the validation recordings through the streaming loop (chat.LMStream, sampling as
     served, then the codec's decoder), judged from the output audio alone by demo/judge.py:
     spoken answers recognised correct, response latency, takeover on pauses and backchannels,
     barge-in stop latency and yield; plus one held-out question through the whole loop
     (codec -> LMStream -> codec), its transcripts printed and its wavs written.
Results are grouped by the recording's `held_out` tag: "seen" (training items), "combo" (unseen
combinations of known words, training voices), "voice" (training items, a voice only validation
hears).
"""
import argparse
import filecmp
import json
import re
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import data
from codec import FRAME_SIZE, SAMPLE_RATE, write_audio
from grid import DELAYS, as_task
from tokenizer import load_tokenizer


def check_codec(data_dir, checkpoint):
    """Refuse a checkpoint that holds another codec file than the data's: the data's codes would
    mean nothing to it (a demo corpus synthesised again fits a new demo codec)."""
    index = json.loads((Path(data_dir) / "index.json").read_text())
    src = Path(data_dir) / index["codec"] if index.get("codec") else None    # relative or absolute
    mine = Path(checkpoint) / data.CODEC_FILES[data.codec_kind(src)] if src and src.is_file() else None
    if mine and mine.is_file() and not filecmp.cmp(src, mine, shallow=False):
        raise ValueError(f"{mine}: the checkpoint was trained with another codec than the data's ({src}); "
                         f"prepare the data with this codec, or train from scratch")


# ----------------------------------------------------------------------------------------------
# Text: the monologue's sentences are the runs of tokens between <wait>s


def decode_text(enc, ids, wait_id):
    """The sentences of a text row (runs of tokens between <wait>s), as chat.py prints them."""
    from chat import Monologue
    mono = Monologue(enc, wait_id)
    for frame, token in enumerate(ids):
        mono.push(token, frame)
    return [s["text"] for s in mono.finish(len(ids))]


def normalise(s):
    return " ".join(re.sub(r"[^\w]+", " ", s.lower()).split())


def edit_distance(a, b):
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def _tally(out, key, right, total):
    r, t = map(int, out.get(key, "0/0").split("/"))
    out[key] = f"{r + right}/{t + total}"


# ----------------------------------------------------------------------------------------------
# 1-3. On grids: teacher-forced losses, greedy decoding of whole dialogs


def depth_greedy(model, h):
    """DepthGPT's greedy codes for hidden states h [N, D]: one codebook at a time, each on the
    codes before it -> [N, 8]."""
    codes = h.new_zeros(h.shape[0], 0, dtype=torch.long)
    for _ in range(model.cfg.aud_channel):
        codes = torch.cat([codes, model.depth_gpt(h, codes)[:, -1].argmax(-1, keepdim=True)], 1)
    return codes


@torch.no_grad()
def greedy_decode(model, tokens, audio, text=True, fed_back=None):
    """Stream a batch of grids column by column through the KV cache, replacing row 0 (if `text`)
    and rows 1..8 (if `audio`) by the model's greedy predictions; the other rows stay. `fed_back`
    (default: every predicted row) picks the predicted rows the model reads back as its input; the
    others it reads as recorded (the speech probe separates its semantic and acoustic feedback)."""
    B, _, T = tokens.shape
    buf, out = tokens.clone(), tokens.clone()
    rows = ([0] if text else []) + (list(range(1, 9)) if audio else [])
    fed = rows if fed_back is None else list(fed_back)
    model.setup_cache(B, T)
    try:
        for t in range(T - 1):
            h, logits = model.backbone(buf[:, :, t:t + 1], torch.tensor(t, device=buf.device))
            if text:
                out[:, 0, t + 1] = logits[:, -1].argmax(-1)
            if audio:
                out[:, 1:9, t + 1] = depth_greedy(model, h[:, -1])
            buf[:, fed, t + 1] = out[:, fed, t + 1]
    finally:
        model.drop_cache()
    return out


def whole_grids(ds, idx, mcfg, task, placement, device):
    """Whole dialogs as one batch: (tokens, weights) padded to the longest, and each one's length."""
    lengths = [ds.grid(i, mcfg, task, placement)[0].shape[1] for i in idx]
    grids = [ds.grid(i, mcfg, task, placement, 0, max(lengths)) for i in idx]
    return (torch.from_numpy(np.stack([g[0] for g in grids])).to(device),
            torch.from_numpy(np.stack([g[1] for g in grids])).to(device), lengths)


def text_loss(model, tokens, weights):
    """Mean cross-entropy of the monologue's text tokens (not <wait>) of grids `tokens`."""
    _, logits = model.backbone(tokens[:, :, :-1])
    target = tokens[:, 0, 1:]
    ce = F.cross_entropy(logits.transpose(1, 2).float(), target, reduction="none")
    mask = (weights[:, 0, 1:] > 0) & (target != model.cfg.text_wait_token_id)
    return float((ce * mask).sum() / mask.sum().clamp(min=1))


@torch.no_grad()
def language_probe(model, ds, enc):
    """Language ability of the monologue, from text alone: the loss on each answer's tokens given
    its question's, written one after the other in row 0 with no audio (every audio row pad). A
    monologue trained on contiguous sentences has seen text like this; a word-aligned one has not."""
    from tokenizer import encode_text
    pairs = {(e["question"], e["answer"]) for d, _ in ds.dialogs for e in d.get("events", []) if "question" in e}
    if not pairs:
        return None
    cfg, rows = model.cfg, []
    for q, a in sorted(pairs):
        q, a = encode_text(enc, q), encode_text(enc, a)
        rows.append(([cfg.text_wait_token_id] + q + a + [cfg.text_wait_token_id], len(q) + 1))
    T = max(len(r) for r, _ in rows)
    tokens = torch.full((len(rows), 17, T), cfg.aud_pad_token_id, dtype=torch.long)
    weights = torch.zeros(len(rows), 9, T)
    for b, (r, a0) in enumerate(rows):
        tokens[b, 0] = torch.tensor(r + [cfg.text_wait_token_id] * (T - len(r)))
        weights[b, 0, a0:len(r) - 1] = 1                 # the answer's tokens, not the closing <wait>
    device = next(model.parameters()).device
    return round(text_loss(model, tokens.to(device), weights.to(device)), 4)


def dialog_task(stages):
    """The last stage's dialog task (a Task whose monologue is the assistant's while it hears the
    user), with its placement: what the finished model was trained to do."""
    for st in reversed(stages):
        for e in st["mix"]:
            t = as_task(e["task"])
            if t.monologue == "assistant" and t.listen == "user":
                return replace(t, placement=e.get("placement") or st.get("placement") or t.placement)
    return "dialog"


@torch.no_grad()
def evaluate(model, val, train, enc, tasks=("dialog", "asr", "tts"), batches=4, batch_size=8, window=128,
             n_decode=16, seed=0, amp=None, dialog="dialog"):
    """Sections 1-3 on a validation ShardDataset (and the training one, for its answers). `dialog`:
    the dialog Task the model was fine-tuned on (e.g. with heard words), for its teacher-forced rows."""
    from contextlib import nullcontext
    mcfg, out, device = model.cfg, {}, next(model.parameters()).device
    was_training = model.training
    model.eval()
    with amp or nullcontext():
        for name in tasks:                               # per-stream validation loss, fixed windows
            sums = {}
            for k in range(batches):
                tok, w = val.get_batch(batch_size, window, mcfg, name, rng=np.random.default_rng([seed, k]))
                loss, parts = model(tok.to(device), w.to(device), wait_weight=1.0)
                for p, v in [("loss", loss), *parts.items()]:
                    sums[p] = sums.get(p, 0.0) + float(v) / batches
            out[f"val_{name}"] = {k: round(v, 4) for k, v in sums.items()}
        idx = list(range(min(n_decode, len(val))))
        # TTS-style: with the text leading, how often is DepthGPT's greedy semantic token right?
        tok, w, _ = whole_grids(val, idx, mcfg, "tts", "lead", device)
        h, _ = model.backbone(tok[:, :, :-1])
        sel = w[:, 1, 1:].reshape(-1) > 0
        pred = model.depth_gpt(h.flatten(0, 1)[sel], tok.new_zeros(int(sel.sum()), 0))[:, 0].argmax(-1)
        target = tok[:, 1, 1:].reshape(-1)[sel]
        out["tts_semantic_acc"] = round(float((pred == target).float().mean()), 4)
        out["tts_semantic_baseline"] = round(float(target.bincount().max() / max(1, len(target))), 4)
        # ASR-style: listen to the user, write the user's words trailing them; CER over characters
        tok, _, lengths = whole_grids(val, idx, mcfg, "asr", "trail", device)
        hyp = [row[:n] for row, n in zip(greedy_decode(model, tok, audio=False)[:, 0].tolist(), lengths)]
        counts = {}                                       # per held-out group: [edits, characters]
        for i, row in zip(idx, hyp):
            d = val.dialogs[i][0]
            ref = normalise(" ".join(s["text"] for s in d["sentences"] if s["speaker"] == "user"))
            got = normalise(" ".join(decode_text(enc, row[1:], mcfg.text_wait_token_id)))
            for group in ("all", d.get("held_out") or "seen"):
                c = counts.setdefault(group, [0, 0])
                c[0], c[1] = c[0] + edit_distance(got, ref), c[1] + len(ref)
        for group, (edits, chars) in counts.items():
            out["asr_cer" if group == "all" else f"asr_cer_{group}"] = round(edits / max(1, chars), 4)
        # the monologue, full duplex: rows 0..8 are the model's own greedy output while it hears the
        # user; each expected answer (the events; without events, the assistant's sentences) must be
        # one of its sentences
        for split, ds in (("val", val), ("train", train)):
            ids = [i for i, (d, _) in enumerate(ds.dialogs) if d["kind"] == "dialog"][:n_decode]
            if not ids:
                continue
            tok, w, lengths = whole_grids(ds, ids, mcfg, dialog, "lead", device)
            rows = [r[:n] for r, n in zip(greedy_decode(model, tok, audio=True)[:, 0].tolist(), lengths)]
            for i, row in zip(ids, rows):
                d = ds.dialogs[i][0]
                said = {normalise(x) for x in decode_text(enc, row[1:], mcfg.text_wait_token_id)}
                want = [e["answer"] for e in d.get("events", []) if "answer" in e] or \
                    [x["text"] for x in d["sentences"] if x["speaker"] == "assistant"]
                _tally(out, f"monologue_{split}_{d.get('held_out') or 'seen'}",
                       sum(normalise(a) in said for a in want), len(want))
            if split == "val":     # listening: the answers' text loss, with the user's audio and with another's
                other = torch.cat([tok[:, :9], tok[:, 9:].roll(1, 0)], 1)
                out["answer_loss"] = round(text_loss(model, tok, w), 4)
                out["answer_loss_other_audio"] = round(text_loss(model, other, w), 4)
        out["language_loss"] = language_probe(model, val, enc)
    model.train(was_training)
    return out


# ----------------------------------------------------------------------------------------------
# 4. Spoken: the recordings through the streaming loop as served, judged from the output audio


@torch.no_grad()
def stream_users(model, user_codes, seed=0):
    """User codes [B, 8, T] (one recording per row) through chat.LMStream with the served sampling
    settings -> (text [B, T], speak codes [B, 8, T]): assistant frame t (frame 0 is the initial
    column: never spoken) on the user's timeline."""
    from chat import LMStream
    B, K, T = user_codes.shape
    stream = LMStream(model, batch_size=B, seed=seed)
    text = torch.full((B, T), model.cfg.text_wait_token_id, dtype=torch.long)
    speak = torch.full((B, K, T), model.cfg.aud_pad_token_id, dtype=torch.long)
    for t in range(T):
        out = stream.step(user_codes[:, :, t])
        if out is not None:
            text[:, t], speak[:, :, t] = out[:, 0].cpu(), out[:, 1:].cpu()
    return text, speak


@torch.no_grad()
def decode_speech(codec, speak):
    """Speak codes [B, 8, T] -> audio [B, T * 1920]. Frames the codec cannot decode (pad ids, ids
    past its codebooks) are silent, as chat.py plays them."""
    silence = codec.encode(torch.zeros(1, 1, FRAME_SIZE))[0, :, 0].cpu()
    ok = (speak < codec.cardinality).all(1)                                      # [B, T]
    wav = codec.decode(torch.where(ok[:, None], speak, silence[None, :, None]))[:, 0].float().cpu()
    return wav * ok.repeat_interleave(FRAME_SIZE, 1)


def spoken(model, codec, val, n=80, seed=0, enc=None):
    """Up to n validation recordings with events, streamed together, judged by demo/judge.py. With
    the tokenizer `enc`, answers are also split by whether the monologue of that run wrote the
    expected answer as one of its sentences: what is lost in understanding vs. in speaking."""
    from demo import corpus, judge
    ids = [i for i, (d, _) in enumerate(val.dialogs) if d.get("events")][:n]
    if not ids:
        return {}
    users = [val.codes(i)["user"] for i in ids]
    T = max(u.shape[1] for u in users)           # shorter recordings repeat their last (silent) frame
    codes = torch.stack([torch.from_numpy(np.pad(u, ((0, 0), (0, T - u.shape[1])), mode="edge")) for u in users])
    text, speak = stream_users(model, codes.to(next(model.parameters()).device), seed)
    wav = decode_speech(codec, speak).numpy()
    recognizer = judge.Recognizer(judge.answer_templates(corpus.candidate_answers()))
    results, pairs = [], []       # pairs: (monologue right, spoken right) per scored answer
    for b, i in enumerate(ids):
        n_frames = val.dialogs[i][0]["n_frames"]
        rs = judge.judge(val.dialogs[i][0]["events"], wav[b, :n_frames * FRAME_SIZE], recognizer)
        if enc is not None:
            pairs += thought_answers(decode_text(enc, text[b, 1:n_frames].tolist(), model.cfg.text_wait_token_id), rs)
        results += rs
    out = judge.summarize(results)
    if enc is not None:
        out["monologue_in_loop"] = {"n": len(pairs), "correct": sum(m for m, _ in pairs)}
        spoke = [a for m, a in pairs if m]
        out["spoken_given_monologue"] = {"n": len(spoke), "correct": sum(spoke)}
    return out


def thought_answers(sentences, results):
    """[(monologue wrote the expected answer as a sentence, the audio was recognised right)] for
    each scored answer of one recording: `sentences` are its monologue's (decode_text)."""
    said = {normalise(x) for x in sentences}
    return [(normalise(r["expected"]) in said, bool(r["correct"])) for r in results
            if r["event"] == "answer" and r.get("correct") is not None]


def undelay(rows, n_frames, pad):
    """Speak rows [8, T] of a delayed grid -> codes [8, n_frames] in frame time (grid.DELAYS):
    frame f of codebook k sits in column f + delay; frames past the grid are `pad` (silent)."""
    out = torch.full((rows.shape[0], n_frames), pad, dtype=rows.dtype)
    for k, d in enumerate(DELAYS[1:rows.shape[0] + 1]):
        seg = rows[k, d:d + n_frames]
        out[k, :len(seg)] = seg
    return out


@torch.no_grad()
def speech_probe(model, codec, ds, task, n=20):
    """Where spoken answers go wrong: each recording's assistant audio judged from its recorded
    codes (the ceiling of codec + judge); from the model's greedy codes on the recorded history,
    teacher-forced within each frame too (what it knows frame by frame) or with DepthGPT on its own
    codes; with only its own semantic, only its own acoustic, or all its own audio read back under
    the recorded monologue; and greedy throughout (as served, but greedy) -> {way: "right/total"}."""
    from demo import corpus, judge
    recognizer = judge.Recognizer(judge.answer_templates(corpus.candidate_answers()))
    ids = [i for i, (d, _) in enumerate(ds.dialogs) if any("answer" in e for e in d.get("events", []))][:n]
    device, K, out = next(model.parameters()).device, model.cfg.aud_channel, {}
    for i in ids:
        d = ds.dialogs[i][0]
        tok = torch.from_numpy(ds.grid(i, model.cfg, task, "lead")[0])[None].to(device)   # as evaluate() decodes
        h, _ = model.backbone(tok[:, :, :-1])
        forced = tok.clone()
        forced[0, 1:K + 1, 1:] = model.depth_gpt(h[0], tok[0, 1:K, 1:].T).argmax(-1).T
        own_frame = tok.clone()                               # = greedy_decode(fed_back=[]), in one pass
        own_frame[0, 1:K + 1, 1:] = depth_greedy(model, h[0]).T
        ways = dict(recorded=tok, teacher_forced=forced, own_frame=own_frame,
                    own_semantic=greedy_decode(model, tok, True, text=False, fed_back=[1]),
                    own_acoustic=greedy_decode(model, tok, True, text=False, fed_back=range(2, K + 1)),
                    own_audio=greedy_decode(model, tok, True, text=False),
                    own_audio_and_text=greedy_decode(model, tok, True))
        for way, grid in ways.items():
            codes = undelay(grid[0, 1:K + 1].cpu(), d["n_frames"], model.cfg.aud_pad_token_id)
            results = judge.judge(d["events"], decode_speech(codec, codes[None])[0].numpy(), recognizer)
            scored = [r["correct"] for r in results if r.get("correct") is not None]
            _tally(out, way, sum(scored), len(scored))
    return out


def demo_question(model, codec, enc, val, out_dir, seed=0, log=print):
    """One held-out spoken question through the whole loop (user wav -> codec -> LMStream -> codec),
    as `python chat.py --input` runs it: both transcripts printed, the wavs written."""
    from chat import LMStream, run_file
    from demo import corpus, judge
    pick = [i for i, (d, _) in enumerate(val.dialogs) if d["kind"] == "dialog" and d.get("audio") and d.get("events")]
    if not pick:
        return None
    d = val.dialogs[pick[0]][0]
    rec = {"audio": {k: Path(p) for k, p in d["audio"].items()}, "segments": d["sentences"], "source": d["source"]}
    user = data.load_dialog_audio(rec)[1]
    stereo, sentences = run_file(codec, LMStream(model, seed=seed), enc, user)
    out_dir = Path(out_dir)
    write_audio(out_dir / "demo_question.wav", user)
    write_audio(out_dir / "demo_reply.wav", stereo)
    event = next(e for e in d["events"] if "answer" in e)
    heard = judge.judge([event], stereo[0].numpy(), judge.Recognizer(judge.answer_templates(
        corpus.candidate_answers())))[0]
    log(f"held-out question ({d.get('held_out')}): user said    \"{event['question']}\"\n"
        f"  assistant thought (monologue): {' | '.join(s['text'] for s in sentences) or '(nothing)'}\n"
        f"  assistant said (recognised from its audio): \"{heard.get('recognized')}\" "
        f"({'correct' if heard.get('correct') else 'wrong'}; expected \"{event['answer']}\")\n"
        f"  wrote {out_dir / 'demo_question.wav'} (user) and {out_dir / 'demo_reply.wav'} "
        f"(stereo: assistant left, user right)")
    return heard


# ----------------------------------------------------------------------------------------------
# The table, and the command line


def _pct(x):
    return "-" if x is None else f"{100 * x:.0f}%"


def table(ev):
    """The headline measures as a markdown table (groups: seen / held-out combos / held-out voice)."""
    sp = ev.get("spoken", {})
    by = sp.get("answer_accuracy_by_held_out", {})
    mono = [ev.get(f"monologue_val_{g}", "-") for g in ("combo", "voice")]
    rows = [("spoken answers, recognised from the audio", _frac(by.get("none")), _frac(by.get("combo")),
             _frac(by.get("voice"))),
            ("monologue answers (greedy, full duplex)", ev.get("monologue_train_seen", "-"), *mono),
            ("ASR-style CER", "-", ev.get("asr_cer_combo", "-"), ev.get("asr_cer_voice", "-"))]
    lines = ["| measure | training items | held-out combinations | held-out voice |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    lat, stop = sp.get("latency_median_s"), sp.get("barge_in_stop_latency_median_s")
    m, g = sp.get("monologue_in_loop"), sp.get("spoken_given_monologue")   # only with a tokenizer
    split = [f"| held-out answers in that run: monologue right / then also spoken right | "
             f"{m['correct']}/{m['n']} / {g['correct']}/{g['n']} |"] if m else []
    lines += ["", "| turn-taking (validation, from the audio) | value |", "|---|---|",
              f"| response latency, median | {'-' if lat is None else f'{lat:.2f} s'} |",
              f"| takeover on pauses (lower is better) | {_pct(sp.get('pause_takeover_rate'))} |",
              f"| takeover on backchannels (lower is better) | {_pct(sp.get('backchannel_takeover_rate'))} |",
              f"| barge-ins yielded / answered after yielding | {_pct(sp.get('barge_in_yield_rate'))} / "
              f"{_pct(sp.get('barge_in_answer_after_yield_rate'))} |",
              f"| barge-in stop latency, median | {'-' if stop is None else f'{stop:.2f} s'} |",
              *split,
              f"| listening: answer loss, own audio / another user's | {ev.get('answer_loss', '-')} / "
              f"{ev.get('answer_loss_other_audio', '-')} |"]
    return "\n".join(lines)


def _frac(g):
    return "-" if not g else f"{g['correct']}/{g['n']} ({100 * g['accuracy']:.0f}%)"


def main(argv=None):
    ap = argparse.ArgumentParser(description="Evaluate a checkpoint on prepared data (the table train.py prints).")
    ap.add_argument("--checkpoint", required=True, help="checkpoint directory (or a train.py out_dir)")
    ap.add_argument("--data_dir", required=True, help="prepared data (python data.py prepare)")
    ap.add_argument("--n_decode", type=int, default=16)
    ap.add_argument("--n_spoken", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--speech_probe", type=int, default=0, metavar="N",
                    help="also judge N training recordings' answers recorded / teacher-forced / free-running")
    ap.add_argument("--out", default=None, help="write the table's figures as JSON here")
    args = ap.parse_args(argv)
    from chat import find_codec, load_checkpoint
    try:
        ckpt = Path(args.checkpoint)
        ckpt = ckpt / "latest" if not (ckpt / "config.json").is_file() and (ckpt / "latest").is_dir() else ckpt
        check_codec(args.data_dir, ckpt)
        model, enc = load_checkpoint(ckpt)
        codec = data.load_codec(find_codec(ckpt))
        val, train = data.ShardDataset(args.data_dir, "val"), data.ShardDataset(args.data_dir, "train")
        run = ckpt / "train_config.json"                 # the dialog task it was fine-tuned on, if known
        dialog = dialog_task(json.loads(run.read_text())["stages"]) if run.is_file() else "dialog"
        ev = evaluate(model, val, train, enc, n_decode=args.n_decode, seed=args.seed, dialog=dialog)
        ev["spoken"] = spoken(model, codec, val, args.n_spoken, args.seed, enc)
    except (FileNotFoundError, ValueError) as e:
        print(f"evaluate.py: {e}", file=sys.stderr)
        sys.exit(1)
    print(table(ev))
    if args.speech_probe:
        ev["speech_probe"] = speech_probe(model, codec, train, as_task(dialog), args.speech_probe)
        print("spoken answers of training recordings, judged from audio decoded from codes that are:",
              ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in ev["speech_probe"].items()))
    if args.out:
        Path(args.out).write_text(json.dumps(ev, indent=1))


if __name__ == "__main__":
    main()
