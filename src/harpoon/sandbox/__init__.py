"""One container = one VM + one agent connection (harpoon.sandbox).

The sandbox knows VMs and the agent; it never knows containerd, and picks no VMM
itself: it is handed a harpoon.vmm.base.VirtualMachine.
"""
