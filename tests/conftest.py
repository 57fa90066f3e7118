import os
import tempfile

# Before jax is imported anywhere: 8 host devices for sharding tests, and no hub lookups.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Never the user's home: module-level defaults (the compile cache under ~/.cache/clapjax) resolve when clapjax is
# imported, so each test process gets its own HOME before that; the `isolated_home` fixture below gives each test
# (and the CLI / docs subprocesses it starts) a fresh one.
os.environ["HOME"] = tempfile.mkdtemp(prefix="clapjax-test-home-")
os.environ.pop("XDG_CACHE_HOME", None)

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    return home


@pytest.fixture
def rng():
    return np.random.default_rng(0)
