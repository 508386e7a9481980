"""LightningDataModules that turn photos into PVA training batches."""

from datamodules.photos import OnePersonDataset, PersonPhotosDataModule, centre_mask, load_photos

__all__ = ["OnePersonDataset", "PersonPhotosDataModule", "centre_mask", "load_photos"]
