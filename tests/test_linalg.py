"""`pyfast._linalg.eigh_threads`: one thread for small CPU eigendecompositions, and the caller's
thread count back afterwards, also when the block raises."""
import pytest
import torch

from pyfast import _linalg


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_small_cpu_matrices_run_on_one_thread(two_threads):
    with _linalg.eigh_threads(torch.eye(3), torch.eye(_linalg.THREADED_EIGH_MIN - 1)):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_large_matrix_keeps_the_thread_count(two_threads):
    with _linalg.eigh_threads(torch.eye(3), torch.empty(2, _linalg.THREADED_EIGH_MIN)):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 2


def test_thread_count_restored_after_an_error(two_threads):
    with pytest.raises(RuntimeError, match="inside"):
        with _linalg.eigh_threads(torch.eye(3)):
            raise RuntimeError("inside")
    assert torch.get_num_threads() == 2
