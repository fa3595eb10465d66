"""The kernel command line every backend's guest boots with (harpoon.vmm.qemu_launch,
harpoon.vmm.vfkit_launch): what the guest needs whatever runs it. A backend adds its
console and what its own machine needs.
"""

from __future__ import annotations

# PYTHONHASHSEED=0 reaches /init's environment (the kernel hands unknown `name=value`
# arguments to init): without it the agent's Python reads /dev/urandom for its hash seed
# before the kernel's RNG is seeded, and Linux 6.1 then runs its jitter-entropy loop, one
# bit per timer tick, ~1 s of CPU at every cold boot (measured). The agent drops it from
# its environment; the host's entropy credited at Hello seeds the RNG.
# cryptomgr.notests skips the crypto API's self-tests of every algorithm at boot (~0.5 s
# of CPU under TCG, the largest initcall; they check implementations, they guard nothing).
BASE_KERNEL_ARGS = (
    "quiet",
    "panic=-1",
    "rdinit=/init",
    "random.trust_cpu=on",
    "cryptomgr.notests",
    "PYTHONHASHSEED=0",
)
