"""Plain reference implementations the tests compare the model's fast paths against.

- `OfficialStyleLoop`: one streaming step computed as the official inference does it (a growing
  per-layer KV cache by torch.cat, GQA by repeating K/V, DepthGPT re-run over all previous codebooks
  for each token, a sort-based sampler). Checked against the official fixture's greedy trace in
  tests/test_chat.py; bench.py times it as the baseline of the streaming step.
- `windowed_forward`: the backbone's full forward where each position sees only the last `window`
  positions: what a sliding-window KV cache must reproduce.
"""
import math

import torch
import torch.nn.functional as F

import kernels
from grid import DELAYS
from model import apply_rope, rope_cos_sin


def _qkv(a, x, cos, sin):
    """q, k (after RoPE), v [B, heads, T, head_dim]: the fused projection split into q/k/v_proj."""
    B, T, _ = x.shape
    q, k, v = a.qkv_proj(x).split([n for _, n in a.qkv_proj.parts], -1)
    q, k, v = (t.view(B, T, -1, a.head_dim).transpose(1, 2) for t in (q, k, v))
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class OfficialStyleLoop:
    """How the official inference computes one step: a per-layer KV cache that grows by torch.cat,
    GQA by repeating K/V, DepthGPT re-run over all previous codebooks for each of the 8 tokens, and the
    official sort-based sampler (kernels.sample_reference). Same math as LMStream, the same streams
    and starting column (<wait>/pad), so greedy traces agree; bench.py's baseline."""

    def __init__(self, model, temp_text=0.01, temp_audio=0.5, top_p=0.9, rep_text=1.03, rep_audio=1.2, window=50,
                 attn_window=None):
        self.m, self.cfg, self.attn_window = model, model.cfg, attn_window   # attn_window: keep the last N keys
        self.dev = next(model.parameters()).device
        self.temp_text, self.temp_audio, self.top_p = temp_text, temp_audio, top_p
        self.rep_text, self.rep_audio, self.window = rep_text, rep_audio, window
        self.kv = [None] * len(model.layers)
        cfg = self.cfg
        self.cols = [[cfg.text_wait_token_id] + [cfg.aud_pad_token_id] * 16]   # the delayed grid, per column
        self.text_hist, self.audio_hist, self.t = [], [], 0

    def _sample(self, logits, temp, rep, hist):
        recent = torch.tensor(hist[-self.window:], device=self.dev)[None] if hist else None
        return kernels.sample_reference(logits, temp, self.top_p, 0, rep, recent)

    @torch.inference_mode()
    def step(self, listen):                                     # listen [1, 8]
        m, t = self.m, self.t
        while len(self.cols) < t + 2:
            self.cols.append([0] * 17)
        for q in range(8):
            self.cols[t + DELAYS[9 + q]][9 + q] = int(listen[0, q])
        x = m.embed(torch.tensor(self.cols[t], device=self.dev)[None, :, None])
        cos, sin = rope_cos_sin(torch.tensor([t], device=self.dev), self.cfg.head_dim, self.cfg.rope_theta)
        for i, layer in enumerate(m.layers):
            a = layer.self_attn
            q, k, v = _qkv(a, layer.input_layernorm(x), cos, sin)
            if self.kv[i] is not None:
                k, v = torch.cat([self.kv[i][0], k], 2), torch.cat([self.kv[i][1], v], 2)
                if self.attn_window:
                    k, v = k[:, :, -self.attn_window:], v[:, :, -self.attn_window:]
            self.kv[i] = (k, v)
            g = a.n_head // a.n_kv
            s = q @ k.repeat_interleave(g, 1).transpose(-1, -2) / math.sqrt(a.head_dim)
            y = s.softmax(-1) @ v.repeat_interleave(g, 1)
            x = x + a.o_proj(y.transpose(1, 2).reshape(1, 1, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        h = m.norm(x)[:, 0]
        text = self._sample(m.lm_head(h), self.temp_text, self.rep_text, self.text_hist)
        prev = torch.zeros(1, 0, dtype=torch.long, device=self.dev)
        for c in range(8):
            logits = m.depth_gpt(h, prev)[:, -1]
            hist = [a[c] for a in self.audio_hist] if c < 4 else []
            prev = torch.cat([prev, self._sample(logits, self.temp_audio, self.rep_audio, hist)[:, None]], 1)
        self.text_hist.append(int(text))
        self.audio_hist.append(prev[0].tolist())
        self.cols[t + 1][0] = int(text)
        self.cols[t + 1][1:9] = prev[0].tolist()
        self.t += 1
        if self.t <= 1:
            return None
        return torch.tensor([[self.cols[self.t - 1 + DELAYS[r]][r] for r in range(9)]])


def windowed_forward(m, tokens, window):
    """Plain full forward where every position sees only the last `window` positions (incl. itself)."""
    T = tokens.shape[2]
    cos, sin = rope_cos_sin(torch.arange(T), m.cfg.head_dim, m.cfg.rope_theta)
    i = torch.arange(T)
    mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
    x = m.embed(tokens)
    for layer in m.layers:
        a, B = layer.self_attn, x.shape[0]
        q, k, v = _qkv(a, layer.input_layernorm(x), cos, sin)
        rep = a.n_head // a.n_kv
        att = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                             attn_mask=mask)
        x = x + a.o_proj(att.transpose(1, 2).reshape(B, T, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return m.norm(x)
