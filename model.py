"""
The whole medslm decoder, importing nothing else of medslm. Modern block (the default): RMSNorm, rotary embeddings,
SwiGLU, grouped-query attention, no biases. Classic GPT-2 block through config switches: LayerNorm, learned
positions, GELU MLP, biases, tied head. Plus a KV cache, sampling, and a fused head + cross-entropy that never holds
a batch's logits. RoPE's half-split layout and the tanh GELU map one-to-one onto Hugging Face's Llama and GPT-2.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.utils.checkpoint
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024      # max context length
    vocab_size: int = 32000
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: Optional[int] = None  # grouped-query attention; None means n_head (plain multi-head)
    n_embd: int = 768
    intermediate_size: Optional[int] = None  # FFN hidden size; None derives it (see __post_init__)
    multiple_of: int = 256      # SwiGLU hidden size is rounded up to a multiple of this
    norm: str = 'rmsnorm'       # 'rmsnorm' | 'layernorm'
    norm_eps: float = 1e-5
    pos_embedding: str = 'rope'  # 'rope' | 'learned'
    rope_theta: float = 10000.0
    mlp: str = 'swiglu'         # 'swiglu' | 'gelu'
    bias: bool = False          # biases in Linears and LayerNorms (GPT-2 has them)
    tie_embeddings: bool = False  # share the token embedding with the output head
    dropout: float = 0.0

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        assert self.n_embd % self.n_head == 0, 'n_embd must be divisible by n_head'
        assert self.n_head % self.n_kv_head == 0, 'n_kv_head must divide n_head'
        assert self.norm in ('rmsnorm', 'layernorm') and self.pos_embedding in ('rope', 'learned') and \
            self.mlp in ('swiglu', 'gelu')
        if self.intermediate_size is None:
            if self.mlp == 'swiglu':  # LLaMA: 2/3 of 4*dim keeps the FLOPs of a 4*dim GELU MLP
                hidden = int(2 * 4 * self.n_embd / 3)
                self.intermediate_size = -(-hidden // self.multiple_of) * self.multiple_of
            else:
                self.intermediate_size = 4 * self.n_embd

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


def make_norm(config):
    if config.norm == 'rmsnorm':  # torch's fused kernel: one op, and it accumulates half types in fp32
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def rope_cache(seq_len, head_dim, theta):
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(seq_len).float(), freqs)  # (T, hd/2)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)  # (T, hd): cos half, sin half


def apply_rope(x, rope):
    # x: (B, nh, T, hd); rope: (T, hd). Rotates each pair (x[i], x[i + hd/2]) by its position's angle.
    cos, sin = rope.chunk(2, dim=-1)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


class KVCache(nn.Module):
    def __init__(self, batch_size, max_len, n_kv_head, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.register_buffer('k', torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer('v', torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos, k, v):
        # writes positions pos..pos+T-1, returns keys and values of 0..pos+T-1; a decode step (pos a (1,) tensor)
        # gets the whole cache, masked past pos: one shape at every position, so a compiled step never recompiles
        if torch.is_tensor(pos):
            self.k.index_copy_(2, pos, k)
            self.v.index_copy_(2, pos, v)
            return self.k, self.v
        end = pos + k.size(2)
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        qkv_dim = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        self.wqkv = nn.Linear(config.n_embd, qkv_dim, bias=config.bias)  # one matmul for q, k and v
        self.wo = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.kv_cache = None

    def forward(self, x, rope, pos):
        B, T, C = x.size()
        qkv = self.wqkv(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh + 2 * nkv, T, hd)
        qk, v = qkv.split([self.n_head + self.n_kv_head, self.n_kv_head], dim=1)
        if rope is not None:
            qk = apply_rope(qk, rope)  # q and k heads in one pass: fewer ops per decoded token
        q, k = qk.split([self.n_head, self.n_kv_head], dim=1)  # (B, nh, T, hd), (B, nkv, T, hd)
        mask, causal = None, True
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(pos, k, v)
            if torch.is_tensor(pos):
                mask, causal = torch.arange(k.size(2), device=x.device)[None] <= pos[:, None], False  # (1, max_len)
            elif pos > 0:  # queries at pos..pos+T-1 see every cached key up to their own position
                causal = False
                if T > 1:
                    mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(diagonal=pos)
        gqa = self.n_kv_head != self.n_head
        if gqa and q.is_cuda and q.dtype == torch.float32:  # CUDA's fused kernels take GQA in half precision only
            k, v = (t.repeat_interleave(self.n_head // self.n_kv_head, dim=1) for t in (k, v))
            gqa = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0, enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.wo(y)


class FeedForward(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.swiglu = config.mlp == 'swiglu'
        hidden = config.intermediate_size
        # for SwiGLU, w1 holds the gate and up projections stacked, so one matmul computes both
        self.w1 = nn.Linear(config.n_embd, 2 * hidden if self.swiglu else hidden, bias=config.bias)
        self.w2 = nn.Linear(hidden, config.n_embd, bias=config.bias)

    def forward(self, x):
        if self.swiglu:
            gate, up = self.w1(x).chunk(2, dim=-1)
            return self.w2(F.silu(gate) * up)
        return self.w2(F.gelu(self.w1(x), approximate='tanh'))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention_norm, self.attention = make_norm(config), Attention(config)
        self.ffn_norm, self.feed_forward = make_norm(config), FeedForward(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope, pos):
        x = x + self.dropout(self.attention(self.attention_norm(x), rope, pos))
        return x + self.dropout(self.feed_forward(self.ffn_norm(x)))


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (h @ weight.T) against targets (-1 = ignore), a chunk of rows at a time: the (B*T,
    vocab) fp32 logits, a small model's largest allocation, never exist whole. Gradients are computed in forward
    (the loss is a scalar: backward only scales them), the same matmuls as unfused. One log-softmax gives the loss
    and, exponentiated in place, the softmax; ignored rows are masked in the (rows, n_embd) tensors, not the
    (rows, vocab) one, and without a host sync."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows):
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        # a frozen head (LoRA) needs no weight gradient: at healthslm_15m's shape a quarter of a LoRA step's FLOPs
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        grad_h = torch.empty_like(h)
        for s in range(0, h.size(0), chunk_rows):
            hc, tc = h[s:s + chunk_rows], targets[s:s + chunk_rows]
            valid, tc = (tc != -1)[:, None], tc.clamp(min=0)
            logp = torch.log_softmax(hc @ weight.t(), dim=-1, dtype=torch.float32)
            loss -= torch.where(valid, logp.gather(1, tc[:, None]), 0.0).sum()
            probs = logp.exp_()  # becomes d(loss)/d(logits) below
            probs[torch.arange(len(tc), device=h.device), tc] -= 1.0
            probs = probs.to(hc.dtype)
            grad_h[s:s + chunk_rows] = ((probs @ weight.to(hc.dtype)) * valid).to(h.dtype)
            if grad_w is not None:
                grad_w += probs.t() @ (hc * valid)
        n = (targets != -1).sum().clamp(min=1)
        ctx.save_for_backward(grad_h / n, None if grad_w is None else (grad_w / n).to(weight.dtype))
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, None if grad_w is None else grad_w * grad_loss, None, None


def cross_entropy_loss(h, weight, targets, chunk_rows=None):
    h, targets = h.reshape(-1, h.size(-1)), targets.reshape(-1)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        if chunk_rows is None:  # on CPU ~16 MB of logits a chunk: as fast as 2048 rows, and -390 MB at 8 x 256 x 32K
            chunk_rows = 2048 if h.is_cuda else max(1, 2**22 // weight.size(0))
        return FusedLinearCrossEntropy.apply(h, weight, targets, chunk_rows)
    return F.cross_entropy((h @ weight.t()).float(), targets, ignore_index=-1)  # eval: no gradients needed


def target_logprobs(h, weight, targets):
    return torch.log_softmax((h @ weight.t()).float(), dim=-1).gather(1, targets[:, None])[:, 0]


def sequence_logprobs(h, weight, targets, chunk_rows=2048):
    """(B,) the summed fp32 log-probabilities of each row's targets (-1: not counted), DPO's scores of a reply.
    Only counted positions go through the head (a reply is a small part of its sequence; selecting them costs a
    host sync on a GPU), a chunk of rows at a time, recomputed in backward: one chunk's logits exist at a time."""
    counted = targets != -1
    hc, tc = h[counted], targets[counted]
    logp = torch.cat([torch.utils.checkpoint.checkpoint(target_logprobs, hc[s:s + chunk_rows], weight,
                                                        tc[s:s + chunk_rows], use_reentrant=False)
                      for s in range(0, len(tc), chunk_rows)] or [hc.new_zeros(0, dtype=torch.float32)])
    return torch.zeros(targets.shape, dtype=torch.float32, device=h.device).masked_scatter(counted, logp).sum(-1)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.n_embd)
        if config.pos_embedding == 'learned':
            self.pos_embeddings = nn.Embedding(config.block_size, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = make_norm(config)
        self.output = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer('rope', rope_cache(config.block_size, config.head_dim, config.rope_theta),
                             persistent=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if name.endswith('wo.weight') or name.endswith('w2.weight'):  # GPT-2: residual writes scaled by depth
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def get_num_params(self, non_embedding=False):
        # non_embedding: less the lookups (positions, and the token embedding unless the head multiplies by it)
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.config.pos_embedding == 'learned':
            n -= self.pos_embeddings.weight.numel()
        if non_embedding and not self.config.tie_embeddings:
            n -= self.tok_embeddings.weight.numel()
        return n

    def hidden(self, idx, pos=0):
        """Final-normed hidden states (B, T, n_embd) of tokens idx at positions pos..pos+T-1 (pos an int, or for
        a decode step with the KV cache, a (1,) tensor)."""
        B, T = idx.size()
        positions = pos if torch.is_tensor(pos) else torch.arange(pos, pos + T, device=idx.device)
        if not torch.is_tensor(pos) and pos + T > self.config.block_size:  # stream() checks a decode's bounds
            raise ValueError(f'sequence of {pos + T} tokens exceeds block_size {self.config.block_size}')
        x, rope = self.tok_embeddings(idx), None
        if self.config.pos_embedding == 'learned':
            x = x + self.pos_embeddings(positions)
        else:
            rope = self.rope[positions]
        x = self.dropout(x)
        for layer in self.layers:
            x = layer(x, rope, pos)
        return self.norm(x)

    def forward(self, idx, targets=None, pos=0, logprobs=False):
        """With targets: (None, mean loss); the loss is fused with the head, so full logits never exist. With
        targets and logprobs: (None, (B,) summed log-probabilities of each row's targets), for DPO.
        Without: (logits of the last position (B, 1, vocab) in fp32, None)."""
        h = self.hidden(idx, pos)
        if targets is None:
            return self.output(h[:, [-1], :]).float(), None
        if logprobs:
            return None, sequence_logprobs(h, self.output.weight, targets)
        return None, cross_entropy_loss(h, self.output.weight, targets)

    def setup_caches(self, batch_size, max_len):
        # Decoding reads every weight matrix once per token. Stored column-major (same shape and values, the
        # transpose contiguous) a CPU reads them in memory order: the head's matmul 3x faster, a decoding step
        # ~1.2x (eager) to 1.6x (compiled). The layout stays (re-copying costs ~75 ms at healthslm_15m's shape);
        # train() restores row-major. GPUs read both layouts at full speed: no copy there.
        device = self.tok_embeddings.weight.device
        for module in self.modules():
            if device.type == 'cpu' and isinstance(module, nn.Linear) and not module.weight.t().is_contiguous():
                module.weight.data = module.weight.data.t().contiguous().t()
        # the cache holds keys and values as attention makes them: in autocast's dtype under autocast, else in the
        # embedding's (not the head's: an int8 head, quantize.py, holds int8)
        autocast = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if autocast else self.tok_embeddings.weight.dtype
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(batch_size, max_len, self.config.n_kv_head, self.config.head_dim,
                                               dtype, device)

    def clear_caches(self):
        for layer in self.layers:
            layer.attention.kv_cache = None

    def train(self, mode=True):
        if mode:  # back to row-major from setup_caches' layout: the one training's matmuls (and saving) expect
            for module in self.modules():
                if isinstance(module, nn.Linear) and not module.weight.is_contiguous():
                    module.weight.data = module.weight.data.contiguous()
        return super().train(mode)

    @torch.no_grad()
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None, generator=None):
        """Yields the next token of every row (B,) one step at a time, decoding with a KV cache.
        Stops early once every row has produced eos_id (rows that finished keep yielding eos_id)."""
        B, T = idx.size()
        if T + max_new_tokens - 1 > self.config.block_size:  # the last new token is never fed back
            raise ValueError(f'prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds block_size '
                             f'{self.config.block_size} by more than one')
        self.setup_caches(B, T + max_new_tokens - 1)
        try:
            logits, _ = self(idx, pos=0)
            done = torch.zeros(B, dtype=torch.bool, device=idx.device)
            for pos in range(T, T + max_new_tokens):
                next_token = sample_logits(logits[:, -1], temperature, top_k, top_p, generator)
                if eos_id is not None:
                    next_token = next_token.masked_fill(done, eos_id)
                    done |= next_token == eos_id
                yield next_token
                if (eos_id is not None and done.all()) or pos == T + max_new_tokens - 1:
                    break
                logits, _ = self(next_token[:, None], pos=torch.tensor([pos], device=idx.device))
        finally:
            self.clear_caches()

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None, generator=None):
        """Returns idx (B, T) extended by up to max_new_tokens sampled tokens."""
        new = list(self.stream(idx, max_new_tokens, temperature, top_k, top_p, eos_id, generator))
        return torch.cat([idx] + [t[:, None] for t in new], dim=1)


def sample_logits(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Samples one token per row of logits (B, vocab). temperature 0 is argmax. top_k keeps the k highest
    logits (and every logit tied with the k-th); top_p then keeps the smallest set of those whose
    probability reaches top_p."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):  # 0 or None: off
        kth = torch.topk(logits, top_k, dim=-1).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # mass before this token already reaches top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float('-inf'))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
