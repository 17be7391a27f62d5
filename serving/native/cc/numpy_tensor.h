// NumPy arrays <-> native tensors, for the calls Python makes (REST, Classify, warm-up, fallbacks).
#ifndef FGR_NATIVE_NUMPY_TENSOR_H_
#define FGR_NATIVE_NUMPY_TENSOR_H_

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <vector>

#include "tensor.h"

namespace fgr {

// A run's feeds: tensor names and their values, in the same order.
struct Feeds {
  std::vector<std::string> names;
  std::vector<TensorPtr> tensors;
};

// A tensor holding a copy of the array `value` (C order; strings as bytes, str as UTF-8).
TensorPtr FromNumpy(const pybind11::handle& value);
// An array holding a copy of `slice` (strings as an object array of bytes).
pybind11::array ToNumpy(const TensorSlice& slice);
// {tensor name: array} as feeds.
Feeds ToFeeds(const pybind11::dict& feeds);
// A run's outputs as a list of arrays.
pybind11::list Outputs(const std::vector<TensorSlice>& slices);

}  // namespace fgr

#endif  // FGR_NATIVE_NUMPY_TENSOR_H_
