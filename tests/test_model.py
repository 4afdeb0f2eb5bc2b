"""model.py against the official implementation's outputs (fixtures), and its own invariants."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import reference
from model import FLMAudio, FLMConfig

from conftest import FLM_FIXTURE, seeded_flm_state


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
        depth = m.depth(h.reshape(B * T, -1), prev).view(B, T, 8, -1)
        assert_rel_close(depth, e["depth_logits"])
        # fewer previous codebooks = a prefix of the same causal computation
        part = m.depth(h.reshape(B * T, -1), prev[:, :3])
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


def test_cached_decode_equals_full_forward():
    torch.manual_seed(0)
    cfg = small_config()
    m = FLMAudio(cfg).eval()
    tokens = random_tokens(cfg, 2, 12, torch.Generator().manual_seed(1))
    with torch.no_grad():
        h_full, logits_full = m.backbone(tokens)
        m.setup_cache(2, 16)
        steps = [m.backbone_step(tokens[:, :, t:t + 1], torch.tensor(t))[0] for t in range(5)]
        chunk = m.backbone_step(tokens[:, :, 5:9], torch.tensor(5))[0]       # chunked prefill mid-stream
        steps += [chunk] + [m.backbone_step(tokens[:, :, t:t + 1], torch.tensor(t))[0] for t in range(9, 12)]
        torch.testing.assert_close(torch.cat(steps, dim=1), h_full, atol=1e-5, rtol=1e-4)
        # a reset cache serves a new conversation from position 0
        m.reset_cache()
        torch.testing.assert_close(m.backbone_step(tokens[:, :, :3], torch.tensor(0))[1], logits_full[:, :3],
                                   atol=1e-5, rtol=1e-4)
        m.drop_cache()


def test_cache_slides_past_its_length():
    torch.manual_seed(0)
    cfg = small_config()
    m = FLMAudio(cfg).eval()
    tokens = random_tokens(cfg, 1, 20, torch.Generator().manual_seed(2))
    with torch.no_grad():
        m.setup_cache(1, 6)
        k_before = m.layers[0].self_attn.cache.k.data_ptr()
        out = torch.cat([m.backbone_step(tokens[:, :, t:t + 1], torch.tensor(t))[0] for t in range(20)], dim=1)
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
    dl = m.depth(h[0, 4:5], tokens[0, 1:8, 5][None])
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
    assert torch.equal(m.embed.text.weight[:80], sd[p + "embed_tokens.weight"])
    assert m.embed.text.weight[80:].abs().max() > 0                     # fresh rows for the added tokens
    assert torch.equal(m.layers[1].self_attn.k_proj.bias, sd[p + "layers.1.self_attn.k_proj.bias"])
    assert torch.equal(m.norm.weight, sd[p + "norm.weight"])
    head = sd[p + "embed_tokens.weight"] if tied else sd["lm_head.weight"]
    assert torch.equal(m.lm_head.weight[:80], head)
    assert 0.005 < m.embed.speak[0].weight.std() < 0.05                  # audio parts freshly initialised
    with pytest.raises(ValueError, match="hidden_size"):
        FLMAudio.from_qwen(tmp_path / "qwen", small_config(hidden_size=128))
