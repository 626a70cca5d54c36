# Third session, device call for issue 7: the MoE-layer GPU tests (bench.quack_config is new)
# and the deepseek_v3 layer with the best pinned quack config of notes/bench_quack_configs.py.
#   carry [".gpu"], command: MOEBENCH_GIT_SHA=<commit> bash notes/sample_runs_4.sh
source .gpu/setup.sh && export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 420 python3 run.py -m bench=moe_layer impl=cute shape=deepseek_v3 bench.gemm=grouped_mm,quack_varlen,quack_gated bench.quack_config=192x128_pp_c1x2 hydra.sweep.dir=$OUT/moe_layer_deepseek_v3_pinned > $OUT/moe_layer.log 2>&1; echo "moe_layer rc=$?"
(cd $OUT && tar czf sample4.tgz moe_layer_deepseek_v3_pinned && rm -rf moe_layer_deepseek_v3_pinned)
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_moe_layer_gpu.py > $OUT/test_moe_layer_gpu.log 2>&1; grep -E "^(FAILED|ERROR)|passed|failed" $OUT/test_moe_layer_gpu.log | tail -8
