"""sizing.py -- what a training run costs, from the model's shapes alone: FLOPs per column (for
MFU) and memory per GPU (to size a node before renting it). train.py prints both at start;
`python bench.py --gpu` prints the 7B's table and checks the activation constants against a
measured peak. The model is built on the meta device, so counting the 7B costs nothing.

    python sizing.py --world 8                  # the released 7B, full fine-tuning under FSDP2
    python sizing.py --world 1 --lora_rank 16   # the 7B with LoRA adapters on one GPU
"""
import argparse

import torch

import lora
from model import FLMAudio, FLMConfig


def flops_per_column(mcfg, T):
    """Forward+backward FLOPs of one training column (6 x active parameters + attention), an estimate."""
    H, L, n, K = mcfg.hidden_size, mcfg.num_hidden_layers, mcfg.depth_n_embd, mcfg.aud_channel
    layer = 4 * H * H * (1 + mcfg.num_key_value_heads / mcfg.num_attention_heads) / 2 + 3 * H * mcfg.intermediate_size
    mlp = 3 * n * int(8 * n / 3)
    depth = H * K * n + mcfg.depth_n_layer * K * (4 * n * n + mlp) + K * n * mcfg.aud_vocab_size
    return 6 * (L * layer + H * mcfg.vocab_size + depth) + 12 * L * H * T


def guess_peak_flops(device):
    """Dense bf16 FLOP/s of a known GPU (0 if unknown: no MFU is printed)."""
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40", 181e12))
                 if k in name), 0.0)


def layer_bytes_per_column(mcfg, cb):
    """Activation bytes a decoder layer keeps per column for its backward: the norms' outputs, q|k|v,
    attention output and residuals (~10 x hidden), the MLP's gate|up and products (4 x intermediate)
    at cb bytes each, and RoPE's float32 products."""
    H, I, kv = mcfg.hidden_size, mcfg.intermediate_size, mcfg.num_key_value_heads * mcfg.head_dim
    return cb * (10 * H + 2 * kv + 4 * I) + 4 * 2 * (H + kv)


def memory_plan(mcfg, world=1, batch=1, window=1500, mode="fsdp", checkpointing=True, compute_bytes=2, lora_cfg=None):
    """GB per GPU, by part:
    weights, gradients, optimizer  float32 master weights, their gradients and AdamW's two moments,
                                   divided over `world` by FSDP2. With LoRA (`lora_cfg`, lora.add's
                                   settings) only the adapters (and `full` modules) have these; the
                                   frozen base is held once, in the compute dtype.
    copies      the compute-dtype weights a step uses: under FSDP2 two gathered decoder layers in
                flight plus the root (embeddings, lm_head) and DepthGPT; under DDP with autocast all.
    activations per column of batch x window: each layer's input plus one recomputed layer (all
                layers without checkpointing), the text logits in float32 with their gradient, and
                DepthGPT's 8 positions (not checkpointed)."""
    with torch.device("meta"):
        m = FLMAudio(mcfg)
    if lora_cfg:
        lora.add(m, lora_cfg["rank"], lora_cfg["alpha"], lora_cfg["targets"], lora_cfg["full"])
    n, L, H = m.num_params(), mcfg.num_hidden_layers, mcfg.hidden_size
    t = sum(p.numel() for p in m.parameters() if p.requires_grad)
    layer = sum(p.numel() for p in m.layers[0].parameters())
    d, K = mcfg.depth_n_embd, mcfg.aud_channel
    cb, shard = compute_bytes, world if mode == "fsdp" else 1
    per_column = (L * cb * H + (1 if checkpointing else L) * layer_bytes_per_column(mcfg, cb)
                  + mcfg.vocab_size * (cb + 8)
                  + K * (mcfg.depth_n_layer * cb * (10 * d + 4 * int(8 * d / 3)) + mcfg.aud_vocab_size * (cb + 8)))
    frozen = (n - t) * cb / shard if lora_cfg else 0
    gb = {"weights": frozen + 4 * t / shard, "gradients": 4 * t / shard, "optimizer": 8 * t / shard,
          "copies": 2 * layer * (cb + (0 if lora_cfg else 4)) + (n - L * layer) * cb if mode == "fsdp"
          else (cb < 4 and not lora_cfg) * cb * n,
          "activations": batch * window * per_column}
    gb = {k: v / 1e9 for k, v in gb.items()}
    return {**gb, "total": sum(gb.values()), "params": n, "trainable": t}


def memory_line(plan, world, batch, window, mode, checkpointing):
    trains = "" if plan["trainable"] == plan["params"] else f", {plan['trainable'] / 1e6:.2f}M of them training"
    return (f"memory per GPU, estimated ({plan['params'] / 1e6:.0f}M parameters{trains}, {mode} over {world}, batch "
            f"{batch} x {window} frames, checkpointing {'on' if checkpointing else 'off'}): " + ", ".join(
                f"{k} {plan[k]:.1f}" for k in ("weights", "gradients", "optimizer", "copies", "activations"))
            + f" = {plan['total']:.1f} GB")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Memory per GPU of training the released 7B shape (an estimate).")
    ap.add_argument("--world", type=int, default=8, help="GPUs (FSDP2 shards over them)")
    ap.add_argument("--batch", type=int, default=1, help="samples per GPU per micro-batch")
    ap.add_argument("--window", type=int, default=1500, help="frames per sample (1500 = 2 minutes)")
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--lora_rank", type=int, default=0, help="LoRA rank (0 = full fine-tuning)")
    a = ap.parse_args()
    lc = dict(rank=a.lora_rank, alpha=16.0, targets=list(lora.TARGETS), full=[]) if a.lora_rank else None
    plan = memory_plan(FLMConfig(), a.world, a.batch, a.window, "fsdp", not a.no_checkpointing, 2, lc)
    print(memory_line(plan, a.world, a.batch, a.window, "fsdp", not a.no_checkpointing))
