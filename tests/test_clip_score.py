"""CLIP score parity with transformers' CLIPModel and CLIPImageProcessor, on a tiny random CLIP."""
import json
import os
import shutil

import numpy as np
import pytest

from lcm_jax.eval import clip_score
from lcm_jax.models import clip_vision

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from support.clip import LENGTH, PROJ, pil_image_processor  # noqa: E402

TOL = 1e-4
PROMPTS = ["a cat", "dog", "a dog and a cat", "cat cat cat", "", "zebra " * 20]  # last: truncated


def images(n, h, w, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (n, h, w, 3)).astype(np.float32)


def test_matches_transformers(clip):
    model, folder, scorer = clip
    x = images(len(PROMPTS), 40, 48)  # 6 pairs in batches of 4: the last batch is padded
    # The same pixel_values into both: the models are compared exactly, preprocessing below.
    pixels = torch.from_numpy(np.asarray(scorer.preprocess(x)).transpose(0, 3, 1, 2).copy())
    # Tokenized as CLIPProcessor does (padding=True + attention_mask): pooling at the first EOS
    # under a causal mask makes our mask-less max_length padding give the same embeddings.
    tokens = scorer.tokenizer(PROMPTS, padding=True, truncation=True, max_length=LENGTH,
                              return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=pixels, **tokens)
        want_image = model.get_image_features(pixel_values=pixels).pooler_output.numpy()
        want_text = model.get_text_features(**tokens).pooler_output.numpy()
    want_score = (100 * (out.image_embeds * out.text_embeds).sum(-1).clamp(min=0)).numpy()
    errors = {"image_embeds": np.abs(scorer.image_embeds(x) - want_image).max(),
              "text_embeds": np.abs(scorer.text_embeds(PROMPTS) - want_text).max(),
              "score": np.abs(scorer.score(x, PROMPTS) - want_score).max()}
    print(errors, want_score)
    assert max(errors.values()) <= TOL, errors
    assert (want_score == 0).any() and (want_score > 0).any()  # the clamp is exercised


def test_vision_model_folder(clip, tmp_path):
    """clip_vision alone: a CLIPVisionModelWithProjection folder, every output."""
    model, _, scorer = clip
    config = transformers.CLIPVisionConfig(**{**model.config.vision_config.to_dict(),
                                              "projection_dim": PROJ})
    vision = transformers.CLIPVisionModelWithProjection(config).eval()
    state = {k: v for k, v in model.state_dict().items() if k.startswith(("vision_model.",
                                                                          "visual_projection."))}
    vision.load_state_dict(state)
    vision.save_pretrained(str(tmp_path))
    module, params = clip_vision.from_pretrained(str(tmp_path))
    assert module.with_projection and module.config == scorer.vision_module.config
    pixels = np.asarray(scorer.preprocess(images(3, 32, 32, seed=1)))
    ours = module.apply({"params": params}, pixels)
    with torch.no_grad():
        ref = vision(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()),
                     output_hidden_states=True)
    assert len(ours["hidden_states"]) == len(ref.hidden_states) == 3
    for a, b in [(ours["image_embeds"], ref.image_embeds), (ours["last_hidden_state"],
                                                            ref.last_hidden_state),
                 *zip(ours["hidden_states"], ref.hidden_states)]:
        np.testing.assert_allclose(a, b.numpy(), atol=TOL, rtol=0)
    with pytest.raises(ValueError, match=r"pixel_values must be \[batch, 32, 32, 3\]"):
        module.apply({"params": params}, pixels[:, :16])


def smooth(h, w):
    yy, xx = np.mgrid[:h, :w] / max(h, w)
    return 0.5 + 0.5 * np.sin(6 * xx[..., None] + 4 * yy[..., None] * np.arange(1, 4))


@pytest.mark.parametrize("h, w", [(32, 32), (45, 60), (64, 64), (20, 24), (100, 37)])
def test_preprocessing_matches_clip_image_processor(clip, h, w):
    """On uint8 images (the processor's input; ours gets them / 255): differences in uint8
    levels. Smooth images: PIL's rounding (mean ~0.3, max ~1). Noise: bicubic overshoots, which
    PIL clips between its two passes, so ~1% of values differ more (up to ~20 seen)."""
    _, folder, scorer = clip
    processor = pil_image_processor().from_pretrained(folder)
    noise = np.random.default_rng(h * w).integers(0, 256, (h, w, 3))
    # kind, image, (max fraction of values more than 1.5 levels off, max levels off)
    for kind, u8, (most, worst) in [("smooth", np.round(255 * smooth(h, w)), (0, 1.5)),
                                    ("noise", noise, (0.02, 32))]:
        u8 = np.stack([u8, u8[::-1, ::-1]]).astype(np.uint8)
        want = processor(list(u8), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
        ours = np.asarray(scorer.preprocess(u8 / np.float32(255)))
        assert ours.shape == want.shape == (2, 32, 32, 3)
        levels = np.abs(ours - want) * np.asarray(processor.image_std) * 255
        stats = (kind, levels.max(), levels.mean(), np.mean(levels > 1.5))
        print((h, w), "%s: max %.3f, mean %.3f, over 1.5: %.4f levels" % stats)
        assert levels.max() <= worst and levels.mean() <= 0.5 and stats[-1] <= most, stats
        if (h, w) == (32, 32):  # no resize: only rescale + normalize, to float rounding
            assert levels.max() <= 1e-3


def test_resize_is_torch_antialiased_bicubic():
    """The float resize of transformers 5's torchvision CLIPImageProcessor (GPU / non-AVX)."""
    x = images(2, 45, 60, seed=3)
    resize_only = clip_score.Preprocessing(size=32, crop_size=None, image_mean=None)
    want = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), (32, 42),
                                           mode="bicubic", antialias=True).clamp(0, 1)
    # JAX vs torch: 1e-5 is 84 float32 ulps of these [0, 1] values (4 seen).
    np.testing.assert_allclose(resize_only(x), want.permute(0, 2, 3, 1).numpy(), atol=1e-5, rtol=0)


def test_inputs(clip):
    _, _, scorer = clip
    x = images(2, 32, 32, seed=2)
    grey = x.mean(-1)
    rgb = np.repeat(grey[..., None], 3, -1)
    np.testing.assert_array_equal(scorer.score(grey, PROMPTS[:2]), scorer.score(rgb, PROMPTS[:2]))
    np.testing.assert_array_equal(scorer.score(grey[..., None], PROMPTS[:2]),
                                  scorer.score(rgb, PROMPTS[:2]))
    for bad, match in [((x * 255).astype(np.uint8), "divide uint8 images by 255"),
                       (2 * x - 1, r"map samples in \[-1, 1\]"),
                       (x[..., :2], r"must be \[N, H, W, 3\]")]:
        with pytest.raises((TypeError, ValueError), match=match):
            scorer.score(bad, PROMPTS[:2])
    with pytest.raises(ValueError, match="got 2 images and 3 prompts"):
        scorer.score(x, PROMPTS[:3])


def test_folder_errors(clip, tmp_path):
    _, folder, _ = clip
    with pytest.raises(FileNotFoundError, match="does not exist"):
        clip_score.CLIPScorer.from_pretrained(str(tmp_path / "nowhere"))
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    os.remove(tmp_path / "preprocessor_config.json")
    with pytest.raises(FileNotFoundError, match="no preprocessor_config.json.*save_pretrained"):
        clip_score.CLIPScorer.from_pretrained(str(tmp_path))
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": {"size": 40}}))
    assert clip_score.CLIPScorer.from_pretrained(str(tmp_path)).preprocessing.size == 40
    shutil.copy(os.path.join(folder, "preprocessor_config.json"), tmp_path)
    for name in ("vocab.json", "tokenizer.json"):
        if os.path.exists(tmp_path / name):
            os.remove(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="no CLIP tokenizer"):
        clip_score.CLIPScorer.from_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config["text_config"]))
    with pytest.raises(ValueError, match="not a transformers CLIPModel config"):
        clip_score.CLIPScorer.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**config, "projection_dim": PROJ + 1}))
    with pytest.raises(ValueError, match="shape mismatch for text_projection.weight"):
        clip_score.CLIPScorer.from_pretrained(str(tmp_path))


def test_preprocessing_config():
    p = clip_score.Preprocessing.from_dict({"size": 224, "crop_size": 224})  # old-style ints
    assert p == clip_score.Preprocessing()
    assert p.resized_shape(480, 640) == (224, 298) and p.resized_shape(640, 480) == (298, 224)
    q = clip_score.Preprocessing.from_dict({"size": {"height": 64, "width": 48},
                                            "do_center_crop": False, "do_normalize": False})
    assert q.resized_shape(10, 10) == (64, 48) and q.crop_size is None and q.image_mean is None
    with pytest.raises(ValueError, match="resample=2 is not supported"):
        clip_score.Preprocessing.from_dict({"resample": 2})
    with pytest.raises(ValueError, match="crop_size=.* is larger"):
        clip_score.Preprocessing(size=16, crop_size=(32, 32))(np.zeros((1, 20, 20, 3)))
