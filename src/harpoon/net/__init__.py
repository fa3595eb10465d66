"""Guest networking, the host's side: the network namespace a container's VM runs in,
the tap its NIC is wired to and what CNI configured there (harpoon.net.netns,
harpoon.net.wire), and user-mode networking through gvproxy, one per VM, with its
port publishing and static DNS (harpoon.net.gvproxy, harpoon.net.gvproxy_api). Knows
host networking, never containerd: the shim decides which network a container gets."""
