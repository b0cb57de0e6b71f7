"""Inspect a tiny diffusers DiT: regions, input roles, what each pass rewrote, code before/after.

Run: python examples/inspect_tiny.py  (prints the report, writes inspect_tiny.html)
"""

import torch
from diffusers import DiTTransformer2DModel

import diffopt

model = DiTTransformer2DModel(
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=4,
    out_channels=8,
    num_layers=3,
    sample_size=8,
    patch_size=2,
    num_embeds_ada_norm=10,
).eval()
inputs = {
    "hidden_states": torch.randn(2, 4, 8, 8),
    "timestep": torch.tensor([10.0, 500.0]),
    "class_labels": torch.tensor([1, 2]),
    "return_dict": False,
}

report = diffopt.inspect(model, inputs, diffopt.Config(inner="eager"))
print(report)
print("blocks:", [block.name for block in report.blocks])
print("wrote", report.save_html("inspect_tiny.html"))
