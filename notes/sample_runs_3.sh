# Third session, device call 1 (and again after the negated-key router) of the sample runs (issue 6): the router and top-k rows with the
# rotated timer (timing=rotated: many calls over input copies in one graph, no graph-launch
# floor), the router also on the graph timer, and the kernel-variant table.
#   carry [".gpu"], command: MOEBENCH_GIT_SHA=<commit> bash notes/sample_runs_3.sh
source .gpu/setup.sh && export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python3 run.py -m bench=router impl=cute,torch shape=deepseek_v3,qwen3_30b_a3b,seed timing=rotated hydra.sweep.dir=$OUT/router_rotated > $OUT/router_rotated.log 2>&1; echo "router rotated rc=$?"
timeout 100 python3 run.py -m bench=router impl=cute shape=deepseek_v3,qwen3_30b_a3b,seed timing=graph hydra.sweep.dir=$OUT/router_graph > $OUT/router_graph.log 2>&1; echo "router graph rc=$?"
timeout 200 python3 run.py -m bench=topk impl=cute,quack tokens=16384 experts=8,128,256 topk=2,8 dtype=bfloat16,float32 timing=rotated hydra.sweep.dir=$OUT/topk_cute_quack_rotated > $OUT/topk.log 2>&1; echo "topk rc=$?"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_cute_router.py > $OUT/test_cute_router.log 2>&1; tail -1 $OUT/test_cute_router.log
timeout 120 python3 notes/bench_router.py > $OUT/bench_router.log 2>&1; tail -17 $OUT/bench_router.log
python3 notes/gpu_tables.py $OUT/router_rotated $OUT/router_graph $OUT/topk_cute_quack_rotated > $OUT/tables.txt 2>&1; head -60 $OUT/tables.txt
(cd $OUT && tar czf sample3.tgz router_rotated router_graph topk_cute_quack_rotated && rm -rf router_rotated router_graph topk_cute_quack_rotated)
