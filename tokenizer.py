"""tokenizer.py -- the text tokenizer of the inner monologue, run by tiktoken.

Three sources, one `tiktoken.Encoding`:
  - a Qwen2-style directory (tokenizer.json, or vocab.json + merges.txt; the released FLM-Audio and
    Qwen2.5 ship these), read exactly;
  - None: the byte-level default (ids 0..255 = bytes, then a few special tokens);
  - a byte-level BPE trained on a corpus's own sentences (`train_bpe`), written as tokenizer.json.
The monologue's `<wait>` token is a special token of the tokenizer; its id must equal the model's
`text_wait_token_id`.
"""
import json
import unicodedata
from pathlib import Path

import tiktoken

# ----------------------------------------------------------------------------------------------
# Qwen2 is GPT-2-style byte-level BPE: text is split by a regex, each piece is
# UTF-8 bytes, and merges join adjacent byte strings. tiktoken runs exactly that if each token's
# rank (= its id) orders merges the way the merge list does, which holds when ids were assigned
# in merge order (true for Qwen2 and for any `tokenizers`-trained BPE); we check it.

QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
WAIT_TOKEN = "<|wait|>"
BYTE_SPECIALS = {WAIT_TOKEN: 256, "<|endoftext|>": 257, "<|pad|>": 258}
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "added_tokens.json", "special_tokens_map.json")


def _bytes_to_unicode():
    """GPT-2's reversible map byte -> printable character (printable bytes map to themselves,
    the rest to chr(256 + k)), which is how byte-level BPE vocab files spell raw bytes."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
            *range(ord("\xae"), ord("\xff") + 1)]
    out, k = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b], k = chr(256 + k), k + 1
    return out


def _split_regex(pre, name):
    """The pre-tokenisation regex of a tokenizer.json `pre_tokenizer` entry (None if absent)."""
    if not pre:
        return None
    if pre.get("type") == "Sequence":
        found = [_split_regex(p, name) for p in pre.get("pretokenizers", [])]
        return next((f for f in found if f), None)
    if pre.get("type") == "Split":
        return pre.get("pattern", {}).get("Regex")
    if pre.get("type") == "ByteLevel":
        if pre.get("add_prefix_space"):
            raise ValueError(f"{name}: ByteLevel add_prefix_space=true is not supported")
        return GPT2_PATTERN if pre.get("use_regex", True) else None
    return None


def load_tokenizer(path=None):
    """tiktoken.Encoding from a Qwen2-style directory (tokenizer.json, or vocab.json + merges.txt,
    with added/special tokens from tokenizer.json / tokenizer_config.json / added_tokens.json);
    `None` gives the byte-level default: ids 0..255 = bytes, then BYTE_SPECIALS."""
    if path is None:
        return tiktoken.Encoding("flm-bytes", pat_str=QWEN2_PATTERN, special_tokens=BYTE_SPECIALS,
                                 mergeable_ranks={bytes([i]): i for i in range(256)})
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: tokenizer directory not found")
    pattern, added = QWEN2_PATTERN, {}
    try:
        if (d / "tokenizer.json").is_file():
            name = d / "tokenizer.json"
            tj = json.loads(name.read_text(encoding="utf-8"))
            model = tj.get("model") or {}
            if model.get("type", "BPE") != "BPE":
                raise ValueError(f"{name}: model type {model.get('type')!r} is not BPE")
            vocab, merges = model["vocab"], model["merges"]
            pattern = _split_regex(tj.get("pre_tokenizer"), name) or pattern
            added = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
        elif (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            name = d / "vocab.json"
            vocab = json.loads(name.read_text(encoding="utf-8"))
            merges = [m for m in (d / "merges.txt").read_text(encoding="utf-8").splitlines()
                      if m and not m.startswith("#version")]
        else:
            raise FileNotFoundError(f"{d}: no tokenizer.json and no vocab.json + merges.txt")
        if (d / "tokenizer_config.json").is_file():
            cfg = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
            added.update({v["content"]: int(k) for k, v in cfg.get("added_tokens_decoder", {}).items()})
        if (d / "added_tokens.json").is_file():
            added.update(json.loads((d / "added_tokens.json").read_text(encoding="utf-8")))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{d}: malformed tokenizer files ({type(e).__name__}: {e})") from None
    to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    ranks = {}
    for tok, i in vocab.items():
        if tok in added:
            continue
        try:
            ranks[bytes(to_byte[c] for c in tok)] = int(i)
        except KeyError:
            raise ValueError(f"{name}: token {tok!r} is not byte-level BPE") from None
    last = -1                       # merge k must produce a token whose id grows with k
    for m in merges:
        a, b = m.split(" ") if isinstance(m, str) else m
        i = vocab.get(a + b)
        if i is None or i <= last:
            raise ValueError(f"{name}: merge {a!r}+{b!r} is not in vocab-id order; "
                             "tiktoken cannot reproduce this tokenizer")
        last = i
    specials = {t: int(i) for t, i in added.items()}
    return tiktoken.Encoding(d.name or "tokenizer", pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens=specials)


def encode_text(enc, text):
    """Token ids of one sentence: NFC (as Qwen2's normalizer), added tokens recognised."""
    return enc.encode(unicodedata.normalize("NFC", text), allowed_special="all")


# ----------------------------------------------------------------------------------------------
# A byte-level BPE trained on a corpus's own sentences. The byte-level default spends one frame
# per byte (a sentence of 20-40 frames); with merges learnt on the corpus each word becomes one
# token or two, so a sentence's text takes 5-8 frames, as with a real LLM tokenizer.

def train_bpe(texts, max_merges=1024, min_count=2):
    """Merges learnt on `texts` (pre-tokenised by QWEN2_PATTERN, each distinct pre-token weighted
    by its count): repeatedly join the most frequent adjacent pair (ties: the smaller pair), until
    `max_merges` or no pair occurs `min_count` times. -> merges [(a, b)] in order (bytes)."""
    import regex
    from collections import Counter
    words = Counter(tuple(bytes([c]) for c in w.encode()) for t in texts
                    for w in regex.findall(QWEN2_PATTERN, unicodedata.normalize("NFC", t)))
    merges = []
    while len(merges) < max_merges:
        pairs = Counter()
        for w, n in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += n
        best = max(pairs.items(), key=lambda kv: (kv[1], [-x for x in kv[0][0] + kv[0][1]]), default=None)
        if best is None or best[1] < min_count:
            break
        (a, b), merged = best[0], best[0][0] + best[0][1]
        merges.append((a, b))
        new = Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] += n
        words = new
    return merges


def save_bpe(path, merges, specials=(WAIT_TOKEN, "<|endoftext|>", "<|pad|>")):
    """Write `merges` as a Hugging Face tokenizer.json (byte-level BPE: ids 0..255 the bytes, then
    one id per merge, then the special tokens), which load_tokenizer and the `tokenizers` library
    both read."""
    char = _bytes_to_unicode()
    spell = lambda bs: "".join(char[c] for c in bs)
    vocab = {spell(bytes([i])): i for i in range(256)}
    for a, b in merges:
        vocab[spell(a + b)] = len(vocab)
    added = [{"id": len(vocab) + k, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for k, s in enumerate(specials)]
    tj = {"version": "1.0", "added_tokens": added, "normalizer": {"type": "NFC"},
          "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
              {"type": "Split", "pattern": {"Regex": QWEN2_PATTERN}, "behavior": "Isolated", "invert": False},
              {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
          "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
          "model": {"type": "BPE", "vocab": vocab, "merges": [f"{spell(a)} {spell(b)}" for a, b in merges]}}
    Path(path).mkdir(parents=True, exist_ok=True)
    (Path(path) / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")


def word_tokens(enc, text, words, where):
    """The sentence's tokens split into one list per timed word: each regex pre-token (what BPE
    encodes on its own) goes to the word whose text it starts in, punctuation to the word before,
    so the lists concatenate to exactly the sentence's tokens."""
    import regex
    text = unicodedata.normalize("NFC", text)
    starts, at = [], 0
    for w, _, _ in words:
        core = regex.sub(r"[^\w]", "", w)
        found = text.lower().find(core.lower(), at) if core else -1
        if found < 0:
            raise ValueError(f"{where}: word {w!r} is not in the sentence {text!r}")
        starts.append(found)
        at = found + len(core)
    out = [[] for _ in words]
    for m in regex.finditer(QWEN2_PATTERN, text):
        k = max(0, sum(st <= m.start() + len(m.group()) - len(m.group().lstrip()) for st in starts) - 1)
        out[k] += encode_text(enc, m.group())
    return out
