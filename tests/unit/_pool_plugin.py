"""Stands in for a user module that registers custom verifiers (the pool's ``imports``)."""
import _pool_scorers

_pool_scorers.IMPORTED.append(__name__)
