"""Implementations of the routing primitives behind one small interface (``base.Impl``)."""

from moebench.impls.base import STAGES, Impl, Unsupported

__all__ = ["STAGES", "Impl", "Unsupported"]
