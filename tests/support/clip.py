"""A tiny random transformers CLIPModel folder (weights, tiny tokenizer, preprocessor) and
transformers' PIL image processor (test_clip_score; the `clip` fixture in conftest)."""
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import write_tiny_tokenizer  # noqa: E402
from lcm_jax.eval import clip_score  # noqa: E402
from lcm_jax.models import clip_text  # noqa: E402

LENGTH, PROJ = 16, 16


def pil_image_processor():
    """transformers' PIL-backed CLIPImageProcessor (CLIPImageProcessor itself is the torchvision
    one in transformers 5). A torchvision build that does not fit torch (a CUDA wheel next to
    torch+cpu) breaks every image processor at import: hide it then, as if not installed."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # RuntimeError "operator torchvision::nms does not exist", OSError, ...
        sys.modules["torchvision"] = None  # find_spec -> None: transformers sees no torchvision
        from transformers.utils import import_utils
        import_utils.is_torchvision_available.cache_clear()
    from transformers import CLIPImageProcessorPil
    return CLIPImageProcessorPil


def tiny_clip(folder):
    """(torch CLIPModel, its folder: weights + tiny tokenizer + preprocessor, our scorer)."""
    vocab = write_tiny_tokenizer(folder)
    tokenizer = clip_text.load_tokenizer(folder)
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = transformers.CLIPConfig(
        text_config=dict(layers, vocab_size=vocab, max_position_embeddings=LENGTH,
                         hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(layers, image_size=32, patch_size=8, hidden_act="gelu"),
        projection_dim=PROJ)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    model.save_pretrained(folder)
    pil_image_processor()(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
                          ).save_pretrained(folder)
    return model, folder, clip_score.CLIPScorer.from_pretrained(folder, batch_size=4)
