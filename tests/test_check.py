"""`modelium check`: the real command on this machine (through `--json`), with real logs written by
the real EventLog and then damaged, real model folders, a port really held; and the JSON log
format of a real `modelium serve`."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import copy_model, free_port
from test_recover import events_root, garble, workload, write_log

from modelium.check import check_disk, check_python, exit_code
from modelium.logformat import JsonFormatter


def check(tmp_path: Path, *args: str, models: Path | None = None, db: Path | None = None,
          port: int | None = None) -> tuple[int, dict]:
    models = models if models is not None else tmp_path / "models"
    db = db if db is not None else tmp_path / "modelium.db"
    cmd = [sys.executable, "-m", "modelium", "check", "--json", "--models", str(models), "--db", str(db),
           "--port", str(port if port is not None else free_port()), *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELIUM_")}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
                       check=False)
    assert p.stdout, p.stderr
    return p.returncode, json.loads(p.stdout)


def by_name(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


def assert_well_formed(report: dict, rc: int) -> None:
    for c in report["checks"]:
        assert c["status"] in ("pass", "warn", "fail")
        assert c["message"]
        assert (c["status"] == "pass") == ("fix" not in c), c  # a fix exactly when it did not pass
    fails = [c for c in report["checks"] if c["status"] == "fail"]
    assert rc == (1 if fails else 0) and report["ok"] == (not fails)
    assert report["counts"] == {s: sum(c["status"] == s for c in report["checks"]) for s in ("pass", "warn", "fail")}


def test_on_this_machine_with_a_valid_model(tmp_path, tiny_llama):
    (tmp_path / "models").mkdir()
    copy_model(tiny_llama, tmp_path / "models", "alpha")
    rc, report = check(tmp_path)
    assert_well_formed(report, rc)
    checks = by_name(report)
    assert checks["python"]["status"] == "pass"
    assert checks["torch"]["details"]["version"]
    gpus = [c for name, c in checks.items() if name.startswith("gpu")]
    if "gpu" in checks:  # NVML lists no GPU here: a warning (models run on the CPU), not a failure
        assert checks["gpu"]["status"] == "warn" and "CPU" in checks["gpu"]["message"]
        assert checks["torch"]["status"] == "pass"
        assert rc == 0, report
    else:
        assert all(c["details"]["total_bytes"] > 0 for c in gpus)
    assert checks["database"]["status"] == "pass" and "does not exist yet" in checks["database"]["message"]
    assert checks["disk: database"]["details"]["free_bytes"] > 0
    assert checks["disk: models"]["details"]["free_bytes"] > 0
    models = checks["models"]
    assert models["status"] == "pass", models
    assert [m["name"] for m in models["details"]["valid"]] == ["alpha"]
    assert models["details"]["valid"][0]["task"] in ("chat", "text-generation")
    assert models["details"]["invalid"] == []
    assert checks["port"]["status"] == "pass" and "free" in checks["port"]["message"]


def test_the_human_table_lists_every_check_with_its_fix(tmp_path):
    p = subprocess.run([sys.executable, "-m", "modelium", "check", "--models", str(tmp_path / "models"),
                        "--db", str(tmp_path / "x.db"), "--port", str(free_port())],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)
    lines = p.stdout.splitlines()
    for name in ("python", "torch", "disk: models", "disk: database", "database", "models", "port"):
        assert any(re.match(rf"(PASS|WARN|FAIL)\s+{re.escape(name)}\s", line) for line in lines), p.stdout
    # the models folder does not exist: a warning with its fix, right below it
    i = next(i for i, line in enumerate(lines) if re.match(r"WARN\s+models\s", line))
    assert "does not exist" in lines[i] and lines[i + 1].strip().startswith("fix:")
    assert re.search(r"\d+ passed, \d+ warning\(s\), \d+ failed", p.stdout)


def test_a_models_folder_with_an_invalid_model_shows_it_with_its_reason(tmp_path, tiny_llama):
    models = tmp_path / "models"
    models.mkdir()
    copy_model(tiny_llama, models, "good")
    broken = copy_model(tiny_llama, models, "broken")
    (broken / "config.json").write_text("{ not json")
    (models / "empty").mkdir()
    rc, report = check(tmp_path)
    assert_well_formed(report, rc)
    m = by_name(report)["models"]
    assert m["status"] == "warn" and m["fix"]
    assert [v["name"] for v in m["details"]["valid"]] == ["good"]
    invalid = {v["name"]: v["reason"] for v in m["details"]["invalid"]}
    assert set(invalid) == {"broken", "empty"}
    assert "config.json" in invalid["broken"] and "config.json" in invalid["empty"]
    assert "1 valid, 2 invalid" in m["message"] and "broken: " in m["message"]


def test_a_file_of_garbage_as_the_database_fails_with_a_fix(tmp_path):
    db = tmp_path / "modelium.db"
    db.write_bytes(os.urandom(64 * 1024))
    rc, report = check(tmp_path, db=db)
    assert rc == 1 and not report["ok"]
    assert_well_formed(report, rc)
    d = by_name(report)["database"]
    assert d["status"] == "fail" and "not a readable SQLite database" in d["message"]
    assert "another --db" in d["fix"] and "modelium db recover" in d["fix"]


@pytest.fixture(scope="module")
def real_log(tmp_path_factory) -> Path:
    db = tmp_path_factory.mktemp("log") / "log.db"
    write_log(db, workload(3000))
    return db


def test_a_real_log_passes(tmp_path, real_log):
    rc, report = check(tmp_path, db=real_log)
    d = by_name(report)["database"]
    assert d["status"] == "pass" and d["details"]["last_seq"] == 3000 and d["details"]["integrity"] == "ok"
    assert rc == 0, report


def test_a_truncated_log_fails_with_recover_as_the_fix(tmp_path, real_log):
    db = tmp_path / "modelium.db"
    data = real_log.read_bytes()
    db.write_bytes(data[: len(data) // 2])
    rc, report = check(tmp_path, db=db)
    assert rc == 1
    assert_well_formed(report, rc)
    d = by_name(report)["database"]
    assert d["status"] == "fail" and "damaged" in d["message"], d
    assert f"modelium db recover {db}" in d["fix"]


def test_a_log_with_a_garbled_page_fails_the_integrity_check(tmp_path, real_log):
    db = tmp_path / "modelium.db"
    db.write_bytes(real_log.read_bytes())
    garble(db, [events_root(db)])  # the events table's root page: every row of it is behind it
    rc, report = check(tmp_path, db=db)
    assert rc == 1
    d = by_name(report)["database"]
    assert d["status"] == "fail" and ("integrity check" in d["message"] or "damaged" in d["message"]), d
    assert f"modelium db recover {db}" in d["fix"]


def test_an_sqlite_file_that_is_not_a_modelium_log_fails(tmp_path):
    db = tmp_path / "other.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE people (name TEXT)")
    rc, report = check(tmp_path, db=db)
    assert rc == 1
    d = by_name(report)["database"]
    assert d["status"] == "fail" and "no Modelium event log" in d["message"]
    assert "not a Modelium log" in d["fix"] and "another --db" in d["fix"]


def test_a_port_in_use_fails_and_names_who_holds_it(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        rc, report = check(tmp_path, port=port)
    assert rc == 1
    p = by_name(report)["port"]
    assert p["status"] == "fail" and "in use" in p["message"] and "--port" in p["fix"]
    assert p["details"]["pid"] == os.getpid()  # this test process holds it


@pytest.mark.slow
def test_beside_a_running_server_its_log_and_port_pass_and_name_it(make_server, tmp_path):
    server = make_server(extra_env={"MODELIUM_SPARE_WORKERS": "0"}).start()
    rc, report = check(tmp_path, models=server.models, db=server.db, port=server.port)
    checks = by_name(report)
    pid = server.proc.pid
    d = checks["database"]
    assert d["status"] == "pass" and d["details"]["server_pid"] == str(pid) and f"pid {pid}" in d["message"]
    p = checks["port"]
    assert p["status"] == "pass" and p["details"]["pid"] == pid and "running Modelium server" in p["message"]
    assert_well_formed(report, rc)


def test_bad_settings_are_one_failed_check(tmp_path):
    (tmp_path / "bad.yaml").write_text("drain_s: not-a-number\n")
    rc, report = check(tmp_path, "--config", str(tmp_path / "bad.yaml"))
    assert rc == 1 and [c["name"] for c in report["checks"]] == ["settings"]
    assert "drain_s" in report["checks"][0]["message"] and report["checks"][0]["fix"]


# ---------------------------------------------------------------------- the checks as functions


def test_an_old_python_fails():
    r = check_python((3, 10, 4))
    assert r.status == "fail" and "3.11" in r.message and r.fix
    assert check_python((3, 11, 0)).status == "pass"
    assert exit_code([r]) == 1 and exit_code([check_python((3, 12, 1))]) == 0


def test_disk_thresholds(tmp_path):
    free = check_disk("disk", tmp_path).details["free_bytes"]
    assert check_disk("disk", tmp_path).status == "pass"
    warn = check_disk("disk", tmp_path, warn_below=free * 2 + 2**30)
    assert warn.status == "warn" and warn.fix
    fail = check_disk("disk", tmp_path / "not" / "yet", fail_below=free * 2 + 2**30)
    assert fail.status == "fail" and "does not exist yet" in fail.message and fail.fix


# ---------------------------------------------------------------------- JSON log lines


def test_the_json_formatter_writes_one_object_per_line_with_the_exception():
    try:
        raise ValueError("bad\nthing \u2028 here")
    except ValueError:
        record = logging.getLogger("modelium.test").makeRecord(
            "modelium.test", logging.ERROR, __file__, 1, "it failed: %s", ("x\ny",), sys.exc_info())
    line = JsonFormatter().format(record)
    assert len(line.splitlines()) == 1
    obj = json.loads(line)
    assert obj["level"] == "ERROR" and obj["logger"] == "modelium.test" and obj["message"] == "it failed: x\ny"
    assert "Traceback" in obj["exception"] and "ValueError: bad" in obj["exception"]
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$", obj["time"])


TEXT_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


@pytest.mark.slow
def test_serve_with_json_logs_writes_every_log_line_as_json(make_server, tmp_path):
    absent = tmp_path / "not" / "yet" / "models"
    server = make_server(args=["--log-format", "json", "--models", str(absent)],
                         extra_env={"MODELIUM_SPARE_WORKERS": "0"}).start()
    assert absent.is_dir()  # serve created the models folder that did not exist ...
    assert server.get("/ready").status_code == 200
    server.stop()
    assert server.proc.returncode == 0
    lines = [line for line in server.logfile.read_text().splitlines() if line.strip()]
    objects = []
    for line in lines:
        assert not TEXT_LOG_LINE.match(line), line  # no log line in the text format
        if line.startswith("{"):
            obj = json.loads(line)
            assert {"time", "level", "logger", "message"} <= set(obj), obj
            objects.append(obj)
    other = [line for line in lines if not line.startswith("{")]
    assert all(line.startswith("Modelium http://") for line in other), other  # the one banner line
    messages = [o["message"] for o in objects]
    # ... and said so, as a log line
    assert any("did not exist: created it" in m and str(absent) in m for m in messages), messages
    assert any(o["logger"] == "modelium.api" and "listening" in o["message"] for o in objects)
    assert any("SIGTERM" in m for m in messages)
