"""The trainer's CPU allocator setting: freed activation buffers are reused, not page-faulted in again."""
import subprocess
import sys

import pytest

# Allocates, writes and frees a 64 MiB tensor again and again (an activation per step) and prints the minor page
# faults of the last ten rounds. With the setting, the heap grows over the first rounds (torch asks for aligned
# blocks, a little larger than the one just freed) and then serves every round from freed memory.
SCRIPT = """
import resource, sys, torch
from lcr_fast.host_memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
for _ in range(10):
    torch.empty(16 << 20).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.empty(16 << 20).fill_(1.0)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    applied, count = out.stdout.split()[-2:]
    return applied, int(count)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_buffers_are_reused_not_faulted_in_again():
    applied, kept = faults("keep")
    _, default = faults("default")
    assert applied == "True"
    pages = 10 * (64 << 20) // 4096
    assert default > 0.9 * pages  # glibc's default maps (and the kernel zeroes) every 64 MiB buffer anew
    assert kept < 0.05 * pages
