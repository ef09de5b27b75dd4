"""Options and settings shared by every test directory."""

import pytest


def pytest_addoption(parser):
    parser.addoption("--update-goldens", action="store_true", default=False, help="rewrite tests/golden/*/stderr.txt and expected.nl from the current output")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Test tensors are tiny: intra-op threads only add synchronisation, which on a busy 2-core
    machine costs far more than the arithmetic (a 32-element gelu goes from microseconds to
    milliseconds). Benchmarks, not tests, measure threaded throughput."""
    try:
        import torch
    except ImportError:  # the front end's tests run without torch
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
