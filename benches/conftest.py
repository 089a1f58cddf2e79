"""Benches run in the tests' environment (offline hub, Triton interpreter on CPU-only machines,
markers, seeds, the test_zoo fixture): load tests/conftest.py rather than repeating it."""

import importlib.util
from pathlib import Path

_path = Path(__file__).resolve().parents[1] / "tests" / "conftest.py"
_spec = importlib.util.spec_from_file_location("fastdume_tests_conftest", _path)
_env = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_env)

pytest_collection_modifyitems = _env.pytest_collection_modifyitems
_seed = _env._seed
test_zoo = _env.test_zoo
