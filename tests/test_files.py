"""files.py: the record of completed writes is scoped to a command; one out-of-memory test."""

from __future__ import annotations

import threading

import pytest

from nulltext.errors import is_out_of_memory
from nulltext.files import atomic_write, recording_writes


def _write(path):
    return atomic_write(path, lambda tmp: open(tmp, "w").write("x"))


def test_completed_writes_are_recorded_only_inside_their_block(tmp_path):
    _write(tmp_path / "before.txt")  # outside any block: recorded nowhere
    with recording_writes() as outer:
        _write(tmp_path / "a.txt")
        with recording_writes() as inner:
            _write(tmp_path / "b.txt")
        _write(tmp_path / "c.txt")
    _write(tmp_path / "after.txt")
    assert [p.rsplit("/", 1)[1] for p in outer] == ["a.txt", "c.txt"]
    assert [p.rsplit("/", 1)[1] for p in inner] == ["b.txt"]


def test_two_threads_keep_separate_records(tmp_path):
    seen = {}
    barrier = threading.Barrier(2)

    def command(name):
        with recording_writes() as written:
            barrier.wait()
            _write(tmp_path / f"{name}.txt")
            barrier.wait()
            seen[name] = [p.rsplit("/", 1)[1] for p in written]

    threads = [threading.Thread(target=command, args=(n,)) for n in ("one", "two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"one": ["one.txt"], "two": ["two.txt"]}


@pytest.mark.parametrize("error, expected", [
    (MemoryError(), True),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:114] DefaultCPUAllocator: not enough memory: you tried to allocate 8 GB"), True),
    (RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"), True),
    (RuntimeError("shape mismatch"), False),
    (ValueError("out of memory"), False),
])
def test_out_of_memory_is_recognised(error, expected):
    assert is_out_of_memory(error) is expected
