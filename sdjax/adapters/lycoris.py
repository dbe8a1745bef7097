"""LyCORIS modules as the WebUI applies them (AUTOMATIC1111's `extensions-builtin/Lora`:
network_hada.py, network_lokr.py, network_full.py, the Tucker form of network_lora.py,
lyco_helpers.py, and `NetworkModule.calc_scale` / `finalize_updown` in network.py): each module's
dense update, in PyTorch layout and float32, and the scale the WebUI multiplies it by.

A module is the dict of its parts, named by what follows the module's name in the file's keys
(`hada_w1_a`, `lokr_w2`, `diff`, `alpha`, ...); LoRA factors are `down`, `up` and `mid` here.
"""
from __future__ import annotations

from typing import Collection, Mapping, Optional

import numpy as np

LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
FULL_PARTS = ("diff", "diff_b")
# `scale` replaces alpha / dim; `bias` is added to the update before it is scaled.
COMMON_PARTS = ("alpha", "scale", "bias")


def kind(parts: Collection[str]) -> Optional[str]:
    """The WebUI's module type for a module's parts, tried in its order: "lora", "loha", "lokr",
    "full"; None when the parts make none of them."""
    parts = set(parts)
    if {"down", "up"} <= parts:
        return "lora"
    if {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= parts:
        return "loha"
    has_1 = "lokr_w1" in parts or {"lokr_w1_a", "lokr_w1_b"} <= parts
    has_2 = "lokr_w2" in parts or {"lokr_w2_a", "lokr_w2_b"} <= parts
    if has_1 and has_2:
        return "lokr"
    if "diff" in parts:
        return "full"
    return None


def update(module_kind: str, w: Mapping[str, np.ndarray]) -> tuple[np.ndarray, Optional[int]]:
    """The module's dense update (before scaling; the caller reshapes it to the layer's weight when
    the sizes agree, as the WebUI does) and its `dim`: None where the WebUI leaves it unset, so
    that alpha does not apply (full differences, LoKr with neither factor decomposed)."""
    w = {k: np.asarray(v, np.float32) for k, v in w.items()}
    if module_kind == "lora":
        up, down = _rows(w["up"]), w["down"]
        if "mid" in w:
            out = np.einsum("nmkl,in,mj->ijkl", w["mid"], up, _rows(down))
        else:
            out = (up @ _rows(down)).reshape((up.shape[0], down.shape[1]) + down.shape[2:])
        dim = down.shape[0]
    elif module_kind == "loha":
        out, dim = _hadamard(w), w["hada_w1_b"].shape[0]
    elif module_kind == "lokr":
        out, dim = _kronecker(w)
    elif module_kind == "full":
        out, dim = w["diff"], None
    else:
        raise ValueError(f"unknown LyCORIS module kind {module_kind!r}")
    if "bias" in w:
        out = out + w["bias"].reshape(out.shape)
    return out, dim


def scale(w: Mapping[str, np.ndarray], dim: Optional[int]) -> float:
    """`NetworkModule.calc_scale`: the module's `scale` if it has one, else alpha / dim when both
    are known, else 1."""
    if "scale" in w:
        return scalar(w["scale"])
    if dim is not None and "alpha" in w:
        return scalar(w["alpha"]) / dim
    return 1.0


def scalar(x: np.ndarray) -> float:
    """A one-element tensor's value (`alpha` is stored 0-d or (1,)), as torch's `.item()`."""
    x = np.asarray(x)
    if x.size != 1:
        raise ValueError(f"a scalar is stored with shape {x.shape}")
    return float(x.reshape(()))


def _rows(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1)


def tucker(core: np.ndarray, wa: np.ndarray, wb: np.ndarray) -> np.ndarray:
    """lyco_helpers.make_weight_cp: core (r, r, kh, kw) with wa (r, out), wb (r, in) ->
    (out, in, kh, kw)."""
    return np.einsum("ijkl,ir->rjkl", np.einsum("ijkl,jr->irkl", core, wb), wa)


def _hadamard(w: Mapping[str, np.ndarray]) -> np.ndarray:
    """LoHa: (w1a . w1b) * (w2a . w2b), each factor pair optionally with a Tucker core."""
    def product(a: str, b: str, core: str) -> np.ndarray:
        if core in w:
            return tucker(w[core], w[a], w[b])
        return _rows(w[a]) @ _rows(w[b])

    first = product("hada_w1_a", "hada_w1_b", "hada_t1")
    second = product("hada_w2_a", "hada_w2_b", "hada_t2")
    if first.ndim != second.ndim:  # one factor pair has a Tucker core: both take its 4-d shape
        shape = first.shape if first.ndim == 4 else second.shape
        first, second = first.reshape(shape), second.reshape(shape)
    return first * second


def _kronecker(w: Mapping[str, np.ndarray]) -> tuple[np.ndarray, Optional[int]]:
    """LoKr: w1 (x) w2, each given whole or as a low-rank pair (w2 also with a Tucker core); dim is
    the rank of the decomposed factor (w2's when both are)."""
    dim = None
    if "lokr_w1" in w:
        w1 = w["lokr_w1"]
    else:
        w1, dim = w["lokr_w1_a"] @ w["lokr_w1_b"], w["lokr_w1_b"].shape[0]
    if "lokr_w2" in w:
        w2 = w["lokr_w2"]
    else:
        dim = w["lokr_w2_b"].shape[0]
        w2 = (tucker(w["lokr_t2"], w["lokr_w2_a"], w["lokr_w2_b"]) if "lokr_t2" in w
              else w["lokr_w2_a"] @ w["lokr_w2_b"])
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    return np.kron(w1, w2), dim
