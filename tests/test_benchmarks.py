"""The benchmark's bookkeeping (the suites themselves are measurements, run by hand)."""
from experiments.benchmark import SUITES
from experiments.benchmarks import speed


def test_profile_categories_follow_the_source_path():
    unet = "jit(train_step)/jvp(UNet2DConditionModel)/up_blocks_1/attentions_0/transformer_blocks_0"
    cases = {
        f"{unet}/attn1/bhqk,bkhd->bqhd/dot_general": "forward: attention (q k^T, softmax, p v)",
        f"jit(train_step)/transpose(jvp(UNet2DConditionModel))/down_blocks_0/resnets_0/conv1/conv_general_dilated":
            "backward: convolutions",
        f"{unet}/norm1/reduce_sum": "forward: GroupNorm / LayerNorm",
        f"{unet}/ff/net_2/dot_general": "forward: dense layers",
        f"{unet}/ff/net_0/erfc": "forward: elementwise (SiLU, GEGLU, residuals, concat)",
        "jit(train_step)/adam/mul": "loss, clip, AdamW, EMA",
    }
    for op_name, category in cases.items():
        assert speed._op_category(op_name) == category, op_name
    assert {"lcd_step", "lcd_profile", "mfu", "xla_flags", "lcd_memory", "prefetch"} <= set(SUITES)
