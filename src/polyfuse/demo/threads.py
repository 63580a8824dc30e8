"""A fixed torch thread count for the tiny world's training, so the world is the same on any machine.

Measured: after the same steps, the GPT-2 and GPT-NeoX models' weights differ between one and two torch
threads (the Llama and Mistral ones do not), and every later figure follows from them; sampling gave the
same responses at one and two threads. Two threads, not one: the reference machine has two cores, and one
thread trains at half the speed there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["DEMO_THREADS", "fixed_threads"]

#: Torch threads every tiny-world model trains with (world models and chat models).
DEMO_THREADS = 2


@contextmanager
def fixed_threads(n: int = DEMO_THREADS) -> Iterator[None]:
    """Run the body with ``n`` torch threads, then restore the previous count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
