"""A Triton launch planned once and repeated cheaply: the compiled kernel is looked up on the first call and
launched directly after that, without Triton's per-call dispatch (binding and specialising every argument,
hashing the key, looking up the cache). Triton 3.6 on an H200 host: 27 us a launch through
`kernel[grid](...)`, 9 us straight to the compiled kernel; an eager engine step makes ~280 of them.

    launch = Launch(_kernel, grid, device, NUM=4, num_warps=4)    # with the constexprs and options
    launch(x, y, n)                                               # every runtime argument, in order

A call whose arguments Triton would specialise differently from the first call's (another non-tensor
value; a tensor of another dtype, or not 16-byte aligned where the first one's was, or the reverse) goes
through Triton, as every call does off CUDA (the interpreter). Launch hooks (profilers) still run: the
compiled kernel's own launcher (`CompiledKernel[grid]`) calls them.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from triton.runtime import driver

try:  # the grid-dependency wait of programmatic dependent launch (PDL below); older Tritons lack it
    from triton.language.extra.cuda import gdc_wait
except ImportError:
    gdc_wait = None

# Off: every call goes through Triton's dispatch (benchmarks.profile_step --compare-launch times both).
DIRECT = True
# Programmatic dependent launch (Hopper on): a kernel launched with it (`launch_pdl`) may start while the kernel
# before it in the stream ends, and runs up to its grid-dependency wait (`gdc_wait`, which waits for that kernel's
# whole grid and its writes) early. Before the wait a kernel reads only what no kernel of the step writes: weights,
# the adapter slots' B and ranks, the step's token slots and positions (staged before its first kernel). Our
# kernels never signal their dependents early, so a kernel's predecessor has waited for its own before ours starts.
# Only the elementwise ops that expand the adapters' part use it, loading their B before the wait. H200, graph replay
# of the decode step, batch 64 (scratch A/B, two engines): 8 adapters 1,526 -> 1,440 us, 32 adapters 1,784 -> 1,659,
# 1 adapter 1,448 -> 1,394; alone after a cuBLAS o-proj GEMM, RMSNorm expanding 8 slots 4.25 -> 2.88 us, but a plain
# RMSNorm 1.43 -> 1.63: base steps launch as before.
PDL = True


@functools.cache
def _major(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


def pdl(t: torch.Tensor) -> bool:
    """Whether kernels on t's device launch with programmatic dependent launch (PDL above)."""
    return PDL and gdc_wait is not None and t.is_cuda and _major(t.device) >= 9


class Launch:
    def __init__(self, kernel, grid: tuple[int, ...], device: torch.device, **consts: Any):
        self._kernel, self._grid, self._consts = kernel, grid, consts
        self._direct = device.type == "cuda"
        self._device = device.index if device.index is not None else (
            torch.cuda.current_device() if self._direct else None)
        self._runner = None

    def __call__(self, *args: Any) -> None:
        self._send(args, self._runner is not None and tuple(args[i] for i in self._others) == self._values)

    def _send(self, args: tuple, same_values: bool) -> None:
        """Launch; same_values: the non-tensor arguments are the primed call's (checked by the caller)."""
        if same_values and DIRECT and self._tensors_of(args) == self._seen:
            self._runner(*args, *self._tail, stream=self._stream(self._device))
            return
        compiled = self._kernel[self._grid](*args, **self._consts)
        if self._direct and compiled is not None and self._runner is None:
            self._prime(compiled, args)

    def _prime(self, compiled, args: tuple) -> None:
        params = getattr(self._kernel, "params", ())
        if any(getattr(p, "is_constexpr", False) for p in params[:len(args)]):
            return  # a constexpr among the positional arguments: the tail below would misplace it
        names = self._kernel.arg_names[len(args):]
        if any(n not in self._consts for n in names):  # a parameter left to its default: not worth guessing
            return
        self._tail = tuple(self._consts[n] for n in names)
        self._tensors = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
        self._others = tuple(i for i, a in enumerate(args) if not isinstance(a, torch.Tensor))
        self._seen = self._tensors_of(args)
        self._values = tuple(args[i] for i in self._others)
        self._stream = driver.active.get_current_stream
        self._runner = compiled[tuple(self._grid) + (1,) * (3 - len(self._grid))]

    def _tensors_of(self, args: tuple) -> tuple:
        """What Triton specialises a tensor argument on: its dtype and whether it is 16-byte aligned."""
        return tuple((args[i].dtype, args[i].data_ptr() % 16 == 0) for i in self._tensors)


class Launches:
    """`Launch`es of one kernel by grid, non-tensor arguments and constexprs: for ops called with their
    own tensors every layer (the elementwise kernels, attention), each shape planned the first time it
    comes. At most `size` plans are kept (a step's token count changes the grid: eager steps bring new ones
    all the time); past that they are dropped and planned again."""

    def __init__(self, kernel, size: int = 512):
        self._kernel, self._size = kernel, size
        self._plans: dict[tuple, Launch] = {}

    def __call__(self, grid: tuple[int, ...], *args: Any, **consts: Any) -> None:
        key = (grid, *(a for a in args if not isinstance(a, torch.Tensor)), *consts.items())
        launch = self._plans.get(key)
        if launch is None:
            if len(self._plans) >= self._size:
                self._plans.clear()
            launch = self._plans[key] = Launch(self._kernel, grid, args[0].device, **consts)
        # The key holds the non-tensor arguments: a primed plan was primed with these very values.
        launch._send(args, launch._runner is not None)
