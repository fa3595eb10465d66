"""What the OCI runtime in the guest (crun 1.8) needs of the spec it runs.

- crun 1.8 refuses any ociVersion but 1.0.x ("unknown version specified"), and
  containerd 2.x writes 1.1 or 1.2; what those added, crun 1.8 reads or ignores: the
  guest's spec says 1.0.2.
- The container's processes live in the one cgroup the agent reads stats from and kills
  when the init exits (CONTAINER_CGROUPS_PATH); containerd's cgroupsPath names a host
  cgroup.
- crun runs without address-space randomization in the guest (harpoon.agent.oci), and
  sets the spec's personality in the container's processes before they exec: the spec
  names Linux's default explicitly, so that they get ASLR back.

The host makes the whole guest spec; the agent writes it for crun as it is.
"""

from __future__ import annotations

from harpoon.api.names import CONTAINER_CGROUPS_PATH
from harpoon.shim.transform.draft import Draft, Transformer

CRUN_OCI_VERSION = "1.0.2"
DEFAULT_PERSONALITY = {"domain": "LINUX"}


class GuestRuntime(Transformer):
    def plan(self, draft: Draft) -> None:
        guest = draft.guest_spec
        guest["ociVersion"] = CRUN_OCI_VERSION
        linux = guest.get("linux")
        linux = dict(linux) if isinstance(linux, dict) else {}
        linux["cgroupsPath"] = CONTAINER_CGROUPS_PATH
        if not linux.get("personality"):
            linux["personality"] = dict(DEFAULT_PERSONALITY)
        guest["linux"] = linux
