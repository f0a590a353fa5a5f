"""async_run() on the event loop against real VMs: concurrency without a thread per command, cancellation."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from smolvm import AsyncSmolVM, RunResult, SmolVM

SLOW = 120


@pytest.mark.skipif(os.environ.get("SMOLVM_SLOW_TESTS") != "1", reason="slow on emulating hosts: SMOLVM_SLOW_TESTS=1 runs it")
@pytest.mark.guest_only
@pytest.mark.vm
def test_concurrent_async_runs_need_no_threads(vm: SmolVM) -> None:
    async def main() -> tuple[list[RunResult], int, int]:
        base = threading.active_count()
        peak = base
        tasks = [asyncio.create_task(vm.async_run(f"echo job {i}; echo e{i} >&2", timeout=SLOW)) for i in range(20)]
        while not all(t.done() for t in tasks):
            peak = max(peak, threading.active_count())
            await asyncio.sleep(0.05)
        return [t.result() for t in tasks], base, peak

    results, base, peak = asyncio.run(main())
    print(f"\n20 concurrent async runs: threads {base} before, {peak} at most")
    for i, r in enumerate(results):
        assert r.ok and r.stdout == f"job {i}\n" and r.stderr == f"e{i}\n", r
    assert peak == base  # waiting happens on the loop, not in threads


@pytest.mark.vm
def test_async_streams_input_and_errors(vm: SmolVM) -> None:
    async def main() -> None:
        chunks: list[bytes] = []
        r = await vm.async_run("cat; echo end", input=b"x" * 100_000, on_stdout=chunks.append, timeout=SLOW)
        assert r.stdout_bytes == b"x" * 100_000 + b"end\n" and b"".join(chunks) == r.stdout_bytes
        with pytest.raises(FileNotFoundError):
            await vm.async_run("pwd", cwd="/missing", timeout=SLOW)
        r = await vm.async_run("sleep 5", timeout=1)
        assert r.timed_out and r.exit_code == 124

    asyncio.run(main())


@pytest.mark.vm
def test_cancelling_the_task_kills_the_command(vm: SmolVM) -> None:
    pidfile = f"/tmp/async-pid-{os.getpid()}"
    check = f"read p < {pidfile}; kill -0 $p 2>/dev/null && echo alive || echo gone"

    async def main() -> str:
        started = asyncio.Event()
        task = asyncio.create_task(
            vm.async_run(f"echo $$ > {pidfile}; echo started; exec sleep 3600", timeout=SLOW,
                         on_stdout=lambda b: started.set())
        )  # fmt: skip
        await asyncio.wait_for(started.wait(), SLOW)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        left = "?"
        for _ in range(20):
            left = (await vm.async_run(check, timeout=SLOW)).output
            if left == "gone":
                break
            await asyncio.sleep(0.5)
        return left

    assert asyncio.run(main()) == "gone"


@pytest.mark.own_vm
def test_async_smolvm_context(vm: SmolVM) -> None:
    async def main() -> str:
        async with AsyncSmolVM() as avm:
            r = await avm.run("echo hi", timeout=SLOW)
            assert avm.status == "running" and avm.vm_id.startswith("vm-")
            vm_id = avm.vm_id
        assert avm.status == "stopped"
        return vm_id + r.stdout

    assert asyncio.run(main()).endswith("hi\n")
