"""The data side of the resume contract (docs/resume.md), shared by every data module."""

from __future__ import annotations

import lightning as L


class SeekableDataModule(L.LightningDataModule):
    """Training data as an endless stream of virtual epochs of ``batches_per_epoch`` batches, epoch e of rank r
    drawn from a stream seeded by (seed, r, e). After ``seek(position)`` (called on resume with the batches the
    checkpoint consumed) the next ``train_dataloader()`` must yield exactly what an uninterrupted run reads next:
    it replays epoch ``position // batches_per_epoch`` and drops its first ``position % batches_per_epoch`` batches
    (``replay_point``), which costs reading at most one virtual epoch again and no training."""

    position = 0
    batches_per_epoch: int

    def seek(self, position: int) -> None:
        self.position = int(position)

    def replay_point(self) -> tuple[int, int]:
        """(epoch, batches of it already consumed) at the current position."""
        return divmod(self.position, self.batches_per_epoch)
