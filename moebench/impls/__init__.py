"""Implementations of the routing primitives behind one small interface (``base.Impl``), each
with the schema of its options (``CONFIGS``: the ``conf/impl`` option -> its dataclass)."""

from moebench.impls.base import STAGES, Impl, ImplConfig, Unsupported
from moebench.impls.compile_impl import CompileConfig
from moebench.impls.cute_impl import CuteConfig
from moebench.impls.quack_impl import QuackConfig
from moebench.impls.torch_impl import TorchConfig

CONFIGS = {"torch": TorchConfig, "compile": CompileConfig, "quack": QuackConfig, "cute": CuteConfig}

__all__ = ["CONFIGS", "STAGES", "Impl", "ImplConfig", "Unsupported"]
