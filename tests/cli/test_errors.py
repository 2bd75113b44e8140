"""``python -m repfx.trt``: errors a person can act on, each one line on stderr, nothing left behind.

Ctrl-C runs the real command in a subprocess and interrupts it with SIGINT while
it works (its ONNX export is made to wait, so the moment is certain, not raced).
A read-only --out is real (in a subprocess; as root, with the capability to
override permissions dropped). The other cases call ``main(argv)`` in-process, with
the OS error or the available memory simulated where the real condition cannot be
made on any machine (a full disk; memory sizes differ).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import repfx.cli.memory as memory
import repfx.cli.trt as cli
from repfx.samples import RepVGGBlock
from repfx.deploy.staging import sha256_of
from repfx.deploy.triton import mark

from helpers import build, rand

SHAPE = (1, 3, 8, 8)
WAIT_S = 240


def tiny_net() -> nn.Module:
    return nn.Sequential(RepVGGBlock(3, 4))


@pytest.fixture
def model(tmp_path) -> Path:
    path = tmp_path / "net.pt2"
    with torch.no_grad():
        torch.export.save(torch.export.export(build(tiny_net), (rand(*SHAPE),)), path)
    return path


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (hidden ones too) -> the file's bytes, or None for a directory."""
    return {str(path.relative_to(root)): None if path.is_dir() else path.read_bytes()
            for path in sorted(root.rglob("*"))}


def run(tmp_path: Path, monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """``main(ARGS)`` from ``tmp_path``: (exit code, stderr)."""
    monkeypatch.chdir(tmp_path)
    code = cli.main([*args])
    return code, capsys.readouterr().err


def the_line(stderr: str, prefix: str = "repfx.trt: error: ") -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), stderr
    return lines[0]


def heavy_work_started(*args, **kwargs):
    raise AssertionError("heavy work started")


# --- Ctrl-C ---------------------------------------------------------------------------------------------------------

# The command as `python -m repfx.trt` runs it, except that the ONNX export announces itself and waits:
# by then the .pt2 is staged in --out and the new Triton version directory is claimed.
INTERRUPTIBLE = textwrap.dedent("""
    import faulthandler, signal, sys, time
    from pathlib import Path
    faulthandler.dump_traceback_later(45)  # a run still alive then (it ends in seconds) shows where it hangs
    # Ctrl-C as in a terminal: a test run started in the background (nohup ... &) ignores SIGINT, and a
    # child inherits that, so Python would never raise KeyboardInterrupt here.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import repfx.backends.onnx
    from repfx.cli.trt import main

    def waiting_export(program):
        Path(sys.argv[1]).write_text("staged")
        time.sleep(600)

    repfx.backends.onnx.export_onnx = waiting_export
    sys.exit(main(sys.argv[2:]))
""")


def test_ctrl_c_exits_130_with_one_line_and_leaves_nothing(tmp_path, tmp_path_factory, model):
    entry = tmp_path / "triton" / "net"
    (entry / "1").mkdir(parents=True)
    (entry / "1" / "model.onnx").write_bytes(b"version 1")
    (entry / "config.pbtxt").write_text(mark('name: "net"\nplatform: "onnxruntime_onnx"\n'))
    before = tree(tmp_path)
    ready = tmp_path_factory.mktemp("signal") / "ready"  # outside tmp_path, which must stay as it was

    process = subprocess.Popen(
        [sys.executable, "-c", INTERRUPTIBLE, str(ready), "net.pt2", "--out", "out", "--triton-repo", "triton",
         "--quiet"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + WAIT_S
        while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.exists(), f"the run never reached the ONNX export: {process.communicate(timeout=30)}"
        assert (tmp_path / "out").is_dir() and [p.name for p in entry.iterdir() if p.name.startswith(".repfx")], \
            "files are staged at this point, so the test does check their removal"
        process.send_signal(signal.SIGINT)
        try:
            stdout, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            pytest.fail(f"still running 60 s after SIGINT; its stderr:\n{process.communicate()[1][-6000:]}")
    finally:
        process.kill()

    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["repfx.trt: interrupted"], stderr
    assert stdout == ""
    assert tree(tmp_path) == before, "no out/, no version 2, no staging directory"


def test_ctrl_c_in_any_phase_is_caught(tmp_path, model, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_model", interrupted)
    code, err = run(tmp_path, monkeypatch, capsys, "net.pt2", "--out", "out", "--quiet")

    assert code == 130
    assert err.strip().splitlines() == ["repfx.trt: interrupted"], err
    assert tree(tmp_path) == {"net.pt2": model.read_bytes()}


# A Ctrl-C at the other moments, each made certain the same way: the step announces itself and waits. After the
# files are published (the report being printed) they are complete and the line says so; one that arrives while
# they are renamed into place is held until all are; one during the imports is the same one line.
MOMENTS = {
    "printing the report": """
        import repfx.cli.trt
        repfx.cli.trt.print_result = lambda *args: wait(600)
    """,
    "publishing the files": """
        from repfx.deploy.staging import Transaction
        publish = Transaction._publish
        def waiting_publish(self, claim):  # the Ctrl-C comes after the first file is in place
            publish(self, claim)
            wait(3) if not READY.exists() else None
        Transaction._publish = waiting_publish
    """,
    "importing the command": """
        class Waiting:  # the command's module is being imported when the Ctrl-C comes
            def find_spec(self, name, path=None, target=None):
                wait(600) if name == "repfx.cli.trt" else None
        sys.meta_path.insert(0, Waiting())
    """,
}
AT_A_MOMENT = textwrap.dedent("""
    import faulthandler, signal, sys, time
    from pathlib import Path
    faulthandler.dump_traceback_later(45)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (see INTERRUPTIBLE)

    READY = Path(sys.argv[1])

    def wait(seconds):
        READY.write_text("waiting")
        time.sleep(seconds)
    {moment}
    import repfx.trt
    sys.argv[1:] = sys.argv[2:]
    sys.exit(repfx.trt.run())
""")
COMPLETE = ": the files are complete"


def interrupted_at(tmp_path: Path, ready: Path, moment: str, *args: str) -> tuple[int, str, str]:
    """Run the command (as ``repfx.trt.run``, what ``python -m repfx.trt`` runs), SIGINT it at ``moment``."""
    script = AT_A_MOMENT.format(moment=textwrap.dedent(MOMENTS[moment]))
    process = subprocess.Popen([sys.executable, "-c", script, str(ready), *args], cwd=tmp_path, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + WAIT_S
        while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), f"the run never reached {moment}: {process.communicate(timeout=30)}"
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    return process.returncode, stdout, stderr


@pytest.mark.parametrize("moment", ["printing the report", "publishing the files"])
def test_ctrl_c_after_the_files_are_published_says_they_are_complete(tmp_path, tmp_path_factory, model, moment):
    ready = tmp_path_factory.mktemp("signal") / "ready"
    code, _, stderr = interrupted_at(tmp_path, ready, moment, "net.pt2", "--out", "out", "--triton-repo", "triton",
                                     "--quiet")

    assert code == 130, stderr
    line = the_line(stderr, prefix="repfx.trt: interrupted after writing ")
    assert line.endswith(COMPLETE), line
    written = line.removeprefix("repfx.trt: interrupted after writing ").removesuffix(COMPLETE).split(", ")
    assert written == ["out/net.pt2", "out/net.onnx", "out/net.report.json", "triton/net"]  # a new model: its folder
    assert all((tmp_path / path).exists() for path in written), written
    assert not [path for path in tmp_path.rglob(".*")], "no staging directory is left"
    record = json.loads((tmp_path / "out" / "net.report.json").read_text())  # complete: every file as recorded
    assert {name: sha256_of(tmp_path / "out" / name) for name in record["files"]} == record["files"]
    assert torch.export.load(str(tmp_path / "out" / "net.pt2")) is not None


def test_ctrl_c_during_the_imports_is_one_line(tmp_path, tmp_path_factory, model):
    ready = tmp_path_factory.mktemp("signal") / "ready"
    code, stdout, stderr = interrupted_at(tmp_path, ready, "importing the command", "net.pt2", "--out", "out")

    assert code == 130, stderr
    assert stderr.strip().splitlines() == ["repfx.trt: interrupted"], stderr
    assert stdout == "" and tree(tmp_path) == {"net.pt2": model.read_bytes()}


def test_the_command_imports_torch_inside_its_handler():
    """``python -m repfx.trt`` imports the packages above the command before any code of it runs: none imports
    torch (seconds), so a Ctrl-C while torch loads reaches the handler in ``repfx.trt.run``."""
    probe = "import sys, repfx.trt; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'onnx'}))"
    completed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=WAIT_S)
    assert completed.stdout.strip() == "[]", completed


def test_a_ctrl_c_python_loses_is_still_seen():
    """Raised inside a finalizer, KeyboardInterrupt is printed as "Exception ignored" and lost (it happened in
    importlib's module-lock callback, and the run went on to write its files with exit 0)."""
    script = textwrap.dedent("""
        import os, signal, sys
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from repfx.cli import interrupts
        interrupts.remember()

        class Finalized:
            def __del__(self):
                os.kill(os.getpid(), signal.SIGINT)
                sum(range(100000))  # the handler runs here, inside the finalizer

        Finalized()
        print("went on")
        try:
            interrupts.check()
        except KeyboardInterrupt:
            print("stopped")
    """)
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=WAIT_S)
    assert completed.stdout.splitlines() == ["went on", "stopped"], completed
    assert "Exception ignored" in completed.stderr, "the interrupt really was lost on the way"


def test_a_lost_ctrl_c_stops_the_run_before_it_publishes(tmp_path, model, monkeypatch, capsys):
    from repfx.cli import interrupts

    monkeypatch.setattr(interrupts, "_received", 1)
    code, err = run(tmp_path, monkeypatch, capsys, "net.pt2", "--out", "out", "--quiet")

    assert code == 130
    assert err.strip().splitlines() == ["repfx.trt: interrupted"], err
    assert tree(tmp_path) == {"net.pt2": model.read_bytes()}


def test_ctrl_c_in_the_teardown_after_the_command_exits_with_its_code():
    script = textwrap.dedent("""
        import os, signal, sys
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from repfx.cli.interrupts import exit_at_once
        print("report")
        exit_at_once(0)
        os.kill(os.getpid(), signal.SIGINT)
        signal.pause() if hasattr(signal, "pause") else None
        print("not reached")
    """)
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=WAIT_S)
    assert (completed.returncode, completed.stdout, completed.stderr) == (0, "report\n", "")


# --- usage errors -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, says", [
    pytest.param(["net.pt2", "--input-shape", "1x3xfoo"], "argument --input-shape: expected a shape", id="bad-shape"),
    pytest.param([], "one of the arguments model --sample is required", id="no-model"),
    pytest.param(["net.pt2", "--precision", "fp8"], "argument --precision: invalid choice", id="bad-choice"),
    pytest.param(["net.pt2", "--frobnicate"], "unrecognized arguments: --frobnicate", id="unknown-option"),
    pytest.param(["net.pt2", "--input-shape", "-1x8x16x16"], "a dynamic batch is --dynamic-batch", id="negative-dim"),
    pytest.param(["net.pt2", "--rtol", "-1"], "argument --rtol: expected a finite number >= 0", id="bad-rtol"),
    pytest.param(["net.pt2", "--out", ""], "argument --out: expected a directory, got an empty string", id="empty-out"),
])
def test_usage_error_is_one_line(tmp_path, monkeypatch, capsys, argv, says):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    line = the_line(capsys.readouterr().err, prefix="python -m repfx.trt: error: ")
    assert says in line and "--help" in line, line


# --- OS errors ----------------------------------------------------------------------------------------------------

def test_permission_error_is_one_line_naming_the_path(tmp_path, model, monkeypatch, capsys):
    (tmp_path / "locked").mkdir()
    monkeypatch.setattr(cli, "load_model", heavy_work_started)
    real_mkdtemp = tempfile.mkdtemp

    def denied(*args, dir=None, **kwargs):  # what an unwritable directory answers (root is never refused)
        if dir is not None and Path(dir).name == "locked":
            raise PermissionError(errno.EACCES, "Permission denied", os.path.join(dir, ".repfx-staging-x"))
        return real_mkdtemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    code, err = run(tmp_path, monkeypatch, capsys, "net.pt2", "--out", "locked", "--quiet")

    assert code == 2
    assert the_line(err) == ("repfx.trt: error: locked: Permission denied "
                             "(check its permissions, or choose another location)")
    assert tree(tmp_path / "locked") == {}


def unprivileged() -> list[str]:
    """A command prefix under which permissions apply: none needed for a user; for root, drop the
    capability to override them (util-linux ``setpriv``), or skip."""
    if os.geteuid() != 0:
        return []
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
    if shutil.which("setpriv") is None or subprocess.run([*drop, "true"], capture_output=True).returncode != 0:
        pytest.skip("running as root without setpriv: read-only directories are writable")
    return drop


def test_real_read_only_out_fails_fast_with_one_line_naming_the_path(tmp_path, model):
    prefix = unprivileged()
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked").chmod(0o555)

    completed = subprocess.run([*prefix, sys.executable, "-m", "repfx.trt", "net.pt2", "--out", "locked"],
                               cwd=tmp_path, capture_output=True, text=True, timeout=WAIT_S,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})

    assert completed.returncode == 2, completed.stderr
    # progress is on, yet this is the only line: the check came before loading the model
    assert the_line(completed.stderr) == ("repfx.trt: error: locked: Permission denied "
                                          "(check its permissions, or choose another location)")
    assert tree(tmp_path / "locked") == {}


def test_disk_full_while_writing_names_the_output_file(tmp_path, model, monkeypatch, capsys):
    real_write_bytes = Path.write_bytes

    def full(self, data):
        if self.name == "net.onnx":
            raise OSError(errno.ENOSPC, "No space left on device")  # what a failed write() says: no file name
        return real_write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    code, err = run(tmp_path, monkeypatch, capsys, "net.pt2", "--out", "out", "--no-verify", "--quiet")

    assert code == 2
    line = the_line(err)
    assert line.startswith("repfx.trt: error: out/net.onnx: No space left on device (the disk is full"), line
    assert tree(tmp_path) == {"net.pt2": model.read_bytes()}, "the staged .pt2 is gone with its staging directory"


# --- inputs that cannot fit in memory ----------------------------------------------------------------------------

def test_huge_input_shape_is_refused_before_allocating(tmp_path, model, monkeypatch, capsys):
    monkeypatch.setattr(memory, "available_memory", lambda: 64 * 2**30)  # a 64 GiB machine, whatever this one has
    monkeypatch.setattr(cli, "build_export", heavy_work_started)
    monkeypatch.setattr(torch, "randn", heavy_work_started)  # the inputs would be drawn with it
    started = time.monotonic()

    code, err = run(tmp_path, monkeypatch, capsys, "net.pt2", "--input-shape", "100000x3x224x224", "--out", "out",
                    "--quiet")

    assert code == 2
    line = the_line(err)
    assert "100000x3x224x224" in line and "56.1 GiB" in line and "64.0 GiB" in line and "--input-shape" in line, line
    assert time.monotonic() - started < 10
    assert tree(tmp_path) == {"net.pt2": model.read_bytes()}


def test_the_memory_rule_leaves_room_for_copies_and_activations(monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda: 8 * 2**30)
    one_gib = (1, 1, 2**14, 2**14)  # float32: 1 GiB, 1/8 of what is available
    memory.check_inputs_fit([one_gib], [torch.float32])
    memory.check_inputs_fit([one_gib], [torch.float16])
    with pytest.raises(cli.BadInput, match="needs about 8x"):
        memory.check_inputs_fit([one_gib, (1, 3, 8, 8)], [torch.float32, torch.float32])  # a little more: refused
    with pytest.raises(cli.BadInput, match="needs about 8x"):
        memory.check_inputs_fit([one_gib], [torch.float64])


def test_available_memory_is_read_here():
    available = memory.available_memory()
    assert available is None or available > 0
    if sys.platform.startswith("linux"):
        assert available is not None, "Linux has /proc/meminfo"
