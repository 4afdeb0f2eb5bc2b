"""tokenizer.py: the byte-level default, Qwen2-style files read exactly (parity with the
`tokenizers` library), and a BPE learnt on a corpus's own sentences."""
import json

import pytest

import data
import tokenizer

def test_byte_tokenizer_default():
    enc = tokenizer.load_tokenizer()
    text = "Héllo 你好 😀"
    assert tokenizer.encode_text(enc, text) == list(text.encode("utf-8"))
    assert enc.encode_single_token("<|wait|>") == 256 and enc.encode_single_token("<|pad|>") == 258
    assert enc.decode(list(text.encode("utf-8"))) == text


def test_tokenizer_parity_with_tokenizers_library(tmp_path):
    tk = pytest.importorskip("tokenizers")
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
    corpus = ["Hello world! The quick brown fox jumps over the lazy dog 12345.",
              "你好，世界！我们今天学习分词。", "  indented   spaces\n\nnew lines\ttabs",
              "It's we've they'll I'm", "emoji 😀🎉 and café naïve", "3.14159 + 2,718 = 5.86"] * 20
    tok = tk.Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tokenizer.QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens(["<|endoftext|>", "<|wait|>"])
    (tmp_path / "a").mkdir()
    tok.save(str(tmp_path / "a" / "tokenizer.json"))
    (tmp_path / "b").mkdir()                       # the other layout: vocab.json + merges.txt
    tok.model.save(str(tmp_path / "b"))
    (tmp_path / "b" / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        str(i): {"content": t.content} for i, t in tok.get_added_tokens_decoder().items()}}))
    texts = ["Hello world, the lazy fox jumps!", "你好世界，分词学习。", "  many    spaces \n\n\n x\t\ty",
             "1234567 89 3.14", "It's THEY'LL we'VE", "😀🎉👍 emoji 🎉", "wait <|wait|> here<|endoftext|>",
             "café naïve résumé", "!!!??? ...,,,", ""]
    for sub in ("a", "b"):
        enc = tokenizer.load_tokenizer(tmp_path / sub)
        for t in texts:
            assert tokenizer.encode_text(enc, t) == tok.encode(t).ids, (sub, t)
        assert enc.encode_single_token("<|wait|>") == tok.token_to_id("<|wait|>")
        assert enc.decode(tokenizer.encode_text(enc, texts[1])) == texts[1]


def test_tokenizer_bad_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        tokenizer.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="malformed"):
        tokenizer.load_tokenizer(tmp_path)


# ---------------------------------------------------------------------------- formats



def test_trained_bpe_makes_words_tokens_and_round_trips(tmp_path):
    texts = ["The red cat sleeps.", "The blue dog runs.", "Count from three to six.", "Three, four, five, six."] * 5
    merges = tokenizer.train_bpe(texts)
    assert merges and all(isinstance(a, bytes) and isinstance(b, bytes) for a, b in merges)
    tokenizer.save_bpe(tmp_path, merges)
    enc = tokenizer.load_tokenizer(tmp_path)
    assert enc.n_vocab == 256 + len(merges) + 3
    wait = enc.encode_single_token(tokenizer.WAIT_TOKEN)
    assert wait == 256 + len(merges)
    ids = tokenizer.encode_text(enc, "The red cat sleeps.")
    assert [enc.decode([i]) for i in ids] == ["The", " red", " cat", " sleeps", "."]   # a word a token
    for t in ["Count from six to three.", "An unseen word: zebra!", "Héllo"]:        # anything still encodes
        assert enc.decode(tokenizer.encode_text(enc, t)) == t
    tk = pytest.importorskip("tokenizers")        # a standard tokenizer.json
    hf = tk.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for t in texts[:4] + ["zebra <|wait|> x"]:
        assert hf.encode(t).ids == tokenizer.encode_text(enc, t)


def test_word_tokens_split_the_sentence_tokens(tmp_path):
    tokenizer.save_bpe(tmp_path, tokenizer.train_bpe(["Repeat after me: the red cat sleeps."] * 3))
    enc = tokenizer.load_tokenizer(tmp_path)
    text = "Repeat after me: the red cat sleeps."
    words = [["Repeat", 0.0, 0.4], ["after", 0.4, 0.8], ["me", 0.8, 1.3], ["the", 1.3, 1.5], ["red", 1.5, 1.7],
             ["cat", 1.7, 2.1], ["sleeps", 2.1, 2.7]]
    pieces = tokenizer.word_tokens(enc, text, words, "test")
    assert sum(pieces, []) == tokenizer.encode_text(enc, text)
    assert [enc.decode(p) for p in pieces] == ["Repeat", " after", " me:", " the", " red", " cat", " sleeps."]
    with pytest.raises(ValueError, match="'dog' is not in the sentence"):
        tokenizer.word_tokens(enc, text, [["dog", 0, 1]], "test")
