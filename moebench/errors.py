"""The three ways a case or a job can fail, shared by every layer.

* :class:`ConfigError` -- a bad configuration value, found before anything runs; its
  message is one line naming the key, the value and what is accepted.
* :class:`Unsupported` -- an implementation cannot run this case; the message is the reason
  (an ``unsupported`` row, never a fallback to another implementation).
* :class:`Mismatch` -- a result differs from the reference; the message says where (a
  ``mismatch`` row, never timed).
"""


class ConfigError(ValueError):
    """A bad configuration value; the message is one line."""


class Unsupported(Exception):
    """This implementation cannot run this case; the message is the reason."""


class Mismatch(Exception):
    """The implementation's result differs from the reference; the message says where."""


def shown(value) -> str:
    """A value as an error message names it: strings quoted, numbers as written (``-1``, ``1.25``)."""
    if isinstance(value, float) and not isinstance(value, bool):
        return f"{value:g}"
    return repr(value)
