"""Control of a training from another process: the output folder's lock and stop file, process trees.

Standard library only (no torch), so the Slicer module can use it before PyTorch is installed.

A training holds ``training.lock`` in its output folder while it runs (PID, host and start time of
the process that writes the files), so that no second training writes to the same folder; a lock
left by a process that no longer exists is taken over. Creating ``stop-training`` in the folder
asks the training to stop: it checks for the file every optimiser step, saves its resume point and
exits. Where a process does not react (or is not the trainer itself but a launcher in front of it,
such as Slicer's ``PythonSlicer``), :func:`kill_process_tree` ends it with all its descendants.
"""

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from .errors import TrainingLockedError

LOCK_FILE_NAME = "training.lock"
STOP_FILE_NAME = "stop-training"


def new_process_group_options():
    """``subprocess.Popen`` keyword arguments that start a child in its own process group.

    :func:`kill_process_tree` can then end the child and every process it starts, even where a
    launcher in between forwards no signal.

    Returns
    -------
    dict
    """
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
    return {"start_new_session": True}


def kill_process_tree(process):
    """Kill a child started with :func:`new_process_group_options` and all its descendants.

    Parameters
    ----------
    process : subprocess.Popen

    Returns
    -------
    int
        The child's exit code.
    """
    if os.name == "nt":
        # /T: the whole tree; /F: at once. Fails harmlessly when the process has already ended.
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(process.pid)], capture_output=True,
                       creationflags=subprocess.CREATE_NO_WINDOW)
    else:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the group id is the child's PID (its own session)
        except (ProcessLookupError, PermissionError):  # the whole group has already ended
            pass
    if process.poll() is None:
        process.kill()
    return process.wait()


def kill_process(pid):
    """Kill one process by PID (no error when it has already ended).

    Parameters
    ----------
    pid : int
    """
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/PID", str(int(pid))], capture_output=True,
                       creationflags=subprocess.CREATE_NO_WINDOW)
        return
    try:
        os.kill(int(pid), signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def process_alive(pid):
    """Whether a process with this PID exists on this computer.

    Parameters
    ----------
    pid : int

    Returns
    -------
    bool
    """
    pid = int(pid)
    if pid <= 0:
        return False
    if os.name == "nt":
        import ctypes

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    if Path("/proc").is_dir():  # Linux: a zombie (ended, not yet reaped) holds no files any more
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state != "Z"
    return True


def read_lock(output_dir):
    """The lock record of a folder, or None when it has no readable lock file.

    Parameters
    ----------
    output_dir : str or pathlib.Path

    Returns
    -------
    dict or None
        ``pid``, ``host``, ``started`` (seconds since the epoch).
    """
    try:
        record = json.loads((Path(output_dir) / LOCK_FILE_NAME).read_text())
        return record if isinstance(record, dict) and "pid" in record else None
    except (OSError, ValueError):
        return None


def lock_owner(output_dir):
    """The training that holds a folder's lock, or None when the folder is free.

    A lock of a process that no longer exists on this computer is stale and counts as free. A lock
    taken on another computer (a shared folder) cannot be checked and counts as held.

    Parameters
    ----------
    output_dir : str or pathlib.Path

    Returns
    -------
    dict or None
        ``pid``, ``host``, ``started`` of the live owner.
    """
    record = read_lock(output_dir)
    if record is None:
        return None
    if record.get("host") == socket.gethostname() and not process_alive(record["pid"]):
        return None
    return record


def describe_lock(record, output_dir):
    """One sentence on who holds a folder's lock and what to do about it."""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(record.get("started", 0))))
    return (
        f"another training (process {record['pid']} on {record.get('host', '?')}, started {started}) is writing to "
        f"{output_dir}: stop it or wait until it ends, or choose another output folder. If no such training runs "
        f"any more, delete {Path(output_dir) / LOCK_FILE_NAME}."
    )


class TrainingLock:
    """Context manager that holds a folder's training lock for the current process.

    Raises
    ------
    TrainingLockedError
        On entry, when a live training holds the lock.
    """

    def __init__(self, output_dir):
        self.path = Path(output_dir) / LOCK_FILE_NAME

    def __enter__(self):
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(2):  # the second try follows the removal of a stale lock
            try:
                with open(self.path, "x") as handle:  # "x": atomic, fails if the file exists
                    json.dump(record, handle)
                return self
            except FileExistsError:
                owner = lock_owner(self.path.parent)
                if owner is not None:
                    raise TrainingLockedError(describe_lock(owner, self.path.parent)) from None
                self.path.unlink(missing_ok=True)
        raise TrainingLockedError(f"cannot take the lock {self.path}: another training just took it; try again.")

    def __exit__(self, *exc_info):
        record = read_lock(self.path.parent)
        if record is not None and record["pid"] == os.getpid() and record.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
        return False


def request_stop(output_dir):
    """Ask the training writing to ``output_dir`` to stop (it saves its resume point first)."""
    (Path(output_dir) / STOP_FILE_NAME).write_text(f"stop requested at {time.ctime()}\n")


def stop_requested(output_dir):
    """Whether a stop was requested for the training writing to ``output_dir``."""
    return (Path(output_dir) / STOP_FILE_NAME).exists()


def clear_stop_request(output_dir):
    """Remove a served (or stale) stop request."""
    (Path(output_dir) / STOP_FILE_NAME).unlink(missing_ok=True)
