"""The guest agent's jobs, run on the host (the agent is standard library
only): output by offsets, flow control for a host that reads it all, the
kept tail of a detached job, the limits, exec-status past the end."""
import base64
import hashlib
import time

import pytest

from chimney.guest import agent



def _read_all(job, offsets=(0, 0), delay=0.0):
    out, err, off = b"", b"", list(offsets)
    while True:
        time.sleep(delay)
        r = job.status(off, 1.0)
        off = r["offsets"]
        out += base64.b64decode(r["stdout"])
        err += base64.b64decode(r["stderr"])
        if r["complete"]:
            return out, err, r


def test_a_flow_job_loses_nothing_to_a_slow_reader(monkeypatch):
    """5 MB through a 64 KiB window, read slowly: every byte arrives."""
    monkeypatch.setattr(agent, "KEEP_BYTES", 64 << 10)
    jobs = agent.Jobs()
    job = jobs.start({"sh": "head -c 5000000 /dev/urandom > /tmp/agent-flow; cat /tmp/agent-flow; "
                            "sha256sum < /tmp/agent-flow >&2; rm /tmp/agent-flow", "flow": True})
    time.sleep(0.5)  # the command is held back meanwhile, not dropping
    assert len(job.data["stdout"]) <= (64 << 10) + (1 << 16)
    out, err, last = _read_all(job, delay=0.001)
    assert len(out) == 5000000 and err.split()[0].decode() == hashlib.sha256(out).hexdigest()
    assert last["rc"] == 0 and "dropped" not in last


def test_a_detached_job_keeps_its_last_bytes():
    jobs = agent.Jobs()
    job = jobs.start({"sh": "seq 1 100000"}, keep_bytes=1000)
    with job.cond:
        while not job.done:
            job.cond.wait()
    r = job.status([0, 0], 0)
    data = base64.b64decode(r["stdout"])
    assert len(data) == 1000 and data.endswith(b"99999\n100000\n")
    assert r["dropped"] == len("".join(f"{i}\n" for i in range(1, 100001))) - 1000
    # read again from the start: the same tail (`vm logs` twice)
    assert base64.b64decode(job.status([0, 0], 0)["stdout"]) == data


def test_status_past_the_end_completes():
    """`vm wait` asks from past the end (it wants the exit status only): the
    reply must say complete, not leave it polling forever."""
    jobs = agent.Jobs()
    job = jobs.start({"sh": "echo out; echo err >&2; exit 4"})
    r = job.status([1 << 62, 1 << 62], 5.0)
    while not r["complete"]:
        assert not job.done, r
        r = job.status([1 << 62, 1 << 62], 5.0)
    assert (r["rc"], r["stdout"], r["stderr"]) == (4, "", "") and "dropped" not in r
    assert job.status([0, 0], 0)["stdout"] == base64.b64encode(b"out\n").decode()


def test_limits_and_unknown_jobs(monkeypatch):
    monkeypatch.setattr(agent, "JOBS", agent.Jobs())
    monkeypatch.setattr(agent, "MAX_RUNNING", 2)
    started = [agent.handle({"op": "exec", "id": str(i), "argv": ["sleep", "30"]})[0] for i in range(2)]
    assert all(r["ok"] and r["job"] for r in started)
    busy = agent.handle({"op": "exec", "id": "x", "argv": ["true"]})[0]
    assert busy == {"id": "x", "ok": False, "busy": True, "error": "agent busy: 2 commands running (the limit is 2)"}
    for r in started:
        assert agent.handle({"op": "exec-kill", "id": "k", "job": r["job"], "signal": 9})[0]["ok"]
    for r in started:
        done = agent.handle({"op": "exec-status", "id": "s", "job": r["job"], "wait": 10, "forget": True})[0]
        assert done["rc"] == 128 + 9 and done["complete"]
    gone = agent.handle({"op": "exec-status", "id": "g", "job": started[0]["job"]})[0]
    assert gone["ok"] is False and gone["no_job"] and gone["error"].startswith(f"no job {started[0]['job']} ")
    bad = agent.handle({"op": "exec-kill", "id": "b", "job": "seven"})[0]
    assert bad["ok"] is False and bad["error"] == "bad job number 'seven'"


def test_not_found_program_and_timeout():
    r = agent.handle({"op": "exec", "id": "1", "argv": ["/no/such/program"]})[0]
    assert r["job"] is None and r["not_started"]["rc"] == 127
    t0 = time.monotonic()
    r = agent.handle({"op": "run", "id": "2", "sh": "echo started; sleep 300 & sleep 301; echo never",
                      "timeout": 1})[0]
    assert r["timed_out"] and base64.b64decode(r["stdout"]) == b"started\n" and r["rc"] == 128 + 9
    assert time.monotonic() - t0 < 30


@pytest.mark.parametrize("stdin", [b"", b"abc\xff" * 50000])
def test_stdin_reaches_the_command(stdin):
    r = agent.handle({"op": "run", "id": "1", "argv": ["sha256sum"], "stdin": base64.b64encode(stdin).decode()})[0]
    assert base64.b64decode(r["stdout"]).split()[0].decode() == hashlib.sha256(stdin).hexdigest()


def test_a_flow_job_whose_host_went_away_goes_on(monkeypatch):
    """Nobody reads a flow job any more: after FLOW_ABANDON it keeps its tail and ends."""
    monkeypatch.setattr(agent, "KEEP_BYTES", 64 << 10)
    monkeypatch.setattr(agent, "FLOW_ABANDON", 1.0)
    job = agent.Jobs().start({"sh": "head -c 1000000 /dev/zero; echo end", "flow": True}, keep_bytes=64 << 10)
    with job.cond:
        assert job.cond.wait_for(lambda: job.done, 60)
    r = job.status([0, 0], 0)
    assert r["rc"] == 0 and base64.b64decode(r["stdout"]).endswith(b"\x00end\n") and r["dropped"] > 0
