import numpy as np
import pytest

from sdjax.data import shapes
from sdjax.data.shapes import Scene, ShapeAttrs, caption, parse_caption
from tests.helpers import take


@pytest.fixture(scope="module")
def train(shapes_train_examples):
    return shapes_train_examples


def test_train_examples_are_determined_by_the_seed():
    a, b, c = (take(shapes.train_examples(s), 50) for s in (7, 7, 8))
    assert [e.caption for e in a] == [e.caption for e in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    assert [e.caption for e in a] != [e.caption for e in c]


@pytest.mark.parametrize("size", [32, 64])
def test_images_have_the_requested_size_and_background_border(size):
    for e in take(shapes.train_examples(1, size), 200):
        assert e.image.shape == (size, size, 3) and e.image.dtype == np.uint8
        border = np.concatenate([e.image[0], e.image[-1], e.image[:, 0], e.image[:, -1]])
        # Every shape keeps clear of the border, so the border is pure background.
        assert (border == shapes.COLOURS[e.scene.background]).all(), e.caption


def test_renders_without_antialiasing_use_only_the_palette():
    scene = Scene((ShapeAttrs("circle", "red", "large", "center"),), "blue")
    hard = shapes.render(scene, antialias=False)
    soft = shapes.render(scene, antialias=True)
    palette = {shapes.COLOURS["red"], shapes.COLOURS["blue"]}
    assert {tuple(p) for p in hard.reshape(-1, 3)} == palette
    assert len({tuple(p) for p in soft.reshape(-1, 3)}) > 2


def test_captions_round_trip_through_parse_caption(train):
    assert any(len(e.scene.objects) == 2 for e in train)
    for e in train:
        assert parse_caption(e.caption) == e.scene
        assert caption(parse_caption(e.caption)) == e.caption


def test_captions_parse_into_their_scenes():
    scene = parse_caption("a small red circle on the left, blue background")
    assert scene == Scene((ShapeAttrs("circle", "red", "small", "left"),), "blue")
    two = parse_caption("a large green square at the top and a small yellow cross at the bottom, "
                        "black background")
    assert two.objects == (ShapeAttrs("square", "green", "large", "top"),
                           ShapeAttrs("cross", "yellow", "small", "bottom"))
    assert two.background == "black"


def test_parse_caption_accepts_partial_prompts():
    scene = parse_caption("A red circle and a green square, white background")
    assert scene.objects == (ShapeAttrs("circle", "red"), ShapeAttrs("square", "green"))
    assert scene.background == "white" and not scene.complete
    assert parse_caption("an yellow triangle in the center") == Scene(
        (ShapeAttrs("triangle", "yellow", None, "center"),), None)


def test_parse_caption_names_unknown_words():
    with pytest.raises(ValueError, match=r"'octagon'.*'pink'|'pink'.*'octagon'"):
        parse_caption("a small pink octagon on the left, blue background")


@pytest.mark.parametrize("bad", [
    "red circle",
    "a red",
    "a circle red",
    "a red circle on the",
    "a red circle and",
    "a red circle, blue",
    "a red circle blue background",
    "a red circle and a blue square and a green cross",
])
def test_parse_caption_rejects_malformed_captions(bad):
    with pytest.raises(ValueError, match="caption"):
        parse_caption(bad)


def test_attributes_are_validated():
    with pytest.raises(ValueError, match="shape 'hexagon'"):
        ShapeAttrs("hexagon", "red")
    with pytest.raises(ValueError, match="background 'mauve'"):
        Scene((ShapeAttrs("circle", "red"),), "mauve")
    with pytest.raises(ValueError, match="partially specified"):
        shapes.render(Scene((ShapeAttrs("circle", "red"),), "blue"))


def test_two_object_scenes_are_paired_and_colour_distinct(train):
    pairs = [e.scene for e in train if len(e.scene.objects) == 2]
    assert len(pairs) > 500
    for s in pairs:
        a, b = s.objects
        assert (a.position, b.position) in shapes.PAIRS
        assert len({a.colour, b.colour, s.background}) == 3
    for e in train:
        assert all(o.colour != e.scene.background for o in e.scene.objects)


def test_heldout_split_is_deterministic_and_non_empty():
    prompts = list(shapes.heldout_prompts())
    assert prompts == list(shapes.heldout_prompts())
    assert len(prompts) == len(set(prompts)) == 280
    assert all(shapes.is_held_out(parse_caption(p)) for p in prompts)
    held = take(shapes.heldout_examples(3), 200)
    assert all(shapes.is_held_out(e.scene) for e in held)
    assert [e.caption for e in held] == [e.caption for e in take(shapes.heldout_examples(3), 200)]


def test_train_examples_never_produce_a_held_out_scene(train):
    assert not any(shapes.is_held_out(e.scene) for e in train)
    seen_pairs = {(o.colour, o.shape) for e in train for o in e.scene.objects}
    assert not seen_pairs & shapes.HELD_OUT_PAIRS
    # Composition is testable: each held-out colour and shape is seen in training, just not together.
    for colour, shape in shapes.HELD_OUT_PAIRS:
        assert any(c == colour for c, _ in seen_pairs) and any(s == shape for _, s in seen_pairs)


def _differences(a: Scene, b: Scene) -> list[str]:
    diffs = [] if a.background == b.background else ["background"]
    for x, y in zip(a.objects, b.objects):
        diffs += [f for f in ("colour", "shape", "size", "position") if getattr(x, f) != getattr(y, f)]
    return diffs


def test_hard_negatives_differ_in_one_attribute_and_stay_in_the_world(train):
    rng = np.random.default_rng(0)
    seen = set()
    for e in train[:400]:
        negatives = shapes.hard_negative_captions(e.caption, rng, 3)
        assert len(negatives) == 3 and e.caption not in negatives
        for text in negatives:
            scene = parse_caption(text)
            assert scene.complete and len(scene.objects) == len(e.scene.objects)
            colours = [o.colour for o in scene.objects] + [scene.background]
            assert len(set(colours)) == len(colours), text
            diffs = _differences(e.scene, scene)
            a, b = (e.scene.objects * 2)[:2]
            swapped = {(a.colour, a.shape, a.size, b.position), (b.colour, b.shape, b.size, a.position)}
            if len(scene.objects) == 2 and len(diffs) > 1:
                # a pair's positions swap, and nothing else changes
                assert {(o.colour, o.shape, o.size, o.position) for o in scene.objects} == swapped
                assert scene.background == e.scene.background
                seen.add("swap")
            else:
                assert len(diffs) == 1, (e.caption, text)
                seen.add(diffs[0])
    assert seen == {"colour", "shape", "size", "position", "background", "swap"}


def test_hard_negatives_follow_the_rng_and_reject_foreign_captions():
    text = "a small red circle on the left, blue background"
    a = shapes.hard_negative_captions(text, np.random.default_rng(5), 4)
    assert a == shapes.hard_negative_captions(text, np.random.default_rng(5), 4)
    with pytest.raises(ValueError, match="unknown words.*'photo'"):
        shapes.hard_negative_captions("a photo of a cat", np.random.default_rng(0), 2)
    with pytest.raises(ValueError, match="complete caption"):
        shapes.hard_negative_captions("a red circle", np.random.default_rng(0), 2)


def test_on_a_colour_background_is_part_of_the_grammar():
    assert parse_caption("a red circle on a blue background") == Scene(
        (ShapeAttrs("circle", "red"),), "blue")
    assert parse_caption("a small red circle on the left on a blue background") == parse_caption(
        "a small red circle on the left, blue background")
    with pytest.raises(ValueError, match="unknown words"):
        parse_caption("a red circle on a bluish background")
    with pytest.raises(ValueError, match="on a <colour> background"):
        parse_caption("a red circle on a circle background")


def test_written_prompts_leave_out_attributes_and_parse_back_consistently(train):
    rng = np.random.default_rng(0)
    texts = set()
    for e in train[:600]:
        text = shapes.written_prompt(e.scene, rng)
        texts.add(text)
        scene = parse_caption(text)
        assert scene.background in (None, e.scene.background)
        assert len(scene.objects) == len(e.scene.objects)
        for got, true in zip(scene.objects, e.scene.objects):
            assert (got.colour, got.shape) == (true.colour, true.shape)
            assert got.size in (None, true.size) and got.position in (None, true.position)
    # every kind of omission and both background phrasings occur
    assert any(" on a " in t for t in texts) and any(", " in t for t in texts)
    assert any("background" not in t for t in texts)
    assert any(not any(s in t for s in shapes.SIZES) for t in texts)
    assert any(caption(parse_caption(t)) == t for t in texts)  # some keep the full form


def test_phrasings_cover_the_grammar_and_phrase_parses_back(train):
    assert len(shapes.PHRASINGS) == len(set(shapes.PHRASINGS)) == 24
    assert len({p.name for p in shapes.PHRASINGS}) == 24
    scenes = {n: next(e.scene for e in train if len(e.scene.objects) == n) for n in (1, 2)}
    for phrasing in shapes.PHRASINGS:
        scene = scenes[phrasing.objects]
        text = shapes.phrase(scene, phrasing)
        back = parse_caption(text)
        assert back.background == (scene.background if phrasing.background else None)
        assert (" on a " in text) == (phrasing.background == "on"), text
        for got, true in zip(back.objects, scene.objects):
            assert got.size == (true.size if phrasing.size else None)
            assert got.position == (true.position if phrasing.position else None)
            assert (got.colour, got.shape) == (true.colour, true.shape)
    with pytest.raises(ValueError, match="2 objects"):
        shapes.phrase(scenes[2], shapes.PHRASINGS[0])


def test_prompt_sets_are_disjoint_and_fixed():
    for phrasing in shapes.PHRASINGS:
        report = shapes.phrased_prompts(phrasing, 12, of_set="report")
        selection = shapes.phrased_prompts(phrasing, 6, of_set="selection")
        assert len(set(report)) == 12 and len(set(selection)) == 6
        assert not set(report) & set(selection)
        assert all(shapes.prompt_set(p) == "report" for p in report)
        assert report == shapes.phrased_prompts(phrasing, 12, of_set="report")
        for p in report + selection:
            assert len(parse_caption(p).objects) == phrasing.objects
    # "a COLOUR SHAPE" has 32 prompts in all: asking for more than a set holds is an error
    with pytest.raises(ValueError, match="fewer than 30"):
        shapes.phrased_prompts(shapes.Phrasing(1, False, False, None), 30, of_set="report")
    with pytest.raises(ValueError, match="unknown prompt set"):
        shapes.phrased_prompts(shapes.PHRASINGS[0], 1, of_set="train")


def test_prompt_phrasing_rewrites_a_full_caption_and_may_end_in_a_full_stop():
    rng = np.random.default_rng(1)
    full = "a large red circle on the left and a small blue square on the right, white background"
    texts = [shapes.prompt_phrasing(full, rng, full_stop=0.3) for _ in range(300)]
    assert any(t.endswith(".") for t in texts) and any(t == full for t in texts)
    assert len(set(texts)) > 20
    for t in texts:
        assert parse_caption(t).objects[0].colour == "red"
    assert parse_caption("A red circle on a blue background.") == parse_caption(
        "a red circle on a blue background")


def test_position_phrasing_names_positions_more_often_than_prompt_phrasing():
    full = "a small red circle at the top and a large blue square at the bottom, green background"

    def named_share(transform, seed):
        rng = np.random.default_rng(seed)
        scenes = [parse_caption(transform(full, rng)) for _ in range(2000)]
        for back in scenes:  # still the same scene, in some phrasing
            assert [(o.colour, o.shape) for o in back.objects] == [("red", "circle"),
                                                                   ("blue", "square")]
        return np.mean([back.objects[0].position == "top" for back in scenes])

    # the full fifth names them, and half (3 of 4) of the phrasings: 0.6 (0.8) expected
    assert 0.56 < named_share(shapes.prompt_phrasing, 2) < 0.64
    assert 0.76 < named_share(shapes.position_phrasing, 2) < 0.84
    with pytest.raises(ValueError, match="position_share"):
        shapes.prompt_phrasing(full, np.random.default_rng(0), position_share=1.5)


def test_world_examples_hold_the_held_out_pairs_too():
    stream = shapes.world_examples(0)
    scenes = [next(stream).scene for _ in range(300)]
    assert any(shapes.is_held_out(s) for s in scenes)
    assert any(not shapes.is_held_out(s) for s in scenes)
    share = np.mean([len(s.objects) == 2 for s in scenes])
    assert 0.3 < share < 0.5
