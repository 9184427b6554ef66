"""Throughput and MFU (nanoGPT's definition): achieved model FLOPs per second divided by the
hardware's peak.

The training FLOPs of a transformer are estimated as 6 * N * tokens (2 for the forward
multiply-adds, 4 for the backward), N = parameters that take part in the matmuls; with a
frozen base (LoRA) the backward still computes activation gradients through the frozen
weights (2 of the 4), so 4 * N_frozen + 6 * N_trainable is the honest count:
`flops_per_sample_transformer(n_params, tokens, n_trainable=...)`. For the vision tower
(convolutions, attention over patches) a measured forward count is better:
`measure_forward_flops(model.visual, one_image)` with torch's FlopCounterMode, times 3 for a
fully trained tower (forward + 2x backward). The peak is measured for the dtype the steps
compute in, before the steps (`peak_flops`), never inside one.
"""
from __future__ import annotations

from typing import Optional

import torch


def flops_per_sample_transformer(n_params: int, tokens: int, n_trainable: Optional[int] = None) -> float:
    """Training FLOPs of one sample through a transformer of `n_params` matmul parameters.

    6 * N * tokens (forward 2N, backward 4N per token; attention's own T^2 term ignored, as in
    the PaLM/nanoGPT estimate). If `n_trainable` is given, the frozen part only pays for the
    forward and the activation gradients: 4 * (N - n_trainable) + 6 * n_trainable per token."""
    if n_trainable is None:
        return 6.0 * n_params * tokens
    return (4.0 * (n_params - n_trainable) + 6.0 * n_trainable) * tokens


def measure_forward_flops(fn, *inputs, **kwargs) -> float:
    """FLOPs of one forward `fn(*inputs)`, counted by torch's FlopCounterMode (matmuls, convs,
    attention). Multiply by 3 for a trained module's forward + backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    # why MATH: the counter has no formula for the CPU flash-attention kernel and would count
    # attention as 0 FLOPs there; the math form is the same attention as matmuls it counts
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn(*inputs, **kwargs)
    return float(counter.get_total_flops())


# measured on the 2-core development CPU (AMD EPYC Zen 4, avx512_bf16; torch matmul 1024^2):
# only with measure=False, a quick guess; runs measure (`open_clip_cxr.precision.peak_flops`)
CPU_PEAK_DEFAULT = {"bf16": 890e9, "fp16": 890e9, "fp32": 210e9}


def precision_name(dtype) -> str:
    """torch dtype or accelerate value -> fp32 | bf16 | fp16."""
    from open_clip_cxr.precision import dtype_name
    return dtype_name(dtype)


_dtype_name = precision_name


def peak_flops(device, dtype=torch.float32, measure: bool = True, refresh: bool = False) -> float:
    """Peak dense FLOP/s of `device` for `dtype` (the dtype the run computes in): a table for
    known GPUs; on the CPU the `F.linear` rate at the text towers' widths and the current
    thread count, measured once per process (`open_clip_cxr.precision.peak_flops`), or
    `CPU_PEAK_DEFAULT` with measure=False. Call it before the steps, never inside one."""
    from open_clip_cxr import precision
    device = torch.device(device)
    if device.type == "cpu" and not measure:
        return CPU_PEAK_DEFAULT.get(_dtype_name(dtype), CPU_PEAK_DEFAULT["fp32"])
    return precision.peak_flops(device, dtype, refresh=refresh)


def peak_header(device, dtype, num_processes: int = 1) -> str:
    """The log header's peak line: what MFU is measured against."""
    from open_clip_cxr.precision import MODEL_SHAPE
    device = torch.device(device)
    name = _dtype_name(dtype)
    how = (f"F.linear x{MODEL_SHAPE[1]}->{MODEL_SHAPE[2]} measured, {torch.get_num_threads()} thread(s)"
           if device.type == "cpu" else f"table, {torch.cuda.get_device_name(device)}")
    total = peak_flops(device, dtype) * num_processes
    procs = f", x{num_processes} processes" if num_processes > 1 else ""
    return f"MFU peak {total / 1e9:.1f} GFLOP/s {name} ({how}{procs})"


class Throughput:
    """Counts samples, tokens and optimiser steps between log lines; `stats(elapsed)` gives rates.

    Model FLOPs = flops_per_sample * samples + flops_per_token * tokens (see
    `flops_per_sample_transformer`, `measure_forward_flops`); peak: the hardware's FLOP/s
    summed over all processes. MFU% = achieved model FLOP/s / peak * 100."""

    def __init__(self, flops_per_sample: float = 0.0, peak: float = 0.0, flops_per_token: float = 0.0):
        self.flops_per_sample, self.flops_per_token, self.peak = flops_per_sample, flops_per_token, peak
        self.samples = self.tokens = self.steps = 0

    def update(self, samples: int, tokens: int = 0, steps: int = 1) -> None:
        self.samples += int(samples)
        self.tokens += int(tokens)
        self.steps += int(steps)

    def stats(self, elapsed: float) -> dict:
        """Rates over `elapsed` seconds (wall time since the last `stats`); resets the counts."""
        elapsed = max(elapsed, 1e-9)
        flops = self.flops_per_sample * self.samples + self.flops_per_token * self.tokens
        out = {
            "ms_per_step": 1000.0 * elapsed / max(1, self.steps),
            "samples_per_s": self.samples / elapsed,
            "tokens_per_s": self.tokens / elapsed,
            "mfu": 100.0 * flops / elapsed / self.peak if self.peak else 0.0,
        }
        self.samples = self.tokens = self.steps = 0
        return out

