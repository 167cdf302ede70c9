"""Stand-in for sglang/kernels/ops/gemm/cutedsl_dual_gemm.py (SGLang 0.5.23) in a GPU kit without nvidia-cutlass-dsl.

SGLang 0.5.23's Llama MLP imports that module while building its layers; the module imports `cutlass` (the
nvidia-cutlass-dsl wheels, 226 MiB unpacked for cu13 alone, which the kits do not carry). Its fused dual GEMM runs
only on SM100: `can_use_dual_gemm` returns False on an H200 (SM90) with the real module too, so answering False
here serves the same path. tests/gpu/visit-0523.sh copies this file over the real one only when `import cutlass`
fails, and says so in its summary.
"""
from enum import IntEnum

MAX_DUAL_GEMM_DECODE_TOKENS = 16


class DualGemmQuantMode(IntEnum):
    STATIC_PER_TENSOR = 0
    STATIC_PER_TOKEN = 1
    DYNAMIC_PER_TENSOR = 2
    DYNAMIC_PER_TOKEN = 3
    UNQUANT = 4

    @property
    def is_quantized(self) -> bool:
        return self is not self.UNQUANT

    @property
    def is_dynamic(self) -> bool:
        return self in (self.DYNAMIC_PER_TENSOR, self.DYNAMIC_PER_TOKEN)

    @property
    def is_per_token(self) -> bool:
        return self in (self.STATIC_PER_TOKEN, self.DYNAMIC_PER_TOKEN)


def can_use_dual_gemm(num_tokens, hidden_size, intermediate_size, quant_mode) -> bool:
    return False        # (the real one: False unless SM100)


def dual_gemm_swiglu(*args, **kwargs):
    raise RuntimeError("dual GEMM needs nvidia-cutlass-dsl and SM100 (kit stand-in)")


dual_gemm_swiglu_fp8 = dual_gemm_swiglu
