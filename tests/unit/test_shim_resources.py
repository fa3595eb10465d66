"""VM sizes from OCI resources: what a container asks for fits in its VM."""

from hypothesis import given
from hypothesis import strategies as st

from harpoon.shim.resources import (
    DEFAULT_MEMORY_MIB,
    GUEST_OVERHEAD_MIB,
    VMSize,
    memory_step_mib,
    vm_size,
)

MIB = 1 << 20


def test_no_resources_gives_the_default_size() -> None:
    assert vm_size({}, host_cpus=8) == VMSize(cpus=2, memory_mib=DEFAULT_MEMORY_MIB)
    assert vm_size({}, host_cpus=1).cpus == 1


def memory_limited(limit: int) -> dict[str, object]:
    return {"linux": {"resources": {"memory": {"limit": limit}}}}


def test_memory_limit_plus_guest_overhead_rounds_up_to_a_step_of_the_ladder() -> None:
    assert vm_size(memory_limited(512 * MIB), host_cpus=8).memory_mib == 768  # 640 needed
    assert vm_size(memory_limited(256 * MIB), host_cpus=8).memory_mib == 384  # 384 needed
    assert vm_size(memory_limited(257 * MIB), host_cpus=8).memory_mib == 512
    assert vm_size(memory_limited(3 << 30), host_cpus=8).memory_mib == 4096


def test_nearby_limits_share_a_vm_size_and_so_a_template() -> None:
    sizes = {vm_size(memory_limited(m * MIB), host_cpus=8).memory_mib for m in (150, 200, 250)}
    assert sizes == {384}
    # A tiny limit gets the size (and template) of a container without one.
    assert vm_size(memory_limited(4096), host_cpus=8).memory_mib == DEFAULT_MEMORY_MIB


@given(st.integers(min_value=1, max_value=1 << 40))
def test_the_vm_always_holds_the_limit_and_wastes_at_most_half(limit: int) -> None:
    memory_mib = vm_size(memory_limited(limit), host_cpus=8).memory_mib
    needed = -(-limit // MIB) + GUEST_OVERHEAD_MIB
    assert memory_mib >= needed
    assert memory_mib == DEFAULT_MEMORY_MIB or memory_mib < needed * 1.5
    assert memory_step_mib(memory_mib) == memory_mib  # a step of the ladder


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
