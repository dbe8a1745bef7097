"""The shapes world's ControlNet data: each training image's control image drawn from the scene's
own geometry, and captions that leave positions to it.

`control_image` draws a scene's objects white on black with `shapes.render` (the same boxes, jitter
and antialiasing as the image, no colour: "mask"), or that mask's outline ("edges").
`write_control_data` writes `shapes.train_examples` and their control images as two folders of the
same file names, which `training.data.ImageCaptionDataset` reads as images and `conditioning_dir`;
`controlnet_data` is what a ControlNet run's config names (`controlnet.shapes_data`) to get them.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Iterator

import numpy as np

from sdjax.data import shapes
from sdjax.data.shapes_dataset import write_shapes_folder

CONTROLS = ("mask", "edges")


def control_image(scene: shapes.Scene, image_size: int, offsets, kind: str = "mask") -> np.ndarray:
    """`scene`'s control image, uint8 (S, S, 3): its objects drawn by `shapes.render` white on
    black with the image's `offsets` ("mask"), or that mask minus its 3x3 erosion ("edges")."""
    if kind not in CONTROLS:
        raise ValueError(f"shapes control {kind!r} is not one of {CONTROLS}")
    silhouette = shapes.Scene(tuple(dataclasses.replace(o, colour="white") for o in scene.objects),
                              "black")
    drawn = shapes.render(silhouette, image_size, offsets=offsets)[..., 0].astype(np.float32)
    low, high = shapes.COLOURS["black"][0], shapes.COLOURS["white"][0]
    mask = (drawn - low) / (high - low)
    if kind == "edges":
        padded = np.pad(mask, 1, mode="edge")
        eroded = np.min([padded[i:i + image_size, j:j + image_size]
                         for i in range(3) for j in range(3)], axis=0)
        mask = mask - eroded
    out = np.round(np.clip(mask, 0, 1) * 255).astype(np.uint8)
    return np.repeat(out[..., None], 3, axis=-1)


def training_scenes(seed: int, two_object_prob: float = 0.3
                    ) -> Iterator[tuple[shapes.Scene, list[tuple[float, float]]]]:
    """The scenes and jitter offsets of `shapes.train_examples(seed)`, drawn from the same stream
    in the same order (a test checks that they render its images), so that a control image
    shares its image's geometry."""
    rng = np.random.default_rng(seed)
    while True:
        scene = shapes.random_scene(rng, two_object_prob)
        if shapes.is_held_out(scene):
            continue
        offsets = rng.uniform(-shapes.JITTER, shapes.JITTER, size=(len(scene.objects), 2))
        yield scene, [tuple(o) for o in offsets]


def _control_examples(kind: str, seed: int, image_size: int) -> Iterator[shapes.Example]:
    for scene, offsets in training_scenes(seed):
        yield shapes.Example(control_image(scene, image_size, offsets, kind),
                             shapes.caption(scene), scene)


def mask_examples(seed: int, image_size: int = 32) -> Iterator[shapes.Example]:
    """`shapes.train_examples(seed)` with each image replaced by its "mask" control image."""
    return _control_examples("mask", seed, image_size)


def edge_examples(seed: int, image_size: int = 32) -> Iterator[shapes.Example]:
    """`shapes.train_examples(seed)` with each image replaced by its "edges" control image."""
    return _control_examples("edges", seed, image_size)


CONTROL_EXAMPLES = {"mask": mask_examples, "edges": edge_examples}


def write_control_data(root: str | os.PathLike, num_examples: int, *, seed: int, image_size: int,
                       control: str) -> tuple[str, str]:
    """`write_shapes_folder` of `shapes.train_examples(seed)` into `<root>/images`, and of their
    `control` images into `<root>/conditioning_<control>` under the same file names. Each is
    reused when already written with the same settings. Returns (images, conditioning) folders."""
    if control not in CONTROLS:
        raise ValueError(f"shapes control {control!r} is not one of {CONTROLS}")
    images = write_shapes_folder(os.path.join(root, "images"), num_examples, seed=seed,
                                 image_size=image_size)
    conditioning = write_shapes_folder(os.path.join(root, f"conditioning_{control}"), num_examples,
                                       seed=seed, image_size=image_size,
                                       examples=CONTROL_EXAMPLES[control])
    return str(images), str(conditioning)


def without_positions(caption: str, rng: np.random.Generator, p: float) -> str:
    """A shapes-world caption with each object's position left out with probability `p` (the
    control image shows where it is); unchanged when every position stays."""
    try:
        scene = shapes.parse_caption(caption)
    except ValueError as err:
        raise ValueError(f"controlnet.drop_position: {err}") from None
    objects = tuple(dataclasses.replace(o, position=None if rng.random() < p else o.position)
                    for o in scene.objects)
    if objects == scene.objects:
        return caption
    return shapes.caption(shapes.Scene(objects, scene.background))


def controlnet_data(root: str | os.PathLike, num_examples: int, *, seed: int, image_size: int,
                    control: str, drop_position: float = 0.0, write: bool = True) -> dict[str, Any]:
    """A shapes-world ControlNet run's data under `root` (written when `write`; every process of
    a run calls this, one writes): {"folder": the images, "conditioning_dir": their `control`
    images, "caption_transform": f(caption, rng) leaving positions out with probability
    `drop_position`, or None}."""
    if control not in CONTROLS:
        raise ValueError(f"controlnet.shapes_control {control!r} is not one of {CONTROLS}")
    if write:
        write_control_data(root, num_examples, seed=seed, image_size=image_size, control=control)
    return {"folder": os.path.join(root, "images"),
            "conditioning_dir": os.path.join(root, f"conditioning_{control}"),
            "caption_transform": (functools.partial(without_positions, p=drop_position)
                                  if drop_position else None)}


__all__ = ["CONTROLS", "CONTROL_EXAMPLES", "control_image", "controlnet_data", "edge_examples",
           "mask_examples", "training_scenes", "without_positions", "write_control_data"]
