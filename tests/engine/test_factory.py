"""The CPU engine's compute threads: a server keeps one core free on machines with more than
two physical cores and computes on all of one or two; offline, all of them; OMP_NUM_THREADS
wins."""

from __future__ import annotations

import pytest
import torch

from server.engine import factory


@pytest.mark.parametrize("cores,threads", [(1, 1), (2, 2), (3, 2), (4, 3), (64, 63)])
def test_a_server_leaves_one_core_free_above_two(monkeypatch, cores, threads):
    prev = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(factory, "physical_cores", lambda: cores)
        torch.set_num_threads(cores)
        assert factory.configure_cpu_threads() == threads and torch.get_num_threads() == threads
        torch.set_num_threads(cores)
        assert factory.configure_cpu_threads(reserve=1) == max(1, cores - 1)
    finally:
        torch.set_num_threads(prev)


def test_omp_num_threads_and_caller_settings_win(monkeypatch):
    prev = torch.get_num_threads()
    try:
        monkeypatch.setattr(factory, "physical_cores", lambda: 4)
        monkeypatch.setenv("OMP_NUM_THREADS", "4")
        torch.set_num_threads(4)
        assert factory.configure_cpu_threads() == 4
        monkeypatch.delenv("OMP_NUM_THREADS")
        torch.set_num_threads(2)  # the caller chose: left alone
        assert factory.configure_cpu_threads() == 2
    finally:
        torch.set_num_threads(prev)


def test_physical_cores_is_positive():
    assert factory.physical_cores() >= 1


def test_offline_llm_reserves_no_core(monkeypatch, tiny_mixtral):
    """The offline LLM's engine loop is its compute thread: every physical core computes."""
    from server.engine import LLM

    prev = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(factory, "physical_cores", lambda: 2)
        torch.set_num_threads(2)
        assert factory.configure_cpu_threads(reserve=0) == 2
        torch.set_num_threads(2)
        LLM(tiny_mixtral, dtype="float32")
        assert torch.get_num_threads() == 2
        torch.set_num_threads(2)
        factory.build_native_core(factory.EngineConfig(model=tiny_mixtral, dtype="float32"), progress=False)
        assert torch.get_num_threads() == 2  # a server's engine on two cores computes on both
        monkeypatch.setattr(factory, "physical_cores", lambda: 4)
        torch.set_num_threads(4)
        factory.build_native_core(factory.EngineConfig(model=tiny_mixtral, dtype="float32"), progress=False)
        assert torch.get_num_threads() == 3  # above two cores, it leaves one free
    finally:
        torch.set_num_threads(prev)
