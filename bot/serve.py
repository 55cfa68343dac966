"""`bot serve`: run the bot as one or more worker processes.

One worker = one asyncio process (uvicorn + FastAPI). With --workers N the supervisor binds the
port once and starts N worker processes that inherit that one listening socket (BOT_LISTEN_FD), so
they share one accept queue: a worker that dies loses only the connections it had accepted, never
ones still queued (per-worker SO_REUSEPORT queues are reset when their owner dies). Workers share
one Redis and write Prometheus metrics in multiprocess mode (PROMETHEUS_MULTIPROC_DIR), so any
worker's /metrics shows the sum. Without REDIS_URL the supervisor starts an embedded
redis-server (AOF under BOT_DATA_DIR) and hands its URL to the workers.

A worker that dies is replaced under the same id (`<host>-w<i>`); the calls it held are closed at once
(outcome worker_lost) by a one-shot `python -m bot.reaper` for that id and pid, so neither its replacement's
calls nor a 30-45 s wait for stale heartbeats are involved (docs/state.md).

Shutdown (SIGTERM/SIGINT): each worker refuses new calls (Twilio webhook: 503), keeps listening until the
streams of calls it answered just before have opened (at most STREAM_WAIT_S), stops listening, lets live calls
run for up to BOT_SHUTDOWN_GRACE_S (the wait included), ends the rest, flushes call state, then exits. A second
signal forces.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

import uvicorn

from bot.config import Settings, load_settings
from bot.redis_embedded import EmbeddedRedis, die_with_parent
from ops.logs import configure_logging, get_logger

log = get_logger("bot.serve")

# how long a draining worker keeps listening for the streams of calls it answered just before (Twilio opens
# one well under a second after fetching the TwiML; a caller who hangs up while it connects never opens it)
STREAM_WAIT_S = 5.0


LISTEN_FD_ENV = "BOT_LISTEN_FD"  # set by the supervisor for its workers; not a user setting


def bind_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    return sock


def inherited_socket() -> socket.socket | None:
    """The supervisor's listening socket, when this process is one of its workers."""
    fd = os.environ.get(LISTEN_FD_ENV)
    return socket.socket(fileno=int(fd)) if fd else None


class DrainingServer(uvicorn.Server):
    """First signal: drain calls (bounded), then the normal uvicorn shutdown. Second: force.
    A first signal during the app's start-up (engine, first prompts: seconds, more on a cold voice cache)
    stops the start-up at once (app.state.abort_startup) instead of being held until it ends."""

    def __init__(self, config: uvicorn.Config, grace_s: float) -> None:
        super().__init__(config)
        self.grace_s = grace_s
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        if self.should_exit:  # a signal came while uvicorn was loading the app
            self._abort_startup()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or self._loop is None:
            self.should_exit = True
            self.force_exit = self._draining
            return
        self._draining = True
        if not self.started:  # still in the lifespan start-up: nothing to drain, stop it
            self.should_exit = True
            self._loop.call_soon_threadsafe(self._abort_startup, sig)
            return
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))  # type: ignore[union-attr]

    def _mark_draining(self) -> None:
        app = self.config.loaded_app if self.config.loaded else None
        while app is not None:
            if hasattr(app, "router") and hasattr(app, "state"):  # FastAPI itself, under any middleware
                app.state.draining = True
                return
            app = getattr(app, "app", None)  # unwrap middleware

    def _app_state(self, name: str) -> object | None:
        app = self.config.loaded_app if self.config.loaded else None
        while app is not None:
            st = getattr(app, "state", None)
            if st is not None and getattr(st, name, None) is not None:
                return getattr(st, name)
            app = getattr(app, "app", None)  # unwrap middleware to reach FastAPI
        return None

    def _abort_startup(self, sig: int = 0) -> None:
        log.info("startup_interrupted", signal=signal.Signals(sig).name if sig else None)
        abort = self._app_state("abort_startup")
        if callable(abort):
            abort()

    async def _drain(self) -> None:
        from telephony.twilio import server as twilio_server  # the worker's (the supervisor never drains)

        t0 = time.monotonic()
        # new Twilio calls get 503 from now on (Twilio's Fallback URL -> a healthy worker). Calls this worker
        # already answered with TwiML open their stream a moment later, on a new connection: keep listening
        # until they have (bounded), or the caller who was answered would hear silence and be dropped
        twilio_server.begin_drain()
        self._mark_draining()  # /readyz 503 from now on: the load balancer stops sending calls during the wait
        sip = self._app_state("sip")  # SIP's INVITEs get 503 now too, not only once the wait below is over
        if callable(refuse := getattr(sip, "refuse_new_calls", None)):
            refuse()
        left = await twilio_server.wait_pending_streams(min(STREAM_WAIT_S, self.grace_s))
        if left:
            log.warning("twilio_streams_not_opened", calls=left, waited_s=round(time.monotonic() - t0, 2))
        for server in getattr(self, "servers", []):
            server.close()  # stop accepting; live WebSockets carry on
        calls = self._app_state("calls")
        if calls is not None:
            # the wait above is part of the grace: the orchestrator's kill timeout is sized from it
            await calls.drain(max(self.grace_s - (time.monotonic() - t0), 0.0))  # type: ignore[attr-defined]
        self.should_exit = True


def run_worker(settings: Settings, sock: socket.socket | None = None) -> int:
    configure_logging()
    from bot.app import create_app

    app = create_app(settings)
    # no permessage-deflate: 20 ms mu-law frames do not compress, and zlib per frame cost measurable CPU
    config = uvicorn.Config(app, lifespan="on", log_config=None, access_log=False, ws_max_size=1 << 20,
                            ws_per_message_deflate=False,
                            timeout_graceful_shutdown=10, proxy_headers=True,
                            forwarded_allow_ips=settings.forwarded_allow_ips)
    server = DrainingServer(config, settings.shutdown_grace_s)
    sock = sock or inherited_socket() or bind_socket(settings.http_host, settings.http_port)
    server.run(sockets=[sock])
    return 0


def unused_embedded_data(settings: Settings) -> Path | None:
    """With REDIS_URL set, the data an embedded redis-server left under BOT_DATA_DIR (a bot first run without
    REDIS_URL, then pointed at a real Redis) is used by nothing: its calls and the policy versions published
    there are not in REDIS_URL. Said at start, once, instead of policies seeming to have been rolled back."""
    d = Path(settings.data_dir) / "redis"
    found = [p for p in (d / "appendonlydir", d / "appendonly.aof", d / "dump.rdb") if p.exists()]
    if not settings.redis_url or not found:
        return None
    if all(p.is_file() and p.stat().st_size == 0 for p in found):
        return None
    log.warning("embedded_redis_data_unused", dir=str(d), redis_url_set=True,
                hint="calls and published policy versions in this embedded Redis are not in REDIS_URL: start it "
                     f"(redis-server --dir {d} --appendonly yes --port 6390) and copy what you need over "
                     "(e.g. redis-cli MIGRATE, or re-publish the policy), then remove the directory")
    return d


def serve(workers: int | None = None) -> int:
    configure_logging()
    settings = load_settings()
    workers = workers or settings.workers
    embedded: EmbeddedRedis | None = None
    unused_embedded_data(settings)
    if not settings.redis_url:
        embedded = EmbeddedRedis(settings.data_dir, int(os.environ.get("BOT_EMBEDDED_REDIS_PORT", 0)))
        os.environ["REDIS_URL"] = embedded.start()
    from bot.admin.auth import ensure_local_token

    if (token_file := ensure_local_token(settings.data_dir)) is not None:
        log.info("admin_token_local", file=str(token_file),
                 hint="no BOT_ADMIN_TOKEN or BOT_ADMIN_TOKENS_FILE: the console's publisher token is in this file")
    try:
        if workers <= 1:
            return run_worker(load_settings())
        return _supervise(workers, settings)
    finally:
        if embedded is not None:
            embedded.stop()


def _forget_metrics(pid: int) -> None:
    """Drop a dead worker's live gauges (active calls, redis up, CPU, ...) from the shared view."""
    from prometheus_client import multiprocess

    try:
        multiprocess.mark_process_dead(pid)
    except OSError as exc:  # never let metrics bookkeeping stop the supervisor
        log.warning("metrics_cleanup_failed", pid=pid, error=repr(exc))


RESTART_STABLE_S = 60.0  # a worker that ran this long before dying is restarted at once
RESTART_MAX_DELAY_S = 30.0


def _replaceable(procs: list[subprocess.Popen[bytes]]) -> bool:
    """Some worker died of something other than a stop signal: the supervisor replaces it rather than exit
    (all workers dying in the same instant, e.g. an OOM kill of each, used to end the supervisor)."""
    return any(p.returncode not in (None, 0, -signal.SIGTERM, -signal.SIGINT) for p in procs)


def _reap_dead_worker(worker: str, pid: int, settings: Settings) -> subprocess.Popen[bytes] | None:
    """Close a dead worker's calls now (outcome worker_lost), instead of when their heartbeats go stale
    30-45 s later; only that process's calls (id and pid): its replacement takes the same id. In a child
    process, so the supervisor loop never waits on Redis and the calls are counted in the shared metrics."""
    if not os.environ.get("REDIS_URL"):
        return None
    try:
        return subprocess.Popen([sys.executable, "-m", "bot.reaper", "--worker", worker, "--pid", str(pid),
                                 "--reaper", f"{os.uname().nodename}-supervisor", "--ttl-s", str(settings.call_ttl_s)],
                                # its own process group: a Ctrl-C in the terminal must not cut a reap half-done
                                process_group=0)
    except OSError as exc:  # the heartbeat reaper of the other workers still closes them
        log.warning("dead_worker_reap_failed", worker=worker, worker_pid=pid, error=repr(exc))
        return None


def _supervise(workers: int, settings: Settings) -> int:
    mp = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not mp:
        mp = str(Path(settings.data_dir) / f"prometheus-{os.getpid()}")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = mp
    shutil.rmtree(mp, ignore_errors=True)
    Path(mp).mkdir(parents=True, exist_ok=True)
    node = os.uname().nodename
    # workers re-import the project: make that work from any cwd, installed or not
    root = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    sock = bind_socket(settings.http_host, settings.http_port)

    def worker_id(i: int) -> str:
        return f"{node}-w{i}"

    def spawn(i: int) -> subprocess.Popen[bytes]:
        env = {**os.environ, "BOT_WORKER_INDEX": str(i), "BOT_WORKER_ID": worker_id(i),
               LISTEN_FD_ENV: str(sock.fileno())}
        # a process group of its own: a Ctrl-C in the terminal reaches the whole foreground group, so each
        # worker got it twice (from the terminal and forwarded below) and took the second as "force": live
        # calls were cut without the drain and their state never flushed. Now only our forward reaches it.
        return subprocess.Popen([sys.executable, "-m", "bot.cli", "serve", "--worker-child"], env=env,
                                pass_fds=(sock.fileno(),), process_group=0,
                                preexec_fn=die_with_parent if sys.platform.startswith("linux") else None)

    procs = [spawn(i) for i in range(workers)]
    started = [time.monotonic()] * workers
    crashes = [0] * workers  # quick deaths in a row per slot: a worker that cannot start backs off
    respawn_at: dict[int, float] = {}  # slot -> when its replacement starts
    reapers: list[subprocess.Popen[bytes]] = []  # one-shot reaps of dead workers' calls
    handled: set[subprocess.Popen[bytes]] = set()  # dead workers already handed to a reaper (not pids: reused)
    log.info("supervisor_started", workers=workers, port=settings.http_port, multiproc_dir=mp)

    stopping = False

    def forward(sig: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    # the terminal closing: the workers are not in its process group any more, so stop them (drained) here
    signal.signal(signal.SIGHUP, lambda _sig, frame: forward(signal.SIGTERM, frame))
    rc = 0

    def reap_exited() -> None:
        for i, p in enumerate(procs):
            if p.poll() is None or p in handled:
                continue
            handled.add(p)
            # a worker that stopped cleanly ended its calls; any other death (SIGKILL, OOM, crash), even
            # while stopping, leaves them `active`
            if p.returncode not in (0, -signal.SIGTERM, -signal.SIGINT):
                if (rp := _reap_dead_worker(worker_id(i), p.pid, settings)) is not None:
                    reapers.append(rp)
        for rp in [rp for rp in reapers if rp.poll() is not None]:
            reapers.remove(rp)
            _forget_metrics(rp.pid)

    while True:
        reap_exited()
        alive = [p for p in procs if p.poll() is None]
        if not alive and (stopping or not respawn_at and not _replaceable(procs)):
            break
        if not stopping:
            now = time.monotonic()
            for i, p in enumerate(procs):
                if p.poll() is not None and i not in respawn_at:
                    # a crashed worker is replaced (its calls are lost, not others'); one that dies again soon
                    # after starting (bad config, Redis refusing it) is retried ever more slowly, instead of a
                    # restart loop that burns the CPU the live workers need and floods the log
                    crashes[i] = crashes[i] + 1 if now - started[i] < RESTART_STABLE_S else 1
                    delay = 0.0 if crashes[i] <= 1 else min(RESTART_MAX_DELAY_S, 2.0 ** (crashes[i] - 2))
                    log.error("worker_died", index=i, worker=worker_id(i), pid=p.pid, rc=p.returncode,
                              crashes_in_a_row=crashes[i],
                              restart_in_s=delay)
                    _forget_metrics(p.pid)
                    respawn_at[i] = now + delay
                if i in respawn_at and now >= respawn_at[i]:
                    del respawn_at[i]
                    procs[i] = spawn(i)
                    started[i] = time.monotonic()
        elif sock.fileno() != -1:
            # no worker will be spawned again: once the draining workers close their copies the port
            # closes, so new connections are refused rather than queued with nobody to accept them
            sock.close()
        time.sleep(0.2)
    reap_exited()
    for rp in reapers:  # bounded: the reaper gives up after its own timeout
        try:
            rp.wait(timeout=25)
        except subprocess.TimeoutExpired:
            rp.kill()
            rp.wait()
        _forget_metrics(rp.pid)
    for p in procs:
        # a worker still starting when the stop came dies of the forwarded signal: that is a clean stop
        code = p.returncode or 0
        rc = rc or (0 if code in (-signal.SIGTERM, -signal.SIGINT) else code)
    sock.close()
    shutil.rmtree(mp, ignore_errors=True)
    return rc
