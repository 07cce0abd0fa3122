"""The container, compose file, Helm chart and Slurm scripts, checked with the real tools that run without a
Docker engine, a helm binary or a cluster: Helm's own engine (helm-python-sdk) renders and lints the chart,
kubernetes-validate checks every manifest against the Kubernetes API schemas, hadolint, docker-compose,
yamllint, checkov and shellcheck check the rest. What these cannot show (an image that builds, pods that
rendezvous on real nodes) is listed in the README's "Container, Kubernetes and Slurm" section."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML (pip install -e '.[deploy]')")
helm = pytest.importorskip("helm_python", reason="helm-python-sdk (pip install -e '.[deploy]')")
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate (pip install -e '.[deploy]')"
)

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "convnets"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
KUBE_VERSION = "1.31.0"
RELEASE, NAMESPACE = "demo", "ml"
# Custom resources have no schema in kubernetes-validate; their required fields are checked below instead.
CRDS = {("kubeflow.org/v1", "PyTorchJob")}
SLURM_SCRIPTS = [
    ROOT / "common" / "launch.sh",
    ROOT / "common" / "slurm.sh",
    *sorted(ROOT.glob("*/train_slurm.sbatch")),
]


def tool(name: str) -> str:
    """The executable of a deploy tool: beside this interpreter (the venv), else on PATH; skip if absent."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[deploy]')")
    return found


def render(values: dict) -> list[dict]:
    """Every manifest the chart renders for ``values`` (merged over values.yaml, checked by the schema)."""
    out = helm.Chart.load(str(CHART)).render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [
        doc
        for path, text in sorted(out.items())
        if path.endswith((".yaml", ".yml"))
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def load_values(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def pod_specs(doc: dict) -> list[dict]:
    if doc["kind"] == "PyTorchJob":
        return [r["template"]["spec"] for r in doc["spec"]["pytorchReplicaSpecs"].values()]
    return [doc["spec"]["template"]["spec"]]


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    assert {p.stem for p in CI_VALUES} >= {"single-node-values", "multi-node-values", "serve-values", "triton-values"}
    return {p.stem: render(load_values(p)) for p in CI_VALUES}


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.stem)
def test_chart_lints_strictly(values_file):
    report = helm.lint(
        str(CHART), load_values(values_file), strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}"
    )
    assert report["errors"] == [] and report["messages"] == [], report


def test_every_manifest_validates_against_kubernetes(rendered):
    checked = 0
    for name, docs in rendered.items():
        for doc in docs:
            if (doc["apiVersion"], doc["kind"]) in CRDS:
                continue
            try:
                kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {e.message} at {list(e.path)}")
            checked += 1
    assert checked >= 15


def test_kubernetes_validate_rejects_an_unknown_field(rendered):
    # The strict check can fail: a misspelt field in a rendered Job is caught.
    job = json.loads(json.dumps(by_kind(rendered["single-node-values"], "Job")[0]))
    job["spec"]["template"]["spec"]["restartPolicyy"] = "Never"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, KUBE_VERSION, strict=True)


def test_single_node_job(rendered):
    docs = rendered["single-node-values"]
    (job,) = by_kind(docs, "Job")
    assert "completionMode" not in job["spec"] and not by_kind(docs, "Service")
    spec = job["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["command"] == ["bash", "resnet50/train_multinode.sh"]
    assert c["args"][:6] == ["--data", "/data", "--output", "/runs/resnet50", "--resume", "auto"]
    assert c["args"][6:] == ["--amp", "--profile", "90e"]
    assert env_of(c)["NNODES"] == "1" and env_of(c)["NPROC_PER_NODE"] == "8" and "MASTER_ADDR" not in env_of(c)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8 == c["resources"]["requests"]["nvidia.com/gpu"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    # Existing claims are used as they are, and none is created.
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v
    }
    assert claims == {"data": "imagenet", "runs": "convnets-runs"} and not by_kind(docs, "PersistentVolumeClaim")
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert job["spec"]["backoffLimit"] >= 1 and spec["restartPolicy"] == "OnFailure"


def test_multi_node_is_an_indexed_job_rendezvousing_at_pod_0(rendered):
    docs = rendered["multi-node-values"]
    (job,) = by_kind(docs, "Job")
    (svc,) = by_kind(docs, "Service")
    name = job["metadata"]["name"]
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 4
    assert job["spec"]["backoffLimit"] == 12 and job["spec"]["activeDeadlineSeconds"] == 604800
    spec = job["spec"]["template"]["spec"]
    # Pods get DNS names <job>-<index>.<service> through the headless Service, published before they are ready.
    assert spec["subdomain"] == svc["metadata"]["name"] == name
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    env = env_of(spec["containers"][0])
    assert env["MASTER_ADDR"] == f"{name}-0.{name}.{NAMESPACE}.svc"
    assert env["MASTER_PORT"] == "29500" == str(svc["spec"]["ports"][0]["port"])
    assert env["NNODES"] == "4" and env["MAX_RESTARTS"] == "3"
    # Tracking: the MLflow URI as MLflow's own variable, its credentials file from a Secret where MLflow's client
    # reads it (HOME is /tmp), TensorBoard on the runs volume.
    container = spec["containers"][0]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.mlops.svc:5000" and env["HOME"] == "/tmp"
    assert container["args"][-4:] == ["--mlflow", "--experiment", "resnet50-4x8", "--tensorboard"]
    assert {"name": "mlflow-credentials", "mountPath": "/tmp/.mlflow", "readOnly": True} in container["volumeMounts"]
    (secret,) = [v["secret"] for v in spec["volumes"] if v["name"] == "mlflow-credentials"]
    assert secret == {"secretName": "mlflow-credentials", "items": [{"key": "credentials", "path": "credentials"}]}
    assert spec["priorityClassName"] == "training-high"
    assert spec["affinity"]["podAntiAffinity"]
    # The chart creates the claims no existing one was named for.
    assert {p["metadata"]["name"] for p in by_kind(docs, "PersistentVolumeClaim")} == {
        f"{RELEASE}-convnets-data",
        f"{RELEASE}-convnets-runs",
    }


def test_pytorchjob_has_what_the_training_operator_requires(rendered):
    docs = rendered["pytorchjob-values"]
    (pj,) = by_kind(docs, "PyTorchJob")
    assert pj["apiVersion"] == "kubeflow.org/v1" and pj["metadata"]["namespace"] == NAMESPACE
    replicas = pj["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"}
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 1
    assert pj["spec"]["runPolicy"]["backoffLimit"] >= 1
    for role in replicas.values():
        assert role["restartPolicy"] in {"OnFailure", "Always", "ExitCode", "Never"}
        (c,) = role["template"]["spec"]["containers"]
        assert c["name"] == "pytorch"  # the operator finds the training container by this name
        assert c["command"] == ["bash", "mobilenet/train_multinode.sh"]
        assert "MASTER_ADDR" not in env_of(c)  # the operator sets it
        # Its pod spec passes the same Kubernetes schema as any pod's.
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": role["template"]["spec"]},
            KUBE_VERSION,
            strict=True,
        )
    (bench,) = by_kind(docs, "Job")
    c = bench["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["convnets", "benchmark"] and c["args"][-2] == "--json"
    assert c["args"][-1].startswith("/results/") and {"name": "results", "mountPath": "/results"} in c["volumeMounts"]


@pytest.mark.parametrize(
    "stem,image", [("serve-values", "convnets:"), ("triton-values", "nvcr.io/nvidia/tritonserver:")]
)
def test_serving(rendered, stem, image):
    docs = rendered[stem]
    assert not [d for d in docs if d["kind"] in ("Job", "PyTorchJob")]
    (dep,) = by_kind(docs, "Deployment")
    (svc,) = by_kind(docs, "Service")
    assert len(by_kind(docs, "PodDisruptionBudget")) == 1
    pod = dep["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    assert c["image"].startswith(image)
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert int(pod["metadata"]["annotations"]["prometheus.io/port"]) == ports["metrics" if "triton" in stem else "http"]
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    if stem == "serve-values":
        assert c["command"] == ["convnets", "serve"]
        assert c["args"] == ["--checkpoint", "/models/resnet50/model.pt", "--host", "0.0.0.0", "--port", "8000",
                             "--model-name", "resnet50", "--index", "/models/resnet50/index"]  # fmt: skip
        (hpa,) = by_kind(docs, "HorizontalPodAutoscaler")
        assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8) and "replicas" not in dep["spec"]
    else:
        assert c["command"] == ["tritonserver"] and "--model-repository=/models/triton" in c["args"]
        assert not by_kind(docs, "HorizontalPodAutoscaler") and dep["spec"]["replicas"] == 2


def test_every_pod_is_locked_down(rendered):
    pods = 0
    for name, docs in rendered.items():
        for doc in docs:
            if doc["kind"] not in ("Job", "Deployment", "PyTorchJob"):
                continue
            for spec in pod_specs(doc):
                pods += 1
                where = f"{name}: {doc['kind']} {doc['metadata']['name']}"
                assert spec["securityContext"]["runAsNonRoot"] is True, where
                assert spec["automountServiceAccountToken"] is False, where
                for c in spec["containers"]:
                    sc = c["securityContext"]
                    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, where
                    assert sc["capabilities"]["drop"] == ["ALL"], where
                    assert {"cpu", "memory"} <= set(c["resources"]["requests"]), where
                    # A read-only root needs a writable /tmp for caches.
                    assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]), where
    assert pods >= 6


@pytest.mark.parametrize(
    "values,message",
    [
        ({"train": {"nnodes": 0}}, "/train/nnodes"),
        ({"train": {"kind": "mpijob"}}, "/train/kind"),
        ({"serve": {"backend": "onnxruntime"}}, "/serve/backend"),
        ({"train": {"nprocPerNode": "8"}}, "/train/nprocPerNode"),
        ({"recipe": "alexnet"}, "/recipe"),
        ({"trian": {"nnodes": 2}}, "'trian' not allowed"),
        ({"tracking": {"mlflowUri": "mlflow:5000"}}, "/tracking/mlflowUri"),
    ],
)
def test_wrong_values_fail_with_the_schemas_message(values, message):
    with pytest.raises(helm.HelmValuesError, match="schema") as e:
        render(values)
    assert message in str(e.value)


def test_notes_say_how_to_follow_training_and_reach_the_service():
    out = helm.Chart.load(str(CHART)).render(
        {"train": {"nnodes": 2}, "serve": {"enabled": True}}, name=RELEASE, namespace=NAMESPACE, is_install=True
    )
    notes = out["convnets/templates/NOTES.txt"]
    assert f"kubectl -n {NAMESPACE} logs -f -l app.kubernetes.io/instance={RELEASE}" in notes
    assert f"port-forward svc/{RELEASE}-convnets-serve" in notes and "/v2/health/ready" in notes


def test_checkov_findings_are_fixed_or_accepted(rendered, tmp_path):
    checkov = tool("checkov")
    for name, docs in rendered.items():
        for i, doc in enumerate(docs):
            (tmp_path / f"{name}-{i}-{doc['kind']}.yaml").write_text(yaml.safe_dump(doc))
    shutil.copy(ROOT / "Dockerfile", tmp_path / "Dockerfile")
    # --skip-download: no network in CI; the checks themselves ship with checkov.
    proc = subprocess.run(
        [
            checkov,
            "-d",
            str(tmp_path),
            "--framework",
            "kubernetes",
            "dockerfile",
            "--quiet",
            "--compact",
            "--skip-download",
            "-o",
            "json",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=300,
    )
    reports = json.loads(proc.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert {r["check_type"] for r in reports} == {"kubernetes", "dockerfile"}, proc.stderr[-2000:]
    assert all(r["summary"]["parsing_errors"] == 0 for r in reports)
    failed = {(f["check_id"], Path(f["file_path"]).name) for r in reports for f in r["results"]["failed_checks"]}
    accepted = yaml.safe_load((ROOT / "helm" / "checkov-accepted.yaml").read_text())
    assert all(isinstance(reason, str) and len(reason) > 40 for reason in accepted.values())
    unexplained = sorted(f for f in failed if f[0] not in accepted)
    assert not unexplained, f"fix these or list them with a reason in helm/checkov-accepted.yaml: {unexplained}"
    stale = set(accepted) - {check for check, _ in failed}
    assert not stale, f"helm/checkov-accepted.yaml lists checks checkov no longer reports: {stale}"


def test_dockerfile_passes_hadolint_and_holds_what_the_image_needs():
    proc = subprocess.run([tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:" in text and "FROM ${BASE_IMAGE}" in text
    assert "github.com/NVIDIA/dllogger@${DLLOGGER_REF}" in text and "ARG DLLOGGER_REF=v" in text
    assert "WORKDIR /workspace" in text and "HEALTHCHECK" in text and "/v2/health/ready" in text
    user = [line for line in text.splitlines() if line.startswith("USER ")]
    assert user and not user[-1].split()[1].startswith(("root", "0"))


def test_dockerignore_keeps_data_runs_and_caches_out():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "data", "runs", "**/__pycache__", ".pytest_cache", ".ruff_cache", "*.pt"} <= ignored


def test_docker_compose_config_is_valid_with_gpus_shm_volumes_and_health():
    compose = tool("docker-compose")
    base = [compose, "-f", str(ROOT / "docker-compose.yml"), "--profile", "train", "--profile", "benchmark"]
    env = {**os.environ, "DATA_DIR": "/srv/imagenet"}
    check = subprocess.run([*base, "config", "-q"], capture_output=True, text=True, env=env)
    assert check.returncode == 0, check.stderr
    proc = subprocess.run([*base, "config", "--format", "json"], capture_output=True, text=True, env=env, check=True)
    services = json.loads(proc.stdout)["services"]
    assert set(services) == {"train", "serve", "benchmark"}
    assert len({s["image"] for s in services.values()}) == 1
    for s in services.values():
        (device,) = s["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert int(services["train"]["shm_size"]) >= 8 << 30  # bytes
    mounts = {v["target"]: v["source"] for v in services["train"]["volumes"]}
    assert mounts["/data"] == "/srv/imagenet" and "/workspace/runs" in mounts
    assert any(v["target"] == "/results" for v in services["benchmark"]["volumes"])
    assert services["serve"]["ports"][0]["target"] == 8000
    assert "/v2/health/ready" in " ".join(services["serve"]["healthcheck"]["test"])


def test_docker_compose_rejects_a_broken_file(tmp_path):
    broken = tmp_path / "docker-compose.yml"
    broken.write_text((ROOT / "docker-compose.yml").read_text().replace("shm_size: 32gb", "shm_size: [32gb]"))
    proc = subprocess.run([tool("docker-compose"), "-f", str(broken), "config", "-q"], capture_output=True, text=True)
    assert proc.returncode != 0 and "shm_size" in proc.stderr


def test_yaml_files_pass_yamllint():
    files = [ROOT / "docker-compose.yml", CHART / "Chart.yaml", CHART / "values.yaml", *CI_VALUES]
    files.append(ROOT / "helm" / "checkov-accepted.yaml")
    config = (
        "{extends: default, rules: {line-length: {max: 120}, document-start: disable, truthy: {check-keys: false}}}"
    )
    proc = subprocess.run([tool("yamllint"), "-s", "-d", config, *map(str, files)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", SLURM_SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_launcher_scripts_pass_bash_n_and_shellcheck(script):
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    proc = subprocess.run(
        [tool("shellcheck"), "--shell=bash", "-x", "--source-path=SCRIPTDIR", str(script)],
        capture_output=True,
        text=True,
        cwd=script.parent,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def fake_bin(tmp_path: Path, name: str, body: str) -> None:
    path = tmp_path / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def test_launch_sh_multi_node_uses_the_c10d_rendezvous(tmp_path):
    fake_bin(tmp_path, "python", 'printf "%s\\n" "$@"\n')
    env = {**os.environ, "PYTHON": str(tmp_path / "python"), "NNODES": "2", "MASTER_ADDR": "node0", "RDZV_ID": "j7"}
    out = subprocess.run(
        ["bash", str(ROOT / "common" / "launch.sh"), "8", "train", "--epochs", "1"],
        capture_output=True, text=True, env=env, check=True,
    ).stdout.split("\n")  # fmt: skip
    assert out[:2] == ["-m", "torch.distributed.run"]
    args = " ".join(out)
    assert "--nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint node0:29500 --rdzv-id j7" in args
    assert args.rstrip().endswith("-m common train --epochs 1")
    env.pop("MASTER_ADDR")
    proc = subprocess.run(["bash", str(ROOT / "common" / "launch.sh"), "8", "train"], capture_output=True, text=True,
                          env=env)  # fmt: skip
    assert proc.returncode != 0 and "MASTER_ADDR must be set" in proc.stderr


@pytest.mark.parametrize("recipe", ["resnet50", "mobilenet", "vgg"])
def test_launch_sh_says_when_several_processes_start_on_the_cpu(tmp_path, recipe):
    fake_bin(tmp_path, "python", 'printf "%s\\n" "$@"\n')
    env = {**os.environ, "PYTHON": str(tmp_path / "python")}
    env.pop("NNODES", None)

    def launch(script: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(ROOT / recipe / script), *args], capture_output=True, text=True, env=env,
                              check=True)  # fmt: skip

    eight = launch("train_8gpu.sh", "--epochs", "1")
    assert "--nproc-per-node\n8\n" in eight.stdout
    # The line is about this machine: CI with a GPU (the same probe as the recipes') must not print it.
    if Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidia0").exists():
        assert "no NVIDIA GPU found" not in eight.stderr
    else:
        (line,) = eight.stderr.splitlines()
        assert line.startswith("launch.sh: no NVIDIA GPU found") and "starting 8 processes on the CPU" in line
        assert "train_1gpu.sh" in line
    # One process, or --help (nothing starts), say nothing.
    assert launch("train_1gpu.sh", "--epochs", "1").stderr == ""
    assert "no NVIDIA GPU found" not in launch("train_8gpu.sh", "--help").stderr


def test_slurm_runs_one_task_per_node_with_the_rendezvous_at_the_first_node(tmp_path):
    # Fake Slurm commands: scontrol expands the node list, srun prints what it would run.
    fake_bin(tmp_path, "scontrol", 'printf "gpu-a07\\ngpu-a08\\ngpu-a09\\n"\n')
    fake_bin(
        tmp_path, "srun", 'printf "%s\\n" "$@"; env | grep -E "^(MASTER_ADDR|NNODES|NPROC_PER_NODE|RDZV_ID)=" | sort\n'
    )
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "gpu-a[07-09]", "SLURM_JOB_NUM_NODES": "3", "SLURM_GPUS_ON_NODE": "4",
           "SLURM_SUBMIT_DIR": str(ROOT), "CONTAINER_IMAGE": "nvcr.io#me/convnets:0.1.0",
           "CONTAINER_MOUNTS": "/data:/data"}  # fmt: skip
    sbatch = ROOT / "resnet50" / "train_slurm.sbatch"
    directives = [line for line in sbatch.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --ntasks-per-node=1" in directives
    out = subprocess.run(["bash", str(sbatch), "--data", "/data"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, check=True).stdout.splitlines()  # fmt: skip
    assert "--ntasks-per-node=1" in out and "--nodes=3" in out
    assert "--container-image=nvcr.io#me/convnets:0.1.0" in out and "--container-mounts=/data:/data" in out
    assert out[out.index("bash") + 1 :][:3] == ["resnet50/train_multinode.sh", "--data", "/data"]
    assert {"MASTER_ADDR=gpu-a07", "NNODES=3", "NPROC_PER_NODE=4", "RDZV_ID=slurm-4242"} <= set(out)


@pytest.mark.parametrize("recipe", ["resnet50", "mobilenet", "vgg"])
def test_every_recipe_has_a_slurm_script_through_the_shared_launcher(recipe):
    text = (ROOT / recipe / "train_slurm.sbatch").read_text()
    assert f'common/slurm.sh" {recipe}/train_multinode.sh' in text
    assert (ROOT / recipe / "train_multinode.sh").exists()
