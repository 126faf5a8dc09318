"""``recgpt shards build --engine ray`` (launcher/ray_shards.py driving data_shards/partitioned.py on Ray
Data) writes what the local engine writes: the same manifest (the engine setting aside), items,
histories and every shard's bytes, hence the same records in the same order per split — on the bundled
sample (read on the driver by the local engine's readers, the rest on Ray Data), on a synthetic Parquet
log read by the Ray workers (duplicates, ties, several k-core rounds, windows, prefix records, kept
duplicates), and from and to S3 (moto). Bad input is the local engine's one line and exit 2.

The Ray builds run the command line as a user does, in a subprocess: against one private head of 2 CPUs
for the module (``ray start --head`` with its own HOME, auth token — RAY_AUTH_MODE=token — and temp dir;
``RAY_ADDRESS`` names it), and once starting a local Ray of its own (``--engine-threads 2``). Teardown
kills exactly the processes under the head's temp dir, never ``ray stop``. The local builds run here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_shards import storage
from launcher.cli import main
from tests.conftest import BUCKET, SAMPLE
from tests.test_columnar import SAMPLE_FINGERPRINT, _synthetic_module, both, build_with, records

pytestmark = [pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def head(s3):
    """The private head. Started after ``s3``: it and its workers have the moto server's AWS variables,
    as a cluster's nodes would have the store's."""
    from tests.test_ray_launch import RayHead

    box = RayHead()  # copies os.environ now, AWS_* included
    try:
        box.start(num_cpus=2)
        yield box
    finally:
        box.stop()
        assert not box.processes(), "Ray processes of the test survived"


def run_ray(
    env: dict, src: Path | str, out: Path | str, settings: dict, *flags: str
) -> subprocess.CompletedProcess:
    """``python -m launcher shards build SRC --out OUT --engine ray FLAGS shards.KEY=VALUE…``."""
    overrides = [f"shards.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in settings.items()]
    cmd = [sys.executable, "-m", "launcher", "shards", "build", str(src), "--out", str(out), "--engine", "ray",
           *flags, *overrides]  # fmt: skip
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def builder(box):
    """A ``build`` for tests.test_columnar.both: ray through the command line against ``box``'s head."""
    env = {**box.env, "RAY_ADDRESS": f"127.0.0.1:{box.port}"}

    def build(engine: str, src: Path | str, out: Path | str, **settings) -> dict:
        if engine != "ray":
            return build_with(engine, src, out, **settings)
        proc = run_ray(env, src, out, settings)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        build.stderr = proc.stderr
        return json.loads(storage.read_bytes(storage.join(str(out), "manifest.json")))

    build.env = env
    return build


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """benchmarks/synthetic_log.py at 20K interactions: sessions, 5 % tied gaps, 1 % duplicate rows,
    float32 ratings, and three rows missing a value (a user at rows 101 and 7001, a NaN rating at row
    2001); 4 row groups, so 4 read tasks."""
    mod = _synthetic_module()
    generated = mod.generate(20_000, 2_000, 1_000, seed=3, duplicate_rate=0.01, tie_rate=0.05)
    cols = {k: pa.array(v) for k, v in generated.items()}
    users = cols["user_id"].to_numpy().astype(object)
    users[[100, 7000]] = None
    cols["user_id"] = pa.array(users, pa.int64())
    ratings = cols["rating"].to_numpy().copy()
    ratings[2000] = np.nan
    cols["rating"] = pa.array(ratings)
    path = tmp_path_factory.mktemp("synthetic") / "log.parquet"
    pq.write_table(pa.table(cols), path, row_group_size=5_100)
    return path


def test_sample_same_as_local(head, tmp_path):
    build = builder(head)
    local, ray = both(SAMPLE, tmp_path, engines=("local", "ray"), build=build)
    assert ray["fingerprint"] == SAMPLE_FINGERPRINT and ray["command"].endswith("--engine ray")
    assert records(tmp_path / "ray") == records(tmp_path / "local")
    assert ray["num_interactions"] == 100_836 and ray["splits"]["train"]["records"] > 0
    # ml-latest's zip member is read on the driver, and the log says so
    assert "read on this machine by the local engine's readers (ml-latest input" in build.stderr


@pytest.mark.parametrize(
    "settings",
    [
        {"max_history": 7, "window_stride": 3, "records_per_member": 10, "max_shard_mb": 0.1,
         "rating_threshold": 3.0, "min_user_interactions": 6, "min_item_interactions": 12},
        {"duplicates": "keep", "max_history": 4, "prefix_records": True, "min_item_interactions": 5},
    ],
    ids=["windows-threshold-kcore", "keep-duplicates-prefix"],
)  # fmt: skip
def test_synthetic_parquet_same_as_local(head, synthetic, tmp_path, settings):
    build = builder(head)
    local, ray = both(synthetic, tmp_path, engines=("local", "ray"), build=build, rating_col="rating",
                      skip_bad_lines=True, **settings)  # fmt: skip
    assert records(tmp_path / "ray") == records(tmp_path / "local")
    removed = ray["rows"]["removed"]
    assert removed["missing_value"] == 3 and ray["source"]["skipped_lines"] == 3 and removed["k_core"] > 0
    if settings.get("duplicates") == "keep":
        assert ray["rows"]["duplicates_kept"] > 0 and ray["train_records"] == "prefix"
    else:
        assert removed["duplicate"] > 0 and removed["rating_threshold"] > 0
        assert len(ray["splits"]["train"]["shards"]) > 1  # shards rolled over at the 0.1 MiB cap
    assert "read on this machine" not in build.stderr  # the workers read the Parquet log


def _local_error(src: Path, out: Path, **settings) -> str:
    from configs import DataError

    with pytest.raises(DataError) as e:
        build_with("local", src, out, **settings)
    return str(e.value)


def test_bad_input_is_the_local_engines_line(head, synthetic, tmp_path):
    """A missing value (this run starts a local Ray of 2 CPUs of its own, and ends it) and a duplicate
    under shards.duplicates=error: the local engine's line and exit 2."""
    message = _local_error(synthetic, tmp_path / "local", rating_col="rating")
    assert message.endswith(
        "row 101: field 'user_id': missing value (shards.skip_bad_lines=true skips such lines)"
    )
    own = head.root / "own"
    env = {k: v for k, v in head.env.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(own)}
    proc = run_ray(env, synthetic, tmp_path / "ray", {"rating_col": "rating"}, "--engine-threads", "2")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == f"recgpt shards: error: {message}"
    assert "Traceback" not in proc.stderr and "starting a local Ray instance" in proc.stdout

    def left() -> list:
        return [p for p in head.processes() if str(own) in " ".join(p.cmdline())]

    deadline = time.monotonic() + 30  # the command ended the Ray it started
    while left() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left()

    settings = {"rating_col": "rating", "skip_bad_lines": True, "duplicates": "error"}
    message = _local_error(synthetic, tmp_path / "dup-local", **settings)
    proc = run_ray(builder(head).env, synthetic, tmp_path / "dup-ray", settings)
    assert proc.returncode == 2 and "duplicate of row" in message
    assert proc.stderr.strip().splitlines()[-1] == f"recgpt shards: error: {message}"


@pytest.mark.s3
def test_s3_log_to_s3_shards(head, synthetic, tmp_path, capsys):
    """The workers read the log from s3:// and the shards go to s3://: the local build's bytes."""
    log_url = f"s3://{BUCKET}/logs/synthetic.parquet"
    storage.upload(synthetic, log_url)
    out = f"s3://{BUCKET}/shards/ray"
    build = builder(head)
    ray = build("ray", log_url, out, rating_col="rating", skip_bad_lines=True)
    local = build_with("local", synthetic, tmp_path / "local", rating_col="rating", skip_bad_lines=True)
    assert ray["fingerprint"] == local["fingerprint"] and ray["source"]["input"] == log_url
    assert ray["splits"] == local["splits"] and ray["rows"] == local["rows"]
    for name in ("items.jsonl", "histories.jsonl", local["splits"]["valid"]["shards"][0]["path"]):
        assert storage.read_bytes(f"{out}/{name}") == (tmp_path / "local" / name).read_bytes()
    # From a URL the workers read Parquet only: anything else is one line before any connection to Ray.
    assert main(["shards", "build", f"s3://{BUCKET}/logs/ratings.csv", "--out", str(tmp_path / "csv"),
                 "--engine", "ray"]) == 2  # fmt: skip
    assert "reads a log from a URL only as one Parquet file" in capsys.readouterr().err
