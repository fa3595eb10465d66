"""VM sizes from OCI resources: what a container asks for is what its VM gets."""

from harpoon.shim.resources import DEFAULT_MEMORY_MIB, GUEST_OVERHEAD_MIB, VMSize, vm_size


def test_no_resources_gives_the_default_size() -> None:
    assert vm_size({}, host_cpus=8) == VMSize(cpus=2, memory_mib=DEFAULT_MEMORY_MIB)
    assert vm_size({}, host_cpus=1).cpus == 1


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


def test_cgroup_limits_carry_memory_cpu_and_pids() -> None:
    from harpoon.shim.resources import cgroup_limits

    limits = cgroup_limits(
        {"memory": {"limit": 64 << 20}, "cpu": {"quota": 50000, "period": 100000},
         "pids": {"limit": 100}},
        vm_memory_mib=256,
    )  # fmt: skip
    assert (limits.memory_limit_bytes, limits.cpu_quota_us, limits.cpu_period_us) == (
        64 << 20, 50000, 100000,
    )  # fmt: skip
    assert limits.pids_limit == 100
    assert not cgroup_limits({}, vm_memory_mib=256).ListFields()


def test_a_memory_limit_beyond_the_vm_is_refused_not_ignored() -> None:
    import pytest

    from harpoon.errdefs import FailedPrecondition
    from harpoon.shim.resources import cgroup_limits

    with pytest.raises(FailedPrecondition, match="fixed when the container is created"):
        cgroup_limits({"memory": {"limit": 1 << 30}}, vm_memory_mib=256)
