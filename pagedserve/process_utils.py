"""Starting engine-core and worker processes.

Children are fresh interpreters (`python -m pagedserve.process_utils`) that receive their
entry point and arguments pickled on stdin — process start-up is the one place pickle is used.
Unlike multiprocessing's spawn, this never re-imports the user's `__main__`, so a script
without an `if __name__ == "__main__":` guard still works.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import traceback
from typing import Any


class ChildProcess:
    """A child running `module:function(*args)`; the subset of multiprocessing.Process we use."""

    def __init__(self, target: str, args: tuple[Any, ...], name: str) -> None:
        self.name = name
        env = dict(os.environ, PAGEDSERVE_PROCESS_NAME=name)
        self._popen = subprocess.Popen(
            [sys.executable, "-m", "pagedserve.process_utils"], stdin=subprocess.PIPE, env=env
        )
        assert self._popen.stdin is not None
        self._popen.stdin.write(pickle.dumps((target, args)))
        self._popen.stdin.close()

    @property
    def pid(self) -> int:
        return self._popen.pid

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    @property
    def exitcode(self) -> int | None:
        return self._popen.poll()

    def terminate(self) -> None:
        if self.is_alive():
            self._popen.terminate()

    def kill(self) -> None:
        if self.is_alive():
            self._popen.kill()

    def join(self, timeout: float | None = None) -> None:
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass


def _main() -> None:
    target, args = pickle.loads(sys.stdin.buffer.read())
    module_name, function_name = target.split(":")
    try:
        getattr(importlib.import_module(module_name), function_name)(*args)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    # NOTE: os._exit, not a normal exit: interpreter shutdown would wait in zmq's context
    # termination for sockets still held by daemon threads, and the process would never die.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def set_parent_death_signal() -> None:
    """Asks Linux to SIGKILL this process when its parent dies, so nothing is orphaned."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def watch_parent(parent_pid: int) -> None:
    """Fallback for platforms without prctl: exit when the parent is gone."""

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(1.0)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


if __name__ == "__main__":
    _main()
