"""flex_attention in an engine: the higher-order op written as dense attention before export.

``torch.nn.attention.flex_attention`` reaches the graph as ``torch.ops.higher_order.flex_attention``
(its score_mod and mask_mod as subgraphs, its ``BlockMask`` as a tuple of tensors), which torch's
ONNX exporter has no translation for. Before a region is written, each call becomes torch's own
dense implementation (``math_attention``: the scores materialized, score_mod and mask_mod applied
element by element, a softmax that gives fully masked rows zeros), with one change: the mask is
the ``BlockMask``'s, as the compiled kernels read it. A key block listed as partial is masked by
mask_mod, one listed as full is unmasked, an unlisted one is masked out (``BlockMask.to_dense``).

torch's eager fallback reads mask_mod only. Where a block mask was built from its mask_mod
(``create_block_mask``) the two agree; where it lists fewer blocks than its mask_mod keeps
(Kandinsky 6 SR's NABLA mask: ``BlockMask.from_kv_blocks`` with no mask_mod), the engine skips
those blocks as a compiled model does, and an eager torch run attends to them.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def with_dense_flex_attention(module: nn.Module) -> nn.Module:
    """A copy of a region whose flex_attention calls are dense attention (the module docstring);
    the region itself when it has none."""
    hop = torch.ops.higher_order.flex_attention
    if not any(
        n.target is hop
        for gm in module.modules()
        if isinstance(gm, torch.fx.GraphModule)
        for n in gm.graph.nodes
    ):
        return module
    module = copy.deepcopy(module)
    for gm in module.modules():
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        for node in gm.graph.nodes:
            if node.target is hop:
                node.target = dense_flex_attention
        gm.recompile()
    return module


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
