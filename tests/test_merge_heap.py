"""The merge engine hands freed chunk buffers back to the system (glibc's mmap threshold is fixed)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from polyfuse.merge import heap

glibc = pytest.mark.skipif(heap._glibc() is None, reason="the mmap threshold is a glibc setting")

# Frees an 8 MB block, which makes glibc raise its own threshold to 8 MB, then allocates 2 MB (inside
# the merge's setting, after it, or without it) and prints how many bytes of it have their own mapping
# (mallinfo2.hblkhd: bytes in mmapped blocks).
_PROBE = """
import ctypes, sys, torch
from polyfuse.merge.heap import large_blocks_returned
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
def mapped():
    big = torch.ones(8 << 20, dtype=torch.uint8)
    del big
    before = libc.mallinfo2().hblkhd
    block = torch.ones(2 << 20, dtype=torch.uint8)
    return libc.mallinfo2().hblkhd - before
if sys.argv[1] == "glibc":
    print(mapped())
else:
    with large_blocks_returned() as applied:
        assert applied
        inside = mapped()
    print(inside if sys.argv[1] == "inside" else mapped())
"""


def _mapped_bytes(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@glibc
def test_large_blocks_get_their_own_mapping_during_a_merge_only():
    assert _mapped_bytes("glibc") < 2 << 20  # glibc's own rule: from the heap, where it stays after free
    assert _mapped_bytes("inside") >= 2 << 20  # unmapped again on free: back to the system
    assert _mapped_bytes("after") < 2 << 20  # below the 32 MiB left behind: from the heap again


def test_elsewhere_nothing_changes(monkeypatch):
    monkeypatch.setattr(heap, "_glibc", lambda: None)
    with heap.large_blocks_returned() as applied:
        assert applied is False

