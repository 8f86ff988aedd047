"""MOE_SERVE_FAULT_INJECT parsing and triggering (tests/loadtest/faults.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.loadtest.faults import ENV_VAR, FaultInjector, InjectedFault, install_from_env


def _item(prompt: list[int], output: list[int] = ()) -> SimpleNamespace:
    seq = SimpleNamespace(token_ids=list(prompt) + list(output), num_prompt_tokens=len(prompt))
    return SimpleNamespace(seq=seq, num_new=1)


def _fires(inj: FaultInjector, batch: list) -> bool:
    try:
        inj(batch)
    except InjectedFault:
        return True
    return False


def test_every_after_times() -> None:
    inj = FaultInjector.parse("every=3, after=2, times=2")
    fired = [_fires(inj, [_item([5])]) for _ in range(20)]
    assert [i + 1 for i, f in enumerate(fired) if f] == [5, 8]  # steps 3+2, 6+2; then `times` is spent
    always = FaultInjector.parse("every=1")
    assert all(_fires(always, [_item([5])]) for _ in range(5))


def test_token_poisons_only_steps_holding_that_prompt_token() -> None:
    inj = FaultInjector.parse("token=7")
    assert not _fires(inj, [_item([1, 2, 3])])
    assert not _fires(inj, [_item([1, 2], output=[7])])  # generated, not in the prompt
    assert _fires(inj, [_item([1, 2]), _item([9, 7, 9])])
    assert _fires(inj, [_item([7])])
    once = FaultInjector.parse("token=7;times=1")
    assert _fires(once, [_item([7])]) and not _fires(once, [_item([7])])


@pytest.mark.parametrize("spec", ["", "every", "every=x", "sometimes=1", "after=2", "every=-1", "times=1"])
def test_bad_specs(spec: str) -> None:
    with pytest.raises(ValueError, match=ENV_VAR):
        FaultInjector.parse(spec)


def test_install_from_env() -> None:
    core = SimpleNamespace(fault_hook=None)
    assert install_from_env(core, {}) is None and core.fault_hook is None
    assert install_from_env(core, {ENV_VAR: "  "}) is None and core.fault_hook is None
    inj = install_from_env(core, {ENV_VAR: "every=2"})
    assert core.fault_hook is inj and inj.every == 2
