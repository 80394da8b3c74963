"""torch._scaled_mm under its CUDA kernel's rules, for CPU tests (the CPU kernel takes any shape).

    monkeypatch.setattr(torch, "_scaled_mm", strict_scaled_mm)  # conftest.py does it for every test

The rules, as torch checks them before calling cuBLASLt (aten/src/ATen/native/cuda/Blas.cpp,
_scaled_mm_out_cuda, tensor-wise scaling): mat1 (M x K) and mat2 (K x N) are FP8 matrices, not both
E5M2; K and both dimensions of mat2 are multiples of 16 (0 included: an empty product returns
early), M is free; mat1 is row-major and mat2 column-major; scale_a and scale_b are fp32 tensors of
one element; out_dtype is bf16, fp16, fp32 or FP8. Each broken rule raises a RuntimeError whose
message starts as CUDA's does.
"""
import torch

_scaled_mm = torch._scaled_mm  # the real one, taken before any test patches it
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def cuda_rule_broken(mat1, mat2, scale_a, scale_b, out_dtype):
    """The first rule of CUDA's tensor-wise _scaled_mm these arguments break, or None."""
    if mat1.dim() != 2 or mat2.dim() != 2 or mat1.shape[1] != mat2.shape[0]:
        return ("mat1 and mat2 shapes cannot be multiplied "
                f"({tuple(mat1.shape)} and {tuple(mat2.shape)})")
    (m, k), n = mat1.shape, mat2.shape[1]
    if k % 16:
        return ("Expected trailing dimension of mat1 to be divisible by 16 but got mat1 shape: "
                f"({m}x{k})")
    if mat2.shape[0] % 16 or n % 16:
        return f"mat2 shape ({k}x{n}) must be divisible by 16"
    if mat1.dtype not in FP8 or mat2.dtype not in FP8:
        return f"Expected mat1 and mat2 to be Float8 matrices, got {mat1.dtype} and {mat2.dtype}"
    if mat1.dtype == mat2.dtype == torch.float8_e5m2:
        return "Multiplication of two Float8_e5m2 matrices is not supported"
    for name, s in (("scale_a", scale_a), ("scale_b", scale_b)):
        if s.numel() != 1 or s.dtype != torch.float32:
            return (f"{name} must have 1 Float element (tensor-wise scaling), "
                    f"got {s.dtype} of shape {tuple(s.shape)}")
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32, *FP8):
        return f"out_dtype {out_dtype}: bf16, fp16, fp32 or fp8 expected"
    # cuBLASLt's layouts: a dimension of extent 1 has no stride to speak of
    if not (mat1.stride(1) == 1 or k <= 1) or not (mat2.stride(0) == 1 or k <= 1):
        return ("Only multiplication of row-major and column-major matrices is supported by "
                f"cuBLASLt (mat1 strides {mat1.stride()}, mat2 strides {mat2.stride()})")
    return None


def strict_scaled_mm(mat1, mat2, *, scale_a, scale_b, out_dtype=None, **kwargs):
    """torch._scaled_mm that first raises where CUDA would."""
    out = out_dtype if out_dtype is not None else mat1.dtype
    if (why := cuda_rule_broken(mat1, mat2, scale_a, scale_b, out)) is not None:
        raise RuntimeError(f"_scaled_mm on CUDA: {why}")
    return _scaled_mm(mat1, mat2, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype, **kwargs)
