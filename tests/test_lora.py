"""lora.py and train.py's LoRA mode: what trains, the merge (by hand: base + scale * B @ A), exact
resume from an adapter-only checkpoint, serving it with chat.py, FSDP2, and the 7B's memory."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import chat
import lora
import sizing
import train
from model import FLMAudio, FLMConfig
from test_train import losses, make_data, micro_preset

ROOT = Path(__file__).resolve().parents[1]


def tiny(seed=0):
    torch.manual_seed(seed)
    return FLMAudio(FLMConfig.preset("tiny"))


def batch(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, 250, (2, 17, 24), generator=g)
    tok[:, 1:] = torch.randint(0, 2048, (2, 16, 24), generator=g)
    return tok, torch.ones(2, 9, 24)


def test_only_adapters_and_the_chosen_modules_train_and_the_start_is_the_base():
    base, m = tiny(), tiny()
    tok, w = batch(m.cfg)
    lora.add(m, rank=4, alpha=8, full=["lm_head"])
    assert torch.equal(m(tok, w)[0], base(tok, w)[0])            # B = 0: exactly the base model at first
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad and p.dim() == 2 and p.shape[1] == 4:
                p.normal_()                                        # B != 0, so A gets gradients too
    m(tok, w)[0].backward()
    got = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    names = set(lora.trainable(m))
    assert got == names
    assert {n for n in names if ".lora." not in n} == {"lm_head.weight"}
    per_layer = {n.rsplit(".lora.", 1)[0] for n in names if ".lora." in n}
    assert "layers.0.self_attn.qkv_proj" in per_layer and "depth_gpt.blocks.1.mlps.7.down_proj" in per_layer
    assert "lm_head" not in per_layer and "depth_gpt.linear_in" not in per_layer
    # rank 16, no full modules: well under 5% of the tiny model trains
    m16 = lora.add(tiny(), rank=16, alpha=16)
    assert sum(p.numel() for p in m16.parameters() if p.requires_grad) < 0.05 * tiny().num_params()
    with pytest.raises(ValueError, match="targets"):
        lora.add(tiny(), rank=4, alpha=4, targets=["everything"])


def test_merge_is_base_plus_scaled_BA_exactly_and_exports_the_official_layout(tmp_path):
    base, m = tiny(), tiny()
    lora.add(m, rank=3, alpha=6, targets=["attn", "mlp", "depth"])
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".lora." in n:
                p.normal_()
    tok, _ = batch(m.cfg)
    with torch.no_grad():
        before = m.backbone(tok)[1]
    adapters = {n[:-len(".lora")]: mod for n, mod in m.named_modules() if n.endswith(".lora")}
    lora.merge_(m)
    sd, want = m.state_dict(), base.state_dict()
    for k in want:
        mod = adapters.get(k.rsplit(".", 1)[0]) if k.endswith(".weight") else None
        expect = want[k] if mod is None else want[k] + mod.B @ mod.A * mod.scale
        assert torch.equal(sd[k], expect), k
    assert len(adapters) == 6 * 4 + 2 * (2 + 8 * 2)                # 6 layers x 4; 2 depth blocks x (2 + 8 MLPs x 2)
    assert not any(".lora." in k for k in sd)
    with torch.no_grad():
        torch.testing.assert_close(m.backbone(tok)[1], before, atol=1e-4, rtol=1e-4)
    m.save_pretrained(tmp_path / "merged")
    back = FLMAudio.from_pretrained(tmp_path / "merged").state_dict()
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def _lora_preset(tmp_path, official_dir, steps, **kw):
    data_dir = make_data(tmp_path / "data2048", n_codes=2048)
    preset = micro_preset(tmp_path, data_dir, steps=steps, model_args={}, grad_accum=1, **kw)
    return [preset, "--init_from=flm", f"--init_path={official_dir}", "--lora_rank=4", "--lora_alpha=8.0"]


def test_lora_run_from_the_official_fixture_resumes_exactly_and_chat_serves_it(tmp_path, official_dir):
    args = _lora_preset(tmp_path, official_dir, steps=(2, 2), ckpt_interval=2, keep_last=3)
    train.train([*args, f"--out_dir={tmp_path / 'full'}"])
    train.train([*args, f"--out_dir={tmp_path / 'half'}", "--max_steps=2"])
    train.train([*args[:1], f"--out_dir={tmp_path / 'half'}", "--init_from=resume", "--lora_rank=4"])
    a, b = losses(tmp_path / "full"), losses(tmp_path / "half")
    assert sorted(a) == [1, 2, 3, 4] and a == b                    # bit-identical losses
    ckpt = tmp_path / "full" / "latest"
    assert (ckpt / lora.ADAPTER_FILE).is_file() and not (ckpt / "config.json").exists()
    settings, tensors = lora.read(ckpt / lora.ADAPTER_FILE)
    _, resumed = lora.read(tmp_path / "half" / "latest" / lora.ADAPTER_FILE)
    assert all(torch.equal(tensors[k], resumed[k]) for k in tensors)
    base = FLMAudio.from_pretrained(official_dir)
    assert sum(t.numel() for t in tensors.values()) < 0.1 * base.num_params()
    assert Path(settings["base"]) == Path(official_dir).resolve()
    # chat.py serves the checkpoint: its base with the adapters merged, what lora.py merge writes
    served, _ = chat.load_checkpoint(ckpt)
    r = subprocess.run([sys.executable, str(ROOT / "lora.py"), "merge", str(ckpt), str(tmp_path / "merged")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    merged = FLMAudio.from_pretrained(tmp_path / "merged").state_dict()
    assert all(torch.equal(merged[k], v) for k, v in served.state_dict().items())
    moved = [k for k, v in base.state_dict().items() if not torch.equal(v, merged[k])]
    assert moved and all(k.endswith("weight") for k in moved)     # only adapted weights changed
    over, _ = chat.load_checkpoint(official_dir, adapter=ckpt / lora.ADAPTER_FILE)   # --adapter over a base
    assert all(torch.equal(over.state_dict()[k], v) for k, v in merged.items())


def test_lora_with_fsdp2_and_checkpointing_in_one_process_equals_the_plain_loop(tmp_path, official_dir):
    args = _lora_preset(tmp_path, official_dir, steps=(2, 1))
    train.train([*args, f"--out_dir={tmp_path / 'plain'}"])
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, f"--out_dir={tmp_path / 'fsdp'}",
                        "--parallel=fsdp", "--activation_checkpointing=True"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "fsdp")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert all(abs(a[s] - b[s]) < 1e-5 * abs(a[s]) for s in a), (a, b)


def test_lora_needs_a_base_and_sizes_the_7b_for_one_gpu():
    with pytest.raises(ValueError, match="LoRA adapts"):
        train.check_config({**train.DEFAULTS, "lora_rank": 4})
    settings = dict(rank=16, alpha=16.0, targets=list(lora.TARGETS), full=[])
    plan = sizing.memory_plan(FLMConfig(), 1, 1, 1500, "fsdp", True, 2, settings)
    assert plan["trainable"] < 0.01 * plan["params"] and plan["total"] <= 40
