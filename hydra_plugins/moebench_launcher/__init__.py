"""moebench's Hydra launcher (``conf/hydra/launcher/process.yaml``, the default of ``-m``: every
job in a process of its own, one after another). The work is in ``moebench.sweep``; this package
is what Hydra's plugin scan finds (``hydra_plugins.*``), and it imports nothing heavy."""
