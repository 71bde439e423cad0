"""Ahead-of-time compilation of every Triton launch configuration for sm_80 (A100) and sm_90 (H100/H200).

No GPU is needed: ``triton.compile`` lowers each variant of :func:`nsl._triton.aot_variants` (the dynamic
convolution's kernels; ``-k conv``) and :func:`nsl._triton.light_aot_variants` (the light predictor's; ``-k light``)
to a cubin, whose shared memory (``metadata.shared``) and register use (``cuobjdump --dump-resource-usage``:
registers per thread, stack bytes, i.e. spills) are checked against the devices' limits. Triton's cache
is a fresh temporary folder (nothing carried between runs); the variants compile in two worker processes.
Run as a script to print the table.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (CI installs triton==3.8.0)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from nsl import _triton as NT  # noqa: E402

# Per-block shared memory and per-SM register file of the targets (CUDA programming guide).
LIMITS = {80: {"shared": 164 * 1024, "regs_per_sm": 65536}, 90: {"shared": 227 * 1024, "regs_per_sm": 65536}}
MAX_REGS_PER_THREAD = 255
# A few float32 variants keep a small stack frame (<= 32 B measured with triton 3.8.0); anything larger
# means real register spilling (the first draft of the kernels spilled up to 3 KB).
MAX_STACK_BYTES = 64
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _resources(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    assert found, f"no resource usage in cuobjdump output: {text!r}"
    return {"regs": int(found[1]), "stack": int(found[2]), "local": int(found[4])}


#: The variant families, each compiled by its own parametrization of the resources test (``-k light`` selects the
#: light predictor's kernel alone): the dynamic convolution's kernels and the light predictor's.
FAMILIES = {"conv": NT.aot_variants, "light": NT.light_aot_variants}


def _compile(family: str, index: int, arch: int) -> dict:
    name, cfg, signature, constexprs = FAMILIES[family]()[index]
    kernel = triton.compile(ASTSource(fn=NT.jit_kernel(name), signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    dtype = next(v for k, v in signature.items() if k.endswith("_ptr"))[1:]
    # conv kernels: diagonal/full M and the reduction step; the light kernel: its stage
    variant = (f"full={constexprs['FULL']!s:<5} k{constexprs['BLOCK_K']:<2}" if "FULL" in constexprs
               else f"stage={constexprs['STAGE']}")
    return {"arch": arch, "kernel": name, "config": cfg.name, "dtype": dtype, "variant": variant,
            "precision": constexprs["PRECISION"], "num_warps": cfg.num_warps, "shared": kernel.metadata.shared,
            **_resources(kernel.asm["cubin"])}


def _init_worker(cache: str) -> None:
    os.environ["TRITON_CACHE_DIR"] = cache


def compile_all(workers: int = 2, families=tuple(FAMILIES)) -> list[dict]:
    """Compile every variant of ``families`` for sm_80 and sm_90 in ``workers`` processes; one result dict each."""
    jobs = [(f, i, arch) for f in families for arch in LIMITS for i in range(len(FAMILIES[f]()))]
    with tempfile.TemporaryDirectory() as cache:
        ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                                    initargs=(cache,)) as pool:
            return list(pool.map(_compile, *zip(*jobs)))




def test_every_variant_is_listed():
    variants = NT.aot_variants()
    kernels = {v[0] for v in variants}
    assert kernels == set(NT.KERNELS) == {cfg.kernel for configs in NT.LAUNCH_CONFIGS.values() for cfg in configs}
    # every config x {fp32 ieee, fp32 tf32, bf16, fp16} x {diagonal, full}; dx+dsim diagonal only
    configs = sum(len(c) for c in NT.LAUNCH_CONFIGS.values())
    assert len(variants) == (configs * 2 - len(NT.LAUNCH_CONFIGS["dx+dsim"])) * 4
    # the dx kernel alone and with its dM share, each with its own configs
    dsim_configs = {v[1] for v in variants if v[0] == "dx" and v[3]["DSIM"]}
    assert dsim_configs == set(NT.LAUNCH_CONFIGS["dx+dsim"])
    assert not any(v[3]["FULL"] for v in variants if v[0] == "dx" and v[3]["DSIM"])
    assert {v[1] for v in variants if v[0] == "dx" and not v[3]["DSIM"]} == set(NT.LAUNCH_CONFIGS["dx"])
    # the launcher can only choose listed configs
    for kernel in NT.LAUNCH_CONFIGS:
        for channels in (1, 16, 32, 33, 64, 512):
            assert NT.pick_config(kernel, channels) in NT.LAUNCH_CONFIGS[kernel]


def test_every_light_variant_is_listed():
    variants = NT.light_aot_variants()
    assert {v[0] for v in variants} == set(NT.LIGHT_KERNELS)
    # each kernel's stages x {fp32 ieee, fp32 tf32, bf16, fp16}
    assert sorted((v[0], v[3]["STAGE"], v[2]["x_ptr"], v[3]["PRECISION"]) for v in variants) == sorted(
        (kernel, stage, dtype, precision) for kernel, stages in NT.LIGHT_STAGES.items() for stage in stages
        for dtype, precision in (("*fp32", "ieee"), ("*fp32", "tf32"), ("*bf16", "ieee"), ("*fp16", "ieee")))


@pytest.mark.slow  # tier 2 (README: the slow tests)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_resources_within_device_limits(family):
    compiled = compile_all(families=(family,))
    assert len(compiled) == 2 * len(FAMILIES[family]())
    problems = []
    for r in compiled:
        limit = LIMITS[r["arch"]]
        tag = f"sm_{r['arch']} {r['kernel']}/{r['config']} {r['dtype']} {r['variant']} {r['precision']}"
        if r["shared"] > limit["shared"]:
            problems.append(f"{tag}: {r['shared']} B shared memory > {limit['shared']}")
        if r["regs"] > MAX_REGS_PER_THREAD or r["regs"] * 32 * r["num_warps"] > limit["regs_per_sm"]:
            problems.append(f"{tag}: {r['regs']} registers x {32 * r['num_warps']} threads")
        if r["stack"] > MAX_STACK_BYTES or r["local"]:
            problems.append(f"{tag}: spills ({r['stack']} B stack, {r['local']} B local)")
    assert not problems, "\n".join(problems)


if __name__ == "__main__":
    import time

    t0 = time.perf_counter()
    rows = compile_all()
    for r in rows:
        print(f"sm_{r['arch']} {r['kernel']:<9} {r['config']:<4} {r['dtype']} {r['variant']:<10} "
              f"{r['precision']:<4} shared {r['shared']:>6} B  regs {r['regs']:>3}  stack {r['stack']:>4}")
    print(f"{len(rows)} variants in {time.perf_counter() - t0:.1f} s")
