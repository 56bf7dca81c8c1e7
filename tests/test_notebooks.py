"""Every notebook under notebooks/ runs top to bottom with its tiny parameters (notebooks/README.md)."""
import glob
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
# Per notebook: the values that replace its parameters cell's in the test run.
TINY = {
    "quickstart.ipynb": dict(TINY=True, WORKDIR="{tmp}/chain", STEPS=[1], TEACHER_STEPS=2, NUM_SAMPLES=20),
    "train_on_tpu.ipynb": dict(TINY=True, TEACHER_WORKDIR="{tmp}/chain", SIMULATED_DEVICES=8, FSDP=2,
                               FSDP_MIN_SIZE=2 ** 10, STEPS=3),
    "sd_lcm_sampling.ipynb": dict(BASE="{tmp}/base/pipe", LCM="{tmp}/lcm/pipe", LCM_LORA="{tmp}/lora",
                                  TCD_LORA="{tmp}/lora", PROMPT="a cat", STEPS=[1, 2], DDIM_STEPS=3,
                                  TCD_STEPS=2, GAMMAS=[0.0, 0.5]),
    "lego_bricks.ipynb": dict(TINY=True, TRAIN_STEPS=4, WORKDIR="{tmp}/lego", NUM_SAMPLES=16,
                              T_BREAKS=[0.5], REPEATS=1, HEUN_STEPS=2),
    "smooth_interpolation.ipynb": dict(TINY=True, TEACHER_WORKDIR="{tmp}/chain",
                                       SMOOTH_WORKDIR="{tmp}/smooth", TRAIN_STEPS=2, NUM_STEPS=2,
                                       NUM_FRAMES=3, NUM_IMAGES=2),
    "tcd_vs_lcm.ipynb": dict(TINY=True, TEACHER_WORKDIR="{tmp}/chain", STUDY_DIR="{tmp}/study",
                             TRAIN_STEPS=2, STEPS=[2], GAMMAS=[0.5], NUM_SAMPLES=20),
}



def tiny_sd_folders(tmp):
    """sd_lcm_sampling.ipynb's inputs, tiny and random: a base SD pipeline folder, an LCM pipeline
    folder (a w-embedding UNet) and a LoRA in peft layout."""
    pytest.importorskip("diffusers")
    import jax

    from lcm_jax.models import lora
    from support.sd import build

    _, base = build(tmp / "base", "ddim")
    build(tmp / "lcm", "lcm")
    factors = jax.tree.map(lambda f: f + 0.01, lora.init(jax.random.PRNGKey(0), base.unet_params, rank=2))
    lora.save(str(tmp / "lora"), factors, alpha=2.0)  # (lora_B is zero at init: moved off it)


SETUP = {"sd_lcm_sampling.ipynb": tiny_sd_folders}  # inputs a notebook reads, made before it runs
# Notebooks that start from README command 1's VAE + teacher ({tmp}/chain): they get a copy of one
# tiny chain trained once per test run (deterministic, so the same one each would train).
CHAIN_USERS = ("quickstart.ipynb", "train_on_tpu.ipynb", "smooth_interpolation.ipynb", "tcd_vs_lcm.ipynb")


@pytest.fixture(scope="session")
def tiny_chain(tmp_path_factory):
    """configs/digits_lcd.py:tiny's VAE and teacher stages, trained once for the whole run: the
    xdist workers share the folder (the first trains it under a file lock, the other waits)."""
    import filelock

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # shared by the workers
    path = root / "tiny_chain"
    with filelock.FileLock(str(root / "tiny_chain.lock")):
        if not (path / "teacher" / "DONE").exists():
            from configs import digits_lcd
            from lcm_jax import data, teachers

            config = digits_lcd.get_config("tiny")
            pipeline = data.make_pipeline(config.data, global_batch_size=config.batch_size,
                                          seed=config.seed)
            teachers.train_chained(config, str(path), pipeline.arrays["image"], pipeline.arrays["label"])
    return path


def test_every_notebook_has_tiny_parameters():
    assert {os.path.basename(p) for p in NOTEBOOKS} == set(TINY)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path, monkeypatch, request):
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
        f"{path} carries outputs: strip them (jupyter nbconvert --clear-output --inplace)"
    index = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(index) == 1, f"{path} needs exactly one cell tagged 'parameters'"
    SETUP.get(os.path.basename(path), lambda tmp: None)(tmp_path)
    if os.path.basename(path) in CHAIN_USERS:
        import shutil

        shutil.copytree(request.getfixturevalue("tiny_chain"), tmp_path / "chain")
    values = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v
              for k, v in TINY[os.path.basename(path)].items()}
    source = "\n".join(f"{k} = {v!r}" for k, v in values.items())
    nb.cells.insert(index[0] + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    for key, value in {"WANDB_MODE": "disabled", "MPLBACKEND": "Agg", "PYTHONPATH": ROOT}.items():
        monkeypatch.setenv(key, value)  # the kernel inherits them
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": ROOT}}).execute()
