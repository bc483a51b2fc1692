"""The shipped operations files, checked by the tools that will consume them.

* Prometheus: ``promtool check config``, ``check rules``, ``test rules`` (the alerts' unit
  tests), and every metric the rules and the dashboard name is one the daemon exports.
* systemd: the unit as ``scripts/install-service.sh`` writes it is silent under
  ``systemd-analyze verify`` and scores at most 2.0 under ``security --offline=yes``.
* Grafana: the dashboard JSON type-checks against ``@grafana/schema``'s ``Dashboard``.

A real Prometheus scraping a real daemon is in tests/integration/test_ops.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from pipeline.cluster.metrics import ClusterMetrics
from pipeline.contract import TASKS
from pipeline.daemon import app, config, service
from pipeline.sources.mqtt import InputConfig
from pipeline.telemetry.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PROM = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "seqstream.json"
UNIT = REPO / "systemd" / "seqstream.service"
MAX_EXPOSURE = 2.0


def run(*argv: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)


# -- Prometheus -----------------------------------------------------------------------------


def test_promtool_accepts_the_scrape_config_and_the_rules() -> None:
    checked = run("promtool", "check", "config", str(PROM / "prometheus.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "1 rule files found" in checked.stdout
    rules = run("promtool", "check", "rules", str(PROM / "rules" / "seqstream.rules.yml"))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 14 rules found" in rules.stdout


def test_promtool_rule_unit_tests_pass() -> None:
    result = run("promtool", "test", "rules", str(PROM / "tests" / "seqstream.test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def exported_names() -> set[str]:
    """Every sample name the daemon's registry exports for some model task, built as
    app.build builds it (each task exports its own metrics)."""
    names: set[str] = set()
    for task in TASKS:
        metrics = Metrics(
            CollectorRegistry(),
            reject_reasons=app.REJECT_REASONS,
            reset_reasons=("idle",),
            reload_results=service.RELOAD_RESULTS,
            exit_results=service.EXIT_RESULTS,
        )
        metrics.set_model(name="m", version="1", provider="CPUExecutionProvider", opset=17)
        metrics.set_task(task)
        metrics.set_labels(("a", "b"))
        text = generate_latest(metrics.registry).decode()
        names |= {m.group(1) for m in re.finditer(r"^(\w+)[{ ]", text, re.MULTILINE)}
    registry = CollectorRegistry()
    cluster = ClusterMetrics(registry)  # a cluster member's own metrics (pipeline.cluster)
    cluster.partition_owned.labels("0").set(1)
    cluster.checkpoint_lag.labels("0").set(0)
    text = generate_latest(registry).decode()
    names |= {m.group(1) for m in re.finditer(r"^(\w+)[{ ]", text, re.MULTILINE)}
    return names


def names_in(text: str) -> set[str]:
    return set(re.findall(r"\bseqstream_[a-z_]+[a-z]", text))


def test_rules_and_dashboard_name_only_metrics_the_daemon_exports() -> None:
    exported = exported_names()
    rules = (PROM / "rules" / "seqstream.rules.yml").read_text()
    exprs = [
        t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p.get("targets", [])
    ]
    used = names_in(rules) | names_in("\n".join(exprs))
    assert len(used) >= 20
    assert sorted(used - exported) == []


# -- systemd ---------------------------------------------------------------------------------


def install(root: Path) -> Path:
    """scripts/install-service.sh into a staging root, using the repository's venv."""
    result = run("scripts/install-service.sh", "--root", str(root), "--venv", str(REPO / ".venv"))
    assert result.returncode == 0, result.stdout + result.stderr
    return root / "etc" / "systemd" / "system" / "seqstream.service"


def test_install_script_writes_the_unit_config_and_examples(tmp_path: Path) -> None:
    unit = install(tmp_path / "root")
    venv = REPO / ".venv"
    assert unit.read_text() == UNIT.read_text().replace("/opt/seqstream/venv", str(venv))
    assert (tmp_path / "root/opt/seqstream/share/deploy/prometheus/prometheus.yml").is_file()
    toml = tmp_path / "root" / "etc" / "seqstream" / "seqstream.toml"
    doc = tomllib.loads(toml.read_text())
    assert doc["model"]["path"] == "model.onnx"  # /etc/seqstream/model.onnx
    assert doc["checkpoint"]["path"] == "/var/lib/seqstream/state.ckpt"  # StateDirectory=
    doc["checkpoint"]["path"] = str(tmp_path / "state.ckpt")
    settings = config.parse(doc, base=toml.parent, source=toml)
    assert settings.model.path == toml.parent / "model.onnx"
    # The config is the operator's once written: a second run keeps it.
    toml.write_text(toml.read_text() + "# edited\n")
    install(tmp_path / "root")
    assert toml.read_text().endswith("# edited\n")


def test_unit_is_silent_under_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = install(tmp_path / "root")
    result = run("systemd-analyze", "verify", str(unit))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    # The check is live: a misspelt key is reported (on stderr, with exit status 0).
    broken = tmp_path / "broken" / "seqstream.service"
    broken.parent.mkdir()
    broken.write_text(unit.read_text().replace("WatchdogSec=", "WatchdogSecs="))
    result = run("systemd-analyze", "verify", str(broken))
    assert "WatchdogSecs" in result.stderr


def test_unit_security_exposure_is_at_most_two(tmp_path: Path) -> None:
    unit = install(tmp_path / "root")
    result = run("systemd-analyze", "security", "--offline=yes", str(unit))
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for seqstream\.service: ([\d.]+)", result.stdout)
    assert match, result.stdout
    exposure = float(match.group(1))
    print(json.dumps({"systemd_security_exposure": exposure}))
    assert exposure <= MAX_EXPOSURE, result.stdout
    gate = run(
        "systemd-analyze", "security", "--offline=yes", f"--threshold={MAX_EXPOSURE * 10:.0f}",
        str(unit),
    )  # fmt: skip
    assert gate.returncode == 0


def test_unit_declares_what_the_daemon_relies_on() -> None:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    assert settings["Type"] == ["notify"]
    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert settings["Restart"] == ["on-failure"]
    assert settings["StateDirectory"] == ["seqstream"]
    assert settings["ConfigurationDirectory"] == ["seqstream"]
    assert settings["DynamicUser"] == ["yes"]
    assert "last-exit" in settings["ExecStopPost"][0]  # read by service.record_exit
    assert service.LAST_EXIT == "last-exit"
    assert "/etc/seqstream/seqstream.toml" in settings["ExecStart"][0]


# -- Grafana ---------------------------------------------------------------------------------

# What a dashboard is on disk: JSON, so string enums are their string values.
TS_PRELUDE = """import type { Dashboard } from '@grafana/schema';
type Json<T> = T extends string ? `${T}`
  : T extends (infer U)[] ? Json<U>[]
  : T extends object ? { [K in keyof T]: Json<T[K]> }
  : T;
const dashboard: Json<Dashboard> = """


def typecheck(dashboard: str, modules: Path, workdir: Path) -> subprocess.CompletedProcess[str]:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "node_modules").symlink_to(modules)
    (workdir / "dashboard.ts").write_text(f"{TS_PRELUDE}{dashboard};\nexport default dashboard;\n")
    tsc = modules / ".bin" / "tsc"
    return run(
        str(tsc), "--noEmit", "--strict", "--skipLibCheck", "--moduleResolution", "bundler",
        "--module", "esnext", "--target", "es2020", "dashboard.ts", cwd=workdir,
    )  # fmt: skip


def test_dashboard_type_checks_against_grafana_schema(grafana_schema: Path, tmp_path: Path) -> None:
    assert shutil.which("node"), "node not found: run scripts/setup.sh"
    result = typecheck(DASHBOARD.read_text(), grafana_schema, tmp_path / "ok")
    assert result.returncode == 0, result.stdout + result.stderr
    # The check is live: a panel with a wrong gridPos and a misspelt threshold mode fails.
    doc = json.loads(DASHBOARD.read_text())
    doc["panels"][1]["gridPos"] = "top left"
    doc["panels"][1]["fieldConfig"]["defaults"]["thresholds"] = {"mode": "absolut", "steps": []}
    result = typecheck(json.dumps(doc), grafana_schema, tmp_path / "broken")
    assert result.returncode != 0
    assert "gridPos" in result.stdout or "h: number" in result.stdout, result.stdout
    assert '"absolut"' in result.stdout


def test_dashboard_panels_cover_the_issue_and_do_not_overlap() -> None:
    doc = json.loads(DASHBOARD.read_text())
    titles = [p["title"] for p in doc["panels"] if p["type"] != "row"]
    for wanted in (
        "Throughput", "End-to-end latency", "Inference latency (per batch)", "Batch size",
        "Active streams", "Rejects by reason", "State resets by reason",
        "Active streams and queue depth", "Broker connection", "Model",
        "Predictions per class", "Anomaly scores (score / threshold)",
    ):  # fmt: skip
        assert wanted in titles
    cells: set[tuple[int, int]] = set()
    for p in doc["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        xs, ys = range(g["x"], g["x"] + g["w"]), range(g["y"], g["y"] + g["h"])
        mine = {(x, y) for x in xs for y in ys}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))


# -- mosquitto ------------------------------------------------------------------------------


def _option(conf: Path, name: str) -> str:
    values = [
        line.split()[1]
        for line in conf.read_text().splitlines()
        if line.strip() and not line.startswith("#") and line.split()[0] == name
    ]
    assert len(values) == 1, f"{conf.name}: {name} set {len(values)} times"
    return values[0]


def test_broker_packet_limit_matches_the_daemons_payload_limit() -> None:
    """The broker refuses what the daemon would refuse, with room for a topic: a payload
    of max_payload_bytes on the longest topic a sensor may use fits, 1 KiB more does not."""
    doc = tomllib.loads((DEPLOY / "seqstream.toml").read_text())
    payload = doc["input"]["max_payload_bytes"]
    assert payload == InputConfig().max_payload_bytes  # the example is the default
    stream_id = doc["input"]["max_stream_id_bytes"]
    longest = max(len(doc["input"]["topic"]), len(doc["input"]["reset_topic"]))
    longest += stream_id - len("{stream}")
    header = 1 + 4 + 2 + 2  # fixed header, remaining length, topic length, packet id
    for name in ("mosquitto.conf", "mosquitto-tls.conf"):
        limit = int(_option(DEPLOY / name, "max_packet_size"))
        assert payload + longest + header <= limit <= payload + 1024, name


def test_the_acl_gives_each_sensor_its_own_topics_only() -> None:
    lines = [
        line.split()
        for line in (DEPLOY / "mosquitto.acl").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    patterns = [line[1:] for line in lines if line[0] == "pattern"]
    assert patterns == [["write", "sensors/%u/data"], ["write", "sensors/%u/reset"]]
    # no account writes every stream's topics
    assert not [line for line in lines if line[:2] == ["topic", "write"] and "+" in line[2]
                and line[2].startswith("sensors/")]  # fmt: skip
