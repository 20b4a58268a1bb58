"""The CPU shapes of the fused micro-kernel (vector width, register tile) and which one this CPU runs: decided
once, at load, from the features LLVM sees."""
from __future__ import annotations

from dataclasses import dataclass

from llvmlite import binding as llvm  # numba's own code generator


@dataclass(frozen=True)
class Isa:
    """One micro-kernel shape: ``vec``-float vectors, ``vectors`` of them per panel row (panel =
    vec * vectors output units), up to ``max_rows`` rows per call, so rows * vectors sums live in
    registers; ``chains`` is how many independent FMA chains hide the FMA latency (few rows: the
    inputs are split over several sets of sums). ``wide``: output tiles that are a multiple of two panels get
    *wide* panels, twice as many outputs (2 * vectors vectors, up to max_rows / 2 rows per call, the same number of
    sums); up to ``wide_pair_rows`` rows two wide panels run in one call, each reading its own input tiles."""
    name: str
    vec: int
    vectors: int
    max_rows: int
    chains: int
    wide: bool = False
    wide_pair_rows: int = 0

    @property
    def panel(self) -> int:
        return self.vec * self.vectors


ISAS = {
    # 32 zmm: 24 sums + 2 weight vectors + 1 broadcast; wide (6 x 64): 24 + 4 + 1; two wide at 2 rows: 16 + 8 + 2
    "avx512": Isa("avx512", 16, 2, 12, 16, wide=True, wide_pair_rows=2),
    "avx2": Isa("avx2", 8, 2, 6, 10),        # 16 ymm: 12 sums + 2 + 1
    "generic": Isa("generic", 4, 2, 6, 10),  # 128-bit vectors, which every 64-bit CPU has (SSE2, NEON)
}
PRECISIONS = ("fp32", "bf16", "int8")


def host_features() -> set[str]:
    """The CPU features LLVM sees on this machine (what numba compiles for)."""
    try:
        return {name for name, on in llvm.get_host_cpu_features().items() if on}
    except RuntimeError:  # LLVM cannot list them on some hosts: assume nothing
        return set()


def host_isa(features: set[str] | None = None) -> str:
    """The widest ``ISAS`` entry this CPU runs natively."""
    features = host_features() if features is None else features
    if "avx512f" in features:
        return "avx512"
    if {"avx2", "fma"} <= features:
        return "avx2"
    return "generic"


def supported(isa: str, precision: str, features: set[str] | None = None) -> bool:
    """Whether this CPU can run ``isa`` at ``precision`` (every ISA's shape runs on a wider CPU; bf16 needs
    AVX512-BF16, int8 AVX512-VNNI)."""
    features = host_features() if features is None else features
    order = ("generic", "avx2", "avx512")
    native = order.index(isa) <= order.index(host_isa(features))
    needs = {"fp32": set(), "bf16": {"avx512bf16"}, "int8": {"avx512vnni"}}[precision]
    return native and (precision == "fp32" or (isa == "avx512" and needs <= features))


def describe(isa: str | None = None, precision: str = "fp32", threads: int = 1) -> dict:
    """The micro-kernel that ``FusedNet(..., isa, precision, threads)`` runs on this CPU, as a benchmark records it."""
    spec = ISAS[host_isa() if isa is None else isa]
    tile = f"{spec.max_rows} x {spec.panel} tile"
    if spec.wide:
        tile += f", wide {spec.max_rows // 2} x {2 * spec.panel}"
    return {"isa": spec.name, "vector_floats": spec.vec, "tile_rows": spec.max_rows, "tile_columns": spec.panel,
            "tile": tile, "precision": precision, "threads": threads, "cpu": llvm.get_host_cpu_name(),
            "bf16_available": supported("avx512", "bf16"), "int8_available": supported("avx512", "int8")}


VARIANTS = tuple((isa, precision) for isa in ISAS for precision in PRECISIONS
                 if precision == "fp32" or isa == "avx512")
