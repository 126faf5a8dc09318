"""cluster/: the manifests parse, their recgpt command lines match the CLI, referenced files exist."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from configs import load_config
from launcher.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
SHARED = "/mnt/shared"


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _check_train_command(command: str, on_cluster: bool = True) -> None:
    """``python -m launcher train …`` / ``recgpt train …`` parses and its config loads, Ray on."""
    argv = shlex.split(command)
    if argv[:3] == ["python", "-m", "launcher"]:
        argv = argv[3:]
    else:
        assert argv[0] == "recgpt", command
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    assert args.command == "train"
    assert args.config and (REPO / args.config).is_file(), f"missing config {args.config}"
    cfg = load_config(REPO / args.config, args.overrides)  # unknown keys / bad values raise here
    assert cfg.ray.num_workers > 0, "these commands go through Ray Train"
    if not on_cluster:
        return
    assert cfg.ray.storage_path and cfg.ray.storage_path.startswith(SHARED), (
        "runs must land on shared storage"
    )
    assert cfg.data.shards.startswith(SHARED)


@pytest.mark.parametrize("name", sorted(p.name for p in CLUSTER.glob("*.yaml")))
def test_every_manifest_parses(name):
    assert isinstance(_load(name), dict)


def test_rayjob_runs_recgpt_with_auth_and_shared_storage():
    job = _load("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    _check_train_command(spec["entrypoint"])
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    assert tuple(int(x) for x in cluster["rayVersion"].split(".")[:2]) >= (2, 52)  # token auth needs 2.52+
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert "working_dir" in runtime_env
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:  # every node sees the same run directory
        mounts = [m["mountPath"] for c in pod["spec"]["containers"] for m in c.get("volumeMounts", [])]
        assert SHARED in mounts
    gpus = [
        c["resources"]["limits"].get("nvidia.com/gpu")
        for g in cluster["workerGroupSpecs"]
        for c in g["template"]["spec"]["containers"]
    ]
    assert all(gpus), "worker pods must request GPUs (the job sets ray.use_gpu=true)"


def test_cluster_launcher_has_gpu_workers_shared_mount_and_token():
    cfg = _load("ray-cluster-aws.yaml")
    assert cfg["provider"]["type"] == "aws"
    assert cfg["head_node_type"] in cfg["available_node_types"]
    workers = [n for k, n in cfg["available_node_types"].items() if k != cfg["head_node_type"]]
    assert any(re.match(r"(g\d|p\d)", n["node_config"]["InstanceType"]) for n in workers), (
        "no GPU instance type"
    )
    assert any(f"-v {SHARED}:{SHARED}" in o for o in cfg["docker"]["run_options"])
    assert any(SHARED in c for c in cfg["initialization_commands"])
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("RAY_AUTH_MODE=token" in c for c in cfg[key]), key


def test_runtime_env_keeps_the_working_dir_small():
    env = _load("runtime_env.yaml")
    assert set(env) <= {"working_dir", "excludes", "env_vars", "pip", "py_modules", "conda", "uv"}
    for heavy in (".venv", "runs", ".git"):
        assert heavy in env["excludes"]


def _train_commands(text: str) -> list[str]:
    """Complete train commands (with --config; prose like ``recgpt train …`` is skipped)."""
    # Join shell continuations (also inside YAML comments), then pick the train commands.
    joined = re.sub(r"\\\n#?\s*", " ", text)
    found = re.findall(r"(?:python -m launcher|recgpt) train [^\n`]*", joined)
    return [c.strip() for c in found if "--config" in c]


def _comments(path: Path) -> str:
    return "\n".join(line for line in path.read_text().splitlines() if line.lstrip().startswith("#"))


def test_commands_in_comments_and_docs_match_the_cli():
    """Every ``python -m launcher train`` / ``recgpt train`` line of docs/cluster.md and the YAML comments."""
    yaml_commands = [c for p in CLUSTER.glob("*.yaml") for c in _train_commands(_comments(p))]
    doc_commands = _train_commands((REPO / "docs" / "cluster.md").read_text())
    assert yaml_commands and doc_commands
    for c in yaml_commands:
        _check_train_command(c)
    for c in doc_commands:
        _check_train_command(c, on_cluster="/mnt/shared" in c)


# --------------------------------------------------------------------------- local_two_nodes.sh


def _two_nodes(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """``cluster/local_two_nodes.sh ARGS`` (only the cases that start no Ray: the real cluster is
    tests/test_ray_two_nodes.py's)."""
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        [str(CLUSTER / "local_two_nodes.sh"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )


def test_two_nodes_script_status_of_nothing_and_bad_input_one_line_exit_2(tmp_path):
    proc = _two_nodes("status", "--dir", "c", tmp_path=tmp_path)  # relative to the caller's directory
    assert (proc.returncode, proc.stdout.strip()) == (0, f"{tmp_path / 'c'}: not running"), proc.stderr
    cases = [
        (
            ("kill-node", "--dir", "c"),
            f"local_two_nodes kill-node: error: node_b: no running process under {tmp_path / 'c' / 'node_b'}",
        ),
        (
            ("add-node", "--dir", "c"),
            f"local_two_nodes add-node: error: {tmp_path / 'c'}: the head is not running",
        ),
        (("start", "--dir", "/tmp/" + "x" * 40), "local_two_nodes start: error: /tmp/xxxx"),
        (("start", "--head-cpus", "0"), "local_two_nodes start: error: --head-cpus: got 0, must be >= 1"),
        (
            ("start", "--object-store-mb", "10"),
            "local_two_nodes start: error: --object-store-mb: got 10, must be >= 75",
        ),
    ]
    for args, start in cases:
        proc = _two_nodes(*args, tmp_path=tmp_path)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(err) == 1 and err[0].startswith(start), (args, proc.stderr)
    assert not (tmp_path / "c").exists()  # nothing was started or created
