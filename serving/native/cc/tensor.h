// TF_Tensor ownership, and conversion between TensorProto and TF_Tensor.
//
// String elements of tensors built here are views (TF_StringAssignView) of memory the caller keeps
// alive for the whole run: a request's proto or a Python bytes object. No copy of a request's
// strings is made; the owner of that memory outlives the run and the encoding of its outputs.
#ifndef FGR_NATIVE_TENSOR_H_
#define FGR_NATIVE_TENSOR_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "live_counts.h"
#include "tensorflow/core/framework/tensor.pb.h"
#include "tf_api.h"

namespace fgr {

class Tensor {
 public:
  // Takes ownership of `tensor`. `owns_strings`: its TF_STRING elements were copied in (not views)
  // and are released with it (TF_AllocateTensor's buffer does not destroy them).
  explicit Tensor(TF_Tensor* tensor, bool owns_strings = false);
  ~Tensor();
  Tensor(const Tensor&) = delete;
  Tensor& operator=(const Tensor&) = delete;

  // An uninitialised tensor (strings: empty).
  static std::shared_ptr<Tensor> Allocate(TF_DataType dtype, const std::vector<int64_t>& dims);

  TF_Tensor* get() const { return tensor_; }
  TF_DataType dtype() const { return dtype_; }
  const std::vector<int64_t>& dims() const { return dims_; }
  int64_t elements() const { return elements_; }
  char* data() const;
  // Bytes of one element in the buffer (sizeof(TF_TString) for strings).
  size_t element_size() const;
  // Elements per dim-0 row; 0 for scalars.
  int64_t row_elements() const;
  const TF_TString* strings() const { return reinterpret_cast<const TF_TString*>(data()); }

 private:
  TF_Tensor* tensor_;
  bool owns_strings_;
  TF_DataType dtype_;
  std::vector<int64_t> dims_;
  int64_t elements_ = 1;
  Counted<Live::kTensor> counted_;
};

using TensorPtr = std::shared_ptr<Tensor>;

// Rows [offset, offset + rows) of a tensor, or all of it (rows < 0): a share of a batch's output.
struct TensorSlice {
  TensorPtr tensor;
  int64_t offset = 0;
  int64_t rows = -1;

  std::vector<int64_t> dims() const;
  int64_t elements() const;
  const char* data() const;
};

// A request tensor's declared dims and element count, if the fast path takes its shape: known rank
// of at most 64, no negative dimension, nonzero dimensions multiplying to at most 2^40 (the rule of
// tensor_util.declared_shape). Both pricing and decoding read the shape this way.
bool DeclaredShape(const tensorflow::TensorProto& proto, std::vector<int64_t>* dims, int64_t* elements);

// Whether the fast path converts `dtype` both ways (the others go to the Python path).
bool NativeDtype(int dtype);

// Decodes a request tensor that carries exactly its elements (typed values or tensor_content), as
// tensor_util._decode_exact does. False for anything else (fills, unknown rank, half types,
// mismatched sizes): the Python path then decodes it or reports the error in its words.
bool DecodeExact(const tensorflow::TensorProto& proto, TensorPtr* out);

// Encodes an output as predict_util.predict_response does: typed fields, or tensor_content for
// numeric tensors of more than one element when `as_tensor_content` (tf.make_tensor_proto).
void Encode(const TensorSlice& slice, int dtype, bool as_tensor_content, tensorflow::TensorProto* proto);

// Concatenates the tensors along dim 0 and pads with copies of the first row up to `padded_rows`.
// Inner dims must agree unless `pad_inner` (pad_variable_length_inputs): then each is padded to the
// largest with the tensor's first element, as TF Serving's batching does.
TensorPtr Concat(const std::vector<TensorPtr>& parts, int64_t padded_rows, bool pad_inner);

}  // namespace fgr

#endif  // FGR_NATIVE_TENSOR_H_
