# Second device call of the session (after notes/sample_runs.sh): the GPU tests of the router,
# metadata and MoE-layer code with their summaries, and the qwen3 MoE-layer sweep again after
# the fused-activation tolerance fix (moebench/moe_layer.py _fused_act_tolerance).
#   carry [".gpu"], command: MOEBENCH_GIT_SHA=<commit> bash notes/sample_runs_2.sh
source .gpu/setup.sh && export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_cute_router.py > $OUT/test_cute_router.log 2>&1; tail -1 $OUT/test_cute_router.log
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_moe_layer_gpu.py > $OUT/test_moe_layer_gpu.log 2>&1; grep -E "^(FAILED|ERROR)|passed|failed" $OUT/test_moe_layer_gpu.log | tail -8
timeout 120 python3 run.py -m bench=moe_layer impl=cute shape=qwen3_30b_a3b bench.gemm=grouped_mm,quack_varlen,quack_gather,quack_gated,quack_gather_gated hydra.sweep.dir=$OUT/moe_layer_qwen3 > $OUT/moe_layer_qwen3.log 2>&1; echo "moe_layer rc=$?"
(cd $OUT && tar czf sample2.tgz moe_layer_qwen3 && rm -rf moe_layer_qwen3)
