"""Child processes of the demo, tests and benchmarks: wardwatch services started with the same
settings (passed as WARDWATCH_* environment variables) and stopped by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from wardwatch.settings import Settings


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process read exactly these settings."""
    env = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[f"WARDWATCH_{name.upper()}"] = str(value)
    return env


def start_service(command: list[str], settings: Settings, log_path: Path | None = None) -> subprocess.Popen:
    """Start `wardwatch <command>` as a child with `settings`; stdout/stderr go to log_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARDWATCH_")}
    env.update(settings_env(settings))
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        return subprocess.Popen([sys.executable, "-m", "wardwatch", *command], env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        if log_path:
            out.close()


def stop_service(proc: subprocess.Popen, timeout_s: float = 15.0) -> int | None:
    """SIGTERM, then SIGKILL after timeout_s; returns the exit code."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout_s)
        except ProcessLookupError:
            pass
    return proc.returncode


def kill_service(proc: subprocess.Popen) -> None:
    """SIGKILL (crash simulation)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


def wait_for_group(settings: Settings, group_id: str, timeout_s: float = 60.0,
                   alive: subprocess.Popen | None = None) -> None:
    """Block until consumer group `group_id` is Stable (its members joined and got partitions)."""
    import time

    from confluent_kafka import ConsumerGroupState
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(settings.kafka_client_config())
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"the process for consumer group {group_id} exited with code {alive.returncode}")
        try:
            state = admin.describe_consumer_groups([group_id])[group_id].result(timeout=5).state
            if state == ConsumerGroupState.STABLE:
                return
        except Exception:  # group not known yet
            pass
        time.sleep(0.2)
    raise TimeoutError(f"consumer group {group_id} did not become stable within {timeout_s:.0f}s")
