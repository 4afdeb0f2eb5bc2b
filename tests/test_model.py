"""model.py against the official implementation's outputs (fixtures), and its own invariants."""
import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import reference
from model import FLMAudio, FLMConfig

from conftest import FLM_FIXTURE, seeded_flm_state

torch.set_num_threads(1)   # a shared 2-core machine: a second thread mostly waits for the first


def small_config(**kw):
    base = dict(vocab_size=96, text_wait_token_id=90, aud_vocab_size=2050, hidden_size=64, intermediate_size=96,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                depth_n_layer=1, depth_n_head=2, depth_n_embd=32)
    base.update(kw)
    return FLMConfig(**base)


def random_tokens(cfg, B, T, gen):
    text = torch.randint(0, cfg.vocab_size, (B, 1, T), generator=gen)
    audio = torch.randint(0, cfg.aud_vocab_size, (B, 16, T), generator=gen)
    return torch.cat([text, audio], dim=1)


@pytest.fixture(scope="module")
def official(official_dir, official_expected):
    return FLMAudio.from_pretrained(official_dir), official_expected


def assert_rel_close(a, b, rel=1e-4):
    err = (a - b).abs().max() / b.abs().max()
    assert err < rel, f"relative error {err:.2e}"


def test_official_fixture_parity(official):
    m, e = official
    with torch.no_grad():
        h, logits = m.backbone(e["tokens"])
        assert_rel_close(h, e["hidden"])
        assert_rel_close(logits, e["text_logits"])
        B, _, T = e["tokens"].shape
        prev = e["tokens"][:, 1:8].permute(0, 2, 1).reshape(B * T, 7)
        depth = m.depth_gpt(h.reshape(B * T, -1), prev).view(B, T, 8, -1)
        assert_rel_close(depth, e["depth_logits"])
        # fewer previous codebooks = a prefix of the same causal computation
        part = m.depth_gpt(h.reshape(B * T, -1), prev[:, :3])
        assert_rel_close(part, depth.view(B * T, 8, -1)[:, :4])


def test_config_from_official_reads_token_ids():
    cfg = FLMConfig.from_official(FLM_FIXTURE / "config.json")
    raw = json.loads((FLM_FIXTURE / "config.json").read_text())
    assert cfg.text_wait_token_id == raw["mm_token_info"]["text_wait_token_id"]
    assert cfg.aud_emp_token_id == raw["mm_token_info"]["aud_emp_token_id"]
    assert (cfg.depth_n_layer, cfg.depth_n_embd) == (raw["aud_depthgpt"]["n_layer"], raw["aud_depthgpt"]["n_embd"])
    with pytest.raises(ValueError, match="missing key"):
        FLMConfig.from_official({"hidden_size": 3})


def test_save_reload_bit_identical_and_official_names(official, tmp_path):
    m, _ = official
    m.save_pretrained(tmp_path / "one")
    ref = seeded_flm_state()
    saved = load_file(tmp_path / "one" / "model.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in ref.items()}
    assert all(torch.equal(saved[k], ref[k]) for k in ref)
    # sharded: many files + index, and the reload is bit-identical
    m.save_pretrained(tmp_path / "sharded", max_shard_bytes=2_000_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3 and set(index["weight_map"]) == set(ref)
    m2 = FLMAudio.from_pretrained(tmp_path / "sharded")
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    assert FLMConfig.from_official(tmp_path / "sharded" / "config.json") == m.cfg


def test_mismatched_checkpoint_is_one_clear_error(tmp_path):
    cfg = json.loads((FLM_FIXTURE / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    sd = seeded_flm_state()
    sd.pop("model.norm.weight")
    sd["extra.weight"] = torch.zeros(1)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as err:
        FLMAudio.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "model.norm.weight" in msg and "extra.weight" in msg and "mlp.down_proj" in msg and "\n" not in msg
    with pytest.raises(FileNotFoundError, match="config.json"):
        FLMAudio.from_pretrained(tmp_path / "nowhere")


def test_7b_parameter_count_on_meta():
    with torch.device("meta"):
        m = FLMAudio(FLMConfig.preset("flm-audio-7b"))
    assert m.num_params() == 8_223_861_248


def test_config_round_trip_and_mup_keys():
    cfg = small_config(use_mup=True, input_mult=2.0, output_mult=3.0, mup_scale_factor=1.5)
    assert FLMConfig.from_official(cfg.to_official()) == cfg
    off = json.loads((FLM_FIXTURE / "config.json").read_text())
    assert FLMConfig.from_official(off).use_mup is False                # absent keys: the official defaults


@pytest.mark.parametrize("key,value", [("head_dim", 32), ("mlp_bias", True),
                                       ("rope_scaling", {"type": "yarn", "factor": 4.0})])
def test_unimplemented_config_keys_are_one_clear_error(key, value):
    off = json.loads((FLM_FIXTURE / "config.json").read_text())
    FLMConfig.from_official(dict(off, head_dim=16, mlp_bias=False, rope_scaling={"type": "mrope"}))   # all fine
    with pytest.raises(ValueError, match=f"config.json: {key}=") as err:
        FLMConfig.from_official(dict(off, **{key: value}))
    assert "\n" not in str(err.value)


def test_mup_scales_embeddings_and_text_logits():
    """use_mup: the summed embeddings times input_mult, the text logits times output_mult /
    mup_scale_factor; DepthGPT unaffected. Same as plain weights with every table doubled."""
    torch.manual_seed(0)
    mup = FLMAudio(small_config(use_mup=True, input_mult=2.0, output_mult=3.0, mup_scale_factor=1.5)).eval()
    plain = FLMAudio(small_config()).eval()
    plain.load_state_dict(mup.state_dict())
    with torch.no_grad():
        for e in plain.embed.modules():
            if isinstance(e, torch.nn.Embedding):
                e.weight.mul_(2.0)
        tokens = random_tokens(plain.cfg, 2, 5, torch.Generator().manual_seed(6))
        h, logits = mup.backbone(tokens)
        h_ref, logits_ref = plain.backbone(tokens)
        torch.testing.assert_close(h, h_ref)
        torch.testing.assert_close(logits, logits_ref * 2.0)
        prev = tokens[:, 1:4, 0]
        torch.testing.assert_close(mup.depth_gpt(h[:, 0], prev), plain.depth_gpt(h_ref[:, 0], prev))


def test_depth_step_equals_full_depth_forward(official):
    """The cached per-codebook step (one position each) gives DepthGPT's full-forward logits."""
    m, e = official
    B, _, T = e["tokens"].shape
    with torch.no_grad():
        h = m.backbone(e["tokens"])[0].reshape(B * T, -1)
        prev = e["tokens"][:, 1:9].permute(0, 2, 1).reshape(B * T, 8)
        full = m.depth_gpt(h, prev[:, :7])
        m.setup_cache(B * T, 4)
        inputs = m.depth_gpt.frame_inputs(h)
        steps = torch.stack([m.depth_gpt.step(inputs, prev[:, c - 1] if c else None, c) for c in range(8)], 1)
        m.drop_cache()
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)


def test_cpu_layout_keeps_outputs_and_checkpoints(official, tmp_path):
    m, e = official
    fast = copy.deepcopy(m).cpu_layout_()
    assert not fast.lm_head.weight.is_contiguous()                     # stored transposed
    with torch.no_grad():
        torch.testing.assert_close(fast.backbone(e["tokens"])[1], m.backbone(e["tokens"])[1], atol=1e-5, rtol=1e-5)
    fast.save_pretrained(tmp_path)
    saved, ref = load_file(tmp_path / "model.safetensors"), seeded_flm_state()
    assert all(torch.equal(saved[k], ref[k]) for k in ref)


def test_cached_decode_equals_full_forward():
    torch.manual_seed(0)
    cfg = small_config()
    m = FLMAudio(cfg).eval()
    tokens = random_tokens(cfg, 2, 12, torch.Generator().manual_seed(1))
    with torch.no_grad():
        h_full, logits_full = m.backbone(tokens)
        m.setup_cache(2, 16)
        steps = [m.step(tokens[:, :, t], torch.tensor(t))[0][:, None] for t in range(5)]
        chunk = m.backbone(tokens[:, :, 5:9], torch.tensor(5))[0]             # chunked prefill mid-stream
        steps += [chunk] + [m.backbone(tokens[:, :, t:t + 1], torch.tensor(t))[0] for t in range(9, 12)]
        torch.testing.assert_close(torch.cat(steps, dim=1), h_full, atol=1e-5, rtol=1e-4)
        # a reset cache serves a new conversation from position 0; without pos, the full forward
        m.reset_cache()
        torch.testing.assert_close(m.backbone(tokens[:, :, :3], torch.tensor(0))[1], logits_full[:, :3],
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(m.backbone(tokens)[0], h_full)
        m.drop_cache()


def test_cached_decode_under_bf16_autocast():
    """Training's evaluation decodes under autocast with float32 caches: bf16 keys and values are
    stored in them (index_copy_ refused the mixed dtypes) and the steps match the full forward."""
    torch.manual_seed(0)
    cfg = small_config()
    m = FLMAudio(cfg).eval()
    tokens = random_tokens(cfg, 2, 8, torch.Generator().manual_seed(3))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        h_full = m.backbone(tokens)[0].float()
        m.setup_cache(2, 8)
        assert m.layers[0].self_attn.cache.k.dtype == torch.float32
        steps = torch.cat([m.backbone(tokens[:, :, t:t + 1], torch.tensor(t))[0] for t in range(8)], dim=1)
        m.drop_cache()
    assert_rel_close(steps.float(), h_full, rel=3e-2)                  # bf16 rounding, not a wrong cache


def test_cache_slides_past_its_length():
    torch.manual_seed(0)
    cfg = small_config()
    m = FLMAudio(cfg).eval()
    tokens = random_tokens(cfg, 1, 20, torch.Generator().manual_seed(2))
    with torch.no_grad():
        m.setup_cache(1, 6)
        k_before = m.layers[0].self_attn.cache.k.data_ptr()
        out = torch.cat([m.backbone(tokens[:, :, t:t + 1], torch.tensor(t))[0] for t in range(20)], dim=1)
        assert m.layers[0].self_attn.cache.k.data_ptr() == k_before      # no reallocation
        torch.testing.assert_close(out, reference.windowed_forward(m, tokens, 6), atol=1e-5, rtol=1e-4)
        m.drop_cache()


def test_loss_targets_are_the_next_column():
    """With a single weighted position, the loss is the cross-entropy of exactly that prediction."""
    torch.manual_seed(0)
    cfg = small_config()
    m = FLMAudio(cfg)
    tokens = random_tokens(cfg, 1, 6, torch.Generator().manual_seed(3))
    h, logits = m.backbone(tokens[:, :, :-1])
    weights = torch.zeros(1, 9, 6)
    weights[0, 0, 4] = 1.0
    loss, _ = m(tokens, weights)
    torch.testing.assert_close(loss, F.cross_entropy(logits[0, 3:4], tokens[0, 0, 4:5]))
    weights.zero_()
    weights[0, 3, 5] = 1.0                           # speak codebook 2 of column 5, predicted from column 4
    loss, parts = m(tokens, weights, text_weight=0.0)
    dl = m.depth_gpt(h[0, 4:5], tokens[0, 1:8, 5][None])
    torch.testing.assert_close(loss, F.cross_entropy(dl[:, 2], tokens[0, 3, 5:6]))
    torch.testing.assert_close(parts["audio_2"], loss)


def test_wait_and_semantic_weights():
    torch.manual_seed(0)
    cfg = small_config()
    m = FLMAudio(cfg)
    tokens = random_tokens(cfg, 2, 8, torch.Generator().manual_seed(4))
    tokens[:, 0, ::2] = cfg.text_wait_token_id
    w = torch.ones(2, 9, 8)
    w[:, :, 0] = 0
    _, parts = m(tokens, w)
    loss_w, _ = m(tokens, w, wait_weight=0.0, audio_weight=0.0)
    torch.testing.assert_close(loss_w, parts["text"])              # waits off -> only non-wait text counts
    loss_s, _ = m(tokens, w, text_weight=0.0, semantic_weight=7.0)
    expect = (7 * parts["audio_0"] + sum(parts[f"audio_{c}"] for c in range(1, 8))) / 14
    torch.testing.assert_close(loss_s, expect)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    cfg = small_config()
    m = FLMAudio(cfg)
    tokens = random_tokens(cfg, 2, 16, torch.Generator().manual_seed(5))
    w = torch.ones(2, 9, 16)
    w[:, :, 0] = 0
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss, _ = m(tokens, w)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def write_tiny_qwen(path, vl=False, tied=False):
    torch.manual_seed(0)
    cfg = dict(vocab_size=80, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=tied)
    prefix = "model.language_model." if vl else "model."
    sd = {prefix + "embed_tokens.weight": torch.randn(80, 64), prefix + "norm.weight": torch.randn(64)}
    for i in range(2):
        p = f"{prefix}layers.{i}."
        for n, s in [("self_attn.q_proj.weight", (64, 64)), ("self_attn.q_proj.bias", (64,)),
                     ("self_attn.k_proj.weight", (32, 64)), ("self_attn.k_proj.bias", (32,)),
                     ("self_attn.v_proj.weight", (32, 64)), ("self_attn.v_proj.bias", (32,)),
                     ("self_attn.o_proj.weight", (64, 64)), ("mlp.gate_proj.weight", (96, 64)),
                     ("mlp.up_proj.weight", (96, 64)), ("mlp.down_proj.weight", (64, 96)),
                     ("input_layernorm.weight", (64,)), ("post_attention_layernorm.weight", (64,))]:
            sd[p + n] = torch.randn(s)
    if not tied:
        sd["lm_head.weight"] = torch.randn(80, 64)
    if vl:
        sd["model.visual.patch_embed.weight"] = torch.randn(4, 4)
        cfg = {"text_config": cfg, "model_type": "qwen2_5_vl"}
    path.mkdir()
    save_file(sd, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(cfg))
    return sd


@pytest.mark.parametrize("vl,tied", [(False, False), (True, False), (False, True)])
def test_init_from_qwen(tmp_path, vl, tied):
    sd = write_tiny_qwen(tmp_path / "qwen", vl=vl, tied=tied)
    p = "model.language_model." if vl else "model."
    cfg = small_config(vocab_size=84, text_wait_token_id=82)      # FLM adds tokens beyond Qwen's vocab
    m = FLMAudio.from_qwen(tmp_path / "qwen", cfg)
    own = m.official_state_dict()
    text = own["model.embed_tokens.text_embeddings.weight"]
    assert torch.equal(text[:80], sd[p + "embed_tokens.weight"])
    assert text[80:].abs().max() > 0                                     # fresh rows for the added tokens
    for name in ("layers.1.self_attn.k_proj.bias", "layers.0.self_attn.v_proj.weight", "layers.1.mlp.up_proj.weight",
                 "norm.weight"):                                         # fused projections hold Qwen's parts
        assert torch.equal(own["model." + name], sd[p + name])
    head = sd[p + "embed_tokens.weight"] if tied else sd["lm_head.weight"]
    assert torch.equal(own["lm_head.weight"][:80], head)
    assert 0.005 < own["model.embed_tokens.aud_speak_embeddings.0.weight"].std() < 0.05   # audio parts fresh
    with pytest.raises(ValueError, match="hidden_size"):
        FLMAudio.from_qwen(tmp_path / "qwen", small_config(hidden_size=128))


def test_unreadable_checkpoint_files_are_named(tmp_path):
    """A truncated weight file and an invalid config.json fail with one error naming the file."""
    from dataclasses import replace as _replace
    m = FLMAudio(_replace(FLMConfig.preset("tiny"), num_hidden_layers=1))
    m.save_pretrained(tmp_path)
    w = tmp_path / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{w}: unreadable weight file"):
        FLMAudio.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        FLMAudio.from_pretrained(tmp_path)


def test_save_pretrained_writes_each_file_whole(tmp_path, monkeypatch):
    """A crash while writing the weights leaves the previous export's files whole (no truncated file,
    no stray config) and no temporary file is mistaken for a weight file."""
    from dataclasses import replace as _replace
    import model as model_module
    m = FLMAudio(_replace(FLMConfig.preset("tiny"), num_hidden_layers=1))
    m.save_pretrained(tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(model_module, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        FLMAudio(_replace(FLMConfig.preset("tiny"), num_hidden_layers=1)).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    FLMAudio.from_pretrained(tmp_path)
