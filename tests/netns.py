"""Several "nodes" on one machine: Linux network namespaces joined by veth links, each node with its own address,
its own host name (a UTS namespace) and its own CPU core, and names that resolve through ``/etc/netns/NAME/hosts``.

What torchrun's c10d rendezvous and gloo need from a cluster is real here: the agent whose host name or address
matches ``MASTER_ADDR`` hosts the store, the others connect to it over the link, and killing every process of a
node closes its sockets as a dead machine's peers see it. Traffic stays inside: the namespaces have their loopback
and one link route each (no default route, nothing bridged to the machine's interfaces), and every name a command
may look up is in the hosts file (``hosts: files`` only, so no DNS or mDNS query is ever made). Needs root.

    sudo python -m tests.netns --alias master=0 -- env NNODES=2 MASTER_ADDR=master bash resnet50/train_multinode.sh ...

runs the command on every node (``node0``, ``node1``), prefixes each output line with the node, and removes the
namespaces afterwards, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

# RFC 2544's benchmarking range: no real host here or elsewhere uses it. Each cluster is its own link, so two
# clusters made at once may use the same addresses.
SUBNET = ipaddress.ip_network("198.18.0.0/24")
NETNS_ETC = Path("/etc/netns")


def missing_requirement() -> str | None:
    """Why namespaces cannot be made on this machine (one line), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare", "taskset", "hostname"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    probe = f"cvprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def ip(*args: str) -> str:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def veth(name: str, namespace: str, peer: str, peer_namespace: str) -> None:
    """A veth pair with one end in each namespace (never in the machine's own)."""
    ip("link", "add", name, "netns", namespace, "type", "veth", "peer", "name", peer, "netns", peer_namespace)


@dataclass(frozen=True)
class Node:
    index: int
    namespace: str
    hostname: str
    address: str
    cpu: int


def on_node(node: Node, argv: list[str]) -> list[str]:
    """``argv`` as node ``node`` runs it: in its network namespace (whose hosts file ``ip netns exec`` mounts over
    /etc/hosts), with its own host name in a UTS namespace of its own, on its core."""
    return ["ip", "netns", "exec", node.namespace, "unshare", "--uts", "taskset", "-c", str(node.cpu),
            "sh", "-c", 'hostname "$0" && exec "$@"', node.hostname, *argv]  # fmt: skip


class Cluster:
    """``len(hostnames)`` nodes; ``aliases`` maps further names (a Service's DNS name) to a node's index.

    Two nodes are joined by one veth pair; more go through a bridge in a namespace of their own. Use it as a
    context manager: the namespaces, links, hosts files and every process started in them are removed on exit,
    whatever happened inside.
    """

    def __init__(self, hostnames: list[str], aliases: dict[str, int] | None = None):
        tag = f"cv{os.getpid()}"
        self.nodes = [
            Node(i, f"{tag}n{i}", name, str(SUBNET[i + 1]), i % (os.cpu_count() or 1))
            for i, name in enumerate(hostnames)
        ]
        self.aliases = aliases or {}
        self.switch = f"{tag}sw" if len(hostnames) > 2 else None
        self.procs: list[list[subprocess.Popen]] = [[] for _ in hostnames]

    def __enter__(self) -> Cluster:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def hosts_file(self) -> str:
        names: dict[int, list[str]] = {node.index: [] for node in self.nodes}
        for alias, index in self.aliases.items():
            names[index].append(alias)
        for node in self.nodes:  # aliases first: a pod's hosts file holds "IP FQDN hostname"
            names[node.index].append(node.hostname)
        lines = ["127.0.0.1 localhost", *(f"{n.address} {' '.join(names[n.index])}" for n in self.nodes)]
        return "\n".join(lines) + "\n"

    def up(self) -> None:
        namespaces = [n.namespace for n in self.nodes] + ([self.switch] if self.switch else [])
        for ns in namespaces:
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        if self.switch:
            ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            ip("-n", self.switch, "link", "set", "br0", "up")
        for node in self.nodes:
            if self.switch:
                veth(f"{node.namespace}a", node.namespace, f"{node.namespace}b", self.switch)
                ip("-n", self.switch, "link", "set", f"{node.namespace}b", "master", "br0", "up")
            elif node.index == 0:
                other = self.nodes[1].namespace
                veth(f"{node.namespace}a", node.namespace, f"{other}a", other)
            near = f"{node.namespace}a"
            ip("-n", node.namespace, "addr", "add", f"{node.address}/{SUBNET.prefixlen}", "dev", near)
            ip("-n", node.namespace, "link", "set", near, "up")
            etc = NETNS_ETC / node.namespace
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(self.hosts_file())
            # Names resolve from the hosts file only: no DNS server, no multicast DNS for *.local names.
            nsswitch = Path("/etc/nsswitch.conf")
            lines = nsswitch.read_text().splitlines() if nsswitch.exists() else []
            lines = [line for line in lines if not line.startswith("hosts:")] + ["hosts: files"]
            (etc / "nsswitch.conf").write_text("\n".join(lines) + "\n")
        self.check()

    def check(self) -> None:
        """Every node's namespace exists with its address and no route beyond its link (called before every
        start, so that nothing is sent unless the test's own network is in place)."""
        existing = {line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()}
        for node in self.nodes:
            if node.namespace not in existing:
                raise RuntimeError(f"namespace {node.namespace} of {node.hostname} is gone")
            if node.address not in ip("-n", node.namespace, "-br", "addr"):
                raise RuntimeError(f"{node.hostname} ({node.namespace}) has lost its address {node.address}")
            routes = [r for r in ip("-n", node.namespace, "route").splitlines() if r.strip()]
            if len(routes) != 1 or not routes[0].startswith(str(SUBNET)):
                raise RuntimeError(f"{node.hostname} must have only its link's route, has {routes}")

    def start(self, index: int, argv: list[str], env: dict, cwd: Path, log: Path) -> subprocess.Popen:
        """Start ``argv`` on node ``index`` (its namespace, host name and core), output appended to ``log``.

        ``env`` is the whole environment: nothing of the caller's leaks in unless it is passed.
        """
        self.check()
        with open(log, "ab") as out:
            proc = subprocess.Popen(on_node(self.nodes[index], argv), env=env, cwd=cwd, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self.procs[index].append(proc)
        return proc

    def pids(self, index: int) -> list[int]:
        """Every process in node ``index``'s network namespace, wherever in the process tree it is (torchrun
        starts its workers in sessions of their own)."""
        out = subprocess.run(["ip", "netns", "pids", self.nodes[index].namespace], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def kill(self, index: int, timeout: float = 30) -> None:
        """Node ``index`` dies: SIGKILL to all of its processes, until none is left."""
        deadline = time.monotonic() + timeout
        while pids := self.pids(index):
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes {pids} of {self.nodes[index].hostname} survive SIGKILL")
            time.sleep(0.05)
        for proc in self.procs[index]:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()

    def environments(self, index: int) -> dict[int, dict[str, str]]:
        """The environment of every process of node ``index``, by pid (those that end meanwhile are left out)."""
        found = {}
        for pid in self.pids(index):
            try:
                raw = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            found[pid] = dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)
        return found

    def listening_ports(self, index: int) -> set[int]:
        """The TCP ports something listens on in node ``index``, IPv4 or IPv6 (the rendezvous store listens on
        both), from the namespace's /proc/net/tcp and tcp6."""
        out = ip("netns", "exec", self.nodes[index].namespace, "cat", "/proc/net/tcp", "/proc/net/tcp6")
        rows = [line.split() for line in out.splitlines() if line.strip() and not line.lstrip().startswith("sl")]
        return {int(row[1].rsplit(":", 1)[1], 16) for row in rows if row[3] == "0A"}  # 0A: LISTEN

    def down(self) -> None:
        for node in self.nodes:
            try:
                self.kill(node.index)
            except Exception as e:  # noqa: BLE001 - removing the namespaces below matters more
                print(f"netns: {e}", file=sys.stderr)
        for ns in [n.namespace for n in self.nodes] + ([self.switch] if self.switch else []):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # its veth ends go with it
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        try:
            NETNS_ETC.rmdir()  # only if no other cluster's files are left in it
        except OSError:
            pass


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int | None]:
    """Exit codes of ``procs`` (None for one still running after ``timeout`` seconds in all)."""
    deadline = time.monotonic() + timeout
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(max(0.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            codes.append(None)
    return codes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.netns", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--alias", action="append", default=[], metavar="NAME=INDEX",
                        help="a further name for node INDEX (e.g. a Service's DNS name)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...], run on every node")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    if reason := missing_requirement():
        print(f"netns: {reason}", file=sys.stderr)
        return 2
    aliases = {name: int(index) for name, index in (a.split("=", 1) for a in args.alias)}
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / f"netns-{os.getpid()}"
    logs.mkdir(parents=True, exist_ok=True)
    with Cluster([f"node{i}" for i in range(args.nodes)], aliases) as cluster:
        for node in cluster.nodes:
            print(f"netns: {node.hostname} = {node.address} ({node.namespace}, cpu {node.cpu})", file=sys.stderr)
        procs = [
            cluster.start(i, command, dict(os.environ), Path.cwd(), logs / f"node{i}.log") for i in range(args.nodes)
        ]
        tails = [threading.Thread(target=follow, args=(logs / f"node{i}.log", f"node{i}", procs[i]), daemon=True)
                 for i in range(args.nodes)]  # fmt: skip
        for t in tails:
            t.start()
        codes = wait_all(procs, args.timeout)
        for t in tails:
            t.join(2)
    print(f"netns: exit codes {codes}; logs in {logs}", file=sys.stderr)
    return max((1 if c is None else abs(c)) for c in codes)


def follow(path: Path, prefix: str, proc: subprocess.Popen) -> None:
    """Print ``path``'s lines as they are written, prefixed, until ``proc`` ends."""
    with open(path, errors="replace") as f:
        while True:
            line = f.readline()
            if line:
                print(f"{prefix}| {line}", end="", flush=True)
            elif proc.poll() is not None:
                return
            else:
                time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
