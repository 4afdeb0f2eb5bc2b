"""The FLM-Audio model: a Qwen2.5-shaped backbone that steps once per 80 ms audio frame,
plus DepthGPT, a small transformer that turns each backbone step into 8 Mimi codebooks.

Data flow (read DESIGN.md section 1-2 first):

    tokens [B, 17, T]          row 0 text monologue, rows 1..8 speak (own voice), 9..16 listen (user)
      -> MultiStreamEmbedding  sum of 17 embeddings per column
      -> Qwen2 decoder layers  (RMSNorm, GQA attention + RoPE, SwiGLU)
      -> final RMSNorm = h_t   -> lm_head: next monologue token
      -> DepthGPT(h_t, prev)   8 next speak tokens, autoregressive over the codebook axis

Everything is in *delayed* coordinates (acoustic codebooks one step late), so training is a
plain shift-by-one over columns. This file also holds the static KV cache used for streaming
decode, the training loss, and loading/saving in the official checkpoint layout so that weights
move freely between this code and the official FLM-Audio release.
"""
import json
import math
from dataclasses import dataclass, asdict, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import kernels

N_STREAMS = 17
DELAYS = [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1]  # acoustic codebooks lag by one step

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
        """Parse an official config.json (path or dict) into an FLMConfig."""
        src = cfg if isinstance(cfg, dict) else json.load(open(cfg))
        name = "config.json" if isinstance(cfg, dict) else cfg
        try:
            tok, dg = src["mm_token_info"], src["aud_depthgpt"]
            out = FLMConfig(**{f.name: src[f.name] for f in fields(FLMConfig)
                               if f.name in src and not f.name.startswith("depth_")},
                            text_wait_token_id=tok["text_wait_token_id"],
                            aud_pad_token_id=tok["aud_pad_token_id"], aud_emp_token_id=tok["aud_emp_token_id"],
                            depth_n_layer=dg["n_layer"], depth_n_head=dg["n_head"], depth_n_embd=dg["n_embd"])
        except KeyError as e:
            raise ValueError(f"{name}: missing key {e} (not an FLM-Audio config)") from None
        # the variants below exist in the official DepthGPT code but not in any released checkpoint
        want = dict(use_cmlp=True, use_rmsnorm=True, use_swiglu=True, bias=False)
        bad = {k: dg.get(k) for k, v in want.items() if dg.get(k, v) != v}
        if bad or not src.get("attention_bias", True) or not src.get("disable_att_o_bias", True) \
                or src.get("tie_word_embeddings", False) or src.get("aud_channel", 8) != 8:
            raise ValueError(f"{name}: unsupported FLM-Audio variant {bad or 'attention/tying flags'}")
        # rope_scaling of type mrope with 1-D positions is plain RoPE, so it is read and ignored
        return out

    def to_official(self):
        """The config.json the official FLMAudioForCausalLM class reads."""
        d = {k: v for k, v in asdict(self).items() if not k.startswith("depth_")
             and k not in ("text_wait_token_id", "aud_pad_token_id", "aud_emp_token_id")}
        d.update(architectures=["FLMAudioForCausalLM"], model_type="FLMAudio", hidden_act="silu",
                 attention_bias=True, disable_att_o_bias=True, tie_word_embeddings=False,
                 torch_dtype="bfloat16",
                 mm_token_info=dict(text_wait_token_id=self.text_wait_token_id,
                                    aud_pad_token_id=self.aud_pad_token_id,
                                    aud_emp_token_id=self.aud_emp_token_id),
                 aud_depthgpt=dict(n_layer=self.depth_n_layer, n_head=self.depth_n_head,
                                   n_embd=self.depth_n_embd, dropout=0.0, bias=False,
                                   use_cmlp=True, use_rmsnorm=True, use_swiglu=True))
        return d


# -----------------------------------------------------------------------------
# Building blocks shared by the backbone and DepthGPT


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32 (bf16 squares overflow/underflow), scale in the input dtype
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden, bias=False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_cos_sin(positions, head_dim, theta):
    """cos/sin tables [T, head_dim] for integer positions, computed in float32 (as Qwen2 does)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    ang = positions.float()[:, None] * inv_freq[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def apply_rope(x, cos, sin):
    """Rotate-half RoPE on x [B, H, T, D]; the product is taken in float32."""
    d = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat([-xf[..., d:], xf[..., :d]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


# -----------------------------------------------------------------------------
# The backbone: a Qwen2 decoder over summed 17-stream embeddings


class MultiStreamEmbedding(nn.Module):
    """One table for text, 8 for the model's own voice, 8 for the user's voice; summed."""

    def __init__(self, cfg):
        super().__init__()
        self.text = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.speak = nn.ModuleList(nn.Embedding(cfg.aud_vocab_size, cfg.hidden_size) for _ in range(cfg.aud_channel))
        self.listen = nn.ModuleList(nn.Embedding(cfg.aud_vocab_size, cfg.hidden_size) for _ in range(cfg.aud_channel))

    def forward(self, tokens):                       # [B, 17, T] -> [B, T, H]
        x = self.text(tokens[:, 0])
        n = len(self.speak)
        for c in range(n):
            x = x + self.speak[c](tokens[:, 1 + c]) + self.listen[c](tokens[:, 1 + n + c])
        return x


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=False)
        self.cache = None  # a KVCache while streaming

    def forward(self, x, cos, sin, pos=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is None:                       # training / full forward
            if torch.is_grad_enabled():              # SDPA has the fused backward kernels
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            else:
                y = kernels.attention(q, k, v, causal=True)
        else:
            y = self.cache.attend(q, k, v, pos)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, pos=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, pos)
        return x + self.mlp(self.post_attention_layernorm(x))


# -----------------------------------------------------------------------------
# Static KV cache (gpt-fast style): preallocated, written at positions, never reallocated.
# It is a ring buffer of `size` slots: position p lives in slot p % size, so a conversation
# longer than the cache keeps the last `size` steps (a sliding window) at constant memory.
# Keys are stored after RoPE, so relative positions stay right after wrapping.


class KVCache(nn.Module):
    def __init__(self, batch, n_kv, size, head_dim, device, dtype):
        super().__init__()
        self.size = size
        self.register_buffer("k", torch.zeros(batch, n_kv, size, head_dim, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(batch, n_kv, size, head_dim, device=device, dtype=dtype), persistent=False)
        # absolute position held by each slot (-1 = empty): gives the attention mask for free
        self.register_buffer("slot_pos", torch.full((size,), -1, device=device, dtype=torch.long), persistent=False)

    def reset(self):
        self.slot_pos.fill_(-1)

    def attend(self, q, k, v, pos):
        """Write k/v of positions pos..pos+T-1, then attend q to every cached position <= its own."""
        T = q.shape[2]
        qpos = pos + torch.arange(T, device=q.device)
        slots = qpos % self.size
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)
        self.slot_pos.index_copy_(0, slots, qpos)
        if T == 1:
            # ring fill order makes slots [0, n) exactly the valid ones, n = min(pos + 1, size)
            return kernels.decode_attention(q, self.k, self.v, torch.clamp(pos + 1, max=self.size))
        # chunked prefill: causal within the chunk, everything earlier still in the window
        mask = (self.slot_pos[None, :] >= 0) & (self.slot_pos[None, :] <= qpos[:, None]) \
            & (self.slot_pos[None, :] > qpos[:, None] - self.size)
        return F.scaled_dot_product_attention(q, self.k, self.v, attn_mask=mask, enable_gqa=True)


# -----------------------------------------------------------------------------
# DepthGPT: from one backbone state h_t to the 8 speak codebooks of the next frame


class DepthAttention(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)   # fused q, k, v
        self.c_proj = nn.Linear(n_embd, n_embd, bias=False)

    def forward(self, x):                            # x [N, K, C] over K <= 8 codebook positions
        N, K, C = x.shape
        q, k, v = self.c_attn(x).view(N, K, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(N, K, C))


class DepthBlock(nn.Module):
    """Pre-norm block; the MLP is *per codebook position* (use_cmlp), attention is shared."""

    def __init__(self, n_embd, n_head, n_pos):
        super().__init__()
        self.ln_1 = RMSNorm(n_embd, 1e-6)
        self.attn = DepthAttention(n_embd, n_head)
        self.ln_2 = RMSNorm(n_embd, 1e-6)
        self.mlps = nn.ModuleList(SwiGLU(n_embd, int(8 * n_embd / 3)) for _ in range(n_pos))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        xl = self.ln_2(x)
        return x + torch.cat([self.mlps[c](xl[:, c:c + 1]) for c in range(x.shape[1])], dim=1)


class DepthGPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        n, K = cfg.depth_n_embd, cfg.aud_channel
        self.n_embd, self.start_id = n, cfg.aud_emp_token_id
        self.linear_in = nn.Linear(cfg.hidden_size, K * n, bias=False)   # h_t -> one input vector per position
        self.wtes = nn.ModuleList(nn.Embedding(cfg.aud_vocab_size, n) for _ in range(K))
        self.wpe = nn.Embedding(K, n)
        self.blocks = nn.ModuleList(DepthBlock(n, cfg.depth_n_head, K) for _ in range(cfg.depth_n_layer))
        self.ln_f = RMSNorm(n, 1e-6)
        self.lm_heads = nn.ModuleList(nn.Linear(n, cfg.aud_vocab_size, bias=False) for _ in range(K))

    def forward(self, h, prev):
        """h [N, H], prev [N, k] (codebooks 0..k-1 of the frame) -> logits [N, k+1, aud_vocab]."""
        N, k = prev.shape
        inp = torch.cat([prev.new_full((N, 1), self.start_id), prev], dim=1)
        x = torch.stack([self.wtes[c](inp[:, c]) for c in range(k + 1)], dim=1)
        x = x + self.wpe.weight[:k + 1] + self.linear_in(h).view(N, len(self.wtes), self.n_embd)[:, :k + 1]
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        return torch.stack([self.lm_heads[c](x[:, c]) for c in range(k + 1)], dim=1)


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
        With pos (a LongTensor scalar) and a cache set up, the columns are positions pos..pos+T-1."""
        T = tokens.shape[2]
        start = 0 if pos is None else pos
        positions = start + torch.arange(T, device=tokens.device)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, pos)
        h = self.norm(x)
        return h, self.lm_head(h)

    def depth(self, h, prev):
        return self.depth_gpt(h, prev)

    def forward(self, tokens, weights, text_weight=1.0, wait_weight=1.0, semantic_weight=1.0, audio_weight=1.0):
        """Training loss on a delayed token grid.

        tokens [B, 17, T]; weights [B, 9, T]: weight of predicting row r (0 text, 1..8 speak) at column c.
        Columns 0..T-2 are the inputs, rows 0..8 of columns 1..T-1 the targets; DepthGPT at column t is
        teacher-forced with the speak tokens of column t+1. Returns (loss, per-stream losses).
        """
        K = self.cfg.aud_channel
        h, text_logits = self.backbone(tokens[:, :, :-1])
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
        mult = torch.ones(K, device=tokens.device)
        mult[0] = semantic_weight
        w_sel = w_aud[sel] * mult
        audio_loss = (ce_aud * w_sel).sum() / w_sel.sum().clamp(min=1e-8)
        loss = text_weight * text_loss + audio_weight * audio_loss
        # per-stream means for logging (detached; not what is optimised)
        with torch.no_grad():
            def mean(ce, m):
                return (ce * m).sum() / m.sum().clamp(min=1e-8)
            parts = {"text": mean(ce_text, w_text * (1 - is_wait)), "wait": mean(ce_text, w_text * is_wait)}
            for c in range(K):
                parts[f"audio_{c}"] = mean(ce_aud[:, c], w_aud[sel][:, c])
        return loss, parts

    # --- streaming decode ----------------------------------------------------------
    def setup_cache(self, batch_size, max_len, device=None, dtype=None):
        """Preallocate a static KV cache of max_len steps per layer (a sliding window beyond that)."""
        p = next(self.parameters())
        for layer in self.layers:
            a = layer.self_attn
            a.cache = KVCache(batch_size, a.n_kv, max_len, a.head_dim, device or p.device, dtype or p.dtype)

    def reset_cache(self):
        for layer in self.layers:
            layer.self_attn.cache.reset()

    def drop_cache(self):
        for layer in self.layers:
            layer.self_attn.cache = None

    def backbone_step(self, tokens, pos):
        """One (or a chunk of) cached step(s): tokens [B, 17, T] at positions pos.. -> (hidden, text_logits)."""
        return self.backbone(tokens, pos)

    # --- checkpoints ------------------------------------------------------------------
    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    @staticmethod
    def from_pretrained(path, device="cpu", dtype=torch.float32):
        """Load an official-layout directory (config.json + sharded or single safetensors).

        The model is built on the meta device and filled shard by shard, tensor by tensor, so
        loading the 7B needs about its own size in memory, not twice that."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json (expected an FLM-Audio checkpoint directory)")
        cfg = FLMConfig.from_official(path / "config.json")
        with torch.device("meta"):
            m = FLMAudio(cfg)
        expected = {to_official_name(k): (k, tuple(t.shape)) for k, t in m.state_dict().items()}
        loaded, unexpected, misshapen = set(), [], []
        for f in _weight_files(path):
            with safe_open(f, framework="pt") as sf:
                shard = {}
                for name in sf.keys():
                    if name not in expected:
                        unexpected.append(name)
                        continue
                    ours, shape = expected[name]
                    t = sf.get_slice(name)
                    loaded.add(name)
                    if tuple(t.get_shape()) != shape:
                        misshapen.append(f"{name} {tuple(t.get_shape())} != {shape}")
                        continue
                    shard[ours] = sf.get_tensor(name).to(device=device, dtype=dtype)
                m.load_state_dict(shard, strict=False, assign=True)
                del shard
        missing = sorted(set(expected) - loaded)
        if missing or unexpected or misshapen:
            raise ValueError(f"{path}: checkpoint does not match its config.json: "
                             + _summarise(missing=missing, unexpected=unexpected, misshapen=misshapen))
        return m.eval()

    def save_pretrained(self, path, max_shard_bytes=5 * 1024 ** 3):
        """Write the official layout: config.json, model-0000i-of-0000n.safetensors + index (or one file)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = {to_official_name(k): v.detach().contiguous() for k, v in self.state_dict().items()}
        shards, size = [[]], 0
        for name, t in sd.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        n = len(shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for fname, keys in zip(names, shards):
            save_file({k: sd[k].cpu() for k in keys}, str(path / fname), metadata={"format": "pt"})
        if n > 1:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
                     "weight_map": {k: fname for fname, keys in zip(names, shards) for k in keys}}
            (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (path / "config.json").write_text(json.dumps(self.cfg.to_official(), indent=2))

    @staticmethod
    def from_qwen(path, cfg=None, device="cpu", dtype=torch.float32):
        """The paper's initialisation: take a Qwen2.5 (or Qwen2.5-VL) language model's text embedding,
        decoder layers, final norm and lm_head; audio embeddings and DepthGPT start fresh.

        cfg defaults to the Qwen model's own shape with the FLM audio parts; a larger text vocab
        (e.g. with an added <wait> token) keeps fresh rows beyond Qwen's."""
        path = Path(path)
        qcfg = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else None
        if qcfg is None:
            raise FileNotFoundError(f"{path}: no config.json (expected a Qwen2.5 model directory)")
        qcfg = qcfg.get("text_config", qcfg)          # Qwen2.5-VL nests the language model's config
        if cfg is None:
            cfg = FLMConfig(**{k: qcfg[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                    "num_hidden_layers", "num_attention_heads",
                                                    "num_key_value_heads", "rms_norm_eps", "rope_theta")})
        for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
            if qcfg.get(k) != getattr(cfg, k):
                raise ValueError(f"{path}/config.json: {k}={qcfg.get(k)} but the FLM config wants {getattr(cfg, k)}")
        with torch.device("meta"):
            m = FLMAudio(cfg)
        m.to(dtype).to_empty(device=device)
        m.apply(m._init_weights)
        own = m.state_dict()
        copied, embed = set(), None
        for f in _weight_files(path):
            with safe_open(f, framework="pt") as sf:
                for name in sf.keys():
                    # Qwen2.5-VL stores the language model under model.language_model.*, vision under visual.*
                    key = name.replace("model.language_model.", "model.").replace("language_model.model.", "model.")
                    if key == "model.embed_tokens.weight":
                        ours = "embed.text.weight"
                    elif key.startswith("model.layers.") or key == "model.norm.weight":
                        ours = key[len("model."):]
                    elif key == "lm_head.weight" or key == "language_model.lm_head.weight":
                        ours = "lm_head.weight"
                    else:
                        continue
                    t = sf.get_tensor(name)
                    if ours in ("embed.text.weight", "lm_head.weight"):
                        rows = min(t.shape[0], cfg.vocab_size)
                        own[ours][:rows].copy_(t[:rows])
                        if ours == "embed.text.weight":
                            embed = t[:rows]
                    else:
                        if own[ours].shape != t.shape:
                            raise ValueError(f"{f}: {name} has shape {tuple(t.shape)}, expected {tuple(own[ours].shape)}")
                        own[ours].copy_(t)
                    copied.add(ours)
        if "lm_head.weight" not in copied and embed is not None:   # small Qwen2.5 models tie lm_head to the embedding
            own["lm_head.weight"][:embed.shape[0]].copy_(embed)
            copied.add("lm_head.weight")
        wanted = {k for k in own if k.startswith(("layers.", "norm.", "embed.text.", "lm_head."))}
        if wanted - copied:
            raise ValueError(f"{path}: Qwen checkpoint lacks " + _summarise(missing=sorted(wanted - copied)))
        return m


# -----------------------------------------------------------------------------
# Official names. Our module paths differ only by these prefixes, so the mapping is one table.

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
    for a, b in _OFFICIAL_PREFIXES:
        if ours.startswith(a):
            return b + ours[len(a):]
    raise KeyError(ours)


def from_official_name(official):
    for a, b in _OFFICIAL_PREFIXES:
        if official.startswith(b):
            return a + official[len(b):]
    raise KeyError(official)


def _weight_files(path):
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / n for n in names]
    else:   # a single file, as Hugging Face names it (other .safetensors files beside it are not weights)
        files = [path / "model.safetensors"]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: weight file missing (expected model.safetensors or a sharded index)")
    return files


def _summarise(**groups):
    parts = []
    for what, items in groups.items():
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            parts.append(f"{len(items)} {what}: {', '.join(items[:5])}{more}")
    return "; ".join(parts)
