"""kernels/launch.py: a planned launch gives what `kernel[grid](...)` gives, call after call, whatever tensors
come (the direct path on CUDA; Triton's own dispatch in the interpreter), and leaves the direct path for
Triton's whenever Triton would pick another variant."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from kernels.launch import Launch, Launches

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@triton.jit
def _axpb_kernel(x_ptr, y_ptr, n, a, b, BLOCK: tl.constexpr, DOUBLE: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    v = tl.load(x_ptr + i, mask=ok, other=0.0) * a + b
    if DOUBLE:
        v = v * 2
    tl.store(y_ptr + i, v, mask=ok)


def _check(launch_call, n: int, a: float, b: int, x: torch.Tensor | None = None):
    x = torch.randn(n, device=DEVICE) if x is None else x
    y = torch.full((n,), float("nan"), device=DEVICE)
    launch_call(x, y, n, a, b)
    torch.testing.assert_close(y, (x * a + b) * 2)


def test_one_launch_many_calls():
    launch = Launch(_axpb_kernel, (4,), DEVICE, BLOCK=16, DOUBLE=True)
    for _ in range(3):
        _check(launch, 50, 1.5, 3)
    # A view 4 bytes into its storage: Triton specialises 16-byte alignment, so this goes back through it.
    base = torch.randn(51, device=DEVICE)
    _check(launch, 50, 1.5, 3, x=base[1:])
    _check(launch, 50, 1.5, 3)
    # Other scalars (n = 16 is another integer variant): right results too.
    _check(launch, 16, -0.5, 7)
    _check(launch, 50, 1.5, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_direct_path_is_taken_and_follows_the_stream():
    launch = Launch(_axpb_kernel, (4,), DEVICE, BLOCK=16, DOUBLE=True)
    _check(launch, 50, 1.5, 3)
    assert launch._runner is not None  # primed: the next calls skip Triton's dispatch
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        x = torch.randn(50, device=DEVICE)
        y = torch.full((50,), float("nan"), device=DEVICE)
        launch(x, y, 50, 1.5, 3)
    side.synchronize()
    torch.testing.assert_close(y, (x * 1.5 + 3) * 2)


def test_launches_plan_each_shape():
    launches = Launches(_axpb_kernel, size=2)
    for n in (50, 16, 50, 33, 50):
        _check(lambda x, y, n, a, b: launches((-(-n // 16),), x, y, n, a, b, BLOCK=16, DOUBLE=True), n, 0.25, 1)
    assert len(launches._plans) <= 2
