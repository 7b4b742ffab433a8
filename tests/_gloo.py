"""Shared by the gloo test modules (test_data_parallel, test_fsdp). Not named conftest: in a full run
tests/pipeline/conftest.py is the module of that name."""
import contextlib

import torch


@contextlib.contextmanager
def one_thread():
    """One intra-op thread, like each rank: the single-process result to compare with is computed the same way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
