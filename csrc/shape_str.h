// "[2, 3, 4]" for a tensor's shape, for error messages.
//
// Why not stream t.sizes() into TORCH_CHECK: on the lent H200 (torch 2.11, nvcc 13.0 with
// /opt/gcc as host compiler) formatting an IntArrayRef inside nvcc-compiled host code crashed the
// process (segfault in test_bsr_linear_errors_name_the_problem) where the same message built in g++
// code works. The CUDA translation units call this function, defined in a g++-compiled .cpp, instead.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace bsbert {
std::string shape_str(const at::Tensor& t);
}  // namespace bsbert
