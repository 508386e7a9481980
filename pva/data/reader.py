"""Read shards as PVA training / evaluation batches (METHOD 6, 8); no Lightning here.

Training: shards are resampled forever; every person record visited yields each of its photos as
a target once (in random order) with references drawn from that person's OTHER photos; each rank
yields exactly ``samples_per_epoch // (batch_size * world_size)`` batches per epoch, so DDP ranks
never wait on each other. Evaluation (val/test): shards are read in order and person records are
dealt round-robin to ``rank x worker`` slots, so ranks see disjoint person sets whose union is the
whole split, identically on every run.

Records are checked by :func:`pva.data.schema.parse_record` (only the schema's members, nothing
unpickled); a record with any other member or a corrupt member is skipped with a warning,
counted, and never decoded. When a split yields nothing at all
(every shard unreadable, every record skipped), the stream stops with :class:`ShardReadError`
naming each shard and why its records were skipped, instead of waiting forever (training) or
yielding no batch (evaluation).

A batch is a dict: ``image`` (B, 3, S, S) and ``masked_image`` in [-1, 1]; ``mask`` (B, 1, S, S),
1 = fill; ``references`` (B, K, 3, R, R) in [-1, 1] with ``reference_mask`` (B, K) bool;
``landmarks`` (B, 68, 2) in the image's pixels; ``prompt``, ``person``, ``file``,
``mask_region`` (B strings each); ``skipped`` (the records skipped by this worker since its
previous batch; an evaluation stream holds each full batch back until the next one is complete
or the split ends, so the last batch also counts what was skipped after its samples).
A shared counter (``skip_counter``; :attr:`datamodules.ShardDataModule.skipped_records`)
counts every skip of every worker as it happens.
"""

from __future__ import annotations

import io
import logging
import random
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from pva.data.masks import EVAL_MASKS, eval_mask, flip_box, training_mask
from pva.data.schema import BadRecordError, Person, parse_record
from pva.objective import make_batch
from pva.prompts import MODIFIER_TOKEN, conditional_prompt

log = logging.getLogger(__name__)


ReferenceView = Literal["aligned", "full"]


class ShardReadError(RuntimeError):
    """A split that yields no sample at all; the message names its shards and the reasons."""


def decode_jpeg_uint8(data: bytes, size: int | None = None) -> Tensor:
    """JPEG bytes -> (3, H, W) uint8 (optionally resized to ``size``)."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        arr = np.array(im, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(arr).permute(2, 0, 1)


def to_unit_range(pixels: Tensor) -> Tensor:
    """uint8 pixels -> float32 in [-1, 1] (``p / 127.5 - 1``)."""
    return pixels.float() / 127.5 - 1.0


def decode_jpeg(data: bytes, size: int | None = None) -> Tensor:
    """JPEG bytes -> (3, H, W) float in [-1, 1] (optionally resized to ``size``)."""
    return to_unit_range(decode_jpeg_uint8(data, size))


class DecodedCache:
    """A least-recently-used cache of decoded photos (uint8), bounded in bytes.

    Small training sets revisit every photo many times (the demo's 1575 training photos about
    six times in 1200 steps, each also as a reference of its person's other photos); decoding
    their JPEGs is most of a batch's data cost. Each DataLoader worker holds its own cache, so
    the memory bound applies per worker.

    Args:
        max_bytes: Capacity; 0 disables caching (every lookup decodes).
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"decode cache size must be >= 0, got {max_bytes} bytes")
        self.max_bytes, self.bytes = max_bytes, 0
        self._items: OrderedDict[str, Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str, data: bytes, size: int | None = None) -> Tensor:
        """The photo ``key`` as (3, H, W) float in [-1, 1], decoding ``data`` on a miss."""
        pixels = self._items.get(key)
        if pixels is not None:
            self._items.move_to_end(key)
            return to_unit_range(pixels)
        pixels = decode_jpeg_uint8(data, size)
        nbytes = pixels.numel()
        if 0 < nbytes <= self.max_bytes:
            while self.bytes + nbytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.bytes -= old.numel()
            self._items[key] = pixels
            self.bytes += nbytes
        return to_unit_range(pixels)


def toggle_flip(key: str) -> str:
    """The cache key of a photo key's mirror image (``x`` <-> ``x/flip``)."""
    return key.removesuffix("/flip") if key.endswith("/flip") else key + "/flip"


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class PersonStream(IterableDataset):
    """The stream behind :class:`ShardDataModule` (see the module docstring).

    Args:
        urls: Shard paths.
        train: Training stream (resampled, random masks) or evaluation stream.
        batch_size: Samples per batch.
        max_refs: Largest K; a training batch draws K from ``min_refs..max_refs``.
        min_refs: Smallest K.
        flip_ref_prob: Probability of appending a flipped copy of a sample's last reference.
        ref_hflip_prob: Probability of flipping each training reference (the reference code's
            ``flip_p=0.5``, ``lib/dataset.py:428-430``).
        hflip_prob: Probability of flipping the training target.
        caption_prob: Probability of ``template + ". " + caption`` instead of the template.
        reference_view: ``aligned``: 112x112 ArcFace-aligned crops (use with
            ``face_crop: none``). ``full``: the stored S x S photos resized to 256 (use with
            ``face_crop: celebahq``, the paper's preprocessing on CelebA-HQ).
        batches_per_epoch: Training batches per rank per epoch.
        eval_masks: Evaluation mask kinds; each eval target yields one sample per kind.
        seed: Base seed.
        rank: This process's rank (taken from the trainer by the DataModule).
        world_size: Number of ranks.
        decode_cache_mb: Decoded photos kept per worker (:class:`DecodedCache`), in MiB;
            0 decodes every use.
        skip_counter: A shared ``multiprocessing.Value`` that every skip increments (across
            DataLoader workers); ``None``: only the per-batch ``skipped`` counts.
        split: The split's name, for messages.
        modifier_token: The model's learned token (``PVAConfig.modifier_token``) in prompts.
    """

    def __init__(
        self,
        urls: list[str],
        train: bool,
        batch_size: int,
        max_refs: int = 5,
        min_refs: int = 1,
        flip_ref_prob: float = 0.2,
        hflip_prob: float = 0.5,
        caption_prob: float = 0.5,
        reference_view: ReferenceView = "aligned",
        batches_per_epoch: int = 1000,
        ref_hflip_prob: float = 0.5,
        eval_masks: tuple[str, ...] = EVAL_MASKS,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        decode_cache_mb: float = 0.0,
        skip_counter: Any = None,
        split: str = "",
        modifier_token: str = MODIFIER_TOKEN,
    ) -> None:
        super().__init__()
        if not urls:
            raise ValueError("no shards to read")
        self.skip_counter, self.split, self.modifier_token = skip_counter, split, modifier_token
        self._reasons: dict[str, tuple[int, str]] = {}  # shard -> (skips, last reason)
        self._shard = ""
        self.urls, self.train, self.batch_size = urls, train, batch_size
        self.max_refs, self.min_refs = max_refs, min_refs
        self.flip_ref_prob, self.hflip_prob, self.caption_prob = (
            flip_ref_prob,
            hflip_prob,
            caption_prob,
        )
        self.ref_hflip_prob = ref_hflip_prob
        self.reference_view: ReferenceView = reference_view
        self.batches_per_epoch, self.eval_masks, self.seed = batches_per_epoch, eval_masks, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._skipped = 0
        self._decoded = DecodedCache(int(decode_cache_mb * 2**20))

    def __len__(self) -> int:
        """Batches per epoch of a training stream (evaluation streams have no length)."""
        if not self.train:
            raise TypeError("an evaluation stream has no length")
        return self.batches_per_epoch

    # ---------------------------------------------------------------- raw records
    def _skip(self, reason: str) -> None:
        """Count one skipped record or sample of the shard being read, and warn."""
        self._skipped += 1
        count, _ = self._reasons.get(self._shard, (0, ""))
        self._reasons[self._shard] = (count + 1, reason)
        if self.skip_counter is not None:
            with self.skip_counter.get_lock():
                self.skip_counter.value += 1
        log.warning("skipping %s", reason)

    def _on_error(self, exn: Exception) -> bool:
        self._skip(f"unreadable shard data in '{self._shard}' ({type(exn).__name__}: {exn})")
        return True

    def shard_records(self, url: str) -> Iterator[Person]:
        """The valid person records of one shard; the others are skipped, counted and warned."""
        from webdataset.tariterators import tarfile_samples

        self._shard = url
        for sample in tarfile_samples([{"url": url}], handler=self._on_error):
            self._shard = url
            try:
                yield parse_record(sample)
            except BadRecordError as err:
                self._skip(f"record: {err}")

    def records(self, urls: Iterable[str]) -> Iterator[Person]:
        """The valid person records of ``urls``, in order (see :meth:`shard_records`)."""
        for url in urls:
            yield from self.shard_records(url)

    def no_samples_error(self, urls: Iterable[str], what: str) -> ShardReadError:
        """The error for a split that gave no sample: each shard with its skips and last reason."""
        urls = list(dict.fromkeys(urls))
        lines = []
        for url in urls[:5]:
            count, reason = self._reasons.get(url, (0, "no person records"))
            told = f"{count} skipped, last: {reason}" if count else reason
            lines.append(f"'{url}': {told}")
        more = f"; and {len(urls) - 5} more shards" if len(urls) > 5 else ""
        split = f"the {self.split} split" if self.split else "the split"
        return ShardReadError(
            f"{what} from any of the {len(urls)} shards of {split}: " + "; ".join(lines) + more
        )

    # -------------------------------------------------------------------- samples
    def reference(self, person: Person, i: int) -> Tensor:
        """Photo ``i`` of ``person`` as the identity encoder sees it (``reference_view``)."""
        if self.reference_view == "aligned":
            return self._decoded.get(f"{person.key}/face/{i}", person.face[i])  # (3, 112, 112)
        return self._decoded.get(f"{person.key}/img/{i}/256", person.img[i], 256)  # (3, 256, 256)

    def _sample(
        self, person: Person, t: int, refs: list[int], rng: random.Random, mask_kind: str | None
    ) -> dict:
        """One target with its mask, candidate references, prompt."""
        entry = person.meta["images"][t]
        size = int(person.meta["image_size"])
        image = self._decoded.get(f"{person.key}/img/{t}", person.img[t])  # (3, S, S)
        boxes = entry["boxes"]
        landmarks = torch.tensor(entry["landmarks"], dtype=torch.float32)  # (68, 2)
        flipped = False
        if mask_kind is None:  # training
            if rng.random() < self.hflip_prob:
                flipped = True
                image = image.flip(-1)
                boxes = {k: flip_box(b, size) for k, b in boxes.items()}
                landmarks[:, 0] = size - landmarks[:, 0]
            mask_np, region = training_mask(size, boxes, rng)
            caption = entry.get("caption")
            use = caption and rng.random() < self.caption_prob
            prompt = conditional_prompt(self.modifier_token, caption if use else None)
        else:
            mask_np, region = eval_mask(mask_kind, size, boxes, rng), mask_kind
            prompt = conditional_prompt(self.modifier_token)
        mask = torch.from_numpy(mask_np).float()[None]  # (1, S, S)
        references, reference_keys = [], []
        for i in refs:
            ref, key = self.reference(person, i), f"{person.key}/{i}"
            if mask_kind is None and rng.random() < self.ref_hflip_prob:  # training only
                ref, key = ref.flip(-1), key + "/flip"
            references.append(ref)
            reference_keys.append(key)
        return {
            "image": image,
            "mask": mask,
            "masked_image": image * (mask < 0.5),
            "references": references,
            # what identifies the pixels (for PVAModule's cache_encodings): record, photo, flip
            "image_key": f"{person.key}/{t}" + ("/flip" if flipped else ""),
            "reference_keys": reference_keys,
            "prompt": prompt,
            "person": person.meta["person"],
            "file": entry["file"],
            "mask_region": region,
            "landmarks": landmarks,
        }

    def _safe_sample(self, person: Person, *args) -> dict | None:
        """:meth:`_sample`, or ``None`` (counted, warned) when a member fails to decode."""
        try:
            return self._sample(person, *args)
        except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
            self._skip(f"a sample of record '{person.key}' ({type(err).__name__}: {err})")
            return None

    def _train_samples(self, rng: random.Random, slot: int, slots: int) -> Iterator[dict]:
        """Samples forever from randomly drawn shards.

        Stops with :class:`ShardReadError` once every shard has been read through without
        giving a sample since the last one.
        """
        barren: set[str] = set()
        while True:
            url = rng.choice(self.urls)
            delivered = False
            for person in self.shard_records(url):
                n = len(person.img)
                order = list(range(n))
                rng.shuffle(order)
                for t in order:
                    others = [i for i in range(n) if i != t]
                    rng.shuffle(others)
                    sample = self._safe_sample(person, t, others[: self.max_refs], rng, None)
                    if sample is not None:
                        delivered = True
                        barren.clear()
                        yield sample
            if not delivered:
                barren.add(url)
                if len(barren) == len(set(self.urls)):
                    raise self.no_samples_error(self.urls, "no training sample could be read")

    def eval_split(self, person: Person) -> tuple[list[int], list[int]]:
        """``(targets, references)`` of a person for evaluation; disjoint.

        CelebAHQ-IDI roles when present (``infer`` targets, ``ref`` references); otherwise the
        first ``max_refs`` photos (at most all but one) are references and the rest targets.
        """
        images = person.meta["images"]
        targets = [i for i, e in enumerate(images) if e.get("role") == "infer"]
        refs = [i for i, e in enumerate(images) if e.get("role") == "ref"]
        if not targets or not refs:
            k = min(self.max_refs, len(images) - 1)
            refs, targets = list(range(k)), list(range(k, len(images)))
        return targets, refs[: self.max_refs]

    def person_eval_samples(self, person: Person) -> Iterator[dict]:
        """A person's evaluation samples: every target x every kind of ``eval_masks``."""
        images = person.meta["images"]
        targets, refs = self.eval_split(person)
        for t in targets:
            for kind in self.eval_masks:
                rng = random.Random(f"{self.seed}/{person.key}/{images[t]['file']}/{kind}")
                sample = self._safe_sample(person, t, refs, rng, kind)
                if sample is not None:
                    yield sample

    def _eval_samples(self, slot: int, slots: int) -> Iterator[dict]:
        """This slot's persons' samples.

        Raises :class:`ShardReadError` when the split has no readable person record, or when
        this slot's persons gave no sample at all.
        """
        persons = mine = delivered = 0
        for k, person in enumerate(self.records(self.urls)):
            persons += 1
            if k % slots == slot:
                mine += 1
                for sample in self.person_eval_samples(person):
                    delivered += 1
                    yield sample
        if persons == 0:
            raise self.no_samples_error(self.urls, "no person record could be read")
        if mine and not delivered:
            raise self.no_samples_error(self.urls, f"none of {mine} persons gave a sample")

    # -------------------------------------------------------------------- batches
    def _collate(self, samples: list[dict], rng: random.Random) -> dict:
        """Stack samples; draw K for the batch (training), pad references with a mask."""
        if self.train:
            k = rng.randint(self.min_refs, self.max_refs)
        else:
            k = max(len(s["references"]) for s in samples)
        ref_lists, key_lists = [], []
        for s in samples:
            refs, keys = s["references"][:k], s["reference_keys"][:k]
            if self.train and refs and rng.random() < self.flip_ref_prob:
                refs, keys = refs + [refs[-1].flip(-1)], keys + [toggle_flip(keys[-1])]
            ref_lists.append(refs)
            key_lists.append(keys)
        batch = make_batch(
            [
                {**s, "references": refs, "reference_keys": keys}
                for s, refs, keys in zip(samples, ref_lists, key_lists)
            ]
        )
        batch["skipped"] = torch.tensor(self._skipped)
        self._skipped = 0
        return batch

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        slot, slots = self.rank * workers + worker, self.world_size * workers
        if self.train:
            seed = info.seed if info is not None else torch.initial_seed()
            rng = random.Random(f"{seed}/{self.rank}/{worker}/{self.epoch}")
            self.epoch += 1
            quota = self.batches_per_epoch // workers + (
                1 if worker < self.batches_per_epoch % workers else 0
            )
            samples = self._train_samples(rng, slot, slots)
            for _ in range(quota):
                yield self._collate([next(samples) for _ in range(self.batch_size)], rng)
        else:
            rng = random.Random(self.seed)
            batch: list[dict] = []
            full: list[dict] | None = None  # held back: collated once the next one is complete
            for sample in self._eval_samples(slot, slots):
                batch.append(sample)
                if len(batch) == self.batch_size:
                    if full is not None:
                        yield self._collate(full, rng)
                    full, batch = batch, []
            for rest in (full, batch):  # the last collated after the split ends: all its skips
                if rest:
                    yield self._collate(rest, rng)
