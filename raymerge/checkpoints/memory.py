"""A checkpoint source over tensors already in memory (search workers keep their layers' inputs).

Search trials re-merge the same input tensors many times; reading them once into memory and
serving them through the ordinary `CheckpointSource` interface means a trial runs exactly the
code a merge runs (`runtime.compute.compute_operator`), so in-memory results equal a merge's.
"""

from __future__ import annotations

from typing import Optional

import torch

from raymerge.checkpoints.source import CheckpointError, CheckpointSource, TensorInfo


class MemorySource(CheckpointSource):
    def __init__(self, location: str, tensors: dict[str, torch.Tensor], infos: dict[str, TensorInfo]) -> None:
        self.location = location
        self._tensors = tensors
        self._infos = {n: infos[n] for n in tensors}

    def tensors(self) -> dict[str, TensorInfo]:
        return dict(self._infos)

    def read(self, name: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        try:
            t = self._tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.location}: tensor {name} is not held in memory by this worker") from None
        return t if rows is None else t[rows[0] : rows[1]]

    def read_bytes(self, filename: str) -> Optional[bytes]:
        return None
