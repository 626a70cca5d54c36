"""Command-line checks made before Hydra runs anything: every job of the command (every point
of a ``-m`` sweep, an experiment's ``hydra.sweeper.params`` included) is composed and planned
(``moebench.runner.plan``: the job and its bench, every option checked), so a bad value is one
line naming the key, the value and what is accepted, exit 2, and no table -- before the first
job measures anything.
"""

from __future__ import annotations

import sys

from moebench.errors import ConfigError
from moebench.job import CONF_DIR, options

#: flags after which Hydra runs no job (it prints something): nothing to check
NO_JOB_FLAGS = ("--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc")
#: flags that take a value
VALUE_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun")
#: the most sweep points composed before running (a larger sweep is checked as far as that)
MAX_CHECKED = 4096


def _values(value: str) -> list[str]:
    if value.startswith(("choice(", "range(", "glob(", "interval(", "[")):
        return []  # Hydra's sweep functions: leave them to Hydra
    return [v.strip() for v in value.split(",") if v.strip()]


#: launchers that run through Hydra's submitit plugin (the cluster extra)
SUBMITIT_LAUNCHERS = ("slurm", "local", "submitit_slurm", "submitit_local")


def check_launcher(value: str) -> str | None:
    """``hydra/launcher=slurm`` (or local) without Hydra's submitit plugin: the extra to install."""
    import importlib.util

    if value in SUBMITIT_LAUNCHERS and importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
        return f"hydra/launcher={value} needs Hydra's submitit launcher: pip install -e '.[cluster]'"
    return None


def check_overrides(argv: list[str]) -> str | None:
    """The error line for the first override naming an unknown group option (or a launcher whose
    plugin is not installed), else None."""
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key == "hydra/launcher" and check_launcher(value):
            return check_launcher(value)
        if key not in groups:
            continue
        accepted = options(key)
        for v in _values(value):
            if v not in accepted:
                return f"{key}={v} is not a known {key}; accepted: {', '.join(accepted)}"
    return None


def _overrides(argv: list[str]) -> tuple[list[str], bool] | None:
    """(the job overrides, multirun?) of a command line, or None when Hydra runs no job."""
    out, multirun, skip = [], False, False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in NO_JOB_FLAGS or arg.split("=", 1)[0] in NO_JOB_FLAGS:
            return None
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg in VALUE_FLAGS:
            skip = True
        elif not arg.startswith("-") and not arg.lstrip("+~").startswith("hydra"):
            out.append(arg)
    return out, multirun


def sweep_jobs(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override list of every job the command runs (Hydra's basic sweeper's expansion)."""
    if not multirun:
        return [overrides]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from moebench.config import compose

    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    params = compose(fixed, return_hydra_config=True).hydra.sweeper.get("params") or {}
    given = {o.get_key_element() for o in parsed}
    extra = [f"{k}={v}" for k, v in params.items() if k not in given]
    return BasicSweeper.split_arguments(parser.parse_overrides(extra + overrides), None)[0]


def check_jobs(argv: list[str]) -> str | None:
    """The one-line error of the first job of the command that cannot run, else None."""
    err = check_overrides(argv)
    if err:
        return err
    parsed = _overrides(argv)
    if parsed is None:
        return None
    from moebench.config import compose
    from moebench.runner import plan

    overrides, multirun = parsed
    try:
        jobs = sweep_jobs(overrides, multirun)
    except ConfigError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 -- a sweep Hydra cannot parse: let Hydra say so
        del e
        return None
    seen = set()
    for job in jobs[:MAX_CHECKED]:
        key = tuple(job)
        if key in seen:
            continue
        seen.add(key)
        try:
            plan(compose(job))
        except ConfigError as e:
            where = f" (sweep job: {' '.join(job)})" if multirun and len(jobs) > 1 else ""
            return f"{e}{where}"
    return None


def precheck(argv: list[str] | None = None) -> None:
    err = check_jobs(sys.argv[1:] if argv is None else argv)
    if err:
        print(f"moebench: error: {err}", file=sys.stderr)
        sys.exit(2)
