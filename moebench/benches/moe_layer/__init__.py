"""``bench=moe_layer``: one MoE layer forward, stage by stage (``bench.py``), over the expert
GEMM paths of ``gemms.py``, checked against the references of ``reference.py``; a pinned quack
GEMM config is parsed and checked by ``quack_config.py``."""

from moebench.benches.moe_layer.bench import (FP32_REFERENCE_MAX_FLOPS, SHARE_STAGES, LayerSettings, MoeLayerBench,
                                              MoeLayerConfig, fp32_reference_enabled, quack_config_of, settings_of)
from moebench.benches.moe_layer.gemms import (GEMM_CLASSES, GEMMS, Buffers, ExpertGemm, GroupedMMGemm, LoopGemm,
                                              QuackGemm, expert_ffn, make_gemm, torch_layer)
from moebench.benches.moe_layer.quack_config import (QUACK_CONFIG_KEYS, QUACK_SM90_DEFAULT, quack_config_fields,
                                                     quack_config_name)
from moebench.benches.moe_layer.reference import (FP32_REFERENCE_TOLERANCE, LayerWeights, expert_flops, make_weights,
                                                  make_x, moe_layer_reference, swiglu)
from moebench.errors import Unsupported

STAGES = MoeLayerBench.stages

__all__ = ["FP32_REFERENCE_MAX_FLOPS", "FP32_REFERENCE_TOLERANCE", "GEMMS", "GEMM_CLASSES", "QUACK_CONFIG_KEYS",
           "QUACK_SM90_DEFAULT", "SHARE_STAGES", "STAGES", "Unsupported", "Buffers", "ExpertGemm", "GroupedMMGemm", "LayerSettings",
           "LayerWeights", "LoopGemm", "MoeLayerBench", "MoeLayerConfig", "QuackGemm", "expert_ffn", "expert_flops",
           "fp32_reference_enabled", "make_gemm", "make_weights", "make_x", "moe_layer_reference",
           "quack_config_fields", "quack_config_name", "quack_config_of", "settings_of", "swiglu", "torch_layer"]
