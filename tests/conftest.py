import os
import tempfile

import pytest

# torch.compile's on-disk caches key on the graph, not on advfast's compiled library: a kernel
# rebuilt with other output shapes must not meet a graph cached by an earlier build.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="advfast-inductor-"))

import torch  # noqa: E402

from fixtures import list_feed  # noqa: E402,F401  (test_generate imports it from here)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
DEVICES = ["cpu", pytest.param("cuda", marks=[CUDA, pytest.mark.cuda])]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Tests train and cache the digits model in a fresh folder, never the user's cache."""
    old = os.environ.get("ADVFAST_CACHE")
    os.environ["ADVFAST_CACHE"] = str(tmp_path_factory.mktemp("advfast-cache"))
    yield
    if old is None:
        os.environ.pop("ADVFAST_CACHE", None)
    else:
        os.environ["ADVFAST_CACHE"] = old


def pytest_sessionstart(session):
    """The suite tests the compiled library: without it (the ops fall back to the pure-PyTorch
    reference) it stops, unless ADVFAST_ALLOW_REFERENCE=1 says the reference is wanted."""
    import advfast.ops

    if advfast.ops.backend() == "reference" and os.environ.get("ADVFAST_ALLOW_REFERENCE") != "1":
        pytest.exit("advfast's compiled library advfast._C did not load, so the ops would run "
                    "the pure-PyTorch reference and the kernels would go untested. Build it "
                    "(pip install --no-build-isolation -e .), or set ADVFAST_ALLOW_REFERENCE=1 "
                    "to test the reference on purpose.", returncode=pytest.ExitCode.USAGE_ERROR)
