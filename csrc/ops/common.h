#pragma once
// Shared by CPU (.cpp) and CUDA (.cu) translation units: keep this header free of host-only ATen.

// Arithmetic shared by the CPU and CUDA kernels. On the host it is always inlined: the CPU hot loops are
// compiled twice (baseline and AVX2, see FH_CPU_CLONES), and GCC vectorises a loop only when these calls
// are inlined into each clone.
#if defined(__CUDACC__)
#define FH_HOST_DEVICE __host__ __device__
#elif defined(__GNUC__)
#define FH_HOST_DEVICE __attribute__((always_inline))
#else
#define FH_HOST_DEVICE
#endif

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <sstream>
#include <string>

namespace fused_hourglass {

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

// dtype names as Python prints them, so errors read the same from the C++ op and the Python wrapper.
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return "torch.float64";
    case at::kFloat: return "torch.float32";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// The layout an op writes its output in: channels_last when the input is channels_last-dense (and not
// also NCHW-dense, e.g. C = 1), NCHW otherwise. The Python fake implementations use the same rule.
inline at::MemoryFormat output_memory_format(const at::Tensor& t) {
  if (t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

inline void check_4d_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 4, op, ": ", name, " must be 4-D [N, C, H, W], got shape ", shape_str(t));
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name,
                   " must be float64, float32, float16 or bfloat16, got ", dtype_name(t.scalar_type()));
}

inline void check_same_dtype_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                                    const char* op) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), op, ": ", a_name, " and ", b_name,
                   " must have the same dtype, got ", a_name, " ", dtype_name(a.scalar_type()), " and ", b_name,
                   " ", dtype_name(b.scalar_type()));
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": ", a_name, " and ", b_name,
                    " must be on the same device, got ", a_name, " on ", a.device(), " and ", b_name, " on ",
                    b.device());
}

}  // namespace fused_hourglass
