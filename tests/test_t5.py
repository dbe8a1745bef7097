"""The T5 encoder (SD3's and Flux's long-prompt encoder) and its tokenizer against transformers:
tiny models saved as transformers saves them, loaded through `load_t5` / `T5Tokenizer`."""
import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from sdjax.models.t5 import T5Config, T5EncoderModel, relative_position_buckets
from sdjax.text.t5_tokenizer import T5Tokenizer, tokenize_weighted_t5
from sdjax.weights.common import RenamedSource, SafetensorsFile, WeightsError
from sdjax.weights.t5 import load_t5, t5_config_from_source, t5_params
from tests.helpers import flat_params, json_result, rewritten_folder, run_python

TOL = 1e-5
VOCAB = 128
# v1.1 (gated-gelu); few buckets and a short maximum distance, so that 40 tokens reach the
# logarithmic and the clipped buckets.
V11 = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
           relative_attention_num_buckets=16, relative_attention_max_distance=20,
           feed_forward_proj="gated-gelu", dropout_rate=0.0)
LENGTHS = (1, 7, 40)


def _reference(seed: int, model_class=transformers.T5EncoderModel, **overrides):
    """A transformers T5 of the tiny config, its weights spread beyond the init (norms around 1)
    so that a swapped or dropped tensor shows."""
    torch.manual_seed(seed)
    model = model_class(transformers.T5Config(**{**V11, **overrides}))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if "layer_norm" in name else 0.3 * noise)
    return model.eval()


def _ids(batch: int, length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).astype(np.int32)


def _last_hidden_state(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids).long()).last_hidden_state.float().numpy()


def _relative_error(ours, reference) -> float:
    return float(np.abs(np.asarray(ours, np.float32) - reference).max() / np.abs(reference).max())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(transformers model, its save_pretrained folder)."""
    folder = tmp_path_factory.mktemp("t5") / "text_encoder_3"
    model = _reference(0)
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def loaded(saved):
    return load_t5(saved[1])


@pytest.fixture(scope="module")
def encode():
    """One jitted apply per (config, dtype, remat), params and ids as data."""
    cache = {}

    def run(config, params, ids, dtype=jnp.float32, remat=False):
        key = (config, dtype, remat)
        if key not in cache:
            model = T5EncoderModel(config, dtype=dtype, remat=remat)
            cache[key] = jax.jit(lambda p, x: model.apply({"params": p}, x))
        return np.asarray(cache[key](params, jnp.asarray(ids)))

    return run


# --- the model ------------------------------------------------------------------------------------

def test_relative_position_buckets_match_transformers_at_every_distance():
    bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    for buckets, max_distance in ((32, 128), (16, 20), (8, 16), (64, 256), (32, 100)):
        ours = relative_position_buckets(1, 1201, buckets, max_distance)[0]  # distances 0..1200
        ours = np.concatenate([relative_position_buckets(1201, 1, buckets, max_distance)[::-1, 0],
                               ours[1:]])  # -1200..1200
        theirs = bucket(torch.arange(-1200, 1201), True, buckets, max_distance).numpy()
        np.testing.assert_array_equal(ours, theirs, err_msg=f"{buckets} buckets, {max_distance}")


def test_attention_bias_and_unit_scale_mean_the_same_on_every_path():
    """T5's core: logits = q.k (no 1/sqrt(d)) + bias. The CPU path ("reference") and the one GPUs
    take (jax.nn.dot_product_attention) must read `bias` and `scale` alike."""
    from sdjax.models.layers import dot_product_attention

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 5, 3, 4)), jnp.float32) for _ in range(3))
    bias = jnp.asarray(rng.standard_normal((1, 3, 5, 5)), jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) + bias
    expected = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
    ours = dot_product_attention(q, k, v, bias=bias, scale=1.0, implementation="reference")
    portable = jax.nn.dot_product_attention(q, k, v, bias=bias, scale=1.0)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(portable, expected, rtol=1e-5, atol=1e-6)


def test_rms_norm_rounds_as_transformers_t5_layer_norm_in_bfloat16():
    """Half-precision weights: the normalised values are rounded to bfloat16 before the scale
    multiplies them (T5LayerNorm, and diffusers' RMSNorm), not after."""
    from sdjax.models.layers import RMSNorm

    gen = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(64, 48, generator=gen)).to(torch.bfloat16)
    norm = transformers.models.t5.modeling_t5.T5LayerNorm(48).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(48, generator=gen))
        want = norm(x).float().numpy()
    scale = jnp.asarray(norm.weight.detach().float().numpy(), jnp.bfloat16)
    got = RMSNorm(1e-6, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16).apply(
        {"params": {"scale": scale}}, jnp.asarray(x.float().numpy(), jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(got, np.float32), want)


def test_config_is_read_from_transformers_config_json(saved, loaded):
    config, _ = loaded
    assert config == T5Config(**{k: v for k, v in V11.items() if k != "dropout_rate"})
    assert config.is_gated


def test_encoder_matches_transformers_on_ids_of_any_length(saved, loaded, encode):
    model, _ = saved
    config, params = loaded
    for length in LENGTHS:
        ids = _ids(2, length, seed=length)
        error = _relative_error(encode(config, params, ids), _last_hidden_state(model, ids))
        assert error <= TOL, (length, error)


def test_remat_does_not_change_the_output(loaded, encode):
    config, params = loaded
    ids = _ids(2, 7, seed=1)
    np.testing.assert_array_equal(encode(config, params, ids, remat=True),
                                  encode(config, params, ids))


@pytest.mark.parametrize("feed_forward_proj", ["relu", "gated-silu"])
def test_v10_relu_and_gated_silu_feed_forwards_match_transformers(feed_forward_proj, tmp_path,
                                                                  encode):
    model = _reference(1, feed_forward_proj=feed_forward_proj, num_layers=1)
    model.save_pretrained(tmp_path)
    config, params = load_t5(tmp_path)
    assert config.feed_forward_proj == feed_forward_proj
    ids = _ids(2, 9, seed=2)
    assert _relative_error(encode(config, params, ids), _last_hidden_state(model, ids)) <= TOL


def test_bfloat16_load_stays_close_to_float32_and_to_transformers_bfloat16(saved, encode):
    model, folder = saved
    config, params = load_t5(folder, dtype=jnp.bfloat16)
    assert {str(x.dtype) for x in jax.tree.leaves(params)} == {"bfloat16"}
    ids = _ids(2, 40, seed=3)
    ours = encode(config, params, ids, dtype=jnp.bfloat16)
    assert ours.dtype == jnp.bfloat16
    reference = _last_hidden_state(model, ids)
    half = transformers.T5EncoderModel.from_pretrained(folder, dtype=torch.bfloat16).eval()
    reference_half = _last_hidden_state(half, ids)
    # bfloat16 keeps 8 bits: transformers' bfloat16 lands some percent from float32 (these spread
    # weights amplify it); sdjax's may land no farther, and nearer to transformers' than that.
    rms = lambda a, b: float(np.sqrt(np.mean((np.float32(a) - b) ** 2) / np.mean(b ** 2)))
    reference_error = rms(reference_half, reference)
    assert reference_error > 0.005  # bfloat16 did round
    assert rms(ours, reference) <= 1.25 * reference_error
    assert rms(ours, reference_half) <= reference_error


# --- weights --------------------------------------------------------------------------------------

def test_sharded_folder_loads_the_same_params(saved, loaded, tmp_path):
    model, _ = saved
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    _, params = load_t5(tmp_path)
    ours, expected = flat_params(params), flat_params(loaded[1])
    assert ours.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(ours[key], expected[key], err_msg=key)


@pytest.mark.parametrize("layout", ["no_encoder_prefix", "embed_tokens_only", "both_embeddings"])
def test_key_layouts_load_the_same_params(layout, saved, loaded, tmp_path):
    _, folder = saved

    def edit(tensors):
        if layout == "no_encoder_prefix":
            for key in [k for k in tensors if k.startswith("encoder.")]:
                tensors[key[len("encoder."):]] = tensors.pop(key)
        elif layout == "embed_tokens_only":
            tensors["encoder.embed_tokens.weight"] = tensors.pop("shared.weight")
        else:  # transformers 4 wrote the tied embedding twice
            tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"].copy()

    rewritten_folder(folder, tmp_path, "model.safetensors", edit)
    _, params = load_t5(tmp_path)
    ours, expected = flat_params(params), flat_params(loaded[1])
    for key in expected:
        np.testing.assert_array_equal(ours[key], expected[key], err_msg=key)


def test_a_whole_encoder_decoder_folder_loads_its_encoder(tmp_path, encode):
    model = _reference(2, model_class=transformers.T5ForConditionalGeneration)
    model.save_pretrained(tmp_path)
    config, params = load_t5(tmp_path)
    ids = _ids(2, 7, seed=4)
    with torch.no_grad():
        reference = model.encoder(torch.from_numpy(ids).long()).last_hidden_state.numpy()
    assert _relative_error(encode(config, params, ids), reference) <= TOL


def test_float8_file_loads_upcast(saved, tmp_path):
    from safetensors.torch import save_file as save_torch

    model, folder = saved
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    state = {k: v.to(torch.float8_e4m3fn) for k, v in model.state_dict().items()
             if k != "encoder.embed_tokens.weight"}
    save_torch(state, str(tmp_path / "model.safetensors"))
    assert "F8_E4M3" in (tmp_path / "model.safetensors").read_bytes()[:4096].decode("latin-1")
    rounded = {k: v.float().numpy() for k, v in state.items()}
    save_file(rounded, str(tmp_path / "rounded.safetensors"))
    expected = t5_params(SafetensorsFile(tmp_path / "rounded.safetensors"), _config_of(folder))
    for dtype, name in ((None, "float32"), (jnp.bfloat16, "bfloat16")):
        _, params = load_t5(tmp_path, dtype=dtype)
        flat, want = flat_params(params), flat_params(expected)
        for key in want:
            assert flat[key].dtype == np.dtype(name), key
            np.testing.assert_array_equal(flat[key].astype(np.float32),
                                          want[key].astype(name).astype(np.float32), err_msg=key)


def _config_of(folder) -> T5Config:
    return T5Config.from_transformers(json.loads((folder / "config.json").read_text()))


def test_config_is_inferred_from_a_bundled_files_shapes(saved, loaded, tmp_path):
    _, folder = saved
    prefix = "text_encoders.t5xxl.transformer."
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.diffusion_model.x_embedder.proj.weight"] = np.zeros((2, 2), np.float32)
    save_file({prefix + k if k != "model.diffusion_model.x_embedder.proj.weight" else k: v
               for k, v in tensors.items()}, str(tmp_path / "bundle.safetensors"))
    bundle = SafetensorsFile(tmp_path / "bundle.safetensors")
    part = RenamedSource(bundle, {k[len(prefix):]: (k, None) for k in bundle
                                  if k.startswith(prefix)})
    config = t5_config_from_source(part)
    # The buckets' maximum distance is no tensor's shape: T5's own 128 is assumed.
    expected, _ = loaded
    assert config == T5Config(**{**expected.to_dict(), "relative_attention_max_distance": 128})
    params = t5_params(part, config)
    ours, want = flat_params(params), flat_params(loaded[1])
    for key in want:
        np.testing.assert_array_equal(ours[key], want[key], err_msg=key)


def test_released_sd3_config_is_accepted_and_unknown_keys_are_refused(tmp_path):
    released = {  # stabilityai/stable-diffusion-3-medium-diffusers text_encoder_3/config.json
        "_name_or_path": "google/t5-v1_1-xxl", "architectures": ["T5EncoderModel"],
        "classifier_dropout": 0.0, "d_ff": 10240, "d_kv": 64, "d_model": 4096,
        "decoder_start_token_id": 0, "dense_act_fn": "gelu_new", "dropout_rate": 0.1,
        "eos_token_id": 1, "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0,
        "is_encoder_decoder": True, "is_gated_act": True, "layer_norm_epsilon": 1e-06,
        "model_type": "t5", "num_decoder_layers": 24, "num_heads": 64, "num_layers": 24,
        "output_past": True, "pad_token_id": 0, "relative_attention_max_distance": 128,
        "relative_attention_num_buckets": 32, "tie_word_embeddings": False,
        "torch_dtype": "float16", "transformers_version": "4.41.2", "use_cache": True,
        "vocab_size": 32128}
    config = T5Config.from_transformers(released)
    assert (config.d_model, config.d_ff, config.num_layers, config.num_heads, config.d_kv) == (
        4096, 10240, 24, 64, 64)
    with pytest.raises(ValueError, match="unknown transformers config keys: rotary_dim"):
        T5Config.from_transformers({**released, "rotary_dim": 64})
    with pytest.raises(ValueError, match="feed_forward_proj: unsupported 'gated-swiglu'"):
        T5Config.from_transformers({**released, "feed_forward_proj": "gated-swiglu"})
    (tmp_path / "config.json").write_text(json.dumps({**released, "rotary_dim": 64}))
    with pytest.raises(WeightsError, match=re.escape(str(tmp_path / "config.json")) + ".*rotary_dim"):
        load_t5(tmp_path)


@pytest.mark.parametrize("fault, message", [
    ("missing", r"model\.safetensors: T5 encoder: missing keys for: blocks_1/attention/k/kernel"),
    ("shape", r"model\.safetensors: T5 encoder: shape mismatch for "
              r"encoder\.block\.1\.layer\.1\.DenseReluDense\.wo\.weight: expected \(48, 32\)"),
    ("unexpected", r"model\.safetensors: T5 encoder: unexpected keys: encoder\.block\.9\.layer"),
])
def test_bad_files_are_one_line_errors_naming_file_and_key(fault, message, saved, tmp_path):
    _, folder = saved

    def edit(tensors):
        if fault == "missing":
            del tensors["encoder.block.1.layer.0.SelfAttention.k.weight"]
        elif fault == "shape":
            tensors["encoder.block.1.layer.1.DenseReluDense.wo.weight"] = np.zeros((32, 40),
                                                                                  np.float32)
        else:
            tensors["encoder.block.9.layer.0.layer_norm.weight"] = np.ones(32, np.float32)

    rewritten_folder(folder, tmp_path, "model.safetensors", edit)
    with pytest.raises(WeightsError) as err:
        load_t5(tmp_path)
    assert re.search(message, str(err.value)), str(err.value)
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow  # 8 simulated devices in a subprocess
def test_params_split_over_fsdp_give_the_unsharded_output():
    result = json_result(run_python("-c", _FSDP_CHECK, devices=8, timeout=300))
    assert "shared/embedding" in result["split"] and len(result["split"]) >= 5, result
    assert result["max_abs_diff"] <= 1e-5, result


_FSDP_CHECK = """
import json
import jax, jax.numpy as jnp, numpy as np
from sdjax import parallel
from sdjax.models.t5 import T5Config, T5EncoderModel
assert jax.device_count() == 8
# Big enough that params reach parallel.FSDP_MIN_SIZE and are split.
config = T5Config(vocab_size=1024, d_model=64, d_kv=16, d_ff=1024, num_layers=2, num_heads=4,
                  feed_forward_proj="gated-gelu")
model = T5EncoderModel(config)
ids = np.random.default_rng(0).integers(0, 1024, (8, 12)).astype(np.int32)
params = model.init(jax.random.key(0), ids)["params"]
apply = lambda p, x: model.apply({"params": p}, x)
reference = np.asarray(jax.jit(apply)(params, ids))
mesh = parallel.make_mesh(fsdp=4)
shardings = parallel.param_sharding(mesh, params)
placed = jax.device_put(params, shardings)
out = np.asarray(parallel.jit_over_batch(apply, mesh, shardings)(placed, parallel.shard_batch(ids, mesh)))
split = sorted(jax.tree_util.keystr(path, simple=True, separator="/")
               for path, leaf in jax.tree_util.tree_leaves_with_path(placed)
               if leaf.addressable_shards[0].data.size * 4 == leaf.size)
print(json.dumps({"split": split, "max_abs_diff": float(np.abs(out - reference).max())}))
"""


# --- the tokenizer --------------------------------------------------------------------------------

_WORDS = ("a photo of an astronaut riding a horse on the moon Cat dog red blue green sky castle "
          "painting portrait landscape city night sunset mountain river forest beautiful detailed "
          "cinematic lighting highly realistic oil watercolor style by artist trending with and "
          "in at small large bright dark café naïve über The A Photo 1 2 3 4 5 10 100 2024 35mm "
          "4k , . ! ? ( ) : ; - ' \"").split()
PROMPTS = [
    "A photo of a Cat, riding a horse on the moon.",
    "café au lait, naïve über-detailed (oil painting)",
    "   extra   spaces\tand\nnewlines  ",
    "1024x768 photo, 4k, 35mm, f/1.8",
    "ﬁne Ｔｅｘｔ ① ÆØÅ emoji 🐱 中文",
    "a </s> b",  # a special token written in the prompt
    " ".join(_WORDS * 3),  # longer than max_length: truncated
    "",
]
MAX_LENGTH = 32


@pytest.fixture(scope="module")
def tokenizer_folders(tmp_path_factory):
    """{shape: folder} of one tiny T5 vocabulary saved as transformers saves it: `spiece.model`
    alone (a SentencePiece Unigram model), and `tokenizer.json` alone (a `tokenizers` Unigram
    with SentencePiece's normalisation table, as the released T5 files hold)."""
    import random

    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import Unigram
    from tokenizers.trainers import UnigramTrainer

    root = tmp_path_factory.mktemp("t5_tokenizers")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))) for _ in range(400)]
    (root / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(root / "corpus.txt"), model_prefix=str(root / "spiece"), vocab_size=120,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>",
        eos_piece="</s>", unk_piece="<unk>", minloglevel=2)
    spm_folder = root / "spiece_only"
    spm_folder.mkdir()
    shutil.copy(root / "spiece.model", spm_folder / "spiece.model")

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((root / "spiece.model").read_bytes())
    trained = Tokenizer(Unigram())
    trained.normalizer = normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap)
    trained.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
    trained.train_from_iterator(lines, UnigramTrainer(
        vocab_size=150, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    json_folder = root / "tokenizer_json_only"
    transformers.T5TokenizerFast(tokenizer_object=trained).save_pretrained(json_folder)
    assert not (json_folder / "spiece.model").exists()
    return {"spiece.model": spm_folder, "tokenizer.json": json_folder}


@pytest.mark.parametrize("shape", ["spiece.model", "tokenizer.json"])
def test_tokenizer_ids_match_transformers(shape, tokenizer_folders):
    folder = tokenizer_folders[shape]
    reference = transformers.T5Tokenizer.from_pretrained(folder)
    ours = T5Tokenizer.from_pretrained(folder)
    assert (ours.pad_token_id, ours.eos_token_id, len(ours)) == (
        reference.pad_token_id, reference.eos_token_id, len(reference))
    expected = reference(PROMPTS, max_length=MAX_LENGTH, truncation=True,
                         padding="max_length").input_ids
    got = ours(PROMPTS, MAX_LENGTH)
    assert got.dtype == np.int32 and got.shape == (len(PROMPTS), MAX_LENGTH)
    for prompt, row, want in zip(PROMPTS, got.tolist(), expected):
        assert row == want, prompt
    assert got[-2, -1] == ours.eos_token_id  # the long prompt was cut, EOS kept
    assert got[-1].tolist() == [ours.eos_token_id] + [ours.pad_token_id] * (MAX_LENGTH - 1)
    for prompt in PROMPTS:
        assert ours.encode(prompt) == reference(prompt, add_special_tokens=False).input_ids


def test_saved_tokenizer_reads_back_the_same_here_and_in_transformers(tokenizer_folders, tmp_path):
    ours = T5Tokenizer.from_pretrained(tokenizer_folders["spiece.model"])
    ours.save_pretrained(tmp_path)
    expected = ours(PROMPTS, MAX_LENGTH)
    np.testing.assert_array_equal(T5Tokenizer.from_pretrained(tmp_path)(PROMPTS, MAX_LENGTH),
                                  expected)
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert reference(PROMPTS, max_length=MAX_LENGTH, truncation=True,
                     padding="max_length").input_ids == expected.tolist()


def test_weighted_prompt_tokenizes_each_emphasis_run_with_its_weight(tokenizer_folders):
    tokenizer = T5Tokenizer.from_pretrained(tokenizer_folders["spiece.model"])
    ids, weights = tokenize_weighted_t5(tokenizer, "a (red:1.5) cat, [blue] sky", MAX_LENGTH)
    runs = [("a ", 1.0), ("red", 1.5), (" cat, ", 1.0), ("blue", 1 / 1.1), (" sky", 1.0)]
    want_ids = [i for text, _ in runs for i in tokenizer.encode(text)]
    want_weights = [w for text, w in runs for _ in tokenizer.encode(text)]
    n = len(want_ids)
    assert ids.tolist() == want_ids + [tokenizer.eos_token_id] + [tokenizer.pad_token_id] * (
        MAX_LENGTH - n - 1)
    np.testing.assert_allclose(weights[:n], want_weights, rtol=1e-6)
    assert (weights[n:] == 1.0).all() and weights.dtype == np.float32
    plain = "a red cat, blue sky"
    plain_ids, plain_weights = tokenize_weighted_t5(tokenizer, plain, MAX_LENGTH)
    assert plain_ids.tolist() == tokenizer(plain, MAX_LENGTH)[0].tolist()
    assert (plain_weights == 1.0).all()
    long_ids, _ = tokenize_weighted_t5(tokenizer, PROMPTS[-2], MAX_LENGTH)
    assert long_ids.tolist() == tokenizer(PROMPTS[-2], MAX_LENGTH)[0].tolist()


# --- the load-memory benchmark --------------------------------------------------------------------

def test_load_memory_benchmark_prints_peak_against_file_bytes(tmp_path):
    out = run_python("-m", "benchmarks.t5_load_memory", "--preset=tiny", f"--workdir={tmp_path}",
                     timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if re.match(r"\|\s*[0-9]", line)]
    assert len(rows) == 1, out.stdout
    cells = [float(c) for c in rows[0].strip("|").split("|")]
    assert cells[0] == pytest.approx(0.029, abs=5e-4)  # params (M) of the tiny preset
    assert cells[3] >= cells[2] > 0  # peak >= baseline
    assert "bfloat16" in out.stdout
    assert not list(tmp_path.iterdir())  # the folder is gone
