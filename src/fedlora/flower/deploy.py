"""Local launching: a whole Flower deployment on loopback, or Flower's simulation engine.

`LocalDeployment` writes the app folder (`app_folder.write_app`), then starts one
`flower-superlink` and N `flower-supernode` processes on free loopback ports, submits the app
with `flwr run`, waits for the ServerApp's outputs, and always stops every process it started.
With `secure=True` it runs what a production deployment runs (docs/flower.md, "Secure
deployment"): TLS from a CA made for the run (`certs.py`) and SuperNode authentication, each
node's public key registered with `flwr supernode register` before the node starts. With
`simulation=True` the SuperLink runs Flower's simulation engine (`--simulation`, Ray): no
SuperNode processes; `flwr run --federation-config "num-supernodes=N ..."` makes N virtual nodes
whose ClientApps run in Ray actors (`cpus_per_client` CPUs each, so 2 cores hold 2 actors).

>>> with LocalDeployment(cfg, workdir) as dep:                      # doctest: +SKIP
...     dep.run_app()              # blocks until output/metrics.jsonl exists
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fedlora.config import RunConfig
from fedlora.config.sources import federation_size
from fedlora.flower.app_folder import write_app

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    """A Flower command from this Python's environment (its bin folder must also be on PATH,
    since flower-superlink spawns flower-superexec by name)."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


class LocalDeployment:
    """One SuperLink and `num_nodes` SuperNodes on 127.0.0.1.

    Insecure by default (`--insecure`: plain HTTP, any node admitted; loopback only). With
    `secure=True`: TLS on the SuperLink (`workdir/certs`, server certificate for 127.0.0.1 and
    localhost), `--enable-supernode-auth`, and one registered key pair per node (`workdir/keys`);
    SuperNodes and the `flwr` CLI trust only `certs/ca.crt`."""

    def __init__(self, cfg: RunConfig, workdir: str | Path, num_nodes: int | None = None,
                 round_timeout: float = 120.0, min_nodes: int | None = None, threads: int = 1,
                 secure: bool = False, simulation: bool = False, cpus_per_client: int = 1):
        if secure and simulation:
            raise ValueError("simulation runs in one machine's processes: there is no transport to secure")
        self.cfg = cfg
        self.simulation, self.cpus_per_client = simulation, int(cpus_per_client)
        self.workdir = Path(workdir).absolute()
        # 0: a bare SuperLink (simulation: the engine's virtual nodes, no processes of ours)
        self.num_nodes = 0 if simulation else federation_size(cfg) if num_nodes is None else num_nodes
        self.round_timeout = round_timeout
        self.min_nodes = min_nodes
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.output = self.workdir / "output"
        self.secure = secure
        self.tls = None  # certs.TlsFiles once started in secure mode
        self.registered: dict[str, int] = {}  # public key file -> the node id the SuperLink gave it
        env = {**os.environ, "FLWR_HOME": str(self.workdir / "flwr-home"), "FLWR_TELEMETRY_ENABLED": "0",
               "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.env = env

    # --- processes -------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = (self.workdir / "logs" / f"{name}.log").open("w")
        # A new session per process: stop() kills the process group, which includes the
        # flower-superexec and ClientApp/ServerApp children each one spawns.
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                cwd=self.workdir, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start(self) -> LocalDeployment:
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        (self.workdir / "flwr-home").mkdir(exist_ok=True)
        if self.secure:
            from fedlora.flower.certs import write_tls

            self.tls = write_tls(self.workdir / "certs")
            # Node auth admits only keys registered through the Control API; Flower refuses it
            # without TLS, so the two always come together.
            transport = [*self.tls.superlink_args(), "--enable-supernode-auth"]
        else:
            transport = ["--insecure"] + (["--simulation"] if self.simulation else [])
        self._spawn("superlink", [_bin("flower-superlink"), *transport, "--host", "127.0.0.1",
                                  "--port", str(self.port), "--database", ":flwr-in-memory:",
                                  "--disable-runtime-dependency-installation"])
        self._wait_port(self.port)
        self._write_cli_config()
        for i in range(self.num_nodes):
            self.start_node(i)
        return self

    def _write_cli_config(self) -> None:
        """The `flwr` CLI's connection `fedlora-local` (FLWR_HOME/config.toml): run, ls, register."""
        trust = (f'root-certificates = "{self.tls.ca_cert}"' if self.tls else "insecure = true")
        (self.workdir / "flwr-home" / "config.toml").write_text(
            f'[superlink]\ndefault = "fedlora-local"\n\n[superlink.fedlora-local]\n'
            f'address = "127.0.0.1:{self.port}"\n{trust}\n', encoding="utf-8")

    def register(self, public_key: str | Path) -> int:
        """`flwr supernode register PUBLIC_KEY`: admit the holder of its private key; its node id."""
        out = self._flwr("supernode", "register", str(public_key), "fedlora-local", "--format", "json")
        try:
            node_id = int(json.loads(out.stdout)["node-id"])
        except (ValueError, KeyError, TypeError):
            raise RuntimeError(f"flwr supernode register {public_key} failed: {out.stdout[-1000:]}{out.stderr[-1000:]}")
        self.registered[str(public_key)] = node_id
        return node_id

    def nodes(self) -> dict[int, str]:
        """`flwr supernode list`: node id -> status ("registered", "online", "offline") of every
        node the SuperLink knows."""
        out = self._flwr("supernode", "list", "fedlora-local", "--format", "json", timeout=60)
        try:
            return {int(n["node-id"]): str(n["status"]) for n in json.loads(out.stdout)["nodes"]}
        except (ValueError, KeyError, TypeError):
            raise RuntimeError(f"flwr supernode list failed: {out.stdout[-1000:]}{out.stderr[-1000:]}")

    def start_node(self, i: int, name: str | None = None, private_key: str | Path | None = None,
                   trust_ca: bool = True) -> subprocess.Popen:
        """SuperNode for partition `i` (its log: logs/NAME.log, NAME defaulting to supernode-i).

        Secure mode: a fresh key pair registered before the node starts, unless `private_key` is
        given (then registering it is the caller's business: an unregistered key is how a test
        plays an intruder); `trust_ca=False` leaves out `--root-certificates`, so the node checks
        the server against the system's CAs only, as a client that was never given ca.crt."""
        name = name or f"supernode-{i}"
        n = federation_size(self.cfg)
        if not self.secure:
            transport = ["--insecure"]
        else:
            if private_key is None:
                from fedlora.flower.certs import write_node_key

                private_key, public_key = write_node_key(self.workdir / "keys", name)
                self.register(public_key)
            transport = ["--auth-supernode-private-key", str(private_key)]
            if trust_ca:
                transport += ["--root-certificates", str(self.tls.ca_cert)]
        return self._spawn(name, [
            _bin("flower-supernode"), *transport, "--superlink", f"127.0.0.1:{self.port}",
            "--host", "127.0.0.1", "--port", str(free_port()),
            "--node-config", f"partition-id={i} num-partitions={n}"])

    def _flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([_bin("flwr"), *args], env=self.env, cwd=self.workdir,
                              capture_output=True, text=True, timeout=timeout)

    def kill_node(self, i: int) -> None:
        self._kill(self.procs[f"supernode-{i}"], signal.SIGKILL)

    def _wait_port(self, port: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s; see {self.workdir}/logs")

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if name == "superlink" and proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.workdir}/logs/{name}.log")

    @staticmethod
    def _kill(proc: subprocess.Popen, sig: int) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)  # its own session: the group holds only what it spawned
            except ProcessLookupError:
                pass

    def _descendants(self) -> list:
        """Every live process below the ones we started, found before any is stopped: Flower starts
        SuperExec (and through it the app processes) in sessions of their own, which a process
        group kill misses, and orphans would no longer be found below their parent."""
        try:
            import psutil
        except ImportError:
            return []
        found = []
        for proc in self.procs.values():
            try:
                found += psutil.Process(proc.pid).children(recursive=True)
            except psutil.Error:
                pass
        return found

    def stop(self) -> dict[str, int | None]:
        """SIGTERM every process group we started, SIGKILL what is left after 10 s (and every
        descendant in another session); exit codes."""
        stragglers = self._descendants()
        for proc in self.procs.values():
            self._kill(proc, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._kill(proc, signal.SIGKILL)
                proc.wait(timeout=5)
        for proc in self.procs.values():  # children (superexec, app processes) of a killed group
            self._kill(proc, signal.SIGKILL)
        for child in stragglers:  # psutil checks the process is still the one it found (pid reuse)
            try:
                child.kill()
            except Exception:  # noqa: BLE001 (gone already, or psutil.Error)
                pass
        return {name: proc.returncode for name, proc in self.procs.items()}

    def __enter__(self) -> LocalDeployment:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.exit_codes = self.stop()

    # --- the run ---------------------------------------------------------------------------
    def run_app(self, timeout: float = 300.0, on_wait=None, resume: bool = False) -> Path:
        """Write the app, `flwr run` it, and wait for the ServerApp's metrics.jsonl (resume: continue
        the run in output/ from its newest checkpoint, flower/rundir.py)."""
        app = write_app(self.cfg, self.workdir / "app", self.output, self.round_timeout, self.min_nodes, resume)
        engine = []
        if self.simulation:  # virtual SuperNodes, one per client; partition-id i for node i
            engine = ["--federation-config", f"num-supernodes={federation_size(self.cfg)} "
                      f"client-resources-num-cpus={self.cpus_per_client}"]
        submit = self._flwr("run", str(app), "fedlora-local", "--format", "json", *engine)
        (self.workdir / "logs" / "flwr-run.log").write_text(submit.stdout + submit.stderr)
        if submit.returncode != 0:
            raise RuntimeError(f"flwr run failed ({submit.returncode}): {submit.stdout[-2000:]}{submit.stderr[-2000:]}")
        self.run_id = str(json.loads(submit.stdout)["run-id"])
        deadline = time.monotonic() + timeout
        done = self.output / "metrics.jsonl"
        polled = time.monotonic()
        while not done.exists():
            self._check_alive()
            if (self.output / "error.txt").exists():
                raise RuntimeError("the ServerApp failed:\n" + (self.output / "error.txt").read_text()[-3000:])
            if on_wait is not None:
                on_wait()
            # A run that failed before our code ran (e.g. loading); `flwr ls` costs a CLI start
            # (about 2 s of CPU here), so it is asked rarely.
            if time.monotonic() - polled > 30:
                polled = time.monotonic()
                status, details = self.run_status()
                if status.startswith("finished") and not done.exists():
                    raise RuntimeError(f"the Flower run ended as {status!r}: {details}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {done} after {timeout} s; see {self.workdir}/logs")
            time.sleep(0.3)
        return self.output

    def run_status(self) -> tuple[str, str]:
        """(status, details) of the submitted run, as `flwr ls` reports it."""
        run = self.run_info()
        return str(run.get("status", "unknown")), str(run.get("status-details", run.get("error", "")))

    def run_info(self) -> dict:
        """`flwr ls --run-id` of the submitted run (status, timings, network-traffic bytes)."""
        ls = self._flwr("ls", "fedlora-local", "--run-id", self.run_id, "--format", "json", timeout=60)
        try:
            return dict(json.loads(ls.stdout)["runs"][0])
        except (ValueError, KeyError, IndexError):
            return {"error": ls.stdout[-500:] + ls.stderr[-500:]}
