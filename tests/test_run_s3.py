"""A run directory on an object store (``train.output_dir=s3://…``, :mod:`trainer.remote`), against
the moto S3 server of tests/conftest.py (auth on): checkpoints, pointers and logs land in the store; a
second run resumes from the store exactly; a process killed between uploading a checkpoint's files and
its ``COMPLETE`` leaves it invisible, and the next run resumes from the previous one."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from data_shards import storage
from tests.conftest import (
    BIN,
    BUCKET,
    REPO,
    SAMPLE,
    TINY,
    losses,
    recgpt_train,
    subprocess_env,
    torchrun_two_hosts,
    train_log,
)

pytestmark = [pytest.mark.s3, pytest.mark.slow]

# 1 process, checkpoints every 3 steps, every step logged, a constant learning rate (a run resumed with a
# larger train.max_steps then continues exactly like a longer uninterrupted run).
STEPS = [
    "train.checkpoint_interval=3",
    "train.eval_interval=0",
    "train.log_interval=1",
    "data.num_workers=0",
    "schedule.decay=constant",
    "schedule.warmup_steps=0",
]


def _log(url: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_bytes(f"{url}/train_log.jsonl").decode().splitlines()]


def _metrics(url: str) -> dict:
    return json.loads(storage.read_bytes(f"{url}/metrics.json"))


def _train(shards, out, steps: int, fault: str | None = None, nproc: int = 1, more: tuple[str, ...] = ()):
    t0 = time.perf_counter()
    p = recgpt_train(shards, out, [*STEPS, f"train.max_steps={steps}", *more], nproc=nproc, fault=fault)
    return p, time.perf_counter() - t0


@pytest.fixture(scope="module")
def reference(sample_shards, tmp_path_factory):
    """The uninterrupted 6-step run in a local run directory."""
    out = tmp_path_factory.mktemp("local") / "run"
    p, seconds = _train(sample_shards, out, 6)
    assert p.returncode == 0, p.stderr[-4000:]
    print(f"local 6-step run: {seconds:.1f} s")
    return out


def _same_as_reference(reference, url: str) -> None:
    ref = losses([json.loads(x) for x in (reference / "train_log.jsonl").read_text().splitlines()])
    got = losses(_log(url))
    assert sorted(got) == list(range(1, 7))
    for s in range(1, 7):
        assert got[s] == pytest.approx(ref[s], abs=1e-6), s
    want, final = json.loads((reference / "metrics.json").read_text()), _metrics(url)
    for k, v in want.items():
        if not k.startswith("best"):  # the resumed run also evaluated its first run's last step
            assert final[k] == (pytest.approx(v, abs=1e-9) if isinstance(v, float) else v), k


def _tensorboard_loss_steps(url: str) -> list[int]:
    """Steps of the train loss as TensorBoard reads them from ``url/tensorboard`` in the store (its own
    boto3 client, the same AWS_* variables; S3_ENDPOINT is what older TensorBoards read instead)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    os.environ["S3_ENDPOINT"] = os.environ["AWS_ENDPOINT_URL"]
    try:
        acc = EventAccumulator(f"{url}/tensorboard")
        acc.Reload()
    finally:
        os.environ.pop("S3_ENDPOINT")
    loss_tag = next(t for t in acc.Tags()["scalars"] if t.endswith("/loss"))
    return [e.step for e in acc.Scalars(loss_tag)]


RESUMED = f"s3://{BUCKET}/runs/resume"


@pytest.fixture(scope="module")
def s3_run(s3, sample_shards) -> tuple[str, float]:
    """A 3-step run straight to the store: (its URL, seconds)."""
    p1, t1 = _train(sample_shards, RESUMED, 3)
    assert p1.returncode == 0, p1.stderr[-4000:]
    return RESUMED, t1


def test_train_to_s3_then_resume_with_more_steps(s3, s3_run, sample_shards, reference):
    url, t1 = s3_run
    root = f"{url}/checkpoints"
    assert storage.read_bytes(f"{root}/latest").decode() == "step_00000003"
    doc = json.loads(storage.read_bytes(f"{root}/step_00000003/COMPLETE"))
    for rel, entry in doc["files"].items():  # every listed file is in the store with its size
        assert storage.size(f"{root}/step_00000003/{rel}") == entry["bytes"], rel
    assert storage.listdir(url) >= [
        "checkpoints",
        "config.yaml",
        "metrics.json",
        "tensorboard",
        "train_log.jsonl",
    ]
    assert _tensorboard_loss_steps(url) == [1, 2, 3]  # TensorBoard reads the run straight from the store
    secret = s3["AWS_SECRET_ACCESS_KEY"]
    for name in ("config.yaml", "train_log.jsonl", "checkpoints/step_00000003/config.yaml"):
        assert secret not in storage.read_bytes(f"{url}/{name}").decode(), name

    p2, t2 = _train(sample_shards, url, 6)
    assert p2.returncode == 0, p2.stderr[-4000:]
    assert "resumed from" in p2.stdout and "at step 3" in p2.stdout
    assert storage.read_bytes(f"{root}/latest").decode() == "step_00000006"
    _same_as_reference(reference, url)
    print(f"s3 runs: 3 steps {t1:.1f} s, resumed to 6 steps {t2:.1f} s")
    assert (
        f"resumed from {root}/step_00000003 at step 3" in p2.stdout
    )  # the store's URL, not the staging copy
    # Step 3 belongs to the checkpoint the second run resumed from: kept, not purged.
    assert _tensorboard_loss_steps(url) == [1, 2, 3, 4, 5, 6]

    # Bit rot in the store: step 6's RNG state changes; the next run skips it (one line naming the object
    # and the file), resumes from step 3 and ends exactly as before.
    with storage.open_write(f"{root}/step_00000006/rng/rank_00000.pt") as f:
        f.write(b"garbage")
    p3, _ = _train(sample_shards, url, 6)
    assert p3.returncode == 0, p3.stderr[-4000:]
    assert f"{root}/step_00000006: damaged checkpoint (rng/rank_00000.pt: 7 bytes" in p3.stderr
    assert "at step 3" in p3.stdout
    _same_as_reference(reference, url)
    assert storage.size(f"{root}/step_00000006/rng/rank_00000.pt") > 7  # rewritten whole


def test_kill_between_upload_and_complete_resumes_from_the_previous_checkpoint(s3, sample_shards, reference):
    url = f"s3://{BUCKET}/runs/killed"
    root = f"{url}/checkpoints"
    p1, _ = _train(sample_shards, url, 6, fault="kill_during_upload:6:0")
    assert p1.returncode != 0
    assert storage.read_bytes(f"{root}/latest").decode() == "step_00000003"
    half = f"{root}/step_00000006"
    assert storage.exists(f"{half}/trainer_state.json") and not storage.exists(f"{half}/COMPLETE")

    p2, _ = _train(sample_shards, url, 6, more=("train.keep_last=1",))
    assert p2.returncode == 0, p2.stderr[-4000:]
    assert "at step 3" in p2.stdout
    assert storage.exists(f"{half}/COMPLETE")
    assert storage.read_bytes(f"{root}/latest").decode() == "step_00000006"
    # keep_last=1: the previous checkpoint was deleted from the store once step 6 was published.
    assert [n for n in storage.listdir(root) if n.startswith("step_")] == ["step_00000006"]
    _same_as_reference(reference, url)


def test_two_ranks_killed_mid_upload_resume_from_the_previous_checkpoint(s3, sample_shards):
    url = f"s3://{BUCKET}/runs/killed2"
    root = f"{url}/checkpoints"
    p1, _ = _train(sample_shards, url, 6, fault="kill_during_upload:6:1", nproc=2)
    assert p1.returncode != 0
    assert storage.read_bytes(f"{root}/latest").decode() == "step_00000003"
    assert not storage.exists(f"{root}/step_00000006/COMPLETE")
    p2, _ = _train(sample_shards, url, 6, nproc=2)
    assert p2.returncode == 0, p2.stderr[-4000:]
    assert "at step 3" in p2.stdout
    assert storage.read_bytes(f"{root}/latest").decode() == "step_00000006"
    doc = json.loads(storage.read_bytes(f"{root}/step_00000006/COMPLETE"))
    assert doc["world_size"] == 2 and "rng/rank_00001.pt" in doc["files"]


def test_resume_from_a_checkpoint_in_the_store(s3_run, sample_shards):
    url, _ = s3_run
    p = recgpt_train(sample_shards, f"s3://{BUCKET}/runs/branch",
                     [*STEPS, "train.max_steps=4", f"train.resume={url}/checkpoints/step_00000003"], nproc=1)  # fmt: skip
    assert p.returncode == 0, p.stderr[-4000:]
    assert "at step 3" in p.stdout
    assert storage.read_bytes(f"s3://{BUCKET}/runs/branch/checkpoints/latest").decode() == "step_00000004"


def test_export_and_evaluate_a_checkpoint_in_the_store(s3_run, tmp_path, capsys):
    from launcher.cli import main

    url, _ = s3_run
    env = dict(os.environ)
    try:
        assert main(["export", "--checkpoint", url, "--out", str(tmp_path / "export")]) == 0
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert out["source_checkpoint"].startswith(f"{url}/checkpoints/step_")
        assert main(["evaluate", "--checkpoint", f"{url}/checkpoints/step_00000003", "--split", "valid"]) == 0
        line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert line["checkpoint"] == f"{url}/checkpoints/step_00000003" and line["step"] == 3
    finally:
        os.environ.clear()
        os.environ.update(env)


def test_unknown_bucket_is_one_line(s3, sample_shards):
    p = recgpt_train(sample_shards, "s3://no-such-bucket/run", [*STEPS, "train.max_steps=1"], nproc=1)
    assert p.returncode == 2, p.stderr[-4000:]
    assert "s3://no-such-bucket" in p.stderr and "does not exist" in p.stderr
    assert "Traceback" not in p.stderr and s3["AWS_SECRET_ACCESS_KEY"] not in p.stderr + p.stdout


# --------------------------------------------------------------------------- end to end, two nodes


@pytest.fixture(scope="module")
def reference2(sample_shards, tmp_path_factory):
    """The uninterrupted 6-step run of 2 processes on one node, in a local run directory."""
    out = tmp_path_factory.mktemp("local2") / "run"
    p, _ = _train(sample_shards, out, 6, nproc=2)
    assert p.returncode == 0, p.stderr[-4000:]
    return out


def test_end_to_end_two_nodes_s3_shards_kill_mid_upload_resume_export_recommend(
    s3, reference2, tmp_path, capsys
):
    """build to s3:// → 2 ranks on 2 "nodes" reading s3:// shards, writing s3:// checkpoints (each rank
    uploads its own files) → rank 1 SIGKILLed during the step-6 upload → resume from the store, exactly
    → export from s3:// to s3:// → recommend and evaluate from the export in the store."""
    from launcher.cli import main

    shards = f"s3://{BUCKET}/e2e/shards"
    assert main(["shards", "build", str(SAMPLE), "--out", shards]) == 0
    url = f"s3://{BUCKET}/e2e/run"
    root = f"{url}/checkpoints"

    code, out, err = torchrun_two_hosts(
        shards, url, [*STEPS, "train.max_steps=6"], tmp_path, fault="kill_during_upload:6:1"
    )
    assert code != 0
    assert storage.read_bytes(f"{root}/latest").decode() == "step_00000003"
    half = f"{root}/step_00000006"
    assert not storage.exists(f"{half}/COMPLETE")
    # Rank 1 (the other node) uploaded its own files before it was killed: its staging dir has them.
    assert storage.exists(f"{half}/rng/rank_00001.pt") and storage.exists(f"{half}/reader/rank_00001.json")
    doc = json.loads(storage.read_bytes(f"{root}/step_00000003/COMPLETE"))
    assert doc["world_size"] == 2 and "rng/rank_00001.pt" in doc["files"]
    assert "per rank" in out  # "checkpoint step_00000003 mirrored to … (… MiB; per rank a, b MiB; … s)"

    code, out, err = torchrun_two_hosts(shards, url, [*STEPS, "train.max_steps=6"], tmp_path)
    assert code == 0, err[-4000:]
    assert "at step 3" in out
    assert storage.read_bytes(f"{root}/latest").decode() == "step_00000006"
    want, got = losses(train_log(reference2)), losses(_log(url))
    assert sorted(got) == list(range(1, 7))
    for s in range(1, 7):
        assert got[s] == pytest.approx(want[s], abs=1e-6), s
    secret = s3["AWS_SECRET_ACCESS_KEY"]
    assert secret not in out + err

    export = f"s3://{BUCKET}/e2e/export"
    env = dict(os.environ)
    try:
        capsys.readouterr()
        assert main(["export", "--checkpoint", url, "--out", export]) == 0
        line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert line["out"] == export and line["step"] == 6
        assert storage.exists(f"{export}/export_manifest.json")
        assert [n for n in storage.listdir(f"s3://{BUCKET}/e2e") if ".tmp-" in n] == []  # staging prefix gone
        assert main(["export", "--checkpoint", url, "--out", export]) == 2  # exists: refused without --force
        assert "already exists" in capsys.readouterr().err

        items = [json.loads(x) for x in storage.read_bytes(f"{export}/items.jsonl").decode().splitlines()]
        history = ",".join(str(it["item_id"]) for it in items[:3])
        assert main(["recommend", "--model", export, "--history", history, "-k", "5", "--json"]) == 0
        rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert len(rec["recommendations"]) == 5 and rec["history"] == [it["item_id"] for it in items[:3]]
        assert not {r["item_id"] for r in rec["recommendations"]} & set(rec["history"])

        assert main(["evaluate", "--model", export, "--split", "valid", "--data", shards]) == 0
        from_export = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert main(["evaluate", "--checkpoint", url, "--split", "valid"]) == 0
        from_ckpt = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert from_export["ndcg@10"] == pytest.approx(from_ckpt["ndcg@10"], abs=1e-6)
        assert main(["recommend", "--model", f"s3://{BUCKET}/e2e/nothing", "--history", history]) == 2
        assert "no published export" in capsys.readouterr().err
    finally:
        os.environ.clear()
        os.environ.update(env)


@pytest.mark.ray
def test_ray_train_with_storage_path_in_the_store(s3, sample_shards, reference2):
    """``ray.storage_path=s3://…``: Ray's own files and recgpt's run (checkpoints, logs) under one prefix,
    through the storage layer's filesystem; the 2 Ray workers train exactly as 2 torchrun processes."""
    from launcher.ray_launch import RAY_SNAPSHOT

    url = f"s3://{BUCKET}/ray"
    env = subprocess_env(RAY_USAGE_STATS_ENABLED="0", DS_ACCELERATOR="cpu")
    for k in ("RAY_ADDRESS", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = [str(BIN / "recgpt"), "train", "--config", str(TINY), f"data.shards={sample_shards}", *STEPS,
           "train.max_steps=6", f"ray.storage_path={url}", "ray.name=run", "ray.num_workers=2"]  # fmt: skip
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    final = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith('{"final_metrics"')][-1])
    assert final["final_metrics"]["step"] == 6
    run = f"{url}/run"
    assert storage.read_bytes(f"{run}/checkpoints/latest").decode() == "step_00000006"
    assert storage.exists(f"{run}/checkpoints/step_00000006/COMPLETE") and storage.exists(
        f"{run}/{RAY_SNAPSHOT}"
    )
    want, got = losses(train_log(reference2)), losses(_log(run))
    assert sorted(got) == list(range(1, 7))
    for s in range(1, 7):
        assert got[s] == pytest.approx(want[s], abs=1e-6), s
    assert s3["AWS_SECRET_ACCESS_KEY"] not in p.stdout + p.stderr


def test_logs_up_to_a_checkpoint_are_in_the_store_with_it(s3, sample_shards):
    """A crash between log syncs (log_interval 10) right after a checkpoint: the store's train_log.jsonl
    already holds that checkpoint's evaluation, and the resumed run continues it."""
    url = f"s3://{BUCKET}/runs/logs"
    more = ("train.log_interval=10", "train.eval_interval=3")
    p1, _ = _train(sample_shards, url, 6, fault="kill:4:0", more=more)
    assert p1.returncode != 0
    evals = [r["step"] for r in _log(url) if r["kind"] == "eval"]
    assert evals == [3]
    p2, _ = _train(sample_shards, url, 6, more=more)
    assert p2.returncode == 0, p2.stderr[-4000:]
    assert [r["step"] for r in _log(url) if r["kind"] == "eval"] == [3, 6]
