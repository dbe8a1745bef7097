"""The shapes world as a training folder: PNG images with same-named `.txt` captions, the layout
`sdjax.training.data.ImageCaptionDataset.from_folder` reads, so every training stage of the
embedded model goes through the ordinary data path.

A finished folder carries `shapes.json` (how it was made); writing the same folder again with the
same settings is a no-op, so a rebuild reuses it.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Callable, Iterator, Optional

import numpy as np
from PIL import Image

from sdjax.data import shapes

MANIFEST = "shapes.json"


def write_shapes_folder(folder: str | os.PathLike, num_examples: int, *, seed: int = 0,
                        image_size: int = 32, held_out: bool = False,
                        two_object_prob: float = 0.3,
                        examples: Optional[Callable[[int, int], Iterator[shapes.Example]]] = None
                        ) -> pathlib.Path:
    """Write `num_examples` examples of `train_examples(seed)` (or `heldout_examples`) into
    `folder` as 000000.png + 000000.txt, ...; returns the folder. `examples`: another stream, `examples(seed, image_size)`
    (e.g. `shapes.lora_examples`), written with its own captions.

    Written beside its final place and renamed into it, so an interrupted write never passes for
    a finished folder."""
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    folder = pathlib.Path(folder).absolute()
    settings = {"num_examples": int(num_examples), "seed": int(seed), "image_size": int(image_size)}
    if examples is not None:  # the stream decides what it holds
        settings["examples"] = f"{examples.__module__}:{examples.__qualname__}"
    else:
        settings.update(held_out=bool(held_out), two_object_prob=float(two_object_prob))
    manifest = folder / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()) == settings:
        return folder
    staging = folder.with_name(folder.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    if examples is not None:
        stream = examples(seed, image_size)
    else:
        stream = (shapes.heldout_examples if held_out else shapes.train_examples)(
            seed, image_size, two_object_prob=two_object_prob)
    width = max(6, len(str(num_examples - 1)))
    for i in range(num_examples):
        example = next(stream)
        name = f"{i:0{width}d}"
        Image.fromarray(example.image).save(staging / f"{name}.png", compress_level=1)
        (staging / f"{name}.txt").write_text(example.caption + "\n", encoding="utf-8")
    (staging / MANIFEST).write_text(json.dumps(settings, indent=2, sort_keys=True))
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)
    return folder


def example_batch(num: int, *, seed: int, image_size: int = 32, held_out: bool = False,
                  two_object_prob: float = 0.3) -> tuple[np.ndarray, list[str], list[shapes.Scene]]:
    """`num` examples as (uint8 (num, S, S, 3) images, captions, scenes): evaluation sets."""
    stream: Iterator[shapes.Example] = (shapes.heldout_examples if held_out else
                                        shapes.train_examples)(seed, image_size,
                                                               two_object_prob=two_object_prob)
    examples = [next(stream) for _ in range(num)]
    return (np.stack([e.image for e in examples]), [e.caption for e in examples],
            [e.scene for e in examples])


def vocabulary_token_ids(tokenizer) -> np.ndarray:
    """Every token id a shapes-world caption can contain (words, ',' and the special tokens),
    sorted: the rows of a text encoder's embedding the shapes world trains."""
    words = (list(shapes.COLOURS) + list(shapes.SHAPES) + list(shapes.SIZES)
             + ["a", "an", "and", "background", "on", "the", "left", "right", "at", "top",
                "bottom", "in", "center", ","])
    ids = set(np.asarray(tokenizer([" ".join(words), ""])).ravel().tolist())
    return np.asarray(sorted(ids), np.int64)
