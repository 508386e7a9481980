"""LightningDataModules that turn photos into PVA training batches."""

from datamodules.photos import OnePersonDataset, PersonPhotosDataModule, centre_mask, load_photos
from datamodules.shards import ShardDataModule
from pva.data.reader import PersonStream

__all__ = [
    "OnePersonDataset",
    "PersonPhotosDataModule",
    "PersonStream",
    "ShardDataModule",
    "centre_mask",
    "load_photos",
]
