"""README command 1 at tiny scale: the whole digits chain (VAE -> latent cache -> teacher -> LCD ->
the few-step table) through experiments/main.py, then a rerun that skips the finished stages, then
LCF of the exported student on an image folder."""
import json

import pytest



@pytest.mark.slow
def test_tiny_chain_writes_the_table_and_reruns_from_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    from experiments import main as entry

    from configs import digits_lcd
    from lcm_jax import teachers

    config = digits_lcd.get_config("tiny")
    config.wandb.mode = "offline"
    results = entry.train_and_evaluate(config, str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert set(results) == {"lcm", "ddim", "dpm", "dpmpp", "teacher_ddim2"}
    for name in ("lcm", "ddim", "dpm", "dpmpp"):
        assert set(results[name]) == {"1"} and 0 <= results[name]["1"]["acc"] <= 1
    assert results["teacher_ddim2"]["fd"] > 0
    assert json.load(open(tmp_path / "results.json")) == results
    assert (tmp_path / "grids" / "lcm_1.png").exists()
    assert (tmp_path / "vae" / "export" / "config.json").exists()  # a diffusers VAE folder
    vae_config = json.load(open(tmp_path / "vae" / "export" / "config.json"))
    assert len(vae_config["latents_std"]) == 4

    # W&B: the three stages read as one experiment (group = the workdir); the student's run holds
    # the few-step table.
    import wandb_records

    runs = {stage: wandb_records.read_runs(str(tmp_path / stage))[0] for stage in ("vae", "teacher", "")}
    assert {r["group"] for r in runs.values()} == {tmp_path.name}  # the workdir's name
    assert [runs[s]["job_type"] for s in ("vae", "teacher", "")] == ["vae", "teacher", "lcd"]
    assert any(f.startswith("media/table/eval_table_") for f in runs[""]["files"])

    # experiments/export.py rebuilds the run from W/config.json: the VAE as a diffusers folder,
    # the DiT student as msgpack, equal to the EMA params main.py saved at the end.
    from experiments import export

    summary = export.export(str(tmp_path), str(tmp_path / "export"))
    assert summary["kind"] == "digits" and summary["step"] == config.total_steps
    assert (open(tmp_path / "export" / "student" / "params.msgpack", "rb").read()
            == open(teachers.student_path(str(tmp_path)), "rb").read())
    assert json.load(open(tmp_path / "export" / "vae" / "config.json"))["latents_std"] == vae_config["latents_std"]

    # experiments/evaluate.py: the student at 1 step, FD-digits and accuracy.
    from experiments import evaluate

    scored = evaluate.evaluate(str(tmp_path), steps=(1,), num=config.eval.num_samples,
                               batch_size=config.eval.batch_size)["table"]["lcm"]["1"]
    assert scored["fd"] > 0 and 0 <= scored["acc"] <= 1

    # A rerun trains neither the VAE nor the teacher again.
    calls = []
    monkeypatch.setattr(teachers.train, "run", lambda *a, **k: calls.append(a[1]))
    from lcm_jax.data import make_pipeline

    pipeline = make_pipeline(config.data, global_batch_size=16, seed=0)
    teacher = teachers.train_chained(config, str(tmp_path), pipeline.arrays["image"],
                                     pipeline.arrays["label"])
    assert calls == [] and teacher.latent_shape == (8, 8, 4)

    # LCF of that LCM on an image folder of inverted digits (captions name the classes): the
    # exported student is the starting point, bit for bit.
    import jax
    from experiments import lcf_digits
    import numpy as np

    from configs import digits_lcf
    from lcm_jax import data, train
    from lcm_jax import objectives

    monkeypatch.undo()
    monkeypatch.setenv("WANDB_MODE", "disabled")
    lcf_digits.write_inverted_folder(str(tmp_path / "inverted"))
    lcf = digits_lcf.get_config("tiny")
    lcf.data.path, lcf.lcf.lcm_workdir = str(tmp_path / "inverted"), str(tmp_path)
    lcm = teachers.distilled_from_chained(lcf, str(tmp_path), lcf.lcd.w_embedding_dim)
    paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(lcm.params)[0]}
    assert any("cond_proj" in p for p in paths)  # the w-conditioned student, not the teacher
    pipeline = data.make_pipeline(lcf.data, global_batch_size=lcf.batch_size, seed=0)
    final = train.run(lcf, str(tmp_path / "lcf"), objectives.build(lcf, str(tmp_path / "lcf"), pipeline),
                      pipeline)
    assert int(final.step) == lcf.total_steps
    moved = max(float(np.max(np.abs(a - b))) for a, b in
                zip(jax.tree.leaves(final.params), jax.tree.leaves(lcm.params)))
    assert moved > 0
