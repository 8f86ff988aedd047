"""State slots: the per-sequence recurrent state of hybrid models' linear-attention layers.

A hybrid model (Qwen3-Next, Qwen3.5-MoE) keeps, besides the paged KV cache of its attention
layers, a fixed-size state per sequence in each linear-attention layer (the convolution window
and the recurrent matrix: `models/layers/linear_attention.py`). The runner allocates those
tensors with one row per slot (plus a scratch row); this pool hands the slot numbers out. A
sequence holds a slot from admission until it finishes or is preempted (preemption recomputes,
so the state is rebuilt from the prompt); an n > 1 request takes its n slots when admitted and
its completions fork the prompt's state into theirs (the runner copies the rows).
"""

from __future__ import annotations


class StateSlots:
    def __init__(self, num_slots: int):
        if num_slots < 1:
            raise ValueError(f"num_slots={num_slots} must be at least 1")
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out the lowest first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int = 1) -> list[int] | None:
        """`n` slots, or None (and nothing taken) when fewer are free."""
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def free(self, slots: list[int]) -> None:
        for slot in slots:
            if not 0 <= slot < self.num_slots or slot in self._free:
                raise ValueError(f"state slot {slot} is not in use")
            self._free.append(slot)
