"""Where verifiers run: ``pool`` (a pool of worker processes with time and memory limits, crash
isolation and restarts), ``worker`` (the child side) and ``adversarial`` (hostile model outputs that
the pool and ``dualrpo bench verifiers`` are tested with). The task scorers live in
``verifiers/tasks/``."""
