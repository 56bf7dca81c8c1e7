"""configs/digits_lego.py loaded from its file (test_lego, parallel_check)."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def digits_lego_config(arg):
    spec = importlib.util.spec_from_file_location("digits_lego", os.path.join(ROOT, "configs/digits_lego.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)
