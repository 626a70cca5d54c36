"""Implementations of the routing primitives behind one small interface (``base.Impl``), each
with the schema of its options (``CONFIGS``: the ``conf/impl`` option -> its dataclass)."""

from moebench.impls.base import STAGES, Impl, ImplConfig, Unsupported
from moebench.impls.compile_impl import CompileConfig
from moebench.impls.cute_impl import CuteConfig
from moebench.impls.quack_impl import QuackConfig
from moebench.impls.reference_impl import ReferenceConfig
from moebench.impls.sonic_impl import SonicConfig
from moebench.impls.torch_impl import TorchConfig

CONFIGS = {"torch": TorchConfig, "reference": ReferenceConfig, "compile": CompileConfig, "quack": QuackConfig,
           "sonic": SonicConfig, "cute": CuteConfig}

__all__ = ["CONFIGS", "STAGES", "Impl", "ImplConfig", "Unsupported"]
