import os
import tempfile

import pytest

# torch.compile's on-disk caches key on the graph, not on advfast's compiled library: a kernel
# rebuilt with other output shapes must not meet a graph cached by an earlier build.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="advfast-inductor-"))

import torch  # noqa: E402

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


def list_feed(images, target, source):
    """A feed for Attack.stream over the given samples, keyed by their position."""
    queue = list(range(len(images)))

    def feed(k):
        take, queue[:] = queue[:k], queue[k:]
        if not take:
            return None
        idx = torch.tensor(take)
        return images[idx], target[idx], source[idx], idx

    return feed
