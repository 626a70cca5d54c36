# The device call that produced this session's runs/sample folders (issues 5, 6, 7), one
# call so every ratio compares numbers from the same card:
#   carry [".gpu"], command: MOEBENCH_GIT_SHA=<commit> bash notes/sample_runs.sh
# Each sweep lands in $OUT/<folder>/ and is tarred into $OUT/sample.tgz; the printed tables last.
source .gpu/setup.sh && export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
t() { timeout "$@" 2>&1 | grep -v -i warn | tail -4; }
t 100 python3 -m pytest -x -q -p no:cacheprovider tests/gpu/test_cute_router.py
t 80 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_moe_layer_gpu.py
R() { d=$1; shift; timeout "$@" hydra.sweep.dir=$OUT/$d > $OUT/$d.log 2>&1; echo "$d rc=$?"; }
R router_h100 45 python3 run.py -m bench=router impl=cute,torch shape=deepseek_v3,qwen3_30b_a3b,seed timing=graph
R topk_cute_quack 80 python3 run.py -m bench=topk impl=cute,quack tokens=16384 experts=8,128,256 topk=2,8 dtype=bfloat16,float32 timing=graph
R moe_layer 170 python3 run.py -m bench=moe_layer impl=cute shape=qwen3_30b_a3b,deepseek_v3 bench.gemm=grouped_mm,quack_varlen,quack_gather,quack_gated,quack_gather_gated
R pack_combine_h100 120 python3 run.py -m bench=pack,combine impl=torch,compile,cute shape=seed,deepseek_v3,qwen3_30b_a3b timing.warmup=5 timing.repeats=40
(cd $OUT && tar czf sample.tgz router_h100 topk_cute_quack moe_layer pack_combine_h100 *.log && rm -rf router_h100 topk_cute_quack moe_layer pack_combine_h100)
