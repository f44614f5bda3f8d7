"""Process-level behaviour with simulated workers: separate processors, YAML configs, clean shutdown."""

import collections
import re
import signal
import textwrap
import time

import openai
import pytest
from helpers import wait_until

from zdyn.bench.procs import ProcessGroup, free_port, get_json, wait_for_workers
from zdyn.roles.config import config_argv, to_argv
from zdyn.roles.worker import build_parser

MOCKER = ["--engine", "mocker", "--speedup", "100", "--max-model-len", "2048", "--block-size", "32"]


def client(port: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)


def assert_clean_exits(group: ProcessGroup) -> None:
    """Every role stopped on its own after SIGTERM: exit 0 (uvicorn re-raises the SIGTERM it handled: -15)."""
    for name, proc in group.procs.items():
        assert proc.returncode in (0, -signal.SIGTERM), (name, proc.returncode, group.log(name)[-2000:])
        assert "Traceback" not in group.log(name), group.log(name)


@pytest.mark.slow
def test_separate_processors_share_the_load(tiny_model, tmp_path):
    port, fe_port = free_port(), free_port()
    proc_ports = [free_port(), free_port()]
    with ProcessGroup(tmp_path) as group:
        group.start(
            "frontend", ["zdyn", "frontend", "--port", str(port), "--processors-endpoint", f"tcp://127.0.0.1:{fe_port}"]
        )
        for i, p in enumerate(proc_ports):
            group.start(f"processor{i}", [
                "zdyn", "processor", "--model", str(tiny_model), "--frontend", f"tcp://127.0.0.1:{fe_port}",
                "--workers-endpoint", f"tcp://127.0.0.1:{p}", "--processor-id", f"processor{i}",
            ])  # fmt: skip
        connect = ",".join(f"tcp://127.0.0.1:{p}" for p in proc_ports)
        group.start("worker", ["zdyn", "worker", "--model", str(tiny_model), "--connect", connect, *MOCKER])
        wait_for_workers(f"http://127.0.0.1:{port}", 1, group, timeout_s=60)

        def workers() -> list[dict]:
            return get_json(f"http://127.0.0.1:{port}/health")[1]["workers"]

        wait_until(lambda: sum(len(w["processors"]) for w in workers()) == 2, 30, "the worker at both processors")
        [worker] = workers()  # one worker, counted once though both processors reach it
        assert sorted(worker["processors"]) == ["processor0", "processor1"] and worker["model"] == "tiny-llama"
        c = client(port)
        assert [m.id for m in c.models.list().data] == ["tiny-llama"]
        for i in range(6):
            r = c.chat.completions.create(
                model="tiny-llama", messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=5
            )
            assert r.usage.completion_tokens == 5
            chunks = list(c.completions.create(model="tiny-llama", prompt="x", max_tokens=3, stream=True))
            assert sum(len(ch.choices[0].text) >= 0 for ch in chunks) >= 1
        served = collections.Counter()
        for i in range(2):
            served[i] = len(re.findall(r"zdyn.choice: request ", group.log(f"processor{i}")))
        assert served[0] >= 4 and served[1] >= 4  # round-robin over both processors
        group.stop()
        assert_clean_exits(group)


@pytest.mark.slow
def test_yaml_config_common_and_role_sections(tiny_model, tmp_path):
    port = free_port()
    workers = f"tcp://127.0.0.1:{free_port()}"
    config = tmp_path / "deploy.yaml"
    config.write_text(
        textwrap.dedent(f"""
        Common:
          model: {tiny_model}
          heartbeat-interval: 0.5
        Frontend:
          port: {port}
          host: 127.0.0.1
          workers-endpoint: {workers}
        Worker:
          engine: mocker
          connect: {workers}
          max-model-len: 1024
          enforce-eager: true      # a vLLM flag: the mocker skips it and says so
          speedup: 50
        """)
    )
    with ProcessGroup(tmp_path / "logs") as group:
        group.start("frontend", ["zdyn", "frontend", "-f", str(config)])
        group.start("worker", ["zdyn", "worker", "-f", str(config), "--block-size", "32"])
        wait_for_workers(f"http://127.0.0.1:{port}", 1, group, timeout_s=60)
        status, health = get_json(f"http://127.0.0.1:{port}/health")
        assert status == 200 and health["workers"][0]["engine"] == "mocker"
        r = client(port).completions.create(model="tiny-llama", prompt="x", max_tokens=4)
        assert r.usage.completion_tokens == 4
        assert "skipped: enforce-eager" in group.log("worker")


def test_config_flags_and_precedence(tmp_path):
    assert to_argv({"a": 1, "flag": True, "off": False, "many": [1, 2], "js": {"k": 1}}) == [
        "--a", "1", "--flag", "--many", "1", "--many", "2", "--js", '{"k": 1}',
    ]  # fmt: skip
    config = tmp_path / "c.yaml"
    config.write_text(
        "Common:\n  speedup: 7\n  port: 99\nWorker:\n  num-blocks: 128\n  max-num-seqs: 4\n"
        "Worker.mocker:\n  max-num-seqs: 8\nWorker.vllm:\n  enforce-eager: true\n"
    )
    parser = build_parser("mocker")
    argv = config_argv(parser, config, "Worker", "Worker.mocker")
    assert argv == ["--speedup", "7", "--num-blocks", "128", "--max-num-seqs", "8"]  # port: not a worker flag
    args = parser.parse_args([*argv, "--num-blocks", "256"])  # the command line wins
    assert args.num_blocks == 256 and args.speedup == 7.0


@pytest.mark.slow
def test_roles_exit_cleanly_on_sigterm(tiny_model, tmp_path):
    port = free_port()
    workers = f"tcp://127.0.0.1:{free_port()}"
    with ProcessGroup(tmp_path) as group:
        group.start(
            "frontend",
            ["zdyn", "frontend", "--model", str(tiny_model), "--port", str(port), "--workers-endpoint", workers],
        )
        group.start("worker", ["zdyn", "worker", "--model", str(tiny_model), "--connect", workers, *MOCKER])
        wait_for_workers(f"http://127.0.0.1:{port}", 1, group, timeout_s=60)
        for name in ("worker", "frontend"):
            group.kill(name, signal.SIGTERM)
            group.procs[name].wait(10)
        assert_clean_exits(group)


def test_impossible_mocker_settings_are_refused_at_start(tiny_model, tmp_path):
    with ProcessGroup(tmp_path) as group:
        argv = ["zdyn", "worker", "--engine", "mocker", "--model", str(tiny_model)]
        proc = group.start("worker", [*argv, "--num-blocks", "4", "--block-size", "32", "--max-model-len", "1024"])
        assert proc.wait(60) == 2
        assert "cannot start:" in group.log("worker") and "Traceback" not in group.log("worker")


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["mocker"])
def test_worker_started_before_the_frontend_registers_later(tiny_model, tmp_path, engine):
    port = free_port()
    workers = f"tcp://127.0.0.1:{free_port()}"
    with ProcessGroup(tmp_path) as group:
        group.start(
            "worker",
            [
                "zdyn",
                "worker",
                "--model",
                str(tiny_model),
                "--connect",
                workers,
                *MOCKER,
                "--heartbeat-interval",
                "0.3",
            ],
        )
        time.sleep(2)  # the worker announces itself to nobody for a while
        group.start(
            "frontend",
            ["zdyn", "frontend", "--model", str(tiny_model), "--port", str(port), "--workers-endpoint", workers],
        )
        wait_for_workers(f"http://127.0.0.1:{port}", 1, group, timeout_s=60)
        assert (
            client(port).completions.create(model="tiny-llama", prompt="x", max_tokens=2).usage.completion_tokens == 2
        )
