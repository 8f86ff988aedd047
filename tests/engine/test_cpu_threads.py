"""The CPU engine's compute threads: physical cores - 1 for a server, all of them offline (at
least 1); OMP_NUM_THREADS wins."""

from __future__ import annotations

import torch

from server.engine import factory


def test_one_core_left_to_the_engine_loop(monkeypatch):
    prev = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(factory, "physical_cores", lambda: 4)
        torch.set_num_threads(4)
        assert factory.configure_cpu_threads() == 3 and torch.get_num_threads() == 3
        monkeypatch.setattr(factory, "physical_cores", lambda: 1)
        torch.set_num_threads(1)
        assert factory.configure_cpu_threads() == 1
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
        assert torch.get_num_threads() == 1  # a server's engine leaves one core free
    finally:
        torch.set_num_threads(prev)
