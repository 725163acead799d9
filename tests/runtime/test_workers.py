"""Loader pools run torch on one OpenMP thread, so they never start OpenMP teams beside the engine's."""

import os
import threading

import pytest
import torch

from loraplex.runtime import workers

pytestmark = pytest.mark.skipif(workers._omp_set_num_threads() is None, reason="torch without a bundled OpenMP runtime")


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_pool_threads_use_one_openmp_thread_and_the_caller_keeps_its_count(two_threads):
    pool = workers.loader_pool(4)
    try:
        barrier = threading.Barrier(4)

        def count():
            barrier.wait()  # all four threads alive at once
            return torch.get_num_threads()

        assert [f.result() for f in [pool.submit(count) for _ in range(4)]] == [1, 1, 1, 1]
    finally:
        pool.shutdown()
    assert torch.get_num_threads() == 2


def test_threads_starting_together_all_get_one_thread(two_threads, monkeypatch):
    monkeypatch.setattr(workers, "_setter", None)  # the runtime not looked up yet: every thread races for it
    got, start = [], threading.Barrier(8)

    def run():
        start.wait()
        workers.one_thread()
        got.append(torch.get_num_threads())

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [1] * 8


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_a_large_op_in_a_pool_thread_starts_no_openmp_threads(two_threads):
    x = torch.randn(1 << 22)
    x.mul_(2.0)  # the calling thread's own team exists before counting
    pool = workers.loader_pool(1)
    try:
        pool.submit(lambda: None).result()  # the pool's thread exists before counting
        before = len(os.listdir("/proc/self/task"))
        pool.submit(lambda: float(torch.sum(x * 3.0, dtype=torch.float32))).result()
        assert len(os.listdir("/proc/self/task")) == before
    finally:
        pool.shutdown()
