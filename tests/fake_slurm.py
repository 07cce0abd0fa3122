"""Stand-ins for Slurm's ``srun`` and ``scontrol show hostnames`` over the nodes of a :class:`tests.netns.Cluster`.

``srun --nodes=N --ntasks-per-node=K [--kill-on-bad-exit=1] CMD...`` starts K tasks on each of the first N nodes,
each in its node's namespace with its host name, and the variables slurmstepd sets (SLURM_PROCID, SLURM_LOCALID,
SLURM_NODEID, SLURM_NNODES, SLURM_NTASKS, SLURM_STEP_NODELIST, SLURMD_NODENAME, ...) on top of the caller's
environment (srun's default ``--export=ALL``). The nodes come from ``FAKE_SLURM_NODES`` (JSON, set by the test),
which the tasks do not see. Options it does not know make it fail, so that a changed ``srun`` line is noticed.

    python -m tests.fake_slurm srun ARGS...  |  python -m tests.fake_slurm scontrol show hostnames LIST
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

from tests.netns import Node, on_node

NODES_VAR = "FAKE_SLURM_NODES"


def expand_hostlist(hostlist: str) -> list[str]:
    """``cpu-a[01-02,05],gpu7`` -> ``cpu-a01 cpu-a02 cpu-a05 gpu7`` (Slurm's hostlist syntax, one bracket)."""
    names = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", hostlist):
        if plain:
            names.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            names += [f"{prefix}{n:0{len(lo)}d}" for n in range(int(lo), int(hi or lo) + 1)]
    return names


def srun(args: list[str]) -> int:
    options = {}
    while args and args[0].startswith("--"):
        key, _, value = args.pop(0)[2:].partition("=")
        if key not in ("nodes", "ntasks-per-node", "kill-on-bad-exit"):
            print(f"fake srun: option --{key} is not emulated", file=sys.stderr)
            return 2
        options[key] = value
    nodes = [Node(**n) for n in json.loads(os.environ[NODES_VAR])][: int(options.get("nodes", 1))]
    per_node = int(options.get("ntasks-per-node", 1))
    existing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    missing = [n.namespace for n in nodes if n.namespace not in existing.split()]
    if missing:  # nothing is started outside the test's own namespaces
        print(f"fake srun: namespaces {missing} do not exist", file=sys.stderr)
        return 2
    env = {k: v for k, v in os.environ.items() if k != NODES_VAR}
    step = {"SLURM_NNODES": str(len(nodes)), "SLURM_NTASKS": str(len(nodes) * per_node),
            "SLURM_NPROCS": str(len(nodes) * per_node), "SLURM_STEP_ID": "0", "SLURM_STEPID": "0",
            "SLURM_STEP_NUM_NODES": str(len(nodes)), "SLURM_STEP_NUM_TASKS": str(len(nodes) * per_node),
            "SLURM_STEP_NODELIST": ",".join(n.hostname for n in nodes),
            "SLURM_TASKS_PER_NODE": f"{per_node}(x{len(nodes)})"}  # fmt: skip
    tasks = []
    for node_id, node in enumerate(nodes):
        for local in range(per_node):
            task = {**env, **step, "SLURM_PROCID": str(node_id * per_node + local), "SLURM_LOCALID": str(local),
                    "SLURM_NODEID": str(node_id), "SLURMD_NODENAME": node.hostname,
                    "SLURM_TOPOLOGY_ADDR": node.hostname}  # fmt: skip
            tasks.append(subprocess.Popen(on_node(node, args), env=task, start_new_session=True))
    codes: list[int | None] = [None] * len(tasks)
    while any(c is None for c in codes):
        codes = [t.poll() for t in tasks]
        if options.get("kill-on-bad-exit") == "1" and any(c not in (None, 0) for c in codes):
            print("fake srun: a task failed, terminating the others (--kill-on-bad-exit)", file=sys.stderr)
            for task in tasks:
                if task.poll() is None:
                    os.killpg(task.pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            for task in tasks:
                try:
                    task.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    os.killpg(task.pid, signal.SIGKILL)
            codes = [t.wait() for t in tasks]
        time.sleep(0.1)
    return max(abs(c) for c in codes)


def main(argv: list[str]) -> int:
    if argv[:1] == ["srun"]:
        return srun(argv[1:])
    if argv[:3] == ["scontrol", "show", "hostnames"] and len(argv) == 4:
        print("\n".join(expand_hostlist(argv[3])))
        return 0
    print(f"fake slurm: {' '.join(argv)} is not emulated", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
