import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests import shared helpers


def write_tiny_tokenizer(folder, model_max_length=None) -> int:
    """A tiny CLIP byte-level BPE vocabulary (letters, word-final letters, 'cat', 'dog') in
    `folder`; returns the vocabulary size."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    merges = ["c a", "ca t</w>", "d o", "do g</w>"]
    tokens = list(letters) + [c + "</w>" for c in letters] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    if model_max_length:
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump({"model_max_length": model_max_length}, f)
    return len(tokens)


def fast_compile(f, *args):
    """Compile at XLA's lowest backend optimisation and run: tests that check values, not speed."""
    import jax

    return jax.jit(f).lower(*args).compile({"xla_backend_optimization_level": 0})(*args)
