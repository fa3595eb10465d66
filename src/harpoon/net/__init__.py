"""Guest networking, the host's side: the network namespace a container's VM runs in,
the tap its NIC is wired to and what CNI configured there (harpoon.net.netns,
harpoon.net.wire), and user-mode networking through gvproxy. Knows Linux networking,
never containerd: the shim decides which network a container gets."""
