"""The cluster/ files parse and agree with the code: entry points, flags, resource names,
autoscaling, dashboard, Ray version, token auth, and the sizing example in cluster/README.md."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml

from conure_dist.resources import GiB, SizingInputs, plan_run, plan_worker

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
YAML_FILES = sorted(CLUSTER.rglob("*.yaml"))
TEXT_FILES = sorted(p for p in CLUSTER.rglob("*") if p.is_file())

# The flags the jobs accept (jobs/ttl.py, jobs/movielens.py).
JOB_FLAGS = {
    "--data", "--raw-ttl", "--run-dir", "--workers", "--gpus-per-worker", "--zero-stage",
    "--dry-run", "--demo", "--preset", "--out",
}
# Ray resources a worker of this project requests: exactly what plan_worker produces.
REQUESTED = set(plan_worker(SizingInputs(
    num_items=10, embed_dim=4, num_conv_layers=2, kernel_size=3, max_label_space=2,
    batch_size=2, seq_len=3, sample_ratio=0.5, zero_stage=0, num_workers=1,
    precision="bf16", use_gpu=True)).resources)
# Kubernetes container resources and what Ray makes of them.
K8S_TO_RAY = {"cpu": "CPU", "nvidia.com/gpu": "GPU", "memory": "memory"}


def load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def doc(kind: str) -> list[dict]:
    return [d for p in YAML_FILES if "kuberay" in p.parts for d in load(p) if d.get("kind") == kind]


def cluster_specs() -> list[dict]:
    """Every RayCluster spec: standalone ones and those embedded in RayJobs."""
    specs = [d["spec"] for d in doc("RayCluster")]
    specs += [d["spec"]["rayClusterSpec"] for d in doc("RayJob") if "rayClusterSpec" in d["spec"]]
    return specs


def launcher() -> dict:
    return load(CLUSTER / "aws.yaml")[0]


def commands(text: str) -> list[list[str]]:
    """`python jobs/X.py ...` invocations in a text, as argument lists (up to a line's end,
    with YAML folding and shell continuations undone)."""
    flat = text.replace("\\\n", " ")
    found = []
    for match in re.finditer(r"python (jobs/[\w/]+\.py)([^\n`'\"]*)", flat):
        found.append([match[1], *shlex.split(match[2].split("#")[0])])
    return found


def entrypoint_commands() -> list[list[str]]:
    cmds = []
    for path in TEXT_FILES:
        cmds += commands(path.read_text())
    for job in doc("RayJob"):  # folded YAML scalars: parse the value, not the file text
        cmds += commands(job["spec"]["entrypoint"])
    return cmds


def test_every_yaml_file_parses_and_the_expected_files_exist():
    names = {p.relative_to(CLUSTER).as_posix() for p in TEXT_FILES}
    assert {"aws.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "README.md", "Dockerfile"} <= names
    for path in YAML_FILES:
        assert load(path), f"{path} is empty"


def test_launcher_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(launcher()))


def test_entry_points_are_the_projects_jobs():
    cmds = entrypoint_commands()
    named = {c[0] for c in cmds}
    assert {"jobs/ttl.py", "jobs/movielens.py"} <= named
    for c in doc("RayJob"):
        assert c["spec"]["entrypoint"].split()[:2][1].startswith("jobs/")


def test_entry_point_files_exist():
    if not any((REPO / "jobs").glob("*.py")):
        pytest.skip("jobs/ has no entry points yet")
    for path in sorted({c[0] for c in entrypoint_commands()}):
        assert (REPO / path).is_file(), f"cluster/ runs {path}, which is not in the repository"


def test_entry_point_flags_are_ones_the_jobs_accept():
    for cmd in entrypoint_commands():
        flags = {a.split("=")[0] for a in cmd[1:] if a.startswith("--")}
        assert flags <= JOB_FLAGS, f"{cmd[0]}: unknown flags {sorted(flags - JOB_FLAGS)}"


def _job_module(path: Path):
    spec = importlib.util.spec_from_file_location(f"cluster_check_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_entry_point_commands_parse_with_the_jobs_own_arguments():
    """Once a job exists, its own argument parser accepts every command cluster/ runs."""
    cmds = [c for c in entrypoint_commands() if (REPO / c[0]).is_file()]
    if not cmds:
        pytest.skip("no entry point of cluster/ exists in jobs/ yet")
    for cmd in cmds:
        job = _job_module(REPO / cmd[0])
        assert hasattr(job, "get_args"), f"{cmd[0]} has no get_args(argv)"
        try:
            args = job.get_args(cmd[1:])
        except SystemExit as exc:
            pytest.fail(f"{cmd[0]} rejects {' '.join(cmd[1:])} (exit {exc.code})")
        if "--zero-stage" in cmd:
            assert args.zero_stage == int(cmd[cmd.index("--zero-stage") + 1])


def test_zero_stage_and_workers_values_are_valid():
    for cmd in entrypoint_commands():
        args = dict(zip(cmd[1:], cmd[2:]))
        if "--zero-stage" in args:
            assert args["--zero-stage"] in {"0", "1", "2"}
        if "--workers" in args:
            assert int(args["--workers"]) >= 1
        if "--gpus-per-worker" in args:  # one DeepSpeed process drives one GPU
            assert 0 < float(args["--gpus-per-worker"]) <= 1


def test_requested_resources_are_rays_builtin_names():
    assert REQUESTED == {"CPU", "GPU", "memory"}


def test_launcher_resources_are_those_the_code_requests():
    for name, node in launcher()["available_node_types"].items():
        assert set(node["resources"]) <= REQUESTED, f"{name}: {sorted(node['resources'])}"


def test_kuberay_resources_map_to_those_the_code_requests():
    for spec in cluster_specs():
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            params = group.get("rayStartParams") or {}
            assert "resources" not in params, "custom Ray resources are not requested by the code"
            for container in group["template"]["spec"]["containers"]:
                for kind in ("limits", "requests"):
                    keys = set(container["resources"][kind])
                    assert keys <= set(K8S_TO_RAY), f"{container['name']}: {sorted(keys)}"
                    assert {K8S_TO_RAY[k] for k in keys} <= REQUESTED


def test_launcher_has_an_autoscaling_gpu_worker_group():
    config = launcher()
    gpu_groups = {
        name: node for name, node in config["available_node_types"].items()
        if node["resources"].get("GPU", 0) > 0 and name != config["head_node_type"]
    }
    assert gpu_groups
    for name, node in gpu_groups.items():
        assert node["min_workers"] < node["max_workers"], name
        assert node["max_workers"] <= config["max_workers"], name


def test_kuberay_autoscaler_is_on_with_a_scalable_gpu_group():
    specs = cluster_specs()
    assert len(specs) >= 2  # raycluster.yaml and the TTL RayJob's own cluster
    for spec in specs:
        assert spec["enableInTreeAutoscaling"] is True
        gpu = [g for g in spec["workerGroupSpecs"]
               if any("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])]
        assert gpu
        for group in gpu:
            assert group["minReplicas"] < group["maxReplicas"]


def test_head_starts_ray_with_the_dashboard():
    head = " ".join(launcher()["head_start_ray_commands"])
    assert "ray start --head" in head
    assert "--include-dashboard=true" in head and "--dashboard-host=0.0.0.0" in head
    for spec in cluster_specs():
        assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"


def test_images_ship_ray_default_at_the_pinned_version():
    pinned = re.search(r"^ray==([\d.]+)$", (REPO / "constraints-cpu.txt").read_text(), re.M)[1]
    assert launcher()["docker"]["image"].startswith(f"rayproject/ray:{pinned}-")
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(pinned)}-\S*gpu", dockerfile, re.M)
    for spec in cluster_specs():
        assert spec["rayVersion"] == pinned
    # rayproject/ray images carry ray[default]; so must the package the nodes install.
    assert "default" in re.search(r'"ray\[([\w,]+)\]', (REPO / "pyproject.toml").read_text())[1]


def test_nodes_install_the_package():
    setup = " ".join(launcher()["setup_commands"])
    mounts = launcher()["file_mounts"]
    target = next(remote for remote, local in mounts.items() if local == ".")
    assert f"pip install --no-cache-dir -c {target}/cluster/constraints-gpu.txt -e {target}" in setup
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    workdir = re.search(r"^WORKDIR (\S+)", dockerfile, re.M)[1]
    assert "pip install --no-cache-dir -c cluster/constraints-gpu.txt -e ." in dockerfile
    for job in doc("RayJob"):
        assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["working_dir"] == workdir


def test_gpu_images_install_the_versions_the_project_is_tested_with():
    """cluster/constraints-gpu.txt pins what constraints-cpu.txt pins (torch: its CUDA build)."""
    gpu = dict(line.split("==") for line in (CLUSTER / "constraints-gpu.txt").read_text().splitlines()
               if "==" in line and not line.startswith("#"))
    cpu = dict(line.split("==") for line in (REPO / "constraints-cpu.txt").read_text().splitlines()
               if "==" in line and not line.startswith("#"))
    for name, version in cpu.items():
        assert gpu[name] == version.replace("+cpu", ""), name
    assert "omegaconf" in gpu and "safetensors" in gpu


def test_token_auth_everywhere():
    config = launcher()
    for cmd in (config["head_start_ray_commands"][-1], config["worker_start_ray_commands"][-1]):
        assert "RAY_AUTH_MODE=token" in cmd
    assert any(remote.endswith(".ray/auth_token") for remote in config["file_mounts"])
    for spec in cluster_specs():
        assert spec["authOptions"]["mode"] == "token"


def test_run_directories_are_on_shared_storage():
    for cmd in entrypoint_commands():
        args = dict(zip(cmd[1:], cmd[2:]))
        if "--run-dir" in args:
            assert re.match(r"(s3|gs)://", args["--run-dir"]), cmd


TTL_EXAMPLE = SizingInputs(
    num_items=646_000, embed_dim=256, num_conv_layers=16, kernel_size=3,
    max_label_space=18_000, total_label_space=26_016, batch_size=32, seq_len=100,
    sample_ratio=0.2, zero_stage=2, num_workers=4, precision="bf16", use_gpu=True,
)


def test_readme_example_is_what_plan_run_prints():
    text = (CLUSTER / "README.md").read_text()
    block = re.search(r"<!-- plan:ttl-zero2-4 .*?-->\n```\n(.*?)\n```", text, re.S)
    assert block, "the worked example block is missing"
    table = plan_run(TTL_EXAMPLE, later_batch_size=512, gpu_memory_bytes=24 * GiB).table()
    assert block[1] == table


def test_gpu_nodes_fit_the_ttl_example_worker():
    """The A10G group of aws.yaml and the KubeRay GPU pods can host a TTL worker."""
    plan = plan_run(TTL_EXAMPLE, later_batch_size=512, gpu_memory_bytes=24 * GiB)
    node = launcher()["available_node_types"]["gpu_a10g"]["resources"]
    assert node["memory"] >= plan.resources["memory"] and node["CPU"] >= plan.resources["CPU"]
    assert node["GPU"] >= plan.resources["GPU"]
    for spec in cluster_specs():
        for group in spec["workerGroupSpecs"]:
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert float(limits["cpu"]) >= plan.resources["CPU"]
            assert int(limits["memory"].removesuffix("Gi")) * GiB >= plan.resources["memory"]
