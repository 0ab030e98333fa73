"""Byte-level next-token prediction over real text that every machine has: no tokenizer, no download.

By default the corpus is the running Python's standard library source (``*.py`` under
``sysconfig``'s ``stdlib`` path, several megabytes of real code and docstrings). Files are
listed in sorted order and assigned to train or validation by a hash of their relative path,
so the split is deterministic and no file is in both.
"""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Optional, Union

import lightning.pytorch as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

VOCAB_SIZE = 256  # bytes


class ByteWindows(Dataset):
    """Non-overlapping windows of ``seq_len + 1`` bytes: ``(inputs, targets)`` shifted by one."""

    def __init__(self, data: Tensor, seq_len: int) -> None:
        if data.numel() < seq_len + 1:
            raise ValueError(f"seq_len={seq_len} is longer than this split of the corpus ({data.numel()} bytes)")
        self.data, self.seq_len = data, seq_len

    def __len__(self) -> int:
        return (self.data.numel() - 1) // self.seq_len

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        chunk = self.data[i * self.seq_len : (i + 1) * self.seq_len + 1].long()
        return chunk[:-1], chunk[1:]


class EpochOrder(DistributedSampler):
    """Every window once per pass over the data, in an order drawn from ``(seed, pass)`` alone: a
    resumed run draws the same order again. ``skip`` leaves out this rank's first indices of the
    next iteration.

    Under DDP each of ``num_replicas`` ranks takes every ``num_replicas``-th index of the pass's
    order (the tail that does not divide evenly is dropped, as ``DistributedSampler(drop_last=True)``
    does); being a ``DistributedSampler``, Lightning keeps it instead of injecting its own. Passes
    are counted by :class:`ResumableLoader`, not by Lightning's epochs (``set_epoch`` is ignored).
    """

    def __init__(self, n: int, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.n, self.passes, self.skip = n, 0, 0

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return self.n // self.num_replicas

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.passes) % 2**63)
        order = torch.randperm(self.n, generator=generator)[: len(self) * self.num_replicas]
        skip, self.skip = self.skip, 0
        yield from order[self.rank :: self.num_replicas][skip:].tolist()


class ResumableLoader(DataLoader):
    """A shuffling training loader that continues where training stopped: each iteration starts
    at the batch an uninterrupted run would take next, after the batches trained so far.

    Those are the trainer's own count (``trainer``, set by :class:`ByteTextDataModule`, whose
    count Lightning saves and restores; Lightning fetches a batch ahead, so what was yielded is not
    what was trained), else the batches this loader yielded. The shuffling seed (and, without a
    trainer, the count) is its ``state_dict``, which Lightning stores in checkpoints. Passes over
    the data are its own: Lightning starts a new epoch when a run stops at ``max_steps`` and
    resumes, this loader does not. Batches are full (``drop_last``); ``len`` is a whole pass's.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, num_workers: int = 0, num_replicas: int = 1,
                 rank: int = 0) -> None:
        sampler = EpochOrder(len(dataset), seed, num_replicas, rank)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=num_workers)
        self.trainer: Optional[L.Trainer] = None
        self._yielded = 0

    def trained(self) -> int:
        """Batches trained on so far, over every pass."""
        if self.trainer is None:
            return self._yielded
        return self.trainer.fit_loop.epoch_loop.batch_progress.total.processed

    def __iter__(self) -> Iterator[Any]:
        self.sampler.passes, skip = divmod(self.trained(), len(self))
        self.sampler.skip = skip * self.batch_size
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.sampler.seed, "batches": self.trained()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.seed, self._yielded = state["seed"], state["batches"]


def _is_text(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(8192)
    return bool(head) and b"\0" not in head


def _in_validation(relative: str, val_fraction: float) -> bool:
    return zlib.crc32(relative.encode()) % 10_000 < val_fraction * 10_000


class ByteTextDataModule(L.LightningDataModule):
    """Byte-level language-modelling data.

    Args:
        path: a text file or a directory of text files (binary files are skipped); default:
            the standard library's ``*.py`` files.
        glob: only the files under ``path`` (or the standard library) matching this pattern,
            relative to it (``"**/*.md"``, ``"pydoc_data/topics.py"``); default: all of them.
            When it matches a single file, that file's tail is held out for validation.
        seq_len: tokens (bytes) per training sequence.
        batch_size: sequences per batch.
        val_fraction: share of files held out (chosen by a hash of each file's name); for a single
            file, or files too few for that to pick some but not all, the corpus's tail instead.
        max_bytes: cap on each split's size (the first bytes in file order); ``None``: all.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        path: Optional[Union[str, Path]] = None,
        glob: Optional[str] = None,
        seq_len: int = 128,
        batch_size: int = 32,
        val_fraction: float = 0.05,
        max_bytes: Optional[int] = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.path = Path(path).expanduser() if path is not None else None
        self.glob = glob
        self.seq_len, self.batch_size = seq_len, batch_size
        self.val_fraction, self.max_bytes, self.num_workers = val_fraction, max_bytes, num_workers
        self.train_data: Optional[Tensor] = None
        self.val_data: Optional[Tensor] = None
        self.train_files: list[str] = []
        self.val_files: list[str] = []

    def files(self) -> tuple[Path, list[Path]]:
        """The corpus root and its text files, sorted."""
        if self.path is None:
            root = Path(sysconfig.get_paths()["stdlib"])
            files = sorted(p for p in root.glob(self.glob or "**/*.py") if "site-packages" not in p.parts)
        elif not self.path.exists():
            raise FileNotFoundError(f"corpus path {str(self.path)!r} does not exist")
        elif self.path.is_file():
            if self.glob:
                raise ValueError(f"glob={self.glob!r} selects files in a directory, but path {str(self.path)!r} is a file")
            if self.path.stat().st_size and not _is_text(self.path):
                raise ValueError(f"{str(self.path)!r} is a binary file (a NUL byte in its first 8 KiB), not text")
            root, files = self.path.parent, [self.path]
        else:
            root = self.path
            files = sorted(p for p in root.glob(self.glob or "**/*") if p.is_file() and _is_text(p))
        files = [f for f in files if f.is_file() and f.stat().st_size > 0]
        if not files:
            matching = f" matching glob={self.glob!r}" if self.glob else ""
            raise ValueError(f"no non-empty text files{matching} under {str(self.path or root)!r}")
        return root, files

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_data is not None:
            return
        root, files = self.files()
        names = [f.relative_to(root).as_posix() for f in files] if len(files) > 1 else [files[0].name]
        val = [_in_validation(name, self.val_fraction) for name in names]
        if all(val) or not any(val):  # one file, or too few for a split by file: hold out the tail
            data = self._concat(files, cap=False)
            cut = int(data.numel() * (1 - self.val_fraction))
            self.train_files = self.val_files = names
            self.train_data, self.val_data = data[:cut][: self.max_bytes], data[cut:][: self.max_bytes]
        else:
            self.train_files = [n for n, v in zip(names, val) if not v]
            self.val_files = [n for n, v in zip(names, val) if v]
            self.train_data = self._concat([f for f, v in zip(files, val) if not v])
            self.val_data = self._concat([f for f, v in zip(files, val) if v])
        for name, data in (("training", self.train_data), ("validation", self.val_data)):
            if data.numel() < self.seq_len + 1:
                raise ValueError(
                    f"seq_len={self.seq_len} is longer than the {name} split ({data.numel()} bytes); "
                    "use a shorter seq_len or a larger corpus"
                )

    def _concat(self, files: list[Path], cap: bool = True) -> Tensor:
        """The files' bytes in order; with ``cap``, the first ``max_bytes`` of them."""
        chunks, total = [], 0
        for f in files:
            if cap and self.max_bytes is not None and total >= self.max_bytes:
                break
            blob = f.read_bytes()
            chunks.append(blob)
            total += len(blob)
        data = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
        return data[: self.max_bytes] if cap and self.max_bytes is not None else data

    def unigram_bits_per_byte(self) -> float:
        """Entropy of the training split's byte frequencies: the loss of a model that ignores context."""
        self.setup()
        counts = torch.bincount(self.train_data.long(), minlength=VOCAB_SIZE).double()
        p = counts[counts > 0] / counts.sum()
        return float(-(p * p.log2()).sum())

    def train_dataloader(self) -> DataLoader:
        """Shuffled full batches, resumable mid-epoch (:class:`ResumableLoader`); the order follows the
        global seed (``seed_everything``) and is saved in checkpoints."""
        self.setup()
        trainer = self.trainer  # set by Lightning when it fits this data module; None otherwise
        ranks = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        loader = ResumableLoader(ByteWindows(self.train_data, self.seq_len), self.batch_size, torch.initial_seed(),
                                 self.num_workers, *ranks)
        loader.trainer = trainer
        return loader

    def val_dataloader(self) -> DataLoader:
        return DataLoader(ByteWindows(self.val_data, self.seq_len), batch_size=self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
