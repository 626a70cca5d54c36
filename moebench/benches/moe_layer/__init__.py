"""``bench=moe_layer``: one MoE layer forward (and backward, ``bench.direction``: the rows of
``training.py``), stage by stage (``bench.py``), over the expert GEMM paths of ``gemms.py``,
checked against the references of ``reference.py``; a pinned quack GEMM config is parsed and
checked by ``quack_config.py``."""

from moebench.benches.moe_layer.bench import (FP32_REFERENCE_MAX_FLOPS, SHARE_STAGES, LayerSettings, MoeLayerBench,
                                              MoeLayerConfig, fp32_reference_enabled, quack_config_of, settings_of)
from moebench.benches.moe_layer.gemms import (GEMM_CLASSES, GEMMS, Buffers, ExpertGemm, GradBuffers, GroupedMMGemm,
                                              LoopGemm, QuackGemm, expert_ffn, make_gemm, mm_blocks, torch_ffn_grads,
                                              torch_layer, torch_layer_grads)
from moebench.benches.moe_layer.quack_config import (QUACK_CONFIG_KEYS, QUACK_SM90_DEFAULT, quack_config_fields,
                                                     quack_config_name)
from moebench.benches.moe_layer.reference import (DIRECTION_FLOPS, FP32_REFERENCE_TOLERANCE, GRAD_TOLERANCE,
                                                  LayerWeights, expert_flops, grad_tolerance, make_weights, make_x,
                                                  moe_layer_reference, moe_layer_reference_grads, swiglu)
from moebench.errors import Unsupported

STAGES = MoeLayerBench.stages

__all__ = ["DIRECTION_FLOPS", "FP32_REFERENCE_MAX_FLOPS", "FP32_REFERENCE_TOLERANCE", "GEMMS", "GEMM_CLASSES",
           "GRAD_TOLERANCE", "QUACK_CONFIG_KEYS", "QUACK_SM90_DEFAULT", "SHARE_STAGES", "STAGES", "Unsupported",
           "Buffers", "ExpertGemm", "GradBuffers", "GroupedMMGemm", "LayerSettings", "LayerWeights", "LoopGemm",
           "MoeLayerBench", "MoeLayerConfig", "QuackGemm", "expert_ffn", "expert_flops", "fp32_reference_enabled",
           "grad_tolerance", "make_gemm", "make_weights", "make_x", "mm_blocks", "moe_layer_reference",
           "moe_layer_reference_grads", "quack_config_fields", "quack_config_name", "quack_config_of",
           "settings_of", "swiglu", "torch_ffn_grads", "torch_layer", "torch_layer_grads"]
