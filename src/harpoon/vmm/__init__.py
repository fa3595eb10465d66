"""VMM backends behind one interface (base.VirtualMachine).

harpoon.vmm knows virtual machine monitors and nothing of containerd: it boots a
kernel and initramfs with a set of shares and hands back a byte stream to the
guest agent. QEMU (KVM, HVF or TCG) lives in qemu_launch.py (its command line and
launch) and qemu.py (the running VM); vfkit (macOS's Virtualization.framework) in
vfkit_launch.py, vfkit.py and vfkit_api.py (its REST API), behind the same interface
(backend.py; choice.py: which one runs).
"""
