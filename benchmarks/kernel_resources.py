"""Registers, spills and shared memory of every Triton kernel, at the launches the paper's runs make.

    python benchmarks/kernel_resources.py [--arch 80 90] [--json PATH]

No GPU needed. The launches come from every registered method's training steps, ``model.extract`` and the
rationale features' backward at 224 px and batch 128 (and 16 per GPU of 8), fp32 and bf16 autocast,
both memory formats, the reference's quirks and the corrected behaviours, with the paper's 2048-channel
trunk and a 512-channel one (ResNet-18 / -34) (``record_workloads`` in lcr_fast.kernel_aot). Each is
compiled for sm_80 and sm_90 with Triton's compiler; registers and spills per thread are from
``ptxas -v``, shared memory per program from Triton's metadata. A kernel
has one row per arch, over all its launches: the range of registers and the worst spills and shared
memory. A spill is a store to local memory (off-chip, cached in L1), the first thing to remove from
a hot loop.
"""
import argparse
import json
from collections import defaultdict

from lcr_fast import kernel_aot as aot


def build_parser() -> argparse.ArgumentParser:
    """The options, unparsed: tests/test_docs.py checks the documentation's commands against them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(aot.GPU_SMS),
                        help="compute capabilities (80: A100, 90: H100 and H200)")
    parser.add_argument("--json", help="write every compiled launch with its resources here")
    return parser


def main() -> None:
    args = build_parser().parse_args()

    launches = aot.record_workloads(archs=args.arch)
    compiled = aot.compile_launches(launches, resources=True)
    rows = defaultdict(list)
    for c in compiled:
        rows[c.launch.name, c.arch].append(c)
    distinct = {launch for arch in args.arch for launch in launches[arch]}
    print(f"{len({name for name, _ in rows})} kernels, {len(distinct)} distinct launch signatures, "
          f"{len(compiled)} compiles\n")
    header = f"{'kernel':<28} {'arch':<6} {'sigs':>4} {'warps':>5} {'registers':>9} {'spill st/ld (B)':>15} " \
             f"{'shared (B)':>10}"
    print(header)
    print("-" * len(header))
    for (name, arch), cs in sorted(rows.items()):
        regs = sorted({c.registers for c in cs})
        spans = f"{regs[0]}-{regs[-1]}" if len(regs) > 1 else str(regs[0])
        spills = f"{max(c.spill_stores for c in cs)}/{max(c.spill_loads for c in cs)}"
        warps = ",".join(str(w) for w in sorted({c.num_warps for c in cs}))
        shared = max(c.shared for c in cs)
        print(f"{name:<28} sm_{arch:<3} {len(cs):>4} {warps:>5} {spans:>9} {spills:>15} {shared:>10}")
    spilling = [c for c in compiled if c.spill_stores or c.spill_loads]
    print(f"\nlaunches that spill: {len(spilling) or 'none'}")
    for c in spilling:
        print(f"  sm_{c.arch} {c.registers} regs, {c.spill_stores}/{c.spill_loads} B: {c.launch.describe()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"kernel": c.launch.name, "arch": c.arch, "signature": c.launch.describe(),
                        "num_warps": c.num_warps, "registers": c.registers, "spill_stores": c.spill_stores,
                        "spill_loads": c.spill_loads, "shared": c.shared} for c in compiled], f, indent=1)


if __name__ == "__main__":
    main()
