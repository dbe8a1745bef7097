"""save_pretrained never deletes what sdjax did not write, and native folders load from relative
paths."""
import os

import jax
import numpy as np
import pytest

from sdjax.weights import pretrained
from sdjax.weights.common import WeightsError
from sdjax.weights.presets import random_pretrained


@pytest.fixture(scope="module")
def tiny():
    return random_pretrained("tiny")


def _same(a, b):
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_saving_into_the_working_directory_is_refused_and_deletes_nothing(tiny, tmp_path,
                                                                          monkeypatch):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsError, match=r"not empty and not an sdjax model.*data, notes.txt"):
        pretrained.save_pretrained(tiny, ".")
    assert sorted(os.listdir(tmp_path)) == ["data", "notes.txt"]


def test_overwrite_adds_the_model_beside_other_files(tiny, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    pretrained.save_pretrained(tiny, tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    _same(tiny, pretrained.load_pretrained(tmp_path))


def test_saving_over_a_model_keeps_the_users_files_and_replaces_the_model(tiny, tmp_path):
    folder = tmp_path / "model"
    pretrained.save_pretrained(tiny, folder)
    (folder / "README.md").write_text("my notes")
    other = random_pretrained("tiny", seed=1)
    pretrained.save_pretrained(other, folder)
    assert (folder / "README.md").read_text() == "my notes"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "params", "sdjax.json",
                                                        "tokenizer"]
    _same(other, pretrained.load_pretrained(folder))


def test_a_file_in_the_way_is_an_error(tiny, tmp_path):
    (tmp_path / "model").write_text("x")
    with pytest.raises(WeightsError, match="model: exists and is not a folder"):
        pretrained.save_pretrained(tiny, tmp_path / "model")


def test_native_folder_loads_from_a_relative_path(tiny, tmp_path, monkeypatch):
    pretrained.save_pretrained(tiny, tmp_path / "runs" / "export")
    monkeypatch.chdir(tmp_path)
    _same(tiny, pretrained.load_pretrained(os.path.join("runs", "export")))
    monkeypatch.chdir(tmp_path / "runs")
    _same(tiny, pretrained.load_pretrained("export"))
