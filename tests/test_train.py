"""train.py: distributed = single process, exact resume, crash-safe checkpoints, init from the
official fixture and from a Qwen2-layout directory, and the evaluation metrics on hand-made cases.

Data is a synthetic prepared directory written here in data.py's shard format (no espeak, no
codec), with a micro model (small audio vocabulary) so the whole file runs in well under a minute.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import data
import evaluate
import grid
import tokenizer
import sizing
import train
from demo import corpus
from model import FLMAudio, FLMConfig

ROOT = Path(__file__).resolve().parents[1]
MICRO = dict(vocab_size=264, text_wait_token_id=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, aud_vocab_size=66, aud_pad_token_id=65,
             aud_emp_token_id=64, depth_n_layer=1, depth_n_head=2, depth_n_embd=16, rope_theta=10000.0)
WORDS = "the cat dog sings runs red blue one two three".split()


def write_shard(root, name, split, dialogs, n_codes, rng):
    """One shard in data.py's format: NAME.codes.npy int16 [2, 8, frames] + NAME.json."""
    parts, metas, offset = [], [], 0
    for i, sents in enumerate(dialogs):
        n = int(max(s["end"] for s in sents) * 12.5) + 12
        parts.append(rng.integers(0, n_codes, (2, 8, n)).astype(np.int16))
        metas.append({"id": f"{name}-{i}", "kind": "dialog", "source": f"synthetic:{name}:{i}", "offset": offset,
                      "n_frames": n, "sentences": sents})
        offset += n
    arr = np.concatenate(parts, axis=2)
    np.save(root / f"{name}.codes.npy", arr)
    (root / f"{name}.json").write_text(json.dumps({"version": 1, "split": split, "settings": {},
                                                   "codes": f"{name}.codes.npy", "shape": list(arr.shape),
                                                   "crc32": data._crc(arr), "dialogs": metas}))
    return {"name": name, "split": split, "n_dialogs": len(dialogs), "n_frames": int(arr.shape[2])}


def make_data(root, n_codes=64, seed=0):
    rng = np.random.default_rng(seed)
    enc = tokenizer.load_tokenizer(None)
    root.mkdir(parents=True, exist_ok=True)

    def dialog():
        t, sents = 0.3, []
        for spk in ("user", "assistant"):
            text = " ".join(rng.choice(WORDS, 3)) + "."
            sents.append({"speaker": spk, "start": t, "end": t + 1.2, "text": text, "tokens": enc.encode(text)})
            t += 1.6
        return sents
    shards = [write_shard(root, "train_00000", "train", [dialog() for _ in range(12)], n_codes, rng),
              write_shard(root, "val_00000", "val", [dialog() for _ in range(3)], n_codes, rng)]
    (root / "index.json").write_text(json.dumps({"version": 1, "max_tail": 50, "codec": "", "tokenizer": None,
                                                 "shards": shards}))
    return root


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data") / "prepared")


def micro_preset(tmp, data_dir, steps=(2, 2), **kw):
    cfg = dict(data_dir=str(data_dir), model="tiny", model_args=MICRO, batch_size=2, grad_accum=2, window_frames=20,
               stages=[dict(name="post", steps=steps[0], mix=[dict(task="asr"), dict(task="tts", weight=2.0),
                                                             dict(task="dialog", placement="mix")], lr=3e-3, warmup=1),
                       dict(name="sft", steps=steps[1], mix=[dict(task="dialog")], lr=1e-3, warmup=1)],
               eval_interval=0, ckpt_interval=0, log_interval=1, threads=1, seed=7, eval_spoken=0)
    cfg.update(kw)
    path = tmp / "preset.py"
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in cfg.items()))
    return str(path)


def losses(out_dir):
    rows = [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_config_layers(tmp_path, synthetic):
    preset = micro_preset(tmp_path, synthetic, batch_size=3)
    cfg = train.load_config([preset, "--batch_size=5", "--out_dir=x", "--compile=True", "--init_path=123"])
    assert (cfg["batch_size"], cfg["out_dir"], cfg["compile"], cfg["init_path"]) == (5, "x", True, "123")
    assert train.load_config([preset, "--eval_only", "--init_from=resume"])["eval_only"] is True   # a bare flag
    assert cfg["stages"][1]["wait_weight"] == train.DEFAULTS["wait_weight"]     # stage defaults filled in
    with pytest.raises(ValueError, match="expected int"):
        train.load_config([preset, "--batch_size=lots"])
    with pytest.raises(ValueError, match="dtype='half'"):
        train.load_config([preset, "--dtype=half"])
    bad = tmp_path / "bad.py"
    bad.write_text("batchsize = 3\n")
    with pytest.raises(ValueError, match="unknown key 'batchsize'"):
        train.load_config([str(bad)])
    # the schedule: warmup then cosine to min_lr within each stage
    st = {"lr": 1.0, "min_lr": 0.1, "warmup": 2, "steps": 6}
    assert [round(train.lr_at(st, s), 4) for s in range(6)] == [0.5, 1.0, 1.0, 0.8682, 0.55, 0.2318]   # 0.1 + 0.45 (1 + cos(pi (s - 2) / 4))
    assert train.stage_at(cfg["stages"], 2)[0] == 1 and train.stage_at(cfg["stages"], 1)[2] == 1


@pytest.mark.parametrize("parallel,nproc", [("ddp", 2), ("fsdp", 2), ("fsdp", 1)])
def test_torchrun_two_processes_equals_one(tmp_path, synthetic, parallel, nproc):
    """DDP and FSDP2 over two processes, and FSDP2 in one plain process (its own process group),
    train exactly as the single-process loop does."""
    preset = micro_preset(tmp_path, synthetic)
    train.train([preset, f"--out_dir={tmp_path / 'one'}"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    extra = ["--parallel=fsdp", "--activation_checkpointing=True"] if parallel == "fsdp" else ["--parallel=ddp"]
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    p = subprocess.Popen([sys.executable, *launch, str(ROOT / "train.py"), preset, f"--out_dir={tmp_path / 'two'}",
                          *extra],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        _, err = p.communicate(timeout=180)
    finally:                                             # never leave workers behind
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 0, err[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    assert one[1] != one[4]
    for s in one:
        assert abs(one[s] - two[s]) < 1e-5 * abs(one[s]), (s, one[s], two[s])
    # and the weights both runs end with agree
    a = FLMAudio.from_pretrained(tmp_path / "one" / "latest").state_dict()
    b = FLMAudio.from_pretrained(tmp_path / "two" / "latest").state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_memory_plan_by_hand():
    """The estimate's parts, worked by hand for the tiny shape: float32 state (4 + 4 + 8 bytes per
    parameter) divided over the FSDP world, activations linear in batch x window, checkpointing
    keeping one layer's tensors instead of all of them."""
    cfg = FLMConfig.preset("tiny")
    n = FLMAudio(cfg).num_params()
    a = sizing.memory_plan(cfg, world=4, batch=2, window=100, mode="fsdp")
    b = sizing.memory_plan(cfg, world=1, batch=4, window=100, mode="ddp", checkpointing=False)
    assert a["params"] == n and a["weights"] == 4 * n / 4 / 1e9 and a["optimizer"] == 8 * n / 4 / 1e9
    assert b["weights"] == 4 * n / 1e9 and b["copies"] == 2 * n / 1e9
    H, I, kv, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim, cfg.num_hidden_layers
    inside = 2 * (10 * H + 2 * kv + 4 * I) + 8 * (H + kv)
    assert b["activations"] - 2 * a["activations"] == pytest.approx(400 * (L - 1) * inside / 1e9)
    assert a["total"] == pytest.approx(sum(a[k] for k in ("weights", "gradients", "optimizer", "copies", "activations")))


def test_resume_is_exact(tmp_path, synthetic):
    preset = micro_preset(tmp_path, synthetic, steps=(3, 3), audio_noise=0.2)        # noise drawn per (step, index)
    train.train([preset, f"--out_dir={tmp_path / 'full'}"])
    train.train([preset, f"--out_dir={tmp_path / 'cut'}", "--max_steps=2"])           # stops mid-stage
    train.train([preset, f"--out_dir={tmp_path / 'cut'}", "--init_from=resume"])
    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(cut) == list(range(1, 7))
    assert [full[s] for s in range(3, 7)] == [cut[s] for s in range(3, 7)]


def test_crash_while_writing_checkpoint_keeps_previous(tmp_path, synthetic, monkeypatch):
    preset = micro_preset(tmp_path, synthetic, steps=(2, 2), ckpt_interval=2, keep_last=2)
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def crashing_save(obj, f, *a, **k):               # the second checkpoint dies half-written
        calls.append(f)
        if len(calls) == 2:
            Path(f).write_bytes(b"partial")
            raise OSError("disk full (simulated)")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="simulated"):
        train.train([preset, f"--out_dir={out}"])
    monkeypatch.setattr(torch, "save", real_save)
    assert os.readlink(out / "latest") == "ckpt-0000002"
    assert [p.name for p in train.checkpoints(out)] == ["ckpt-0000002"]
    FLMAudio.from_pretrained(out / "latest")                # the previous checkpoint loads
    with pytest.raises(ValueError, match="init_from=resume"):
        train.train([preset, f"--out_dir={out}"])           # a fresh run refuses to mix with it
    train.train([preset, f"--out_dir={out}", "--init_from=resume"])
    assert not list(out.glob(".tmp-*")) and os.readlink(out / "latest") == "ckpt-0000004"


def test_init_from_official_fixture(tmp_path, synthetic, official_dir):
    FIX = official_dir
    preset = micro_preset(tmp_path, synthetic, steps=(1, 1), model_args={}, grad_accum=1)
    # the fixture has a 384-token text vocabulary with <wait> = 381; its audio vocabulary is 2050
    data_dir = make_data(tmp_path / "data2048", n_codes=2048)
    train.train([preset, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'o'}", "--init_from=flm",
                 f"--init_path={FIX}"])
    before = FLMAudio.from_pretrained(FIX).state_dict()
    after = FLMAudio.from_pretrained(tmp_path / "o" / "latest")
    assert after.cfg.text_wait_token_id == 381
    moved = [k for k in before if not torch.equal(before[k], after.state_dict()[k])]
    assert len(moved) > len(before) // 2                    # it trained, starting from the fixture
    assert len(losses(tmp_path / "o")) == 2


def test_init_from_qwen_layout(tmp_path, synthetic):
    q = tmp_path / "qwen"
    q.mkdir()
    shape = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0)
    (q / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], **shape,
                                               "tie_word_embeddings": True}))
    g = torch.Generator().manual_seed(0)
    sd = {"model.embed_tokens.weight": torch.randn(300, 32, generator=g), "model.norm.weight": torch.ones(32)}
    for i in range(2):
        p = f"model.layers.{i}."
        for n, s in [("self_attn.q_proj", (32, 32)), ("self_attn.k_proj", (16, 32)), ("self_attn.v_proj", (16, 32)),
                     ("self_attn.o_proj", (32, 32)), ("mlp.gate_proj", (64, 32)), ("mlp.up_proj", (64, 32)),
                     ("mlp.down_proj", (32, 64))]:
            sd[p + n + ".weight"] = torch.randn(*s, generator=g) * 0.05
            if n[-6:] in ("q_proj", "k_proj", "v_proj"):
                sd[p + n + ".bias"] = torch.zeros(s[0])
        sd[p + "input_layernorm.weight"] = torch.ones(32)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(32)
    save_file(sd, str(q / "model.safetensors"))
    audio = {k: MICRO[k] for k in ("aud_vocab_size", "aud_pad_token_id", "aud_emp_token_id", "depth_n_layer",
                                   "depth_n_head", "depth_n_embd", "text_wait_token_id")}
    preset = micro_preset(tmp_path, synthetic, steps=(1, 1), model_args=audio, grad_accum=1)
    train.train([preset, f"--out_dir={tmp_path / 'o'}", "--init_from=qwen", f"--init_path={q}"])
    m = FLMAudio.from_pretrained(tmp_path / "o" / "latest")
    assert m.cfg.vocab_size == 300 and m.cfg.hidden_size == 32
    # the Qwen weights were the starting point: after two small steps they are still close
    assert (m.layers[1].mlp.down_proj.weight - sd["model.layers.1.mlp.down_proj.weight"]).abs().max() < 0.02
    assert len(losses(tmp_path / "o")) == 2


def test_metrics_by_hand():
    enc = tokenizer.load_tokenizer(None)
    ids = [256, *enc.encode("Hi there."), 256, 256, *enc.encode("Bye."), 256, 257]
    assert evaluate.decode_text(enc, ids, 256) == ["Hi there.", "Bye."]
    assert evaluate.edit_distance("kitten", "sitting") == 3
    assert evaluate.normalise("  Two, three;  FOUR! ") == "two three four"
    # understanding vs. speaking: the monologue wrote the answer as a sentence (heard words alone do
    # not count), paired with what the judge recognised; events that are not scored answers are skipped
    res = [dict(event="answer", expected="The red cat sleeps.", correct=False),
           dict(event="answer", expected="Two plus two is four.", correct=True),
           dict(event="answer", expected="One, two.", correct=None), dict(event="pause")]
    assert evaluate.thought_answers(["the", "red", "The red cat sleeps!", "Two plus two is five."], res) == \
        [(True, False), (False, True)]


def test_undelay_inverts_the_grid_delays():
    mcfg = FLMConfig(**MICRO)
    codes = {"assistant": np.arange(8 * 12).reshape(8, 12) % 60, "user": np.zeros((8, 12), dtype=np.int64)}
    tok = grid.dialog_grid([], codes, mcfg, "dialog")[0]               # column 0: the initial column
    assert tok[1, 3] == codes["assistant"][0, 3] and tok[2, 3] == codes["assistant"][1, 2]   # delays 0 and 1
    back = evaluate.undelay(torch.from_numpy(tok[1:9]), 12, mcfg.aud_pad_token_id)
    assert torch.equal(back[:, 1:], torch.from_numpy(codes["assistant"][:, 1:]))
    assert back[0, 0] == mcfg.aud_pad_token_id                        # frame 0's semantic code is in column 0
    short = evaluate.undelay(torch.from_numpy(tok[1:9, :6]), 12, mcfg.aud_pad_token_id)
    assert (short[0, 6:] == mcfg.aud_pad_token_id).all() and (short[1:, 5:] == mcfg.aud_pad_token_id).all()


def test_greedy_decode_reads_back_only_the_rows_it_is_told():
    torch.manual_seed(0)
    mcfg = FLMConfig(**MICRO)
    model = FLMAudio(mcfg).eval()
    tok = torch.randint(0, 64, (2, 17, 12))
    tok[:, 0] = torch.randint(0, 260, (2, 12))
    with torch.no_grad():
        # nothing read back: every column's prediction from the recorded history (one uncached pass)
        h, logits = model.backbone(tok[:, :, :-1])
        prev = tok.new_zeros(2 * 11, 0)
        for _ in range(8):
            prev = torch.cat([prev, model.depth_gpt(h.flatten(0, 1), prev)[:, -1].argmax(-1, keepdim=True)], 1)
        got = evaluate.greedy_decode(model, tok, True, fed_back=[])
        assert torch.equal(got[:, 0, 1:], logits.argmax(-1))
        assert torch.equal(got[:, 1:9, 1:], prev.view(2, 11, 8).permute(0, 2, 1))
        assert torch.equal(got[:, 9:], tok[:, 9:]) and torch.equal(got[:, :, 0], tok[:, :, 0])
        # only the semantic row read back: uncached passes over the whole (causal) grid, one per column
        buf = tok.clone()
        for t in range(11):
            hh = model.backbone(buf[:, :, :-1])[0][:, t]
            p = tok.new_zeros(2, 0)
            for _ in range(8):
                p = torch.cat([p, model.depth_gpt(hh, p)[:, -1].argmax(-1, keepdim=True)], 1)
            buf[:, 1, t + 1] = p[:, 0]
        sem = evaluate.greedy_decode(model, tok, True, text=False, fed_back=[1])
        assert torch.equal(sem[:, 1], buf[:, 1]) and torch.equal(sem[:, 0], tok[:, 0])


def test_eval_runs_and_a_checkpoint_carries_its_files(tmp_path):
    root = make_data(tmp_path / "d")
    save_file({"demo_codec.codebooks": torch.zeros(1)}, str(tmp_path / "fitted.safetensors"))
    index = json.loads((root / "index.json").read_text())
    (root / "index.json").write_text(json.dumps({**index, "codec": str(tmp_path / "fitted.safetensors")}))
    preset = micro_preset(tmp_path, root, steps=(1, 1), eval_interval=2, eval_decode=2, eval_batches=1,
                          grad_accum=1)
    ev = train.train([preset, f"--out_dir={tmp_path / 'o'}"])
    assert set(ev) >= {"val_dialog", "val_asr", "val_tts", "asr_cer", "tts_semantic_acc", "monologue_val_seen",
                       "answer_loss", "answer_loss_other_audio"}
    again = train.train([preset, f"--out_dir={tmp_path / 'o'}", "--init_from=resume", "--eval_only=True"])
    assert again == ev                                      # evaluation is deterministic, from the checkpoint
    # in bf16 autocast (CPU here, as on CUDA): decoding writes bf16 keys into the float32 KV cache
    half = train.train([preset, f"--out_dir={tmp_path / 'o'}", "--init_from=resume", "--eval_only", "--dtype=bfloat16"])
    assert half["val_dialog"]["loss"] != ev["val_dialog"]["loss"]                     # autocast took effect
    assert half["val_dialog"]["loss"] == pytest.approx(ev["val_dialog"]["loss"], rel=0.05)
    files = {p.name for p in (tmp_path / "o" / "latest").iterdir()}
    assert {"config.json", "model.safetensors", "training_state.pt", "train_config.json",
            data.DEMO_CODEC_FILE} <= files
    save_file({"demo_codec.codebooks": torch.ones(1)}, str(tmp_path / "fitted.safetensors"))   # data refitted
    with pytest.raises(ValueError, match="demo_codec.safetensors: the checkpoint was trained with another codec"):
        train.train([preset, f"--out_dir={tmp_path / 'o'}", "--init_from=resume", "--eval_only=True"])


def _random_demo_codec(path, n_codes=256):
    """A demo-codec file with random codebooks (fitting one is tested in test_democodec.py)."""
    from demo import codec as democodec
    dim = democodec.SUB * democodec.N_MELS
    g = torch.Generator().manual_seed(0)
    democodec.DemoCodec(torch.zeros(dim), torch.ones(dim) * 3, torch.randn(8, n_codes, dim, generator=g)).save(path)
    return path


def test_a_few_steps_teach_it_to_listen(tmp_path):
    """The signal the demo is about: the first token of an answer ("Four, five, six." to "Count from
    four to six.") can only come from the user's audio. A micro model trained for a few steps on a
    slice of spoken counting dialogs lowers its loss on those tokens, and then predicts them worse
    when given another dialog's audio."""
    pytest.importorskip("espeakng_loader")
    rnd, lines = __import__("random").Random(0), []
    (tmp_path / "wavs").mkdir()
    for i, s in enumerate([1, 2, 4, 5, 8, 9] * 2):
        tl = corpus.Timeline()
        _, q = tl.say("user", f"Count from {corpus.NUM[s]} to {corpus.NUM[s + 2]}.", corpus.user_voice(rnd), 0.3)
        tl.say("assistant", ", ".join(corpus.NUM[s:s + 3]).capitalize() + ".", corpus.ASSISTANT, q + 0.4)
        import soundfile as sf
        sf.write(str(tmp_path / "wavs" / f"{i}.flac"), tl.render(1.0).T, 24000)
        lines.append(json.dumps({"id": str(i), "audio": f"wavs/{i}.flac", "split": "train", "segments": tl.segments}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    data.prepare(tmp_path / "m.jsonl", tmp_path / "p", codec=_random_demo_codec(tmp_path / "c.safetensors"),
                 tokenizer="bpe", val_frac=0.0, log=lambda *a: None)
    ds = data.ShardDataset(tmp_path / "p", "train")
    args = {k: v for k, v in MICRO.items() if k not in ("vocab_size", "text_wait_token_id")}
    args.update(aud_vocab_size=258, aud_emp_token_id=256, aud_pad_token_id=257)      # the codec's 256 codes
    preset = micro_preset(tmp_path, tmp_path / "p", model_args=args, window_frames=64, batch_size=6, grad_accum=1,
                          stages=[dict(name="sft", steps=150, lr=5e-3, warmup=5, mix=[dict(task="dialog")])])

    def first_token_losses(model):
        tok, w, _ = evaluate.whole_grids(ds, range(len(ds)), model.cfg, "dialog", "lead", "cpu")
        first = (tok[:, 0] != model.cfg.text_wait_token_id) & (tok[:, 0].roll(1, 1) == model.cfg.text_wait_token_id)
        w = torch.zeros_like(w)
        w[:, 0] = first.float()                      # weight only each answer's first token
        other = torch.cat([tok[:, :9], tok[:, 9:].roll(1, 0)], 1)
        with torch.no_grad():
            return evaluate.text_loss(model, tok, w), evaluate.text_loss(model, other, w)
    train.train([preset, f"--out_dir={tmp_path / 'o'}", "--max_steps=1"])
    before, _ = first_token_losses(FLMAudio.from_pretrained(tmp_path / "o" / "latest"))
    train.train([preset, f"--out_dir={tmp_path / 'o'}", "--init_from=resume"])
    after, other = first_token_losses(FLMAudio.from_pretrained(tmp_path / "o" / "latest"))
    assert after < 0.5 * before, (before, after)
    assert other > after + 0.5, (after, other)


def _tiny_demo_corpus(tmp_path, n_duplex, n_words):
    """A few demo-corpus recordings prepared into tmp_path/prep (BPE, a random demo codec); returns
    the micro model's shape without the vocabulary, which train.py takes from the data."""
    man = corpus.demo(tmp_path / "demo", n_dialogs=3, n_duplex=n_duplex, n_utterances=2, n_val=4, n_words=n_words,
                      jobs=1, log=lambda *a: None)
    data.prepare(man, tmp_path / "prep", codec=_random_demo_codec(tmp_path / "c.safetensors"), tokenizer="bpe",
                 log=lambda *a: None)
    return {k: v for k, v in MICRO.items() if not k.startswith("aud_") and k not in ("vocab_size", "text_wait_token_id")}


def test_end_to_end_demo_corpus_train_spoken_evaluation_and_chat(tmp_path, capsys):
    """data.py demo (a few recordings) -> prepare (BPE, a random demo codec) -> train -> the spoken
    evaluation (streamed, decoded, judged from the audio) and the held-out demo question -> chat.py
    loads the checkpoint with its tokenizer and codec."""
    pytest.importorskip("espeakng_loader")
    import chat
    args = _tiny_demo_corpus(tmp_path, n_duplex=2, n_words=2)
    preset = micro_preset(tmp_path, tmp_path / "prep", steps=(1, 1), model_args=args, eval_interval=2,
                          eval_decode=2, eval_batches=1, grad_accum=1, window_frames=48, eval_spoken=4)
    ev = train.train([preset, f"--out_dir={tmp_path / 'o'}"])
    sp = ev["spoken"]
    assert sp["turns"] >= 3 and sp["answers"] <= sp["turns"]
    m, g = sp["monologue_in_loop"], sp["spoken_given_monologue"]
    assert m["n"] == sp["answers"] and g["n"] == m["correct"] and g["correct"] <= sp["answers_correct"]
    out = capsys.readouterr().out
    assert "held-out question" in out and "| spoken answers, recognised from the audio |" in out
    said = re.search(r'assistant said \(recognised from its audio\): "(.*)" \((correct|wrong); expected "(.*)"\)', out)
    heard = ev["demo_question"]                                      # the line prints what the judge heard
    assert said and said[1] == str(heard["recognized"]) and (said[2] == "correct") == bool(heard["correct"])
    assert (tmp_path / "o" / "demo_question.wav").is_file() and (tmp_path / "o" / "demo_reply.wav").is_file()
    model, tok = chat.load_checkpoint(tmp_path / "o" / "latest")
    index = json.loads((tmp_path / "prep" / "index.json").read_text())
    assert tok.n_vocab == index["tokenizer_n_vocab"] and model.cfg.vocab_size >= tok.n_vocab
    c = model.cfg                                                    # the audio vocabulary is the codec's 256 codes
    assert (c.aud_vocab_size, c.aud_emp_token_id, c.aud_pad_token_id) == (258, 256, 257)
    assert model.cfg.text_wait_token_id == tok.encode_single_token(tokenizer.WAIT_TOKEN)
    assert chat.find_codec(tmp_path / "o" / "latest").name == data.DEMO_CODEC_FILE
    evaluate.main(["--checkpoint", str(tmp_path / "o"), "--data_dir", str(tmp_path / "prep"), "--n_decode=1",
                   "--n_spoken=0", "--speech_probe=2", "--out", str(tmp_path / "ev.json")])
    probe = json.loads((tmp_path / "ev.json").read_text())["speech_probe"]
    totals = {way: int(v.split("/")[1]) for way, v in probe.items()}
    assert list(totals) == ["recorded", "teacher_forced", "own_frame", "own_semantic", "own_acoustic", "own_audio",
                            "own_audio_and_text"]
    assert len(set(totals.values())) == 1 and totals["recorded"] >= 1


def test_every_preset_loads_and_names_valid_tasks_and_placements():
    """config/*.py: each preset parses, every mix entry is a task the grid knows, placed where
    grid.py can place it, and each stage says what it teaches (a comment line above it)."""
    from grid import PLACEMENTS, as_task
    root = Path(__file__).resolve().parents[1] / "config"
    for preset in sorted(root.glob("*.py")):
        cfg = train.load_config([str(preset)])
        for st in cfg["stages"]:
            for e in st["mix"]:
                t = train.Mixture.task(e, st)
                assert t.placement in (*PLACEMENTS, "mix") or isinstance(t.placement, float), (preset, st["name"])
                assert as_task(e["task"]).heard in (None, *PLACEMENTS), (preset, st["name"])
        text = preset.read_text().splitlines()
        for st in cfg["stages"]:
            line = next(i for i, x in enumerate(text) if f'name="{st["name"]}"' in x)
            assert text[line - 1].strip().startswith("#"), (preset.name, st["name"])


def test_ablation_summary_by_hand():
    """demo/ablation.summarise on made-up results: means, spreads, and which differences count."""
    from demo import ablation
    res = {}
    for arm, accs in {"dual": [0.5, 0.6, 0.7], "lead": [0.1, 0.2, 0.3], "trail": [0.5, 0.6, 0.7],
                      "word": [0.6, 0.6, 0.6]}.items():
        for s, a in enumerate(accs):
            res[arm, s] = {"spoken": {"answer_accuracy": a}, "monologue_val_combo": f"{s}/4",
                           "monologue_val_voice": "1/4", "language_loss": 1.0 + s}
    stats, md = ablation.summarise(res, [0, 1, 2])
    m, sd, n = stats["dual"]["spoken answers"]
    assert (round(m, 6), round(sd, 6), n) == (0.6, round(float(np.std([0.5, 0.6, 0.7])), 6), 3)
    assert stats["dual"]["monologue answers, held out"][0] == pytest.approx(np.mean([1 / 8, 2 / 8, 3 / 8]))
    assert stats["dual"]["ASR-style CER"] == (None, None, 0)
    # 0.6 vs 0.2, spreads 0.082 each: counts; dual vs trail (equal) and vs word (0.6 +- 0) do not
    assert "- spoken answers: dual better than lead" in md
    assert "than trail" not in md and "spoken answers: dual better than word" not in md


def test_ablation_quick_runs_every_arm_and_resumes(tmp_path):
    """`python demo/ablation.py --quick` on a micro model and a tiny corpus: every arm trains and is
    judged, the table and runs.json are written, and a second call reuses the finished runs."""
    pytest.importorskip("espeakng_loader")
    from demo import ablation
    args = _tiny_demo_corpus(tmp_path, n_duplex=3, n_words=0)
    extra = [f"--data_dir={tmp_path / 'prep'}", "--model=tiny", f"--model_args={args!r}", "--batch_size=2",
             "--window_frames=48", "--eval_batches=1", "--eval_decode=2", "--log_interval=100",
             "--demo_codec_codes=256"]                                  # _tiny_demo_corpus's codec
    runs, out = tmp_path / "runs", tmp_path / "results"
    stats = ablation.main(["--quick", f"--runs={runs}", f"--out={out}", "--jobs=2", *extra])
    assert set(stats) == {"dual", "lead", "trail", "word"}
    assert all(stats[a]["language loss (text only)"][2] == 1 for a in stats)
    assert len(json.loads((out / "runs.json").read_text())) == 4
    assert "| spoken answers |" in (out / "table.md").read_text()
    word = json.loads((runs / "word-s1337" / "latest" / "train_config.json").read_text())
    assert [s["placement"] for s in word["stages"]] == ["word-trail", "word-lead", "word-lead", "word-lead"]
    before = (runs / "dual-s1337" / "log.jsonl").read_text()
    (runs / "lead-s1337" / "result.json").unlink()                     # as if stopped before its result
    ablation.main(["--quick", f"--runs={runs}", f"--out={out}", "--jobs=1", *extra])
    assert (runs / "dual-s1337" / "log.jsonl").read_text() == before     # finished runs are not retrained
    assert (runs / "lead-s1337" / "result.json").is_file()
    table = (out / "table.md").read_text()
    (runs / "word-s1337" / "result.json").unlink()                     # --summary tabulates what is finished
    part = ablation.main(["--quick", "--summary", f"--runs={runs}", f"--out={out}"])
    assert part["word"]["ASR-style CER"] == (None, None, 0) and part["dual"] == stats["dual"]
    assert (out / "table.md").read_text() != table and "Seeds per arm: 0/1 of 1" in (out / "table.md").read_text()


@pytest.mark.parametrize("bad", ["--batch_size=0", "--batch_size=-1", "--grad_accum=0", "--window_frames=1",
                                 "--ckpt_interval=-5", "--log_interval=0", "--lr=-1", "--beta2=1.0", "--grad_clip=0",
                                 "--threads=-2", "--warmup=-3", "--weight_decay=-0.1", "--audio_noise=1.5",
                                 "--audio_noise=-0.1"])
def test_bad_values_are_named(tmp_path, bad):
    with pytest.raises(ValueError, match=bad.split("=")[0][2:]):
        train.load_config([micro_preset(tmp_path, tmp_path), bad])


def test_bad_stage_values_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"stages\[1\]: min_lr=0.1 exceeds lr=0.001"):
        train.load_config([micro_preset(tmp_path, tmp_path), "--stages=[{'steps': 1, 'mix': [{'task': 'asr'}]}, "
                           "{'steps': 1, 'mix': [{'task': 'asr'}], 'lr': 1e-3, 'min_lr': 0.1}]"])
    with pytest.raises(ValueError, match=r"stages\[0\].lr=0"):
        train.load_config([micro_preset(tmp_path, tmp_path), "--stages=[{'steps': 1, 'mix': [{'task': 'asr'}], 'lr': 0}]"])


def test_a_broken_preset_is_named_with_its_line(tmp_path):
    p = tmp_path / "broken.py"
    p.write_text("batch_size = 2\nwindow_frames = (\n")
    with pytest.raises(ValueError, match=rf"{p}:\d+: syntax error"):
        train.load_config([str(p)])
    p.write_text("batch_size = 2\nwindow_frames = undefined_name * 2\n")
    with pytest.raises(ValueError, match=rf"{p}:2: NameError"):
        train.load_config([str(p)])


def test_resume_does_not_unpickle(tmp_path, synthetic):
    """A training_state.pt that would run code when unpickled is refused, naming the file; a
    truncated one too."""
    preset = micro_preset(tmp_path, synthetic, steps=(1, 1))
    train.train([preset, f"--out_dir={tmp_path / 'o'}"])
    state = tmp_path / "o" / "latest" / "training_state.pt"
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))
    torch.save({"step": 1, "evil": Payload()}, state)
    with pytest.raises(ValueError, match="training_state.pt: unreadable training state"):
        train.train([preset, f"--out_dir={tmp_path / 'o'}", "--init_from=resume"])
    assert not marker.exists()
    state.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="training_state.pt: unreadable"):
        train.train([preset, f"--out_dir={tmp_path / 'o'}", "--init_from=resume"])


def test_audio_noise_changes_only_the_inputs_own_voice(synthetic):
    """audio_noise: the model reads a share of its own audio codes as random ones; the targets,
    the text, the user's audio and the pad ids stay as recorded, and 0 changes nothing."""
    mcfg = FLMConfig(**{**FLMConfig.preset("tiny").__dict__, **MICRO})
    mix = train.Mixture(synthetic, mcfg, verify=True)
    stage = dict(mix=[dict(task="dialog")], placement="lead", audio_noise=0.0)
    tok, w, inp = mix.batch(stage, 7, 3, 0, 16, 40)
    assert inp is None
    tok2, w2, inp = mix.batch({**stage, "audio_noise": 0.3}, 7, 3, 0, 16, 40)
    assert torch.equal(tok, tok2) and torch.equal(w, w2)            # the same draw, untouched targets
    changed = inp != tok
    assert not changed[:, 0].any() and not changed[:, 9:].any()     # text and the user's voice as recorded
    real = tok[:, 1:9] < mcfg.aud_emp_token_id
    assert not changed[:, 1:9][~real].any()                         # pad / empty ids are never replaced
    share = changed[:, 1:9][real].float().mean().item()             # a random code equals the old 1 in 64
    assert 0.3 * 63 / 64 - 0.03 < share < 0.3 * 63 / 64 + 0.03
    assert (inp[:, 1:9][real] < mcfg.aud_emp_token_id).all()
    model = FLMAudio(mcfg)
    weights = torch.ones(16, 9, 40)
    assert torch.equal(model(tok, weights)[0], model(tok, weights, inputs=tok)[0])
    assert not torch.equal(model(tok, weights)[0], model(tok, weights, inputs=inp)[0])


def test_silence_keep_thins_only_the_silent_speak_columns(synthetic):
    """silence_keep: the same tokens and text weights; speak rows keep their weight where the
    assistant talks, elsewhere weigh 0 or 1/keep (about keep of them), and DepthGPT runs on fewer
    columns. 1 changes nothing."""
    mcfg = FLMConfig(**{**FLMConfig.preset("tiny").__dict__, **MICRO})
    mix = train.Mixture(synthetic, mcfg, verify=True)
    stage = dict(mix=[dict(task="dialog")], placement="lead")
    tok, w, _ = mix.batch(stage, 7, 3, 0, 16, 40)
    assert torch.equal(w, mix.batch({**stage, "silence_keep": 1.0}, 7, 3, 0, 16, 40)[1])
    tok2, w2, _ = mix.batch({**stage, "silence_keep": 0.25}, 7, 3, 0, 16, 40)
    assert torch.equal(tok, tok2) and torch.equal(w[:, 0], w2[:, 0])
    ratio = torch.where(w[:, 1:] > 0, w2[:, 1:] / w[:, 1:].clamp(min=1e-9), torch.zeros(()))
    assert set(ratio[w[:, 1:] > 0].unique().tolist()) == {0.0, 1.0, 4.0}
    col = ratio.amax(1, keepdim=True)                              # a whole column, all 8 codebooks
    assert ((ratio == col) | (w[:, 1:] == 0)).all()
    thinned = (ratio[:, 0] != 1) & (w[:, 1] > 0)
    assert 0.15 < (ratio[:, 0][thinned] == 4).float().mean() < 0.35
    assert ((w2[:, 1:].sum(1) > 0).sum() < 0.75 * (w[:, 1:].sum(1) > 0).sum())
    with pytest.raises(ValueError, match="silence_keep"):
        train.load_config([micro_preset(Path(synthetic).parent, synthetic), "--silence_keep=0"])
