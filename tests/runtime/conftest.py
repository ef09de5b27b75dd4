import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """The runtime tests use tiny tensors, where intra-op threads only add synchronisation (on a busy
    2-core machine a 32-element gelu goes from microseconds to milliseconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
