import pytest
import torch
from tiny import TEXT_FAMILIES, build_tiny_llava

FAMILIES = sorted(TEXT_FAMILIES)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_teachers(tmp_path_factory):
    """Tiny random LLaVA checkpoints, one per text family, saved with save_pretrained."""
    root = tmp_path_factory.mktemp("teachers")
    return {family: build_tiny_llava(root / family, family=family, seed=1) for family in FAMILIES}


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    they gain nothing from two, and on a shared 2-core machine a second thread that waits for a busy core
    makes each step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
