"""Tests against a private Slurm cluster. A package so its helpers import as ``slurm.cluster`` and
``slurm.jobs`` (``tests`` is on the path through pytest's ``pythonpath``) without editing sys.path."""
