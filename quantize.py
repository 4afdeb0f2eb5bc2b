"""quantize.py -- int8 weight-only inference: the 7B's linears in a byte per weight (gpt-fast style).

Every nn.Linear of the model (the backbone's projections and lm_head, DepthGPT's) becomes an
Int8Linear: weights rounded to int8 with one float scale per output channel (row max / 127), so
a row's rounding error is at most half a step of its own range. The matmul dequantises on the
fly, x @ W_int8^T * scale: streaming is bound by reading weights, and int8 halves the bytes of
bf16. Eagerly the int8 weight is cast per call (memory-light, not fast); inside the compiled
streaming step (chat.py on CUDA) torch.compile fuses the cast into the matmul's loads. The
embedding tables stay in the model's dtype (a step reads 17 rows of them).

    python quantize.py CHECKPOINT              # one-time conversion: CHECKPOINT/model-int8.safetensors
    python chat.py --checkpoint CHECKPOINT --int8  # converts on first use, then loads the int8 file
"""
import argparse
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from model import FLMAudio, FLMConfig, _atomic

INT8_FILE = "model-int8.safetensors"


class Int8Linear(nn.Module):
    """y = (x @ W^T) * scale + bias, W int8 [out, in], scale [out] in the model's dtype."""
    def __init__(self, linear):
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.parts = getattr(linear, "parts", None)         # fused projections keep their row blocks
        scale = w.float().abs().amax(1).clamp(min=1e-12) / 127
        self.register_buffer("weight", (w.float() / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(w.dtype))
        self.bias = linear.bias

    def forward(self, x):
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias


def quantize_(model):
    """Replace every nn.Linear of `model` by an Int8Linear, in place; returns the model."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child))
    model.int8 = True
    return model


def weight_bytes(model):
    """Bytes of the model's weights (its state dict: int8 matrices, scales, tables, biases, norms)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def save(model, path):
    """An int8 checkpoint beside (or inside) an official one: our state dict + the official config."""
    path = Path(path)
    sd = {k: torch.empty(v.shape, dtype=v.dtype).copy_(v) for k, v in model.state_dict().items()}
    config = json.dumps(model.cfg.to_official())
    _atomic(path, lambda p: save_file(sd, str(p), metadata={"format": "int8", "config": config}))


def load(path, device="cpu", dtype=torch.float32):
    """An int8 file written by `save` -> the quantised model on `device`; errors name the file."""
    try:
        with safe_open(str(path), "pt") as f:
            cfg = FLMConfig.from_official(json.loads(f.metadata()["config"]))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: not an int8 checkpoint ({str(e).splitlines()[0][:200]})") from None
    with torch.device("meta"):
        m = quantize_(FLMAudio(cfg))
    m = m.to(dtype=dtype).to_empty(device=device)      # .to(dtype) converts floats only: int8 stays int8
    if set(m.state_dict()) != set(tensors):
        raise ValueError(f"{path}: int8 checkpoint does not fit its config (missing "
                         f"{sorted(set(m.state_dict()) - set(tensors))[:3]})")
    with torch.no_grad():
        own = m.state_dict()
        for k, t in tensors.items():
            own[k].copy_(t)
    return m.eval()


def load_or_convert(checkpoint, device="cpu", dtype=torch.float32, log=print):
    """chat.py --int8: the checkpoint's int8 file if it has one, else convert once and keep it."""
    path = Path(checkpoint) / INT8_FILE
    if path.is_file():
        return load(path, device, dtype)
    model = quantize_(FLMAudio.from_pretrained(checkpoint, dtype=dtype))
    try:
        save(model, path)
        log(f"quantize.py: wrote {path} (int8 weights, loaded directly next time)")
    except OSError as e:
        log(f"quantize.py: could not keep {path} ({e}); converting again next time")
    return model.to(device)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Convert an FLM-Audio checkpoint to int8 weights (one-time).")
    ap.add_argument("checkpoint", help="official-layout directory; the int8 file is written into it")
    ap.add_argument("--out", help=f"int8 file to write (default CHECKPOINT/{INT8_FILE})")
    a = ap.parse_args()
    try:
        m = quantize_(FLMAudio.from_pretrained(a.checkpoint, dtype=torch.bfloat16))
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"quantize.py: {e}")
    out = Path(a.out or Path(a.checkpoint) / INT8_FILE)
    save(m, out)
    print(f"wrote {out} ({weight_bytes(m) / 1e9:.2f} GB of weights)")
