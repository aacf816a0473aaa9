"""Data safety of a job's output: one writer per output, crash windows of the publish closed, a
full disk kept resumable, resume trusting input content, Ctrl-C with a closed stdout pipe.

Every merge here is a real process running the CLI (`raymerge.cli.main`, `--in-process`): forked
from this test process (it has raymerge imported already, so a merge takes about a second rather
than the seconds of a fresh interpreter; the fork has its own pid, signals, exit status and
output files), and once a fresh `python -m raymerge.cli`. Crash windows are hit with the one test
hook of the writer, `RAYMERGE_TEST_PAUSE_AT=<window>` (`checkpoints.writer.pause_point`): the merge
stops itself (SIGSTOP) there, and the test SIGKILLs it, or changes the disk and lets it go on.
The full disk is a real 4 MB tmpfs, mounted in a private mount namespace of a forked driver.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
import yaml

import raymerge
from raymerge.checkpoints.manifest import MANIFEST_NAME, load_manifest
from raymerge.checkpoints.output_lock import OutputBusyError
from raymerge.checkpoints.writer import PAUSE_ENV, plan_shards
from raymerge.runtime.output import JobOutput

from test_resume import REPO, SHARD, linear_config


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.is_file()}


def staging_of(out: Path) -> Path:
    return out.parent / f".{out.name}.raymerge-staging"


def merge_args(cfg: Path, out: Path, *extra: str) -> list[str]:
    return ["merge", str(cfg), str(out), "--in-process", "--quiet", "--out-shard-size", SHARD, *extra]


_numbers = itertools.count()


class Child:
    """A forked process running `raymerge.cli.main(argv)`; its stdout and stderr go to files."""

    def __init__(self, argv: list[str], logs: Path, *, pause_at: Optional[str] = None, stdout_fd: Optional[int] = None):
        logs.mkdir(parents=True, exist_ok=True)
        n = next(_numbers)
        self.out_path, self.err_path = logs / f"{n}.out", logs / f"{n}.err"
        self.code: Optional[int] = None
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns into pytest
            code = 99
            try:
                code = _child_main(argv, pause_at, self.out_path, self.err_path, stdout_fd)
            finally:
                os._exit(code)

    def wait(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while self.code is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.code = os.waitstatus_to_exitcode(status)
            elif time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                raise AssertionError(f"merge {self.pid} did not end in {timeout} s:\n{self.err}")
            else:
                time.sleep(0.02)
        return self.code

    def wait_stopped(self, timeout: float = 60) -> None:
        """Until the child stopped itself at its pause point (state T)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state in "tT":
                return
            if state == "Z":
                break
            time.sleep(0.02)
        self.wait(1)
        raise AssertionError(f"merge {self.pid} never reached its pause point (exit {self.code}):\n{self.err}")

    def kill(self) -> int:
        os.kill(self.pid, signal.SIGKILL)
        return self.wait()

    @property
    def err(self) -> str:
        return self.err_path.read_text() if self.err_path.exists() else ""

    @property
    def out(self) -> str:
        return self.out_path.read_text() if self.out_path.exists() else ""


def _child_main(argv, pause_at, out_path: Path, err_path: Path, stdout_fd: Optional[int]) -> int:
    import io
    import logging

    import torch

    if pause_at:
        os.environ[PAUSE_ENV] = pause_at
    else:
        os.environ.pop(PAUSE_ENV, None)
    os.dup2(os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
    os.dup2(stdout_fd if stdout_fd is not None else os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=False)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
    logging.root.handlers.clear()  # as in a plain CLI run: warnings reach stderr (logging.lastResort)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    torch.set_num_threads(1)  # no OpenMP pool of the parent in a fork
    from raymerge.cli import main

    try:
        code = main(argv)
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else 1
    except BaseException:  # noqa: BLE001 - a bug: its traceback goes to the child's stderr
        import traceback

        traceback.print_exc()
        code = 1
    try:
        sys.stdout.flush()
    except OSError:
        pass
    sys.stderr.flush()
    return code


def run(argv: list[str], logs: Path, **kw) -> Child:
    child = Child(argv, logs, **kw)
    child.wait()
    return child


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def setup(llama_models, tmp_path_factory) -> dict:
    """A config file and the files of a clean in-process merge of it."""
    root = tmp_path_factory.mktemp("safety")
    cfg = write_config(root / "merge.yaml", linear_config(llama_models))
    raymerge.merge(cfg, root / "clean", in_process=True, quiet=True, out_shard_size=SHARD)
    return {"cfg": cfg, "clean": file_bytes(root / "clean"), "models": llama_models}


# 8. One writer per output.

def test_held_lock_refuses_a_second_job_output(tmp_path):
    layout = plan_shards([("w", "F32", (4, 4))])
    out = tmp_path / "out"
    first = JobOutput(out)
    first.reserve(layout)
    second = JobOutput(out)
    with pytest.raises(OutputBusyError, match=rf"^output {re.escape(str(out))} is being written by another raymerge job \(pid {os.getpid()} on "):
        second.reserve(layout)
    assert second.fail(KeyboardInterrupt()) is False  # it never held the lock: touches nothing
    first.open(layout)
    assert staging_of(out).is_dir()
    first.release()
    second.reserve(layout)  # free again
    second.release()


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = staging_of(out).with_name(staging_of(out).name + ".lock")
    lock.write_text(f"{dead.stdout.strip()} somehost\n")  # left behind by a process that is gone
    job = JobOutput(out)
    job.reserve(plan_shards([("w", "F32", (4, 4))]))
    assert lock.read_text().split()[0] == str(os.getpid())
    job.release()
    assert not lock.exists()


def test_two_merges_race_for_one_output(setup, tmp_path):
    out = tmp_path / "out"
    # Started together, nothing held back: exactly one publishes, the other is refused.
    first, second = (Child(merge_args(setup["cfg"], out), tmp_path / "logs") for _ in range(2))
    children = [first, second]
    codes = sorted(c.wait() for c in children)
    assert codes == [0, 2], [c.err for c in children]
    loser = next(c for c in children if c.code == 2)
    assert re.fullmatch(rf"raymerge: error: output path {re.escape(str(out))} already holds a model; .*"
                        rf"|raymerge: error: output {re.escape(str(out))} is being written by another raymerge job \(pid \d+ on .*",
                        loser.err.strip()) and len(lines(loser.err)) == 1, loser.err
    assert file_bytes(out) == setup["clean"]


def test_loser_names_the_writer_and_leaves_its_staging_alone(setup, tmp_path):
    out = tmp_path / "out"
    staging = staging_of(out)
    winner = Child(merge_args(setup["cfg"], out), tmp_path / "logs", pause_at="open")
    try:
        winner.wait_stopped()  # it holds the lock and has set up its staging folder
        before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in staging.iterdir()}
        # The loser is a fresh interpreter through the module entry point.
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop(PAUSE_ENV, None)
        loser = subprocess.run([sys.executable, "-m", "raymerge.cli", *merge_args(setup["cfg"], out)],
                               capture_output=True, text=True, env=env, timeout=120)
        assert loser.returncode == 2, loser.stderr
        assert re.fullmatch(rf"raymerge: error: output {re.escape(str(out))} is being written by another raymerge job "
                            rf"\(pid {winner.pid} on \S+, lock \S+\); wait for it to finish or choose another output\n",
                            loser.stderr), loser.stderr
        assert {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in staging.iterdir()} == before
        os.kill(winner.pid, signal.SIGCONT)
        assert winner.wait() == 0, winner.err
    finally:
        if winner.code is None:
            winner.kill()
    assert file_bytes(out) == setup["clean"]
    assert not staging.exists() and not list(tmp_path.glob(".out.raymerge-*"))


# 9. Crash windows.

def test_kill_between_the_renames_of_overwrite_strands_nothing(setup, tmp_path):
    out = tmp_path / "out"
    old_cfg = write_config(tmp_path / "old.yaml", linear_config(setup["models"], w1=0.4))
    assert run(merge_args(old_cfg, out), tmp_path / "logs").code == 0
    old = file_bytes(out)
    child = Child(merge_args(setup["cfg"], out, "--overwrite", "--workers", "1"), tmp_path / "logs",
                  pause_at="publish-between-renames")  # one worker: see the next test
    child.wait_stopped()
    child.kill()
    assert not out.exists() and len(list(tmp_path.glob(".out.raymerge-old-*"))) == 1  # the window itself
    # A rerun without --overwrite rolls the swap back: the old model is in place again, and kept.
    again = run(merge_args(setup["cfg"], out), tmp_path / "logs")
    assert again.code == 2 and "already holds a model" in again.err, again.err
    assert "rolled back the interrupted publish" in again.err
    assert file_bytes(out) == old and not list(tmp_path.glob(".out.raymerge-old-*"))
    # With --overwrite the new model is published, from the finished shards kept for it.
    done = run(merge_args(setup["cfg"], out, "--overwrite"), tmp_path / "logs")
    assert done.code == 0, done.err
    assert "resumed: reused" in done.out
    assert file_bytes(out) == setup["clean"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []


def test_kill_after_the_manifest_left_the_staging_folder_keeps_the_shards(setup, tmp_path):
    out = tmp_path / "out"
    staging = staging_of(out)
    # One worker: its batches run in order, so the shards its first batches finish are recorded
    # while the later ones run (those the very last batch finishes never are: publish is next).
    child = Child(merge_args(setup["cfg"], out, "--workers", "1"), tmp_path / "logs", pause_at="publish-manifest-aside")
    child.wait_stopped()
    child.kill()
    assert not out.exists() and staging.is_dir() and not (staging / MANIFEST_NAME).exists()
    done = run(merge_args(setup["cfg"], out), tmp_path / "logs")
    assert done.code == 0, done.err
    assert re.search(r"resumed: reused [1-9]\d* of 7 shard\(s\)", done.out), done.out
    assert file_bytes(out) == setup["clean"]
    assert not staging.exists()


def _private_tmpfs(folder: Path, size: str) -> None:
    """In this (forked) process: a private mount namespace with a tmpfs of `size` at `folder`."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x00020000) != 0:  # CLONE_NEWNS
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    if libc.mount(b"none", b"/", None, 16384 | (1 << 18), None) != 0:  # MS_REC | MS_PRIVATE
        raise OSError(ctypes.get_errno(), "mount --make-rprivate /")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)


def _full_disk_driver(cfg: Path, disk: Path, logs: Path, report: Path) -> None:
    """Runs in a forked process: merge on a 4 MB tmpfs, fill it up mid-merge, then free it and rerun."""
    try:
        _private_tmpfs(disk, "4m")
    except (OSError, subprocess.CalledProcessError) as err:
        report.write_text(json.dumps({"skip": f"cannot mount a private tmpfs here: {err}"}))
        return
    out = disk / "out"
    # One worker: its batches run in order, so the shards its first batches finish are recorded
    # while the later ones run (those the very last batch finishes never are: publish is next).
    child = Child(merge_args(cfg, out, "--workers", "1"), logs, pause_at="open")
    child.wait_stopped()
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)  # every block the merge has not reserved yet
    for chunk in (65536, 4096, 512, 1):
        try:
            while os.write(fd, b"\0" * chunk):
                pass
        except OSError:
            pass
    os.close(fd)
    os.kill(child.pid, signal.SIGCONT)
    child.wait()
    staging = staging_of(out)
    manifest = load_manifest(staging)
    result = {"code": child.code, "err": child.err, "out_exists": out.exists(),
              "shards": sorted(p.name for p in staging.glob("*.safetensors")) if staging.exists() else [],
              "recorded": len(manifest.finished) if manifest else -1}
    (disk / "filler").unlink()
    again = run(merge_args(cfg, out), logs)
    result.update(again_code=again.code, again_out=again.out, again_err=again.err)
    if out.exists():
        shutil.copytree(out, report.parent / "published")
    report.write_text(json.dumps(result))


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_disk_check_counts_filesystem_blocks_and_the_manifest(tmp_path):
    """The disk check's estimate (`writer.output_files`, `writer.space_needed`) with known block
    sizes: every file rounded up to whole blocks (small files cost a block each), the resume
    manifest counted, and the blocks a shard of the staging folder already holds subtracted."""
    from raymerge.checkpoints.writer import block_size, output_files, space_needed

    layout = plan_shards([("a", "F32", (1,)), ("b", "F32", (2000,))], max_shard_bytes=4000)
    files = output_files(layout, small_files=[1, 5000], extra_bytes=7)
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    # the manifest: 4096 bytes, plus 2 x name length + 200 per shard (4096 + 2 * (64 + 200))
    assert files == {first: 100, second: 8104, MANIFEST_NAME: 4624, "<small 0>": 1, "<small 1>": 5000, "<small files>": 7}
    staging = tmp_path / "staging"
    staging.mkdir()
    # 4096-byte blocks: 1 + 2 (shards) + 2 (manifest) + 1 + 2 + 1 (small files) = 9 blocks, not 17836 bytes
    assert space_needed(staging, files, 4096) == 9 * 4096
    assert space_needed(staging, files, 65536) == 6 * 65536
    assert space_needed(staging, files) == space_needed(staging, files, os.statvfs(staging).f_frsize)
    assert block_size(staging) == os.statvfs(staging).f_frsize and block_size(staging / "not" / "yet") == block_size(staging)
    # a shard already allocated in the staging folder (a resumed merge) counts as available
    fd = os.open(staging / second, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, 8104)
    finally:
        os.close(fd)
    held = (staging / second).stat().st_blocks * 512
    assert held >= 8104 and space_needed(staging, files, 4096) == 9 * 4096 - min(held, 3 * 4096)


def test_full_disk_mid_merge_keeps_the_shards_and_says_how_much_is_missing(setup, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    report = tmp_path / "report.json"
    pid = os.fork()
    if pid == 0:
        try:
            _full_disk_driver(setup["cfg"], disk, tmp_path / "logs", report)
        except BaseException:  # noqa: BLE001 - reported to the test below
            import traceback

            report.write_text(json.dumps({"driver_error": traceback.format_exc()}))
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    r = json.loads(report.read_text())
    assert "driver_error" not in r, r.get("driver_error")
    if "skip" in r:
        pytest.skip(r["skip"])
    staging = staging_of(disk / "out")
    assert r["code"] == 2 and not r["out_exists"], r["err"]
    assert re.fullmatch(
        rf"raymerge: error: not enough disk space to finish the output {re.escape(str(disk / 'out'))}: writing "
        rf"{re.escape(str(staging))}/\S+ failed \(no space left on device\); \d+(\.\d\d)? (B|kB|MB) more needed in "
        rf"{re.escape(str(staging))} \(0 B free\); the finished shards are kept there: free space and rerun the same job to resume\n",
        r["err"]), r["err"]
    assert len(r["shards"]) == 7 and r["recorded"] >= 1
    assert r["again_code"] == 0, r["again_err"]
    assert re.search(r"resumed: reused [1-9]\d* of 7 shard\(s\)", r["again_out"]), r["again_out"]
    assert file_bytes(tmp_path / "published") == setup["clean"]


def test_ctrl_c_with_a_closed_stdout_pipe(setup, tmp_path):
    out = tmp_path / "out"
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `| tee` that died
    child = Child(merge_args(setup["cfg"], out), tmp_path / "logs", pause_at="open", stdout_fd=write_end)
    os.close(write_end)
    child.wait_stopped()
    os.kill(child.pid, signal.SIGINT)  # delivered as soon as it runs on
    os.kill(child.pid, signal.SIGCONT)
    assert child.wait() == 130, child.err
    assert child.err == (f"raymerge: interrupted; staging folder {staging_of(out)} kept: "
                         f"rerun the same job to resume\n")
    assert not out.exists() and load_manifest(staging_of(out)) is not None
    done = run(merge_args(setup["cfg"], out), tmp_path / "logs")
    assert done.code == 0 and file_bytes(out) == setup["clean"], done.err


def test_closed_stdout_pipe_after_a_merge_is_one_line(setup, tmp_path):
    read_end, write_end = os.pipe()
    os.close(read_end)
    child = Child(merge_args(setup["cfg"], tmp_path / "out"), tmp_path / "logs", stdout_fd=write_end)
    os.close(write_end)
    assert child.wait() == 1
    assert child.err == "raymerge: standard output was closed (broken pipe)\n"
    assert file_bytes(tmp_path / "out") == setup["clean"]  # published before the summary was printed


# 10. Resume trusts content.

def test_resume_does_not_reuse_shards_of_a_changed_input(setup, tmp_path):
    models = {k: tmp_path / "models" / k for k in ("ft1", "ft2", "ft3")}
    for k, path in models.items():
        shutil.copytree(setup["models"][k], path)
    cfg = write_config(tmp_path / "merge.yaml", linear_config(models))
    out = tmp_path / "out"
    child = Child(merge_args(cfg, out), tmp_path / "logs", pause_at="publish-manifest-aside")
    child.wait_stopped()
    child.kill()
    # Rewrite one value of ft1's last tensor in place, then put its times back.
    weights = models["ft1"] / "model.safetensors"
    st = weights.stat()
    with open(weights, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        value = f.read(4)
        f.seek(-4, os.SEEK_END)
        f.write(bytes(b ^ 0x55 for b in value))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_mtime_ns == st.st_mtime_ns and weights.stat().st_size == st.st_size
    done = run(merge_args(cfg, out), tmp_path / "logs")
    assert done.code == 0, done.err
    assert "resumed" not in done.out
    warnings = [line for line in lines(done.err) if "discarding it and starting afresh" in line]
    assert len(warnings) == 1 and f"{weights} changed since" in warnings[0], done.err
    fresh = tmp_path / "fresh"
    raymerge.merge(cfg, fresh, in_process=True, quiet=True, out_shard_size=SHARD)
    assert file_bytes(out) == file_bytes(fresh) != setup["clean"]
