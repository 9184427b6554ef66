"""Which precision and how many CPU threads a run computes with: measured on the machine, not assumed.

    from open_clip_cxr.precision import choose
    choice = choose("auto", device="cpu")    # or "fp32" / "bf16" to force
    print(choice.line())                     # precision bf16 (auto: bf16 2.61x fp32 ...)
    choice.mixed_precision                   # "bf16" or "no": what accelerate takes
    choice.dtype                             # torch.bfloat16 or None: autocast / frozen-weight dtype

Why measure: bf16 is ~2.5x fp32 on a CPU with AVX512-BF16 or AMX, and ~10x *slower* on an
AVX2-only CPU, where PyTorch emulates it. The probe times the op the text towers spend their
time in, `F.linear` at the model's widths (SmolLM2-135M: 576 -> 1536, a 512-token chunk), in
fp32 and in the run's bf16 path (bf16 weights, as `train.frozen_low_precision` stores them, and
fp32 activations cast by autocast). `auto` picks bf16 only when that is clearly faster (by
`BF16_MARGIN`); on CUDA it picks bf16 where the GPU supports it. The environment variable
`OPEN_CLIP_CXR_PRECISION=fp32|bf16|auto` overrides a recipe's or a command's value.

Threads (`choose_threads("auto")`): the same probe at one thread and at every core this
process may use; all cores only when they are clearly faster (a loaded machine often says no).

Peaks for MFU (`peak_flops`): the best `F.linear` rate of the dtype a run computes in, measured
once per process (never during a training step), or a table for known GPUs.

Every measurement is cached per process: a probe costs ~1-2 s the first time, nothing after.
This module imports only torch, so the library (eval encoding) uses it without `training/`.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

ENV = "OPEN_CLIP_CXR_PRECISION"
VALUES = ("auto", "fp32", "bf16", "fp16")
# tokens, in features, out features: SmolLM2-135M's MLP projection on a 512-token chunk
MODEL_SHAPE = (512, 576, 1536)
BF16_MARGIN = 1.10      # auto takes bf16 only when it is at least this much faster than fp32
THREADS_MARGIN = 1.15   # auto takes every core only when they are at least this much faster than one

# dense (no sparsity) tensor-core peaks, FLOP/s
GPU_PEAKS = {
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "fp32": 30e12},
}
UNKNOWN_GPU_PEAK = 989e12   # an unknown GPU: H100-class, so its MFU is never flattering

_ALIASES = {"no": "fp32", "false": "fp32", "none": "fp32", "float32": "fp32", "32": "fp32",
            "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
_RATES: Dict[tuple, float] = {}


def normalize(value) -> str:
    """A precision value as recipes and flags write it -> auto | fp32 | bf16 | fp16.
    None means auto; YAML's bare `no` (False) means fp32."""
    if value is None:
        return "auto"
    if value is False:
        return "fp32"
    v = str(value).strip().lower()
    v = _ALIASES.get(v, v)
    if v not in VALUES:
        raise ValueError(f"precision {value!r} is not one of auto, fp32, bf16, fp16 "
                         f"(set the recipe's train.mixed_precision or {ENV} to one of them)")
    return v


def requested(value=None) -> Tuple[str, str]:
    """(precision asked for, where it came from): `OPEN_CLIP_CXR_PRECISION` wins over `value`."""
    env = os.environ.get(ENV, "").strip()
    if env:
        return normalize(env), f"env {ENV}"
    return normalize(value), "recipe"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------- probes

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _linear_call(mode: str, shape: Tuple[int, int, int], device: torch.device):
    tokens, d_in, d_out = shape
    low = torch.float16 if mode.startswith("fp16") else torch.bfloat16
    g = torch.Generator().manual_seed(0)      # its own: the global RNG stays untouched
    x = torch.randn(tokens, d_in, generator=g).to(device)
    w = torch.randn(d_out, d_in, generator=g).to(device) / d_in ** 0.5
    if mode in ("bf16", "fp16"):
        w = w.to(low)
    elif mode.endswith("_pure"):
        x, w = x.to(low), w.to(low)
    elif mode not in ("fp32", "autocast"):
        raise ValueError(f"linear_rate mode {mode!r}")
    cast = mode in ("bf16", "fp16", "autocast")

    def call():
        with torch.autocast(device.type, dtype=low, enabled=cast):
            return F.linear(x, w)
    return call


def linear_rates(modes, shape: Tuple[int, int, int] = MODEL_SHAPE, device="cpu", threads: Optional[int] = None,
                 seconds: float = 0.12, repeats: int = 3) -> Dict[str, float]:
    """FLOP/s of `F.linear(x[tokens, in], w[out, in])` per mode: the best of `repeats` timed
    windows each (the best, because other work on the machine only ever slows a window down),
    the modes' windows taken in turn so a change of load hits them alike. Cached per process.

    mode: "fp32"; "bf16" (bf16 weights, fp32 activations cast by bf16 autocast: the path a run
    with frozen bf16 weights takes); "bf16_pure" (both operands already bf16: the op alone);
    "autocast" (fp32 weights re-cast at every call under autocast); "fp16"/"fp16_pure" alike.
    `threads`: torch CPU threads for the measurement (default: the current setting)."""
    device = torch.device(device)
    threads = int(threads or torch.get_num_threads())
    keys = {m: (str(device), m, tuple(shape), threads if device.type == "cpu" else 0) for m in modes}
    todo = [m for m in modes if keys[m] not in _RATES]
    if todo:
        flops = 2.0 * shape[0] * shape[1] * shape[2]
        calls = {m: _linear_call(m, shape, device) for m in todo}
        best = dict.fromkeys(todo, 0.0)
        old = torch.get_num_threads()
        if device.type == "cpu":
            torch.set_num_threads(threads)
        try:
            with torch.no_grad():
                for call in calls.values():
                    call()
                    call()      # warm-up: oneDNN builds its kernels on the first calls
                _sync(device)
                for _ in range(repeats):
                    for m, call in calls.items():
                        n, t0 = 0, time.perf_counter()
                        while True:
                            call()
                            n += 1
                            _sync(device)
                            dt = time.perf_counter() - t0
                            if dt >= seconds:
                                break
                        best[m] = max(best[m], flops * n / dt)
        finally:
            torch.set_num_threads(old)
        for m in todo:
            _RATES[keys[m]] = best[m]
    return {m: _RATES[keys[m]] for m in modes}


def linear_rate(mode: str = "fp32", shape: Tuple[int, int, int] = MODEL_SHAPE, device="cpu",
                threads: Optional[int] = None, seconds: float = 0.12, repeats: int = 3) -> float:
    """One mode of `linear_rates`."""
    return linear_rates((mode,), shape, device, threads, seconds, repeats)[mode]


def dtype_name(dtype) -> str:
    """torch dtype, accelerate value ("no", "bf16") or precision name -> fp32 | bf16 | fp16."""
    if isinstance(dtype, torch.dtype):
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    if dtype is None:
        return "fp32"
    name = normalize(dtype)
    return "fp32" if name == "auto" else name


def peak_flops(device="cpu", dtype=torch.float32, shape: Tuple[int, int, int] = MODEL_SHAPE,
               threads: Optional[int] = None, refresh: bool = False) -> float:
    """Peak dense FLOP/s for MFU, in the dtype a run computes in.

    GPU: the table above (tensor-core peaks). CPU: the measured `F.linear` rate at the model's
    widths and the current thread count, the best over 512- and 2048-token chunks (the
    training chunks' range); fp32 runs measure fp32, bf16 runs pure bf16. Cached per process:
    call it before the steps, never inside one. `refresh=True` measures again (between steps,
    when a run beat the peak because the machine was busier during the first probe) and
    keeps the higher value."""
    device = torch.device(device)
    name = dtype_name(dtype)
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        for key, peaks in GPU_PEAKS.items():
            if key in gpu:
                return peaks.get(name, peaks["bf16"])
        return UNKNOWN_GPU_PEAK
    mode = "fp32" if name == "fp32" else f"{name}_pure"
    tokens, d_in, d_out = shape
    if refresh:
        n = int(threads or torch.get_num_threads())
        for t in (tokens, 4 * tokens):
            key = (str(device), mode, (t, d_in, d_out), n)
            old = _RATES.pop(key, 0.0)
            _RATES[key] = max(old, linear_rates((mode,), (t, d_in, d_out), device, n)[mode])
    return max(linear_rates((mode,), (t, d_in, d_out), device, threads)[mode] for t in (tokens, 4 * tokens))


# ---------------------------------------------------------------- the choice

@dataclass
class Choice:
    """What a run computes in, and why (printed at start, saved with the run)."""
    precision: str                       # fp32 | bf16 | fp16
    requested: str                       # auto | fp32 | bf16 | fp16
    source: str                          # "recipe" (or the argument) | "env OPEN_CLIP_CXR_PRECISION"
    device: str                          # cpu | cuda
    reason: str
    threads: int                         # torch CPU threads when the choice was made
    fp32_gflops: Optional[float] = None  # the probe (CPU auto only)
    bf16_gflops: Optional[float] = None

    @property
    def ratio(self) -> Optional[float]:
        """bf16 speed over fp32 speed in the probe (None when not measured)."""
        if self.fp32_gflops and self.bf16_gflops:
            return self.bf16_gflops / self.fp32_gflops
        return None

    @property
    def mixed_precision(self) -> str:
        """accelerate's `mixed_precision` value."""
        return "no" if self.precision == "fp32" else self.precision

    @property
    def dtype(self) -> Optional[torch.dtype]:
        """The autocast / frozen-weight dtype (None: fp32 throughout)."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def line(self) -> str:
        probe = ""
        if self.ratio is not None:
            probe = (f"; probe F.linear {MODEL_SHAPE[0]}x{MODEL_SHAPE[1]}@{MODEL_SHAPE[1]}x{MODEL_SHAPE[2]}, "
                     f"{self.threads} thread{'s' if self.threads > 1 else ''}: fp32 {self.fp32_gflops:.0f}, "
                     f"bf16 {self.bf16_gflops:.0f} GFLOP/s, bf16/fp32 {self.ratio:.2f}x")
        return f"precision {self.precision} ({self.requested} from {self.source}: {self.reason}{probe})"

    def record(self) -> dict:
        out = {k: (round(v, 1) if isinstance(v, float) else v) for k, v in asdict(self).items()}
        out["bf16_over_fp32"] = None if self.ratio is None else round(self.ratio, 3)
        return out


def choose(value=None, device="cpu", threads: Optional[int] = None) -> Choice:
    """Resolve a precision request (recipe value, flag; `OPEN_CLIP_CXR_PRECISION` overrides it).

    Explicit fp32/bf16/fp16 are taken as they are. `auto`: on CUDA bf16 when the GPU supports
    it (else fp32); on the CPU bf16 only when the measured probe says bf16 beats fp32 by
    `BF16_MARGIN` at `threads` (default: the current torch setting)."""
    req, source = requested(value)
    device = torch.device(device)
    threads = int(threads or torch.get_num_threads())
    if req != "auto":
        return Choice(req, req, source, device.type, "forced", threads)
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return Choice("bf16" if ok else "fp32", req, source, "cuda",
                      "the GPU supports bf16" if ok else "no bf16 on this GPU", threads)
    if device.type != "cpu":
        return Choice("fp32", req, source, device.type, f"no probe for {device.type}", threads)
    rates = linear_rates(("fp32", "bf16"), MODEL_SHAPE, device, threads)
    fp32, bf16 = rates["fp32"], rates["bf16"]
    pick = "bf16" if bf16 >= BF16_MARGIN * fp32 else "fp32"
    reason = ("bf16 measured faster" if pick == "bf16"
              else f"bf16 not measured >= {BF16_MARGIN:.2f}x fp32")
    return Choice(pick, req, source, "cpu", reason, threads, fp32 / 1e9, bf16 / 1e9)


def agree(choice: Choice) -> Choice:
    """Under torch.distributed (initialised), every process computes in one precision: bf16 only
    when every process measured it faster (each probes its own CPU, and loads differ)."""
    import dataclasses
    import torch.distributed as dist
    if choice.requested != "auto" or not (dist.is_available() and dist.is_initialized()) \
            or dist.get_world_size() == 1:
        return choice
    flag = torch.tensor([int(choice.precision == "bf16")])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if choice.precision == "bf16" and not flag.item():
        return dataclasses.replace(choice, precision="fp32", reason="another process measured bf16 slower")
    return choice


def choose_threads(value=None, precision: str = "fp32") -> Tuple[int, str]:
    """(threads, why) for a `num_threads` value: an int is taken as given; None leaves torch's
    current setting; "auto" times the probe in `precision` at 1 thread and at every usable
    core and takes all cores only when they are `THREADS_MARGIN` faster."""
    if value is None or value == "":
        return torch.get_num_threads(), "torch default"
    if str(value).strip().lower() != "auto":
        try:
            n = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"num_threads {value!r}: give a positive integer or auto") from None
        if n < 1:
            raise ValueError(f"num_threads {value!r}: give a positive integer or auto")
        return n, "forced"
    cores = usable_cores()
    if cores <= 1:
        return 1, "one usable core"
    mode = "fp32" if dtype_name(precision) == "fp32" else dtype_name(precision)
    one = linear_rates((mode,), MODEL_SHAPE, "cpu", 1)[mode]
    many = linear_rates((mode,), MODEL_SHAPE, "cpu", cores)[mode]
    if many >= THREADS_MARGIN * one:
        return cores, f"auto: {cores} threads {many / one:.2f}x one ({mode} probe)"
    return 1, f"auto: {cores} threads only {many / one:.2f}x one ({mode} probe; a loaded machine?)"


def resolve(precision=None, threads=None, device="cpu") -> Tuple[Choice, int, str]:
    """Threads and precision together, as a run starts: threads first when the precision is
    forced; with both auto, the precision is chosen at the thread count auto would pick for
    fp32 and then the threads are re-checked in the chosen precision. Sets torch's threads."""
    device = torch.device(device)
    if device.type != "cpu":
        n, why = choose_threads(threads, "fp32")
        if threads is not None:
            torch.set_num_threads(n)
        return choose(precision, device), n, why
    req, _ = requested(precision)
    n, why = choose_threads(threads, "fp32" if req == "auto" else req)
    choice = choose(precision, device, threads=n)
    if str(threads).strip().lower() == "auto" and choice.precision != "fp32":
        n, why = choose_threads(threads, choice.precision)
        if n != choice.threads:
            choice = choose(precision, device, threads=n)
    torch.set_num_threads(n)
    choice.threads = n
    return choice, n, why
