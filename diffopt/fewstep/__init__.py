"""Few-step sampling: a scheduler's loop unrolled into one module (one graph), fractional
"1.x" schedules whose partial steps run a share of the blocks, and the compensation fitted for
what those partial steps skip."""

from .compensation import Compensation, CompensationFit, fit_compensation
from .joint import train_schedule
from .sampler import initial_noise, sample
from .unroll import Full, Partial, UnrolledSampler, full, partial, scheduler_steps, unroll

__all__ = [
    "Compensation",
    "CompensationFit",
    "Full",
    "Partial",
    "UnrolledSampler",
    "fit_compensation",
    "full",
    "initial_noise",
    "partial",
    "sample",
    "scheduler_steps",
    "train_schedule",
    "unroll",
]
