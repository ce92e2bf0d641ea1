import pytest
import torch

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
DEVICES = ["cpu", pytest.param("cuda", marks=[CUDA, pytest.mark.cuda])]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
