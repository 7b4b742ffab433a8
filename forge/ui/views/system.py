"""System: CPU, memory, the disk that holds the run root, and the GPU if torch sees one."""
from __future__ import annotations

import os
import subprocess
import sys

import streamlit as st

from forge.ui import data

GPU_PROBE = ("import torch\nif torch.cuda.is_available():\n    for i in range(torch.cuda.device_count()):\n"
             "        p = torch.cuda.get_device_properties(i)\n"
             "        print(f'{i}: {p.name}, {p.total_memory / 2**30:.1f} GiB')\nelse:\n    print('torch sees no CUDA GPU')\n")


def memory_bytes() -> tuple[int | None, int | None]:
    """(total, available) from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in handle if line.split()[1:]}
    except (OSError, ValueError, IndexError):
        return None, None
    return fields.get("MemTotal"), fields.get("MemAvailable")


@st.cache_data(show_spinner="Asking torch about GPUs…")
def gpus() -> str:
    """torch's view of the GPUs, asked in a child process (importing torch here would slow every page)."""
    try:
        done = subprocess.run([sys.executable, "-c", GPU_PROBE], capture_output=True, text=True, timeout=120,
                              check=False)
    except subprocess.TimeoutExpired:
        return "unknown (torch took longer than 120 s to answer)"
    return done.stdout.strip() if done.returncode == 0 else f"unknown (torch failed: {done.stderr.strip()[-300:]})"


def render(run: data.RunRoot, session: dict | None) -> None:
    cpu, memory, disk = st.columns(3)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    cpu.metric("CPU cores", os.cpu_count() or "?", help="logical cores the OS reports")
    if load:
        cpu.caption(f"load average (1, 5, 15 min): {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}")
    total, available = memory_bytes()
    if total:
        memory.metric("Memory available", f"{available / 2**30:.1f} GiB", help="of the machine's total")
        memory.caption(f"total {total / 2**30:.1f} GiB")
    usage = data.disk_usage(run.root)
    disk.metric("Disk free (run root)", f"{usage['free'] / 2**30:.1f} GiB")
    disk.caption(f"of {usage['total'] / 2**30:.1f} GiB; {run.root} holds {data.folder_bytes(run.root) / 2**20:.1f} MiB")
    st.markdown("#### GPU")
    st.text(gpus())
