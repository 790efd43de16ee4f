"""Data sets that return raw samples: `SyntheticPoses` (the embedded default, drawn on the fly) and the MPII Human
Pose loader (`MPIIAnnotations`, `MPIIDataset`, which only decodes images, and `MPIIAugment`, the port's
augmentation as one batched affine warp on the training device)."""

from .augment import MPIIAugment
from .mpii import MPIIAnnotations, MPIIDataset, collate_mpii
from .synthetic import SyntheticPoses

__all__ = ["SyntheticPoses", "MPIIAnnotations", "MPIIDataset", "MPIIAugment", "collate_mpii"]
