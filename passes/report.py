"""What a pass says about its run: what it rewrote, where, and what it skipped and why."""

from __future__ import annotations

from dataclasses import dataclass, field


class PassError(RuntimeError):
    """A pass could not apply somewhere and the config asked for `strict=True`."""


@dataclass(frozen=True)
class Entry:
    where: str
    """A region, a node, or both: ``"transformer_blocks.0 / dropout_3"``."""
    what: str


@dataclass
class PassReport:
    """One pass's account of its run."""

    name: str
    rewritten: list[Entry] = field(default_factory=list)
    skipped: list[Entry] = field(default_factory=list)
    """Places the pass would have rewritten but could not, with the reason."""
    notes: list[str] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)
    """Numbers the pass measured, for benchmarks and tools (e.g. bytes saved)."""

    def rewrite(self, where: str, what: str) -> None:
        self.rewritten.append(Entry(where, what))

    def skip(self, where: str, why: str) -> None:
        self.skipped.append(Entry(where, why))

    def raise_if_skipped(self) -> None:
        """Under `strict=True`: the first skip becomes an error naming pass, place and reason."""
        if self.skipped:
            first = self.skipped[0]
            more = f" (and {len(self.skipped) - 1} more)" if len(self.skipped) > 1 else ""
            raise PassError(
                f"pass '{self.name}' could not apply at {first.where}: {first.what}{more}. "
                "Fix the model or config, or pass strict=False to run with it skipped."
            )

    def summary(self) -> str:
        return f"{len(self.rewritten)} rewritten, {len(self.skipped)} skipped"
