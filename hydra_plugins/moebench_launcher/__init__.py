"""moebench's Hydra launchers (``conf/hydra/launcher/``): ``process`` (the default of ``-m``: every
job in a process of its own, one after another) and ``slurm`` (Hydra's submitit launcher, waiting
for every job and reporting each failure in one line). The work is in ``moebench.sweep`` and
``moebench.slurm``; this package is what Hydra's plugin scan finds (``hydra_plugins.*``), and it
imports nothing heavy."""
