import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
if not torch.cuda.is_available():
    # Triton reads this when it is first imported (some test dependencies import it early): kernels then run
    # interpreted on CPU tensors. CPU callers of cec.engine.heads still take the reference unless CEC_TRITON_INTERPRET=1.
    os.environ.setdefault("TRITON_INTERPRET", "1")

def pytest_configure(config):
    config.addinivalue_line("markers", "slow: loads the real Gemma 3 270M or other large files (still runs in CI)")


@pytest.fixture(scope="module")
def one_thread():
    """For a module of tiny models (pytestmark = pytest.mark.usefixtures("one_thread")): they gain nothing from a
    second thread, and on a shared CPU it costs several times over. Anything a test sets is undone after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the checkout. A user's fresh clone has none (skip); CI always has it (fail)."""
    if not SHARED.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"CI needs ../shared beside the clone, not found at {SHARED}")
        pytest.skip(f"../shared not found at {SHARED} (clone the project beside the shared data to run this)")
    return SHARED
