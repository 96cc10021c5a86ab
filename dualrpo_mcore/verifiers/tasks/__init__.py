"""The built-in task scorers, one module per registered verifier and named by it
(``tasks/math.py`` registers ``math``), so that a spec's ``verifier`` name leads straight to its
code and the shared parts one level up stay apart from the scorers.

Importing this package registers every built-in; ``scoring`` is the one module that imports it
for that (why: ``verifiers/__init__.py``).

``math`` and ``format`` do not shadow the standard library inside the package (imports are
absolute), but a caller should import them under an alias, e.g.
``from dualrpo_mcore.verifiers.tasks import math as math_task``.
"""
from dualrpo_mcore.verifiers.tasks import (  # noqa: F401  (imported for registration)
    choice, counting, detection, format, grounding, math, numeric, ocr, vtriune_detection,
    vtriune_math,
)
