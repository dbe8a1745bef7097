"""Image-caption dataset: pairing, crops, buckets, broken files, resume, host sharding."""
import itertools
import json
import logging
import threading
import time

import numpy as np
import pytest
from PIL import Image

from sdjax.training import data as D
from tests.helpers import take


def _write(path, array):
    Image.fromarray(np.asarray(array, np.uint8)).save(path)


def _solid(h, w, value):
    return np.full((h, w, 3), value, np.uint8)


@pytest.fixture
def folder(tmp_path):
    """12 images, image i a solid grey of 10 * i, captioned "caption i"; varied sizes and formats."""
    sizes = [(20, 20), (24, 40), (40, 24), (32, 32)]
    for i in range(12):
        ext = ["png", "jpg", "webp", "png"][i % 4]
        h, w = sizes[i % 4]
        # Lossy formats shift values a little; solid colours survive within a few levels.
        _write(tmp_path / f"img_{i:02d}.{ext}", _solid(h, w, 10 * i))
        (tmp_path / f"img_{i:02d}.txt").write_text(f"caption {i}\n")
    return tmp_path


def _value(batch_pixels):
    return np.round((batch_pixels[..., 0].mean(axis=(1, 2)) + 1.0) * 127.5 / 10.0).astype(int)


def test_captions_paired_with_their_images(folder):
    with D.ImageCaptionDataset.from_folder(folder, batch_size=4, resolution=16, seed=3,
                                           num_epochs=2) as ds:
        batches = list(ds)
    assert len(batches) == 6
    seen = []
    for batch in batches:
        assert batch["pixels"].shape == (4, 16, 16, 3) and batch["pixels"].dtype == np.float32
        assert batch["captions"] == [f"caption {i}" for i in batch["index"]]
        np.testing.assert_array_equal(_value(batch["pixels"]), batch["index"])
        seen.extend(batch["index"].tolist())
    # Each epoch is a permutation of all 12 examples; the two epochs differ in order.
    assert sorted(seen[:12]) == sorted(seen[12:]) == list(range(12))
    assert seen[:12] != seen[12:]


def test_manifest_pairs_captions_and_names_bad_lines(tmp_path):
    (tmp_path / "imgs").mkdir()
    lines = []
    for i in range(4):
        _write(tmp_path / "imgs" / f"{i}.png", _solid(16, 16, 20 * i))
        lines.append(json.dumps({"image": f"imgs/{i}.png", "caption": f"  grey {20 * i} "}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n\n")
    ds = D.ImageCaptionDataset.from_manifest(tmp_path / "m.jsonl", batch_size=4, resolution=16,
                                             prefetch=0)
    batch = next(ds)
    values = np.round((batch["pixels"][..., 0].mean(axis=(1, 2)) + 1) * 127.5).astype(int)
    assert batch["captions"] == [f"grey {v}" for v in values]
    ds.close()
    (tmp_path / "bad.jsonl").write_text(lines[0] + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        D.read_manifest(tmp_path / "bad.jsonl")
    (tmp_path / "nocap.jsonl").write_text(json.dumps({"image": "imgs/0.png"}) + "\n")
    with pytest.raises(ValueError, match=r"nocap\.jsonl:1.*imgs/0\.png"):
        D.read_manifest(tmp_path / "nocap.jsonl")
    assert D.read_manifest(tmp_path / "nocap.jsonl", require_captions=False)[0].caption == ""


def test_center_crop_takes_the_middle_window(tmp_path):
    # Column c has value 5 c, so a crop shows which columns it kept.
    wide = np.repeat(np.repeat((np.arange(48) * 5)[None, :, None], 16, 0), 3, 2)
    out = D.resize_and_crop(Image.fromarray(wide.astype(np.uint8)), (16, 16), "center")
    assert out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out[0, :, 0], np.arange(16, 32) * 5)
    tall = np.transpose(wide, (1, 0, 2))
    out = D.resize_and_crop(Image.fromarray(tall.astype(np.uint8)), (16, 16), "center")
    np.testing.assert_array_equal(out[:, 0, 0], np.arange(16, 32) * 5)


def test_random_crop_is_a_window_at_varying_offsets():
    wide = np.repeat(np.repeat((np.arange(48) * 5)[None, :, None], 16, 0), 3, 2).astype(np.uint8)
    starts = set()
    for seed in range(12):
        out = D.resize_and_crop(Image.fromarray(wide), (16, 16), "random",
                                np.random.default_rng(seed))
        start = int(out[0, 0, 0]) // 5
        np.testing.assert_array_equal(out[0, :, 0], np.arange(start, start + 16) * 5)
        assert 0 <= start <= 32
        starts.add(start)
    assert len(starts) > 3


def test_resize_scales_shorter_side_then_crops(tmp_path):
    # 64 wide x 32 high: left half black, right half white -> shorter side 16 means 32 x 16, and
    # the centre 16 x 16 crop is half black, half white.
    image = np.zeros((32, 64, 3), np.uint8)
    image[:, 32:] = 255
    _write(tmp_path / "a.png", image)
    pixels = D.load_image(tmp_path / "a.png", (16, 16))
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.float32
    assert pixels.min() == -1.0 and pixels.max() == 1.0
    np.testing.assert_allclose(pixels[:, :7], -1.0)
    np.testing.assert_allclose(pixels[:, 9:], 1.0)
    flipped = D.load_image(tmp_path / "a.png", (16, 16), flip=True)
    np.testing.assert_array_equal(flipped, pixels[:, ::-1])


def test_non_square_resolution_crops_every_image_to_it(folder):
    with D.ImageCaptionDataset.from_folder(folder, batch_size=3, resolution=(8, 24),
                                           crop="random", random_flip=True, num_epochs=1) as ds:
        shapes = {b["pixels"].shape for b in ds}
    assert shapes == {(3, 8, 24, 3)}


def test_images_go_to_the_nearest_bucket_and_batches_keep_to_one(tmp_path):
    buckets = ((16, 16), (16, 32), (32, 16))
    assert D.nearest_bucket(20, 40, buckets) == 1
    assert D.nearest_bucket(40, 20, buckets) == 2
    assert D.nearest_bucket(30, 34, buckets) == 0
    assert D.nearest_bucket(30, 50, buckets) == 1  # ratio 0.6 is nearer 0.5 than 1 in log space
    expected = {}
    for i, (h, w) in enumerate([(20, 40), (40, 20), (30, 30), (21, 44), (44, 22), (16, 18)] * 2):
        _write(tmp_path / f"{i}.png", _solid(h, w, i))
        (tmp_path / f"{i}.txt").write_text(str(i))
        expected[i] = buckets[D.nearest_bucket(h, w, buckets)]
    with D.ImageCaptionDataset.from_folder(tmp_path, batch_size=2, buckets=buckets, seed=1,
                                           num_epochs=1) as ds:
        batches = list(ds)
        assert ds.stats()["bucket_sizes"] == {(16, 16): 4, (16, 32): 4, (32, 16): 4}
    assert len(batches) == 6
    for batch in batches:
        bucket = {expected[int(c)] for c in batch["captions"]}
        assert len(bucket) == 1
        assert batch["pixels"].shape[1:3] == bucket.pop()


def test_make_buckets_have_near_equal_area():
    buckets = D.make_buckets(512)
    assert (512, 512) in buckets and (384, 640) in buckets and (640, 384) in buckets
    for h, w in buckets:
        assert h % 64 == 0 and w % 64 == 0
        assert 0.8 * 512 ** 2 <= h * w <= 512 ** 2
        assert max(h / w, w / h) <= 2.0
    ratios = [h / w for h, w in buckets]
    assert ratios == sorted(ratios)


def test_exif_rotation_counts_for_the_bucket(tmp_path):
    image = Image.fromarray(_solid(20, 40, 100))  # stored wide
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees: tall
    image.save(tmp_path / "r.jpg", exif=exif)
    assert D.image_size(tmp_path / "r.jpg") == (40, 20)


def test_corrupt_files_skipped_counted_and_logged_once(folder, caplog):
    (folder / "garbage.png").write_bytes(b"this is not an image")
    (folder / "garbage.txt").write_text("garbage")
    png = folder / "truncated.png"
    _write(png, np.random.RandomState(0).randint(0, 255, (32, 32, 3)))
    png.write_bytes(png.read_bytes()[:200])  # header intact, pixel data cut
    (folder / "truncated.txt").write_text("truncated")
    with caplog.at_level(logging.WARNING):
        with D.ImageCaptionDataset.from_folder(folder, batch_size=13, resolution=16, seed=0,
                                               num_epochs=3) as ds:
            assert ds.stats()["skipped"] == 1  # the header failure shows when the dataset is built
            batches = list(ds)
            stats = ds.stats()
    assert stats["skipped"] == 2
    assert [p.rsplit("/", 1)[-1] for p in stats["skipped_files"]] == ["garbage.png", "truncated.png"]
    assert len(batches) == 3
    for batch in batches:
        assert batch["pixels"].shape == (13, 16, 16, 3)
        assert "truncated" not in batch["captions"] and "garbage" not in batch["captions"]
        np.testing.assert_array_equal(_value(batch["pixels"]), [int(c.split()[1]) for c in
                                                                batch["captions"]])
    messages = [r.getMessage() for r in caplog.records]
    assert sum("truncated.png" in m for m in messages) == 1
    assert sum("garbage.png" in m for m in messages) == 1


def test_missing_caption_names_the_file(folder):
    (folder / "img_05.txt").unlink()
    with pytest.raises(ValueError, match=r"img_05\.(png|jpg|webp).*img_05\.txt"):
        D.ImageCaptionDataset.from_folder(folder, batch_size=2)
    records = D.read_image_folder(folder, require_captions=False)
    assert [r.caption for r in records if "img_05" in r.image] == [""]


def test_empty_and_unreadable_datasets_name_the_folder(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path)):
        D.ImageCaptionDataset.from_folder(tmp_path, batch_size=2)
    (tmp_path / "x.png").write_bytes(b"junk")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(ValueError, match=f"{tmp_path}.*none of its 1 files"):
        D.ImageCaptionDataset.from_folder(tmp_path, batch_size=1)


def test_too_few_images_for_a_batch_is_an_error(folder):
    with pytest.raises(ValueError, match="full global batch of 16"):
        D.ImageCaptionDataset.from_folder(folder, batch_size=16)


def test_resume_from_state_dict_yields_the_same_remaining_sequence(folder):
    kwargs = dict(batch_size=3, resolution=16, crop="random", random_flip=True, seed=11,
                  buckets=((16, 16), (16, 24), (24, 16)), prefetch=3)
    with D.ImageCaptionDataset.from_folder(folder, **kwargs) as ds:
        take(ds, 5)
        saved = json.loads(json.dumps(ds.state_dict()))  # serialisable
        expected = take(ds, 6)  # crosses an epoch boundary (4 batches per epoch here)
    assert ds.batches_per_epoch == 4 and (saved["epoch"], saved["index"]) == (1, 1)
    with D.ImageCaptionDataset.from_folder(folder, **kwargs) as resumed:
        resumed.load_state_dict(saved)
        got = take(resumed, 6)
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a["index"], b["index"])
        np.testing.assert_array_equal(a["pixels"], b["pixels"])
        assert a["captions"] == b["captions"]
    # Reloading mid-iteration rewinds the same object too.
    with D.ImageCaptionDataset.from_folder(folder, **kwargs) as ds:
        first = take(ds, 2)
        ds.load_state_dict({**ds.state_dict(), "epoch": 0, "index": 0})
        again = take(ds, 2)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["pixels"], b["pixels"])


def test_resume_rejects_a_different_dataset(folder):
    ds = D.ImageCaptionDataset.from_folder(folder, batch_size=4, resolution=16, seed=1)
    other = D.ImageCaptionDataset.from_folder(folder, batch_size=4, resolution=16, seed=2)
    with pytest.raises(ValueError, match="seed=1.*seed=2"):
        other.load_state_dict(ds.state_dict())
    ds.close()
    other.close()


def test_two_hosts_read_disjoint_halves_of_each_global_batch(folder):
    kwargs = dict(batch_size=4, resolution=16, seed=5, num_epochs=2, crop="random",
                  buckets=((16, 16), (16, 24), (24, 16)))
    with D.ImageCaptionDataset.from_folder(folder, **kwargs) as single:
        whole = list(single)
    halves = []
    for p in range(2):
        with D.ImageCaptionDataset.from_folder(folder, process_index=p, process_count=2,
                                               **kwargs) as host:
            halves.append(list(host))
    assert len(whole) == len(halves[0]) == len(halves[1]) > 0
    for g, h0, h1 in zip(whole, *halves):
        assert h0["pixels"].shape[0] == h1["pixels"].shape[0] == 2
        assert not set(h0["index"]) & set(h1["index"])
        np.testing.assert_array_equal(np.concatenate([h0["index"], h1["index"]]), g["index"])
        np.testing.assert_array_equal(np.concatenate([h0["pixels"], h1["pixels"]]), g["pixels"])
        assert h0["captions"] + h1["captions"] == g["captions"]
    with pytest.raises(ValueError, match="multiple of process_count 3"):
        D.ImageCaptionDataset.from_folder(folder, batch_size=4, process_count=3)


@pytest.mark.parametrize("separate_dir", [False, True])
def test_precomputed_latents_replace_pixels(folder, tmp_path_factory, separate_dir):
    latents_dir = tmp_path_factory.mktemp("latents") if separate_dir else None
    records = D.read_image_folder(folder)
    stored = {}
    for i, r in enumerate(records):
        path = D.latent_path(r.image, folder, latents_dir)
        stored[r.caption] = np.full((2, 3, 4), i, np.float32)
        np.save(path, stored[r.caption])
    with D.ImageCaptionDataset.from_folder(folder, batch_size=4, use_latents=True,
                                           latents_dir=latents_dir, num_epochs=1) as ds:
        batches = list(ds)
    assert len(batches) == 3
    for batch in batches:
        assert "pixels" not in batch and batch["latents"].shape == (4, 2, 3, 4)
        for latent, caption in zip(batch["latents"], batch["captions"]):
            np.testing.assert_array_equal(latent, stored[caption])
    D.Path(D.latent_path(records[3].image, folder, latents_dir)).unlink()
    with pytest.raises(ValueError, match="img_03.*img_03.npy"):
        D.ImageCaptionDataset.from_folder(folder, batch_size=4, use_latents=True,
                                          latents_dir=latents_dir)


def test_tokenizer_runs_on_the_loading_side(folder):
    def tokenizer(captions):
        return np.asarray([[int(c.split()[1]), 0] for c in captions], np.int32)

    with D.ImageCaptionDataset.from_folder(folder, batch_size=4, resolution=8, num_epochs=1,
                                           tokenizer=tokenizer) as ds:
        batch = next(ds)
    np.testing.assert_array_equal(batch["input_ids"][:, 0], batch["index"])


def test_unshuffled_dataset_reads_in_order_and_stops_after_its_epochs(folder):
    with D.ImageCaptionDataset.from_folder(folder, batch_size=4, resolution=8, shuffle=False,
                                           num_epochs=1, prefetch=0) as ds:
        order = [i for b in ds for i in b["index"]]
        assert order == list(range(12))
        assert ds.state_dict()["epoch"] == 1 and ds.state_dict()["index"] == 0


def test_prefetcher_is_bounded_propagates_errors_and_closes():
    produced = []

    def source():
        for i in itertools.count():
            produced.append(i)
            yield i

    p = D.Prefetcher(source(), size=2)
    assert next(p) == 0
    time.sleep(0.2)
    assert len(produced) <= 4  # one handed out, two queued, one waiting to be queued
    p.close()
    assert not any(t.name == p._thread.name and t.is_alive() for t in threading.enumerate())

    def failing():
        yield 1
        raise OSError("disk gone")

    p = D.Prefetcher(failing(), size=2)
    assert next(p) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(p)
    p.close()
    done = D.Prefetcher(iter([1]), size=1)
    assert list(done) == [1]
    with pytest.raises(StopIteration):
        next(done)


def test_config_caption_transform_rewrites_captions_per_epoch(tmp_path):
    from configs import train_tiny
    from sdjax.data import shapes
    from sdjax.data.shapes_dataset import write_shapes_folder
    from sdjax.training import loop

    folder = write_shapes_folder(tmp_path / "world", 8, seed=2, examples=shapes.world_examples)
    config = train_tiny.get_config("ldm")
    config.data.folder, config.data.batch_size, config.data.shuffle = str(folder), 8, False
    config.data.caption_transform = "sdjax.data.shapes:prompt_phrasing"
    full = sorted((folder / f"{i:06d}.txt").read_text().strip() for i in range(8))
    batches = take(iter(loop.make_dataset(config, None)), 2)
    captions = [c for b in batches for c in b["captions"]]
    # each caption is still its image's scene, written another way in some epoch
    assert sorted(captions[:8]) != full or sorted(captions[8:]) != full
    assert captions[:8] != captions[8:]
    truths = [shapes.parse_caption(t) for t in full]
    for text in captions:
        scene = shapes.parse_caption(text)
        assert any([(o.colour, o.shape) for o in scene.objects]
                   == [(o.colour, o.shape) for o in t.objects] for t in truths), text
    config.data.caption_transform = "sdjax.data.shapes:no_such_function"
    with pytest.raises(ValueError, match="no_such_function"):
        loop.make_dataset(config, None)
