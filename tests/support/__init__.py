"""Plain helpers (tiny models, configs, reference math) shared by several test modules.

Test modules import these (`from support.lcd import tiny_teacher`); no test module imports another
test_*.py module. Shared pytest fixtures live in tests/conftest.py. Each module here imports its
optional dependencies (torch, diffusers, ...) with pytest.importorskip, as the tests that use it did.
"""
