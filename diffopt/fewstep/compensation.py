"""The compensation of a partial step, and `diffopt.fit_compensation` that fits it.

A partial step reuses the residual its skipped blocks produced one step earlier; between the two
steps the latents moved, so that residual is stale in a systematic way (its scale and mean per
channel drift with the timestep). One small map per partial step corrects it: per-channel affine,
optionally plus a low-rank linear map, fit in closed form by least squares on the sampler's own
trajectory (the inputs the partial step really sees, not the teacher's).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from diffopt.config import ConfigError

if TYPE_CHECKING:
    from .sampler import Conditioning
    from .unroll import UnrolledSampler


class Compensation(nn.Module):
    """``r ↦ r · scale + shift + (r · down) · up`` over the last (channel) dimension.

    Starts as the identity: an unfit partial step reuses the residual as it was.
    """

    def __init__(self, width: int, *, kind: str = "affine", rank: int = 8) -> None:
        super().__init__()
        if kind not in ("affine", "lowrank"):
            raise ConfigError(f"compensation must be 'affine' or 'lowrank', not {kind!r}")
        self.kind = kind
        self.scale = nn.Parameter(torch.ones(width), requires_grad=False)
        self.shift = nn.Parameter(torch.zeros(width), requires_grad=False)
        rank = rank if kind == "lowrank" else 0
        self.down = nn.Parameter(torch.zeros(width, rank), requires_grad=False)
        self.up = nn.Parameter(torch.zeros(rank, width), requires_grad=False)

    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        out = residual * self.scale + self.shift
        return out + (residual @ self.down) @ self.up if self.down.shape[1] else out

    @torch.no_grad()
    def fit(
        self, reused: torch.Tensor, target: torch.Tensor, ridge: float = 1e-3, group: Any = None
    ) -> None:
        """Least squares from `reused` to `target` residuals ([..., width] each).

        `ridge` is relative to the mean variance of `reused`: an absolute one shrinks the map
        toward zero on a model whose residuals are small (tiny-flux's: variance 4e-4 against
        1e-3), to an error above the identity's it starts from. With `group` (context
        parallelism: each rank holds a shard of the tokens) the sums are taken over every
        rank's rows, so all ranks fit the map one process fits.
        """
        x = reused.reshape(-1, reused.shape[-1]).double()
        y = target.reshape(-1, target.shape[-1]).double()
        width, low_rank = x.shape[1], self.down.shape[1] > 0
        sums = [torch.tensor([float(len(x))], dtype=x.dtype), x.sum(0), y.sum(0)]
        sums += [x.T @ x, x.T @ y] if low_rank else [x.pow(2).sum(0), (x * y).sum(0)]
        if group is not None:
            flat = torch.cat([t.reshape(-1) for t in sums])
            torch.distributed.all_reduce(flat, group=group)
            sums = list(flat.split([t.numel() for t in sums]))  # reshaped below
        n, x_sum, y_sum, xx, xy = sums
        n = n.reshape(())
        x_mean, y_mean = x_sum.reshape(width) / n, y_sum.reshape(width) / n
        if low_rank:
            xx, xy = xx.reshape(width, width), xy.reshape(width, width)
            gram = xx - n * torch.outer(x_mean, x_mean)  # centered XᵀX and XᵀY
            cross = xy - n * torch.outer(x_mean, y_mean)
            variance = torch.diagonal(gram)
        else:
            variance = xx.reshape(width) - n * x_mean.pow(2)
            cross = xy.reshape(width) - n * x_mean * y_mean
        penalty = ridge * variance.mean()
        if low_rank:
            # the least-squares linear map, split as diagonal + rank r by alternating the two
            linear = torch.linalg.solve(gram + penalty * torch.eye(width, dtype=x.dtype), cross)
            low = torch.zeros_like(linear)
            rank = self.down.shape[1]
            for _ in range(50):
                scale = torch.diagonal(linear - low)
                u, s, vh = torch.linalg.svd(linear - torch.diag(scale))
                low = (u[:, :rank] * s[:rank]) @ vh[:rank]
            self.down.copy_(u[:, :rank] * s[:rank])
            self.up.copy_(vh[:rank])
        else:
            scale = cross / (variance + penalty)
        low_rank_of_mean = x_mean @ self.down.double() @ self.up.double()
        self.scale.copy_(scale)
        self.shift.copy_(y_mean - x_mean * scale - low_rank_of_mean)


@dataclass
class CompensationFit:
    """How well each partial step's reused residual matches the blocks it skips."""

    steps: dict[int, tuple[float, float]]
    """Partial step index → relative error of the residual before and after the fit."""

    def table(self) -> str:
        from tabulate import tabulate

        rows = [[i, f"{b:.4f}", f"{a:.4f}"] for i, (b, a) in self.steps.items()]
        return tabulate(rows, ["partial step", "error before", "error after"], tablefmt="github")


def fit_compensation(
    sampler: UnrolledSampler,
    latents: torch.Tensor,
    cond: Conditioning,
    uncond: Conditioning | None = None,
    noise: torch.Tensor | None = None,
    *,
    concat: torch.Tensor | None = None,
) -> CompensationFit:
    """Fit every partial step's compensation on calibration inputs, in schedule order
    (`concat`: the sampler's image-to-video channels, as its forward takes them).

    Each partial step is fit on the trajectory the sampler really takes: earlier partial steps
    already use their fitted compensation. Returns the residual errors before and after.
    """
    partial_steps = [int(i) for i in sampler.compensation]
    if not partial_steps:
        raise ConfigError("the schedule has no partial step: nothing to compensate")
    errors = {}
    for i in partial_steps:
        with torch.no_grad():
            _, (reused, target) = sampler._run(
                latents, cond, uncond, noise, collect=i, concat=concat
            )
        compensation = sampler.compensation[str(i)]
        before = _relative_error(compensation(reused), target)
        compensation.fit(reused, target, group=sampler.group)
        errors[i] = (before, _relative_error(compensation(reused), target))
    return CompensationFit(errors)


def _relative_error(estimate: torch.Tensor, target: torch.Tensor) -> float:
    return ((estimate - target).norm() / target.norm()).item()


def save_compensation(sampler: UnrolledSampler, path: str | Path) -> Path:
    """Write the fitted compensation with the schedule it belongs to (safetensors)."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file(sampler.compensation.state_dict(), path, metadata=_schedule_metadata(sampler))
    return path


def load_compensation(sampler: UnrolledSampler, path: str | Path) -> None:
    """Load compensation written by `save_compensation`; refuses one fit for another schedule,
    model class, guidance scale or compensation form."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        saved = f.metadata() or {}
    expected = _schedule_metadata(sampler)
    different = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
    if different:
        what = "; ".join(
            f"{k}: fit for {a!r}, this sampler has {b!r}" for k, (a, b) in different.items()
        )
        raise ConfigError(f"{path} was fit for another sampler ({what}); fit it again")
    sampler.compensation.load_state_dict(load_file(str(path)))


def _schedule_metadata(sampler: UnrolledSampler) -> dict[str, str]:
    """What a fit depends on: the schedule, the model, the guidance and the map's form."""
    first = next(iter(sampler.compensation.values()), None)
    return {
        "schedule": sampler.describe(),
        "denoiser": type(sampler.denoiser).__name__,
        "guidance": str(sampler.guidance),
        "compensation": "" if first is None else f"{first.kind}, rank {first.down.shape[1]}",
    }
