"""Shared session fixtures: the bundled sample's shards (built once) and tiny 2-process training runs.

Every 2-process launch pays 15-25 s of imports on a small machine, so runs are shared: a test that
needs "a ZeRO-3 LoRA run" asks for the fixture instead of training again. Launch helpers run the real
CLI (``torchrun --standalone --no-python --nproc_per_node N recgpt train …``) in a subprocess with
``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from trainer.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "ml-latest-small.zip"
BIN = Path(sys.executable).parent
TINY = REPO / "configs" / "tiny.yaml"
BUCKET = "recgpt-test"

# The shared tiny runs: 30 steps of 2 x 32 sequences, evaluated and checkpointed every 10 steps, every
# step logged (exact-resume comparisons read train_log.jsonl).
RUN_STEPS = [
    "train.max_steps=30",
    "train.eval_interval=10",
    "train.checkpoint_interval=10",
    "train.log_interval=1",
]


def subprocess_env(fault: str | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RECGPT_FAULT", None)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    env.update(TOKENIZERS_PARALLELISM="false")
    if fault:
        env["RECGPT_FAULT"] = fault
    env.update(extra)
    return env


def recgpt_train(
    shards: Path,
    out_dir: Path,
    overrides: list[str] = (),
    nproc: int = 2,
    fault: str | None = None,
    timeout: int = 600,
) -> subprocess.CompletedProcess:
    """``recgpt train --config configs/tiny.yaml`` on ``shards`` into ``out_dir``; never raises on failure.

    ``nproc`` > 1 launches under torchrun (``--standalone`` picks a free rendezvous port); 1 runs the
    plain ``recgpt`` process (the trainer creates its own 1-process group)."""
    args = [
        "train",
        "--config",
        str(TINY),
        f"data.shards={shards}",
        f"train.output_dir={out_dir}",
        *overrides,
    ]
    if nproc > 1:
        cmd = [
            str(BIN / "torchrun"),
            "--standalone",
            "--no-python",
            f"--nproc_per_node={nproc}",
            "recgpt",
            *args,
        ]
    else:
        cmd = [str(BIN / "recgpt"), *args]
    return subprocess.run(
        cmd, cwd=REPO, env=subprocess_env(fault), capture_output=True, text=True, timeout=timeout
    )


def torchrun_two_hosts(
    shards: str | Path, out: str | Path, overrides: list[str], logdir: Path, fault: str | None = None
) -> tuple[int, str, str]:
    """``recgpt train --config configs/tiny.yaml`` as two torchrun "hosts" of one process each
    (``--nnodes 2``, c10d rendezvous on loopback, two launchers, GROUP_RANK 0 and 1), as on two
    machines. Returns (worst exit code, both stdouts, both stderrs); logs in ``logdir/node{0,1}.*``."""
    port = free_port()
    procs, logs = [], []
    for node in (0, 1):
        cmd = [
            str(BIN / "torchrun"), "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=e2e-{port}",
            f"--rdzv_conf=is_host={'true' if node == 0 else 'false'}", "--max_restarts=0", "--no-python",
            "recgpt", "train", "--config", str(TINY), f"data.shards={shards}", f"train.output_dir={out}",
            *overrides,
        ]  # fmt: skip
        o, e = open(logdir / f"node{node}.out", "w+"), open(logdir / f"node{node}.err", "w+")
        logs.append((o, e))
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(fault), stdout=o, stderr=e, text=True)
        )
    codes = [p.wait(timeout=600) for p in procs]
    texts = []
    for o, e in logs:
        o.seek(0), e.seek(0)
        texts.append((o.read(), e.read()))
        o.close(), e.close()
    return max(codes, key=abs), "".join(t[0] for t in texts), "".join(t[1] for t in texts)


def train_log(run_dir: Path) -> list[dict]:
    """Records of ``train_log.jsonl`` (rank 0), in order."""
    path = run_dir / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def losses(records: list[dict]) -> dict[int, float]:
    """Step -> training loss; a step logged twice (a killed run, then its resume) keeps the last value."""
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


@dataclass
class Run:
    dir: Path
    proc: subprocess.CompletedProcess
    log: list[dict]

    @property
    def metrics(self) -> dict:
        return json.loads((self.dir / "metrics.json").read_text())


def _checked_run(shards: Path, out_dir: Path, overrides: list[str], fault: str | None = None) -> Run:
    proc = recgpt_train(shards, out_dir, overrides, fault=fault)
    assert proc.returncode == 0, (
        f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return Run(out_dir, proc, train_log(out_dir))


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory) -> Path:
    """The bundled MovieLens sample as shards (610 users, 9,724 items), built once per session."""
    from launcher.cli import main

    out = tmp_path_factory.mktemp("shards") / "ml-latest-small"
    assert main(["shards", "build", str(SAMPLE), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def zero0_run(sample_shards, tmp_path_factory) -> Run:
    """Full tuning, ZeRO-0, fp32, 2 processes, 30 steps: the uninterrupted reference run."""
    return _checked_run(sample_shards, tmp_path_factory.mktemp("zero0") / "run", [*RUN_STEPS, "zero.stage=0"])


@pytest.fixture(scope="session")
def zero2_run(sample_shards, tmp_path_factory) -> Run:
    """Full tuning + FGM (after 5 clean steps, robust metrics at eval), ZeRO-2, 2 processes, 30 steps,
    keep_last=1. The ascent's autograd.grad must not start ZeRO-2's gradient reduction."""
    overrides = [
        *RUN_STEPS,
        "zero.stage=2",
        "train.keep_last=1",
        "adversarial.method=fgm",
        "adversarial.warmup_steps=5",
        "adversarial.eval_epsilon=0.5",
    ]
    return _checked_run(sample_shards, tmp_path_factory.mktemp("zero2") / "run", overrides)


@pytest.fixture(scope="session")
def zero3_lora_pgd_run(sample_shards, tmp_path_factory) -> Run:
    """LoRA + PGD (after 5 clean steps), ZeRO-3, 2 processes, 30 steps; rank 1's loss is NaN once at
    step 8 (its micro-batch adds no gradient, rank 0's does, and training goes on)."""
    overrides = [
        *RUN_STEPS,
        "zero.stage=3",
        "lora.enabled=true",
        "optim.lr=0.01",
        "adversarial.method=pgd",
        "adversarial.steps=2",
        "adversarial.warmup_steps=5",
    ]
    return _checked_run(sample_shards, tmp_path_factory.mktemp("zero3") / "run", overrides, fault="nan:8:1")


# --------------------------------------------------------------------------- an S3 server (moto)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on loopback with auth on; AWS_* variables set for this module's tests and their
    subprocesses (restored afterwards)."""
    import boto3  # test-only: the IAM user of the fake account (recgpt itself uses fsspec/s3fs)

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    # The first 3 requests (create the user, its policy and its key) go unauthenticated; then every
    # request must be signed with a key moto issued.
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    server = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log, env=env
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not start (exit {server.poll()}); see {log.name}")
                time.sleep(0.2)
        iam = boto3.client(
            "iam",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="x",
            aws_secret_access_key="x",
        )
        iam.create_user(UserName="recgpt")
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.put_user_policy(UserName="recgpt", PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="recgpt")["AccessKey"]
        env = {
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        saved = {k: os.environ.get(k) for k in [*env, "AWS_MAX_ATTEMPTS", "AWS_SESSION_TOKEN", "AWS_PROFILE"]}
        for k in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
            os.environ.pop(k, None)
        os.environ.update(env)
        from data_shards import storage

        fs, _ = storage.filesystem(f"s3://{BUCKET}")
        fs.mkdir(BUCKET)
        yield env
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
