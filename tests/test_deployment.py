"""The project's prefect.yaml and `t2v deploy`, which writes it and applies it with `prefect deploy --all`:
against a real `prefect server start`, with two real process workers splitting a night.

The end-to-end test is SLOW (about a minute: the server's start, the workers' polling, the flow runs'
own processes), so it runs only with T2V_TEST_DEPLOYMENT=1, which `.ci/run` sets; elsewhere it is
reported as skipped.
"""

import re
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest
from prefect_server import BIN, free_port, require_slow_tests, server_env

POOL = "gpu-test"


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--timezone", "Mars/Olympus"], "`timezone`"),
        (["--cron", "at two"], "`cron`"),
        (["--pool", "gpu host"], "`pool`"),
        (["--catalogue", "no-such.toml"], "no-such.toml"),
    ],
)
def test_deploy_rejects_bad_options_before_writing_anything(args, names, write_catalogue, tmp_path):
    from typer.testing import CliRunner

    from t2v_cli.main import app

    catalogue = write_catalogue({"name": "fox", "prompt": "a fox"})
    target = tmp_path / "prefect.yaml"
    result = CliRunner().invoke(app, ["deploy", "--file", str(target), "--catalogue", str(catalogue), *args])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and names in result.stderr
    assert result.stderr.count("\n") == 1
    assert not target.exists()


def test_the_committed_prefect_yaml_is_what_t2v_deploy_writes():
    from deployments.deploy import GPU_LIMIT, PREFECT_FILE, NightlyDeployment, render
    from tasks.stages import GPU_LIMIT as LIMIT_THE_TASKS_HOLD

    # Its values are NightlyDeployment's defaults, and rendering them gives the file byte for byte: what
    # the end-to-end test below applies (with other values) is the committed file's layout.
    assert NightlyDeployment.from_file(PREFECT_FILE) == NightlyDeployment()
    assert render(NightlyDeployment()) == PREFECT_FILE.read_text()
    assert GPU_LIMIT == LIMIT_THE_TASKS_HOLD


def test_options_not_given_keep_the_files_values(write_catalogue, tmp_path):
    from typer.testing import CliRunner

    from deployments.deploy import NightlyDeployment
    from t2v_cli.main import app

    catalogue = write_catalogue({"name": "fox", "prompt": "a fox"})
    target = tmp_path / "prefect.yaml"
    first = ["deploy", "--file", str(target), "--write-only", "--catalogue", str(catalogue)]
    first += ["--timezone", "America/New_York", "--model", "tiny"]
    assert CliRunner().invoke(app, first).exit_code == 0
    result = CliRunner().invoke(app, ["deploy", "--file", str(target), "--write-only", "--gpus", "3"])
    assert result.exit_code == 0, result.output

    written = NightlyDeployment.from_file(target)
    assert (written.timezone, written.gpus, written.cron) == ("America/New_York", 3, "0 2 * * *")
    assert written.catalogue == str(catalogue)  # outside the checkout: kept absolute
    assert target.read_text().count('shard: "') == 3


def _finished_runs(log: Path) -> list[str]:
    """Names of the flow runs whose process reported completion into this worker's output."""
    return re.findall(r"Flow run '([^']+)' - Finished in state Completed", log.read_text())


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            # A worker may wait on its last poll of a server that is going away.
            proc.kill()
            proc.wait()


@pytest.fixture
def prefect_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A `prefect server start` on a free loopback port with its own PREFECT_HOME; the env to reach it."""
    require_slow_tests("a real Prefect server and worker")
    port = free_port()
    env = server_env(
        tmp_path,
        port,
        # Poll every second, not every 15, so the triggered run starts at once. (The worker passes its
        # environment to the flow run's process: that is how a GPU host's worker tells runs where the
        # data is, and here it keeps the test's files in tmp_path.)
        PREFECT_WORKER_QUERY_SECONDS="1",
    )
    log = open(tmp_path / "server.log", "wb")  # closed in the finally below
    server = subprocess.Popen(
        [BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(
                        f"prefect server did not start:\n{(tmp_path / 'server.log').read_text()[-3000:]}"
                    )
                time.sleep(0.5)
        yield env
    finally:
        _stop(server)
        log.close()


def test_deploy_then_two_workers_split_a_triggered_night(prefect_env, write_catalogue, tmp_path):
    from deployments.deploy import PROJECT_DIR

    templates = ["fox", "sea", "owl"]
    catalogue = write_catalogue(*({"name": t, "prompt": f"a {t} at dawn"} for t in templates))
    run = dict(env=prefect_env, capture_output=True, text=True, timeout=180)

    # The file is written where the test says (the checkout's own stays as it is) and applied by
    # `prefect deploy --all`, after the pool is made.
    target = tmp_path / "prefect.yaml"
    deployed = subprocess.run(
        [BIN / "t2v", "deploy", "--file", target, "--catalogue", catalogue, "--pool", POOL] + ["--gpus", "2"],
        **run,
    )
    assert deployed.returncode == 0, deployed.stderr
    assert f"created process work pool {POOL}" in deployed.stdout
    assert f"prefect worker start --pool {POOL} --limit 1" in deployed.stdout

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_env["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("nightly/nightly")
            pool = client.read_work_pool(POOL)
            limit = client.read_global_concurrency_limit_by_name("gpu")
    # One 02:00 schedule per GPU worker, each with its shard of the night, in the committed time zone.
    schedules = sorted(
        (s.schedule.cron, s.schedule.timezone, s.parameters["shard"]) for s in deployment.schedules
    )
    assert schedules == [("0 2 * * *", "Europe/Berlin", "0/2"), ("0 2 * * *", "Europe/Berlin", "1/2")]
    assert deployment.parameters == {"catalogue": str(catalogue), "model": "tiny"}
    assert (deployment.work_pool_name, pool.type, limit.limit) == (POOL, "process", 2)
    assert deployment.global_concurrency_limit.limit == 2
    assert deployment.concurrency_options.collision_strategy == "ENQUEUE"
    # The flow runs run in this checkout: the build step's `pwd`, templated into the pull step.
    assert deployment.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(PROJECT_DIR)}}
    ]

    # One worker per GPU on the same pool, as the README's scale-out section starts them.
    worker = [BIN / "prefect", "worker", "start", "--pool", POOL, "--limit", "1"]
    workers, logs = [], []
    try:
        for gpu in ("0", "1"):
            logs.append(open(tmp_path / f"worker{gpu}.log", "wb"))  # closed in the finally below
            workers.append(
                subprocess.Popen(
                    [*worker, "--name", f"gpu{gpu}"],
                    env=prefect_env | {"CUDA_VISIBLE_DEVICES": gpu},
                    stdout=logs[-1],
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # a Ctrl+C in pytest's terminal goes to pytest only
                )
            )
        # Both shards now, as the schedules would at 02:00; --watch waits for the run to end and exits
        # non-zero unless it completed.
        triggers = [
            subprocess.Popen(
                [BIN / "prefect", "deployment", "run", "nightly/nightly", "--param", f"shard={i}/2"]
                + ["--watch", "--watch-timeout", "150"],
                env=prefect_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for i in range(2)
        ]
        for trigger in triggers:
            out, _ = trigger.communicate(timeout=180)
            worker_logs = "".join((tmp_path / f"worker{g}.log").read_text()[-2000:] for g in "01")
            assert trigger.returncode == 0, (out[-3000:], worker_logs)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(
            _finished_runs(tmp_path / f"worker{g}.log") for g in "01"
        ):
            time.sleep(0.2)  # the worker relays its flow run's output a moment after the run ends
    finally:
        for worker in workers:
            _stop(worker)
        for log in logs:
            log.close()

    # Each worker ran one shard: it takes one run at a time and a run outlasts a poll. (Both workers
    # may try to submit the same run; the server lets one of them have it, so count runs that ran,
    # whose process writes to its worker's output.)
    for gpu in "01":
        assert len(_finished_runs(tmp_path / f"worker{gpu}.log")) == 1, gpu
    # ...and every clip was made once: each job's stages ran in exactly one of the night's two runs.
    outputs = tmp_path / "data" / "outputs" / date.today().isoformat()
    assert sorted(p.name for p in outputs.glob("*.mp4")) == sorted(f"{t}.mp4" for t in templates)
    from t2v.runlog import RunLog, sqlite_url

    runs = RunLog(sqlite_url(tmp_path / "data" / "runlog.sqlite")).runs(limit=10)
    assert [r["status"] for r in runs] == ["ok", "ok"]
    done = sorted((r["template"], r["stage"], r["status"]) for run in runs for r in run["stages"])
    assert done == sorted((t, s, "ok") for t in templates for s in ("encode", "diffuse", "decode", "finish"))
    assert sorted(len({r["template"] for r in run["stages"]}) for run in runs) == [1, 2]
