"""The [monitoring] section refuses what could never work, and is inert by default."""

from __future__ import annotations

import pytest
from lucid_monitoring.config import AlertRule, MonitoringConfig, Notifier
from lucid_monitoring.metrics import Recorder, quantile
from pydantic import ValidationError


def test_defaults_record_metrics_and_nothing_else():
    cfg = MonitoringConfig()
    assert cfg.metrics and cfg.log_buffer == 1000
    assert not cfg.access_log.enabled and cfg.alerts == [] and cfg.notifiers == []


@pytest.mark.parametrize("data,message", [
    ({"buckets": [0.1, 0.05]}, "increasing"),
    ({"buckets": []}, "increasing"),
    ({"access_log": {"enabled": True, "target": "file"}}, "needs a path"),
    ({"notifiers": [{"type": "webhook"}]}, "needs a url"),
    ({"notifiers": [{"type": "log", "url": "http://x"}]}, "takes no url"),
    ({"alerts": [{"name": "a", "metric": "error_rate", "threshold": 1},
                 {"name": "a", "metric": "error_rate", "threshold": 2}]}, "used twice"),
    ({"alerts": [{"name": "a", "metric": "cpu", "threshold": 1}]}, "Input should be"),
    ({"alerts": [{"name": "a b", "metric": "error_rate", "threshold": 1}]}, "letters"),
    ({"alerts": [{"name": "a", "metric": "error_rate", "threshold": 1,
                  "labels": {"bad-label": "x"}}]}, "not a valid label name"),
    ({"colour": "red"}, "Extra inputs"),
    ({"leader_lease": "10ms"}, "greater than or equal to 0.3"),
    ({"cluster_interval": 0}, "greater than 0"),
    ({"node_label": "perhaps"}, "valid boolean"),
])
def test_bad_settings_are_refused(data, message):
    with pytest.raises(ValidationError, match=message):
        MonitoringConfig.model_validate(data)


def test_rule_durations_read_like_the_rest_of_the_config():
    rule = AlertRule.model_validate({"name": "x", "metric": "p99_latency", "threshold": 0.5,
                                     "for": "2m"})
    assert rule.for_ == 120.0
    assert Notifier(type="webhook", url="http://127.0.0.1:1/h", backoff_max="1m").backoff_max == 60


def test_quantiles_interpolate_inside_buckets():
    bounds = (0.1, 0.2, 0.4)
    assert quantile(bounds, [0, 0, 0, 0], 0.5) is None
    assert quantile(bounds, [10, 0, 0, 0], 0.5) == pytest.approx(0.05)
    assert quantile(bounds, [0, 10, 10, 0], 0.75) == pytest.approx(0.3)
    assert quantile(bounds, [0, 0, 0, 5], 0.99) == 0.4  # above the last bound: clamped


def test_clients_are_capped_per_rollup():
    class Ex:
        method, status, route_id, service, duration = "GET", 200, "r", "s", 0.01
        bytes_in = bytes_out = attempts = 0
        error, instance, outcome = "", None, None

    rec = Recorder([0.1], max_clients=2)
    for ip in ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.1"):
        ex = Ex()
        ex.client_ip = ip
        rec.observe(ex)
    assert rec.take_clients() == {("s", "10.0.0.1"): 2, ("s", "10.0.0.2"): 1,
                                  ("s", "(other)"): 2}
    assert rec.clients == {}


def test_windows_sum_closed_slots_and_the_open_one():
    class Ex:
        method, status, route_id, service, duration = "GET", 500, "r", "s", 0.01
        bytes_in = bytes_out = attempts = 0
        error, instance, outcome, client_ip = "", None, None, "1.2.3.4"

    rec = Recorder([0.1])
    t0 = rec.started
    for _ in range(3):
        rec.observe(Ex())
    rec.tick(t0 + 10)
    for _ in range(2):
        rec.observe(Ex())
    _, routes, _, _ = rec.window(60, now=t0 + 15)
    assert sum(e[0] for e in routes.values()) == 5
    assert sum(e[5] for e in routes.values()) == 5  # all 5xx: errors
    _, routes, _, _ = rec.window(60, now=t0 + 100)  # the closed slot is out of the window
    assert sum(e[0] for e in routes.values()) == 2


def test_the_access_log_formatter_writes_the_documented_json():
    import json

    from lucid_monitoring.accesslog import lines, records

    fields = (1795805334.0427, 'id"1', "api", "svc", "http://10.0.0.5:8080", "GET",
              "/p/\u00e4\\n\x01", 503, 0.0042123, 0.0031, 7, 512, "10.0.0.1", 42, 2,
              "upstream answered 503")
    expected = {
        "time": "2026-11-27T18:48:54.042+00:00", "request_id": 'id"1', "route": "api",
        "service": "svc", "instance": "http://10.0.0.5:8080", "method": "GET",
        "path": "/p/\u00e4\\n\x01", "status": 503, "duration_ms": 4.212, "upstream_ms": 3.1,
        "bytes_in": 7, "bytes_out": 512, "client_ip": "10.0.0.1", "subject": "42",
        "attempts": 2, "error": "upstream answered 503"}
    assert records([fields]) == [expected]
    line = lines([fields])
    assert line.endswith(b"\n") and line.count(b"\n") == 1  # control characters escaped
    assert b"\\u0001" in line and "ä".encode() in line  # UTF-8, not \\u-escaped
    assert json.loads(line) == expected
    assert lines([]) == b""


def test_a_batch_splits_into_its_lines_whatever_the_paths_hold():
    import json

    from lucid_monitoring.accesslog import lines

    base = (1795805334.9999, "r", "api", "svc", "", "GET", "/", 200, 0.0, 0.0, 0, 0,
            "10.0.0.1", "", 1, "")
    tricky = ['/a},{"time":"x"}', "/b}\n{", '/c\\"},{"time":', "/d\u2028"]
    batch = [base[:6] + (path,) + base[7:] for path in tricky]
    out = lines(batch).decode().split("\n")
    assert out[-1] == "" and [json.loads(x)["path"] for x in out[:-1]] == tricky
    # A string orjson refuses (a lone surrogate, say from a JWT's "sub") costs that batch
    # the fast path, not its lines.
    batch.append(base[:13] + ("\ud800",) + base[14:])
    out = lines(batch).decode().split("\n")
    assert [json.loads(x)["subject"] for x in out[:-1]] == ["", "", "", "", "\ud800"]


def test_a_bad_cluster_setting_names_file_and_key_and_exits_2(tmp_path):
    from lucid.testing import write_config
    from lucid.testing_internal import run_lucid

    path = write_config('[monitoring]\nleader_lease = "10ms"\n', tmp_path)
    result = run_lucid("check", "--config", str(path))
    assert result.returncode == 2, result.stderr
    assert str(path) in result.stderr and "monitoring.leader_lease" in result.stderr
    assert "greater than or equal to 0.3" in result.stderr
