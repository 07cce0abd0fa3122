"""What the pods of a rendered training manifest run, as Kubernetes and Kubeflow's training operator would start
them: each pod's name, host name and DNS names, and its container's command, arguments and environment, with
what the cluster adds (the completion index of an Indexed Job; MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK of a
PyTorchJob). Only the container's mount points and working directory are mapped to folders of this machine; the
command is run as rendered."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

CLUSTER_DOMAIN = "cluster.local"
# Kubeflow's training operator (kubeflow.org/v1): the container it reads, the port it defaults and reads
# MASTER_PORT from (pkg/apis/kubeflow.org/v1/pytorch_defaults.go, pkg/controller.v1/pytorch/envvar.go).
OPERATOR_CONTAINER, OPERATOR_PORT_NAME, OPERATOR_DEFAULT_PORT = "pytorch", "pytorchjob-port", 23456


@dataclass
class Pod:
    """One pod of a manifest: ``names`` are the DNS names that resolve to it (its host name first)."""

    name: str
    hostname: str
    names: list[str]
    container: dict
    env: dict[str, str] = field(default_factory=dict)  # what the cluster adds to the container's
    annotations: dict[str, str] = field(default_factory=dict)

    def port(self, name: str) -> int:
        """The container port called ``name``."""
        return next(p["containerPort"] for p in self.container.get("ports", []) if p.get("name") == name)

    def process(self, folders: dict[str, Path], image_env: dict[str, str]) -> tuple[list[str], dict[str, str], Path]:
        """``(argv, env, cwd)`` of the container, its mount points mapped through ``folders`` (volume name ->
        folder here; the working directory is the repository, as in the image); ``image_env`` is what the
        image gives every process (PATH, the interpreter)."""
        mounts = {m["mountPath"]: folders[m["name"]] for m in self.container.get("volumeMounts", [])}

        def mapped(value: str) -> str:
            for path, folder in mounts.items():
                if value == path or value.startswith(path + "/"):
                    return str(folder) + value[len(path) :]
            return value

        env = {**image_env, "HOSTNAME": self.hostname}
        for item in self.container.get("env", []):  # a later entry of a name wins, as in the kubelet
            env[item["name"]] = mapped(self.value_of(item))
        env.update(self.env)  # the operator appends its variables after the container's
        argv = [*self.container.get("command", []), *self.container.get("args", [])]
        return [mapped(a) for a in argv], env, folders["workingDir"]

    def value_of(self, item: dict) -> str:
        if "value" in item:
            return str(item["value"])
        path = item["valueFrom"]["fieldRef"]["fieldPath"]  # anything else is not emulated: fail loudly
        if path == "metadata.name":
            return self.name
        if path.startswith("metadata.annotations['"):
            return self.annotations[path[len("metadata.annotations['") : -2]]
        raise KeyError(f"{item['name']}: valueFrom {path} is not emulated here")


def indexed_job_pods(job: dict) -> list[Pod]:
    """The pods of an Indexed Job: ``<job>-<i>``, with the completion index in an annotation and in
    JOB_COMPLETION_INDEX, and the DNS name ``<job>-<i>.<subdomain>.<namespace>.svc`` of a pod with a subdomain."""
    name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
    spec = job["spec"]["template"]["spec"]
    assert job["spec"].get("completionMode") == "Indexed", "not an Indexed Job"
    (container,) = spec["containers"]
    pods = []
    for i in range(job["spec"]["completions"]):
        hostname = f"{name}-{i}"
        names = [hostname]
        if sub := spec.get("subdomain"):
            service = f"{hostname}.{sub}.{namespace}.svc"
            names += [f"{service}.{CLUSTER_DOMAIN}", service]  # the FQDN first, as in the pod's /etc/hosts
        pods.append(Pod(hostname, hostname, names, container, {"JOB_COMPLETION_INDEX": str(i)},
                        {"batch.kubernetes.io/job-completion-index": str(i)}))  # fmt: skip
    return pods


def pytorchjob_pods(job: dict) -> list[Pod]:
    """The pods the training operator creates for a PyTorchJob: ``<job>-master-0``, ``<job>-worker-<i>``, each
    behind a Service of its own name, with MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK and PYTHONUNBUFFERED set
    as the operator sets them (MASTER_PORT is the master container's ``pytorchjob-port``, which the operator's
    defaulting adds as 23456 where the chart names none)."""
    name, replicas = job["metadata"]["name"], job["spec"]["pytorchReplicaSpecs"]

    def container(role: str) -> dict:
        (c,) = [c for c in replicas[role]["template"]["spec"]["containers"] if c["name"] == OPERATOR_CONTAINER]
        if not any(p.get("name") == OPERATOR_PORT_NAME for p in c.get("ports", [])):
            c = {
                **c,
                "ports": [*c.get("ports", []), {"name": OPERATOR_PORT_NAME, "containerPort": OPERATOR_DEFAULT_PORT}],
            }
        return c

    master = container("Master")
    world = sum(r["replicas"] for r in replicas.values())
    common = {"PYTHONUNBUFFERED": "0", "MASTER_PORT": str(Pod("", "", [], master).port(OPERATOR_PORT_NAME)),
              "MASTER_ADDR": f"{name}-master-0", "WORLD_SIZE": str(world)}  # fmt: skip
    pods = []
    for role, offset in (("Master", 0), ("Worker", 1)):
        for i in range(replicas.get(role, {}).get("replicas", 0)):
            pod = f"{name}-{role.lower()}-{i}"
            pods.append(Pod(pod, pod, [pod], container(role), {**common, "RANK": str(i + offset)}))
    return pods
