"""A Spark standalone cluster (one master, one worker) on 127.0.0.1, from the pip-installed pyspark.

pip's pyspark has no ``sbin/start-master.sh``; this module starts the same JVM daemons
(``org.apache.spark.deploy.master.Master`` and ``...deploy.worker.Worker``) as background processes,
with their pid files, logs and the worker's work folder (executor logs, application files) in a
state folder of their own, never inside site-packages. ``unison spark-standalone start|stop|status``
is the command-line face of it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"
_MASTER_URL = re.compile(r"Starting Spark master at (spark://\S+)")
_MASTER_UI = re.compile(r"MasterWebUI.*started at (http://\S+)")
_REGISTERED = re.compile(r"Successfully registered with master (spark://\S+)")


class StandaloneError(RuntimeError):
    """The cluster could not be started, found or stopped; the message says why."""


def default_dir() -> Path:
    """``$XDG_CACHE_HOME/unison/spark-standalone`` (``~/.cache/...`` by default)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "unison" / "spark-standalone"


def _pyspark_dir() -> Path:
    try:
        import pyspark
    except ImportError as exc:
        raise StandaloneError("pyspark is not installed: pip install 'unison[spark]'") from exc
    return Path(pyspark.__file__).parent


def spark_home() -> Path:
    """``$SPARK_HOME``, else the pip-installed pyspark folder, which serves as one (it holds ``jars/``)."""
    home = os.environ.get("SPARK_HOME") or _pyspark_dir()
    if not (Path(home) / "jars").is_dir():
        raise StandaloneError(f"{home} has no jars/ folder: set SPARK_HOME to a Spark installation")
    return Path(home)


def isolated_spark_home(root: Path) -> Path:
    """A SPARK_HOME under ``root`` whose entries link to pyspark's own, except ``work``.

    A ``local-cluster[...]`` master writes executor folders into ``$SPARK_HOME/work`` (it has no
    setting for another place): point SPARK_HOME here, before the first SparkSession of the
    process starts its JVM, to keep them out of site-packages.
    """
    home = _pyspark_dir()
    root.mkdir(parents=True, exist_ok=True)
    for entry in home.iterdir():
        link = root / entry.name
        if entry.name in ("work", "__pycache__") or link.exists() or link.is_symlink():
            continue
        link.symlink_to(entry, target_is_directory=entry.is_dir())
    return root


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    java = os.path.join(java_home, "bin", "java") if java_home else shutil.which("java")
    if not java or not os.path.exists(java):
        raise StandaloneError("no Java runtime found: install Java 17 or 21 (e.g. `apt-get install -y "
                              "openjdk-17-jre-headless`) or set JAVA_HOME")
    return java


def _scala_version(home: Path) -> str:
    """The Scala version of the Spark jars (Spark's launcher needs it where there is no build dir)."""
    return next((m.group(1) for jar in (home / "jars").glob("spark-core_*.jar")
                 if (m := re.match(r"spark-core_(\d+\.\d+)-", jar.name))), "2.13")


def _daemon_command(home: Path, main_class: str, args: list[str], env: dict[str, str]) -> list[str]:
    """The JVM command line for ``main_class``, as Spark's ``bin/spark-class`` builds it (the JVM
    options Spark needs on Java 17+, SPARK_DAEMON_MEMORY, SPARK_DAEMON_JAVA_OPTS)."""
    out = subprocess.run(
        [_java(), "-Xmx128m", "-cp", str(home / "jars" / "*"), "org.apache.spark.launcher.Main",
         main_class, *args],
        env=env, capture_output=True, check=False,
    )
    command = [part.decode().strip() for part in out.stdout.split(b"\0") if part.strip()]
    if out.returncode != 0 or not command:
        raise StandaloneError(f"Spark's launcher could not build the {main_class} command:\n"
                              f"{out.stderr.decode(errors='replace')[-2000:]}")
    return command


def _cmdline(pid: int) -> str | None:
    """The command line of a live process ``pid`` (``""`` where /proc is missing), else ``None``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return ""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return None
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return "" if not Path("/proc/self").exists() else None


def _running(state_dir: Path, role: str, main_class: str) -> int | None:
    """The pid of this folder's ``role`` daemon if it runs, else ``None``."""
    pid_file = state_dir / f"{role}.pid"
    try:
        pid = int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    cmdline = _cmdline(pid)
    if cmdline is None or (cmdline and main_class not in cmdline):  # gone, or the pid was reused
        return None
    return pid


def _wait_for(pattern: re.Pattern[str], log: Path, proc: subprocess.Popen[bytes], timeout: float,
              what: str) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if m := pattern.search(text):
            return m
        if proc.poll() is not None:
            raise StandaloneError(f"the Spark {what} exited with code {proc.returncode}; its log "
                                  f"({log}):\n{text[-3000:]}")
        time.sleep(0.1)
    raise StandaloneError(f"the Spark {what} did not come up within {timeout:.0f} s; see {log}")


def _spawn(command: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        # A session of its own: it outlives this command and ignores the terminal's Ctrl-C.
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, start_new_session=True)


def status(state_dir: Path | None = None) -> dict[str, Any]:
    """What runs from ``state_dir``: ``{"running": bool, "master_url", "web_ui", "master_pid",
    "worker_pid", "dir"}``."""
    state_dir = Path(state_dir or default_dir())
    info: dict[str, Any] = {}
    try:
        info = json.loads((state_dir / "cluster.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        pass
    master = _running(state_dir, "master", MASTER_CLASS)
    worker = _running(state_dir, "worker", WORKER_CLASS)
    return {**info, "running": master is not None and worker is not None, "master_pid": master,
            "worker_pid": worker, "dir": str(state_dir)}


def start(state_dir: Path | None = None, port: int = 7077, webui_port: int = 8080, cores: int | None = None,
          memory: str = "2g", timeout: float = 90.0) -> dict[str, Any]:
    """Start a master and one worker on 127.0.0.1 and wait until the worker has registered.

    ``port``/``webui_port`` 0 pick free ports. Returns :func:`status` (``master_url`` for
    ``SparkSession.builder.master(...)``). A cluster already running from ``state_dir`` is left as it is.
    """
    state_dir = Path(state_dir or default_dir()).resolve()
    current = status(state_dir)
    if current["running"]:
        return current
    if current["master_pid"] or current["worker_pid"]:
        stop(state_dir)  # half of one: start afresh
    home = spark_home()
    state_dir.mkdir(parents=True, exist_ok=True)
    work = state_dir / "work"
    work.mkdir(exist_ok=True)
    cores = cores or os.cpu_count() or 1
    # SPARK_LOCAL_IP: the daemons, their web UIs and the executors listen on loopback only.
    env = dict(os.environ, SPARK_HOME=str(home), SPARK_LOCAL_IP="127.0.0.1",
               SPARK_SCALA_VERSION=_scala_version(home))  # the worker builds executor commands too
    env.setdefault("PYSPARK_PYTHON", sys.executable)  # what executors run unless a job says otherwise
    master_log, worker_log = state_dir / "master.log", state_dir / "worker.log"
    for log in (master_log, worker_log):
        log.write_bytes(b"")
    master_cmd = _daemon_command(home, MASTER_CLASS, ["--host", "127.0.0.1", "--port", str(port),
                                                      "--webui-port", str(webui_port)], env)
    master = _spawn(master_cmd, master_log, env, state_dir)
    (state_dir / "master.pid").write_text(str(master.pid))
    try:
        # Built while the master starts; its URL (which port 0 leaves open until then) goes in after.
        worker_cmd = _daemon_command(home, WORKER_CLASS, ["MASTER_URL", "--host", "127.0.0.1", "--cores",
                                                          str(cores), "--memory", memory, "--work-dir",
                                                          str(work), "--webui-port", "0"], env)
        url = _wait_for(_MASTER_URL, master_log, master, timeout, "master").group(1)
        ui = _wait_for(_MASTER_UI, master_log, master, timeout, "master's web UI").group(1)
        worker_cmd[worker_cmd.index(WORKER_CLASS) + 1] = url
        worker = _spawn(worker_cmd, worker_log, env, state_dir)
        (state_dir / "worker.pid").write_text(str(worker.pid))
        _wait_for(_REGISTERED, worker_log, worker, timeout, "worker")
    except BaseException:
        stop(state_dir)
        raise
    info = {"master_url": url, "web_ui": ui, "cores": cores, "memory": memory}
    (state_dir / "cluster.json").write_text(json.dumps(info, indent=2) + "\n")
    return status(state_dir)


def stop(state_dir: Path | None = None, timeout: float = 15.0) -> list[int]:
    """Stop the worker (and with it its executors), then the master; return the pids stopped."""
    state_dir = Path(state_dir or default_dir())
    stopped = []
    for role, main_class in (("worker", WORKER_CLASS), ("master", MASTER_CLASS)):
        pid = _running(state_dir, role, main_class)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _cmdline(pid) is not None and time.monotonic() < deadline:
                time.sleep(0.1)
            if _cmdline(pid) is not None:
                os.kill(pid, signal.SIGKILL)
            stopped.append(pid)
        (state_dir / f"{role}.pid").unlink(missing_ok=True)
    (state_dir / "cluster.json").unlink(missing_ok=True)
    return stopped
