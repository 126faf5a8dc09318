"""Shards on an object store, through the one storage layer (``data_shards/storage.py``).

The ``s3`` tests run against a real S3 API: moto's standalone server (``moto_server`` from
``moto[server]``, a dev extra) on 127.0.0.1 and a free port, started and stopped by the module fixture
``s3`` in tests/conftest.py, with authentication on (an IAM user and access key of its own), so a wrong secret is refused
as a real store refuses it. The storage layer's unit tests use fsspec's ``memory://`` filesystem.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections import Counter

import pytest

from configs import CorruptShardError, DataError
from data_shards import storage
from data_shards.manifest import MANIFEST, load_manifest
from data_shards.reader import ShardLoader
from launcher.cli import main
from tests.conftest import BUCKET, SAMPLE, losses, recgpt_train, train_log
from trainer.distributed import free_port


@pytest.fixture(scope="module")
def s3_shards(s3) -> str:
    """The bundled sample built straight to s3:// by the CLI."""
    url = f"s3://{BUCKET}/shards/ml-latest-small"
    assert main(["shards", "build", str(SAMPLE), "--out", url]) == 0
    return url


def _key(r: dict) -> str:
    return json.dumps(r, sort_keys=True)


# --------------------------------------------------------------------------- storage layer (memory://)


def test_storage_layer_on_memory_filesystem(tmp_path, monkeypatch):
    src = tmp_path / "build"
    (src / "train").mkdir(parents=True)
    (src / "train" / "a.tar").write_bytes(b"x" * 10)
    (src / "items.jsonl").write_bytes(b"{}\n")
    (src / MANIFEST).write_text("{}")
    url = "memory://recgpt-unit/out"
    fs = storage.filesystem(url)[0]
    copied = []
    real_copy = fs.copy

    def spy(src_path, dest_path, **kw):  # objects are uploaded under a temporary prefix, then copied
        assert "/.out.tmp-" in src_path and storage.listdir("memory://recgpt-unit") == [
            ".out.tmp-" + str(os.getpid())
        ] + (["out"] if copied else [])
        copied.append(dest_path.rsplit("/", 1)[1])
        return real_copy(src_path, dest_path, **kw)

    monkeypatch.setattr(fs, "copy", spy)
    assert storage.publish(src, url, marker=MANIFEST) == url
    monkeypatch.undo()
    assert copied[-1] == MANIFEST and sorted(copied) == sorted(
        ["a.tar", "items.jsonl", MANIFEST]
    )  # marker last
    assert storage.listdir("memory://recgpt-unit") == ["out"]  # the temporary prefix is gone
    assert storage.listdir(url) == ["items.jsonl", MANIFEST, "train"]
    assert storage.size(f"{url}/train/a.tar") == 10 and storage.read_bytes(f"{url}/items.jsonl") == b"{}\n"
    assert storage.exists(f"{url}/{MANIFEST}") and not storage.exists(f"{url}/nothing")
    assert (src / MANIFEST).exists()  # the caller's directory is left whole
    with pytest.raises(DataError, match="already exists"):
        storage.publish(src, url, marker=MANIFEST)
    (src / "train" / "a.tar").unlink()
    (src / "train" / "b.tar").write_bytes(b"y")
    storage.publish(src, url, marker=MANIFEST, force=True)  # the old objects go
    assert storage.listdir(f"{url}/train") == ["b.tar"]
    with storage.open_write(f"{url}/w.bin") as f:
        f.write(b"abc")
    with storage.open_read(f"{url}/w.bin") as f:
        assert f.read() == b"abc"
    with pytest.raises(DataError) as err:
        storage.read_bytes(f"{url}/missing.json")
    assert str(err.value).startswith(f"{url}/missing.json: ") and "\n" not in str(err.value)
    storage.filesystem(url)[0].rm("recgpt-unit", recursive=True)


# --------------------------------------------------------------------------- shards on s3


@pytest.mark.s3
def test_build_to_s3_equals_local_build(s3_shards, sample_shards, capsys):
    remote, local = load_manifest(s3_shards), load_manifest(sample_shards)
    assert remote["fingerprint"] == local["fingerprint"]
    assert {k: v for k, v in remote.items() if k != "command"} == {
        k: v for k, v in local.items() if k != "command"
    }
    assert storage.listdir(s3_shards) == [
        "histories.jsonl",
        "items.jsonl",
        MANIFEST,
        "test",
        "train",
        "valid",
    ]
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert secret not in json.dumps(remote)
    # An existing prefix is refused without --force (before any input is read).
    capsys.readouterr()
    assert main(["shards", "build", str(SAMPLE), "--out", s3_shards]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and s3_shards in err[0] and "already exists" in err[0]


@pytest.mark.s3
def test_inspect_and_verify_on_s3(s3_shards, capsys):
    capsys.readouterr()
    assert main(["shards", "inspect", s3_shards]) == 0
    assert load_manifest(s3_shards)["fingerprint"] in capsys.readouterr().out
    assert main(["shards", "verify", s3_shards]) == 0
    assert capsys.readouterr().out.startswith("ok: ")


def _batches(location, rank, state=None, stop=None, workers=1):
    loader = ShardLoader(
        location, "train", rank=rank, world_size=2, batch_size=16, seed=3, num_workers=workers
    )
    if state is not None:
        loader.load_state_dict(state)
    out = []
    for batch in loader:
        out.append([_key(r) for r in batch])
        if stop is not None and len(out) == stop:
            return out, loader.state_dict()
    return out, loader.state_dict()


@pytest.mark.s3
def test_loader_over_s3_equals_local_per_rank_and_resumes_exactly(s3_shards, sample_shards):
    seen = Counter()
    for rank in (0, 1):
        local, _ = _batches(sample_shards, rank, workers=0)
        remote, _ = _batches(s3_shards, rank, workers=2)  # forked DataLoader workers open their own client
        assert remote == local and len(local) > 10
        seen.update(r for b in local for r in b)
        # Interrupted mid-epoch, resumed from the state dict on a fresh loader: the same rest.
        head, state = _batches(s3_shards, rank, stop=7, workers=0)
        rest, _ = _batches(s3_shards, rank, state=state, workers=1)
        assert head + rest == local
    assert max(seen.values()) == 1  # ranks disjoint, every record at most once
    valid_local = [_key(r) for b in ShardLoader(sample_shards, "valid", batch_size=64) for r in b]
    valid_remote = [_key(r) for b in ShardLoader(s3_shards, "valid", batch_size=64) for r in b]
    assert valid_remote == valid_local


@pytest.mark.s3
@pytest.mark.integration
@pytest.mark.slow
def test_training_from_s3_gives_the_same_losses(s3_shards, sample_shards, tmp_path):
    steps = [
        "train.max_steps=6",
        "train.log_interval=1",
        "train.eval_interval=0",
        "train.checkpoint_interval=0",
    ]
    runs = {}
    for name, shards in (("local", sample_shards), ("s3", s3_shards)):
        proc = recgpt_train(shards, tmp_path / name, steps, nproc=1)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert os.environ["AWS_SECRET_ACCESS_KEY"] not in proc.stdout + proc.stderr
        runs[name] = train_log(tmp_path / name)
    assert losses(runs["s3"]) == losses(runs["local"]) and len(losses(runs["local"])) == 6
    rate = {  # steps 2.. (step 1 pays the first shard's latency and warm-up)
        name: statistics.mean(r["samples_per_s"] for r in log if r["kind"] == "train" and r["step"] > 1)
        for name, log in runs.items()
    }
    print(
        f"\nsamples/s: local {rate['local']:.0f}, s3 {rate['s3']:.0f}, s3/local {rate['s3'] / rate['local']:.2f}"
    )
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in (tmp_path / "s3" / "config.yaml").read_text()


@pytest.mark.s3
def test_corrupt_shard_object_is_named(s3, sample_shards, capsys):
    url = f"s3://{BUCKET}/damaged"
    storage.upload(sample_shards, url)
    shard = load_manifest(url)["splits"]["train"]["shards"][0]["path"]
    data = bytearray((sample_shards / shard).read_bytes())
    data[600] ^= 0x01
    with storage.open_write(f"{url}/{shard}") as f:
        f.write(bytes(data))
    with pytest.raises(CorruptShardError) as err:
        list(ShardLoader(url, "train", batch_size=64, num_workers=0, shuffle=False))
    assert f"{url}/{shard}" in str(err.value) and "\n" not in str(err.value)
    capsys.readouterr()
    assert main(["shards", "verify", url]) == 1
    bad = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("BAD")]
    assert len(bad) == 1 and f"{url}/{shard}" in bad[0]


_ERROR_CASES = [
    ("unknown bucket", "s3://no-such-bucket-recgpt/shards", {}),
    ("missing manifest", f"s3://{BUCKET}/nothing-here", {}),
    ("wrong secret", f"s3://{BUCKET}/shards/ml-latest-small", {"AWS_SECRET_ACCESS_KEY": "wrong-Secret-1234"}),
    ("unreachable endpoint", f"s3://{BUCKET}/shards/ml-latest-small", {"AWS_ENDPOINT_URL": "closed-port"}),
]


@pytest.mark.s3
@pytest.mark.parametrize(
    "command, case, url, env",
    [
        pytest.param(command, *c, id=f"{command}-{c[0]}")
        for command in ("inspect", "verify", "build")
        for c in _ERROR_CASES
        if not (command == "build" and c[0] == "missing manifest")  # an empty prefix is where a build goes
    ],
)
def test_storage_errors_are_one_line_naming_the_url(s3_shards, command, case, url, env, monkeypatch, capsys):
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    if command == "build":
        url = url.replace("shards/ml-latest-small", "new-build")
    for k, v in env.items():
        monkeypatch.setenv(k, f"http://127.0.0.1:{free_port()}" if v == "closed-port" else v)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # the closed port: fail after one retry, not five
    capsys.readouterr()
    args = ["build", str(SAMPLE), "--out", url] if command == "build" else [command, url]
    start = time.monotonic()
    assert main(["shards", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    print(f"\n{case} / {command}: {err[0] if err else None}")
    assert len(err) == 1 and url in err[0], err
    assert secret not in err[0] and "wrong-Secret-1234" not in err[0]
    assert time.monotonic() - start < 30
