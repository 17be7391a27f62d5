#include "numpy_tensor.h"

#include <cstring>
#include <stdexcept>

#include "tf_api.h"

namespace py = pybind11;

namespace fgr {
namespace {

// By NumPy's name: py::dtype(const char*) would parse a PEP 3118 buffer format instead.
py::dtype Named(const char* name) { return py::dtype::from_args(py::str(name)); }

py::dtype NumpyType(TF_DataType dtype) {
  switch (dtype) {
    case TF_FLOAT: return Named("float32");
    case TF_DOUBLE: return Named("float64");
    case TF_INT8: return Named("int8");
    case TF_INT16: return Named("int16");
    case TF_INT32: return Named("int32");
    case TF_INT64: return Named("int64");
    case TF_UINT8: return Named("uint8");
    case TF_UINT16: return Named("uint16");
    case TF_UINT32: return Named("uint32");
    case TF_UINT64: return Named("uint64");
    case TF_BOOL: return Named("bool");
    case TF_HALF: return Named("float16");
    case TF_COMPLEX64: return Named("complex64");
    case TF_COMPLEX128: return Named("complex128");
    case TF_STRING: return Named("object");
    case TF_BFLOAT16: return py::dtype::from_args(py::module_::import("ml_dtypes").attr("bfloat16"));
    default: throw std::invalid_argument("Unsupported output dtype " + std::to_string(dtype));
  }
}

TF_DataType TfType(const py::dtype& dtype) {
  const char kind = dtype.kind();
  const ssize_t size = dtype.itemsize();
  if (kind == 'O' || kind == 'S' || kind == 'U') return TF_STRING;
  if (kind == 'b') return TF_BOOL;
  if (kind == 'f') return size == 2 ? TF_HALF : size == 4 ? TF_FLOAT : TF_DOUBLE;
  if (kind == 'c') return size == 8 ? TF_COMPLEX64 : TF_COMPLEX128;
  if (kind == 'i') return size == 1 ? TF_INT8 : size == 2 ? TF_INT16 : size == 4 ? TF_INT32 : TF_INT64;
  if (kind == 'u') return size == 1 ? TF_UINT8 : size == 2 ? TF_UINT16 : size == 4 ? TF_UINT32 : TF_UINT64;
  if (kind == 'V' && py::str(py::handle(dtype)).cast<std::string>() == "bfloat16") return TF_BFLOAT16;
  throw std::invalid_argument("Cannot feed NumPy dtype " + py::str(py::handle(dtype)).cast<std::string>());
}

}  // namespace

TensorPtr FromNumpy(const py::handle& value) {
  py::array array = py::array::ensure(value, py::array::c_style);
  if (!array) throw std::invalid_argument("Feeds must be NumPy arrays");
  std::vector<int64_t> dims(array.shape(), array.shape() + array.ndim());
  const TF_DataType dtype = TfType(array.dtype());
  TensorPtr tensor = Tensor::Allocate(dtype, dims);
  if (dtype != TF_STRING) {
    std::memcpy(tensor->data(), array.data(), tensor->elements() * tensor->element_size());
    return tensor;
  }
  TF_TString* strings = reinterpret_cast<TF_TString*>(tensor->data());
  py::object flat = array.attr("reshape")(-1);
  for (int64_t i = 0; i < tensor->elements(); ++i) {
    py::object item = flat[py::int_(i)];
    std::string bytes = py::isinstance<py::bytes>(item) ? item.cast<std::string>()
                                                        : py::str(item).cast<std::string>();  // UTF-8.
    tf().TF_StringCopy(&strings[i], bytes.data(), bytes.size());
  }
  return tensor;
}

py::array ToNumpy(const TensorSlice& slice) {
  const std::vector<int64_t> dims = slice.dims();
  std::vector<ssize_t> shape(dims.begin(), dims.end());
  py::array array(NumpyType(slice.tensor->dtype()), shape);
  const int64_t n = slice.elements();
  if (slice.tensor->dtype() != TF_STRING) {
    std::memcpy(array.mutable_data(), slice.data(), n * slice.tensor->element_size());
    return array;
  }
  const TF_TString* strings = reinterpret_cast<const TF_TString*>(slice.data());
  PyObject** objects = static_cast<PyObject**>(array.mutable_data());
  for (int64_t i = 0; i < n; ++i) {
    PyObject* bytes = PyBytes_FromStringAndSize(tf().TF_StringGetDataPointer(&strings[i]),
                                                static_cast<Py_ssize_t>(tf().TF_StringGetSize(&strings[i])));
    if (bytes == nullptr) throw py::error_already_set();
    Py_XDECREF(objects[i]);
    objects[i] = bytes;
  }
  return array;
}

Feeds ToFeeds(const py::dict& feeds) {
  Feeds parsed;
  for (const auto& [name, value] : feeds) {
    parsed.names.push_back(name.cast<std::string>());
    parsed.tensors.push_back(FromNumpy(value));
  }
  return parsed;
}

py::list Outputs(const std::vector<TensorSlice>& slices) {
  py::list outputs;
  for (const TensorSlice& slice : slices) outputs.append(ToNumpy(slice));
  return outputs;
}

}  // namespace fgr
