"""The notebooks' Colab setup (lcm_jax/colab.py) and a machine without TensorFlow (the [tf] extra):
runs keep their metrics without TensorBoard, tfds data is refused with the fix."""
import importlib.util

import pytest

from lcm_jax import colab


def test_an_installed_tensorflow_is_kept(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "tensorflow" else real(name, *a))
    assert colab.requirement("/content/lcm_jax") == "/content/lcm_jax"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorflow" else real(name, *a))
    assert colab.requirement("/content/lcm_jax") == "/content/lcm_jax[tf]"


def test_a_restart_is_asked_only_when_the_runtime_packages_changed(monkeypatch, capsys):
    installed = {"numpy": "1.26.4", "jax": "0.4.33"}
    monkeypatch.setattr(colab, "versions", lambda: dict(installed))

    def pip(args, upgrade):
        assert args[:3] == ["install", "-q", "-e"]
        installed.update(upgrade)

    assert colab.install("/c", lambda args: pip(args, {"lcm-jax": "0.1.0", "flax": "0.10.4"})) == []
    assert colab.install("/c", lambda args: pip(args, {"jax": "0.7.0"})) == ["jax 0.4.33 -> 0.7.0"]
    assert "restarting the runtime; run this cell again" in capsys.readouterr().out
    assert colab.install("/c", lambda args: pip(args, {})) == []  # the cell's second run goes on


def test_versions_reads_this_environment():
    assert colab.versions()["numpy"] == __import__("numpy").__version__


def test_without_tensorflow(monkeypatch, caplog):
    from lcm_jax import config_checks, errors, train
    import tiny_run

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorflow" else real(name, *a))
    assert train._metric_writer("/unused", True) is None
    assert "no TensorBoard files" in caplog.text
    config = tiny_run.tiny_config(["data.name=tfds", "data.tfds_name=mnist"])
    with pytest.raises(errors.UserError, match=r"data.name='tfds' reads through TensorFlow, which is not installed"):
        config_checks.validate(config)
