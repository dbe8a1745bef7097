"""The shapes world: a procedural stream of (image, caption, scene) whose truth a program can check.

A scene is one or two flat-coloured shapes on a flat background. Captions and the judge
(`sdjax.evaluation.judge`) are both derived from the same `Scene` dataclass.

Caption grammar (generated captions always use the full form; `parse_caption` also accepts
the optional parts left out, which then constrain nothing, and a closing full stop):

    caption    := object [" and " object] [", " COLOUR " background" | " on a " COLOUR " background"] ["."]
    object     := ("a" | "an") [SIZE] COLOUR SHAPE [POSITION]
    SIZE       := small | large
    COLOUR     := red | green | blue | yellow | purple | cyan | white | black
    SHAPE      := circle | square | triangle | cross          (| heart: the extension below)
    POSITION   := on the left | on the right | at the top | at the bottom | in the center

e.g. "a small red circle on the left, blue background",
     "a large green square at the top and a small yellow cross at the bottom, black background".
Two-object scenes always place their objects as a left/right or top/bottom pair, with
different colours, so each object is a separate colour region the judge can find.

Phrasings: `PHRASINGS` names the 24 ways the grammar writes a scene (one or two objects; size,
position and background each named or left out; the background's two forms); `phrase` writes a
scene in one, `written_prompt` in a random one, and `phrased_prompts` draws the evaluation's
prompts of each, from two disjoint sets (`prompt_set`: "selection" and "report").

Composition split: a few (colour, shape) pairs never occur in `train_examples`; every scene
containing one of them is held out (`is_held_out`) and reachable through `heldout_prompts` /
`heldout_examples`.

Extension vocabulary: `EXTRA_SHAPES` (a heart) are words the base world never draws —
`random_scene`, `train_examples` and the held-out split use `SHAPES` only — but that `render`,
`parse_caption` and the judge know: the concept a LoRA teaches the embedded default model
(`lora_examples`, `extra_heldout_prompts`; sdjax/assets/default_model/loras/).
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import re
from typing import Iterator, Optional, Sequence, Union

import numpy as np

# Well separated in RGB (min pairwise distance ~140), so slight colour shifts keep their names.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (180, 40, 210),
    "cyan": (30, 200, 220),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
# A shape and not a colour: the default model's VAE (frozen under a LoRA) was trained on the eight
# colours above and its encoder pulls any other colour to the nearest of them (60-90 RGB units off
# for every candidate far from the palette and its mixtures), while it reproduces a heart as well
# as the base shapes (~33 dB). A heart is also unlike the base shapes under the judge's fit, which
# keeps its verdicts on base drawings unchanged.
EXTRA_SHAPES: tuple[str, ...] = ("heart",)
ALL_SHAPES: tuple[str, ...] = SHAPES + EXTRA_SHAPES
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")

# Side of the shape's bounding box as a fraction of the image side. The gap between them is wide
# enough that the judge's threshold (their geometric mean) survives blur and model imprecision.
SIZE_FRACTION: dict[str, float] = {"small": 0.26, "large": 0.38}
# Centre of the shape's bounding box as (x, y) fractions of the image side.
POSITION_ANCHOR: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
# Random offset of the anchor, fraction of the image side; small enough that two large shapes in a
# pair stay >= 2 px apart at 32 px and every shape keeps >= 1 px of background around it.
JITTER = 0.02
CROSS_ARM = 0.4  # width of the cross's arms, fraction of its side
# The heart curve's extent: |x| <= 1.139, -1 <= y <= 1.236 (the point at y = -1, the lobes' tops
# at 1.236), found numerically.
HEART_HALF_WIDTH, HEART_TOP = 1.139, 1.236
PAIRS: tuple[tuple[str, str], ...] = (("left", "right"), ("top", "bottom"))

# One held-out colour per shape, all different: every colour and every shape is still seen in
# training, only these combinations are not.
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset({
    ("red", "square"),
    ("green", "circle"),
    ("blue", "triangle"),
    ("yellow", "cross"),
})

_POSITION_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}


@dataclasses.dataclass(frozen=True)
class ShapeAttrs:
    """One object. `size`/`position` may be None only in scenes parsed from partial prompts."""

    shape: str
    colour: str
    size: Optional[str] = None
    position: Optional[str] = None

    def __post_init__(self):
        _check("shape", self.shape, ALL_SHAPES)
        _check("colour", self.colour, COLOURS)
        if self.size is not None:
            _check("size", self.size, SIZES)
        if self.position is not None:
            _check("position", self.position, POSITIONS)


@dataclasses.dataclass(frozen=True)
class Scene:
    """The truth behind one image: its objects (first = left/top one) and background colour."""

    objects: tuple[ShapeAttrs, ...]
    background: Optional[str] = None

    def __post_init__(self):
        object.__setattr__(self, "objects", tuple(self.objects))
        if not 1 <= len(self.objects) <= 2:
            raise ValueError(f"a scene holds 1 or 2 objects, got {len(self.objects)}")
        if self.background is not None:
            _check("background", self.background, COLOURS)

    @property
    def complete(self) -> bool:
        """Whether every attribute is specified (so the scene can be rendered)."""
        return self.background is not None and all(
            o.size is not None and o.position is not None for o in self.objects)


@dataclasses.dataclass(frozen=True)
class Example:
    image: np.ndarray  # uint8 (H, W, 3)
    caption: str
    scene: Scene


def _check(what: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {sorted(allowed)}")


# ----------------------------------------------------------------------------------------------
# Captions


def caption(scene: Scene) -> str:
    """The caption of `scene`, in the grammar of the module docstring."""
    parts = []
    for obj in scene.objects:
        words = ["a"]
        if obj.size is not None:
            words.append(obj.size)
        words += [obj.colour, obj.shape]
        if obj.position is not None:
            words.append(_POSITION_PHRASE[obj.position])
        parts.append(" ".join(words))
    text = " and ".join(parts)
    if scene.background is not None:
        text += f", {scene.background} background"
    return text


BACKGROUND_FORMS: tuple[Optional[str], ...] = (None, "comma", "on")


@dataclasses.dataclass(frozen=True)
class Phrasing:
    """How a prompt is written: which attributes it names (each object's size and position, the
    background, as ", blue background" or " on a blue background") and how many objects it has.
    Every prompt of the README's grammar has one of the 24 `PHRASINGS`."""
    objects: int
    size: bool
    position: bool
    background: Optional[str]  # one of BACKGROUND_FORMS

    @property
    def name(self) -> str:
        background = {None: "no background", "comma": "', COLOUR background'",
                      "on": "'on a COLOUR background'"}[self.background]
        return " | ".join((f"{self.objects} object{'s' if self.objects > 1 else ''}",
                           "size" if self.size else "no size",
                           "position" if self.position else "no position", background))


PHRASINGS: tuple[Phrasing, ...] = tuple(
    Phrasing(n, size, position, background) for n in (1, 2) for size in (True, False)
    for position in (True, False) for background in BACKGROUND_FORMS)


def phrase(scene: Scene, phrasing: Phrasing) -> str:
    """`scene` (complete) written in `phrasing`; parses back to `scene` less what it leaves out."""
    if len(scene.objects) != phrasing.objects:
        raise ValueError(f"{phrasing.name}: the scene has {len(scene.objects)} objects")
    objects = tuple(dataclasses.replace(o, size=o.size if phrasing.size else None,
                                        position=o.position if phrasing.position else None)
                    for o in scene.objects)
    text = caption(Scene(objects, None))
    if phrasing.background == "comma":
        text += f", {scene.background} background"
    elif phrasing.background == "on":
        text += f" on a {scene.background} background"
    return text


def written_prompt(scene: Scene, rng: np.random.Generator, *, full_share: float = 0.2,
                   position_share: Optional[float] = None) -> str:
    """`scene` (complete) as people write prompts: in a random phrasing (`PHRASINGS` of its
    object count, uniform), or as its full caption with probability `full_share`. With
    `position_share` the phrasing names the positions with that probability (its other
    choices still uniform)."""
    for name, share in (("full_share", full_share), ("position_share", position_share)):
        if share is not None and not 0.0 <= share <= 1.0:
            raise ValueError(f"{name} must be a probability in [0, 1], got {share}")
    if rng.random() < full_share:
        return caption(scene)
    choices = [p for p in PHRASINGS if p.objects == len(scene.objects)]
    if position_share is not None:
        named = bool(rng.random() < position_share)
        choices = [p for p in choices if p.position == named]
    return phrase(scene, choices[rng.integers(len(choices))])


def prompt_phrasing(text: str, rng: np.random.Generator, *, full_share: float = 0.2,
                    full_stop: float = 0.05, position_share: Optional[float] = None) -> str:
    """A full caption rewritten by `written_prompt`, ending in a full stop with probability
    `full_stop`: the default model's caption transform (`data.caption_transform`), so every
    image is seen in every phrasing over the epochs, from the first step of its diffusion
    training."""
    text = written_prompt(parse_caption(text), rng, full_share=full_share,
                          position_share=position_share)
    return text + "." if rng.random() < full_stop else text


def position_phrasing(text: str, rng: np.random.Generator) -> str:
    """`prompt_phrasing` with the positions named in 4 of 5 captions (the full fifth and 3 of 4
    phrasings; 3 of 5 there): the caption transform of the default model's last stage, which
    teaches the position words once the phrasings are learnt (configs/shapes_ldm_positions.py)."""
    return prompt_phrasing(text, rng, position_share=0.75)


# The default model's evaluation draws its prompts from two disjoint sets: "selection" prompts
# choose the model and its settings (the ablation studies, the CFG default), "report" prompts give
# the figures it ships with. A prompt's set is a hash of its text, so no prompt is ever in both.
PROMPT_SETS = ("selection", "report")


def prompt_set(prompt: str) -> str:
    """Which of `PROMPT_SETS` `prompt` belongs to (a fixed hash of its text)."""
    return PROMPT_SETS[hashlib.sha256(prompt.encode()).digest()[0] % 2]


def phrased_prompts(phrasing: Phrasing, count: int, *, of_set: str, seed: int = 0) -> list[str]:
    """`count` different prompts of `phrasing` in the prompt set `of_set`, from scenes drawn
    uniformly over the whole world (held-out pairs too) by a seeded stream: the same list every
    time. Raises ValueError if the phrasing has fewer prompts than that in the set."""
    if of_set not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {of_set!r}; expected one of {PROMPT_SETS}")
    rng = np.random.default_rng([seed, PHRASINGS.index(phrasing)])
    chosen: dict[str, None] = {}
    for _ in range(200 * count):
        text = phrase(random_scene(rng, 1.0 if phrasing.objects == 2 else 0.0), phrasing)
        if prompt_set(text) == of_set:
            chosen[text] = None
            if len(chosen) == count:
                return list(chosen)
    raise ValueError(f"{phrasing.name}: fewer than {count} {of_set} prompts")


_PHRASE_POSITION = {tuple(v.split()): k for k, v in _POSITION_PHRASE.items()}
_KNOWN_WORDS = (set(COLOURS) | set(ALL_SHAPES) | set(SIZES) | {"a", "an", "and", "background"}
                | {w for phrase in _PHRASE_POSITION for w in phrase})


def parse_caption(text: str) -> Scene:
    """Parse a caption (see the module docstring) back into a `Scene`.

    Raises ValueError naming unknown words, or describing what is malformed.
    """
    words = re.findall(r"[a-z]+|[^a-z\s]", text.lower())
    if words[-1:] == ["."]:  # a prompt written as a sentence
        words = words[:-1]
    unknown = [w for w in words if w not in _KNOWN_WORDS and w != ","]
    if unknown:
        raise ValueError(f"unknown words in caption {text!r}: {', '.join(map(repr, unknown))}")
    background = None
    if "," not in words and words[-4:-2] == ["on", "a"] and words[-1:] == ["background"]:
        if words[-2] not in COLOURS:
            raise ValueError(f"caption {text!r}: expected 'on a <colour> background'")
        background = words[-2]
        words = words[:-4]
    elif "," in words:
        comma = words.index(",")
        tail = words[comma + 1:]
        if len(tail) != 2 or tail[0] not in COLOURS or tail[1] != "background":
            raise ValueError(f"caption {text!r}: expected '<colour> background' after the comma")
        background = tail[0]
        words = words[:comma]
    elif "background" in words:
        raise ValueError(f"caption {text!r}: the background goes after a comma")
    chunks = [list(g) for is_and, g in itertools.groupby(words, key=lambda w: w == "and")
              if not is_and]
    if not 1 <= len(chunks) <= 2 or words.count("and") != len(chunks) - 1:
        raise ValueError(f"caption {text!r}: expected one object or two joined by 'and'")
    return Scene(tuple(_parse_object(c, text) for c in chunks), background)


def _parse_object(words: list[str], text: str) -> ShapeAttrs:
    bad = ValueError(f"caption {text!r}: cannot read {' '.join(words)!r} as "
                     "'a [size] colour shape [position]'")
    if not words or words[0] not in ("a", "an"):
        raise bad
    i = 1
    size = None
    if i < len(words) and words[i] in SIZES:
        size, i = words[i], i + 1
    if i + 1 >= len(words) or words[i] not in COLOURS or words[i + 1] not in ALL_SHAPES:
        raise bad
    colour, shape = words[i], words[i + 1]
    rest = tuple(words[i + 2:])
    if rest and rest not in _PHRASE_POSITION:
        raise bad
    return ShapeAttrs(shape, colour, size, _PHRASE_POSITION[rest] if rest else None)


NEGATIVE_ATTRIBUTES = ("colour", "shape", "size", "position", "background")


def hard_negative_captions(text: str, rng: np.random.Generator, count: int) -> list[str]:
    """`count` captions that each differ from `text` in exactly one attribute (one object's colour,
    shape, size or position, or the background): the hard negatives of contrastive training, which
    a batch of random scenes almost never contains (NegCLIP, Yuksekgonul et al. 2023). A pair's
    positions are swapped rather than changed, so every negative is a scene the world can hold.
    Raises ValueError for a caption outside the grammar (naming it)."""
    scene = parse_caption(text)
    if not scene.complete:
        raise ValueError(f"hard negatives need a complete caption, got {text!r}")
    out = []
    while len(out) < count:
        attribute = NEGATIVE_ATTRIBUTES[rng.integers(len(NEGATIVE_ATTRIBUTES))]
        k = int(rng.integers(len(scene.objects)))
        objects = list(scene.objects)
        used = {o.colour for o in objects} | {scene.background}
        background = scene.background
        if attribute == "background":
            background = str(rng.choice(sorted(set(COLOURS) - used)))
        elif attribute == "colour":
            objects[k] = dataclasses.replace(objects[k],
                                             colour=str(rng.choice(sorted(set(COLOURS) - used))))
        elif attribute == "position" and len(objects) == 2:
            a, b = objects
            objects = [dataclasses.replace(b, position=a.position),
                       dataclasses.replace(a, position=b.position)]
        else:
            values = {"shape": SHAPES, "size": SIZES, "position": POSITIONS}[attribute]
            current = getattr(objects[k], attribute)
            new = str(rng.choice([v for v in values if v != current]))
            objects[k] = dataclasses.replace(objects[k], **{attribute: new})
        negative = caption(Scene(tuple(objects), background))
        if negative != text:  # swapping two identical objects changes nothing
            out.append(negative)
    return out


# ----------------------------------------------------------------------------------------------
# Rendering


def shape_coverage(shape: str, box: tuple[float, float, float, float], height: int, width: int,
                   supersample: int = 4) -> np.ndarray:
    """Fraction of each pixel covered by `shape` drawn in `box` = (x0, y0, x1, y1), in pixels.

    Pixel (i, j) spans [j, j+1) x [i, i+1). `supersample` sub-samples per pixel side give the
    antialiasing; 1 samples pixel centres only (hard edges). Returns float32 (height, width).
    """
    _check("shape", shape, ALL_SHAPES)
    x0, y0, x1, y1 = box
    s = supersample
    # Only the pixels touching the box are evaluated.
    c0, c1 = max(int(np.floor(x0)), 0), min(int(np.ceil(x1)), width)
    r0, r1 = max(int(np.floor(y0)), 0), min(int(np.ceil(y1)), height)
    out = np.zeros((height, width), np.float32)
    if c1 <= c0 or r1 <= r0:
        return out
    offsets = (np.arange(s) + 0.5) / s
    xs = (np.arange(c0, c1)[:, None] + offsets[None]).reshape(-1)
    ys = (np.arange(r0, r1)[:, None] + offsets[None]).reshape(-1)
    # Normalised coordinates: u, v in [-1, 1] across the box.
    u = (2 * xs - (x0 + x1)) / (x1 - x0)
    v = (2 * ys - (y0 + y1)) / (y1 - y0)
    u, v = u[None, :], v[:, None]
    if shape == "circle":
        inside = u * u + v * v <= 1.0
    elif shape == "square":
        inside = (np.abs(u) <= 1) & (np.abs(v) <= 1)
    elif shape == "triangle":  # apex at top centre, base along the bottom edge
        inside = (v <= 1) & (np.abs(u) <= (v + 1) / 2)
    elif shape == "heart":  # (x² + y² - 1)³ <= x² y³, scaled to touch all four sides of the box
        x, y = HEART_HALF_WIDTH * u, HEART_TOP - (HEART_TOP + 1) / 2 * (v + 1)
        inside = (x * x + y * y - 1) ** 3 <= x * x * y ** 3
    else:  # cross: a plus sign with arms CROSS_ARM of the side wide
        inside = ((np.abs(u) <= 1) & (np.abs(v) <= 1)
                  & ((np.abs(u) <= CROSS_ARM) | (np.abs(v) <= CROSS_ARM)))
    cov = inside.reshape(r1 - r0, s, c1 - c0, s).mean(axis=(1, 3))
    out[r0:r1, c0:c1] = cov
    return out


def object_box(obj: ShapeAttrs, image_size: int,
               offset: tuple[float, float] = (0.0, 0.0)) -> tuple[float, float, float, float]:
    """The pixel box (x0, y0, x1, y1) of `obj`; `offset` is its jitter in image-side fractions."""
    side = SIZE_FRACTION[obj.size] * image_size
    ax, ay = POSITION_ANCHOR[obj.position]
    cx, cy = (ax + offset[0]) * image_size, (ay + offset[1]) * image_size
    return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)


def render(scene: Scene, image_size: int = 32, *, antialias: bool = True,
           offsets: Optional[Sequence[tuple[float, float]]] = None) -> np.ndarray:
    """Draw `scene` as a uint8 (image_size, image_size, 3) image.

    `offsets` (one (dx, dy) per object, fractions of the side, |d| <= JITTER) move the objects
    off their anchors; None puts them exactly on them.
    """
    if not scene.complete:
        raise ValueError(f"cannot render a partially specified scene: {caption(scene)!r}")
    if offsets is None:
        offsets = [(0.0, 0.0)] * len(scene.objects)
    if len(offsets) != len(scene.objects):
        raise ValueError(f"{len(offsets)} offsets for {len(scene.objects)} objects")
    img = np.empty((image_size, image_size, 3), np.float32)
    img[:] = COLOURS[scene.background]
    for obj, off in zip(scene.objects, offsets):
        cov = shape_coverage(obj.shape, object_box(obj, image_size, off), image_size, image_size,
                             supersample=4 if antialias else 1)[..., None]
        img = img * (1 - cov) + np.asarray(COLOURS[obj.colour], np.float32) * cov
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Sampling and the composition split


def is_held_out(scene: Union[Scene, ShapeAttrs]) -> bool:
    """Whether `scene` (or a single object) contains a held-out (colour, shape) pair."""
    objects = (scene,) if isinstance(scene, ShapeAttrs) else scene.objects
    return any((o.colour, o.shape) in HELD_OUT_PAIRS for o in objects)


def random_scene(rng: np.random.Generator, two_object_prob: float = 0.3) -> Scene:
    """A uniformly drawn scene (held-out pairs included); objects and background all differ in colour."""
    names = list(COLOURS)
    if rng.random() < two_object_prob:
        pair = PAIRS[rng.integers(len(PAIRS))]
        cols = rng.choice(len(names), size=3, replace=False)
        objects = tuple(
            ShapeAttrs(SHAPES[rng.integers(len(SHAPES))], names[cols[k]],
                       SIZES[rng.integers(len(SIZES))], pair[k]) for k in range(2))
        return Scene(objects, names[cols[2]])
    cols = rng.choice(len(names), size=2, replace=False)
    obj = ShapeAttrs(SHAPES[rng.integers(len(SHAPES))], names[cols[0]],
                     SIZES[rng.integers(len(SIZES))], POSITIONS[rng.integers(len(POSITIONS))])
    return Scene((obj,), names[cols[1]])


def _examples(seed: int, held_out: Optional[bool], image_size: int, antialias: bool,
              two_object_prob: float) -> Iterator[Example]:
    """Examples of random scenes: only held-out ones, only the others, or (None) all."""
    rng = np.random.default_rng(seed)
    while True:
        scene = random_scene(rng, two_object_prob)
        if held_out is not None and is_held_out(scene) != held_out:
            continue
        offsets = rng.uniform(-JITTER, JITTER, size=(len(scene.objects), 2))
        image = render(scene, image_size, antialias=antialias, offsets=[tuple(o) for o in offsets])
        yield Example(image, caption(scene), scene)


def train_examples(seed: int, image_size: int = 32, *, antialias: bool = True,
                   two_object_prob: float = 0.3) -> Iterator[Example]:
    """An endless, seed-determined stream of training examples; never a held-out scene."""
    return _examples(seed, False, image_size, antialias, two_object_prob)


def heldout_examples(seed: int, image_size: int = 32, *, antialias: bool = True,
                     two_object_prob: float = 0.3) -> Iterator[Example]:
    """An endless, seed-determined stream of held-out examples (for evaluating composition)."""
    return _examples(seed, True, image_size, antialias, two_object_prob)


def world_examples(seed: int, image_size: int = 32, *, antialias: bool = True,
                   two_object_prob: float = 0.4) -> Iterator[Example]:
    """An endless, seed-determined stream of every kind of scene, held-out pairs included: the
    embedded default model's diffusion training data (a model people use should know every
    (colour, shape); the composition split stays a measure of the CLIP stage)."""
    return _examples(seed, None, image_size, antialias, two_object_prob)


def _single_object_captions(pairs) -> Iterator[str]:
    """The full caption of every single-object scene of each (colour, shape) of `pairs`, in order."""
    for colour, shape in pairs:
        for size in SIZES:
            for position in POSITIONS:
                for background in COLOURS:
                    if background != colour:
                        yield caption(Scene((ShapeAttrs(shape, colour, size, position),),
                                            background))


def heldout_prompts() -> Iterator[str]:
    """Every single-object held-out caption, in a fixed order (280 of them)."""
    return _single_object_captions(sorted(HELD_OUT_PAIRS))


# ----------------------------------------------------------------------------------------------
# The extension vocabulary: what a LoRA teaches the default model


# A fifth of the single-object extension captions, never in `lora_examples`: what the LoRA is
# evaluated on. Every colour, size, position and background of an extension shape is still trained.
EXTRA_HELDOUT_FRACTION = 0.2
_EXTRA_HELDOUT_SEED = 2026


def extra_prompts() -> list[str]:
    """Every single-object full caption with an extension shape, in a fixed order (560 for one
    shape: 8 colours, 2 sizes, 5 positions, 7 backgrounds)."""
    return list(_single_object_captions([(c, s) for s in EXTRA_SHAPES for c in COLOURS]))


def extra_heldout_prompts() -> list[str]:
    """The extension captions `lora_examples` never draws (a seeded `EXTRA_HELDOUT_FRACTION` of
    `extra_prompts`), in `extra_prompts` order."""
    prompts = extra_prompts()
    rng = np.random.default_rng(_EXTRA_HELDOUT_SEED)
    chosen = rng.permutation(len(prompts))[:round(EXTRA_HELDOUT_FRACTION * len(prompts))]
    return [prompts[i] for i in sorted(chosen)]


def with_extra_shape(scene: Scene, rng: np.random.Generator) -> Scene:
    """`scene` with an extension shape in place of one of its objects' shapes (or of both a pair's,
    one time in three), colours, sizes and positions kept."""
    objects = list(scene.objects)
    both = len(objects) == 2 and rng.random() < 1 / 3
    changed = range(len(objects)) if both else [int(rng.integers(len(objects)))]
    for k in changed:
        objects[k] = dataclasses.replace(objects[k],
                                         shape=EXTRA_SHAPES[rng.integers(len(EXTRA_SHAPES))])
    return Scene(tuple(objects), scene.background)


def lora_examples(seed: int, image_size: int = 32, *, concept_share: float = 0.5,
                  two_object_prob: float = 0.3, variant_share: float = 0.5,
                  antialias: bool = True) -> Iterator[Example]:
    """An endless, seed-determined stream for teaching the extension shapes to a model of the base
    world: a `concept_share` of scenes with an extension shape (`with_extra_shape` of a random
    scene: as one object or a pair's, on every background), the rest ordinary training scenes,
    which keep the rest of the model as it was (kohya's regularisation images). Never a held-out
    base scene (`is_held_out`) nor a single-object scene of `extra_heldout_prompts`. Captions are
    the full form, or with probability `variant_share` as people write them (`written_prompt`);
    an example's `scene` is the whole truth either way."""
    rng = np.random.default_rng(seed)
    held_out = set(extra_heldout_prompts())
    while True:
        scene = random_scene(rng, two_object_prob)
        if is_held_out(scene):
            continue
        if rng.random() < concept_share:
            scene = with_extra_shape(scene, rng)
            if caption(scene) in held_out:
                continue
        offsets = rng.uniform(-JITTER, JITTER, size=(len(scene.objects), 2))
        image = render(scene, image_size, antialias=antialias, offsets=[tuple(o) for o in offsets])
        text = (written_prompt(scene, rng, full_share=0.0) if rng.random() < variant_share
                else caption(scene))
        yield Example(image, text, scene)
