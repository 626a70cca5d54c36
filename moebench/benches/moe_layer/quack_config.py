"""``bench.quack_config``: one SM90 quack GemmConfig pinned for every quack GEMM of a job, by a
name (``<tile_m>x<tile_n>_<pp|coop>_c<cm>x<cn>[_sw<n>][_dyn]``, ``default``) or a dict of
GemmConfig fields, checked against quack's SM90 tile rules when the job is resolved.

The rules re-state quack's (``quack.gemm_sm90.GemmSm90.__init__``, ``quack.gemm_config``) so a
bad config fails in one line before anything runs; if quack changes its rules, this follows.
"""

from __future__ import annotations

import re

from omegaconf import DictConfig, OmegaConf

from moebench.errors import ConfigError

#: ``bench.quack_config``: the GemmConfig fields one may pin, and quack's SM90 default
#: (``quack.gemm_config.default_config`` on sm_90: what untuned quack runs for varlen-M GEMMs)
QUACK_CONFIG_KEYS = ("tile_m", "tile_n", "pingpong", "cluster_m", "cluster_n", "max_swizzle_size",
                     "is_dynamic_persistent")
QUACK_SM90_DEFAULT = {"tile_m": 128, "tile_n": 192, "pingpong": True, "cluster_m": 2, "cluster_n": 1,
                      "max_swizzle_size": 8, "is_dynamic_persistent": False}
QUACK_CONFIG_NAME = re.compile(r"(\d+)x(\d+)_(pp|coop)_c(\d+)x(\d+)(?:_sw(\d+))?(_dyn)?")
QUACK_CONFIG_ACCEPTED = ("accepted: null (quack's default, or the autotuner with bench.quack_tuned=true), "
                         "default (quack's SM90 default pinned: 128x192_pp_c2x1), a name "
                         "<tile_m>x<tile_n>_<pp|coop>_c<cluster_m>x<cluster_n>[_sw<max_swizzle_size>][_dyn] "
                         "(e.g. 128x192_pp_c1x2, 128x256_coop_c1x2), or a dict of "
                         + ", ".join(QUACK_CONFIG_KEYS) + " (missing keys from the default)")




def quack_config_name(fields: dict) -> str:
    """The canonical name of GemmConfig fields, e.g. ``128x192_pp_c1x2`` (``_sw<n>`` when the
    swizzle is not 8, ``_dyn`` with the dynamic persistent scheduler); parses back to the same fields."""
    f = {**QUACK_SM90_DEFAULT, **fields}
    name = (f"{f['tile_m']}x{f['tile_n']}_{'pp' if f['pingpong'] else 'coop'}"
            f"_c{f['cluster_m']}x{f['cluster_n']}")
    if f["max_swizzle_size"] != QUACK_SM90_DEFAULT["max_swizzle_size"]:
        name += f"_sw{f['max_swizzle_size']}"
    return name + ("_dyn" if f["is_dynamic_persistent"] else "")


def quack_config_fields(value) -> dict:
    """``bench.quack_config`` (a name or a dict; see QUACK_CONFIG_ACCEPTED) -> all GemmConfig fields
    of QUACK_CONFIG_KEYS, checked against quack's SM90 tile rules (ConfigError one-liners)."""
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    what = f"bench.quack_config={value!r} is not accepted"
    if isinstance(value, str):
        if value == "default":
            return dict(QUACK_SM90_DEFAULT)
        m = QUACK_CONFIG_NAME.fullmatch(value)
        if m is None:
            raise ConfigError(f"{what}; {QUACK_CONFIG_ACCEPTED}")
        tm, tn, kind, cm, cn, sw, dyn = m.groups()
        fields = {"tile_m": int(tm), "tile_n": int(tn), "pingpong": kind == "pp", "cluster_m": int(cm),
                  "cluster_n": int(cn), "max_swizzle_size": int(sw) if sw else QUACK_SM90_DEFAULT["max_swizzle_size"],
                  "is_dynamic_persistent": bool(dyn)}
    elif isinstance(value, dict):
        bad = [k for k in value if k not in QUACK_CONFIG_KEYS]
        if bad:
            raise ConfigError(f"{what}: unknown key(s) {', '.join(map(str, bad))}; {QUACK_CONFIG_ACCEPTED}")
        fields = {**QUACK_SM90_DEFAULT, **value}
        for k, v in fields.items():
            want_bool = isinstance(QUACK_SM90_DEFAULT[k], bool)
            if want_bool != isinstance(v, bool) or not isinstance(v, (bool, int)):
                raise ConfigError(f"{what}: {k}={v!r} must be {'true/false' if want_bool else 'an integer'}; "
                                  f"{QUACK_CONFIG_ACCEPTED}")
    else:
        raise ConfigError(f"{what}; {QUACK_CONFIG_ACCEPTED}")
    problem = sm90_config_problem(fields)
    if problem:
        raise ConfigError(f"{what}: {problem}; {QUACK_CONFIG_ACCEPTED}")
    return fields


def sm90_config_problem(f: dict) -> str | None:
    """Why quack's SM90 GEMM refuses these fields (the checks of quack.gemm_sm90.GemmSm90.__init__), or None."""
    tm, tn = f["tile_m"], f["tile_n"]
    if f["pingpong"]:
        if tm not in (64, 128, 192):
            return f"a pingpong tile_m must be 64, 128 or 192, not {tm}"
        n_max = {64: 256, 128: 208, 192: 128}[tm]
        if tn < 16 or tn % 16 or tn > n_max:
            return f"a pingpong {tm}-row tile needs tile_n a multiple of 16 up to {n_max}, not {tn}"
    else:
        if tm not in (64, 128, 192, 256, 320):
            return f"a cooperative tile_m must be 64, 128, 192, 256 or 320, not {tm}"
        if tm in (192, 320):
            n_max = 256 if tm == 192 else 160
            if tn < 32 or tn % 32 or tn > n_max:
                return f"a cooperative {tm}-row tile needs tile_n a multiple of 32 up to {n_max}, not {tn}"
        elif not (tn >= 16 and ((tn % 16 == 0 and tn <= 256) or (tn % 32 == 0 and tn <= 512))):
            return f"a cooperative tile needs tile_n a multiple of 16 up to 256 or of 32 up to 512, not {tn}"
    cm, cn = f["cluster_m"], f["cluster_n"]
    if cm not in (1, 2, 4) or cn not in (1, 2, 4) or cm * cn > 8:
        return f"cluster_m and cluster_n must be 1, 2 or 4 with at most 8 CTAs a cluster, not {cm}x{cn}"
    if f["max_swizzle_size"] < 1:
        return f"max_swizzle_size must be >= 1, not {f['max_swizzle_size']}"
    return None


def gemm_config_problem(f: dict, gemm: str, fuses_pack: bool, fuses_act: bool) -> str | None:
    """What quack's gather-A (``fuses_pack``) and gated-epilogue (``fuses_act``) GEMMs additionally
    refuse (quack.gemm_config.config_supports and the SM90 gated epilogue), or None."""
    if fuses_pack:
        if f["cluster_n"] != 1:
            return f"bench.gemm={gemm} (gather-A) needs cluster_n=1"
        if f["tile_n"] == 208 or f["is_dynamic_persistent"]:
            return f"bench.gemm={gemm} (gather-A) excludes tile_n=208 and the dynamic scheduler on SM90"
    if fuses_act:
        if f["tile_n"] % 32:
            return f"bench.gemm={gemm} (gated epilogue) needs tile_n a multiple of 32 on SM90"
        if not f["pingpong"] and f["tile_m"] == 192:
            return f"bench.gemm={gemm} (gated epilogue): quack's gated configs exclude cooperative 192-row tiles"
    return None


