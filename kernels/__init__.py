"""Triton kernels, their PyTorch reference implementations, and torch.library op registration.

Empty until the rotated 4-bit matmul pass lands; nothing here is imported by `import diffopt`.
"""
