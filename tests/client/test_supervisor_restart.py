"""`veil up` restarts a service at once after a healthy run and backs off only in a crash loop."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from veil.dev.supervisor import HEALTHY_RUN_S, Mesh, Supervised, free_port_offset, restart_delay


def test_a_healthy_run_resets_the_crash_loop_before_the_delay_is_computed() -> None:
    # After five quick exits the next one would wait 8 s; a healthy run in between wipes that.
    assert restart_delay(5, ran_s=HEALTHY_RUN_S + 1) == (0.0, 0)
    assert restart_delay(0, ran_s=3600) == (0.0, 0)


def test_only_quick_exits_in_a_row_back_off_doubling_to_30_s() -> None:
    restarts, delays = 0, []
    for _ in range(9):
        delay, restarts = restart_delay(restarts, ran_s=2.0)
        delays.append(delay)
    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert restarts == 9


class _Sleeper(Supervised):
    """A stand-in service process (a sleeping interpreter) with the supervisor's bookkeeping."""

    def start(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        self.started_at = time.monotonic()


def test_a_service_killed_after_a_healthy_run_is_restarted_within_a_poll(tmp_path: Path) -> None:
    ran_s = HEALTHY_RUN_S + 5
    mesh = Mesh(tmp_path, port_offset=free_port_offset())
    service = _Sleeper("gateway", {}, tmp_path / "gateway.log", restarts=6)  # an old crash loop's count
    mesh.services = [service]
    service.start()
    service.started_at -= ran_s  # it has been serving for a healthy while
    first = service.process
    assert first is not None
    watcher = threading.Thread(target=mesh.watch, kwargs={"poll": 0.05})
    watcher.start()
    try:
        first.kill()
        killed = time.monotonic()
        while service.process is first and time.monotonic() - killed < 10:
            time.sleep(0.01)
        restarted_after = time.monotonic() - killed
        assert service.process is not first, "not restarted within 10 s"
        assert restarted_after < 1.0, f"restarted after {restarted_after:.2f}s"
        assert service.restarts == 0
    finally:
        mesh._stopping.set()
        watcher.join(5)
        mesh.stop()
