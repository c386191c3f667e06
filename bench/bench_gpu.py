"""GPU throughput: the CuPy engine vs the NumPy engine vs plain PyTorch on the same GPU.

For each synthetic model (default ``synthetic-mlp@w4096-d8`` and ``@w1024-d4``) and batch size
(1, 8, 64, 256, 1024) it times complete host-to-host calls (NumPy batch in, NumPy probabilities
out, device synchronised) after a warm-up:

* ``numpy``      -- ``await NumpyEngine.infer`` (all CPU cores through BLAS),
* ``cupy``       -- ``await CupyEngine.infer`` (executor hop, pinned async copies, stream sync),
* ``cupy-core``  -- the CuPy engine's forward function called directly (no executor hop),
* ``cupy-eager`` -- the same without CUDA graphs (``graph_max_rows=0``): one launch per kernel,
* ``torch``      -- a plain PyTorch implementation of the same model with the same float32
  weights: pinned buffers, non-blocking copies on its own stream, ``addmm``+``relu_``, softmax,
* ``torch+hop``  -- that PyTorch function through the same BoundedExecutor hop as the engine.

Ratios: ``cupy/torch+hop`` compares the two through the same event-loop-to-thread hop (the
price any asyncio service pays to keep its loop free); ``core/torch`` compares bare forward
functions called on the calling thread.

TF32 is off on both GPU paths (CuPy's default; ``allow_tf32 = False`` for PyTorch). PyTorch is
needed by this benchmark only.

    python bench/bench_gpu.py [--models w4096-d8,w1024-d4] [--budget 0.3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable

import numpy as np

from meshinfer.inference.cupy_engine import CupyEngine, cupy_unavailable_reason
from meshinfer.inference.executor import BoundedExecutor
from meshinfer.inference.mlp import MLPWeights
from meshinfer.inference.numpy_engine import NumpyEngine
from meshinfer.inference.registry import ModelRegistry, synthetic_model
from meshinfer.inference.synthetic import SyntheticSpec, parse_version, sample_inputs

BATCHES = (1, 8, 64, 256, 1024)


class TorchMLP:
    """The same MLP in plain PyTorch on one GPU, host-to-host like the engines."""

    def __init__(self, weights: MLPWeights, max_rows: int, device: str = "cuda:0") -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.layers = [
            (
                torch.from_numpy(lay.weight).to(self.device),
                torch.from_numpy(lay.bias).to(self.device),
            )
            for lay in weights.layers
        ]
        self.stream = torch.cuda.Stream(self.device)
        self.pin_in = torch.empty((max_rows, weights.input_dim)).pin_memory()
        self.pin_out = torch.empty((max_rows, weights.output_dim)).pin_memory()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch, rows = self.torch, batch.shape[0]
        with torch.inference_mode(), torch.cuda.stream(self.stream):
            np.copyto(self.pin_in[:rows].numpy(), batch)
            h = self.pin_in[:rows].to(self.device, non_blocking=True)
            for weight, bias in self.layers[:-1]:
                h = torch.addmm(bias, h, weight).relu_()
            weight, bias = self.layers[-1]
            probs = torch.softmax(torch.addmm(bias, h, weight), dim=1)
            self.pin_out[:rows].copy_(probs, non_blocking=True)
        self.stream.synchronize()
        return self.pin_out[:rows].numpy().copy()


async def time_calls(
    call: Callable[[], Awaitable[object]], *, min_calls: int, budget_s: float
) -> list[float]:
    """Latencies (s) of repeated calls after a warm-up: at least ``min_calls``, ~``budget_s``."""
    for _ in range(3):
        await call()
    latencies: list[float] = []
    start = time.perf_counter()
    while len(latencies) < min_calls or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        await call()
        latencies.append(time.perf_counter() - t0)
        if len(latencies) >= 10_000:
            break
    return latencies


def summary(rows: int, latencies: list[float]) -> tuple[float, float]:
    """(samples per second, median latency in ms)."""
    return rows / statistics.fmean(latencies), statistics.median(latencies) * 1000


def as_coro(fn: Callable[[], object]) -> Callable[[], Awaitable[object]]:
    async def call() -> object:
        return fn()

    return call


COLUMNS = ("numpy", "cupy", "cupy-core", "cupy-eager", "torch", "torch+hop")


async def bench_model(spec: SyntheticSpec, batches: tuple[int, ...], budget_s: float) -> None:
    registry = ModelRegistry((synthetic_model(spec),))
    weights = registry.get(spec.ref).load_weights()
    biggest = max(batches)
    torch_model = TorchMLP(weights, biggest)
    async with (
        NumpyEngine(registry, max_batch_size=biggest) as cpu,
        CupyEngine(registry, max_batch_size=biggest) as gpu,
        CupyEngine(registry, max_batch_size=biggest, graph_max_rows=0) as eager,
        BoundedExecutor(name="bench-torch") as torch_hop,
    ):
        await asyncio.gather(cpu.load(spec.ref), gpu.load(spec.ref), eager.load(spec.ref))
        check = sample_inputs(spec, 64)
        ref_cpu, ref_gpu = await cpu.infer(spec.ref, check), await gpu.infer(spec.ref, check)
        print(
            f"\n{spec.ref}: {spec.parameter_count / 1e6:.1f} M parameters; max |cupy-numpy| "
            f"{np.abs(ref_gpu - ref_cpu).max():.2e}, max |cupy-torch| "
            f"{np.abs(ref_gpu - torch_model(check)).max():.2e}"
        )
        head = " | ".join(f"{name + ' /s':>11} {'ms':>7}" for name in COLUMNS)
        ratios = "cupy/torch+hop  core/torch  cupy/numpy"
        print(f"{'batch':>5} | {head} | {ratios}")
        print("-" * (len(head) + len(ratios) + 11))
        prepared = gpu.device_weights(spec.ref)
        eager_prepared = eager.device_weights(spec.ref)
        for rows in batches:
            batch = sample_inputs(spec, rows, seed=rows)
            calls = {
                "numpy": lambda b=batch: cpu.infer(spec.ref, b),
                "cupy": lambda b=batch: gpu.infer(spec.ref, b),
                "cupy-core": as_coro(lambda b=batch: gpu._forward(prepared, b)),
                "cupy-eager": as_coro(lambda b=batch: eager._forward(eager_prepared, b)),
                "torch": as_coro(lambda b=batch: torch_model(b)),
                "torch+hop": lambda b=batch: torch_hop.run(torch_model, b),
            }
            figures = {}
            for name, call in calls.items():
                min_calls = 3 if name == "numpy" else 20
                latencies = await time_calls(call, min_calls=min_calls, budget_s=budget_s)
                figures[name] = summary(rows, latencies)
            cells = " | ".join(f"{figures[n][0]:>11,.0f} {figures[n][1]:>7.3f}" for n in COLUMNS)
            rate = {name: fig[0] for name, fig in figures.items()}
            hop_ratio = rate["cupy"] / rate["torch+hop"]
            core_ratio = rate["cupy-core"] / rate["torch"]
            cpu_ratio = rate["cupy"] / rate["numpy"]
            ratio_cells = f"{hop_ratio:>13.2f}x {core_ratio:>10.2f}x {cpu_ratio:>10.1f}x"
            print(f"{rows:>5} | {cells} | {ratio_cells}")


def describe_device() -> None:
    import cupy
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    props = cupy.cuda.runtime.getDeviceProperties(0)
    print(f"device: {props['name'].decode()} ({props['totalGlobalMem'] / 2**30:.0f} GiB)")
    print(
        f"cupy {cupy.__version__} (CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}), "
        f"torch {torch.__version__}, numpy {np.__version__}, CPU threads {os.cpu_count()}"
    )
    print(
        f"TF32: torch allow_tf32={torch.backends.cuda.matmul.allow_tf32}, "
        f"CUPY_TF32={os.environ.get('CUPY_TF32', 'unset')}"
    )
    print("figures: samples/s = rows / mean latency; ms = median host-to-host latency")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="w4096-d8,w1024-d4", help="synthetic versions")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--budget", type=float, default=0.3, help="seconds per measurement")
    args = parser.parse_args()
    try:
        batches = tuple(int(b) for b in args.batches.split(","))
        specs = [SyntheticSpec(*parse_version(v)) for v in args.models.split(",")]
    except ValueError as exc:
        parser.error(f"--batches (comma-separated row counts) or --models: {exc}")
    if min(batches) < 1 or not args.budget > 0:
        parser.error("--batches values must be at least 1 and --budget > 0")
    reason = cupy_unavailable_reason()
    if reason is not None:
        raise SystemExit(f"bench_gpu needs an NVIDIA GPU with CuPy: {reason}")
    describe_device()
    for spec in specs:
        asyncio.run(bench_model(spec, batches, args.budget))


if __name__ == "__main__":
    main()
