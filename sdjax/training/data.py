"""Image-caption data for fine-tuning: host-side numpy, deterministic, resumable, sharded by host.

Sources: an image folder (each png/jpg/jpeg/webp with a same-named `.txt` caption beside it) or a
JSONL manifest ({"image": path relative to the manifest, "caption": ...} per line). Images are
resized (shorter side) and cropped to the resolution, or to the nearest aspect-ratio bucket, and
returned as float32 NHWC in [-1, 1]; with `use_latents`, precomputed VAE latents (`.npy`) are read
instead and returned as stored. For ControlNet training each image also has a conditioning image
(the manifest's "conditioning_image", diffusers' column name, or the file of the same relative name
under `conditioning_dir`), resized and cropped with the image's own crop box and flip, and returned
as "control_image", float32 in [0, 1].

Order: epoch e's batches come from `np.random.default_rng([seed, e])`, every global batch from one
bucket. The position (epoch, index of the next global batch) is the whole iteration state, the same
on every host; each host reads its own contiguous slice of every global batch.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import queue
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
from absl import logging
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
CROPS = ("center", "random")
# EXIF orientations that rotate by 90 degrees, so the stored width and height swap on display.
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112

PathLike = Union[str, os.PathLike]


@dataclasses.dataclass(frozen=True)
class Record:
    image: str
    caption: str
    latent: Optional[str] = None
    conditioning: Optional[str] = None


def latent_path(image: PathLike, root: PathLike, latents_dir: Optional[PathLike] = None) -> str:
    """Where the precomputed latent of `image` lives: `<image stem>.npy` beside it, or the same
    relative path under `latents_dir`. A precompute script writes there; the dataset reads there."""
    image = Path(image)
    if latents_dir is None:
        return str(image.with_suffix(".npy"))
    return str(Path(latents_dir) / image.relative_to(root).with_suffix(".npy"))


def _with_latents(records: list[Record], root: Path, latents_dir: Optional[PathLike]) -> list[Record]:
    out = []
    for r in records:
        path = latent_path(r.image, root, latents_dir)
        if not os.path.isfile(path):
            raise ValueError(f"{r.image}: no precomputed latent at {path}")
        out.append(dataclasses.replace(r, latent=path))
    return out


def conditioning_path(image: PathLike, root: PathLike, conditioning_dir: PathLike) -> str:
    """The conditioning image of `image`: the file of the same path relative to `root` under
    `conditioning_dir`, or failing that the one of the same stem with another image extension
    (a .jpg photo's .png edge map). A one-line error names the file expected."""
    expected = Path(conditioning_dir) / Path(image).relative_to(root)
    for candidate in [expected] + [expected.with_suffix(e) for e in IMAGE_EXTENSIONS]:
        if candidate.is_file():
            return str(candidate)
    raise ValueError(f"{image}: no conditioning image {expected} (data.conditioning_dir)")


def _with_conditioning(records: list[Record], root: Path,
                       conditioning_dir: Optional[PathLike]) -> list[Record]:
    """`records` each with its conditioning image: the manifest's, else `conditioning_dir`'s."""
    out = []
    for r in records:
        path = r.conditioning
        if path is None:
            if conditioning_dir is None:
                raise ValueError(f"{r.image}: no conditioning image (give the manifest a "
                                 f"\"conditioning_image\" or set data.conditioning_dir)")
            path = conditioning_path(r.image, root, conditioning_dir)
        elif not os.path.isfile(path):
            raise ValueError(f"{r.image}: its conditioning image {path} does not exist")
        out.append(dataclasses.replace(r, conditioning=path))
    return out


def read_image_folder(folder: PathLike, *, require_captions: bool = True) -> list[Record]:
    """Every image under `folder` (recursively, hidden folders skipped), sorted by path, with the
    caption from `<stem>.txt` beside it ("" when missing and captions are not required)."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"{folder}: not a directory")
    images = sorted(p for p in root.rglob("*")
                    if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not images:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    records = []
    for image in images:
        caption_file = image.with_suffix(".txt")
        if caption_file.is_file():
            caption = caption_file.read_text(encoding="utf-8").strip()
        elif require_captions:
            raise ValueError(f"{image}: no caption file {caption_file.name} beside it")
        else:
            caption = ""
        records.append(Record(image=str(image), caption=caption))
    return records


def read_manifest(path: PathLike, *, require_captions: bool = True) -> list[Record]:
    """A JSONL file of {"image": path relative to the manifest's folder, "caption": str[,
    "conditioning_image": path relative to the manifest's folder]}."""
    path = Path(path)
    root = path.parent
    records = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({e.msg})") from None
            if not isinstance(entry, dict) or "image" not in entry:
                raise ValueError(f"{path}:{line_number}: no \"image\" key")
            if "caption" not in entry and require_captions:
                raise ValueError(f"{path}:{line_number}: no \"caption\" for {entry['image']}")
            conditioning = entry.get("conditioning_image")
            records.append(Record(image=str(root / entry["image"]),
                                  caption=str(entry.get("caption", "")).strip(),
                                  conditioning=None if conditioning is None
                                  else str(root / conditioning)))
    if not records:
        raise ValueError(f"{path}: manifest lists no images")
    return records


def make_buckets(resolution: int, step: int = 64, max_aspect: float = 2.0) -> tuple[tuple[int, int], ...]:
    """(height, width) pairs, sides multiples of `step`, each the widest for its height with area
    <= resolution**2 and aspect at most `max_aspect` (the SDXL-style bucket set), sorted by h/w."""
    area = resolution * resolution
    buckets = set()
    for height in range(step, int(resolution * math.sqrt(max_aspect)) + step, step):
        width = (area // height) // step * step
        if width >= step and max(height / width, width / height) <= max_aspect:
            buckets.add((height, width))
    return tuple(sorted(buckets, key=lambda b: b[0] / b[1]))


def nearest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest in log space (first on ties)."""
    ratio = math.log(height / width)
    return int(np.argmin([abs(math.log(h / w) - ratio) for h, w in buckets]))


def image_size(path: PathLike) -> tuple[int, int]:
    """(height, width) as displayed (EXIF rotation applied), from the header alone."""
    with Image.open(path) as image:
        width, height = image.size
        # PNG's getexif() decodes the whole image to look for a late eXIf chunk; read only one
        # that came before the pixel data.
        has_exif = image.format != "PNG" or "exif" in image.info
        if has_exif and image.getexif().get(_EXIF_ORIENTATION, 1) in _TRANSPOSED_ORIENTATIONS:
            width, height = height, width
    return height, width


@dataclasses.dataclass(frozen=True)
class CropBox:
    """Where an image is cut: scaled to `scaled` (w, h), then cropped to `box` (left, top,
    right, bottom)."""
    scaled: tuple[int, int]
    box: tuple[int, int, int, int]

    def apply(self, image: Image.Image) -> np.ndarray:
        """`image` cut this way, uint8 (h, w, c). An image of another size (a conditioning image
        stored smaller) is scaled to `scaled` all the same, so it stays registered."""
        if image.size != self.scaled:
            image = image.resize(self.scaled, Image.BICUBIC)
        return np.asarray(image.crop(self.box))


def crop_box(image_size: tuple[int, int], size: tuple[int, int], crop: str = "center",
             rng: Optional[np.random.Generator] = None) -> CropBox:
    """Scale an image of `image_size` (w, h) so it covers `size` = (h, w) (for a square size:
    shorter side to it), crop to it at the centre or at a random offset."""
    height, width = size
    scale = max(height / image_size[1], width / image_size[0])
    new_size = (max(width, round(image_size[0] * scale)), max(height, round(image_size[1] * scale)))
    if crop == "center":
        left, top = (new_size[0] - width) // 2, (new_size[1] - height) // 2
    elif crop == "random":
        left = int(rng.integers(0, new_size[0] - width + 1))
        top = int(rng.integers(0, new_size[1] - height + 1))
    else:
        raise ValueError(f"crop {crop!r} is not one of {CROPS}")
    return CropBox(new_size, (left, top, left + width, top + height))


def resize_and_crop(image: Image.Image, size: tuple[int, int], crop: str = "center",
                    rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """`image` scaled and cropped to `size` (`crop_box`); uint8 (h, w, 3)."""
    return crop_box(image.size, size, crop, rng).apply(image)


def _open_rgb(path: PathLike) -> Image.Image:
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


def load_image(path: PathLike, size: tuple[int, int], crop: str = "center",
               rng: Optional[np.random.Generator] = None, flip: bool = False) -> np.ndarray:
    """An image file as float32 (h, w, 3) in [-1, 1]."""
    return load_image_pair(path, None, size, crop, rng, flip)[0]


def load_image_pair(path: PathLike, conditioning: Optional[PathLike], size: tuple[int, int],
                    crop: str = "center", rng: Optional[np.random.Generator] = None,
                    flip: bool = False) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """An image file as float32 (h, w, 3) in [-1, 1] and its conditioning image (None: none)
    as float32 (h, w, 3) in [0, 1], cut with the image's crop box and flipped with it."""
    image = _open_rgb(path)
    box = crop_box(image.size, size, crop, rng)
    arrays = [box.apply(image)]
    if conditioning is not None:
        arrays.append(box.apply(_open_rgb(conditioning)))
    if flip:
        arrays = [a[:, ::-1] for a in arrays]
    pixels = arrays[0].astype(np.float32) / 127.5 - 1.0
    control = arrays[1].astype(np.float32) / 255.0 if conditioning is not None else None
    return pixels, control


# The caption augmentation's stream beside the crop's: rng [seed, epoch, example, this].
_CAPTION_STREAM = 0x43415054

_END = object()


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher:
    """Iterates `iterable` in a daemon thread, up to `size` items ahead (a bounded queue), so the
    consumer never waits on Python-side loading. Exceptions re-raise in the consumer."""

    def __init__(self, iterable: Iterable[Any], size: int = 2):
        if size < 1:
            raise ValueError(f"prefetch size must be >= 1, got {size}")
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iter(iterable),), daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, iterator: Iterator[Any]) -> None:
        try:
            for item in iterator:
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as e:  # handed to the consumer, which re-raises it
            self._put(_Raised(e))

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if item is _END:
            self._queue.put(_END)  # stay exhausted
            raise StopIteration
        if isinstance(item, _Raised):
            raise item.error
        return item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()


class ImageCaptionDataset:
    """Batches {"pixels" | "latents": float32 (b, h, w, c), "captions": list[str], "index": int64
    (b,) record indices, "input_ids" when a tokenizer is given (or, from a tokenizer that returns
    a dict of id arrays, each of them: "input_ids" and "t5_ids" for SD3 / Flux), and with
    `conditioning` each image's conditioning image as "control_image", float32 (b, h, w, 3) in
    [0, 1]},
    b = batch_size / process_count. `caption_transform(caption, rng)` rewrites each caption as it
    is loaded (an augmentation; rng is the example's own for this epoch).

    batch_size is the global batch; every host builds the same dataset and reads its slice.
    Unreadable images are skipped (header failures when the dataset is built, decode failures in
    place of which the next readable image of the same bucket is taken, so a batch keeps its shape
    and may repeat an example), logged once each, counted in `stats()`. Iterates `num_epochs` epochs (None: forever); `state_dict()` is the position after
    the last batch handed out, so a run restored with `load_state_dict` continues exactly there.
    """

    def __init__(self, records: Sequence[Record], *, batch_size: int,
                 resolution: Union[int, tuple[int, int]] = 512,
                 buckets: Union[None, str, Sequence[tuple[int, int]]] = None,
                 crop: str = "center", random_flip: bool = False, use_latents: bool = False,
                 seed: int = 0, shuffle: bool = True, num_epochs: Optional[int] = None,
                 process_index: int = 0, process_count: int = 1, prefetch: int = 2,
                 num_workers: int = 4,
                 tokenizer: Optional[Callable[[list[str]], Union[np.ndarray, dict]]] = None,
                 conditioning: bool = False,
                 caption_transform: Optional[Callable[[str, np.random.Generator], str]] = None,
                 source: str = "dataset"):
        if crop not in CROPS:
            raise ValueError(f"crop {crop!r} is not one of {CROPS}")
        if batch_size < 1 or batch_size % process_count:
            raise ValueError(f"global batch_size {batch_size} must be a positive multiple of "
                             f"process_count {process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if not records:
            raise ValueError(f"{source}: no images")
        if use_latents and any(r.latent is None for r in records):
            missing = next(r for r in records if r.latent is None)
            raise ValueError(f"{missing.image}: use_latents is set but the record has no latent path")
        if conditioning and use_latents:
            raise ValueError(f"{source}: conditioning images are cut with their image's crop box, "
                             f"which precomputed latents (use_latents) no longer have")
        if conditioning and any(r.conditioning is None for r in records):
            missing = next(r for r in records if r.conditioning is None)
            raise ValueError(f"{missing.image}: no conditioning image")
        self.records = list(records)
        self.batch_size = batch_size
        self.local_batch_size = batch_size // process_count
        size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        if buckets == "auto":
            buckets = make_buckets(min(size))
        elif isinstance(buckets, str):
            raise ValueError(f"buckets {buckets!r}: use 'auto', a list of (h, w), or None")
        self.buckets: tuple[tuple[int, int], ...] = tuple(map(tuple, buckets)) if buckets else (size,)
        self.crop, self.random_flip, self.use_latents = crop, random_flip, use_latents
        self.seed, self.shuffle, self.num_epochs = seed, shuffle, num_epochs
        self.process_index, self.process_count = process_index, process_count
        self.prefetch, self.tokenizer, self.source = prefetch, tokenizer, source
        self.conditioning, self.caption_transform = conditioning, caption_transform
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, num_workers))
        self._lock = threading.Lock()
        self._skipped: dict[str, str] = {}
        self._groups = self._group_records()
        self.batches_per_epoch = sum(len(m) // batch_size for m in self._groups.values())
        if self.batches_per_epoch == 0:
            sizes = {k: len(m) for k, m in self._groups.items()}
            raise ValueError(f"{source}: no bucket holds a full global batch of {batch_size} "
                             f"(examples per bucket: {sizes})")
        self._position = (0, 0)
        self._iterator: Optional[Iterator] = None
        self._plan_cache: tuple[int, Any] = (-1, None)

    @classmethod
    def from_folder(cls, folder: PathLike, *, require_captions: bool = True,
                    latents_dir: Optional[PathLike] = None,
                    conditioning_dir: Optional[PathLike] = None, **kwargs) -> "ImageCaptionDataset":
        records = read_image_folder(folder, require_captions=require_captions)
        if kwargs.get("use_latents"):
            records = _with_latents(records, Path(folder), latents_dir)
        if kwargs.get("conditioning"):
            records = _with_conditioning(records, Path(folder), conditioning_dir)
        return cls(records, source=str(folder), **kwargs)

    @classmethod
    def from_manifest(cls, path: PathLike, *, require_captions: bool = True,
                      latents_dir: Optional[PathLike] = None,
                      conditioning_dir: Optional[PathLike] = None, **kwargs) -> "ImageCaptionDataset":
        records = read_manifest(path, require_captions=require_captions)
        if kwargs.get("use_latents"):
            records = _with_latents(records, Path(path).parent, latents_dir)
        if kwargs.get("conditioning"):
            records = _with_conditioning(records, Path(path).parent, conditioning_dir)
        return cls(records, source=str(path), **kwargs)

    # --- bookkeeping -------------------------------------------------------------------------

    def _skip(self, path: str, error: BaseException) -> None:
        with self._lock:
            if path in self._skipped:
                return
            self._skipped[path] = f"{type(error).__name__}: {error}"
        logging.warning("skipping unreadable %s: %s", path, self._skipped[path])

    def _is_skipped(self, path: str) -> bool:
        with self._lock:
            return path in self._skipped

    def stats(self) -> dict[str, Any]:
        with self._lock:
            skipped = dict(self._skipped)
        return {"examples": sum(len(m) for m in self._groups.values()), "skipped": len(skipped),
                "skipped_files": sorted(skipped), "batches_per_epoch": self.batches_per_epoch,
                "bucket_sizes": {k: len(m) for k, m in self._groups.items()}}

    def _group_key(self, index: int):
        """Bucket (h, w) of an image, or the stored shape of a latent; None if unreadable."""
        record = self.records[index]
        path = record.latent if self.use_latents else record.image
        try:
            if self.use_latents:
                return tuple(np.load(path, mmap_mode="r").shape)
            return self.buckets[nearest_bucket(*image_size(path), self.buckets)]
        except Exception as e:  # PIL and numpy raise a zoo of types for broken files
            self._skip(path, e)
            return None

    def _group_records(self) -> dict[tuple, np.ndarray]:
        keys = list(self._pool.map(self._group_key, range(len(self.records))))
        groups: dict[tuple, list[int]] = {}
        for index, key in enumerate(keys):
            if key is not None:
                groups.setdefault(key, []).append(index)
        if not groups:
            raise ValueError(f"{self.source}: none of its {len(self.records)} files is readable")
        return {key: np.asarray(groups[key], np.int64) for key in sorted(groups)}

    def _plan(self, epoch: int) -> tuple[list[tuple[tuple, np.ndarray]], dict[tuple, np.ndarray]]:
        """Epoch `epoch`'s global batches [(bucket, record indices)] and each bucket's order."""
        if self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        batches, orders = [], {}
        for key, members in self._groups.items():
            order = rng.permutation(members) if self.shuffle else members
            orders[key] = order
            for start in range(0, len(order) - self.batch_size + 1, self.batch_size):
                batches.append((key, order[start:start + self.batch_size]))
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._plan_cache = (epoch, (batches, orders))
        return batches, orders

    # --- loading -----------------------------------------------------------------------------

    def _read(self, index: int, key: tuple, epoch: int) -> dict[str, np.ndarray]:
        record = self.records[index]
        if self.use_latents:
            return {"latents": np.load(record.latent).astype(np.float32)}
        # Per (seed, epoch, example) randomness: the same crop whichever host or thread loads it.
        rng = np.random.default_rng([self.seed, epoch, index])
        flip = self.random_flip and bool(rng.integers(2))
        pixels, control = load_image_pair(record.image,
                                          record.conditioning if self.conditioning else None,
                                          key, self.crop, rng, flip)
        return {"pixels": pixels} if control is None else {"pixels": pixels, "control_image": control}

    def _read_or_replace(self, index: int, key: tuple, epoch: int, order: np.ndarray):
        """The example, or, if it cannot be decoded, the next readable one of its bucket in this
        epoch's order; returns (record index, {name: array})."""
        def candidates():
            yield index
            # Only on a failure: the bucket's order from just after `index`, wrapping around.
            start = int(np.flatnonzero(order == index)[0])
            yield from (int(i) for i in np.roll(order, -start)[1:])

        for candidate in candidates():
            record = self.records[candidate]
            path = record.latent if self.use_latents else record.image
            if self._is_skipped(path):
                continue
            try:
                return candidate, self._read(candidate, key, epoch)
            except Exception as e:
                self._skip(path, e)
        raise ValueError(f"{self.source}: every file of bucket {key} is unreadable")

    def _load_batch(self, epoch: int, index: int) -> dict[str, Any]:
        batches, orders = self._plan(epoch)
        key, members = batches[index]
        b = self.local_batch_size
        local = members[self.process_index * b:(self.process_index + 1) * b]
        loaded = list(self._pool.map(lambda i: self._read_or_replace(int(i), key, epoch, orders[key]),
                                     local))
        indices = np.asarray([i for i, _ in loaded], np.int64)
        captions = [self.records[i].caption for i in indices]
        if self.caption_transform is not None:
            captions = [self.caption_transform(c, np.random.default_rng([self.seed, epoch, int(i),
                                                                         _CAPTION_STREAM]))
                        for c, i in zip(captions, indices)]
        batch = {name: np.stack([arrays[name] for _, arrays in loaded]) for name in loaded[0][1]}
        batch.update(captions=captions, index=indices)
        if self.tokenizer is not None:
            tokens = self.tokenizer(captions)
            # A tokenizer of several id arrays (the flow families' CLIP and T5 ids) names them.
            batch.update({k: np.asarray(v) for k, v in tokens.items()} if isinstance(tokens, dict)
                         else {"input_ids": np.asarray(tokens)})
        return batch

    def _generate(self, epoch: int, index: int):
        while self.num_epochs is None or epoch < self.num_epochs:
            batch = self._load_batch(epoch, index)
            index += 1
            if index == self.batches_per_epoch:
                epoch, index = epoch + 1, 0
            yield batch, (epoch, index)

    # --- iteration and state -----------------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        if self._iterator is None:
            source = self._generate(*self._position)
            self._iterator = Prefetcher(source, self.prefetch) if self.prefetch > 0 else source
        batch, self._position = next(self._iterator)
        return batch

    def state_dict(self) -> dict[str, int]:
        epoch, index = self._position
        return {"epoch": epoch, "index": index, "seed": self.seed, "batch_size": self.batch_size,
                "examples": int(sum(len(m) for m in self._groups.values()))}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved position; the dataset must be the same (seed, global batch,
        number of readable examples), the number of hosts may differ."""
        mine = self.state_dict()
        for field in ("seed", "batch_size", "examples"):
            if int(state[field]) != mine[field]:
                raise ValueError(f"{self.source}: cannot resume, saved {field}={state[field]} but "
                                 f"this dataset has {field}={mine[field]}")
        epoch, index = int(state["epoch"]), int(state["index"])
        if not 0 <= index < self.batches_per_epoch:
            raise ValueError(f"{self.source}: saved index {index} outside the "
                             f"{self.batches_per_epoch} batches of an epoch")
        self._stop_iterator()
        self._position = (epoch, index)

    def _stop_iterator(self) -> None:
        if isinstance(self._iterator, Prefetcher):
            self._iterator.close()
        self._iterator = None

    def close(self) -> None:
        self._stop_iterator()
        self._pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
