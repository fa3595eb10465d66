"""The development and test harness: real containerd daemons and test images.

- `tools`: the pinned containerd release lines ("flavours") and where their binaries are;
- `containerd`: a throw-away containerd daemon with all its state in a temp directory;
- `images`: the busybox OCI image the tests run, built offline from busybox-static;
- `nerdctl`: nerdctl set up to drive such a daemon offline, its state in one directory;
- `cni`: nerdctl networks on subnets no host address uses, and their removal;
- `host`: reading /proc to find and clean up leaked processes and mounts;
- `__main__`: `python -m harpoon.devenv run -- CMD`, one container in a throw-away daemon.

Nothing here is used by the shim itself at run time.
"""
