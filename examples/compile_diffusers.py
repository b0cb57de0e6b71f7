"""Compile a diffusers denoiser with the diffopt backend and check it against eager.

Run: python examples/compile_diffusers.py [--inner eager|aot_eager|inductor]

No `import diffopt` is needed for torch.compile: the backend is found through its entry point.
"""

import argparse

import torch
from diffusers import SD3Transformer2DModel

parser = argparse.ArgumentParser()
parser.add_argument("--inner", default="inductor", choices=["eager", "aot_eager", "inductor"])
args = parser.parse_args()

model = SD3Transformer2DModel(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=32,
    caption_projection_dim=16,
    pooled_projection_dim=32,
    out_channels=4,
).eval()
inputs = {
    "hidden_states": torch.randn(2, 4, 8, 8),
    "encoder_hidden_states": torch.randn(2, 6, 32),
    "pooled_projections": torch.randn(2, 32),
}

compiled = torch.compile(model, backend="diffopt", options={"inner": args.inner}, fullgraph=True)
with torch.no_grad():
    for t in (999.0, 500.0, 20.0):  # a new timestep value does not recompile
        timestep = torch.full((2,), t)
        expected = model(**inputs, timestep=timestep).sample
        actual = compiled(**inputs, timestep=timestep).sample
        print(f"t={t:5.0f}  max |diffopt - eager| = {(actual - expected).abs().max():.2e}")
