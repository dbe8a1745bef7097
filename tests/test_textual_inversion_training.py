"""Textual-inversion training (sdjax.training.textual_inversion) on the training loop: only the new
token's rows train (the models, their token tables included, bit-identical; the optimizer holding
nothing else), the vectors start as the init word's, prompts without the token are untouched, a
checkpoint resumes bit-identically, the exported WebUI file reads back identically through
`with_embeddings` and diffusers' `load_textual_inversion` reproduces sdjax's text-encoder output
with it, SDXL trains a row per text encoder, and `experiments/train.py` resumes and exports
exactly; and the token shipped with the embedded default model draws its object.

The in-process tests share one compiled step on the tiny model, written as a diffusers folder so
that diffusers loads the very model the token was trained on.
"""
from __future__ import annotations

import functools
import json
import os
import pathlib
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import train_tiny
from sdjax import parallel
from sdjax.adapters.embeddings import read_embedding, with_embeddings
from sdjax.training import loop
from sdjax.training import step as step_lib
from sdjax.training import textual_inversion
from sdjax.training.checkpoints import Checkpoints
from sdjax.training.textual_inversion import GROUP
from tests.helpers import flat_params, run_python

TOKEN, INIT_WORD, VECTORS, LR = "<shape-x>", "shape", 2, 1e-2
CAPTIONS = ["a <shape-x> on the left", "a red circle", "<shape-x> beside <shape-x>",
            "a blue square"]
RTOL = 1e-5  # max |sdjax - reference| / max |reference|


def _relative_error(actual, expected) -> float:
    expected = np.asarray(expected, np.float64)
    return float(np.max(np.abs(np.asarray(actual, np.float64) - expected))
                 / np.max(np.abs(expected)))


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    from benchmarks.checkpoints import write_diffusers_folder

    return write_diffusers_folder("tiny", tmp_path_factory.mktemp("ti") / "base")


def _config(folder, **settings):
    config = train_tiny.get_config("textual_inversion")
    config.init_from = str(folder)
    config.textual_inversion.token = TOKEN
    config.textual_inversion.init_word = INIT_WORD
    config.textual_inversion.num_vectors = VECTORS
    config.optimizer.groups.embeddings.lr = LR
    for key, value in settings.items():
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


@pytest.fixture(scope="module")
def ti_run(base_folder):
    """A two-vector token on the tiny model (EMA on, to check it covers the rows only), the
    compiled step, and a batch whose captions hold the token."""
    setup = loop.build(_config(base_folder, **{"ema.use": True}))
    mesh = parallel.make_mesh()
    shardings = step_lib.state_sharding(mesh, setup.state)
    fn = step_lib.make_train_step(setup.task, mesh, shardings)
    rng = np.random.default_rng(0)
    batch = {"pixels": rng.uniform(-1, 1, (len(CAPTIONS), 32, 32, 3)).astype(np.float32),
             "input_ids": setup.tokenizer(CAPTIONS)}
    return {"setup": setup, "fn": fn, "mesh": mesh, "shardings": shardings, "batch": batch}


def _key(step: int):
    return jax.random.fold_in(jax.random.key(1), step)


@pytest.fixture(scope="module")
def trained(ti_run):
    """The initial state (host) and the states and metrics after each of 3 steps."""
    run = ti_run
    state = step_lib.place(run["setup"].state, run["shardings"])
    states, metrics = [jax.device_get(run["setup"].state)], []
    for i in range(3):
        state, m = run["fn"](state, step_lib.device_batch(run["batch"], run["mesh"]), _key(i))
        states.append(jax.device_get(state))
        metrics.append(jax.device_get(m))
    return states, metrics


def _nbytes(tree) -> int:
    return sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))


# --- what trains ----------------------------------------------------------------------------------

def test_only_the_new_rows_train_and_the_optimizer_and_ema_hold_nothing_else(ti_run, trained,
                                                                            base_folder):
    from sdjax.weights.pretrained import load_pretrained

    states, metrics = trained
    first, last = states[0], states[-1]
    assert last.optimizer.trainable == (GROUP,)
    assert all(int(m["finite"]) == 1 and m["grad_norm"] > 0 for m in metrics)
    np.testing.assert_allclose(metrics[0]["lr/embeddings"], LR, rtol=1e-6)
    assert metrics[0]["lr/text_encoder"] == metrics[0]["lr/unet"] == 0
    # Every param of the models, the base token table included, is the loaded model's, bit for
    # bit, after the steps.
    loaded = flat_params(load_pretrained(base_folder).params)
    models = flat_params({k: v for k, v in last.params.items() if k != GROUP})
    assert set(models) == set(loaded)
    for path, value in loaded.items():
        assert models[path].tobytes() == value.tobytes(), path
    assert last.params["text_encoder"]["token_embedding"]["embedding"].shape[0] == 49408
    rows, before = last.params[GROUP]["text_encoder"], first.params[GROUP]["text_encoder"]
    assert rows.shape == (VECTORS, 32) and rows.dtype == np.float32
    assert np.all(rows != before)  # every element of both vectors moved
    # Adam's first update moves every element by lr (its sign step).
    np.testing.assert_allclose(np.abs(states[1].params[GROUP]["text_encoder"] - before), LR,
                               rtol=1e-3)
    # Adam's two moments of the rows, and a few counters: nothing of the models.
    assert 2 * rows.nbytes <= _nbytes(last.opt_state) < 2 * rows.nbytes + 64
    assert set(last.ema_params) == {GROUP} and _nbytes(last.ema_params) == rows.nbytes


def test_vectors_start_as_the_init_words_and_take_the_ids_after_the_vocabulary(ti_run):
    setup = ti_run["setup"]
    tokenizer = setup.model.tokenizers[0]
    (word,) = tokenizer.encode(INIT_WORD)
    table = setup.state.params["text_encoder"]["token_embedding"]["embedding"]
    rows = setup.state.params[GROUP]["text_encoder"]
    np.testing.assert_array_equal(rows, np.stack([table[word]] * VECTORS))
    assert tokenizer.encode(f"a {TOKEN}") == [320, 49408, 49409]
    ids = ti_run["batch"]["input_ids"][:, 0, 0]
    assert ids[2, 1:6].tolist() == [49408, 49409, tokenizer.encode("beside")[0], 49408, 49409]
    assert setup.model.text_configs[0].vocab_size == 49408 + VECTORS


def test_captions_without_the_token_are_untouched_by_its_vectors(ti_run):
    """The objective's text conditioning (what its U-Net reads) with other vectors: the same bits
    for captions without the token, another context for those with it. (The tiny random U-Net
    listens to its context too weakly for the loss to show it.)"""
    setup = ti_run["setup"]
    params = jax.device_get(setup.state.params)
    rows = params[GROUP]["text_encoder"]
    # Not a constant shift, which the first layer norm would remove.
    other = rows + np.random.default_rng(0).normal(0, 0.5, rows.shape).astype(np.float32)
    moved = {**params, GROUP: {"text_encoder": other}}
    arch = setup.task.task.arch

    @jax.jit
    def context(p, ids):
        params = setup.inversion.inference_params(p)
        return step_lib.text_conditioning(arch, params, ids)["context"]

    ids = ti_run["batch"]["input_ids"][:, :, 0]
    before, after = np.asarray(context(params, ids)), np.asarray(context(moved, ids))
    np.testing.assert_array_equal(before[1::2], after[1::2])  # "a red circle", "a blue square"
    for row in (0, 2):
        assert _relative_error(after[row], before[row]) > 1e-2


def test_bfloat16_compute_keeps_float32_rows_and_a_bfloat16_base(base_folder):
    setup = loop.build(_config(base_folder, compute_dtype="bfloat16"))
    dtypes = lambda tree: {np.dtype(x.dtype) for x in jax.tree.leaves(tree)}
    assert dtypes({n: setup.state.params[n] for n in ("unet", "text_encoder")}) == \
        {np.dtype(jnp.bfloat16)}
    batch = {"pixels": np.zeros((2, 32, 32, 3), np.float32),
             "input_ids": setup.tokenizer(CAPTIONS[:2])}
    out, _ = jax.eval_shape(functools.partial(step_lib.train_step, setup.task), setup.state,
                            batch, jax.random.key(0))
    assert dtypes(out.params[GROUP]) == {np.dtype(np.float32)}


# --- settings refused -----------------------------------------------------------------------------

@pytest.mark.parametrize("settings, error", [
    ({"textual_inversion.init_word": "red circle"},
     r"init_word 'red circle' is 2 tokens \['red', 'circle'\] for text_encoder's tokenizer"),
    ({"textual_inversion.token": "circle"},
     r"token 'circle' is already the vocabulary's 'circle</w>' \(id 7117\)"),
    ({"textual_inversion.token": "a/b"}, r"token 'a/b' cannot name a file"),
    ({"textual_inversion.num_vectors": 0}, r"num_vectors must be an integer >= 1, got 0"),
    ({"lora.use": True}, r"lora.use and textual_inversion.use are both set"),
])
def test_bad_settings_name_the_field(base_folder, settings, error):
    with pytest.raises(ValueError, match=error):
        loop.build(_config(base_folder, **settings))


def test_a_textual_inversion_run_trains_no_model_and_needs_the_rows_rate(base_folder):
    config = _config(base_folder)
    with config.unlocked():
        config.optimizer.groups.text_encoder = {"lr": 1e-4}
    with pytest.raises(ValueError, match=r"trains \['text_encoder'\].*only the new token's"):
        loop.build(config)
    config = _config(base_folder)
    with config.unlocked():
        del config.optimizer.groups["embeddings"]
    with pytest.raises(ValueError, match="no trained group 'embeddings'"):
        loop.build(config)


# --- checkpoints and resume -----------------------------------------------------------------------

def test_a_checkpoint_holds_the_rows_only_and_resumes_bit_identically(ti_run, trained, tmp_path):
    """Step 2 continued from a checkpoint of step 1 restored into a fresh run's state is the
    uninterrupted step 2, bit for bit (the data order and step keys are the loop's, which
    test_train_loop.py checks)."""
    run, (states, _) = ti_run, trained
    ckpt = Checkpoints(tmp_path, save_every=1, async_save=False)
    ckpt.save(1, states[1], {"step": 1})
    ckpt.wait()
    assert ckpt.stored_models(1) == {GROUP}
    template = step_lib.place(run["setup"].state, run["shardings"])
    restored, meta = ckpt.restore(template)
    ckpt.close()
    assert meta == {"step": 1}
    state, _ = run["fn"](restored, step_lib.device_batch(run["batch"], run["mesh"]), _key(1))
    trainable = lambda s: {"params": s.params[GROUP], "opt": s.opt_state, "ema": s.ema_params,
                           "step": s.step}
    expected = flat_params(trainable(states[2]))
    for path, value in flat_params(trainable(jax.device_get(state))).items():
        np.testing.assert_array_equal(value, expected[path], err_msg=path)


# --- export ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(ti_run, trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("ti_export") / "export"
    assert loop.export(ti_run["setup"], trained[0][-1], str(path), use_ema=False) == str(path)
    return path


def test_the_webui_file_reads_back_identically_through_with_embeddings(ti_run, trained, exported,
                                                                      base_folder):
    from safetensors import safe_open

    from sdjax.weights.pretrained import load_pretrained

    setup, state = ti_run["setup"], trained[0][-1]
    rows = state.params[GROUP]["text_encoder"]
    webui = exported / f"{TOKEN}.safetensors"
    with safe_open(webui, "np") as f:
        assert list(f.keys()) == ["emb_params"]
        assert f.metadata() == {"name": TOKEN, "step": "3"}
    embedding = read_embedding(webui)
    assert embedding.token == TOKEN
    np.testing.assert_array_equal(embedding.vectors[0], rows)
    with safe_open(exported / "learned_embeds.safetensors", "np") as f:
        assert list(f.keys()) == [TOKEN]
        np.testing.assert_array_equal(f.get_tensor(TOKEN), rows)
    # Loaded onto the model the run started from: the tokenizer and token table the run trained.
    loaded = with_embeddings(load_pretrained(base_folder), [webui])
    assert loaded.tokenizers[0](CAPTIONS).tolist() == \
        setup.tokenizer(CAPTIONS)[:, 0, 0].tolist()
    trained_table = setup.inversion.inference_params(state.params)["text_encoder"]
    np.testing.assert_array_equal(loaded.params["text_encoder"]["token_embedding"]["embedding"],
                                  trained_table["token_embedding"]["embedding"])


def _sdjax_context(model, prompt: str) -> np.ndarray:
    from sdjax.text.conditioning import encode_text
    from sdjax.text.prompts import tokenize_weighted
    from sdjax.weights.architecture import Architecture

    ids, weights = tokenize_weighted(model.tokenizers[0], prompt)
    out = encode_text(Architecture.of(model), model.params, jnp.asarray(ids)[None, None],
                      jnp.asarray(weights)[None])
    return np.asarray(out["context"])


@pytest.mark.parametrize("file", ["learned_embeds.safetensors", f"{TOKEN}.safetensors"])
def test_the_exported_file_loads_in_diffusers_and_gives_sdjaxs_text_encoder_output(
        ti_run, exported, base_folder, file):
    import diffusers
    import torch

    from sdjax.weights.pretrained import load_pretrained

    base = load_pretrained(base_folder)
    model = with_embeddings(base, [exported / f"{TOKEN}.safetensors"])
    untrained = textual_inversion.make_inversion(base, textual_inversion.TextualInversionConfig(
        token=TOKEN, init_word=INIT_WORD, num_vectors=VECTORS))[1]
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(base_folder, safety_checker=None)
    # diffusers reads a diffusers file's key as its token; a WebUI file's must be given.
    pipe.load_textual_inversion(str(exported / file),
                                token=None if file.startswith("learned") else TOKEN)
    for prompt in ("a <shape-x> on the left, blue background", "<shape-x>", "a red circle"):
        with torch.no_grad():
            reference, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
        context = _sdjax_context(model, prompt)
        assert _relative_error(context, reference.numpy()) <= RTOL, prompt
        if TOKEN in prompt:  # the trained vectors are what diffusers read
            assert _relative_error(_sdjax_context(untrained, prompt), reference.numpy()) > 1e-3


# --- SDXL: both text encoders ---------------------------------------------------------------------

@pytest.mark.slow  # SDXL compiles two encoders' steps
def test_sdxl_learns_rows_for_both_text_encoders_and_exports_clip_l_and_clip_g(tiny_sd, tmp_path):
    import torch

    from sdjax.weights.pretrained import load_pretrained
    from tests.test_textual_inversion import _folder_with_text_encoders, _reference_pipeline

    folder = _folder_with_text_encoders(tiny_sd, "sdxl", tmp_path)
    setup = loop.build(_config(folder))
    rows = setup.state.params[GROUP]
    assert {k: v.shape for k, v in rows.items()} == {"text_encoder": (VECTORS, 64),
                                                     "text_encoder_2": (VECTORS, 128)}
    for index, name in enumerate(("text_encoder", "text_encoder_2")):
        (word,) = setup.model.tokenizers[index].encode(INIT_WORD)
        table = setup.state.params[name]["token_embedding"]["embedding"]
        np.testing.assert_array_equal(rows[name], np.stack([table[word]] * VECTORS))
    # Gradients reach both encoders' rows (SDXL's context joins them; the pooled output is the
    # second's).
    batch = {"pixels": np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32),
             "input_ids": setup.tokenizer(CAPTIONS[:2])}
    grads = jax.jit(jax.grad(lambda r: setup.task.loss({**setup.state.params, GROUP: r}, batch,
                                                        jax.random.key(0))[0]))(rows)
    assert all(np.all(np.abs(np.asarray(g)).sum(axis=1) > 0) for g in grads.values())

    trained = {name: r + np.random.default_rng(i).normal(0, 0.3, r.shape).astype(np.float32)
               for i, (name, r) in enumerate(rows.items())}
    paths = textual_inversion.export_files(setup.inversion, {GROUP: trained}, str(tmp_path / "x"))
    assert sorted(read_embedding(paths["webui"]).vectors[i].shape for i in range(2)) == \
        [(VECTORS, 64), (VECTORS, 128)]
    model = with_embeddings(load_pretrained(folder), [paths["webui"]])
    joined = setup.inversion.inference_params({**setup.state.params, GROUP: trained})
    for name in ("text_encoder", "text_encoder_2"):
        np.testing.assert_array_equal(model.params[name]["token_embedding"]["embedding"],
                                      joined[name]["token_embedding"]["embedding"])
    # diffusers' SDXL files, one per text encoder, as textual_inversion_sdxl.py writes them.
    pipe = _reference_pipeline(tiny_sd, folder, "sdxl")
    pipe.load_textual_inversion(paths["diffusers"], text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(paths["diffusers_2"], text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    prompt = "a photo of <shape-x>"
    with torch.no_grad():
        reference, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu",
                                                     do_classifier_free_guidance=False)
    from sdjax.text.conditioning import encode_text
    from sdjax.text.prompts import tokenize_weighted
    from sdjax.weights.architecture import Architecture

    rows_ = [tokenize_weighted(t, prompt) for t in model.tokenizers]
    ids = np.stack([i for i, _ in rows_])[None]
    out = encode_text(Architecture.of(model), model.params, jnp.asarray(ids),
                      jnp.asarray(rows_[0][1])[None])
    assert _relative_error(out["context"], reference.numpy()) <= RTOL
    assert _relative_error(out["text_embeds"], pooled.numpy()) <= RTOL


# --- the default model's token --------------------------------------------------------------------

def test_the_shipped_token_loads_on_the_default_model_and_draws_a_small_red_cross():
    from configs import shapes as shapes_config
    from sdjax import DEFAULT_MODEL
    from sdjax.evaluation import default_model, default_model_ti
    from sdjax.weights.pretrained import load_pretrained

    folder = pathlib.Path(DEFAULT_MODEL) / "embeddings"
    shipped = folder / f"{default_model_ti.TOKEN}.safetensors"
    embedding = read_embedding(shipped)
    assert embedding.token == "xmark" and embedding.vectors[0].shape == (3, 64)
    assert shipped.stat().st_size < 2048
    model = with_embeddings(load_pretrained(DEFAULT_MODEL), [folder])
    # The first seed of four held-out scenes (never in a training caption), judged with the
    # token's meaning written back in.
    prompts = default_model_ti.heldout_prompts()[::default_model_ti.HELD_OUT_SEEDS_PER_SCENE][:4]
    _, _, verdicts = default_model.generate_and_judge(
        model, prompts, shapes_config.get_config(), seed=default_model_ti.HELD_OUT_SEED,
        judged=[default_model_ti.spelled_out(p) for p in prompts])
    assert sum(v["all_correct"] for v in verdicts) >= 3, verdicts
    recorded = json.loads((folder / "evaluation.json").read_text())
    assert recorded["embedding"] == shipped.name and recorded["base_prompts_identical"]
    assert recorded["heldout_accuracy"] >= recorded["targets"]["heldout_accuracy"]


# --- through experiments/train.py -----------------------------------------------------------------

# Three launches of experiments/train.py: ~40 s.
@pytest.mark.slow
def test_train_resumes_and_exports_checkpoints_bit_identically(base_folder, tmp_path):
    """Through experiments/train.py (captions with the token read by the data pipeline): a run
    stopped at step 2 and started again logs the losses and exports the file of one that was not,
    at its end and with --export_checkpoint. Four short runs share one compilation cache (~35 s)."""
    from safetensors.numpy import load_file

    from sdjax.data.shapes_dataset import write_shapes_folder
    from sdjax.evaluation.default_model_ti import mark_examples

    data = write_shapes_folder(tmp_path / "data", 16, examples=mark_examples)
    settings = {"init_from": base_folder, "data.folder": data, "data.batch_size": 4,
                "checkpoint.every": 2, "checkpoint.keep": 10, "log_every": 1,
                "textual_inversion.token": "xmark", "textual_inversion.init_word": INIT_WORD,
                "textual_inversion.num_vectors": VECTORS}
    env = {"JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}

    def train(workdir, *flags, **overrides):
        args = [f"--config.{k}={v}" for k, v in {**settings, **overrides}.items()]
        with mock.patch.dict(os.environ, env):
            out = run_python("-m", "experiments.train",
                             "--config=configs/train_tiny.py:textual_inversion",
                             f"--workdir={workdir}", "--progress=false", *args, *flags)
        assert out.returncode == 0, out.stderr[-4000:]

    # With a sample grid at the end, drawn with the trained vectors.
    train(tmp_path / "reference", total_steps=4, **{"sample.every": 4, "sample.steps": 2,
                                                    "sample.prompts": "('a xmark',)"})
    assert (tmp_path / "reference" / "samples" / "step_0000004.png").is_file()
    train(tmp_path / "interrupted", total_steps=2)
    train(tmp_path / "interrupted", total_steps=4)
    train(tmp_path / "interrupted", "--export_checkpoint=4", total_steps=4)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / w / "metrics.jsonl").read_text()
               .splitlines()] for w in ("reference", "interrupted")]
    assert losses[0] == losses[1]
    expected = load_file(str(tmp_path / "reference" / "export" / "xmark.safetensors"))
    for path in (tmp_path / "interrupted" / "export",
                 tmp_path / "interrupted" / "exports" / "step_0000004"):
        ours = load_file(str(path / "xmark.safetensors"))
        np.testing.assert_array_equal(ours["emb_params"], expected["emb_params"], err_msg=path)
