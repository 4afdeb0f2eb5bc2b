"""grid.py -- the paper's first idea: a dialog as the [17, T] token grid, natural monologue in row 0.

Every 80 ms column holds the model's inner monologue (row 0, text), its own voice (rows 1..8, the
8 codec codebooks) and the user's voice (rows 9..16). The *natural monologue* puts each sentence's
text tokens in one contiguous run and `<wait>` everywhere else, so only sentence timings are
needed. Where the run starts is the placement, the paper's second idea (dual training) varies it:
  lead   the text starts where the sentence's audio starts (think, then say: TTS-like);
  trail  the text starts where its audio ends (hear, then write: ASR-like).
The word-aligned layout the paper argues against (Moshi's) is here too, for comparison and for
a model that must first learn what words sound like: `word-lead` puts each word's tokens at the
frame its audio starts, `word-trail` where it ends, <wait> between words; both need word timings.
Acoustic codebooks (1..7) lag the semantic one by one column (DELAYS), on both voices; column 0
is the initial column (<wait>, audio pad), as in streaming inference. A `Task` routes speakers to
rows: whose sentences fill the monologue, whose voice is spoken, whose is heard.
data.py fills these grids from prepared shards; chat.py streams the same layout.
"""
import math
from dataclasses import dataclass, replace

import numpy as np

from codec import FRAME_RATE, N_CODEBOOKS

DELAYS = [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1]   # per row: acoustic codebooks one column late
SPEAKERS = ("assistant", "user")        # stereo channel 0 = assistant (left), 1 = user (right)


# ----------------------------------------------------------------------------------------------
# Timing convention (seconds -> frames at 12.5 Hz, frame f covers [f, f+1) * 80 ms):
#   first frame of a sentence  = floor(start * 12.5)
#   frame after its audio      = ceil(end * 12.5)   (at least first frame + 1)
#   lead target = first frame + offset;  trail target = frame after audio + offset
#   word-lead / word-trail target = each word's own first frame / frame after it
# Targets are clamped to >= 1 because column 0 of any window is overwritten by the initial
# column; text whose target is taken by earlier text starts right after it (its drift).

PLACEMENTS = ("lead", "trail", "word-lead", "word-trail")


def sentence_frames(start, end):
    first = math.floor(start * FRAME_RATE + 1e-6)
    return first, max(first + 1, math.ceil(end * FRAME_RATE - 1e-6))


def place_monologue(sentences, n_frames, placement, wait_id, offset=0, max_tail=50, name="dialog"):
    """Row 0 in frame coordinates. `sentences`: dicts with speaker, start, end (s) and tokens (and,
    for the word placements, words [[word, start, end]] and word_tokens, one token list per word).
    `placement`: one of PLACEMENTS, or {speaker: placement} when both speakers' sentences are
    written (the others are skipped). Returns (row int64 [L], drifts) with L = max(n_frames, end
    of last text) and drifts[i] = frames piece i's text starts after its target. Text may run up
    to `max_tail` frames past the audio (no audio loss there); beyond that we say so."""
    per = placement if isinstance(placement, dict) else {s["speaker"]: placement for s in sentences}
    pieces = []
    for s in sentences:
        where = per.get(s["speaker"])
        if where is None:
            continue
        if where not in PLACEMENTS:
            raise ValueError(f"placement {where!r}: expected one of {PLACEMENTS}")
        if not where.startswith("word"):
            pieces.append((sentence_frames(s["start"], s["end"])[where == "trail"], s["tokens"]))
        elif "word_tokens" not in s:
            raise ValueError(f"{name}: the {where} placement needs word timings (segment 'words')")
        else:
            pieces += [(sentence_frames(w[1], w[2])[where == "word-trail"], t)
                       for w, t in zip(s["words"], s["word_tokens"])]
    free, spans, drifts = 1, [], []
    for frame, tokens in sorted(pieces, key=lambda p: p[0]):
        target = max(1, frame + offset)
        at = max(target, free)
        spans.append((at, tokens))
        drifts.append(at - target)
        free = at + len(tokens)
    if free > n_frames + max_tail:
        raise ValueError(f"{name}: monologue text ends at frame {free}, more than {max_tail} frames "
                         f"past the audio ({n_frames} frames) ({placement} placement)")
    row = np.full(max(n_frames, free), wait_id, dtype=np.int64)
    for at, tokens in spans:
        row[at:at + len(tokens)] = tokens
    return row, drifts


def grid_window(text_row, speak, listen, start, n_columns, cfg, text_weight=1.0, audio_weight=1.0,
                codes_start=0):
    """Tokens [17, T] and loss weights [9, T] (numpy) for the window whose column c holds text and
    semantic tokens of frame start + c and acoustic tokens of frame start + c - 1 (delays).
    `speak`/`listen`: codes [8, n] of frames codes_start.. (the dialog's end), or None (-> aud_pad).
    Positions outside the dialog get the padding tokens and weight 0; column 0 becomes the initial
    column (row 9 keeps the user's semantic token of frame `start`, as in streaming inference)."""
    wait, pad = cfg.text_wait_token_id, cfg.aud_pad_token_id
    frames = start + np.arange(n_columns)
    tokens = np.empty((17, n_columns), dtype=np.int64)
    weights = np.zeros((9, n_columns), dtype=np.float32)
    ok = frames < len(text_row)
    tokens[0] = np.where(ok, text_row[np.minimum(frames, len(text_row) - 1)], wait)
    weights[0] = ok * text_weight
    for base, codes in ((1, speak), (9, listen)):
        for q in range(N_CODEBOOKS):
            f = frames - DELAYS[base + q] - codes_start
            if codes is None or codes.shape[1] == 0:
                tokens[base + q] = pad
                continue
            ok = (f >= 0) & (f < codes.shape[1])
            tokens[base + q] = np.where(ok, codes[q, np.clip(f, 0, codes.shape[1] - 1)], pad)
            if base == 1:
                weights[1 + q] = ok * audio_weight
    tokens[0, 0], tokens[1:9, 0], tokens[10:17, 0] = wait, pad, pad
    weights[:, 0] = 0
    return tokens, weights


def thin_silence(sentences, speaker, start, n_columns, keep, rng, margin=2):
    """Factors [T] for the speak rows' loss weights of a window: 1 where `speaker` talks (its
    sentences widened by `margin` frames, so onsets and ends always count), elsewhere 1/keep with
    probability `keep`, else 0. About two thirds of a dialog's speak columns are silence, which
    DepthGPT learns at once yet paid for at every step; thinned, it runs on fewer columns (the
    model skips columns without weight) and the loss stays unbiased."""
    frames = start + np.arange(n_columns)           # column c holds frame f (semantic) and f - 1
    talking = np.zeros(n_columns, dtype=bool)
    for s in sentences:
        if s["speaker"] == speaker:
            first, last = sentence_frames(s["start"], s["end"])
            talking |= (frames >= first - margin) & (frames < last + margin)
    kept = rng.random(n_columns) < keep
    return np.where(talking, 1.0, np.where(kept, 1.0 / keep, 0.0)).astype(np.float32)


@dataclass
class Task:
    """Routing of one training task. Speakers are named "assistant"/"user" (None = nothing):
    `monologue` = whose sentences fill row 0, `speak` = whose audio the model predicts (rows 1..8),
    `listen` = whose audio it hears (rows 9..16). `placement`: one of PLACEMENTS, or "mix" or
    P(lead) (lead or trail drawn per sample). `heard`: a placement for the listened speaker's
    sentences in row 0 too (None: they are not written), e.g. "word-trail": the model notes each
    word it hears as it ends. `offset` shifts text targets by whole frames."""
    monologue: str = "assistant"
    speak: str = "assistant"
    listen: str = "user"
    placement: object = "lead"
    heard: str = None
    offset: int = 0
    text_weight: float = 1.0
    audio_weight: float = 1.0

    def __post_init__(self):
        for k in ("monologue", "speak", "listen"):
            if getattr(self, k) not in (*SPEAKERS, None):
                raise ValueError(f"task {k}={getattr(self, k)!r}: expected 'assistant', 'user' or None")

    def draw(self, rng):
        """This sample's placement (one of PLACEMENTS), drawn with numpy Generator `rng`."""
        if self.placement in PLACEMENTS[2:]:
            return self.placement
        p = {"lead": 1.0, "trail": 0.0, "mix": 0.5}.get(self.placement, self.placement)
        if isinstance(p, str) or not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"placement {self.placement!r}: expected lead, trail, word, mix or a probability")
        return "lead" if rng.random() < float(p) else "trail"

    def row_placement(self, placement):
        """What place_monologue needs: {speaker: placement} of the sentences row 0 holds. The heard
        speaker is the other one (with listen=None: text only, e.g. to read dialogs without audio)."""
        other = SPEAKERS[1 - SPEAKERS.index(self.monologue)]
        heard = {other: self.heard} if self.heard and self.listen in (None, other) else {}
        return {**heard, self.monologue: placement}


TASKS = {   # the paper's stages: ASR-style, TTS-style, dialog SFT
    "asr": Task(monologue="user", speak=None, listen="user", placement="trail", audio_weight=0.0),
    "tts": Task(monologue="assistant", speak="assistant", listen=None, placement="lead"),
    "dialog": Task(),
}


def as_task(task):
    if isinstance(task, Task):
        return task
    if isinstance(task, str):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}: choose from {sorted(TASKS)} or pass a Task")
        return TASKS[task]
    try:
        return replace(TASKS["dialog"], **dict(task))
    except TypeError as e:
        raise ValueError(f"bad task settings {task!r}: {e}") from None


def dialog_grid(sentences, codes, cfg, task="dialog", placement="lead", start=0, n_columns=None,
                max_tail=50, name="dialog"):
    """One dialog (or window of it) as (tokens [17, T], weights [9, T], drifts), numpy.
    `sentences`: dicts {speaker, start, end, tokens}; `codes`: {"assistant": [8, F], "user": [8, F]}.
    Default n_columns covers the whole dialog, including the last frame's acoustic tokens."""
    task = as_task(task)
    n_frames = max(c.shape[1] for c in codes.values())
    row, drifts = place_monologue(sentences, n_frames, task.row_placement(placement), cfg.text_wait_token_id,
                                  task.offset, max_tail, name)
    n_columns = max(len(row), n_frames + 1) - start if n_columns is None else n_columns
    tokens, weights = grid_window(row, codes.get(task.speak), codes.get(task.listen), start, n_columns,
                                  cfg, task.text_weight, task.audio_weight)
    return tokens, weights, drifts
