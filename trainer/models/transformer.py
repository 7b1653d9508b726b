"""A decoder-only causal transformer language model (GPT-2 style) in flax.linen.

Token and learned position embeddings, pre-LayerNorm blocks of causal self-attention
(`jax.nn.dot_product_attention(..., is_causal=True)`) and a GELU MLP, a final LayerNorm
and a head tied to the token embedding (or a separate one). `dtype` is the compute
dtype (bfloat16 for accelerators); parameters stay float32 and the logits are returned
as float32, so the trainer's cross-entropy is computed at full precision.

Input `[B, T]` int32 tokens with T <= seq_len; output `[B, T, vocab_size]` logits.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_ATTENTION = {"xla": "xla", "cudnn": "cudnn", "auto": None}


def compute_dtype(name: str):
  """The jnp dtype for a config name (`float32` | `bfloat16`); KeyError otherwise."""
  return _DTYPES[name]


def attention_implementation(name: str):
  """`jax.nn.dot_product_attention`'s implementation for a config name; KeyError otherwise."""
  return _ATTENTION[name]


class Block(nn.Module):
  """Pre-LN block: x + attn(ln(x)), then x + mlp(ln(x))."""

  num_heads: int
  mlp_ratio: int
  residual_scale: float
  dtype: Any = jnp.float32
  attention: str | None = "xla"

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    head_dim = d // self.num_heads
    init = nn.initializers.normal(0.02)
    out_init = nn.initializers.normal(0.02 * self.residual_scale)
    h = nn.LayerNorm(dtype=self.dtype, name="ln_1")(x)
    qkv = nn.DenseGeneral((3, self.num_heads, head_dim), dtype=self.dtype, kernel_init=init,
                          name="qkv")(h)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each [B, T, heads, head_dim]
    y = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=self.attention)
    x = x + nn.DenseGeneral(d, axis=(-2, -1), dtype=self.dtype, kernel_init=out_init,
                            name="proj")(y)
    h = nn.LayerNorm(dtype=self.dtype, name="ln_2")(x)
    h = nn.gelu(nn.Dense(self.mlp_ratio * d, dtype=self.dtype, kernel_init=init, name="fc")(h))
    return x + nn.Dense(d, dtype=self.dtype, kernel_init=out_init, name="out")(h)


class TransformerLM(nn.Module):
  """GPT-2-style decoder-only language model."""

  vocab_size: int
  seq_len: int
  d_model: int
  num_layers: int
  num_heads: int
  mlp_ratio: int = 4
  tie_embeddings: bool = True
  dtype: Any = jnp.float32
  attention: str | None = "xla"

  @nn.compact
  def __call__(self, tokens):
    if tokens.ndim != 2 or tokens.shape[1] > self.seq_len:
      raise ValueError(f"expected int tokens [batch, T <= {self.seq_len}], got {tokens.shape}")
    if self.d_model % self.num_heads:
      raise ValueError(f"d_model={self.d_model} is not a multiple of num_heads={self.num_heads}")
    embed = nn.Embed(self.vocab_size, self.d_model, dtype=self.dtype,
                     embedding_init=nn.initializers.normal(0.02), name="wte")
    wpe = self.param("wpe", nn.initializers.normal(0.01), (self.seq_len, self.d_model))
    x = embed(tokens.astype(jnp.int32)) + wpe[:tokens.shape[1]].astype(self.dtype)
    # GPT-2 scales the init of the layers that write into the residual stream.
    scale = 1.0 / math.sqrt(2 * self.num_layers)
    for i in range(self.num_layers):
      x = Block(self.num_heads, self.mlp_ratio, scale, self.dtype, self.attention,
                name=f"block_{i}")(x)
    x = nn.LayerNorm(dtype=self.dtype, name="ln_f")(x)
    if self.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = nn.Dense(self.vocab_size, use_bias=False, dtype=self.dtype,
                        kernel_init=nn.initializers.normal(0.02), name="head")(x)
    return logits.astype(jnp.float32)


def num_params(params) -> int:
  return sum(int(p.size) for p in jax.tree.leaves(params))


def flops_per_token(*, num_params: int, num_layers: int, d_model: int, seq_len: int,
                    causal: bool = True) -> float:
  """Training FLOPs per token: 6 N + attention (llm.c / MaxText-style when causal).

  `causal=True` counts the attention score and value matmuls once for the causal half
  (6 L d T, as llm.c and MaxText since 2025); `causal=False` is the PaLM / nanoGPT
  convention (12 L d T). N counts every parameter once (the tied head included).
  """
  attention = (6 if causal else 12) * num_layers * d_model * seq_len
  return 6.0 * num_params + attention
