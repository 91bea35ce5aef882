// Dtype tags shared with pyfast/_ext.py (DTYPE_TAG), 16-bit float storage types, and a dispatch
// from a runtime float tag to a kernel template.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace pyfast {

enum DTypeTag : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3, kInt32 = 4, kInt64 = 5 };

struct Half {
  std::uint16_t bits;
};
struct BFloat16 {
  std::uint16_t bits;
};

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) for the storage type T named by a float tag.
template <typename F>
decltype(auto) dispatch_float(int tag, const char* what, F&& f) {
  switch (tag) {
    case kFloat32: return f(TypeTag<float>{});
    case kFloat64: return f(TypeTag<double>{});
    case kFloat16: return f(TypeTag<Half>{});
    case kBFloat16: return f(TypeTag<BFloat16>{});
    default: throw std::invalid_argument(std::string(what) + ": unsupported float dtype tag " + std::to_string(tag));
  }
}

}  // namespace pyfast
