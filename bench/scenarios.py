"""The benchmarks: each runs its runtimes and baselines interleaved, N times.

Interleaving (floor, runc, harpoon, floor, runc, harpoon, …) makes the noise of a shared
machine hit every series alike, so their ratios hold even when absolute times drift.
With `--baseline-commit` a third runtime, harpoon at that commit, is measured exactly
like harpoon in every round, right before or after it (they swap every other round).
Every function records into `Figures` and returns; a failed or slow run becomes a
recorded failure, never an exception.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from bench import host
from bench.baseline import Baseline
from bench.ctr import HARPOON, RUNC, UNIMPLEMENTED, Ctr, CtrResult, Runtime
from bench.floor import FLOOR_FIGURE, PYTHON_FLOOR_FIGURE, FloorBoot, boot_floor, python_floor_image
from bench.shimlog import ShimLog
from bench.stats import Figure, Figures
from bench.template import ensure_template
from harpoon.devenv.containerd import Containerd
from harpoon.guest import GuestImage

#: A single `ctr run --rm … echo hi` (a harpoon one takes 6-8 s under TCG).
RUN_TIMEOUT_S = 180.0
#: A run that pushes the stdout payload through (harpoon: boot + ~15-40 MiB/s).
STDOUT_RUN_TIMEOUT_S = 600.0
#: A batch of concurrent runs: ten VMs on two cores under TCG take a while.
BATCH_RUN_TIMEOUT_S = 600.0
#: `ctr task exec` of `echo hi` in a running container.
EXEC_TIMEOUT_S = 60.0
#: How long an idle container sits before its memory is read (let start-up settle).
IDLE_SETTLE_S = 2.0

MIB = 1 << 20
MODE_LABELS = {"template": "restored from template", "cold": "cold boot"}


@dataclass
class Bench:
    """What every benchmark needs: the daemon, the image, where to record, how often."""

    daemon: Containerd
    ctr: Ctr
    image: str
    guest: GuestImage
    floor_image: GuestImage
    qemu: str
    accelerator: str
    figures: Figures
    runs: int
    console: Console
    shim_log: ShimLog
    stdout_mib: int = 256
    stdin_mib: int = 256
    containers: int = 10
    concurrency_runs: int = 3
    templates: bool = True
    #: harpoon at another commit (`--baseline-commit`), measured beside harpoon each round.
    baseline: Baseline | None = None
    _ids: dict[str, int] = field(default_factory=dict)

    @property
    def runtimes(self) -> list[Runtime]:
        """The runtimes of every round, in their order."""
        runtimes = [RUNC, HARPOON]
        if self.baseline is not None:
            runtimes.append(Runtime(self.baseline.label, self.baseline.runtime, harpoon=True))
        return runtimes

    def round_order(self, i: int) -> list[Runtime]:
        """The runtimes of round `i` (from 1) in the order they run: with a baseline,
        harpoon and it swap places every other round (A B, B A, …), so that neither always
        runs right after the other (a VM's teardown, a cache it warmed)."""
        order = self.runtimes
        if self.baseline is not None and i % 2 == 0:
            order[1], order[2] = order[2], order[1]
        return order

    @property
    def harpoons(self) -> list[Runtime]:
        return [r for r in self.runtimes if r.harpoon]

    async def ensure_template(self, runtime: Runtime) -> str:
        """Builds (or waits for) the VM template the measured runs of `runtime` restore."""
        if self.baseline is not None and runtime.runtime == self.baseline.runtime:
            return await self.baseline.ensure_template()
        return await ensure_template(self.guest)

    def new_id(self, prefix: str) -> str:
        """A container ID never used before in this run (`bench-PREFIX-N`)."""
        n = self._ids[prefix] = self._ids.get(prefix, 0) + 1
        return f"bench-{prefix}-{n}"

    @property
    def vmm(self) -> tuple[str, str]:
        """boot_floor's QEMU binary and accelerator."""
        return self.qemu, self.accelerator

    def used_ids(self) -> dict[str, int]:
        """How many IDs of each prefix were handed out."""
        return dict(self._ids)

    def say(self, message: str) -> None:
        self.console.log(message, highlight=False)


def _expect_output(result: CtrResult, expected: bytes) -> str | None:
    """Why a run does not count, or None when it exited 0 and printed `expected`."""
    if not result.ok:
        return result.failure()
    if result.stdout != expected:
        return f"`ctr {' '.join(result.argv)}` printed {result.stdout[:200]!r}, not {expected!r}"
    return None


async def warm_up(bench: Bench) -> None:
    """One untimed floor boot and one run of each runtime, so that page cache, the
    accelerator probe and first-start costs are paid before anything is measured; and,
    when harpoon restores VMs from templates, a template built for this configuration."""
    names = ", ".join(r.name for r in bench.runtimes)
    bench.say(f"warm-up: one floor boot, one run of each of {names} (not measured)")
    await boot_floor(bench.floor_image, *bench.vmm)
    for rt in bench.runtimes:
        container_id = bench.new_id(f"warm-{rt.id_part}")
        result = await bench.ctr.run_container(
            rt.runtime, bench.image, container_id, "echo", "hi", timeout_s=RUN_TIMEOUT_S
        )
        if not result.ok:
            bench.say(f"[yellow]warm-up {rt.name} failed: {result.failure()}")
        elif rt.harpoon and bench.templates and await _booted_cold(bench, container_id):
            # The shim has a builder make it in the background; this waits for it.
            bench.say(f"warm-up {rt.name}: {await bench.ensure_template(rt)}")


async def _booted_cold(bench: Bench, container_id: str) -> bool:
    return (await bench.shim_log.start(container_id)).mode == "cold"


async def startup(bench: Bench) -> None:
    """Boot floor and CPython floor vs `ctr run --rm … echo hi` on runc and harpoon, and
    harpoon's split."""
    with tempfile.TemporaryDirectory(prefix="hp-python-floor-") as directory:
        python_floor = await asyncio.to_thread(python_floor_image, bench.guest, Path(directory))
        await _startup(bench, python_floor)


async def _startup(bench: Bench, python_floor: GuestImage) -> None:
    section = "startup"
    f = bench.figures
    floor = f.get(section, FLOOR_FIGURE, "s")
    python = f.get(section, PYTHON_FLOOR_FIGURE, "s")
    runs = {rt.name: f.get(section, f"{rt.name}: `ctr run --rm … echo hi`", "s")
            for rt in bench.runtimes}  # fmt: skip
    harpoon_ids: dict[str, list[str]] = {rt.name: [] for rt in bench.harpoons}
    for i in range(1, bench.runs + 1):
        floor_boot = _record(floor, await boot_floor(bench.floor_image, *bench.vmm))
        python_boot = _record(python, await boot_floor(python_floor, *bench.vmm))
        line = [f"floor {_s(floor_boot.seconds)}", f"CPython floor {_s(python_boot.seconds)}"]
        for rt in bench.round_order(i):
            container_id = bench.new_id(f"run-{rt.id_part}")
            result = await bench.ctr.run_container(
                rt.runtime, bench.image, container_id, "echo", "hi", timeout_s=RUN_TIMEOUT_S
            )
            figure = runs[rt.name]
            problem = _expect_output(result, b"hi\n")
            if problem:
                figure.fail(problem)
                line.append(f"{rt.name} failed")
                continue
            figure.add(result.seconds)
            line.append(f"{rt.name} {_s(result.seconds)}")
            if not rt.harpoon:
                continue
            harpoon_ids[rt.name].append(container_id)
            line[-1] += await _vm_start(bench, rt, container_id, result, floor_boot)
        bench.say(f"startup {i}/{bench.runs}: {', '.join(line)}")
    for rt in bench.harpoons:
        await _note_modes(bench, runs[rt.name], harpoon_ids[rt.name])


async def _vm_start(
    bench: Bench, rt: Runtime, container_id: str, result: CtrResult, floor_boot: FloorBoot
) -> str:
    """Records a harpoon run's VM start and the rest of the run (shim log); says how."""
    section = "startup"
    f = bench.figures
    rest_name = f"{rt.name}: rest of the run (wall - VM start)"
    start = await bench.shim_log.start(container_id)
    if start.seconds is None:
        f.get(section, rest_name, "s").fail(f"no 'created {container_id}' log line")
        return " (VM start unknown)"
    how = MODE_LABELS.get(start.mode or "", "mode unknown")
    f.get(section, f"{rt.name}: VM start → agent ready, {how} (shim log)", "s").add(start.seconds)
    f.get(section, rest_name, "s").add(result.seconds - start.seconds)
    if floor_boot.seconds is not None and start.mode == "cold":
        f.get(section, f"{rt.name}: cold VM boot - boot floor (same round)", "s").add(
            start.seconds - floor_boot.seconds
        )
    return f" (VM {how} {start.seconds:.2f} s)"


def _record(figure: Figure, boot: FloorBoot) -> FloorBoot:
    if boot.seconds is not None:
        figure.add(boot.seconds)
    else:
        figure.fail(boot.error or "no marker")
    return boot


async def _note_modes(bench: Bench, figure: Figure, container_ids: list[str]) -> None:
    """Notes how many of a harpoon figure's VMs were restored from a template."""
    modes = [(await bench.shim_log.start(c)).mode for c in container_ids]
    if modes:
        restored = modes.count("template")
        figure.notes.append(f"{restored} of {len(modes)} VMs restored from a template")


async def stdout_throughput(bench: Bench) -> None:
    """`dd` of N MiB of zeros to stdout through `ctr run --rm`, counted, not kept."""
    section = "stdout"
    payload = bench.stdout_mib * MIB
    command = ("sh", "-c", f"dd if=/dev/zero bs=1M count={bench.stdout_mib} 2>/dev/null")
    f = bench.figures
    short: dict[str, list[int]] = {}
    harpoon_ids: dict[str, list[str]] = {rt.name: [] for rt in bench.harpoons}
    for i in range(1, bench.runs + 1):
        line = []
        for rt in bench.round_order(i):
            name = rt.name
            rate = f.get(
                section, f"{name}: stdout {bench.stdout_mib} MiB, first byte → EOF", "MiB/s",
                higher_is_better=True,
            )  # fmt: skip
            wall = f.get(section, f"{name}: stdout {bench.stdout_mib} MiB, whole `ctr run`", "s")
            container_id = bench.new_id(f"stdout-{rt.id_part}")
            if rt.harpoon:
                harpoon_ids[name].append(container_id)
            result = await bench.ctr.run_container(
                rt.runtime, bench.image, container_id, *command,
                timeout_s=STDOUT_RUN_TIMEOUT_S, keep_stdout=False,
            )  # fmt: skip
            if not result.ok or not result.stdout_bytes:
                problem = result.failure() if not result.ok else "no output"
                rate.fail(problem)
                wall.fail(problem)
                line.append(f"{name} failed")
                continue
            if result.stdout_bytes != payload:
                # Reported, not dropped: losing the tail of a container's output is a
                # finding in itself (the rate below counts only the bytes that came).
                short.setdefault(name, []).append(result.stdout_bytes)
            assert result.first_byte_s is not None
            streaming_s = max(result.seconds - result.first_byte_s, 1e-6)
            rate.add(result.stdout_bytes / MIB / streaming_s)
            wall.add(result.seconds)
            line.append(f"{name} {rate.samples[-1]:.0f} MiB/s ({result.seconds:.1f} s)")
        bench.say(f"stdout {i}/{bench.runs}: {', '.join(line)}")
    for name, received in short.items():
        note = (
            f"{len(received)} run(s) delivered fewer bytes than the container wrote "
            f"(as few as {min(received)} of {payload})"
        )
        for figure in f.matching(section, f"{name}: "):
            figure.notes.append(note)
    for rt in bench.harpoons:
        for figure in f.matching(section, f"{rt.name}: "):
            await _note_modes(bench, figure, harpoon_ids[rt.name])


async def stdin_throughput(bench: Bench) -> None:
    """N MiB of zeros from a file through `ctr run --rm`'s stdin into `dd`, which counts
    whole MiB (`iflag=fullblock`): "N+0 records in" proves that all of it arrived."""
    section = "stdin"
    mib = bench.stdin_mib
    # The container says it is about to read, then dd says how much it read once stdin
    # ends: the time between the two lines on ctr's stdout is the transfer (what ctr
    # copied into the FIFO before dd started is at most the FIFO's size).
    command = ("sh", "-c", "echo reading; dd of=/dev/null bs=1M iflag=fullblock 2>&1")
    expected = f"reading\n{mib}+0 records in\n{mib}+0 records out\n".encode()
    f = bench.figures
    harpoon_ids: dict[str, list[str]] = {rt.name: [] for rt in bench.harpoons}
    with tempfile.NamedTemporaryFile(prefix="hp-bench-stdin-") as payload:
        payload.truncate(mib * MIB)  # zeros, read from the page cache by ctr
        for i in range(1, bench.runs + 1):
            line = []
            for rt in bench.round_order(i):
                name = rt.name
                rate = f.get(
                    section, f"{name}: stdin {mib} MiB, first line → last line", "MiB/s",
                    higher_is_better=True,
                )  # fmt: skip
                wall = f.get(section, f"{name}: stdin {mib} MiB, whole `ctr run`", "s")
                container_id = bench.new_id(f"stdin-{rt.id_part}")
                if rt.harpoon:
                    harpoon_ids[name].append(container_id)
                result = await bench.ctr.run_container(
                    rt.runtime, bench.image, container_id, *command,
                    timeout_s=STDOUT_RUN_TIMEOUT_S, stdin_path=payload.name,
                )  # fmt: skip
                problem = _expect_output(result, expected)
                if problem is not None:
                    rate.fail(problem)
                    wall.fail(problem)
                    line.append(f"{name} failed")
                    continue
                assert result.first_byte_s is not None and result.last_byte_s is not None
                streaming_s = max(result.last_byte_s - result.first_byte_s, 1e-6)
                rate.add(mib / streaming_s)
                wall.add(result.seconds)
                line.append(f"{name} {rate.samples[-1]:.0f} MiB/s ({result.seconds:.1f} s)")
            bench.say(f"stdin {i}/{bench.runs}: {', '.join(line)}")
    for rt in bench.harpoons:
        for figure in f.matching(section, f"{rt.name}: "):
            await _note_modes(bench, figure, harpoon_ids[rt.name])


async def _exec(bench: Bench, container_id: str, *command: str) -> CtrResult:
    return await bench.ctr.run(
        "task", "exec", "--exec-id", bench.new_id("exec"), container_id, *command,
        timeout_s=EXEC_TIMEOUT_S,
    )  # fmt: skip


async def idle(bench: Bench) -> None:
    """An idle `sleep 1000` container per runtime: shim and VM memory, then exec latency."""
    f = bench.figures
    # Named first, so that the table lists each quantity's runtimes next to each other.
    for rt in bench.runtimes:
        f.get("idle", f"{rt.name}: shim RSS", "MiB")
    for name in ("QEMU RSS", "shim + QEMU RSS"):
        for rt in bench.harpoons:
            f.get("idle", f"{rt.name}: {name}", "MiB")
    for rt in bench.harpoons:
        f.get("idle", _guest_memory_name(rt), "MiB")
    for rt in bench.runtimes:
        f.get("idle", f"{rt.name}: `ctr task exec … echo hi`", "s")
    harpoon_ids: dict[str, list[str]] = {rt.name: [] for rt in bench.harpoons}
    for i in range(1, bench.runs + 1):
        ids = {rt.name: bench.new_id(f"idle-{rt.id_part}") for rt in bench.runtimes}
        for rt in bench.harpoons:
            harpoon_ids[rt.name].append(ids[rt.name])
        try:
            await _idle_round(bench, ids, bench.round_order(i))
        finally:
            for container_id in ids.values():
                await bench.ctr.remove_container(container_id)
        bench.say(f"idle {i}/{bench.runs}: {_idle_line(bench)}")
    for rt in bench.harpoons:
        total = f.get("idle", f"{rt.name}: shim + QEMU RSS", "MiB")
        await _note_modes(bench, total, harpoon_ids[rt.name])


def _guest_memory_name(rt: Runtime) -> str:
    return f"{rt.name}: guest memory in use (MemTotal - MemAvailable)"


async def _idle_round(bench: Bench, ids: dict[str, str], order: list[Runtime]) -> None:
    """Starts one idle container per runtime, reads memory, execs in each (in `order`)."""
    f = bench.figures
    started = {}
    for rt in order:
        result = await bench.ctr.run_container(
            rt.runtime, bench.image, ids[rt.name], "sleep", "1000",
            timeout_s=RUN_TIMEOUT_S, detach=True,
        )  # fmt: skip
        started[rt.name] = result.ok
        if not result.ok:
            f.get("idle", f"{rt.name}: `ctr task exec … echo hi`", "s").fail(result.failure())
    await asyncio.sleep(IDLE_SETTLE_S)
    for rt in order:
        _record_memory(bench, rt, ids[rt.name], started[rt.name])
    for rt in order:
        if started[rt.name]:
            exec_figure = f.get("idle", f"{rt.name}: `ctr task exec … echo hi`", "s")
            await _measure_exec(bench, ids[rt.name], exec_figure)
    for rt in bench.harpoons:
        if started[rt.name]:
            exec_figure = f.get("idle", f"{rt.name}: `ctr task exec … echo hi`", "s")
            guest_used = f.get("idle", _guest_memory_name(rt), "MiB")
            await _guest_memory(bench, ids[rt.name], guest_used, exec_figure)


def _idle_line(bench: Bench) -> str:
    """The last round's memory and exec times, for the progress log."""
    f = bench.figures
    memory, execs = [], []
    for rt in bench.runtimes:
        memory.append(f"{rt.name} shim {_mib(f.get('idle', f'{rt.name}: shim RSS', 'MiB'))}")
        if rt.harpoon:
            memory[-1] += f" + QEMU {_mib(f.get('idle', f'{rt.name}: QEMU RSS', 'MiB'))}"
        exec_figure = f.get("idle", f"{rt.name}: `ctr task exec … echo hi`", "s")
        execs.append(f"{rt.name} {exec_figure.unavailable or _s(_last(exec_figure.samples))}")
    return f"{', '.join(memory)}; exec {', '.join(execs)}"


def _record_memory(bench: Bench, rt: Runtime, container_id: str, started: bool) -> None:
    """Reads the RSS of an idle container's shim (and of a harpoon's QEMU child)."""
    shim_figure = bench.figures.get("idle", f"{rt.name}: shim RSS", "MiB")
    if not started:
        shim_figure.fail(f"{container_id} did not start")
        return
    shim = host.shim_of(bench.daemon, container_id)
    shim_rss = host.rss_mib(shim.pid) if shim else None
    if shim is None or shim_rss is None:
        shim_figure.fail(f"no live shim with -id {container_id}")
        return
    shim_figure.add(shim_rss)
    if not rt.harpoon:
        return
    qemu = bench.figures.get("idle", f"{rt.name}: QEMU RSS", "MiB")
    vm = host.qemu_child(shim.pid)
    vm_rss = host.rss_mib(vm) if vm else None
    if vm_rss is None:
        qemu.fail(f"no qemu-system-* child of shim pid {shim.pid}")
        return
    qemu.add(vm_rss)
    bench.figures.get("idle", f"{rt.name}: shim + QEMU RSS", "MiB").add(shim_rss + vm_rss)


async def _measure_exec(bench: Bench, container_id: str, figure: Figure) -> None:
    """One `ctr task exec … echo hi`; a shim without exec marks the figure unavailable."""
    if figure.unavailable:
        return
    result = await _exec(bench, container_id, "echo", "hi")
    if not result.ok and UNIMPLEMENTED.search(result.stderr):
        figure.unavailable = f"not implemented ({result.stderr.splitlines()[-1]})"
        return
    problem = _expect_output(result, b"hi\n")
    if problem:
        figure.fail(problem)
    else:
        figure.add(result.seconds)


async def _guest_memory(
    bench: Bench, container_id: str, figure: Figure, exec_figure: Figure
) -> None:
    """MemTotal - MemAvailable inside the VM, read with exec (n/a while exec is missing)."""
    if exec_figure.unavailable:
        figure.unavailable = "n/a: needs exec, which harpoon does not implement yet"
        return
    result = await _exec(bench, container_id, "cat", "/proc/meminfo")
    fields = dict(re.findall(r"^(\w+):\s+(\d+) kB$", result.stdout.decode(errors="replace"), re.M))
    if not result.ok or "MemTotal" not in fields or "MemAvailable" not in fields:
        figure.fail(result.failure() if not result.ok else "no MemTotal/MemAvailable in output")
        return
    figure.add((int(fields["MemTotal"]) - int(fields["MemAvailable"])) / 1024)


async def concurrency(bench: Bench) -> None:
    """K containers at once vs one after another, total wall time, per runtime."""
    section = "concurrency"
    k = bench.containers
    f = bench.figures
    batch_ids: dict[str, list[str]] = {}
    for i in range(1, bench.concurrency_runs + 1):
        line = []
        for mode in ("concurrent", "sequential"):
            for rt in bench.round_order(i):
                figure = f.get(section, f"{rt.name}: {k} x `ctr run --rm … echo hi`, {mode}", "s")
                loop = asyncio.get_running_loop()
                ids = [bench.new_id(f"{mode[:4]}-{rt.id_part}") for _ in range(k)]
                if rt.harpoon:
                    batch_ids.setdefault(figure.name, []).extend(ids)
                started = loop.time()
                runs = [
                    bench.ctr.run_container(
                        rt.runtime,
                        bench.image,
                        container_id,
                        "echo",
                        "hi",
                        timeout_s=BATCH_RUN_TIMEOUT_S,
                    )
                    for container_id in ids
                ]
                if mode == "concurrent":
                    results = list(await asyncio.gather(*runs))
                else:
                    results = [await run for run in runs]
                total = loop.time() - started
                problems = [p for p in (_expect_output(r, b"hi\n") for r in results) if p]
                if problems:
                    figure.fail(f"{len(problems)} of {k} runs failed; first: {problems[0]}")
                    line.append(f"{rt.name} {mode} failed")
                else:
                    figure.add(total)
                    line.append(f"{rt.name} {mode} {total:.1f} s")
        bench.say(f"concurrency {i}/{bench.concurrency_runs}: {', '.join(line)}")
    for rt in bench.harpoons:
        for figure in f.matching(section, f"{rt.name}: "):
            await _note_modes(bench, figure, batch_ids.get(figure.name, []))


def _secs(result: CtrResult | None) -> float | None:
    return result.seconds if result is not None else None


def _last(values: list[float]) -> float | None:
    return values[-1] if values else None


def _s(value: float | None) -> str:
    return f"{value:.2f} s" if value is not None else "failed"


def _mib(figure: Figure) -> str:
    return f"{figure.samples[-1]:.0f} MiB" if figure.samples else "n/a"
