"""The ARM64 proof: seqstream's runtime on an emulated aarch64 Debian, against this host.

Run as root on a Debian amd64 box (``bash scripts/arm64-proof.sh`` sets it up and calls
this). Prints one JSON document. The phases, each timed:

1. ``host``: the Debian packages ``debootstrap``, ``qemu-user-static`` and
   ``binfmt-support`` (installed when missing), ``binfmt_misc`` mounted and the
   ``qemu-aarch64`` handler enabled, so that aarch64 ELF binaries run here through qemu.
2. ``rootfs``: an arm64 Debian bookworm root by ``debootstrap`` (minbase + python3,
   python3-venv), cached in ``.cache/arm64-proof/rootfs`` and reused when present.
3. ``wheel`` / ``install``: ``pip wheel --no-deps .`` here, then inside the root a venv
   where ``pip install`` of that wheel pulls the aarch64 wheels of numpy, onnxruntime,
   paho-mqtt and prometheus-client from PyPI. Torch must not be there (checked).
4. ``train``: a small GRU classifier on the shipped BasicMotions, trained and exported
   on the host (cached in ``.cache/arm64-proof/model``, retrained when the recipe changes).
5. ``eval``: ``seqstream eval`` of that model on the test split here and inside the root;
   also the raw stepwise probabilities of every case on both sides, compared.
6. ``daemon``: a private mosquitto on a free loopback port on the host (the chroot shares
   the network namespace); ``seqstream run`` inside the root as ``nobody``; every test
   case replayed by ``seqstream replay`` inside the root; every prediction collected
   here and compared with this host's offline stepwise run of the same cases.

The daemon batches streams and the two sides use different onnxruntime kernels (AVX
here, NEON there, under qemu), so predictions agree within ``--atol`` (probabilities),
not bit for bit; the labels must be identical. Mounts made inside the root (proc,
dev) and processes started here are undone in ``finally``; a stale mount from a killed
run is undone at start. Timings under qemu on a shared 2-core box are noisy.

    python benchmarks/arm64_proof.py [--cases 40] [--rate 0] [--atol 1e-4] [--rebuild]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.model import StepModel  # noqa: E402
from pipeline.offline import datasets  # noqa: E402
from pipeline.offline.evaluation import run_stepwise  # noqa: E402
from tests.integration.broker import HOST, Broker, free_port  # noqa: E402
from tests.integration.conftest import (  # noqa: E402
    Collector,
    daemon_config,
    predictions_by_stream,
    write_toml,
)

CACHE = REPO / ".cache" / "arm64-proof"
ROOT = CACHE / "rootfs"
SUITE, MIRROR = "bookworm", "http://deb.debian.org/debian"
HOST_PACKAGES = {
    "debootstrap": "/usr/sbin/debootstrap",
    "qemu-user-static": "/usr/bin/qemu-aarch64-static",
    "binfmt-support": "/usr/sbin/update-binfmts",
}
BINFMT = Path("/proc/sys/fs/binfmt_misc")
VENV = "/opt/seqstream"  # inside the root
WORK = "/opt/proof"  # inside the root: model, data, config, wheel
DATA = REPO / "examples" / "data" / "basicmotions"
TRAIN_ARGS = [
    "--task", "classify", "--cell", "gru", "--hidden", "24", "--layers", "1",
    "--epochs", "40", "--seed", "0",
]  # fmt: skip
NOBODY = 65534
HOST_CA = "/etc/ssl/certs/ca-certificates.crt"


def sh(*cmd: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` niced (the box is shared), failing loudly with its output."""
    proc = subprocess.run(["nice", "-n", "10", *cmd], text=True, capture_output=True, **kw)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}"
            f"\n{proc.stderr[-3000:]}"
        )
    return proc


def in_root(*cmd: str, user: int | None = None) -> list[str]:
    """A command line running ``cmd`` in the arm64 root with a clean environment."""
    spec = [f"--userspec={user}:{user}"] if user is not None else []
    env = ["env", "-i", "PATH=/usr/local/bin:/usr/bin:/bin", "HOME=/root", "LANG=C.UTF-8"]
    return ["chroot", *spec, str(ROOT), *env, *cmd]


# -- 1. the host can run aarch64 binaries ----------------------------------------------


def host_setup() -> dict[str, Any]:
    missing = [pkg for pkg, path in HOST_PACKAGES.items() if not Path(path).exists()]
    if missing:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        sh("apt-get", "update", "-q", env=env)
        sh("apt-get", "install", "-y", "-q", "--no-install-recommends", *missing, env=env)
    if not (BINFMT / "status").exists():
        sh("mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT))
    sh("update-binfmts", "--enable", "qemu-aarch64")
    handler = (BINFMT / "qemu-aarch64").read_text()
    if not handler.startswith("enabled"):
        raise RuntimeError(f"binfmt handler qemu-aarch64 not enabled:\n{handler}")
    # 'F' (fix binary): the kernel keeps qemu open, so it need not exist inside the root
    flags = next(line.split()[1] for line in handler.splitlines() if line.startswith("flags"))
    qemu = sh("qemu-aarch64-static", "--version").stdout.splitlines()[0]
    return {"installed": missing, "binfmt_flags": flags, "qemu": qemu}


# -- 2. the arm64 root -----------------------------------------------------------------


def mounts_under(root: Path) -> list[str]:
    """Mount points inside ``root`` (deepest first), from /proc/mounts."""
    prefix = str(root.resolve()) + "/"
    points = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    return sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True)


def unmount_all(root: Path) -> None:
    """Undo every mount inside ``root``; lazily when busy, and fail if one is left."""
    for point in mounts_under(root):
        if subprocess.run(["umount", point]).returncode != 0:
            subprocess.run(["umount", "-l", point])
    left = mounts_under(root)
    if left:
        raise RuntimeError(f"still mounted inside the root: {left}")


def build_root(rebuild: bool) -> dict[str, Any]:
    marker = ROOT / ".seqstream-rootfs-ok"
    if rebuild and ROOT.exists():
        unmount_all(ROOT)
        shutil.rmtree(ROOT)
    if marker.exists():
        return {"cached": True}
    tmp = CACHE / "rootfs.tmp"
    if tmp.exists():
        unmount_all(tmp)
        shutil.rmtree(tmp)
    include = "python3,python3-venv,ca-certificates"
    try:
        sh("debootstrap", "--arch=arm64", "--variant=minbase", f"--include={include}",
           SUITE, str(tmp), MIRROR)  # fmt: skip
    finally:
        unmount_all(tmp)
    (tmp / ".seqstream-rootfs-ok").write_text(f"{SUITE} {MIRROR}\n")
    tmp.rename(ROOT)
    return {"cached": False}


@contextlib.contextmanager
def mounted(root: Path) -> Iterator[None]:
    """proc and dev inside the root while it runs; always unmounted afterwards.

    Not sysfs: under qemu-user 7.2 the guest's /proc/cpuinfo is the x86 host's, and with
    the host's /sys/devices/system/cpu beside it ``import onnxruntime`` (its cpuinfo
    library) dies with SIGSEGV; without sysfs it warns that it cannot read the CPU list
    and runs. A real arm64 box has both, consistent.
    """
    unmount_all(root)  # a previous run that was killed
    try:
        sh("mount", "-t", "proc", "proc", str(root / "proc"))
        sh("mount", "--bind", "/dev", str(root / "dev"))
        yield
    finally:
        unmount_all(root)


# -- 3. the runtime from the wheel -------------------------------------------------------


def build_wheel() -> Path:
    """``pip wheel --no-deps`` of the working tree's tracked files, copied aside first.

    Built in a copy so that setuptools' ``build/`` of an earlier run can never put a
    deleted module into the wheel, and nothing is left in the checkout.
    """
    src, out = CACHE / "src", CACHE / "wheel"
    for d in (src, out):
        shutil.rmtree(d, ignore_errors=True)
    files = sh("git", "-C", str(REPO), "ls-files", "-z").stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
       str(out), str(src))  # fmt: skip
    (wheel,) = out.glob("seqstream-*.whl")
    return wheel


def in_root_path(path: str) -> Path:
    """``path`` inside the root with its symlinks followed there (absolute ones too)."""
    p = ROOT / path.lstrip("/")
    for _ in range(40):
        if not p.is_symlink():
            return p
        target = os.readlink(p)
        p = ROOT / target.lstrip("/") if target.startswith("/") else p.parent / target
    raise RuntimeError(f"symlink loop at {path}")


def install(wheel: Path) -> dict[str, Any]:
    work = ROOT / WORK.lstrip("/")
    work.mkdir(parents=True, exist_ok=True)
    shutil.copy2(wheel, work / wheel.name)
    shutil.copy2("/etc/resolv.conf", ROOT / "etc" / "resolv.conf")
    # the host's CA bundle: it trusts what the host trusts (a TLS-inspecting proxy's CA)
    shutil.copy2(HOST_CA, work / "host-ca.crt")
    if not (ROOT / VENV.lstrip("/") / "bin" / "python").exists():
        sh(*in_root("python3", "-m", "venv", VENV))
    pip = [f"{VENV}/bin/pip", "--disable-pip-version-check", "install", "--cert",
           f"{WORK}/host-ca.crt", "--index-url",
           "https://pypi.org/simple"]  # fmt: skip
    sh(*in_root(*pip, f"{WORK}/{wheel.name}"))  # the dependencies, when missing
    sh(*in_root(*pip, "--force-reinstall", "--no-deps", f"{WORK}/{wheel.name}"))
    probe = (
        "import importlib.metadata as m, importlib.util as u, json, platform;"
        "print(json.dumps({'machine': platform.machine(), 'python': platform.python_version(),"
        "'torch_importable': u.find_spec('torch') is not None,"
        "**{p: m.version(p) for p in ('seqstream', 'numpy', 'onnxruntime', 'paho-mqtt',"
        "'prometheus-client')}}))"
    )
    inside: dict[str, Any] = json.loads(sh(*in_root(f"{VENV}/bin/python", "-c", probe)).stdout)
    if inside["torch_importable"]:
        raise RuntimeError("torch is importable inside the root: the runtime must not need it")
    inside["uname_m"] = sh(*in_root("uname", "-m")).stdout.strip()
    # the interpreter's ELF e_machine: 0xB7 is EM_AARCH64 (not the host's python, copied)
    elf = in_root_path(f"{VENV}/bin/python").read_bytes()[:20]
    inside["python_elf_machine"] = hex(int.from_bytes(elf[18:20], "little"))
    return inside


# -- 4. a small model, trained on the host ----------------------------------------------


def train_model() -> tuple[Path, dict[str, Any]]:
    out = CACHE / "model"
    model = out / "model.onnx"
    recipe = json.dumps(TRAIN_ARGS)
    key = hashlib.sha256(recipe.encode()).hexdigest()[:16]
    if model.exists() and (out / "recipe").read_text() == key:
        return model, {"cached": True, "args": TRAIN_ARGS}
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    exe = str(Path(sys.executable).parent / "seqstream")
    sh(exe, "train", *TRAIN_ARGS, "--data", str(DATA / "BasicMotions_TRAIN.ts"),
       "--out", str(out / "train"))  # fmt: skip
    sh(exe, "export", str(out / "train"), "--out", str(model))
    (out / "recipe").write_text(key)
    return model, {"cached": False, "args": TRAIN_ARGS}


# -- 5. eval here and inside --------------------------------------------------------------

DUMP = """
import sys, numpy as np
from pipeline.offline import datasets
from pipeline.offline.evaluation import run_stepwise
from pipeline.model import StepModel
cases = datasets.load(sys.argv[2]).cases
out = run_stepwise(StepModel.load(sys.argv[1]), list(cases))
np.save(sys.argv[3], np.stack([o["probs"] for o in out]))
"""


def strip(case: dict[str, Any]) -> dict[str, Any]:
    """A case of ``eval``'s report without its confidence (rounded floats, compared apart)."""
    return {k: v for k, v in case.items() if k != "confidence"}


def evaluate(model: Path) -> dict[str, Any]:
    test = DATA / "BasicMotions_TEST.ts"
    work = ROOT / WORK.lstrip("/")
    shutil.copy2(model, work / "model.onnx")
    shutil.copy2(test, work / test.name)
    exe = str(Path(sys.executable).parent / "seqstream")
    t0 = time.monotonic()
    host = json.loads(sh(exe, "eval", str(model), "--data", str(test)).stdout)
    t1 = time.monotonic()
    model_in, test_in = f"{WORK}/model.onnx", f"{WORK}/{test.name}"
    arm = json.loads(
        sh(*in_root(f"{VENV}/bin/seqstream", "eval", model_in, "--data", test_in)).stdout
    )
    t2 = time.monotonic()
    sh(*in_root(f"{VENV}/bin/python", "-c", DUMP, model_in, test_in, f"{WORK}/probs.npy"))
    data = datasets.load(test)
    here = np.stack([o["probs"] for o in run_stepwise(StepModel.load(model), list(data.cases))])
    there = np.load(work / "probs.npy")
    return {
        "host_accuracy": host["accuracy"],
        "arm64_accuracy": arm["accuracy"],
        "n_cases": arm["n_cases"],
        "confusion_equal": host["confusion_matrix"] == arm["confusion_matrix"],
        "case_predictions_equal": [strip(c) for c in host["cases"]]
        == [strip(c) for c in arm["cases"]],
        "confidence_max_abs_diff": max(
            abs(h["confidence"] - a["confidence"])
            for h, a in zip(host["cases"], arm["cases"], strict=True)
        ),
        "host_eval_s": round(t1 - t0, 2),
        "arm64_eval_s": round(t2 - t1, 2),
        "stepwise_probs_max_abs_diff": float(np.abs(here - there).max()),
        "stepwise_labels_equal": bool((here.argmax(-1) == there.argmax(-1)).all()),
        "stepwise_steps": int(here.shape[0] * here.shape[1]),
    }


# -- 6. the daemon round trip -------------------------------------------------------------


def round_trip(model: Path, n_cases: int, rate: float, atol: float) -> dict[str, Any]:
    test = DATA / "BasicMotions_TEST.ts"
    data = datasets.load(test)
    n = min(n_cases, data.n_cases)
    cases = list(data.cases[:n])
    expected = [o["probs"] for o in run_stepwise(StepModel.load(model), cases)]
    total = sum(len(c) for c in cases)
    run_dir = ROOT / WORK.lstrip("/") / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    os.chown(run_dir, NOBODY, NOBODY)
    shutil.rmtree(CACHE / "broker", ignore_errors=True)  # its persistence of a past run
    broker = Broker(CACHE / "broker", extra="allow_anonymous true")
    broker.start()
    daemon: subprocess.Popen[bytes] | None = None
    collectors: list[Collector] = []
    try:
        doc = daemon_config(Path(f"{WORK}/run"), Path(f"{WORK}/model.onnx"), broker.port, "arm64")
        doc["metrics"] = {"port": free_port(), "bind": HOST}
        write_toml(run_dir / "seqstream.toml", doc)
        status = Collector(broker.port, "seqstream/arm64/status")
        preds = Collector(broker.port, "predictions/#")
        collectors += [status, preds]
        config = f"{WORK}/run/seqstream.toml"
        t0 = time.monotonic()
        with (run_dir / "daemon.log").open("wb") as log:
            run = in_root(f"{VENV}/bin/seqstream", "run", "--config", config, user=NOBODY)
            daemon = subprocess.Popen(
                ["nice", "-n", "10", *run],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        assert status.take(1, timeout=300)[0][1] == b"online", "daemon did not come online"
        t1 = time.monotonic()
        argv = ["replay", f"{WORK}/{test.name}", "--broker", f"mqtt://{HOST}:{broker.port}",
                "--cases", str(n), "--prefix", "arm-", "--rate", str(rate)]  # fmt: skip
        sh(*in_root(f"{VENV}/bin/seqstream", "--log-level", "WARNING", *argv))
        t2 = time.monotonic()
        by_stream = predictions_by_stream(preds.take(total, timeout=600))
        t3 = time.monotonic()
        url = f"http://{HOST}:{doc['metrics']['port']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            scraped = resp.read().decode()
        published = sum(
            float(line.split()[-1])
            for line in scraped.splitlines()
            if line.startswith("seqstream_predictions_published_total")
        )
        daemon.send_signal(signal.SIGTERM)
        rc = daemon.wait(60)
        offline = status.take(1, timeout=30)[0][1] == b"offline"
    finally:
        for c in collectors:
            c.close()
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        broker.stop()
    worst, labels_equal, seqs_ok = 0.0, True, True
    for i in range(n):
        got = by_stream.get(f"arm-{data.case_name(i)}", [])
        seqs_ok &= [p["seq"] for p in got] == list(range(len(cases[i])))
        if not got:
            continue
        probs = np.array([list(p["probs"].values()) for p in got], dtype=np.float32)
        names = list(got[0]["probs"])
        want = expected[i][: len(probs)]
        worst = max(worst, float(np.abs(probs - want).max()))
        labels_equal &= [p["label"] for p in got] == [names[k] for k in want.argmax(axis=1)]
    return {
        "streams": n,
        "predictions": sum(len(v) for v in by_stream.values()),
        "expected_predictions": total,
        "seqs_complete_in_order": seqs_ok,
        "labels_equal": labels_equal,
        "probs_max_abs_diff": worst,
        "atol": atol,
        "predictions_equal": seqs_ok and labels_equal and worst <= atol,
        "metrics_predictions_published": published,
        "daemon_exit_code": rc,
        "offline_status_published": offline,
        "startup_s": round(t1 - t0, 2),
        "replay_s": round(t2 - t1, 2),
        "drain_after_replay_s": round(t3 - t2, 2),
        "steps_per_s": round(total / (t3 - t1), 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=40, help="test cases replayed (max 40)")
    ap.add_argument("--rate", type=float, default=0.0, help="replay rows/s per stream (0: max)")
    ap.add_argument("--atol", type=float, default=1e-4, help="probability tolerance")
    ap.add_argument("--rebuild", action="store_true", help="debootstrap the root afresh")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("the ARM64 proof needs root (debootstrap, chroot, mount)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that finally unmounts
    CACHE.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"host_machine": os.uname().machine}
    phases: dict[str, float] = {}

    def timed(name: str, fn: Any, *a: Any) -> Any:
        print(f"arm64-proof: {name} ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            return fn(*a)
        finally:
            phases[name] = round(time.monotonic() - t0, 1)

    t_all = time.monotonic()
    report["host"] = timed("host", host_setup)
    report["rootfs"] = timed("rootfs", build_root, args.rebuild)
    wheel = timed("wheel", build_wheel)
    model, report["model"] = timed("train", train_model)
    with mounted(ROOT):
        report["inside"] = timed("install", install, wheel)
        report["eval"] = timed("eval", evaluate, model)
        report["daemon"] = timed("daemon", round_trip, model, args.cases, args.rate, args.atol)
    report["mounts_left_inside_root"] = mounts_under(ROOT)
    phases["total"] = round(time.monotonic() - t_all, 1)
    report["phases_s"] = phases
    ev, dm = report["eval"], report["daemon"]
    report["ok"] = bool(
        report["inside"]["machine"] == "aarch64"
        and ev["arm64_accuracy"] == ev["host_accuracy"]
        and ev["confusion_equal"]
        and ev["case_predictions_equal"]
        and ev["stepwise_labels_equal"]
        and ev["stepwise_probs_max_abs_diff"] <= args.atol
        and ev["confidence_max_abs_diff"] <= args.atol
        and dm["predictions_equal"]
        and dm["daemon_exit_code"] == 0
        and not report["mounts_left_inside_root"]
    )
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
