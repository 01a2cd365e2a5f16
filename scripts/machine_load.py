"""What else used the machine while a run ran: load averages, CPU time outside this process's tree, the busiest.

A run's wall time means little on a shared machine without this: two fits at once, or another
user's job, make every stage slower. `LoadMonitor` samples `/proc` every few seconds in a thread;
`stop()` returns a `MachineLoad`.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class MachineLoad:
    """The machine while a run ran (Linux `/proc`).

    `load`: 1-minute load averages, sampled from the start to the end; `load_before`/`load_after`: the
    1-, 5- and 15-minute load averages at the start and the end; `busy_cpu_seconds`: CPU time every
    process on the machine used (user, nice, system, irq, softirq); `other_cores`: cores that processes
    outside the monitoring process and its children used on average; `busiest`: those processes' commands
    that used at least 5% of a core, with their CPU seconds, busiest first.
    """

    seconds: float
    load: list[float]
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    busy_cpu_seconds: float
    other_cores: float
    busiest: list[tuple[str, float]]


def busy_cpu_seconds() -> float:
    """CPU time spent by all processes on the machine since boot (user, nice, system, irq, softirq)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / os.sysconf("SC_CLK_TCK")


def _processes() -> dict[int, tuple[int, float, str]]:
    """pid → (parent pid, CPU seconds so far, command) of every process /proc shows."""
    ticks = os.sysconf("SC_CLK_TCK")
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks, command)
    return table


def _short(command: str) -> str:
    words = [w.rsplit("/", 1)[-1] if i == 0 else w for i, w in enumerate(command.split()[:5])]
    return " ".join(words)[:80]


class LoadMonitor:
    """What else shared the CPU: the CPU seconds of every process outside this process's own tree."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.started = time.perf_counter()
        self.load_before = os.getloadavg()
        self.busy_before = busy_cpu_seconds()
        self.load = [self.load_before[0]]
        self.others: dict[str, float] = {}
        self._last = _processes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _ours(self, table: dict[int, tuple[int, float, str]]) -> set[int]:
        ours, grew = {os.getpid()}, True
        while grew:
            grown = ours | {pid for pid, (parent, _, _) in table.items() if parent in ours}
            grew, ours = len(grown) > len(ours), grown
        return ours

    def _sample(self) -> None:
        table = _processes()
        ours = self._ours(table)
        for pid, (_, seconds, command) in table.items():
            if pid not in ours and command:
                used = seconds - (self._last[pid][1] if pid in self._last else 0.0)
                if used > 0:
                    self.others[_short(command)] = self.others.get(_short(command), 0.0) + used
        self._last = table
        self.load.append(os.getloadavg()[0])

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self._sample()

    def stop(self) -> MachineLoad:
        """Stop sampling (after one last sample) and say what the machine did since the start."""
        self._stop.set()
        self._thread.join()
        self._sample()
        elapsed = time.perf_counter() - self.started
        busiest = sorted(self.others.items(), key=lambda item: -item[1])[:5]
        return MachineLoad(
            seconds=elapsed,
            load=self.load,
            load_before=self.load_before,
            load_after=os.getloadavg(),
            busy_cpu_seconds=busy_cpu_seconds() - self.busy_before,
            other_cores=sum(self.others.values()) / elapsed,
            busiest=[(command, seconds) for command, seconds in busiest if seconds >= 0.05 * elapsed],
        )
