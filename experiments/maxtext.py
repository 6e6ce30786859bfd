"""The GPT-style models MaxText publishes measured TPU throughput for, as paxlike Transformers, with
the recipe of each published row: the planner's step-time model is fitted on the v5p table and
checked, held out, on the v5e table (docs/planner.md, "Step time"; tests/test_planner_time.py).

    python -m paxlike.plan --config=experiments/maxtext.py:32b --fleet=v5p-128

MaxText sizes its models with one `global_parameter_scale` s (a power of two) from a base of
d_model 2048, 16 heads (as many KV heads) of dimension 128, MLP 7168, 16 layers: the exponent
log2(s) = 3q + r doubles heads and MLP q + (r > 0) times, d_model q + (r > 1) times and the
layers q times; head dimension 128, vocabulary 32000, SwiGLU MLP, untied output head, sequence
2048, bfloat16 compute with float32 weights.

Recipes and figures: AI-Hypercomputer/maxtext, `src/maxtext/configs/tpu/v5p/README.md`,
`src/maxtext/configs/tpu/v5e/README.md` and the `<size>.sh` scripts beside them (per-device batch,
remat policy, ICI tensor parallelism; FSDP takes the rest of a slice, slices are data parallel
over DCN). Their TFLOP/s count 6 N plus the whole T x T attention (`published_flops_per_token`):
the tables (December 2023 to June 2024) predate MaxText's halving of causal attention in its
count (July 2025), which paxlike's MFU follows; `predicted_mfu` states a prediction in the
tables' convention. MaxText's remat
policies map onto paxlike's: `minimal` (save the matmul outputs) is `save_dots`, `full` is
`full`, and `qkv_proj_offloaded` (the 128b v5e recipe: every activation but the q/k/v
projections recomputed, those kept in host memory) is counted as `full`.
"""

import dataclasses

from paxlike.config import sized_config
from paxlike.models import transformer


def _shape(scale: int) -> dict:
    q, r = divmod(scale.bit_length() - 1, 3)
    heads = 16 * 2 ** (q + (r > 0))
    return dict(d_model=2048 * 2 ** (q + (r > 1)), num_heads=heads, num_kv_heads=heads,
                head_dim=128, mlp_dim=7168 * 2 ** (q + (r > 0)), num_layers=16 * 2 ** q,
                vocab_size=32000, compute_dtype="bfloat16", remat="save_dots")


SIZES = {f"{s}b": dict(model=_shape(s), batch_size=256, seq_len=2048, steps=100000,
                       tokenizer="bpe")
         for s in (16, 32, 64, 128, 256, 512, 1024)}
# Llama 2 7B as MaxText's GPU recipe runs it (src/maxtext/configs/gpu/models/llama2_7b.yml):
# 32 layers, d 4096, 32 heads (as many KV heads), MLP 11008, sequence 4096.
SIZES["llama2_7b"] = dict(model=dict(d_model=4096, num_heads=32, num_kv_heads=32, head_dim=128,
                                     mlp_dim=11008, num_layers=32, vocab_size=32000,
                                     compute_dtype="bfloat16", remat="save_dots"),
                          batch_size=256, seq_len=4096, steps=100000, tokenizer="bpe")


def get_config(size: str = "32b"):
    return sized_config("experiments/maxtext.py", SIZES, size, transformer.default_config())


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One published row: the model, the fleet (slices x slice), MaxText's recipe for it, and the
    measured throughput."""
    size: str
    fleet: str                 # paxlike fleet name: "2xv5p-128" = 2 slices of v5p-128
    per_device_batch: int
    remat: str                 # paxlike policy (see the module docstring for the mapping)
    tensor: int                # ICI tensor parallelism; FSDP is the rest of the slice
    tflops_per_chip: float     # published
    mfu: float                 # published (TFLOP/s over the chip's bf16 peak)


def _rows(size, slices_and_figures, slice_name, batch, remat, tensor):
    return [Recipe(size, (f"{n}x" if n > 1 else "") + slice_name, batch, remat, tensor, tf, mfu)
            for n, tf, mfu in slices_and_figures]


# v5p (src/maxtext/configs/tpu/v5p/README.md): the table the step-time model is fitted on.
V5P = (_rows("32b", [(1, 328, .7147), (2, 319, .6943)], "v5p-128", 6, "save_dots", 4)
       + _rows("64b", [(1, 323, .7031), (2, 309, .6726)], "v5p-128", 3, "save_dots", 4)
       + _rows("128b", [(1, 315, .6868), (2, 305, .6634)], "v5p-256", 1, "save_dots", 8)
       + _rows("128b", [(1, 316, .6883), (2, 274, .5966)], "v5p-512", 1, "save_dots", 8)
       + _rows("256b", [(1, 308, .6709), (2, 289, .6299)], "v5p-1024", 1, "save_dots", 8)
       + _rows("512b", [(1, 294, .6399), (2, 282, .6145)], "v5p-1024", 2, "full", 8)
       + _rows("1024b", [(1, 254, .5535), (2, 237, .5155)], "v5p-2048", 2, "full", 16)
       + _rows("1024b", [(1, 297, .6480), (2, 279, .6083)], "v5p-4096", 2, "full", 16))

# v5e (src/maxtext/configs/tpu/v5e/README.md): held out, never used to set a constant.
_V5E_SLICES = (1, 2, 4, 8, 16, 32)
V5E = (_rows("16b", zip(_V5E_SLICES, (120, 117, 117, 115, 111, 108),
                        (.6110, .5937, .5914, .5827, .5656, .5465)), "v5e-256", 6, "full", 1)
       + _rows("32b", zip(_V5E_SLICES, (132, 128, 126, 125, 123, 119),
                          (.6686, .6481, .6410, .6367, .6226, .6040)), "v5e-256", 4, "full", 1)
       + _rows("64b", zip(_V5E_SLICES, (118, 112, 110, 108, 105, 99),
                          (.5990, .5666, .5585, .5496, .5329, .5018)), "v5e-256", 2, "full", 1)
       + _rows("128b", zip(_V5E_SLICES, (110, 110, 108, 104, 100, 91),
                           (.5606, .5582, .5493, .5293, .5086, .4625)), "v5e-256", 1, "full",
               16))


# H100 (src/maxtext/configs/gpu/a3/llama_2_7b/README.md and the <n>vm.sh scripts: FSDP over the
# 8 GPUs of a node, data parallelism over nodes, per-device batch 4, remat minimal_with_context,
# bfloat16, cuDNN flash attention): a second held-out table, TFLOP/s only (MFU here is over the
# H100's 989 TFLOP/s dense bf16 peak).
A3 = [Recipe("llama2_7b", (f"{n}x" if n > 1 else "") + "8xH100", 4, "save_dots", 1, tf, tf / 989)
      for n, tf in ((1, 492), (2, 422), (4, 407), (8, 409), (16, 375))]


def recipe_plan(recipe: Recipe):
    """(config, fleet, plan) of a published row: MaxText's recipe as a paxlike plan: tensor
    parallelism inside a slice, FSDP over the rest of it, data parallelism across slices (DCN),
    the per-device batch times the chips, no microbatches."""
    from paxlike.planner import cost, fleets
    fleet = fleets.parse_fleet(recipe.fleet)
    cfg = get_config(recipe.size)
    cfg.model.remat = recipe.remat
    cfg.batch_size = recipe.per_device_batch * fleet.num_devices
    slices = fleet.granules   # TPU slices or GPU nodes
    plan = cost.Plan.make({"data": slices, "fsdp": fleet.per_granule // recipe.tensor,
                           "tensor": recipe.tensor}, {"data": slices}, "fsdp_tp", 1, recipe.remat)
    return cfg, fleet, plan


def published_flops_per_token(cfg) -> float:
    """Training FLOPs per token as the published tables count them: paxlike's model FLOPs
    (causal attention as half) plus the other half of the attention matrix."""
    return (transformer.flops_per_token(cfg.model, cfg.seq_len)
            + 0.5 * transformer.attention_flops_per_token(cfg.model, cfg.seq_len))


def predicted_mfu(recipe) -> tuple[float, object]:
    """(the planner's MFU for a published recipe in the tables' convention (whole attention),
    its cost estimate)."""
    from paxlike.planner import cost
    cfg, fleet, plan = recipe_plan(recipe)
    estimate = cost.estimate(cfg, plan, fleet)
    model = transformer.flops_per_token(cfg.model, cfg.seq_len)
    return estimate.mfu * published_flops_per_token(cfg) / model, estimate


def fit_samples(recipes):
    """(the step-time inputs of each recipe's plan, its published step seconds): what
    `paxlike.planner.steptime.fit` fits the step-time constants to. The published step time is
    the model FLOPs over the published TFLOP/s."""
    from paxlike.planner import cost
    samples = []
    for recipe in recipes:
        cfg, fleet, plan = recipe_plan(recipe)
        flops = published_flops_per_token(cfg) * cfg.batch_size * cfg.seq_len / fleet.num_devices
        samples.append((cost.estimate(cfg, plan, fleet).step_inputs,
                        flops / (recipe.tflops_per_chip * 1e12)))
    return samples
