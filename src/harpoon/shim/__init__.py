"""containerd's side of harpoon: the shim CLI contract and the Task service.

harpoon.shim knows containerd and never knows which VMM runs: it asks
harpoon.sandbox for a VM and talks to the guest through the agent client.
"""
