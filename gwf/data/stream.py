"""The data side of the resume contract (docs/resume.md), shared by every data module."""

from __future__ import annotations

import lightning as L


class SeekableDataModule(L.LightningDataModule):
    """Training data as virtual epochs of ``batches_per_epoch`` batches, epoch e of rank r seeded by (seed, r, e).
    After ``seek(position)`` the next ``train_dataloader()`` yields what an uninterrupted run reads next."""

    position = 0
    batches_per_epoch: int

    def seek(self, position: int) -> None:
        self.position = int(position)

    def replay_point(self) -> tuple[int, int]:
        """(epoch, batches of it already consumed) at the current position."""
        return divmod(self.position, self.batches_per_epoch)
