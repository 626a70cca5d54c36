"""The launcher classes Hydra instantiates from ``hydra.launcher._target_`` and the schema of
``hydra/launcher=process``. Their ``launch`` is in ``moebench.sweep`` / ``moebench.slurm``
(imported when a sweep launches, so Hydra's plugin scan stays fast and needs no submitit).

No ``from __future__ import annotations`` here: Hydra's plugin scan runs this module before it
is in ``sys.modules``, where ``dataclass`` cannot resolve string annotations."""

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf


@dataclass
class ProcessLauncherConf:
    """``hydra/launcher=process``: jobs one after another (GPU timings never overlap), each in a
    fresh Python process, so a job that kills its process or leaves the CUDA context unusable
    fails alone."""

    _target_: str = "hydra_plugins.moebench_launcher.launchers.ProcessLauncher"
    # a job running longer is killed and reported (null: no limit)
    timeout_min: Optional[float] = None


ConfigStore.instance().store(group="hydra/launcher", name="moebench_process", node=ProcessLauncherConf,
                             provider="moebench")


class _Launcher(Launcher):
    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.task_function = task_function
        self.config = config


class ProcessLauncher(_Launcher):
    def __init__(self, timeout_min: Optional[float] = None) -> None:
        self.timeout_min = timeout_min

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from moebench.sweep import launch

        return launch(self, job_overrides, initial_job_idx)


class SlurmLauncher(_Launcher):
    """``hydra/launcher=slurm``: the options of Hydra's submitit Slurm launcher (``params``)."""

    def __init__(self, **params: Any) -> None:
        self.params = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                       for k, v in params.items()}

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from moebench.slurm import launch

        return launch(self, job_overrides, initial_job_idx)
