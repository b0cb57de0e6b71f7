"""Attention ops as an engine computes them, rewritten in a region before export.

**flex_attention.** ``torch.nn.attention.flex_attention`` reaches the graph as
``torch.ops.higher_order.flex_attention`` (its score_mod and mask_mod as subgraphs, its
``BlockMask`` as a tuple of tensors), which torch's ONNX exporter has no translation for. Each call
becomes torch's own dense implementation (``math_attention``: the scores materialized, score_mod
and mask_mod applied element by element, a softmax that gives fully masked rows zeros), with one
change: the mask is the ``BlockMask``'s, as the compiled kernels read it. A key block listed as
partial is masked by mask_mod, one listed as full is unmasked, an unlisted one is masked out
(``BlockMask.to_dense``). torch's eager fallback reads mask_mod only. Where a block mask was built
from its mask_mod (``create_block_mask``) the two agree; where it lists fewer blocks than its
mask_mod keeps (Kandinsky 6 SR's NABLA mask: ``BlockMask.from_kv_blocks`` with no mask_mod), the
engine skips those blocks as a compiled model does, and an eager torch run attends to them.

**bfloat16 attention.** ``scaled_dot_product_attention`` on bfloat16 inputs (Sana-WM casts its
float32 queries, keys and values to bfloat16 for FlashAttention) is computed in float32, its
output rounded to bfloat16: what torch's math kernel computes. torch's default CPU kernel (flash)
also rounds the softmax numerators to bfloat16 before the product with the values, so the two
torch kernels differ by a bfloat16 rounding here and there (1.5e-4 on the tiny Sana-WM's
output). The exporter's own decomposition would keep bfloat16 throughout, rounding the scores
and the softmax too, and onnxruntime's CPU provider has no bfloat16 MatMul, Mul or Softmax
kernel to run it. Only the attention moves to float32: the model's casts around it stand.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from diffopt.passes.graph import example_value


def attention_for_export(module: nn.Module) -> nn.Module:
    """A copy of a region with its flex_attention calls as dense attention and its bfloat16
    attention in float32 (the module docstring); the region itself when it has neither."""
    if not any(_replacement(node) for gm in _graphs(module) for node in gm.graph.nodes):
        return module
    module = copy.deepcopy(module)
    for gm in _graphs(module):
        for node in gm.graph.nodes:
            node.target = _replacement(node) or node.target
        gm.recompile()
    return module


def _graphs(module: nn.Module) -> list[torch.fx.GraphModule]:
    return [gm for gm in module.modules() if isinstance(gm, torch.fx.GraphModule)]


def _replacement(node: torch.fx.Node) -> Any:
    """What `node` calls in an engine, if it changes."""
    if node.op != "call_function":
        return None
    if node.target is torch.ops.higher_order.flex_attention:
        return dense_flex_attention
    if node.target is torch._C._nn.scaled_dot_product_attention:
        query = node.args[0] if node.args else node.kwargs.get("query")
        value = example_value(query) if isinstance(query, torch.fx.Node) else None
        if isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16:
            return attention_in_float32
    return None


def attention_in_float32(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    *args: Any,
    **kwargs: Any,
) -> torch.Tensor:
    """``scaled_dot_product_attention`` in float32 on bfloat16 inputs (a floating mask too), its
    output in their dtype, as torch's math kernel computes it."""

    def up(t: Any) -> Any:
        return t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    out = torch.nn.functional.scaled_dot_product_attention(
        up(query), up(key), up(value), up(attn_mask), *args, **kwargs
    )
    return out.to(query.dtype)


def dense_flex_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_mod: Any,
    block_mask: tuple[Any, ...],
    scale: float,
    kernel_options: dict[str, Any],
    score_mod_other_buffers: tuple[Any, ...] = (),
    mask_mod_other_buffers: tuple[Any, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``flex_attention``'s outputs (the attention, and its log-sum-exp and max scores in base 2,
    as the op returns them) by torch's dense implementation, under the block mask's blocks."""
    from torch._higher_order_ops.flex_attention import math_attention

    num, indices, full_num, full_indices = block_mask[2:6]
    q_block, kv_block, mask_mod = block_mask[-3:]
    batch, heads = query.shape[0], query.shape[1]
    columns = indices.shape[-1]
    partial = _blocks(num, indices, columns).expand(batch, heads, -1, -1)
    full = (
        None
        if full_num is None
        else _blocks(full_num, full_indices, columns).expand(batch, heads, -1, -1)
    )

    def blocked(b: Any, h: Any, q: Any, kv: Any, *buffers: Any) -> Any:
        row, column = q // q_block, kv // kv_block
        keep = partial[b, h, row, column] & mask_mod(b, h, q, kv, *buffers)
        return keep if full is None else keep | full[b, h, row, column]

    return math_attention(
        query,
        key,
        value,
        score_mod,
        (*block_mask[:-1], blocked),
        scale,
        kernel_options,
        score_mod_other_buffers,
        mask_mod_other_buffers,
    )


def _blocks(num: torch.Tensor, indices: torch.Tensor, columns: int) -> torch.Tensor:
    """[..., rows, columns] booleans: which key blocks each query block row lists, the first
    `num` entries of its `indices` (the rest are padding)."""
    listed = torch.arange(indices.shape[-1], device=indices.device) < num[..., None]
    hits = indices[..., None] == torch.arange(columns, device=indices.device)
    return (hits & listed[..., None]).any(-2)
