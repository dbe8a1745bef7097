"""Textual-inversion embeddings: sdjax's `with_embeddings` against diffusers'
`load_textual_inversion` on tiny SD 1.x and SDXL pipelines (same files, same prompts, same
text-encoder outputs), the file layouts and their faults, and drawing with a model that carries
embeddings."""
from __future__ import annotations

import dataclasses
import logging
import pathlib
import re

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from sdjax.adapters.embeddings import read_embedding, with_embeddings
from sdjax.adapters.network import AdapterError
from sdjax.text.conditioning import encode_text
from sdjax.text.prompts import CHUNK_TOKENS, apply_emphasis, tokenize_weighted
from sdjax.weights.architecture import Architecture

RTOL = 1e-5  # max |sdjax - reference| / max |reference|
# Text encoders with the real vocabulary (the tiny_sd ones have 1000 tokens, which new ids after
# the 49408 of the tokenizer would not reach) and the real configs' legacy eos_token_id 2, with
# which transformers pools at the highest id: a textual-inversion token when one is present.
_TEXT = dict(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
             bos_token_id=0, pad_token_id=1, eos_token_id=2)
_TEXT_2 = dict(_TEXT, hidden_size=128, intermediate_size=256, hidden_act="gelu", projection_dim=32)


def _vectors(seed: int, n: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.5, (n, width)).astype(np.float32)


def _relative_error(actual, expected) -> float:
    expected = np.asarray(expected, np.float64)
    difference = np.abs(np.asarray(actual, np.float64) - expected)
    return float(np.max(difference) / np.max(np.abs(expected)))


def _condition(model, prompt: str) -> dict:
    """sdjax's conditioning of one prompt (WebUI syntax), as sampling computes it."""
    rows = [tokenize_weighted(t, prompt) for t in model.tokenizers]
    ids = np.stack([i for i, _ in rows])[None]
    out = encode_text(Architecture.of(model), model.params, jnp.asarray(ids),
                      jnp.asarray(rows[0][1])[None])
    return {k: np.asarray(v) for k, v in out.items()}


def _folder_with_text_encoders(tiny_sd, family: str, root: pathlib.Path) -> pathlib.Path:
    """A diffusers folder of tiny_sd's U-Net and VAE with full-vocabulary text encoders."""
    import torch
    import transformers

    from benchmarks.checkpoints import save_diffusers_folder
    from sdjax.weights.presets import preset

    torch.manual_seed(7)
    parts = {k: tiny_sd.parts(family)[k] for k in ("unet", "vae")}
    parts["text_encoder"] = transformers.CLIPTextModel(transformers.CLIPTextConfig(**_TEXT))
    if family == "sdxl":
        parts["text_encoder_2"] = transformers.CLIPTextModelWithProjection(
            transformers.CLIPTextConfig(**_TEXT_2))
    # Layer norms with biases, as trained ones have: with the initial zero biases the states'
    # mean is ~0, where emphasis leaves the mean alone (`prompts.apply_emphasis`).
    with torch.no_grad():
        for name in ("text_encoder", "text_encoder_2")[:len(parts) - 2]:
            for module in parts[name].modules():
                if isinstance(module, torch.nn.LayerNorm):
                    module.weight.normal_(1.0, 0.1)
                    module.bias.normal_(0.2, 0.1)
    return save_diffusers_folder(parts, root / family, scheduler=preset("sd15")["scheduler"],
                                 pipeline_class="StableDiffusionXLPipeline" if family == "sdxl"
                                 else "StableDiffusionPipeline")


def _reference_pipeline(tiny_sd, folder: pathlib.Path, family: str):
    """A fresh diffusers pipeline over the folder's text encoders (load_textual_inversion changes
    them in place)."""
    import diffusers
    import transformers

    parts = tiny_sd.parts(family)
    common = dict(unet=parts["unet"], vae=parts["vae"],
                  scheduler=diffusers.PNDMScheduler(steps_offset=1),
                  text_encoder=transformers.CLIPTextModel.from_pretrained(folder / "text_encoder"),
                  tokenizer=transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer"))
    if family == "sdxl":
        return diffusers.StableDiffusionXLPipeline(
            text_encoder_2=transformers.CLIPTextModelWithProjection.from_pretrained(
                folder / "text_encoder_2"),
            tokenizer_2=transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
            **common)
    return diffusers.StableDiffusionPipeline(safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False, **common)


# --- SD 1.x: every file layout, against diffusers ------------------------------------------------

@pytest.fixture(scope="module")
def sd1(tiny_sd, tmp_path_factory):
    """(folder, sdjax model, embedding files: {name: (path, token diffusers must be given)})."""
    from sdjax.weights.pretrained import load_pretrained

    root = tmp_path_factory.mktemp("textual_inversion")
    folder = _folder_with_text_encoders(tiny_sd, "sd1", root)
    files = root / "embeddings"
    files.mkdir()
    # WebUI / kohya: emb_params, 3 vectors, float16 as many files are; token = the file name.
    save_file({"emb_params": _vectors(1, 3, 64).astype(np.float16)},
              str(files / "zorblat.safetensors"))
    # diffusers learned_embeds: {token: one 1-D vector}; token = the key.
    save_file({"<cat-toy>": _vectors(2, 1, 64)[0]}, str(files / "learned_embeds.safetensors"))
    # A flattened WebUI .pt: string_to_param.* (and its string_to_token.*), 2 vectors.
    save_file({"string_to_param.*": _vectors(3, 2, 64),
               "string_to_token.*": np.array([265], np.int64)}, str(files / "qwopix.safetensors"))
    layouts = {"zorblat": (files / "zorblat.safetensors", "zorblat"),
               "<cat-toy>": (files / "learned_embeds.safetensors", None),
               "qwopix": (files / "qwopix.safetensors", "qwopix")}
    model = load_pretrained(folder)
    loaded = with_embeddings(model, [path for path, _ in layouts.values()])
    return folder, model, loaded, layouts


@pytest.fixture(scope="module")
def sd1_reference(sd1, tiny_sd):
    """diffusers' pipeline with the same files loaded by `load_textual_inversion`."""
    import torch

    from safetensors.torch import load_file

    folder, _, _, layouts = sd1
    pipe = _reference_pipeline(tiny_sd, folder, "sd1")
    # diffusers reads a single-tensor file's key as its token: the WebUI files need theirs given;
    # it refuses a file of two keys, so the flattened .pt's vectors go in as a tensor.
    sources = [str(p) for p, _ in layouts.values()]
    sources[2] = load_file(sources[2])["string_to_param.*"]
    pipe.load_textual_inversion(sources, token=[t for _, t in layouts.values()])

    def encode(prompt: str) -> np.ndarray:
        with torch.no_grad():
            embeds, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
        return embeds.numpy()

    def ids(prompt: str) -> list[int]:
        converted = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
        return pipe.tokenizer(converted, padding="max_length", max_length=77,
                              truncation=True).input_ids

    return encode, ids


PARITY_PROMPTS = ["a photo of zorblat on a table", "<cat-toy> and zorblat, qwopix",
                  "zorblat next to zorblat", "qwopix", "a plain prompt without embeddings"]


@pytest.mark.parametrize("prompt", PARITY_PROMPTS)
def test_ids_and_text_encoder_output_equal_diffusers(sd1, sd1_reference, prompt):
    _, _, loaded, _ = sd1
    encode, reference_ids = sd1_reference
    ids, weights = tokenize_weighted(loaded.tokenizers[0], prompt)
    assert ids.tolist() == [reference_ids(prompt)]
    assert loaded.tokenizers[0]([prompt]).tolist() == [reference_ids(prompt)]
    assert np.all(weights == 1)
    context = _condition(loaded, prompt)["context"]
    assert _relative_error(context, encode(prompt)) <= RTOL


def test_multi_vector_token_takes_the_ids_after_the_vocabulary(sd1):
    _, _, loaded, _ = sd1
    tokenizer = loaded.tokenizers[0]
    # The order the files were given: zorblat (3 vectors), <cat-toy> (1), qwopix (2).
    assert tokenizer.encode("zorblat <cat-toy> qwopix") == list(range(49408, 49414))
    assert len(tokenizer) == 49414 == loaded.text_configs[0].vocab_size
    table = loaded.params["text_encoder"]["token_embedding"]["embedding"]
    assert table.shape == (49414, 64)
    np.testing.assert_array_equal(table[49408:49411],
                                  _vectors(1, 3, 64).astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(table[49411], _vectors(2, 1, 64)[0])


def test_tokens_match_in_any_case_and_only_as_whole_words(sd1):
    tokenizer = sd1[2].tokenizers[0]
    assert tokenizer.encode("a ZorBlat, b") == tokenizer.encode("a zorblat, b")
    assert 49408 in tokenizer.encode("a ZorBlat, b")
    # Inside a longer word it is not the token (diffusers would match it there; the WebUI not).
    assert not set(tokenizer.encode("xzorblat zorblaty")) & set(range(49408, 49414))


def test_emphasis_weighs_every_vector_of_a_token(sd1, sd1_reference):
    _, _, loaded, _ = sd1
    encode, reference_ids = sd1_reference
    ids, weights = tokenize_weighted(loaded.tokenizers[0], "a (zorblat:1.3) on [qwopix]")
    assert ids.tolist() == [reference_ids("a zorblat on qwopix")]
    expected = np.ones(77, np.float32)
    expected[2:5] = 1.3       # zorblat's three vectors
    expected[6:8] = 1 / 1.1   # qwopix's two
    np.testing.assert_allclose(weights[0], expected, rtol=1e-6)
    # The WebUI's emphasis on diffusers' hidden states of the same ids.
    hidden = encode("a zorblat on qwopix")
    scaled = hidden * expected[None, :, None]
    reference = scaled * (hidden.mean() / scaled.mean())
    context = _condition(loaded, "a (zorblat:1.3) on [qwopix]")["context"]
    assert _relative_error(context, reference) <= RTOL
    emphasised = apply_emphasis(jnp.asarray(hidden), jnp.asarray(expected)[None])
    assert _relative_error(np.asarray(emphasised), reference) <= RTOL


def test_a_token_that_would_straddle_a_chunk_starts_the_next(sd1, sd1_reference):
    _, _, loaded, _ = sd1
    encode, _ = sd1_reference
    filler = "a " * (CHUNK_TOKENS - 2)  # 73 tokens: zorblat's 3 vectors do not fit after them
    ids, _ = tokenize_weighted(loaded.tokenizers[0], filler + "(zorblat:1.2)")
    assert ids.shape == (2, 77)
    assert ids[0, 1:CHUNK_TOKENS - 1].tolist() == [320] * (CHUNK_TOKENS - 2)
    assert ids[0, CHUNK_TOKENS - 1] == 49407  # EOS right after the filler, then padding
    assert ids[1, :5].tolist() == [49406, 49408, 49409, 49410, 49407]
    # Each chunk is its own CLIP window: diffusers' encoding of the filler, then of the token.
    context = _condition(loaded, filler + "zorblat")["context"]
    assert _relative_error(context[:, :77], encode(filler.strip())) <= RTOL
    assert _relative_error(context[:, 77:], encode("zorblat")) <= RTOL


def test_two_vectors_still_fit_at_the_end_of_a_chunk(sd1):
    ids, _ = tokenize_weighted(sd1[2].tokenizers[0], "a " * (CHUNK_TOKENS - 2) + "qwopix")
    assert ids.shape == (1, 77)
    assert ids[0, CHUNK_TOKENS - 1:].tolist() == [49412, 49413, 49407]


def test_original_model_is_unchanged(sd1):
    _, model, loaded, _ = sd1
    assert len(model.tokenizers[0]) == 49408 and model.text_configs[0].vocab_size == 49408
    assert model.params["text_encoder"]["token_embedding"]["embedding"].shape == (49408, 64)
    assert max(model.tokenizers[0].encode("zorblat <cat-toy> qwopix")) < 49408
    assert loaded.params["unet"] is model.params["unet"]  # untouched parts are shared, not copied


def test_caller_token_replaces_the_files(sd1, tmp_path):
    _, model, _, layouts = sd1
    loaded = with_embeddings(model, [layouts["<cat-toy>"][0], layouts["zorblat"][0]],
                             tokens=["<mine>", None])
    assert loaded.tokenizers[0].encode("<mine> zorblat") == [49408, 49409, 49410, 49411]
    assert loaded.tokenizers[0].encode("<cat-toy>") != [49408]


def test_save_pretrained_keeps_the_tokens(sd1, tmp_path):
    from sdjax.weights.pretrained import load_pretrained, save_pretrained

    loaded = sd1[2]
    save_pretrained(loaded, tmp_path / "native")
    again = load_pretrained(tmp_path / "native")
    prompt = "<cat-toy> and zorblat, qwopix"
    assert again.tokenizers[0]([prompt]).tolist() == loaded.tokenizers[0]([prompt]).tolist()
    np.testing.assert_array_equal(again.params["text_encoder"]["token_embedding"]["embedding"],
                                  loaded.params["text_encoder"]["token_embedding"]["embedding"])


def test_a_tokenizer_saved_with_tokens_reads_the_same_in_transformers(sd1, tmp_path):
    import transformers

    from sdjax.text.tokenizer import CLIPTokenizer

    tokenizer = sd1[2].tokenizers[0]
    tokenizer.save_pretrained(tmp_path / "ours")
    reference = transformers.CLIPTokenizer.from_pretrained(tmp_path / "ours")
    # transformers does not expand tokens: diffusers writes the vectors' names into the prompt.
    expanded = "zorblat zorblat_1 zorblat_2, <cat-toy> qwopix qwopix_1 xzorblat"
    assert (reference(expanded, padding="max_length", max_length=77).input_ids
            == tokenizer(["zorblat, <cat-toy> qwopix xzorblat"])[0].tolist())
    # And a folder transformers saved (tokenizer.json) gives sdjax the same tokens and expansions.
    reference.save_pretrained(tmp_path / "theirs")
    theirs = CLIPTokenizer.from_pretrained(tmp_path / "theirs")
    assert theirs.added_encoder == tokenizer.added_encoder
    assert theirs.encode("zorblat qwopix") == tokenizer.encode("zorblat qwopix")


# --- SDXL: clip_l and clip_g, pooled output ------------------------------------------------------

@pytest.fixture(scope="module")
def sdxl(tiny_sd, tmp_path_factory):
    from sdjax.weights.pretrained import load_pretrained

    root = tmp_path_factory.mktemp("textual_inversion_xl")
    folder = _folder_with_text_encoders(tiny_sd, "sdxl", root)
    path = root / "xlemb.safetensors"
    save_file({"clip_l": _vectors(4, 2, 64), "clip_g": _vectors(5, 2, 128)}, str(path))
    return folder, load_pretrained(folder), path


@pytest.mark.parametrize("eos_token_id", [2, 49407], ids=["legacy_eos_argmax", "first_eos"])
def test_sdxl_file_loads_both_encoders_as_diffusers(sdxl, tiny_sd, eos_token_id):
    import torch
    from safetensors.torch import load_file

    folder, model, path = sdxl
    loaded = with_embeddings(model, [path])
    assert [len(t) for t in loaded.tokenizers] == [49410, 49410]
    table_2 = loaded.params["text_encoder_2"]["token_embedding"]["embedding"]
    np.testing.assert_array_equal(table_2[49408:], _vectors(5, 2, 128))
    # transformers pools at the highest id with the legacy eos_token_id (here the embedding's last
    # vector), at the first EOS otherwise: sdjax must pool where it does.
    loaded = dataclasses.replace(loaded, text_configs=tuple(
        dataclasses.replace(c, eos_token_id=eos_token_id) for c in loaded.text_configs))
    pipe = _reference_pipeline(tiny_sd, folder, "sdxl")
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):  # read at each forward
        getattr(encoder, "text_model", encoder).eos_token_id = eos_token_id
    state = load_file(str(path))  # as diffusers' docs load SDXL embeddings
    pipe.load_textual_inversion(state["clip_l"], token="xlemb", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token="xlemb", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    for prompt in ("a photo of xlemb in the snow", "no token here"):
        with torch.no_grad():
            embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu",
                                                      do_classifier_free_guidance=False)
        out = _condition(loaded, prompt)
        assert _relative_error(out["context"], embeds.numpy()) <= RTOL, prompt
        assert _relative_error(out["text_embeds"], pooled.numpy()) <= RTOL, prompt


def test_pooling_position_differs_with_the_legacy_eos(sdxl):
    """The parity above is only meaningful if the two pooling rules pick different positions."""
    _, model, path = sdxl
    loaded = with_embeddings(model, [path])
    pooled = {}
    for eos in (2, 49407):
        variant = dataclasses.replace(loaded, text_configs=tuple(
            dataclasses.replace(c, eos_token_id=eos) for c in loaded.text_configs))
        pooled[eos] = _condition(variant, "a photo of xlemb")["text_embeds"]
    assert _relative_error(pooled[2], pooled[49407]) > 1e-2


def test_single_table_file_does_not_fit_sdxl(sdxl, sd1):
    _, model, _ = sdxl
    with pytest.raises(AdapterError, match=r"zorblat\.safetensors: one table .* 2 text encoder"):
        with_embeddings(model, [sd1[3]["zorblat"][0]])


def test_sdxl_file_does_not_fit_sd1(sdxl, sd1):
    with pytest.raises(AdapterError,
                       match=r"xlemb\.safetensors: an SDXL embedding .* 1 text encoder"):
        with_embeddings(sd1[1], [sdxl[2]])


# --- folders and faults ---------------------------------------------------------------------------

def test_folder_finds_embeddings_by_file_name(sd1, sdxl, tmp_path, caplog):
    import shutil

    _, model, _, layouts = sd1
    (tmp_path / "sub").mkdir()
    shutil.copy(layouts["zorblat"][0], tmp_path / "firstzq.safetensors")
    shutil.copy(layouts["qwopix"][0], tmp_path / "sub" / "secondzq.safetensors")
    (tmp_path / "firstzq.pt").write_bytes(b"PK\x03\x04 pickled twin of firstzq.safetensors")
    (tmp_path / "firstzq.preview.png").write_bytes(b"\x89PNG not an embedding")
    (tmp_path / "notes.txt").write_text("not an embedding")
    shutil.copy(sdxl[2], tmp_path / "for_sdxl.safetensors")  # another model's: skipped, warned
    with caplog.at_level(logging.WARNING):
        loaded = with_embeddings(model, [tmp_path])
    assert loaded.tokenizers[0].encode("firstzq secondzq") == [49408, 49409, 49410, 49411, 49412]
    assert "for_sdxl.safetensors" in caplog.text
    assert loaded.tokenizers[0].token_in_use("for_sdxl") is None


def test_pickle_is_refused_with_a_conversion_that_works(sd1, tmp_path):
    import torch

    vectors = torch.nn.Parameter(torch.from_numpy(_vectors(6, 2, 64)))
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "pickled",
                "step": 100}, tmp_path / "pickled.pt")
    with pytest.raises(AdapterError) as refused:
        with_embeddings(sd1[1], [tmp_path])  # a pickle is the only form of this embedding
    message = str(refused.value)
    assert message.startswith(f"{tmp_path / 'pickled.pt'}: a .pt embedding is a pickle")
    lines = message.splitlines()
    assert len(lines) == 3 and "sdjax never unpickles" in lines[0]
    exec("\n".join(line.strip() for line in lines[1:]), {})  # the hint, as a user would run it
    embedding = read_embedding(tmp_path / "pickled.safetensors")
    assert embedding.token == "pickled"
    np.testing.assert_array_equal(embedding.vectors[0], _vectors(6, 2, 64))


def test_wrong_width_names_file_encoder_and_widths(sd1, tmp_path):
    path = tmp_path / "narrow.safetensors"
    save_file({"emb_params": _vectors(7, 1, 32)}, str(path))
    with pytest.raises(AdapterError, match=re.escape(
            f"{path}: vectors of width 32 do not fit text_encoder, whose width is 64")):
        with_embeddings(sd1[1], [path])


def test_token_clashing_with_a_word_names_the_file_and_vocabulary(sd1, tmp_path):
    path = tmp_path / "cat.safetensors"
    save_file({"emb_params": _vectors(8, 1, 64)}, str(path))
    with pytest.raises(AdapterError, match=rf"{re.escape(str(path))}: token 'cat' is already the "
                                           rf"vocabulary's 'cat</w>' \(id 2368\) of .*tokenizer"):
        with_embeddings(sd1[1], [path])


# Files {stem: key of its one tensor} and the error, both files named (folder order: sorted).
CLASHES = {
    # A diffusers file's token and a WebUI file's name, the same word as CLIP normalises it.
    "same_token": ({"learned_embeds": "ZorBlat", "zorblat": "emb_params"},
                   "{zorblat}: token 'zorblat' clashes with 'ZorBlat' of {learned_embeds}"),
    # diffusers names the second vector of "zorblat" "zorblat_1".
    "next_vector_name": ({"zorblat": "emb_params", "zorblat_1": "emb_params"},
                         "{zorblat_1}: token 'zorblat_1' would read as vector 2 of 'zorblat' "
                         "({zorblat})"),
}


@pytest.mark.parametrize("case", CLASHES)
def test_clashing_tokens_name_both_files(sd1, tmp_path, case):
    keys, message = CLASHES[case]
    paths = {stem: str(tmp_path / f"{stem}.safetensors") for stem in keys}
    for seed, (stem, key) in enumerate(keys.items()):
        save_file({key: _vectors(9 + seed, 1, 64)}, paths[stem])
    with pytest.raises(AdapterError, match=re.escape(message.format(**paths))):
        with_embeddings(sd1[1], [tmp_path])


def test_loading_a_token_twice_is_refused(sd1):
    _, _, loaded, layouts = sd1
    with pytest.raises(AdapterError, match=r"zorblat\.safetensors: token 'zorblat' is already the "
                                           r"added token 'zorblat' \(id 49408\)"):
        with_embeddings(loaded, [layouts["zorblat"][0]])


def test_unknown_layout_names_the_file_and_keys(sd1, tmp_path):
    path = tmp_path / "lora_not_embedding.safetensors"
    save_file({"lora_up.weight": _vectors(13, 4, 64), "lora_down.weight": _vectors(14, 4, 64)},
              str(path))
    keys = "['lora_down.weight', 'lora_up.weight']"
    with pytest.raises(AdapterError, match=re.escape(
            f"{path}: not a textual-inversion embedding: keys {keys}")):
        with_embeddings(sd1[1], [path])


@pytest.mark.parametrize("tensor, fault", [
    (np.zeros((2, 3, 64), np.float32), r"has shape \(2, 3, 64\)"),
    (np.zeros((2, 64), np.int32), "holds int32 values"),
    (np.full((1, 64), np.nan, np.float32), "NaN or infinite"),
    (np.zeros((CHUNK_TOKENS + 1, 64), np.float32), f"{CHUNK_TOKENS + 1} vectors"),
], ids=["3d", "integer", "nan", "too_many_vectors"])
def test_bad_vectors_name_the_tensor(tmp_path, tensor, fault):
    path = tmp_path / "bad.safetensors"
    save_file({"emb_params": tensor}, str(path))
    with pytest.raises(AdapterError,
                       match=rf"{re.escape(str(path))}: tensor 'emb_params' .*{fault}"):
        read_embedding(path)



def test_a_token_table_shorter_than_the_tokenizer_is_refused(tiny_sd, sd1):
    from sdjax.weights.pretrained import load_pretrained

    small = load_pretrained(tiny_sd.diffusers_folder("sd1"))  # 1000 rows, the full tokenizer
    with pytest.raises(AdapterError, match="text_encoder: its token table has 1000 rows but its "
                                           "tokenizer has 49408 tokens"):
        with_embeddings(small, [sd1[3]["zorblat"][0]])


# --- drawing ------------------------------------------------------------------------------------

def test_generator_draws_with_the_embeddings_vectors(tiny_model, tmp_path):
    from sdjax.sampling import Generator, Request, SamplingSpec

    width = tiny_model.text_configs[0].hidden_size
    # vexblat holds zorblat's vectors, quxblat others.
    for name, seed in (("zorblat", 1), ("vexblat", 1), ("quxblat", 2)):
        save_file({"emb_params": _vectors(seed, 2, width)}, str(tmp_path / f"{name}.safetensors"))
    generator = Generator(with_embeddings(tiny_model, [tmp_path]))
    spec = SamplingSpec(sampler="euler", steps=2, height=32, width=32)
    images = {name: generator(Request(prompt=f"a {name} on a table", seed=5), spec)["images"][0]
              for name in ("zorblat", "vexblat", "quxblat")}
    assert np.all(np.isfinite(images["zorblat"]))
    # Only the vectors tell the tokens apart: same vectors, the same image bit for bit; other
    # vectors, another (the random tiny U-Net listens to its text weakly: ~1e-3 here).
    np.testing.assert_array_equal(images["zorblat"], images["vexblat"])
    assert np.max(np.abs(images["zorblat"] - images["quxblat"])) > 1e-4
