"""CLIP text encoder parity with transformers (torch CPU), on tiny random configs."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from conftest import write_tiny_tokenizer  # noqa: E402
from lcm_jax.models import clip_text, convert

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, LENGTH, TOL = 100, 16, 1e-4
# Post-#24773 configs pool at the first EOS; legacy ones (eos_token_id=2) at argmax(input_ids).
# An id above EOS in one row makes the two rules disagree there.
NEW_EOS, ABOVE_EOS = VOCAB - 3, VOCAB - 1
# name: (hidden_act, eos_token_id, with_projection)
CASES = {  # like the Hub configs: SD1 and SDXL encoder 2 kept the legacy eos_token_id=2
    "sd1_vit_l": ("quick_gelu", 2, False),
    "sd2_open_clip_h": ("gelu", NEW_EOS, False),
    "sdxl_big_g": ("gelu", 2, True),
}


def tiny_config(hidden_act, eos_token_id, layers=3):
    return transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, projection_dim=24,
        num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=LENGTH,
        hidden_act=hidden_act, eos_token_id=eos_token_id, bos_token_id=VOCAB - 2, pad_token_id=1)


def input_ids(seed=0):
    """EOS at different positions, padded after it with EOS (SD1 tokenizer) or 0 (SD2 tokenizer):
    the first-EOS rule must pick the first one. Row 3 holds an id above EOS before its EOS."""
    ids = np.random.default_rng(seed).integers(3, NEW_EOS, (4, LENGTH))
    for row, (pos, pad) in enumerate([(LENGTH - 1, 0), (5, NEW_EOS), (0, 0), (9, NEW_EOS)]):
        ids[row, pos:] = pad
        ids[row, pos] = NEW_EOS
    ids[3, 2] = ABOVE_EOS
    return ids.astype(np.int32)


def torch_outputs(model, ids, attention_mask=None):
    t = torch.from_numpy(ids.astype(np.int64))
    m = None if attention_mask is None else torch.from_numpy(attention_mask.astype(np.int64))
    with torch.no_grad():
        out = model(t, attention_mask=m, output_hidden_states=True)
        text_model = getattr(model, "text_model", model)  # transformers 5: CLIPTextModel has none
        pooled = text_model(t, attention_mask=m).pooler_output
    res = {"last_hidden_state": out.last_hidden_state, "pooler_output": pooled,
           "hidden_states": out.hidden_states}
    if hasattr(out, "text_embeds"):
        res["text_embeds"] = out.text_embeds
    return jax.tree.map(lambda x: x.numpy(), res)


def max_errors(ours, ref):
    assert set(ours) == set(ref)
    assert len(ours["hidden_states"]) == len(ref["hidden_states"])
    return {k: max(float(np.abs(np.asarray(a) - b).max())
                   for a, b in zip(jax.tree.leaves(ours[k]), jax.tree.leaves(ref[k])))
            for k in ref}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """(name, torch model, its folder, our module, our params, jitted forward)."""
    hidden_act, eos, with_projection = CASES[request.param]
    torch.manual_seed(0)
    cls = (transformers.CLIPTextModelWithProjection if with_projection
           else transformers.CLIPTextModel)
    model = cls(tiny_config(hidden_act, eos)).eval()
    folder = str(tmp_path_factory.mktemp(request.param))
    model.save_pretrained(folder, safe_serialization=True)
    module, params = clip_text.from_pretrained(folder)
    forward = jax.jit(lambda p, ids, mask=None: module.apply({"params": p}, ids, mask))
    return request.param, model, folder, module, params, forward


def test_matches_transformers(case):
    name, model, _, module, params, forward = case
    assert module.with_projection == CASES[name][2]
    ids = input_ids()
    errors = max_errors(forward(params, ids), torch_outputs(model, ids))
    print(name, errors)
    assert max(errors.values()) <= TOL, errors


def test_attention_mask_matches_transformers(case):
    _, model, _, _, params, forward = case
    ids = input_ids(1)
    mask = (np.arange(LENGTH) < np.array([[16], [6], [1], [10]])).astype(np.int32)  # right pad
    errors = max_errors(forward(params, ids, mask), torch_outputs(model, ids, mask))
    assert max(errors.values()) <= TOL, errors


def test_round_trip_through_transformers(case, tmp_path):
    name, model, _, module, params, forward = case
    clip_text.save_pretrained(str(tmp_path), module, params,
                              convert.read_config(case[2]))
    reloaded, info = type(model).from_pretrained(str(tmp_path), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids = input_ids(2)
    errors = max_errors(forward(params, ids), torch_outputs(reloaded.eval(), ids))
    assert max(errors.values()) <= TOL, errors
    # And back into JAX: the same tree, bit for bit.
    module_2, params_2 = clip_text.from_pretrained(str(tmp_path))
    assert module_2 == module
    jax.tree.map(np.testing.assert_array_equal, params_2, params)


def test_clip_skip_helpers(case):
    name, model, _, module, params, _ = case
    ids = input_ids(3)
    ref = torch_outputs(model, ids)
    text_model = getattr(model, "text_model", model)
    for k in (None, 1, 2):
        ours = module.apply({"params": params}, ids, k, method="encode_sd")
        if k is None:
            want = ref["last_hidden_state"]
        else:  # diffusers: final_layer_norm(hidden_states[-(clip_skip + 1)])
            with torch.no_grad():
                want = text_model.final_layer_norm(
                    torch.from_numpy(ref["hidden_states"][-(k + 1)])).numpy()
        np.testing.assert_allclose(ours, want, atol=TOL, rtol=0)
        hidden, pooled = module.apply({"params": params}, ids, k, method="encode_sdxl")
        np.testing.assert_allclose(hidden, ref["hidden_states"][-((k or 0) + 2)], atol=TOL, rtol=0)
        if module.with_projection:
            np.testing.assert_allclose(pooled, ref["text_embeds"], atol=TOL, rtol=0)
        else:
            assert pooled is None


def test_sdxl_prompt_embeds(tmp_path):
    torch.manual_seed(1)
    models = [transformers.CLIPTextModel(tiny_config("quick_gelu", 2, layers=2)).eval(),
              transformers.CLIPTextModelWithProjection(tiny_config("gelu", NEW_EOS)).eval()]
    loaded = []
    for i, model in enumerate(models):
        model.save_pretrained(str(tmp_path / str(i)))
        loaded.extend(clip_text.from_pretrained(str(tmp_path / str(i))))
    ids_1, ids_2 = input_ids(4), input_ids(5)
    embeds, pooled = clip_text.sdxl_prompt_embeds(*loaded[:2], ids_1, *loaded[2:], ids_2)
    ref_1, ref_2 = torch_outputs(models[0], ids_1), torch_outputs(models[1], ids_2)
    want = np.concatenate([ref_1["hidden_states"][-2], ref_2["hidden_states"][-2]], -1)
    assert embeds.shape == (4, LENGTH, 64)
    np.testing.assert_allclose(embeds, want, atol=TOL, rtol=0)
    np.testing.assert_allclose(pooled, ref_2["text_embeds"], atol=TOL, rtol=0)


def test_projection_choice_and_position_ids(case, tmp_path):
    name, _, folder, module, params, _ = case
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    # Older transformers saved the position_ids buffer: it is ignored.
    from safetensors.numpy import load_file, save_file
    path = str(tmp_path / "model.safetensors")
    state = clip_text._with_prefix(load_file(path))
    state["text_model.embeddings.position_ids"] = np.arange(LENGTH)[None]
    save_file(state, path)
    plain, plain_params = clip_text.from_pretrained(str(tmp_path), with_projection=False)
    assert not plain.with_projection and "text_projection" not in plain_params
    out = plain.apply({"params": plain_params}, input_ids())
    assert "text_embeds" not in out and len(out["hidden_states"]) == 4
    if not module.with_projection:
        with pytest.raises(convert.ConversionError, match="missing key text_projection.weight"):
            clip_text.from_pretrained(str(tmp_path), with_projection=True)


def test_errors(case, tmp_path):
    folder = case[2]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        clip_text.from_pretrained(str(tmp_path / "nowhere"))
    shutil.copy(os.path.join(folder, "config.json"), tmp_path)
    with pytest.raises(FileNotFoundError, match="has no .*model.safetensors"):
        clip_text.from_pretrained(str(tmp_path))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(convert.ConversionError, match="pickle"):
        clip_text.from_pretrained(str(tmp_path))
    os.remove(tmp_path / "pytorch_model.bin")
    shutil.copy(os.path.join(folder, "model.safetensors"), tmp_path)
    config = convert.read_config(folder)
    for key, value, match in [
            ("vocab_size", VOCAB + 1, "shape mismatch for text_model.embeddings.token_embedding"),
            ("intermediate_size", 48, "shape mismatch for text_model.encoder.layers.0.mlp.fc1"),
            ("hidden_act", "relu", "hidden_act='relu' is not supported"),
            ("model_type", "clip", "model_type='clip'")]:
        (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises((convert.ConversionError, ValueError), match=match):
            clip_text.from_pretrained(str(tmp_path))
    _, _, _, module, params, forward = case
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        forward(params, np.zeros((1, LENGTH + 1), np.int32))


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    """A tiny byte-level BPE vocabulary: letters, word-final letters, two merged words."""
    folder = tmp_path_factory.mktemp("tokenizer")
    write_tiny_tokenizer(str(folder))
    return str(folder)


def test_tokenize(tokenizer_folder, tmp_path):
    tok = clip_text.load_tokenizer(tokenizer_folder)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    ids = clip_text.tokenize(tok, ["a cat", "dog " * 30], max_length=8)
    assert ids.dtype == np.int32 and ids.shape == (2, 8)
    cat, dog, a = (tok.convert_tokens_to_ids(t) for t in ("cat</w>", "dog</w>", "a</w>"))
    np.testing.assert_array_equal(ids[0], [bos, a, cat, eos, eos, eos, eos, eos])
    np.testing.assert_array_equal(ids[1], [bos] + [dog] * 6 + [eos])  # truncated, EOS kept
    assert clip_text.tokenize(tok, "a cat").shape == (1, 77)
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        clip_text.load_tokenizer(str(tmp_path))
