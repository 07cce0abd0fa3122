"""Two nodes over a real network: every multi-node path (``NNODES=2 train_multinode.sh``, the chart's Indexed Job
and PyTorchJob pods, the Slurm batch script) run in two network namespaces joined by a veth pair (tests/netns.py),
each node with its own address and host name: torchrun's real c10d rendezvous, gloo across the link, one process
per node. Each result is compared with one process accumulating the same global batch, which
tests/test_resume_and_ddp.py proves equal to two processes; a node killed mid-epoch rejoins and the job ends as
the uninterrupted one; without restarts the survivor fails within a bounded time.

Needs root (``ip netns``); skipped with the reason elsewhere. Only the namespaces' own addresses and the loopback
are ever reached: see tests/netns.py. Each two-node run starts four interpreters (two torchrun agents, two
workers), the kill test six: about a minute a run on 2 busy cores."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

from common.checkpoint import load_checkpoint
from common.logger import read_log
from tests.conftest import FAST_TRAIN, ONE_THREAD, ROOT, make_tree, run_cli
from tests.netns import Cluster, missing_requirement, wait_all
from tests.pods import OPERATOR_PORT_NAME, Pod, indexed_job_pods, pytorchjob_pods
from tests.test_resume_and_ddp import assert_same_parameters, epoch_losses, final_metrics

RECIPE = "resnet50"
CHART = ROOT / "helm" / "convnets"
# 96 images, 3 steps an epoch of 2 x 16: room to kill a node mid-epoch. A gentle lr, as in the DDP test.
TRAIN = ["--data-backend", "pytorch", "--epochs", "2", "--deterministic", "--optimizer-batch-size", "32",
         *FAST_TRAIN, "--workers", "0", "--lr", "0.05"]  # fmt: skip
RUN_TIMEOUT = 420  # seconds for one two-node run: only to stop a hang
LAST = "checkpoint_epoch_0001.pt"


@functools.cache
def netns_missing() -> str | None:
    return missing_requirement()


def require_netns() -> None:
    if reason := netns_missing():
        pytest.skip(f"two nodes in network namespaces: {reason}")


def image_env(home: Path) -> dict[str, str]:
    """What the image gives every process: the interpreter with this checkout importable, one intra-op thread.
    Nothing else of the test's environment reaches a node."""
    return {"PATH": os.environ["PATH"], "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "HOME": str(home),
            "LANG": "C.UTF-8", **ONE_THREAD}  # fmt: skip


@pytest.fixture
def cluster():
    """``cluster(hostnames, aliases)``: a fresh set of namespaces, removed after the test whatever happens."""
    require_netns()
    made = []

    def make(hostnames: list[str], aliases: dict[str, int] | None = None) -> Cluster:
        made.append(Cluster(hostnames, aliases))
        return made[-1].__enter__()

    yield make
    for c in made:
        c.down()


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("two-nodes"), train_per_class=24, val_per_class=8)


@pytest.fixture(scope="module")
def reference(tree, tmp_path_factory) -> Path:
    """One process of the recipe accumulating 2 x 16, as the two nodes' 1 x 16 each."""
    require_netns()
    out = tmp_path_factory.mktemp("one") / "run"
    run_cli("train", "--preset", str(ROOT / RECIPE / "preset.toml"), "--data", str(tree), *TRAIN, "--output",
            str(out))  # fmt: skip
    return out


def tail(texts: list[str], lines: int = 40) -> str:
    return "\n".join(f"--- node {i}:\n" + "\n".join(t.splitlines()[-lines:]) for i, t in enumerate(texts))


WORKER_VARS = ("RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE", "GROUP_WORLD_SIZE", "TORCHELASTIC_RUN_ID")


def watch(cluster: Cluster, procs: list, timeout: float = RUN_TIMEOUT) -> dict:
    """Until ``procs`` end (or ``timeout``): the TCP ports node 0 listens on, and the torchrun variables of the
    workers on each node (a process with TORCHELASTIC_RUN_ID; a plain ``python -m common`` has none)."""
    ports: set[int] = set()
    workers: dict[tuple[int, int], dict] = {}
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        ports |= cluster.listening_ports(0)
        for node in cluster.nodes:
            for pid, env in cluster.environments(node.index).items():
                if "TORCHELASTIC_RUN_ID" in env and "torch.distributed.run" not in cmdline(pid):  # not the agent
                    workers[node.index, pid] = {k: env.get(k) for k in WORKER_VARS}
        time.sleep(0.5)
    return {"ports": ports, "workers": workers}


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text(errors="replace").replace("\0", " ")
    except OSError:
        return ""


def assert_one_rank_per_node(workers: dict, run_id: str) -> None:
    """Each node ran one torchrun worker, joined through the c10d rendezvous ``run_id``: ranks 0 and 1, one per
    node, in a world of 2 nodes x 1 process (a node counted twice, a rank computed twice or a worker started
    without torchrun breaks it)."""
    ranks = {node: (env["RANK"], env["GROUP_RANK"]) for (node, _), env in workers.items()}
    assert len(workers) == 2 and sorted(r for r, _ in ranks.values()) == ["0", "1"], workers
    assert all(r == g for r, g in ranks.values()), workers  # one process a node: global rank = node rank
    for env in workers.values():
        assert (env["WORLD_SIZE"], env["GROUP_WORLD_SIZE"], env["LOCAL_RANK"]) == ("2", "2", "0"), env
        assert env["TORCHELASTIC_RUN_ID"] == run_id, env


def run_nodes(cluster: Cluster, processes: list[tuple[list[str], dict, Path]], logs: Path) -> dict:
    """Start ``(argv, env, cwd)`` on node i each and wait for all; returns their exit codes, what ``watch`` saw,
    the logs and the seconds it took."""
    logs.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    procs = [cluster.start(i, argv, env, cwd, logs / f"node{i}.log") for i, (argv, env, cwd) in enumerate(processes)]
    seen = watch(cluster, procs)
    codes = wait_all(procs, 0)
    text = [(logs / f"node{i}.log").read_text(errors="replace") for i in range(len(procs))]
    assert None not in codes, f"a node did not finish in {RUN_TIMEOUT} s:\n" + tail(text)
    return {"codes": codes, **seen, "logs": text, "seconds": time.monotonic() - start}


def assert_matches_reference(out: Path, reference: Path) -> None:
    """The two-node run in ``out`` trained as the single process: same steps, losses and parameters (not the
    running BN statistics, which each rank tracks on its own micro-batches by design)."""
    one, two = load_checkpoint(reference / LAST), load_checkpoint(out / LAST)
    assert two["config"]["world_size"] == 2 and one["config"]["accumulation"] == 2
    assert two["step"] == one["step"]
    losses_one, losses_two = epoch_losses(reference), epoch_losses(out)
    for epoch in (0, 1):
        assert losses_two[epoch] == pytest.approx(losses_one[epoch], rel=1e-4)
    params = {k: v for k, v in one["model"].items() if "running_" not in k and "num_batches" not in k}
    assert_same_parameters(params, {k: two["model"][k] for k in params}, tol=1e-4)


def launcher(out: Path, master: str, restarts: int, home: Path, tree: Path) -> tuple[list[str], dict, Path]:
    """``NNODES=2 MASTER_ADDR=master bash resnet50/train_multinode.sh``, as the chart's pods call it."""
    argv = ["bash", f"{RECIPE}/train_multinode.sh", "--data", str(tree), "--output", str(out), "--resume", "auto",
            *TRAIN]  # fmt: skip
    env = {**image_env(home), "NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": master,
           "MAX_RESTARTS": str(restarts)}  # fmt: skip
    return argv, env, ROOT


@pytest.fixture(scope="module")
def two_nodes(tree, tmp_path_factory) -> Path:
    """``NNODES=2 MASTER_ADDR=<node 0's address> train_multinode.sh`` on each node, uninterrupted."""
    require_netns()
    tmp = tmp_path_factory.mktemp("two")
    with Cluster(["node0", "node1"]) as c:
        run = run_nodes(c, [launcher(tmp / "run", c.nodes[0].address, 0, tmp, tree)] * 2, tmp / "logs")
    assert run["codes"] == [0, 0], tail(run["logs"])
    assert sum("x 2 processes" in text for text in run["logs"]) == 1  # rank 0, on either node, says the size
    assert_one_rank_per_node(run["workers"], "convnets")
    print(f"two nodes: {run['seconds']:.0f} s")
    return tmp / "run"


def test_two_nodes_train_as_one_process_with_the_same_global_batch(two_nodes, reference):
    assert_matches_reference(two_nodes, reference)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def training_step(out: Path, epoch: int, step: int) -> bool:
    """Rank 0 has logged step ``step`` (or a later one) of ``epoch``."""
    log = out / "log.json"
    return log.exists() and any(isinstance(r["step"], list) and len(r["step"]) == 2 and r["step"][0] == epoch
                                and r["step"][1] >= step for r in read_log(log))  # fmt: skip


def test_without_restarts_the_survivor_fails_within_a_bounded_time(tree, cluster, tmp_path):
    """MAX_RESTARTS=0: node 1 dies in the first epoch; node 0's worker sees its peer's connection reset and
    torchrun ends with an error, in seconds, instead of waiting on it (measured: 3 to 8 s on 2 busy cores)."""
    c = cluster(["node0", "node1"])
    out = tmp_path / "run"
    procs = [c.start(i, *launcher(out, c.nodes[0].address, 0, tmp_path, tree), tmp_path / f"node{i}.log")
             for i in range(2)]  # fmt: skip
    wait_for(lambda: training_step(out, 0, 1), RUN_TIMEOUT, "the first training step")
    c.kill(1)
    killed = time.monotonic()
    (code,) = wait_all(procs[:1], 120)
    took = time.monotonic() - killed
    log = (tmp_path / "node0.log").read_text(errors="replace")
    assert code is not None, f"node 0 still runs 120 s after node 1 died:\n{log[-3000:]}"
    assert code != 0 and "ChildFailedError" in log, log[-3000:]
    # gloo names the peer it lost, node 1's address across the link, in one of two forms: "Read error
    # [ADDR]:PORT: Connection reset by peer" or "Connection closed by peer [ADDR]:PORT" (seen in CI).
    peer = rf"\[{re.escape(c.nodes[1].address)}\]:\d+"
    lost = rf"{peer}: Connection (reset|closed) by peer|Connection (reset|closed) by peer {peer}"
    assert re.search(lost, log), log[-3000:]
    print(f"survivor failed {took:.1f} s after node 1 was killed, exit code {code}")


def chart_docs(values_file: str, train: dict) -> list[dict]:
    """The chart rendered by Helm's engine for a ci/ values file, its ``train`` values updated, the tiny run's
    arguments as ``train.args``."""
    from tests.test_deploy import load_values, render

    values = load_values(CHART / "ci" / values_file)
    values["train"].update({"nprocPerNode": 1, "args": list(TRAIN), **train})
    # No tracking server lives in these namespaces, and a test sends nothing to an address it did not make: the
    # values files' MLflow URI (a cluster's Service name) and its credentials Secret go.
    values["tracking"] = {**values.get("tracking", {}), "mlflowUri": "", "credentialsSecret": ""}
    return render({**values, "recipe": RECIPE, "benchmark": {"enabled": False}})


def pod_processes(pods: list[Pod], tree: Path, tmp: Path) -> list[tuple[list[str], dict, Path]]:
    """Each pod's container as a process here: the data and runs claims shared by the pods, /tmp each pod's own."""
    runs = tmp / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    processes = []
    for pod in pods:
        (tmp / pod.name).mkdir()
        folders = {"data": tree, "runs": runs, "tmp": tmp / pod.name, "dshm": Path("/dev/shm"), "workingDir": ROOT}
        processes.append(pod.process(folders, image_env(tmp / pod.name)))
    return processes


def test_indexed_job_pods_survive_a_killed_node(tree, two_nodes, cluster, tmp_path):
    """The chart's two pods (an Indexed Job rendered by Helm's engine) run as rendered: MASTER_ADDR is pod 0's
    name through the headless Service, which resolves to node 0, and the store listens on the Service's port.
    Node 1 is killed mid-epoch and restarted as the kubelet restarts a failed container (same pod, same name);
    with the chart's maxRestarts, node 0's torchrun waits for it, both resume from the newest checkpoint, and the
    job ends as the uninterrupted run."""
    docs = chart_docs("multi-node-values.yaml", {"nnodes": 2})
    (job,) = [d for d in docs if d["kind"] == "Job"]
    (service,) = [d for d in docs if d["kind"] == "Service"]
    pods = indexed_job_pods(job)
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure"
    restarts = {e["name"]: e.get("value") for e in pods[0].container["env"]}["MAX_RESTARTS"]
    assert int(restarts) >= 1, "the chart's pods must let torchrun restart its workers"
    c = cluster([p.hostname for p in pods], {name: i for i, p in enumerate(pods) for name in p.names[1:]})
    processes = pod_processes(pods, tree, tmp_path)
    out = tmp_path / "runs" / RECIPE
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    start = time.monotonic()
    procs = [c.start(i, *processes[i], logs[i]) for i in range(2)]
    wait_for(lambda: (out / "checkpoint_epoch_0000.pt").exists() and training_step(out, 1, 1), RUN_TIMEOUT,
             "epoch 0's checkpoint and a step of epoch 1")  # fmt: skip
    (port,) = [pods[0].port(p["targetPort"]) for p in service["spec"]["ports"] if p["name"] == "rendezvous"]
    assert port == service["spec"]["ports"][0]["port"]
    assert port in c.listening_ports(0), f"node 0 does not listen on the Service's rendezvous port {port}"
    c.kill(1)
    killed = time.monotonic()
    assert not (out / LAST).exists(), "the run reached its last checkpoint before node 1 was killed"
    restarted = c.start(1, *processes[1], logs[1])
    codes = wait_all([procs[0], restarted], RUN_TIMEOUT)
    text = [p.read_text(errors="replace") for p in logs]
    assert codes == [0, 0], tail(text)
    assert re.search(r"resumed from .*checkpoint_epoch_0000\.pt at epoch 1", "".join(text)), tail(text)
    print(f"indexed job: killed after {killed - start:.0f} s, finished {time.monotonic() - killed:.0f} s later")
    a, b = final_metrics(two_nodes), final_metrics(out)
    for key in ("val.top1", "val.top5"):
        assert b[key] == pytest.approx(a[key], abs=1e-6), key
    assert b["val.loss"] == pytest.approx(a["val.loss"], rel=1e-4)
    assert_same_parameters(load_checkpoint(two_nodes / LAST)["model"], load_checkpoint(out / LAST)["model"], 1e-5)


def test_the_pytorchjob_rendezvous_is_at_the_charts_port():
    """The training operator takes MASTER_PORT from the container port named pytorchjob-port, and adds 23456
    where there is none: the chart must name its rendezvous port so (no namespaces needed)."""
    pytest.importorskip("helm_python", reason="helm-python-sdk (pip install -e '.[deploy]')")
    (job,) = [d for d in chart_docs("pytorchjob-values.yaml", {}) if d["kind"] == "PyTorchJob"]
    (master, worker) = pytorchjob_pods(job)
    from tests.test_deploy import load_values

    port = load_values(CHART / "values.yaml")["train"]["rdzvPort"]
    assert master.env["MASTER_PORT"] == worker.env["MASTER_PORT"] == str(port)
    assert master.port(OPERATOR_PORT_NAME) == port
    assert (master.env["RANK"], worker.env["RANK"], master.env["WORLD_SIZE"]) == ("0", "1", "2")


def test_pytorchjob_pods_train_across_two_nodes(tree, reference, cluster, tmp_path):
    """The PyTorchJob's Master and Worker pods with the variables the training operator sets (MASTER_ADDR is the
    master pod's Service name, MASTER_PORT its pytorchjob-port, WORLD_SIZE and RANK count pods): the
    rendezvous listens on the chart's port and the run trains as the single process."""
    (job,) = [d for d in chart_docs("pytorchjob-values.yaml", {}) if d["kind"] == "PyTorchJob"]
    pods = pytorchjob_pods(job)
    c = cluster([p.hostname for p in pods])
    run = run_nodes(c, pod_processes(pods, tree, tmp_path), tmp_path / "logs")
    assert run["codes"] == [0, 0], tail(run["logs"])
    assert int(pods[0].env["MASTER_PORT"]) in run["ports"]
    assert_one_rank_per_node(run["workers"], job["metadata"]["name"])
    print(f"pytorchjob: {run['seconds']:.0f} s")
    assert_matches_reference(tmp_path / "runs" / RECIPE, reference)


def sbatch_env(sbatch: Path, hosts: list[str], job_id: str) -> dict[str, str]:
    """What Slurm sets for a batch script (on the allocation's first node), from the script's directives."""
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)=?(\S*)", sbatch.read_text(), re.M))
    nodelist = f"{hosts[0][:-2]}[{hosts[0][-2:]}-{hosts[-1][-2:]}]"
    return {"SLURM_JOB_ID": job_id, "SLURM_JOBID": job_id, "SLURM_JOB_NAME": directives["job-name"],
            "SLURM_JOB_NODELIST": nodelist, "SLURM_NODELIST": nodelist, "SLURM_JOB_NUM_NODES": str(len(hosts)),
            "SLURM_NNODES": str(len(hosts)), "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_SUBMIT_HOST": "login1",
            "SLURM_NTASKS_PER_NODE": directives["ntasks-per-node"], "SLURMD_NODENAME": hosts[0],
            "SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}  # fmt: skip


def test_slurm_batch_script_trains_across_two_nodes(tree, reference, cluster, tmp_path):
    """``sbatch resnet50/train_slurm.sbatch`` on CPU nodes (NPROC_PER_NODE=1): the batch script, a copy as slurmd
    runs it, on the first node with the variables Slurm sets, and common/slurm.sh's ``srun`` starting one task per
    node with the step's variables (tests/fake_slurm.py)."""
    sbatch = ROOT / RECIPE / "train_slurm.sbatch"
    nnodes = int(re.search(r"^#SBATCH --nodes=(\d+)", sbatch.read_text(), re.M).group(1))
    hosts = [f"cpu-a{i + 1:02d}" for i in range(nnodes)]
    c = cluster(hosts)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for command in ("srun", "scontrol"):
        (bin_dir / command).write_text(f'#!/bin/sh\nexec "{sys.executable}" -m tests.fake_slurm {command} "$@"\n')
        (bin_dir / command).chmod(0o755)
    spool = tmp_path / "spool" / "job4242"
    spool.mkdir(parents=True)
    shutil.copy(sbatch, spool / "slurm_script")
    env = {**image_env(tmp_path), **sbatch_env(sbatch, hosts, "4242"), "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "NPROC_PER_NODE": "1", "FAKE_SLURM_NODES": json.dumps([dataclasses.asdict(n) for n in c.nodes])}  # fmt: skip
    out = tmp_path / "run"
    argv = ["bash", str(spool / "slurm_script"), "--data", str(tree), "--output", str(out), "--resume", "auto", *TRAIN]
    log = tmp_path / "batch.log"
    start = time.monotonic()
    batch = c.start(0, argv, env, ROOT, log)  # sbatch's default --chdir: the submit folder
    seen = watch(c, [batch])
    (code,) = wait_all([batch], 0)
    text = log.read_text(errors="replace")
    assert code == 0, text[-4000:]
    assert_one_rank_per_node(seen["workers"], "slurm-4242")
    assert f"rendezvous at {hosts[0]}:29500" in text
    print(f"slurm: {time.monotonic() - start:.0f} s")
    assert_matches_reference(out, reference)
