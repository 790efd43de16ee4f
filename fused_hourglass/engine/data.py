"""The data side of a run: which dataset, the resumable order of its batches, and the step that turns a loaded
batch into the model's input and targets on the training device."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from .config import SYNTHETIC_VAL_SEED, TrainConfig


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of indices in a fixed order that is a function of (seed, batch number) alone: epoch e is a random
    permutation of range(n) drawn from a generator seeded with (seed, e), cut into batches (the last incomplete one
    dropped). Iteration starts at batch `start` and runs for ever, so a run resumed at step k sees exactly the
    batches an uninterrupted run sees from step k on. With `num_replicas > 1`, each batch of `batch_size *
    num_replicas` indices is split and replica `rank` takes its share (uneven shares when the global batch does not
    divide)."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, start: int = 0, *, num_replicas: int = 1,
                 rank: int = 0) -> None:
        global_batch = batch_size * num_replicas
        if n < global_batch:
            raise ValueError(f"the data set has {n} samples, fewer than one global batch of {global_batch}")
        self.n, self.batch_size, self.seed, self.start = n, batch_size, int(seed), int(start)
        self.num_replicas, self.rank = num_replicas, rank
        self.per_epoch = n // global_batch

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[list[int]]:
        batch = self.start
        epoch, perm = -1, None
        global_batch = self.batch_size * self.num_replicas
        while True:
            e, k = divmod(batch, self.per_epoch)
            if e != epoch:
                epoch, perm = e, self._permutation(e)
            chunk = perm[k * global_batch:(k + 1) * global_batch]
            yield chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].tolist()
            batch += 1

    def __len__(self) -> int:  # an endless sampler: one epoch's worth, as DataLoader asks
        return self.per_epoch

    def epoch_of(self, batch: int) -> int:
        return batch // self.per_epoch


class SyntheticSource:
    """SyntheticPoses for training (seeded with the run's seed) and held-out images (another seed) for validation."""

    def __init__(self, config: TrainConfig, with_train: bool = True) -> None:
        from ..data import SyntheticPoses

        self.config = config
        self.train_set = SyntheticPoses(config.train_size, config.res, config.seed, config.sigma) if with_train \
            else None
        self.val_set = SyntheticPoses(config.val_size, config.res, SYNTHETIC_VAL_SEED, config.sigma)
        self.collate = None
        self.rank = 0

    def prepare(self, batch: dict[str, Any], device: torch.device, step: int, train: bool = True) -> dict[str, Any]:
        """Images, the targets the loader drew with them (at the run's σ), and ground truth in the crop's (here: the
        image's) pixels."""
        joints = batch["joints"].to(device, non_blocking=True)
        return {"image": batch["image"].to(device, non_blocking=True),
                "heatmaps": batch["heatmaps"].to(device, non_blocking=True), "joints": joints, "gt": joints,
                "normalize": batch["normalize"].to(device), "matrix": None}


class MPIISource:
    """MPIIDataset (decode only) with the port's augmentation done on the batch, on the training device."""

    def __init__(self, config: TrainConfig, with_train: bool = True) -> None:
        from ..data import MPIIAnnotations, MPIIAugment, MPIIDataset, collate_mpii

        self.config = config
        self.train_set = None
        if with_train:
            self.train_set = MPIIDataset(MPIIAnnotations(config.annotations), config.images, train=True)
        val = config.val_annotations or config.annotations
        self.val_set = MPIIDataset(MPIIAnnotations(val), config.images, train=False)
        if len(self.val_set) > config.val_size:
            self.val_set = torch.utils.data.Subset(self.val_set, range(config.val_size))
        self.collate = collate_mpii
        self.rank = 0  # a distributed run's process: its augmentation stream is its own
        self.train_augment = MPIIAugment(config.res, config.res // 4, train=True, sigma=config.sigma)
        self.val_augment = MPIIAugment(config.res, config.res // 4, train=False, sigma=config.sigma)

    def prepare(self, batch: dict[str, Any], device: torch.device, step: int, train: bool = True) -> dict[str, Any]:
        """The batched affine crop (with random rotation, scale, flip and colour in training, drawn from a generator
        seeded with (seed, rank, batch number), so a resumed run draws the same), targets, and the original-pixel
        ground truth."""
        augment = self.train_augment if train else self.val_augment
        generator = None
        if train:
            seed = self.config.seed * 1_000_003 + step + self.rank * 1_000_000_007
            generator = torch.Generator(device=device).manual_seed(seed)
        out = augment(batch, generator=generator, device=device)
        return {"image": out["image"], "heatmaps": out["heatmaps"], "joints": out["joints"],
                "gt": batch["joints"].to(device), "normalize": batch["normalize"].to(device), "matrix": out["matrix"]}


def make_source(config: TrainConfig, with_train: bool = True) -> SyntheticSource | MPIISource:
    """The run's data: training set (unless `with_train` is False) and validation set."""
    return (SyntheticSource if config.data == "synthetic" else MPIISource)(config, with_train)


def _worker_init(worker_id: int) -> None:
    """Loader workers leave SIGINT and SIGTERM to the training process, which stops at a step boundary and then
    shuts them down (a terminal's Ctrl-C and a scheduler's SIGTERM reach the whole process group)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def train_loader(source, config: TrainConfig, start_step: int, *, num_replicas: int = 1, rank: int = 0,
                 pin_memory: bool = False) -> tuple[DataLoader, ResumableBatchSampler]:
    sampler = ResumableBatchSampler(len(source.train_set), config.batch_size, config.seed, start_step,
                                    num_replicas=num_replicas, rank=rank)
    loader = DataLoader(source.train_set, batch_sampler=sampler, num_workers=config.workers,
                        collate_fn=source.collate, pin_memory=pin_memory,
                        persistent_workers=config.workers > 0, prefetch_factor=4 if config.workers > 0 else None,
                        generator=torch.Generator().manual_seed(config.seed),
                        worker_init_fn=_worker_init if config.workers > 0 else None)
    return loader, sampler


def val_loader(source, config: TrainConfig, batch_size: int | None = None) -> DataLoader:
    return DataLoader(source.val_set, batch_size=batch_size or max(config.batch_size, 32), shuffle=False,
                      num_workers=0, collate_fn=source.collate)
