"""The studies' seed pooling: replicates NAME_sK read as mean ± std (pure bookkeeping, no JAX)."""
import json
import os
import statistics

import pytest

from experiments import _harness, consistency_digits, lego_digits, smooth_digits

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "results")


def test_mean_std_is_the_sample_std():
    assert _harness.mean_std([1.0, 2.0, 6.0]) == (3.0, pytest.approx(statistics.stdev([1, 2, 6])))
    assert _harness.mean_std([4.0]) == (4.0, 0.0)  # one replicate: no spread
    assert _harness.SEEDED.match("pr_sub_s12").groups() == ("pr_sub", "12")
    assert _harness.SEEDED.match("pr_sub") is None
    assert _harness.replicate("pr_sub_s12") == ("pr_sub", 12) and _harness.replicate("pr_sub") == ("pr_sub", 0)
    assert _harness.replicate_name("base", 0) == "base" and _harness.replicate_name("base", 2) == "base_s2"


def test_consistency_seed_summary_pools_seed_k_read_at_sampling_seed_k():
    cell = lambda fd, acc: {"1": {"fd": fd, "acc": acc}}
    run = lambda seed, fd: {"done": True, "steps": 10, "10": {
        f"lcm/g1.5/seed{s}": cell(fd + 100 * (s != seed), 0.5) for s in (0, 1)}}
    results = {"lcm_s0": run(0, 10.0), "lcm_s1": run(1, 14.0), "lcm_s2": {"done": False},
               "teacher_ddim50": {"g1.5/seed0": {"fd": 9.0, "acc": 0.9}, "g1.5/seed1": {"fd": 11.0, "acc": 0.7}}}
    summary = consistency_digits.seed_summary(results)
    lcm = summary["lcm"]["lcm/g1.5"]["1"]  # the unfinished seed 2 and the cross-seed reads left out
    assert (lcm["seeds"], lcm["fd_mean"], lcm["fd_std"]) == ([0, 1], 12.0, round(statistics.stdev([10, 14]), 4))
    teacher = summary["teacher_ddim50"]["g1.5"]["50"]
    assert (teacher["fd_mean"], teacher["acc_mean"], teacher["acc_std"]) == (10.0, 0.8, round(statistics.stdev([0.9, 0.7]), 4))


@pytest.mark.parametrize("study,file", [(consistency_digits, "tcd_vs_lcm_3seeds.json"),
                                        (lego_digits, "lego_seeds.json"), (smooth_digits, "smooth_3seeds.json"),
                                        (consistency_digits, "lcd_curriculum_3seeds.json")])
def test_the_published_summaries_are_their_runs_pooled(study, file):
    results = json.load(open(os.path.join(DOCS, file)))
    assert study.seed_summary(results) == results["seed_summary"]


def test_lego_seed_summary_takes_the_bare_name_as_seed_0():
    entry = lambda fd, acc: {"sweep": {"0.0": {"fd": fd, "acc": acc, "seconds": 1.0}}, "params": 5,
                             "steps": 2, "train_images": 4, "train_flops_per_image": 8.0}
    results = {"pg": entry(18.0, 0.6), "pg_s1": entry(20.0, 0.8), "pg_sub_s2": entry(19.0, 0.7),
               "seed_summary": {"stale": {}}}
    summary = lego_digits.seed_summary(results)
    assert set(summary) == {"pg", "pg_sub"}
    assert summary["pg"] == dict(seeds=[0, 1], fd_mean=19.0, fd_std=round(statistics.stdev([18, 20]), 4),
                                 acc_mean=0.7, acc_std=round(statistics.stdev([0.6, 0.8]), 4),
                                 train_flops_per_image=8.0)
    assert summary["pg_sub"]["seeds"] == [2] and summary["pg_sub"]["fd_std"] == 0.0
    assert "19.00 ± 1.41" in lego_digits.tables(dict(results, seed_summary=summary), [0.0])


def test_smooth_seed_summary_compares_each_seed_with_the_base_at_that_seed():
    scores = lambda istd, fd: {"istd": istd, "mean_step": 0.5, "fd": fd, "acc": 0.8, "ddim_psnr_g1.0": 32.0,
                               "ddim_psnr_g1.5": 28.0, "ddim_ssim_g1.0": 0.9, "ddim_ssim_g1.5": 0.9}
    results = {"base": scores(0.20, 10.0), "base_s1": scores(0.25, 20.0), "lambda_1.0": scores(0.10, 15.0),
               "lambda_1.0_s1": scores(0.20, 20.0), "vae": {"psnr": 32.0, "ssim": 0.9}}
    summary = smooth_digits.seed_summary(results)
    assert set(summary) == {"base", "lambda_1.0"} and "istd_change_mean" not in summary["base"]
    smooth = summary["lambda_1.0"]  # ISTD -50% and -20%, FD +50% and 0% at the matching seeds
    assert (smooth["istd_change_mean"], smooth["fd_change_mean"]) == (-0.35, 0.25)
    assert smooth["istd_change_std"] == round(statistics.stdev([-0.5, -0.2]), 4)
    assert "-35.0% ± 21.2%" in smooth_digits.tables(dict(results, seed_summary=summary))
