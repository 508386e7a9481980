"""``ShardDataModule``: the Lightning face of :mod:`pva.data.reader` (shards -> PVA batches)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from pva.checks import (
    NONNEGATIVE,
    NONNEGATIVE_INT,
    POSITIVE_INT,
    PROBABILITY,
    SEED,
    RangeError,
    check_ranges,
)
from pva.data.masks import EVAL_MASKS
from pva.data.reader import PersonStream, ReferenceView, _rank_world, decode_jpeg
from pva.data.schema import Person, read_index
from pva.prompts import MODIFIER_TOKEN


def _select(batch: dict, rows: list[int]) -> dict:
    """The rows ``rows`` of a batch (tensors and lists alike)."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, Tensor) and value.dim() > 0:
            out[key] = value[rows]
        elif isinstance(value, list):
            out[key] = [value[i] for i in rows]
        else:
            out[key] = value
    return out


DATA_RANGES = {
    "batch_size": POSITIVE_INT,
    "max_refs": POSITIVE_INT,
    "min_refs": POSITIVE_INT,
    "flip_ref_prob": PROBABILITY,
    "hflip_prob": PROBABILITY,
    "caption_prob": PROBABILITY,
    "samples_per_epoch": POSITIVE_INT,
    "num_workers": NONNEGATIVE_INT,
    "seed": SEED,
    "decode_cache_mb": NONNEGATIVE,
    "ref_hflip_prob": PROBABILITY,
}
"""The allowed range of each numeric :class:`ShardDataModule` argument (``data.*`` in configs)."""


class ShardDataModule(L.LightningDataModule):
    """CelebAHQ-IDI or photo-folder shards (from ``pva shards build``) as PVA batches.

    Args:
        shards: Folder with ``index.json`` and the ``<split>-NNNNN.tar`` shards.
        batch_size: Samples per batch per device (paper: 2).
        max_refs: Largest number of references K (paper: 5); K is drawn per batch from
            ``min_refs..max_refs`` in training; evaluation uses up to ``max_refs``.
        min_refs: Smallest K (paper: 1).
        flip_ref_prob: Probability of appending a flipped copy of the last reference (0.2).
        ref_hflip_prob: Probability of flipping each training reference (0.5, the reference
            code's ``flip_p``).
        hflip_prob: Probability of flipping a training target (0.5).
        caption_prob: Probability of appending the caption to the prompt (0.5).
        reference_view: ``aligned`` (112x112 ArcFace-aligned crops; set the model's
            ``face_crop: none``) or ``full`` (whole photos at 256; ``face_crop: celebahq``).
        samples_per_epoch: Training samples per epoch over all ranks.
        eval_masks: Mask kinds for validation/test samples (METHOD 8).
        num_workers: DataLoader workers per rank.
        seed: Seed of evaluation masks.
        decode_cache_mb: MiB of decoded photos each worker keeps (least recently used out), so
            a photo revisited as a target or reference is not decoded again; 0 (default) keeps
            none. Worth it when the split fits: 64 px photos with their 112 px aligned faces
            take about 50 KB each (the demo: 1575 training photos, 78 MB).
        modifier_token: The model's learned token in the prompts (``photo of a <token>
            person``); ``train.py`` links it to ``model.pva.modifier_token``, so it is set there.
    """

    def __init__(
        self,
        shards: str,
        batch_size: int = 2,
        max_refs: int = 5,
        min_refs: int = 1,
        flip_ref_prob: float = 0.2,
        hflip_prob: float = 0.5,
        caption_prob: float = 0.5,
        reference_view: ReferenceView = "aligned",
        samples_per_epoch: int = 10000,
        eval_masks: tuple[str, ...] = EVAL_MASKS,
        num_workers: int = 2,
        seed: int = 0,
        decode_cache_mb: float = 0.0,
        ref_hflip_prob: float = 0.5,
        modifier_token: str = MODIFIER_TOKEN,
    ) -> None:
        super().__init__()
        check_ranges("data.", locals(), DATA_RANGES)
        if min_refs > max_refs:
            raise RangeError(
                f"data.min_refs ({min_refs}) must not exceed data.max_refs ({max_refs})"
            )
        self.save_hyperparameters()
        self.index: dict | None = None
        self._skip_counter: Any = None  # a shared multiprocessing.Value, made with the first stream

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_skip_counter"] = None  # shared memory travels to DataLoader workers, not pickles
        return state

    @property
    def skipped_records(self) -> int:
        """Records and samples skipped so far by every stream of this DataModule.

        Counted in every DataLoader worker of this process as it happens: unreadable shard data,
        bad records, members that fail to decode.
        """
        return 0 if self._skip_counter is None else int(self._skip_counter.value)

    def setup(self, stage: str | None = None) -> None:
        """Read ``index.json``."""
        if self.index is None:
            self.index = read_index(self.hparams.shards)

    def shard_urls(self, split: str) -> list[str]:
        """Shard paths of a split."""
        self.setup()
        assert self.index is not None
        names = self.index["splits"].get(split, {}).get("shards", [])
        return [str(Path(self.hparams.shards) / n) for n in names]

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return _rank_world()

    def stream(self, split: str, train: bool = False) -> PersonStream:
        """The :class:`PersonStream` of ``split`` with this module's settings and rank."""
        hp = self.hparams
        urls = self.shard_urls(split)
        if not urls:
            raise ValueError(f"'{hp.shards}' has no {split} shards (see its index.json)")
        rank, world = self._rank_world()
        if self._skip_counter is None:
            import multiprocessing

            self._skip_counter = multiprocessing.Value("q", 0)
        return PersonStream(
            urls,
            train,
            hp.batch_size,
            max_refs=hp.max_refs,
            min_refs=hp.min_refs,
            flip_ref_prob=hp.flip_ref_prob,
            hflip_prob=hp.hflip_prob,
            caption_prob=hp.caption_prob,
            reference_view=hp.reference_view,
            batches_per_epoch=max(1, hp.samples_per_epoch // (hp.batch_size * world)),
            eval_masks=tuple(hp.eval_masks),
            seed=hp.seed,
            rank=rank,
            world_size=world,
            decode_cache_mb=hp.decode_cache_mb,
            ref_hflip_prob=hp.ref_hflip_prob,
            skip_counter=self._skip_counter,
            split=split,
            modifier_token=hp.modifier_token,
        )

    def _loader(self, split: str, train: bool) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            self.stream(split, train),
            batch_size=None,
            num_workers=workers,
            persistent_workers=train and workers > 0,
        )

    def records(self, split: str) -> Iterator[Person]:
        """Every readable person record of ``split`` in shard order, all in this process.

        No rank split; :class:`ShardReadError` when the split has no readable record.
        """
        stream = self.stream(split, False)
        any_record = False
        for person in stream.records(stream.urls):
            any_record = True
            yield person
        if not any_record:
            raise stream.no_samples_error(stream.urls, "no person record could be read")

    def fixed_batches(self, split: str, num_persons: int, batch_size: int) -> list[dict]:
        """Evaluation batches of the first ``num_persons`` persons of a split, on any rank.

        The same on every rank and every call: callbacks use it for fixed validation sets.
        """
        stream = self.stream(split, False)
        stream.rank, stream.world_size, stream.batch_size = 0, 1, batch_size
        keep, batches = [], []
        for batch in stream:
            rows = []
            for b, person in enumerate(batch["person"]):
                if person not in keep and len(keep) < num_persons:
                    keep.append(person)
                if person in keep:
                    rows.append(b)
            if not rows:
                break
            batches.append(_select(batch, rows))
        return batches

    def person_photos(self, split: str, index: int = 0) -> dict:
        """All photos of the ``index``-th person of a split (for a personalization check).

        Returns:
            ``person``; ``images`` (N, 3, S, S) and ``references`` (N, 3, R, R) in [-1, 1] in the
            configured ``reference_view``; ``boxes`` (N wholeface boxes); ``landmarks``
            (N, 68, 2); ``roles`` (N strings).
        """
        stream = self.stream(split, False)
        for k, person in enumerate(self.records(split)):
            if k == index:
                entries = person.meta["images"]
                return {
                    "person": person.meta["person"],
                    "images": torch.stack([decode_jpeg(b) for b in person.img]),
                    "references": torch.stack(
                        [stream.reference(person, i) for i in range(len(entries))]
                    ),
                    "boxes": [e["boxes"]["wholeface"] for e in entries],
                    "landmarks": torch.tensor([e["landmarks"] for e in entries]),
                    "roles": [e.get("role", "any") for e in entries],
                }
        raise IndexError(f"the {split} split has no person #{index}")

    def train_dataloader(self) -> DataLoader:
        """Resampled, infinite stream cut to equal per-rank epochs."""
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        """Deterministic validation batches, disjoint across ranks."""
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        """Deterministic test batches, disjoint across ranks."""
        return self._loader("test", False)
