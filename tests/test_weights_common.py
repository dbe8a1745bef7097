"""The shared checkpoint machinery: the safetensors reader and the checked conversion routine."""
import numpy as np
import pytest
from safetensors.numpy import save_file

from sdjax.weights.common import (DictSource, MergedSource, SafetensorsFile, WeightsError,
                                  convert_state_dict, regex_renamer)


@pytest.fixture()
def small_file(tmp_path):
    tensors = {"conv.weight": np.random.RandomState(0).randn(8, 3, 3, 3).astype(np.float16),
               "dense.weight": np.random.RandomState(1).randn(5, 8).astype(np.float32),
               "dense.bias": np.zeros((5,), np.float32)}
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path, tensors


def test_reader_returns_every_tensor_exactly(small_file):
    path, tensors = small_file
    source = SafetensorsFile(path)
    assert sorted(source) == sorted(tensors)
    for key, value in tensors.items():
        assert source[key].dtype == value.dtype
        np.testing.assert_array_equal(source[key], value)
    assert source.metadata() == {"format": "pt"}


def test_truncated_file_is_named(small_file):
    path, _ = small_file
    data = path.read_bytes()
    cut = path.with_name("cut.safetensors")
    cut.write_bytes(data[:-10])
    with pytest.raises(WeightsError, match=r"cut\.safetensors: truncated"):
        SafetensorsFile(cut)


@pytest.mark.parametrize("content", [b"", b"\x80\x02}q\x00.", b"PK\x03\x04" + b"\x00" * 64,
                                     (20).to_bytes(8, "little") + b"{not json at all...}"])
def test_non_safetensors_file_is_refused(tmp_path, content):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=r"weights\.safetensors: not a safetensors file"):
        SafetensorsFile(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(WeightsError, match="nowhere.safetensors: no such file"):
        SafetensorsFile(tmp_path / "nowhere.safetensors")


def _expected():
    return {"conv": {"kernel": np.zeros((3, 3, 3, 8), np.float32)},
            "dense": {"kernel": np.zeros((8, 5), np.float32), "bias": np.zeros((5,), np.float32)}}


RENAME = regex_renamer([(r"(\w+)\.weight", r"\1/kernel"), (r"(\w+)\.bias", r"\1/bias")])


def test_conversion_transposes_to_sdjax_layouts(small_file):
    path, tensors = small_file
    params = convert_state_dict(SafetensorsFile(path), RENAME, _expected(), what="toy")
    np.testing.assert_array_equal(params["conv"]["kernel"],
                                  tensors["conv.weight"].astype(np.float32).transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["dense"]["kernel"], tensors["dense.weight"].T)
    assert params["conv"]["kernel"].dtype == np.float32


def test_conversion_errors_name_file_and_key(small_file):
    path, tensors = small_file
    missing = DictSource({k: v for k, v in tensors.items() if k != "dense.bias"}, name="a.safetensors")
    with pytest.raises(WeightsError, match=r"a\.safetensors: toy: missing keys for: dense/bias"):
        convert_state_dict(missing, RENAME, _expected(), what="toy")
    extra = DictSource({**tensors, "head.weight": np.zeros((2, 2))}, name="b.safetensors")
    with pytest.raises(WeightsError, match=r"b\.safetensors: toy: unexpected keys: head\.weight"):
        convert_state_dict(extra, RENAME, _expected(), what="toy")
    wrong = DictSource({**tensors, "dense.bias": np.zeros((6,))}, name="c.safetensors")
    with pytest.raises(WeightsError, match=r"c\.safetensors: toy: shape mismatch for dense\.bias: "
                                           r"expected \(5,\) .*got \(6,\)"):
        convert_state_dict(wrong, RENAME, _expected(), what="toy")


def test_merged_source_rejects_duplicates():
    a = DictSource({"x": np.zeros(1)}, name="part1")
    b = DictSource({"x": np.zeros(1)}, name="part2")
    with pytest.raises(WeightsError, match="'x' appears in both part1 and part2"):
        MergedSource([a, b], name="index.json")


def test_converted_params_are_aligned_for_zero_copy_placement(small_file):
    import jax

    path, _ = small_file
    params = convert_state_dict(SafetensorsFile(path), RENAME, _expected(), what="toy")
    leaves = jax.tree.leaves(params)
    assert all(leaf.ctypes.data % 64 == 0 and leaf.flags.c_contiguous for leaf in leaves)
    if jax.default_backend() == "cpu":
        # XLA's CPU client adopts 64-byte-aligned host memory: placing loaded params is free.
        placed = jax.device_put(params)
        assert all(p.unsafe_buffer_pointer() == leaf.ctypes.data
                   for p, leaf in zip(jax.tree.leaves(placed), leaves))
