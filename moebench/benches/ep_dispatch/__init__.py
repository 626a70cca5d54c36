"""``bench=ep_dispatch``: expert-parallel dispatch and combine over ``world_size`` ranks
(``bench.py``), the problem each rank solves and its reference (``problem.py``), and the
all-to-all dispatch/combine with the rank launcher (``parallel.py``)."""

from moebench.benches.ep_dispatch.bench import (
                                                EP_IMPLS,
                                                STAGES,
                                                EPDispatchBench,
                                                EPDispatchConfig,
                                                check_devices,
                                                finish,
                                                rank_rows,
)
from moebench.benches.ep_dispatch.parallel import (
                                                ExpertParallel,
                                                Plan,
                                                launch,
                                                process_group,
                                                run_problems,
                                                spawn,
)
from moebench.benches.ep_dispatch.problem import (
                                                EXPERTS,
                                                EPProblem,
                                                RankInputs,
                                                apply_experts,
                                                expert_factor,
                                                packed_expert_ids,
                                                rank_inputs,
                                                reference_forward,
)

__all__ = ["EP_IMPLS", "EXPERTS", "STAGES", "EPDispatchBench", "EPDispatchConfig", "EPProblem", "ExpertParallel",
           "Plan", "RankInputs", "apply_experts", "check_devices", "expert_factor", "finish", "launch",
           "packed_expert_ids", "process_group", "rank_inputs", "rank_rows", "reference_forward", "run_problems",
           "spawn"]
