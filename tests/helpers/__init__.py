"""Helpers shared by the test files, one place for each: the synthetic data dir, the CLI runner,
the float64 ``token_stats`` reference and tolerance check, the CUDA-emulator harness, the fork-server
launcher of the fault tests and the toy Megatron GPT of the checkpoint tests.

Importable as ``helpers`` because pyproject.toml puts tests/ on pytest's ``pythonpath``; a test file
never imports another test file. The fixtures built on these live in tests/conftest.py.
"""
