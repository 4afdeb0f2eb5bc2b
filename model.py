"""The FLM-Audio model: a Qwen2.5-shaped backbone that steps once per 80 ms audio frame,
plus DepthGPT, a small transformer that turns each backbone step into 8 Mimi codebooks.

Data flow:

    tokens [B, 17, T]          row 0 text monologue, rows 1..8 speak (own voice), 9..16 listen (user)
      -> MultiStreamEmbedding  sum of 17 embeddings per column
      -> Qwen2 decoder layers  (RMSNorm, GQA attention + RoPE, SwiGLU)
      -> final RMSNorm = h_t   -> lm_head: next monologue token
      -> DepthGPT(h_t, prev)   8 next speak tokens, autoregressive over the codebook axis

Everything is in *delayed* coordinates (acoustic codebooks one step late, grid.py), so training is
a plain shift-by-one over columns. The same modules serve training, cached decoding and the 80 ms
streaming step (chat.py: `FLMAudio.step` through a static ring KV cache, `DepthGPT.step` through an
8-slot one). Projections sharing an input are one matmul (q|k|v, gate|up); loading and saving split
them into the official checkpoint layout, so weights move freely to and from the official release.
"""
import json
from dataclasses import dataclass, asdict, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import kernels

DEPTH_NORM_EPS = 1e-6   # DepthGPT's RMSNorms (fixed in the official code, not in config.json)

# -----------------------------------------------------------------------------
# Configuration: one dataclass, field names as in the official config.json

@dataclass
class FLMConfig:
    vocab_size: int = 152064          # text vocabulary (Qwen2.5 + FLM's added tokens)
    aud_vocab_size: int = 2050        # 2048 Mimi codes + aud_emp (2048) + aud_pad (2049)
    aud_channel: int = 8              # Mimi codebooks per stream
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    use_mup: bool = False             # muP: embeddings * input_mult, text logits * output_mult / mup_scale_factor
    input_mult: float = 1.0
    output_mult: float = 1.0
    mup_scale_factor: float = 1.0
    text_wait_token_id: int = 151665  # placeholder: from_official() reads the checkpoint's own id
    aud_pad_token_id: int = 2049
    aud_emp_token_id: int = 2048
    depth_n_layer: int = 6
    depth_n_head: int = 16
    depth_n_embd: int = 1024
    initializer_range: float = 0.02

    @staticmethod
    def preset(name):
        if name == "flm-audio-7b":   # the released shape
            return FLMConfig()
        if name == "tiny":           # CPU-sized, same code paths (GQA, per-codebook MLPs, 17 streams)
            return FLMConfig(vocab_size=264, text_wait_token_id=256, hidden_size=256, intermediate_size=704,
                             num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2,
                             rope_theta=10000.0, max_position_embeddings=2048,
                             depth_n_layer=2, depth_n_head=4, depth_n_embd=128)
        raise ValueError(f"unknown model preset {name!r}: choose 'tiny' or 'flm-audio-7b'")

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @staticmethod
    def from_official(cfg):
        """Parse an official config.json (path or dict) into an FLMConfig. Keys that change the
        architecture in ways this code does not implement are an error, never silently ignored."""
        name = "config.json" if isinstance(cfg, dict) else cfg
        try:
            src = cfg if isinstance(cfg, dict) else json.loads(Path(cfg).read_text())
            tok, dg = src["mm_token_info"], src["aud_depthgpt"]
            out = FLMConfig(**{f.name: src[f.name] for f in fields(FLMConfig)
                               if f.name in src and not f.name.startswith("depth_")},
                            text_wait_token_id=tok["text_wait_token_id"],
                            aud_pad_token_id=tok["aud_pad_token_id"], aud_emp_token_id=tok["aud_emp_token_id"],
                            depth_n_layer=dg["n_layer"], depth_n_head=dg["n_head"], depth_n_embd=dg["n_embd"])
        except (KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"{name}: " + (f"missing key {e} (not an FLM-Audio config)" if isinstance(e, KeyError)
                                            else f"not valid JSON ({e})")) from None
        rope = src.get("rope_scaling") or {}   # mrope with 1-D positions (the official mapping) is plain RoPE
        unsupported = [k for k, bad in [
            ("head_dim", src.get("head_dim") not in (None, out.head_dim)), ("mlp_bias", bool(src.get("mlp_bias"))),
            ("rope_scaling", rope.get("type", rope.get("rope_type", "default")) not in ("default", "mrope")),
            ("tie_word_embeddings", bool(src.get("tie_word_embeddings"))),
            ("aud_channel", out.aud_channel != 8)] if bad]
        for k in unsupported[:1]:
            raise ValueError(f"{name}: {k}={src.get(k)!r} is not supported by this implementation")
        # the variants below exist in the official DepthGPT code but not in any released checkpoint
        bad = {k: dg.get(k) for k, v in dict(use_cmlp=True, use_rmsnorm=True, use_swiglu=True, bias=False).items()
               if dg.get(k, v) != v}
        if bad or not src.get("attention_bias", True) or not src.get("disable_att_o_bias", True):
            raise ValueError(f"{name}: unsupported FLM-Audio variant {bad or 'attention bias flags'}")
        return out

    def to_official(self):
        """The config.json the official FLMAudioForCausalLM class reads."""
        d = {k: v for k, v in asdict(self).items() if not k.startswith("depth_")
             and k not in ("text_wait_token_id", "aud_pad_token_id", "aud_emp_token_id")}
        d.update(architectures=["FLMAudioForCausalLM"], model_type="FLMAudio", hidden_act="silu",
                 attention_bias=True, disable_att_o_bias=True, tie_word_embeddings=False, torch_dtype="bfloat16",
                 mm_token_info=dict(text_wait_token_id=self.text_wait_token_id,
                                    aud_pad_token_id=self.aud_pad_token_id, aud_emp_token_id=self.aud_emp_token_id),
                 aud_depthgpt=dict(n_layer=self.depth_n_layer, n_head=self.depth_n_head, n_embd=self.depth_n_embd,
                                   dropout=0.0, bias=False, use_cmlp=True, use_rmsnorm=True, use_swiglu=True))
        return d


# -----------------------------------------------------------------------------
# Building blocks shared by the backbone and DepthGPT

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.shape, self.eps = (dim,), eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == torch.float32:   # one call, the same numbers as the general form below
            return F.rms_norm(x, self.shape, self.weight, self.eps)
        # normalise in float32 (bf16 squares overflow/underflow), scale in the input dtype
        return self.weight * F.rms_norm(x.float(), self.shape, eps=self.eps).to(x.dtype)


class FusedLinear(nn.Linear):
    """Several projections of one input as one matmul (their weights stacked by rows). `parts`
    names the row blocks as the checkpoint stores them: [(name, rows), ...], beside this module."""
    def __init__(self, dim, parts, bias):
        super().__init__(dim, sum(n for _, n in parts), bias=bias)
        self.parts = parts


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_up_proj = FusedLinear(dim, [("gate_proj", hidden), ("up_proj", hidden)], bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def rope_cos_sin(positions, head_dim, theta):
    """cos/sin tables [T, head_dim] for integer positions, computed in float32 (as Qwen2 does)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    ang = positions.float()[:, None] * inv_freq[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def apply_rope(x, cos, sin):
    """Rotate-half RoPE on x [..., T, D] with cos/sin broadcastable to it; the product in float32."""
    d = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat([-xf[..., d:], xf[..., :d]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


# -----------------------------------------------------------------------------
# Static KV cache (gpt-fast style): preallocated, never reallocated, a ring of `size` slots:
# position p lives in slot p % size, so a conversation longer than the cache keeps the last `size`
# steps (a sliding window) at constant memory. Positions are written in order from 0, so what a slot
# holds follows from the newest position; keys are stored after RoPE, so wrapping keeps them right.

class KVCache(nn.Module):
    def __init__(self, batch, n_kv, size, head_dim, device, dtype):
        super().__init__()
        self.size = size
        self.register_buffer("k", torch.zeros(batch, n_kv, size, head_dim, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(batch, n_kv, size, head_dim, device=device, dtype=dtype), persistent=False)

    def attend(self, q, k, v, positions):
        """Write k/v [B, Hkv, T, D] of `positions` [T] (the next ones after those cached), then
        attend q to every cached position <= its own that is still in the window."""
        slots, k_cache, v_cache = positions % self.size, self.k, self.v
        k_cache.index_copy_(2, slots, k.to(k_cache.dtype))      # under autocast k, v come in bf16
        v_cache.index_copy_(2, slots, v.to(v_cache.dtype))
        newest = positions[-1:]
        if q.shape[2] == 1:   # ring fill order: slots [0, n) are the valid ones, n = min(pos + 1, size)
            return kernels.decode_attention(q, k_cache, v_cache, torch.clamp(newest + 1, max=self.size))
        slot = torch.arange(self.size, device=q.device)
        held = slot + (newest - slot).div(self.size, rounding_mode="floor") * self.size   # newest p = slot mod size
        mask = (held >= 0) & (held <= positions[:, None]) & (held > positions[:, None] - self.size)
        return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, enable_gqa=True)


# -----------------------------------------------------------------------------
# The backbone: a Qwen2 decoder over summed 17-stream embeddings

class MultiStreamEmbedding(nn.Module):
    """One table for text, 8 for the model's own voice, 8 for the user's voice, stacked into one
    (`table`, stored as its 17 parts), so a column's 17 embeddings are one lookup, then summed."""
    def __init__(self, cfg):
        super().__init__()
        A, K = cfg.aud_vocab_size, cfg.aud_channel
        parts = [("text", cfg.vocab_size)] + [(f"{who}.{c}", A) for who in ("speak", "listen") for c in range(K)]
        self.table = nn.Embedding(sum(n for _, n in parts), cfg.hidden_size)
        self.table.parts = parts
        self.offsets = [sum(n for _, n in parts[:i]) for i in range(len(parts))]   # first row of each table

    def forward(self, tokens):                       # [B, 17, T] -> [B, T, H]
        return self.table(tokens + tokens.new_tensor(self.offsets)[:, None]).sum(1)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q, kv = self.n_head * self.head_dim, self.n_kv * self.head_dim
        self.qkv_proj = FusedLinear(cfg.hidden_size, [("q_proj", q), ("k_proj", kv), ("v_proj", kv)], bias=True)
        self.o_proj = nn.Linear(q, cfg.hidden_size, bias=False)
        self.cache = None  # a KVCache for cached decoding / streaming

    def forward(self, x, cos, sin, positions=None):
        """x [B, T, H]; with `positions` (and a cache) the cached path, else a causal full forward."""
        B, T, _ = x.shape
        qkv = self.qkv_proj(x).view(B, T, self.n_head + 2 * self.n_kv, self.head_dim).transpose(1, 2)
        qk = apply_rope(qkv[:, :self.n_head + self.n_kv], cos, sin)       # q and k rotate together
        q, k, v = qk[:, :self.n_head], qk[:, self.n_head:], qkv[:, self.n_head + self.n_kv:]
        if positions is not None:
            y = self.cache.attend(q, k, v, positions)
        elif torch.is_grad_enabled() or not q.is_cuda:   # SDPA: fused backward; on CPU as fast, no compile per length
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            y = kernels.attention(q, k, v, causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, positions=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions)
        return x + self.mlp(self.post_attention_layernorm(x))


# -----------------------------------------------------------------------------
# DepthGPT: one backbone state h_t -> the 8 speak codebooks of the next frame, all positions at
# once in training (causal), one codebook per step through an 8-slot cache when streaming.

class DepthAttention(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)   # fused q, k, v
        self.c_proj = nn.Linear(n_embd, n_embd, bias=False)
        self.cache = None  # a KVCache with one slot per codebook position

    def forward(self, x, c=None):
        """x [N, K, C] over positions 0..K-1, or [N, C] = position c alone (through the cache)."""
        if c is None:
            N, K, C = x.shape
            q, k, v = self.c_attn(x).view(N, K, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
            return self.c_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(N, K, C))
        N, C = x.shape   # c is a Python int: the slices are static
        q, k, v = self.c_attn(x).view(N, 3, self.n_head, 1, C // self.n_head).unbind(1)
        k_cache, v_cache = self.cache.k, self.cache.v
        k_cache[:, :, c:c + 1] = k
        v_cache[:, :, c:c + 1] = v
        y = v if c == 0 else F.scaled_dot_product_attention(q, k_cache[:, :, :c + 1], v_cache[:, :, :c + 1])
        return self.c_proj(y.reshape(N, C))


class DepthBlock(nn.Module):
    """Pre-norm block; the MLP is *per codebook position* (use_cmlp), attention is shared."""
    def __init__(self, n_embd, n_head, n_pos):
        super().__init__()
        self.ln_1 = RMSNorm(n_embd, DEPTH_NORM_EPS)
        self.attn = DepthAttention(n_embd, n_head)
        self.ln_2 = RMSNorm(n_embd, DEPTH_NORM_EPS)
        self.mlps = nn.ModuleList(SwiGLU(n_embd, int(8 * n_embd / 3)) for _ in range(n_pos))

    def forward(self, x, c=None):
        x = x + self.attn(self.ln_1(x), c)
        xl = self.ln_2(x)
        if c is not None:
            return x + self.mlps[c](xl)
        # unbind/stack, not slices: a slice's backward fills a zero tensor of the whole input
        return x + torch.stack([mlp(xi) for mlp, xi in zip(self.mlps, xl.unbind(1))], dim=1)


class DepthGPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        n, K = cfg.depth_n_embd, cfg.aud_channel
        self.n_embd, self.start_id = n, cfg.aud_emp_token_id
        self.linear_in = nn.Linear(cfg.hidden_size, K * n, bias=False)   # h_t -> one input vector per position
        self.wtes = nn.ModuleList(nn.Embedding(cfg.aud_vocab_size, n) for _ in range(K))
        self.wpe = nn.Embedding(K, n)
        self.blocks = nn.ModuleList(DepthBlock(n, cfg.depth_n_head, K) for _ in range(cfg.depth_n_layer))
        self.ln_f = RMSNorm(n, DEPTH_NORM_EPS)
        self.lm_heads = nn.ModuleList(nn.Linear(n, cfg.aud_vocab_size, bias=False) for _ in range(K))

    def frame_inputs(self, h):
        """h [N, H] -> what every codebook position adds to its token's embedding [N, K, n]: the
        projected state and the position embedding, once per frame."""
        return self.linear_in(h).view(h.shape[0], len(self.wtes), self.n_embd) + self.wpe.weight

    def forward(self, h, prev):
        """h [N, H], prev [N, k] (codebooks 0..k-1 of the frame) -> logits [N, k+1, aud_vocab]."""
        N, k = prev.shape
        inp = torch.cat([prev.new_full((N, 1), self.start_id), prev], dim=1)
        x = torch.stack([self.wtes[c](inp[:, c]) for c in range(k + 1)], dim=1)
        x = x + self.frame_inputs(h)[:, :k + 1]
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        return torch.stack([head(xc) for head, xc in zip(self.lm_heads, x.unbind(1))], dim=1)

    def step(self, inputs, prev, c):
        """Codebook c (a Python int) of one frame through the cache: inputs [N, K, n] from
        frame_inputs, prev [N] = codebook c-1 (None for c = 0) -> logits [N, aud_vocab].
        Steps 0..c of a frame equal forward(h, prev[:, :c])[:, c]."""
        if prev is None:
            prev = torch.full(inputs.shape[:1], self.start_id, dtype=torch.long, device=inputs.device)
        x = self.wtes[c](prev) + inputs[:, c]
        for block in self.blocks:
            x = block(x, c)
        return self.lm_heads[c](self.ln_f(x))


# -----------------------------------------------------------------------------
# The whole model

class FLMAudio(nn.Module):
    def __init__(self, cfg: FLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = MultiStreamEmbedding(cfg)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.depth_gpt = DepthGPT(cfg)
        if not any(p.is_meta for p in self.parameters()):
            self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)
        elif isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.cfg.initializer_range)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    # --- forward passes --------------------------------------------------------------
    def backbone(self, tokens, pos=None):
        """tokens [B, 17, T] -> (hidden [B, T, H] after the final norm, text_logits [B, T, V]).
        With pos (a LongTensor scalar) the columns are positions pos..pos+T-1 through the cache."""
        T, cfg = tokens.shape[2], self.cfg
        positions = torch.arange(T, device=tokens.device) + (0 if pos is None else pos)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        x = self.embed(tokens)
        if cfg.use_mup:
            x = x * cfg.input_mult
        for layer in self.layers:
            x = layer(x, cos, sin, None if pos is None else positions)
        h = self.norm(x)
        logits = self.lm_head(h)
        return h, (logits * (cfg.output_mult / cfg.mup_scale_factor) if cfg.use_mup else logits)

    def step(self, column, pos):
        """A streaming step: column [B, 17] at position pos (LongTensor scalar) -> (h [B, H], logits [B, V])."""
        h, logits = self.backbone(column[:, :, None], pos)
        return h[:, 0], logits[:, 0]

    def forward(self, tokens, weights, text_weight=1.0, wait_weight=1.0, semantic_weight=1.0, audio_weight=1.0,
                inputs=None):
        """Training loss on a delayed token grid. tokens [B, 17, T]; weights [B, 9, T]: weight of
        predicting row r (0 text, 1..8 speak) at column c. Columns 0..T-2 of `inputs` (default tokens; e.g.
        with noised audio) are read, rows 0..8 of columns 1..T-1 of tokens are the targets; DepthGPT at
        column t is teacher-forced with the speak tokens of column t+1. Returns (loss, per-stream losses)."""
        K = self.cfg.aud_channel
        h, text_logits = self.backbone((tokens if inputs is None else inputs)[:, :, :-1])
        tgt, w = tokens[:, :K + 1, 1:], weights[:, :, 1:].float()
        # text: <wait> targets are most of the monologue; their weight is a separate knob
        ce_text = F.cross_entropy(text_logits.flatten(0, 1).float(), tgt[:, 0].flatten(), reduction="none")
        w_text = w[:, 0].flatten()
        is_wait = (tgt[:, 0].flatten() == self.cfg.text_wait_token_id).float()
        w_eff = w_text * (wait_weight * is_wait + (1 - is_wait))
        text_loss = (ce_text * w_eff).sum() / w_eff.sum().clamp(min=1e-8)
        # audio: only run DepthGPT where some speak codebook carries loss (skips listen-only columns)
        w_aud = w[:, 1:].permute(0, 2, 1).reshape(-1, K)              # [B*(T-1), 8]
        sel = (w_aud.sum(1) > 0).nonzero().squeeze(1)
        speak_tgt = tgt[:, 1:].permute(0, 2, 1).reshape(-1, K)[sel]   # [N, 8]
        logits = self.depth_gpt(h.flatten(0, 1)[sel], speak_tgt[:, :K - 1])
        ce_aud = F.cross_entropy(logits.flatten(0, 1).float(), speak_tgt.flatten(), reduction="none").view(-1, K)
        w_sel = w_aud[sel] * torch.tensor([semantic_weight] + [1.0] * (K - 1), device=tokens.device)
        audio_loss = (ce_aud * w_sel).sum() / w_sel.sum().clamp(min=1e-8)
        loss = text_weight * text_loss + audio_weight * audio_loss
        with torch.no_grad():   # per-stream means for logging (not what is optimised)
            def mean(ce, m):
                return (ce * m).sum() / m.sum().clamp(min=1e-8)
            parts = {"text": mean(ce_text, w_text * (1 - is_wait)), "wait": mean(ce_text, w_text * is_wait),
                     **{f"audio_{c}": mean(ce_aud[:, c], w_aud[sel][:, c]) for c in range(K)}}
        return loss, parts

    # --- caches for decoding ---------------------------------------------------------
    def setup_cache(self, batch_size, max_len, device=None, dtype=None):
        """Preallocate the backbone's ring KV caches (max_len steps; a sliding window beyond) and
        DepthGPT's (one slot per codebook)."""
        p, K, n = next(self.parameters()), self.cfg.aud_channel, self.cfg.depth_n_embd
        args = dict(device=device or p.device, dtype=dtype or p.dtype)
        for a in (layer.self_attn for layer in self.layers):
            a.cache = KVCache(batch_size, a.n_kv, max_len, a.head_dim, **args)
        for a in (block.attn for block in self.depth_gpt.blocks):
            a.cache = KVCache(batch_size, a.n_head, K, n // a.n_head, **args)

    def reset_cache(self):
        """A new conversation from position 0: nothing to clear (see KVCache)."""

    def drop_cache(self):
        for a in [layer.self_attn for layer in self.layers] + [b.attn for b in self.depth_gpt.blocks]:
            a.cache = None

    def cpu_layout_(self):
        """For inference on the CPU, in place: every Linear weight stored column-major (same shape and
        values), the layout a batch-1 matmul streams fastest there; the streaming step is bound by
        reading weights."""
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                mod.weight = nn.Parameter(mod.weight.detach().t().contiguous().t(), mod.weight.requires_grad)
        return self

    # --- checkpoints ------------------------------------------------------------------
    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    @staticmethod
    def from_pretrained(path, device="cpu", dtype=torch.float32):
        """Load an official-layout directory (config.json + sharded or single safetensors). The model
        is allocated once and filled tensor by tensor, so the 7B needs about its own size in memory."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json (expected an FLM-Audio checkpoint directory)")
        cfg = FLMConfig.from_official(path / "config.json")
        with torch.device("meta"):
            m = FLMAudio(cfg)
        own = m.to(dtype=dtype).to_empty(device=device).official_state_dict()
        loaded, unexpected, misshapen = set(), [], []
        for _, name, sf in _tensors(path):
            if name not in own:
                unexpected.append(name)
                continue
            loaded.add(name)
            shape = tuple(sf.get_slice(name).get_shape())
            if shape != tuple(own[name].shape):
                misshapen.append(f"{name} {shape} != {tuple(own[name].shape)}")
                continue
            own[name].copy_(sf.get_tensor(name))
        missing = sorted(set(own) - loaded)
        if missing or unexpected or misshapen:
            raise ValueError(f"{path}: checkpoint does not match its config.json: "
                             + _summarise(missing=missing, unexpected=unexpected, misshapen=misshapen))
        return m.eval()

    def official_state_dict(self):
        """{official name: tensor view}. A module with `parts` (fused projections, the embedding table)
        holds several official tensors stacked by rows, named relative to the module's parent."""
        out = {}
        for mod_name, mod in self.named_modules():
            parent, _, own = mod_name.rpartition(".")
            for p_name, p in mod.named_parameters(recurse=False):
                start = 0
                for part, rows in getattr(mod, "parts", [(own, p.shape[0])]):
                    out[to_official_name(f"{parent}.{part}.{p_name}".lstrip("."))] = p.detach()[start:start + rows]
                    start += rows
        return out

    def save_pretrained(self, path, max_shard_bytes=5 * 1024 ** 3):
        """Write the official layout: config.json, model-0000i-of-0000n.safetensors + index (or one file)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = self.official_state_dict()
        shards, size = [[]], 0
        for name, t in sd.items():
            if shards[-1] and size + t.nbytes > max_shard_bytes:
                shards, size = shards + [[]], 0
            shards[-1], size = shards[-1] + [name], size + t.nbytes
        n = len(shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for fname, keys in zip(names, shards):   # own CPU copies: safetensors refuses shared storage
            _atomic(path / fname, lambda p: save_file({k: torch.empty(sd[k].shape, dtype=sd[k].dtype).copy_(sd[k])
                                                       for k in keys}, str(p), metadata={"format": "pt"}))
        if n > 1:
            index = {"metadata": {"total_size": sum(t.nbytes for t in sd.values())},
                     "weight_map": {k: fname for fname, keys in zip(names, shards) for k in keys}}
            _atomic(path / "model.safetensors.index.json", lambda p: p.write_text(json.dumps(index, indent=2)))
        _atomic(path / "config.json", lambda p: p.write_text(json.dumps(self.cfg.to_official(), indent=2)))

    @staticmethod
    def from_qwen(path, cfg=None, device="cpu", dtype=torch.float32, **overrides):
        """The paper's initialisation: a Qwen2.5 (or Qwen2.5-VL) language model's text embedding, decoder
        layers, final norm and lm_head; audio embeddings and DepthGPT start fresh. cfg defaults to the
        Qwen model's shape with `overrides` (FLMConfig fields); a larger text vocab (e.g. an added
        <wait>) keeps fresh rows beyond Qwen's."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json (expected a Qwen2.5 model directory)")
        qcfg = json.loads((path / "config.json").read_text())
        qcfg = qcfg.get("text_config", qcfg)          # Qwen2.5-VL nests the language model's config
        shape = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
        keys = ("vocab_size", "rms_norm_eps", "rope_theta", "max_position_embeddings") + shape
        cfg = cfg or FLMConfig(**{**{k: qcfg[k] for k in keys if k in qcfg}, **overrides})
        for k in [k for k in shape if qcfg.get(k) != getattr(cfg, k)][:1]:
            raise ValueError(f"{path}/config.json: {k}={qcfg.get(k)} but the FLM config wants {getattr(cfg, k)}")
        with torch.device("meta"):
            m = FLMAudio(cfg)
        m.to(dtype=dtype).to_empty(device=device).apply(m._init_weights)
        own, text = m.official_state_dict(), ("model.embed_tokens.text_embeddings.weight", "lm_head.weight")
        wanted = {k for k in own if k.startswith(("model.layers.", "model.norm.")) or k in text}
        copied, embed = set(), None
        for f, name, sf in _tensors(path):
            # Qwen2.5-VL stores the language model under model.language_model.*, vision under visual.*
            key = name.replace("model.language_model.", "model.").replace("language_model.model.", "model.")
            key = {"model.embed_tokens.weight": text[0], "language_model.lm_head.weight": text[1]}.get(key, key)
            if key not in wanted:
                continue
            t, dst = sf.get_tensor(name), own[key]
            if key in text:              # FLM's text vocab may be larger: Qwen's rows first
                t = t[:cfg.vocab_size]
                dst, embed = dst[:t.shape[0]], t if key == text[0] else embed
            elif dst.shape != t.shape:
                raise ValueError(f"{f}: {name} has shape {tuple(t.shape)}, expected {tuple(dst.shape)}")
            dst.copy_(t)
            copied.add(key)
        if text[1] not in copied and embed is not None:   # small Qwen2.5 models tie lm_head to the embedding
            own[text[1]][:embed.shape[0]].copy_(embed)
            copied.add(text[1])
        if wanted - copied:
            raise ValueError(f"{path}: Qwen checkpoint lacks " + _summarise(missing=sorted(wanted - copied)))
        return m


# -----------------------------------------------------------------------------
# Official names. Our module paths differ only by these prefixes, and fused projections are
# stored as their parts (q_proj|k_proj|v_proj, gate_proj|up_proj), so the mapping is one table.

_OFFICIAL_PREFIXES = [
    ("embed.text.", "model.embed_tokens.text_embeddings."),
    ("embed.speak.", "model.embed_tokens.aud_speak_embeddings."),
    ("embed.listen.", "model.embed_tokens.aud_listen_embeddings."),
    ("layers.", "model.layers."),
    ("norm.", "model.norm."),
    ("lm_head.", "lm_head."),
    ("depth_gpt.linear_in.", "aud_output_layers.linear_in."),
    ("depth_gpt.wtes.", "aud_output_layers.transformer.wtes."),
    ("depth_gpt.wpe.", "aud_output_layers.transformer.wpe."),
    ("depth_gpt.blocks.", "aud_output_layers.transformer.h."),
    ("depth_gpt.ln_f.", "aud_output_layers.transformer.ln_f."),
    ("depth_gpt.lm_heads.", "aud_output_layers.lm_heads."),
]


def to_official_name(ours):
    return next(b + ours[len(a):] for a, b in _OFFICIAL_PREFIXES if ours.startswith(a))


def _tensors(path):
    """(file, tensor name, open file) for every tensor of a checkpoint directory, file by file."""
    index = path / "model.safetensors.index.json"   # sharded, or one file named as Hugging Face does
    files = [path / n for n in sorted(set(json.loads(index.read_text())["weight_map"].values()))] \
        if index.is_file() else [path / "model.safetensors"]
    for f in [f for f in files if not f.is_file()][:1]:
        raise FileNotFoundError(f"{f}: weight file missing (expected model.safetensors or a sharded index)")
    for f in files:
        try:
            sf = safe_open(f, framework="pt")
        except Exception as e:   # truncated or not safetensors at all
            raise ValueError(f"{f}: unreadable weight file ({str(e).splitlines()[0]})") from None
        with sf:
            yield from ((f, name, sf) for name in sf.keys())


def _atomic(path, write):
    """write(tmp) then rename over path: a crash mid-write never leaves a truncated file."""
    write(tmp := path.with_name(path.name + ".tmp"))
    tmp.replace(path)


def _summarise(**groups):
    return "; ".join(f"{len(v)} {what}: {', '.join(v[:5])}" + (f" (+{len(v) - 5} more)" if len(v) > 5 else "")
                     for what, v in groups.items() if v)
