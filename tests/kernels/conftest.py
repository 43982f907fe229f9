"""Without a GPU, the Triton kernels run in Triton's interpreter (numpy, on the CPU). The switch must be
set before the kernel modules are imported (triton.jit reads it when it decorates), hence here, at
conftest import, ahead of the test modules of this folder."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
