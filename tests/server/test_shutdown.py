"""SIGTERM under load (issue 17 item 3): the server stops admitting, lets work in flight finish for --shutdown-timeout
seconds, then ends every remaining stream with an error event and [DONE] and every remaining non-streaming request
with a 503, stops its workers and exits 0."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time

import httpx
import pytest

from server_proc import ServerProcess

DRAIN = 2.0                             # --shutdown-timeout
STREAMS = 10


def launch_id(pid: int) -> str | None:
    """The mp executor's launch id, which names its /dev/shm segments (from the driver's memory maps)."""
    with open(f"/proc/{pid}/maps") as f:
        m = re.search(r"/dev/shm/shardserve-([0-9a-f]{12})-", f.read())
    return m.group(1) if m else None


def engine_counts(url: str) -> tuple[float, float]:
    values = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        name, _, value = line.partition(" ")
        values[name] = value
    return float(values["shardserve_num_requests_running"]), float(values["shardserve_num_requests_waiting"])


def read_stream(url: str, body: dict, got: dict, key: int) -> None:
    """Every non-empty line of one streamed response, and when its last line came (monotonic)."""
    lines = got.setdefault(key, [])
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
    except httpx.HTTPError as exc:
        lines.append(f"transport error: {exc!r}")
    got[("end", key)] = time.monotonic()


def post_plain(url: str, body: dict, got: dict) -> None:
    try:
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        got["plain"] = (r.status_code, r.json())
    except (httpx.HTTPError, ValueError) as exc:
        got["plain"] = (-1, repr(exc))


@pytest.mark.timeout(120)
def test_sigterm_drains_then_cuts_cleanly_and_exits_0(llama_gqa):
    """tp=2, two sequences at a time, 10 streams and one plain request of 2 x 480 tokens (about 0.7 s each, 8 s in
    all) in flight. SIGTERM: new work is refused at once, the running stream finishes, at the 2 s drain deadline
    the rest end with an error event then [DONE] and the plain request with a 503; exit 0 within the drain + 2 s,
    no worker process and no /dev/shm segment left."""
    srv = ServerProcess(llama_gqa, "-tp", "2", "--max-num-seqs", "2", "--max-model-len", "512",
                        "--shutdown-timeout", str(DRAIN))
    try:
        launch = launch_id(srv.proc.pid)
        assert launch, "no shared-memory segment in the server's maps (is it tp=2 with the mp executor?)"
        body = {"model": "tiny", "prompt": "Stream me something long", "max_tokens": 480, "n": 2, "temperature": 0,
                "ignore_eos": True, "stream": True}
        got: dict = {}
        threads = [threading.Thread(target=read_stream, args=(srv.url, body, got, i)) for i in range(STREAMS)]

        def all_in(requests: int) -> bool:      # that many requests in the engine or done, one of them running
            running, waiting = engine_counts(srv.url)
            done = sum(("end", i) in got for i in range(STREAMS))
            return running == 2 and (running + waiting) / 2 + done == requests

        def wait_all_in(requests: int) -> None:
            deadline = time.monotonic() + 30
            while not all_in(requests) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert all_in(requests), engine_counts(srv.url)

        for t in threads:
            t.start()
        wait_all_in(STREAMS)
        # the plain request queues behind every stream, so the drain deadline always finds it unfinished
        threads.append(threading.Thread(target=post_plain, args=(srv.url, dict(body, stream=False), got)))
        threads[-1].start()
        wait_all_in(STREAMS + 1)
        # A request whose body is still arriving at SIGTERM: the connection stays open, the request is refused.
        late_body = json.dumps({"model": "tiny", "prompt": "Too late", "max_tokens": 4}).encode()
        late = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
        late.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(late_body) + late_body[:5])
        time.sleep(0.1)

        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        late.sendall(late_body[5:])
        raw = b""
        while (data := late.recv(1 << 16)):
            raw += data
        late.close()
        try:
            r = httpx.post(srv.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=10)
            new = r.status_code
        except httpx.ConnectError:
            new = "refused"
        try:
            code = srv.proc.wait(timeout=DRAIN + 10)
        except Exception:
            code = None
        took = time.monotonic() - t0
        for t in threads:
            t.join(timeout=30)

        head, _, rest = raw.partition(b"\r\n\r\n")
        late_status, late_error = int(head.split()[1]), json.loads(rest).get("error", {})
        completed, cut, bad = [], [], []
        for i in range(STREAMS):
            lines = got[i]
            try:
                assert lines[-1] == "data: [DONE]", "no [DONE] at the end"
                events = [json.loads(line[6:]) for line in lines[:-1]]
                errors = [e["error"] for e in events if "error" in e]
                finishes = [c["finish_reason"] for e in events if "choices" in e for c in e["choices"]
                            if c["finish_reason"]]
                if errors:
                    assert len(errors) == 1 and "error" in events[-1], "the error event is not the last event"
                    assert errors[0]["code"] == 503 and errors[0]["type"] == "service_unavailable", errors
                    assert "shutting down" in errors[0]["message"] and "--shutdown-timeout" in errors[0]["message"]
                    assert finishes == [], finishes
                    cut.append(i)
                else:
                    assert finishes == ["length", "length"], finishes
                    completed.append((i, got[("end", i)] - t0))
            except (AssertionError, ValueError) as exc:
                bad.append((i, repr(exc), lines[-2:]))
        plain_status, plain_body = got["plain"]
        print(f"SIGTERM: exit {code} after {took:.2f} s (drain {DRAIN} s); streams completed (s after SIGTERM) "
              f"{[(i, round(s, 2)) for i, s in completed]}, cut {cut}; plain request {plain_status}; "
              f"late request {late_status}; new request {new}")
        assert not bad, bad
        assert code == 0, srv.output()
        assert took <= DRAIN + 2, f"exit {took:.2f} s after SIGTERM"
        assert any(s > 0 for _, s in completed), "no stream in flight at SIGTERM was let finish"
        assert cut, "no stream was cut at the drain deadline"
        assert plain_status == 503, got["plain"]
        assert set(plain_body) == {"error"} and set(plain_body["error"]) == {"message", "type", "param", "code"}
        assert plain_body["error"]["code"] == 503 and "shutting down" in plain_body["error"]["message"]
        assert late_status == 503 and late_error["type"] == "service_unavailable", raw
        assert "shutting down" in late_error["message"]
        assert new in ("refused", 503), new
        assert srv.children() == []
        assert sorted(n for n in os.listdir("/dev/shm") if launch in n) == []
    finally:
        srv.kill()
