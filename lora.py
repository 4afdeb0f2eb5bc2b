"""lora.py -- low-rank adapters (LoRA): fine-tune the 7B on one GPU, then merge them back.

An adapter adds scale * B @ A to a frozen projection's weight (A [r, in] random, B [out, r] zero,
scale = alpha / r), so training starts exactly from the base model and learns r * (in + out)
numbers per projection instead of in * out. It is attached to the model's own nn.Linear modules
(a forward hook adds `x @ A^T @ B^T * scale` to their output), so model.py does not change, the
base weights keep their names, and DDP, FSDP2, activation checkpointing and torch.compile see the
same modules as in full training. A fused projection (q|k|v, gate|up) gets one adapter, as it
has one weight; the merge splits it by rows like the weight.

Which projections (`targets`): "attn" (backbone q|k|v and o), "mlp" (backbone gate|up and down),
"depth" (DepthGPT's attention and per-codebook MLPs). Everything else is frozen unless named in
`full` ("embed", "lm_head", "depth_gpt", "norm"), which then trains fully. The default adapts
DepthGPT by LoRA too instead of training it fully (moshi-finetune trains its depformer fully):
DepthGPT is 7% of the 7B's weights and a third of the tiny demo's, so training it fully would
multiply the optimizer state and the adapter file; list it in `full` when the voice itself must
change (a new speaker), where its low-rank update may not suffice.

    python lora.py merge out/ft/latest out/ft/merged   # adapters + base -> official layout
"""
import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from model import FLMAudio, _atomic

ADAPTER_FILE = "adapter.safetensors"
TARGETS = ("attn", "mlp", "depth")
FULL = ("embed", "lm_head", "depth_gpt", "norm")


class LoRA(nn.Module):
    def __init__(self, base, rank, alpha):
        super().__init__()
        dev = base.weight.device
        self.A = nn.Parameter(torch.empty(rank, base.in_features, device=dev))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev))
        if dev.type != "meta":
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))     # as nn.Linear initialises its weight
        self.scale = alpha / rank

    def forward(self, x):
        return (x @ self.A.t().to(x.dtype)) @ self.B.t().to(x.dtype) * self.scale


def _add_output(linear, args, out):
    return out + linear.lora(args[0])


def projections(model, targets):
    """{name: nn.Linear} of the projections the targets name."""
    out = {}
    for i, layer in enumerate(model.layers):
        if "attn" in targets:
            out.update({f"layers.{i}.self_attn.{n}": getattr(layer.self_attn, n) for n in ("qkv_proj", "o_proj")})
        if "mlp" in targets:
            out.update({f"layers.{i}.mlp.{n}": getattr(layer.mlp, n) for n in ("gate_up_proj", "down_proj")})
    if "depth" in targets:
        for name, mod in model.depth_gpt.blocks.named_modules():
            if isinstance(mod, nn.Linear):
                out[f"depth_gpt.blocks.{name}"] = mod
    return out


def add(model, rank, alpha, targets=("attn", "mlp", "depth"), full=(), base=""):
    """Freeze the model, attach adapters to the targets' projections, unfreeze `full` modules.
    The settings (and the base checkpoint's path) are kept in model.lora for the adapter file."""
    bad = [t for t in targets if t not in TARGETS] + [f for f in full if f not in FULL]
    if bad or rank < 1:
        raise ValueError(f"LoRA: rank must be >= 1, targets from {TARGETS}, full from {FULL}; got rank {rank}, "
                         f"unknown {bad}")
    model.requires_grad_(False)
    for linear in projections(model, targets).values():
        linear.lora = LoRA(linear, rank, alpha)
        linear.lora_hook = linear.register_forward_hook(_add_output)
    for name in full:
        getattr(model, name).requires_grad_(True)
    model.lora = dict(rank=rank, alpha=float(alpha), targets=list(targets), full=list(full), base=str(base))
    return model


def trainable(model):
    """Names of the parameters that train (adapters and `full` modules)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def save(path, tensors, settings):
    """An adapter file: the trainable tensors (float32 on the CPU) and the settings as metadata."""
    cpu = {k: torch.empty(t.shape, dtype=torch.float32).copy_(t) for k, t in tensors.items()}
    _atomic(Path(path), lambda p: save_file(cpu, str(p), metadata={"lora": json.dumps(settings)}))


def read(path):
    """-> (settings, tensors) of an adapter file; errors name the file."""
    try:
        with safe_open(str(path), "pt") as f:
            settings = json.loads((f.metadata() or {})["lora"])
            return settings, {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, KeyError, ValueError, json.JSONDecodeError, RuntimeError) as e:
        raise ValueError(f"{path}: not a LoRA adapter file ({str(e).splitlines()[0][:200]})") from None


def load(model, path):
    """Attach the adapters of `path` to `model` (a loaded base) with their trained values."""
    settings, tensors = read(path)
    add(model, settings["rank"], settings["alpha"], settings["targets"], settings["full"], settings["base"])
    names = set(trainable(model))
    if names != set(tensors):
        raise ValueError(f"{path}: adapter does not fit this model (missing {sorted(names - set(tensors))[:3]}, "
                         f"unexpected {sorted(set(tensors) - names)[:3]})")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, t in tensors.items():
            params[k].copy_(t)
    return model


def base_of(path):
    """The base checkpoint an adapter file was trained on (as recorded when it was written)."""
    base = Path(read(path)[0]["base"])
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"{path}: its base checkpoint {base} is missing; the adapter needs it")
    return base


@torch.no_grad()
def merge_(model):
    """W += scale * B @ A in place (computed in float32), then drop the adapters: a plain model
    that save_pretrained writes in the official layout."""
    for mod in model.modules():
        if isinstance(getattr(mod, "lora", None), LoRA):
            a = mod.lora
            mod.weight.copy_((mod.weight.float() + a.B.float() @ a.A.float() * a.scale).to(mod.weight.dtype))
            mod.lora_hook.remove()
            del mod.lora, mod.lora_hook
    model.__dict__.pop("lora", None)
    return model.requires_grad_(True)


def load_merged(checkpoint, device="cpu", dtype=torch.float32):
    """A train.py LoRA checkpoint (or an adapter file) -> its base with the adapters merged."""
    path = Path(checkpoint)
    path = path / ADAPTER_FILE if path.is_dir() else path
    model = FLMAudio.from_pretrained(base_of(path), device=device, dtype=dtype)
    return merge_(load(model, path)).eval()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Merge LoRA adapters into their base (official layout).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="CHECKPOINT (train.py LoRA checkpoint or adapter file) -> OUT directory")
    m.add_argument("checkpoint")
    m.add_argument("out")
    a = ap.parse_args()
    try:
        load_merged(a.checkpoint).save_pretrained(a.out)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"lora.py: {e}")
    print(f"wrote {a.out} (official layout; python chat.py --checkpoint {a.out})")
