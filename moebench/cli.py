"""Command-line checks made before Hydra composes anything, so that an unknown group
option is one clear line (Hydra's own message spans several)."""

from __future__ import annotations

import sys

from moebench.config import CONF_DIR, options


def _values(value: str) -> list[str]:
    if value.startswith(("choice(", "range(", "glob(", "interval(", "[")):
        return []  # Hydra's sweep functions: leave them to Hydra
    return [v.strip() for v in value.split(",") if v.strip()]


def check_overrides(argv: list[str]) -> str | None:
    """The error line for the first override naming an unknown group option, else None."""
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key not in groups:
            continue
        accepted = options(key)
        for v in _values(value):
            if v not in accepted:
                return f"{key}={v} is not a known {key}; accepted: {', '.join(accepted)}"
    return None


def precheck(argv: list[str] | None = None) -> None:
    err = check_overrides(sys.argv[1:] if argv is None else argv)
    if err:
        print(f"moebench: error: {err}", file=sys.stderr)
        sys.exit(2)
