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
