"""The JKO schedule in updates ([GWF] Eq. 25; docs/conventions.md). Torch-free: the entry point reads it before
anything heavy is imported (a finished run returns at once)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class JKOSchedule:
    """``steps`` JKO steps of ``updates_per_step`` updates each, the first of ``updates_first_step`` (None: the
    same); an update is one generator update of the training loop."""

    steps: int
    updates_per_step: int
    updates_first_step: int | None = None

    def __post_init__(self):
        if self.steps < 1 or self.first < 1 or (self.steps > 1 and self.updates_per_step < 1):
            raise ValueError(f"the JKO schedule needs jko.steps >= 1 and positive update counts, "
                             f"got steps={self.steps}, "
                             f"updates_first_step={self.updates_first_step}, updates_per_step={self.updates_per_step}")

    @classmethod
    def from_config(cls, jko) -> "JKOSchedule":
        """The schedule of a config's ``jko`` node (a dict or DictConfig)."""
        first = jko.get("updates_first_step")
        return cls(int(jko["steps"]), int(jko["updates_per_step"]), None if first is None else int(first))

    @property
    def first(self) -> int:
        return self.updates_per_step if self.updates_first_step is None else self.updates_first_step

    @property
    def total_updates(self) -> int:
        return self.first + (self.steps - 1) * self.updates_per_step

    def locate(self, update: int) -> tuple[int, int]:
        """(JKO step k, update within it) of the 0-based update number ``update``."""
        if update < self.first:
            return 0, update
        rest = update - self.first
        return 1 + rest // self.updates_per_step, rest % self.updates_per_step

    def ends_outer_step(self, update: int) -> bool:
        """True when ``update`` is the last update of its JKO step."""
        k, i = self.locate(update)
        return i == (self.first if k == 0 else self.updates_per_step) - 1
