"""The guest agent: PID 1 inside every harpoon VM.

It imports nothing from harpoon.shim, harpoon.vmm or harpoon.net, and as little of
the standard library as it can: under TCG every imported module costs boot time.
"""
