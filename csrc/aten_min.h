// The part of ATen bsbert's C++ uses: Tensor (with its methods) and the few free functions the ops call.
// Not ATen/ATen.h, which pulls in every op's header: on the 2-core CI machine a CPU file took ~25 s with
// it and a .cu file parses it again per GPU architecture. A new at:: function needs its ATen/ops header here.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/layer_norm.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/zeros.h>
