"""VM sizes from OCI resources: what a container asks for is what its VM gets."""

from harpoon.shim.resources import DEFAULT_MEMORY_MIB, GUEST_OVERHEAD_MIB, VMSize, vm_size


def test_no_resources_gives_the_default_size() -> None:
    assert vm_size({}, host_cpus=8) == VMSize(cpus=1, memory_mib=DEFAULT_MEMORY_MIB)


def test_memory_limit_plus_guest_overhead_becomes_the_vms_ram() -> None:
    spec = {"linux": {"resources": {"memory": {"limit": 512 * 1024 * 1024}}}}
    assert vm_size(spec, host_cpus=8).memory_mib == 512 + GUEST_OVERHEAD_MIB


def test_a_tiny_limit_still_boots() -> None:
    spec = {"linux": {"resources": {"memory": {"limit": 4096}}}}
    assert vm_size(spec, host_cpus=8).memory_mib >= 128


def test_cpu_quota_rounds_up_to_whole_vcpus_within_the_host() -> None:
    quota = {"linux": {"resources": {"cpu": {"quota": 150000, "period": 100000}}}}
    assert vm_size(quota, host_cpus=8).cpus == 2
    many = {"linux": {"resources": {"cpu": {"quota": 1600000, "period": 100000}}}}
    assert vm_size(many, host_cpus=4).cpus == 4


def test_a_cpuset_counts_its_cpus() -> None:
    spec = {"linux": {"resources": {"cpu": {"cpus": "0-2,5"}}}}
    assert vm_size(spec, host_cpus=8).cpus == 4
