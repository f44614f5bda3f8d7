"""examples/common.sh: a role that dies is restarted with back-off while the others keep running; SIGINT (Ctrl-C)
stops them all."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from zdyn.bench.deploy import EXAMPLES

SCRIPT = textwrap.dedent(
    """\
    #!/usr/bin/env bash
    set -euo pipefail
    source {common}
    ZDYN_SETTING=kept start victim bash -c 'echo "start $ZDYN_SETTING $$"; sleep 0.5; exit 3'
    start steady bash -c 'echo "start $$"; exec sleep 600'
    serve_until_stopped
    """
)


def starts(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.startswith("start")] if log.exists() else []


@pytest.mark.slow
def test_a_dead_role_is_restarted_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    script = tmp_path / "run.sh"
    script.write_text(SCRIPT.format(common=EXAMPLES / "common.sh"))
    script.chmod(0o755)
    logs = tmp_path / "logs"
    env = {**os.environ, "ZDYN_LOG_DIR": str(logs), "ZDYN_RESTART_MAX_DELAY": "2", "ZDYN_KEYS_DIR": ""}
    with open(tmp_path / "out.log", "wb") as out:
        proc = subprocess.Popen([str(script)], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while len(starts(logs / "victim.log")) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        victim = starts(logs / "victim.log")
        assert len(victim) >= 3, (tmp_path / "out.log").read_text()  # restarted again and again (1 s, 2 s, 2 s)
        assert all(line.split()[1] == "kept" for line in victim)  # with the settings it was started with
        assert len({line.split()[2] for line in victim}) == len(victim)  # each a new process
        [steady] = starts(logs / "steady.log")  # the other role kept running, never restarted
        steady_pid = int(steady.split()[1])
        os.kill(steady_pid, 0)
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in run.sh's terminal
        proc.wait(20)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(steady_pid):
        time.sleep(0.1)
    assert not _alive(steady_pid)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"
