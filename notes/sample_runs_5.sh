# Fourth session (issue 6, after the int16 histogram / sorted gather / sign-magnitude keys):
# the router and top-k sample rows again, and the GPU tests of everything that uses the
# router and metadata kernels. Two device calls (a call may run 10 minutes):
#   carry [".gpu"], command: MOEBENCH_GIT_SHA=<commit> bash notes/sample_runs_5.sh runs
#   carry [".gpu"], command: MOEBENCH_GIT_SHA=<commit> bash notes/sample_runs_5.sh tests
source .gpu/setup.sh && export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
if [ "$1" = runs ]; then
  R() { d=$1; shift; timeout "$@" hydra.sweep.dir=$OUT/$d > $OUT/$d.log 2>&1; echo "$d rc=$?"; }
  R router_h100_rotated 150 python3 run.py -m bench=router impl=cute,torch shape=deepseek_v3,qwen3_30b_a3b,seed timing=rotated
  R router_h100_graph 100 python3 run.py -m bench=router impl=cute shape=deepseek_v3,qwen3_30b_a3b,seed timing=graph
  R topk_cute_quack_rotated 200 python3 run.py -m bench=topk impl=cute,quack tokens=16384 experts=8,128,256 topk=2,8 dtype=bfloat16,float32 timing=rotated
  timeout 100 python3 notes/bench_router.py > $OUT/bench_router.log 2>&1; tail -8 $OUT/bench_router.log
  python3 notes/gpu_tables.py $OUT/router_h100_rotated $OUT/router_h100_graph $OUT/topk_cute_quack_rotated > $OUT/tables.txt 2>&1; head -70 $OUT/tables.txt
  (cd $OUT && tar czf sample5.tgz router_h100_rotated router_h100_graph topk_cute_quack_rotated && rm -rf router_h100_rotated router_h100_graph topk_cute_quack_rotated)
else
  for f in test_cute_router test_cute test_runner_gpu test_moe_layer_gpu; do
    timeout 170 python3 -m pytest -q -p no:cacheprovider tests/gpu/$f.py > $OUT/$f.log 2>&1
    echo "$f: $(grep -E '^(FAILED|ERROR)|passed|failed' $OUT/$f.log | tail -3)"
  done
fi
