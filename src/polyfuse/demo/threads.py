"""A fixed torch thread count for the tiny world's training, so the world is the same on any machine.

Measured: after the same steps, the GPT-2 and GPT-NeoX models' weights differ between one and two torch
threads (the Llama and Mistral ones do not), and every later figure follows from them; sampling gave the
same responses at one and two threads. The world trains with two threads, not one: the reference machine has
two cores, and one thread trains at half the speed there. The families that follow run one thread per process
(:data:`FAMILY_THREADS`), two processes side by side.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["DEMO_THREADS", "FAMILY_THREADS", "fixed_threads"]

#: Torch threads the tiny world's base models train with (the world is built before anything else runs).
DEMO_THREADS = 2
#: Torch threads of every fusion family of the demo and of the chat models: one per process, whatever the
#: core count, because training and the GPT-2 / GPT-NeoX forward passes differ in the last bits between one
#: and two threads (measured: WRPO's accuracy went 0.963 / 0.340 on one / two threads before its NLL term).
#: With two cores or more the implicit family runs beside the explicit ones (two processes, one thread each),
#: so the pin costs nothing there, and ``--one-after-another`` gives the same figures as side by side.
FAMILY_THREADS = 1


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
