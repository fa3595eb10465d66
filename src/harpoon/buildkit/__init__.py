"""BuildKit on harpoon: a buildkitd whose containerd worker runs every build step in a VM.

`config` renders buildkitd's `buildkitd.toml` (the only place its containerd worker's
runtime can be named: buildkitd has no flag for it); `daemon` starts one buildkitd on
a layout of its own directories, waits until it serves, and stops it, by its pid file,
from any process. The front door's services (`harpoon system`) and the tests'
harness (harpoon.devenv.buildkitd) both run buildkitd through these.

This package knows buildkitd's configuration and process, nothing of containerd's
internals, the shim or the VMs: the step containers reach harpoon through containerd
like any other container.
"""
