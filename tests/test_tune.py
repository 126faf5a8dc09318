"""``recgpt tune``: the search-space file, its checks before Ray starts, the results it writes, and
(slow) real local Ray Tune experiments: ASHA over 3 tiny trials, and a driver SIGKILL then resume."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from configs import ConfigError, load_config, to_dict
from launcher import cli, tune_cmd
from launcher.tune_cmd import Param, check_space, parse_space, with_values

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---------------------------------------------------------------- the space file (no Ray)


def test_parse_space_maps_every_kind_to_tune(tmp_path):
    from ray.tune.search.sample import Categorical, Float, Integer, LogUniform

    space = write(
        tmp_path / "s.yaml",
        "optim.lr: {loguniform: [1.0e-4, 1.0e-2]}\n"
        "model.dropout: {choice: [0.1, 0.2, 0.35]}\n"
        "train.num_negatives: {grid: [256, 1024]}\n"
        "optim.weight_decay: {uniform: [0.0, 0.1]}\n"
        "schedule.warmup_steps: {randint: [0, 100]}\n",
    )
    params = parse_space(space)
    assert params == [
        Param("optim.lr", "loguniform", (1e-4, 1e-2)),
        Param("model.dropout", "choice", (0.1, 0.2, 0.35)),
        Param("train.num_negatives", "grid", (256, 1024)),
        Param("optim.weight_decay", "uniform", (0.0, 0.1)),
        Param("schedule.warmup_steps", "randint", (0, 100)),
    ]
    t = tune_cmd.tune_space(params)
    assert isinstance(t["optim.lr"], Float) and isinstance(t["optim.lr"].get_sampler(), LogUniform)
    assert (t["optim.lr"].lower, t["optim.lr"].upper) == (1e-4, 1e-2)
    assert isinstance(t["model.dropout"], Categorical) and t["model.dropout"].categories == [0.1, 0.2, 0.35]
    assert t["train.num_negatives"] == {"grid_search": [256, 1024]}
    assert (t["optim.weight_decay"].lower, t["optim.weight_decay"].upper) == (0.0, 0.1)
    assert isinstance(t["schedule.warmup_steps"], Integer) and t["schedule.warmup_steps"].upper == 100
    # Every candidate value passes the schema; randint's checked top is high - 1 (exclusive bound).
    check_space(params, to_dict(load_config(TINY)), space)
    assert params[4].candidates() == [0, 99]


@pytest.mark.parametrize(
    "line, expected",
    [
        ("optim.lr: {normal: [0, 1]}", "optim.lr: unknown distribution 'normal'"),
        ("optim.lr: {uniform: [0.1]}", "optim.lr: uniform takes [low, high] numbers with low < high"),
        ("optim.lr: {uniform: [0.2, 0.1]}", "optim.lr: uniform takes [low, high] numbers with low < high"),
        ("optim.lr: {loguniform: [0, 0.1]}", "optim.lr: loguniform needs low > 0"),
        ("train.max_steps: {randint: [1, 2.5]}", "train.max_steps: randint takes integer [low, high) bounds"),
        ("optim.lr: {choice: []}", "optim.lr: choice takes a non-empty list"),
        ("optim.lr: 0.1", "optim.lr: expected one distribution"),
        ("optim.lr: {choice: [1], grid: [2]}", "optim.lr: expected one distribution"),
        (
            "optim.lr: {choice: [1]}\noptim.lr: {choice: [2]}",
            "not valid YAML (line 2: found duplicate key optim.lr)",
        ),
        ("optim.lr: {choice: [1]\nx: 2", "not valid YAML (line 2: did not find expected ',' or '}')"),
    ],
)
def test_parse_space_rejects_malformed_entries(tmp_path, line, expected):
    space = write(tmp_path / "s.yaml", line + "\n")
    with pytest.raises(ConfigError) as e:
        parse_space(space)
    msg = str(e.value)
    assert msg.startswith(f"{space}: {expected}") and "\n" not in msg, msg


@pytest.mark.parametrize(
    "line, key_in_error",
    [
        ("optim.lrr: {loguniform: [1.0e-4, 1.0e-2]}", "optim.lrr: unknown key"),
        ("optimizer.lr: {choice: [0.1]}", "optimizer: unknown key"),
        ("model.dropout: {choice: [0.1, 1.5]}", "model.dropout=1.5: model.dropout: must be in [0, 1)"),
        ("train.num_negatives: {grid: [0, 8]}", "train.num_negatives=0: train.num_negatives: must be >= 1"),
        ("optim: {choice: [1]}", "optim: is a section, not a setting"),
        ("optim.lr: {choice: [fast]}", "optim.lr='fast': optim.lr:"),
        # Tune samples floats from uniform even between integer bounds: refused for an integer setting.
        ("train.micro_batch_size: {uniform: [16, 64]}", "train.micro_batch_size: uniform samples floats"),
        ("model.n_layer: {loguniform: [1, 8]}", "model.n_layer: loguniform samples floats"),
        (
            "model.trainable_layers: {choice: [1, 3]}",
            "model.trainable_layers=3: model.trainable_layers: got 3, but the model has 2 layers",
        ),
        ("train.max_steps: {choice: [40, 80]}", "train.max_steps: --scheduler asha takes its rungs"),
        ("ray.num_workers: {choice: [0, 1]}", "ray.num_workers: not searchable"),
        ("train.output_dir: {choice: [a, b]}", "train.output_dir: not searchable"),
        (
            "optim: {lr: {choice: [0.1]}}",
            "optim: a nested mapping; write each searched key dotted, e.g. optim.lr",
        ),
        # settings that clash across keys: caught on the combinations, not in a trial
        (
            "lora.enabled: {choice: [true, false]}\nmodel.trainable_layers: {choice: [1]}",
            "the combination optim.weight_decay=0.0, lora.enabled=True, model.trainable_layers=1: "
            "model.trainable_layers:",
        ),
    ],
)
def test_bad_key_or_value_fails_before_ray_with_one_line_exit_2(
    tmp_path, capsys, monkeypatch, line, key_in_error
):
    def no_ray(*a, **k):
        raise AssertionError("the experiment started despite a bad space")

    monkeypatch.setattr(tune_cmd, "run_experiment", no_ray)
    space = write(tmp_path / "space.yaml", "optim.weight_decay: {choice: [0.0]}\n" + line + "\n")
    rc = cli.main(["tune", "--config", str(TINY), "--space", str(space), f"train.output_dir={tmp_path}/out"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith(f"recgpt tune: error: {space}: {key_in_error}"), err
    assert not (tmp_path / "tune-space").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["data.shards=nowhere/shards"], "data.shards: "),
        (["--max-concurrent", "0"], "--max-concurrent: got 0, must be >= 1"),
    ],
)
def test_missing_shards_and_bad_flags_fail_before_ray(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(tune_cmd, "run_experiment", lambda *a, **k: pytest.fail("Ray started"))
    space = write(tmp_path / "space.yaml", "optim.lr: {choice: [0.001]}\n")
    argv = ["tune", "--config", str(TINY), "--space", str(space), f"train.output_dir={tmp_path}/out", *extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"recgpt tune: error: {message}"), err
    if "data.shards" in message:
        assert f"{REPO}/nowhere/shards/manifest.json" in err  # made absolute: trials run elsewhere


def test_settings_the_data_refuses_fail_before_ray(tmp_path, capsys, monkeypatch, sample_shards):
    """What recgpt train checks against the shards first (sampled negatives against the catalogue, the
    history window) is checked for every candidate before Ray starts, as one line."""
    monkeypatch.setattr(tune_cmd, "run_experiment", lambda *a, **k: pytest.fail("Ray started"))
    argv = ["tune", "--config", str(TINY), f"train.output_dir={tmp_path}/out", f"data.shards={sample_shards}",
            "train.loss=sampled"]  # fmt: skip
    for line, says in [
        ("train.num_negatives: {grid: [256, 20000]}", "train.num_negatives=20000: train.num_negatives: 20000 "
         "is not below the 9,724 items"),
        ("data.max_history: {grid: [20, 80]}", "data.max_history=80: data.max_history: 80 is longer"),
    ]:  # fmt: skip
        space = write(tmp_path / "space.yaml", line + "\n")
        assert cli.main([*argv[:1], "--space", str(space), *argv[1:]]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"recgpt tune: error: {space}: {says}"), err


def test_asha_needs_an_evaluation_before_max_steps(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tune_cmd, "run_experiment", lambda *a, **k: pytest.fail("Ray started"))
    space = write(tmp_path / "space.yaml", "optim.lr: {choice: [0.001]}\n")
    argv = ["tune", "--config", str(TINY), "--space", str(space), f"train.output_dir={tmp_path}/out"]
    assert cli.main([*argv, "train.max_steps=10", "train.eval_interval=20"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.eval_interval: got 20 > train.max_steps 10" in err, err


def test_trainable_layers_of_a_local_model_directory_checked_from_its_config(tmp_path):
    from transformers import GPT2Config

    from modeling.factory import check_trainable_layers

    GPT2Config(n_layer=3, n_embd=16, n_head=2).save_pretrained(tmp_path / "lm")
    base = ["model.preset=null", f"model.name_or_path={tmp_path / 'lm'}"]
    check_trainable_layers(load_config(TINY, [*base, "model.trainable_layers=3"]))
    with pytest.raises(ConfigError, match=r"^model.trainable_layers: got 4, but .*lm has only 3 blocks$"):
        check_trainable_layers(load_config(TINY, [*base, "model.trainable_layers=4"]))


def test_results_csv_and_best_yaml_that_train_loads_unchanged(tmp_path, sample_shards):
    args = cli.parse_args(
        ["tune", "--config", str(TINY), "--space", str(write(tmp_path / "s.yaml", "optim.lr: {choice: [0.001, 0.01]}\nmodel.dropout: {uniform: [0.0, 0.3]}\n")),
         "--name", "exp", f"train.output_dir={tmp_path}/runs/base", "train.max_steps=40", f"data.shards={sample_shards}"]
    )  # fmt: skip
    exp = tune_cmd.prepare(args)
    assert exp.path == tmp_path / "runs" / "exp" and exp.base["ray"]["num_workers"] == 1  # 0 -> one worker
    assert exp.num_trials == 8  # --trials' default, no grid
    rows = [
        {"trial": "trial_a", "status": "stopped", "optim.lr": 0.001, "model.dropout": 0.05,
         "best_ndcg@10": 0.01, "best_step": 2, "steps": 2, "wall_s": 3.0},
        {"trial": "trial_b", "status": "finished", "optim.lr": 0.01, "model.dropout": 0.2512345678901,
         "best_ndcg@10": 0.03, "best_step": 4, "steps": 4, "wall_s": 5.0},
    ]  # fmt: skip
    rows.sort(key=lambda r: -r["best_ndcg@10"])  # trial_rows' order: best first
    csv_path, best_path = tune_cmd.write_results(exp, rows)
    with open(csv_path) as f:
        table = list(csv.DictReader(f))
    assert [r["trial"] for r in table] == ["trial_b", "trial_a"]
    assert float(table[0]["best_ndcg@10"]) == 0.03 and table[0]["model.dropout"] == "0.2512345678901"
    loaded = load_config(best_path)
    # A new run directory inside the experiment (train.resume=auto in the base's output_dir would
    # continue the base run), and the user's ray.num_workers again (0: no Ray).
    run_dir = str(tmp_path / "runs" / "exp" / "best-run")
    expected = with_values(
        exp.base,
        {
            "optim.lr": 0.01,
            "model.dropout": 0.2512345678901,
            "train.output_dir": run_dir,
            "ray.num_workers": 0,
        },
    )
    assert loaded == expected
    assert loaded.optim.lr == 0.01 and loaded.model.dropout == 0.2512345678901
    assert loaded.train.output_dir == run_dir and loaded.ray.num_workers == 0
    assert loaded.ray.storage_path is None and loaded.ray.name is None
    table_text = tune_cmd.format_table(rows)
    assert table_text.splitlines()[1].startswith("trial_b") and "0.03" in table_text


def test_rerun_with_another_space_under_the_same_name_is_refused(tmp_path, sample_shards):
    def exp_for(space_line: str):
        args = cli.parse_args(
            ["tune", "--config", str(TINY), "--space", str(write(tmp_path / "s.yaml", space_line)),
             "--name", "exp", f"train.output_dir={tmp_path}/runs/base", f"data.shards={sample_shards}"]
        )  # fmt: skip
        return tune_cmd.prepare(args)

    tune_cmd._check_same_experiment(exp_for("optim.lr: {choice: [0.001, 0.01]}\n"))
    tune_cmd._check_same_experiment(exp_for("optim.lr: {choice: [0.001, 0.01]}\n"))  # same: fine
    with pytest.raises(ConfigError, match=r"--name exp: .* whose space differs; rerun it unchanged"):
        tune_cmd._check_same_experiment(exp_for("optim.lr: {choice: [0.001, 0.02]}\n"))


# ---------------------------------------------------------------- what train() reports (one process)

REPORT_SCRIPT = """
import json, sys
from configs import load_config
from trainer.loop import train
calls = []
train(load_config(sys.argv[1], sys.argv[2:]), report=lambda m, c: calls.append([m["step"], m.get("ndcg@10"), c]))
print("CALLS " + json.dumps(calls))
"""


def test_train_reports_every_evaluation_and_every_checkpoint(sample_shards, tmp_path):
    """Evaluations at 2, 4, 6 and checkpoints at 4, 6: a scheduler hears of each evaluation once, Ray
    Train of each checkpoint once."""
    from tests.conftest import subprocess_env, train_log

    out = tmp_path / "run"
    overrides = [f"data.shards={sample_shards}", f"train.output_dir={out}", "train.max_steps=6",
                 "train.eval_interval=2", "train.checkpoint_interval=4", "train.log_interval=2"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", REPORT_SCRIPT, str(TINY), *overrides],
        env=subprocess_env(), capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    calls = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("CALLS "))[6:])
    evals = {r["step"]: r["ndcg@10"] for r in train_log(out) if r["kind"] == "eval"}
    ckpt = str(out / "checkpoints" / "step_{:08d}")
    assert calls == [
        [2, evals[2], None],
        [4, evals[4], ckpt.format(4)],
        [6, evals[6], ckpt.format(6)],
    ]


# ---------------------------------------------------------------- real local Ray Tune (slow)

SHORT = ("train.max_steps=4", "train.eval_interval=2", "train.checkpoint_interval=2", "train.log_interval=2")
TUNE_TIMEOUT_S = 900  # a 2-core machine shared with other test runs is slow to start Ray workers


@pytest.fixture(scope="module")
def ray_env():
    """A private HOME (Ray's auth token) and RAY_TMPDIR (its sockets and session), killed at the end."""
    from tests.test_ray_launch import RayHead

    box = RayHead()  # only its private directories, env and process cleanup: no head is started
    env = {**box.env, "RAY_TMPDIR": str(box.root / "t")}
    shards = box.root / "shards"
    cmd = [sys.executable, "-m", "launcher", "shards", "build", str(REPO / "data" / "ml-latest-small.zip")]
    subprocess.run([*cmd, "--out", str(shards)], env=env, check=True, capture_output=True, timeout=300)
    try:
        yield box, env, shards
    finally:
        box.stop()
        assert not box.processes(), "Ray processes of the test survived"


def tune_cmdline(shards: Path, storage: Path, space: Path, name: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "launcher", "tune", "--config", str(TINY), "--space", str(space), "--name", name,
        f"data.shards={shards}", f"train.output_dir={storage}/base", "ray.cpus_per_worker=0.9", *SHORT, *extra,
    ]  # fmt: skip


def evals_of(run_dir: Path) -> dict[int, float]:
    """step -> valid ndcg@10 from a trial's train_log.jsonl."""
    out = {}
    for line in (run_dir / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "eval":
            step, value = int(rec["step"]), float(rec["ndcg@10"])
            # A step runs twice only after a kill between its evaluation and its checkpoint; the resume
            # is exact, so it evaluates to the same value.
            assert out.get(step, value) == value, f"step {step}: {out[step]} then {value}"
            out[step] = value
    return out


@pytest.mark.ray
@pytest.mark.slow
def test_local_asha_experiment_writes_table_and_best_config(ray_env, tmp_path):
    box, env, shards = ray_env
    storage = box.root / "storage"
    space = write(
        tmp_path / "space.yaml", "optim.lr: {choice: [0.0003, 0.003]}\nmodel.dropout: {uniform: [0.0, 0.3]}\n"
    )
    proc = subprocess.run(
        tune_cmdline(shards, storage, space, "asha", "--trials", "3"),
        env=env, capture_output=True, text=True, timeout=TUNE_TIMEOUT_S, cwd=REPO,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "up to 2 side by side" in out  # 2 CPUs / 0.9 per worker
    exp = storage / "asha"
    with open(exp / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and {r["status"] for r in rows} <= {"finished", "stopped"}
    for r in rows:  # each row is what its trial's own recgpt run logged
        run = exp / r["trial"] / "run"
        evals = evals_of(run)
        last = max(json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines())
        assert int(r["steps"]) == last and (r["status"] == "finished") == (run / "metrics.json").is_file()
        assert r["status"] == "stopped" or max(evals) == 4
        assert float(r["best_ndcg@10"]) == max(evals.values())
        assert evals[int(r["best_step"])] == max(evals.values())
        assert list((exp / r["trial"] / "run" / "tensorboard").glob("events.out.tfevents.*"))
        params = json.loads((exp / r["trial"] / "params.json").read_text())
        assert float(r["optim.lr"]) == params["optim.lr"]
    assert [float(r["best_ndcg@10"]) for r in rows] == sorted(
        (float(r["best_ndcg@10"]) for r in rows), reverse=True
    )
    best = load_config(exp / "best.yaml")
    trial_cfg = load_config(exp / rows[0]["trial"] / "run" / "config.yaml", saved=True)
    assert best.optim.lr == trial_cfg.optim.lr and best.model.dropout == trial_cfg.model.dropout
    # best.yaml trains in a new run directory, never continuing the base config's run
    assert best.train.output_dir == str(exp / "best-run") and best.ray.num_workers == 0  # as given


@pytest.mark.ray
@pytest.mark.slow
def test_driver_sigkill_then_same_command_resumes_without_rerunning_finished_trials(ray_env, tmp_path):
    box, env, shards = ray_env
    storage = box.root / "storage"
    exp = storage / "killed"
    space = write(tmp_path / "space.yaml", "optim.lr: {grid: [0.003, 0.001]}\n")
    # Long enough trials that the second one is still running a few seconds after its first checkpoint.
    cmd = tune_cmdline(
        shards, storage, space, "killed", "--trials", "1", "--scheduler", "none", "--max-concurrent", "1",
        "train.max_steps=12",
    )  # fmt: skip
    log1 = open(tmp_path / "first.log", "w")
    driver = subprocess.Popen(
        cmd, env=env, stdout=log1, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
    )
    deadline = time.time() + TUNE_TIMEOUT_S
    try:
        # Kill once the first trial has finished and the second has a checkpoint, mid-experiment.
        while True:
            done = list(exp.glob("trial_*/run/metrics.json"))
            started = list(exp.glob("trial_*/run/checkpoints/latest"))
            if len(done) == 1 and len(started) == 2:
                break
            assert driver.poll() is None, (tmp_path / "first.log").read_text()[-6000:]
            assert time.time() < deadline, "the experiment did not get there in time"
            time.sleep(0.5)
        time.sleep(4)  # the first trial's completion reaches the saved experiment state (every 2 s)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(60)
    finally:
        if driver.poll() is None:
            driver.kill()
        log1.close()
    finished = done[0].parent
    before = (finished / "train_log.jsonl").read_text(), (finished / "metrics.json").stat().st_mtime_ns
    assert not (exp / "trials.csv").exists()  # the driver never got to the end
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TUNE_TIMEOUT_S, cwd=REPO)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "restoring experiment" in out
    first_trial = finished.parent.name
    assert f"Trial {first_trial} started" not in out, "a finished trial ran again"
    assert (
        (finished / "train_log.jsonl").read_text(),
        (finished / "metrics.json").stat().st_mtime_ns,
    ) == before
    with open(exp / "trials.csv") as f:
        rows = {r["trial"]: r for r in csv.DictReader(f)}
    assert len(rows) == 2 and all(r["status"] == "finished" and r["steps"] == "12" for r in rows.values())
    other = next(name for name in rows if name != first_trial)
    assert f"Trial {other} started" in out and "resumed from" in out  # from its own checkpoint
    evals = evals_of(exp / other / "run")
    assert sorted(evals) == [2, 4, 6, 8, 10, 12]
    # The best of the whole trial, before and after the crash (Tune's own results restart at the restore).
    assert float(rows[other]["best_ndcg@10"]) == max(evals.values())
    assert sorted(float(r["optim.lr"]) for r in rows.values()) == [0.001, 0.003]
