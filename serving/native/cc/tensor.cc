#include "tensor.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace fgr {
namespace {

// The most elements a shape the fast path takes may span, counting each zero dimension as 1, so that
// a zero-element shape ([0, 2^62]) is bounded too; bigger (legal or not) goes to the Python path,
// which owns the limits and their messages. The same rule as tensor_util.declared_shape
// (MAX_SHAPE_SPAN): keep the two identical, so Python refuses exactly what this declines for size.
constexpr int64_t kMaxSpan = int64_t{1} << 40;
// Most dimensions it decodes: tensor_util.MAX_RANK, NumPy's limit. (TF aborts the process on a
// shape of more than 254, so this check must come before any TF_AllocateTensor.)
constexpr int kMaxRank = 64;

// A string tensor's tensor_content as TF writes it (port::EncodeStringList): every length as a
// varint32, then every string.
void EncodeStringList(const TF_TString* strings, int64_t n, std::string* out) {
  size_t total = 0;
  for (int64_t i = 0; i < n; ++i) total += tf().TF_StringGetSize(&strings[i]);
  out->reserve(total + 5 * static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    uint64_t size = tf().TF_StringGetSize(&strings[i]);
    while (size >= 0x80) {
      out->push_back(static_cast<char>((size & 0x7F) | 0x80));
      size >>= 7;
    }
    out->push_back(static_cast<char>(size));
  }
  for (int64_t i = 0; i < n; ++i) out->append(tf().TF_StringGetDataPointer(&strings[i]), tf().TF_StringGetSize(&strings[i]));
}

template <typename To, typename From>
bool CopyNarrowed(const From* values, int64_t n, char* out) {
  To* typed = reinterpret_cast<To*>(out);
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (!std::is_same_v<To, From>) {
      if (values[i] < static_cast<From>(std::numeric_limits<To>::min()) ||
          values[i] > static_cast<From>(std::numeric_limits<To>::max())) {
        return false;  // NumPy refuses it; the Python path says so.
      }
    }
    typed[i] = static_cast<To>(values[i]);
  }
  return true;
}

template <typename Field, typename T>
void AppendAll(const T* values, int64_t n, Field* field) {
  field->Reserve(static_cast<int>(n));
  for (int64_t i = 0; i < n; ++i) field->AddAlreadyReserved(values[i]);
}

template <typename Field, typename T>
void AppendWidened(const T* values, int64_t n, Field* field) {
  field->Reserve(static_cast<int>(n));
  for (int64_t i = 0; i < n; ++i) field->AddAlreadyReserved(static_cast<typename Field::value_type>(values[i]));
}

}  // namespace

Tensor::Tensor(TF_Tensor* tensor, bool owns_strings)
    : tensor_(tensor), owns_strings_(owns_strings), dtype_(tf().TF_TensorType(tensor)) {
  int rank = tf().TF_NumDims(tensor);
  dims_.resize(rank);
  for (int i = 0; i < rank; ++i) {
    dims_[i] = tf().TF_Dim(tensor, i);
    elements_ *= dims_[i];
  }
}

Tensor::~Tensor() {
  if (owns_strings_ && dtype_ == TF_STRING) {
    TF_TString* strings = reinterpret_cast<TF_TString*>(data());
    for (int64_t i = 0; i < elements_; ++i) tf().TF_StringDealloc(&strings[i]);
  }
  tf().TF_DeleteTensor(tensor_);
}

TensorPtr Tensor::Allocate(TF_DataType dtype, const std::vector<int64_t>& dims) {
  int64_t elements = 1;
  for (int64_t d : dims) elements *= d;
  size_t size = dtype == TF_STRING ? sizeof(TF_TString) : tf().TF_DataTypeSize(dtype);
  TF_Tensor* raw = tf().TF_AllocateTensor(dtype, dims.data(), static_cast<int>(dims.size()), elements * size);
  auto tensor = std::make_shared<Tensor>(raw, /*owns_strings=*/dtype == TF_STRING);
  if (dtype == TF_STRING) {
    TF_TString* strings = reinterpret_cast<TF_TString*>(tensor->data());
    for (int64_t i = 0; i < elements; ++i) tf().TF_StringInit(&strings[i]);
  }
  return tensor;
}

char* Tensor::data() const { return static_cast<char*>(tf().TF_TensorData(tensor_)); }

size_t Tensor::element_size() const {
  return dtype_ == TF_STRING ? sizeof(TF_TString) : tf().TF_DataTypeSize(dtype_);
}

int64_t Tensor::row_elements() const {
  if (dims_.empty()) return 0;
  int64_t inner = 1;
  for (size_t i = 1; i < dims_.size(); ++i) inner *= dims_[i];
  return inner;
}

std::vector<int64_t> TensorSlice::dims() const {
  std::vector<int64_t> dims = tensor->dims();
  if (rows >= 0 && !dims.empty()) dims[0] = rows;
  return dims;
}

int64_t TensorSlice::elements() const { return rows < 0 ? tensor->elements() : rows * tensor->row_elements(); }

const char* TensorSlice::data() const {
  return tensor->data() + (rows < 0 ? 0 : offset * tensor->row_elements() * tensor->element_size());
}

bool DeclaredShape(const tensorflow::TensorProto& proto, std::vector<int64_t>* dims, int64_t* elements) {
  if (proto.tensor_shape().unknown_rank() || proto.tensor_shape().dim_size() > kMaxRank) return false;
  int64_t n = 1, span = 1;
  for (const auto& dim : proto.tensor_shape().dim()) {
    if (dim.size() < 0) return false;
    if (dim.size() > 0) {
      if (span > kMaxSpan / dim.size()) return false;  // span * size > kMaxSpan, without overflow.
      span *= dim.size();
    }
    dims->push_back(dim.size());
    n *= dim.size();
  }
  *elements = n;
  return true;
}

bool NativeDtype(int dtype) {
  switch (dtype) {
    case TF_FLOAT: case TF_DOUBLE: case TF_INT8: case TF_INT16: case TF_INT32: case TF_UINT8:
    case TF_UINT16: case TF_INT64: case TF_UINT32: case TF_UINT64: case TF_BOOL: case TF_STRING:
      return true;
    default:
      return false;
  }
}

namespace {

// How many values the typed field of `dtype` holds (int_val carries the narrower integers, as in TF).
int64_t TypedValueCount(const tensorflow::TensorProto& proto, int dtype) {
  switch (dtype) {
    case TF_FLOAT: return proto.float_val_size();
    case TF_DOUBLE: return proto.double_val_size();
    case TF_INT32: case TF_INT16: case TF_INT8: case TF_UINT8: case TF_UINT16: return proto.int_val_size();
    case TF_INT64: return proto.int64_val_size();
    case TF_UINT32: return proto.uint32_val_size();
    case TF_UINT64: return proto.uint64_val_size();
    case TF_BOOL: return proto.bool_val_size();
    default: return -1;
  }
}

}  // namespace

bool DecodeExact(const tensorflow::TensorProto& proto, TensorPtr* out) {
  const int dtype = proto.dtype();
  std::vector<int64_t> dims;
  int64_t n;
  if (!NativeDtype(dtype) || !DeclaredShape(proto, &dims, &n)) return false;
  if (dtype == TF_STRING) {
    // TF reads a string tensor_content first; the Python path decodes that rare form.
    if (!proto.tensor_content().empty() || proto.string_val_size() != n) return false;
    TensorPtr tensor = Tensor::Allocate(TF_STRING, dims);
    TF_TString* strings = reinterpret_cast<TF_TString*>(tensor->data());
    for (int64_t i = 0; i < n; ++i) {
      const std::string& value = proto.string_val(static_cast<int>(i));
      tf().TF_StringAssignView(&strings[i], value.data(), value.size());
    }
    *out = std::move(tensor);
    return true;
  }
  const size_t size = tf().TF_DataTypeSize(static_cast<TF_DataType>(dtype));
  if (!proto.tensor_content().empty()) {
    if (proto.tensor_content().size() != static_cast<size_t>(n) * size) return false;
    TensorPtr tensor = Tensor::Allocate(static_cast<TF_DataType>(dtype), dims);
    std::memcpy(tensor->data(), proto.tensor_content().data(), proto.tensor_content().size());
    *out = std::move(tensor);
    return true;
  }
  // Counted before allocating: a few bytes may declare any shape (both request limits can be off).
  if (TypedValueCount(proto, dtype) != n) return false;
  TensorPtr tensor = Tensor::Allocate(static_cast<TF_DataType>(dtype), dims);
  char* data = tensor->data();
  bool ok = false;
  switch (dtype) {
    case TF_FLOAT:
      ok = CopyNarrowed<float>(proto.float_val().data(), n, data);
      break;
    case TF_DOUBLE:
      ok = CopyNarrowed<double>(proto.double_val().data(), n, data);
      break;
    case TF_INT32:
      ok = CopyNarrowed<int32_t>(proto.int_val().data(), n, data);
      break;
    case TF_INT16:
      ok = CopyNarrowed<int16_t>(proto.int_val().data(), n, data);
      break;
    case TF_INT8:
      ok = CopyNarrowed<int8_t>(proto.int_val().data(), n, data);
      break;
    case TF_UINT8:
      ok = CopyNarrowed<uint8_t>(proto.int_val().data(), n, data);
      break;
    case TF_UINT16:
      ok = CopyNarrowed<uint16_t>(proto.int_val().data(), n, data);
      break;
    case TF_INT64:
      ok = CopyNarrowed<int64_t>(proto.int64_val().data(), n, data);
      break;
    case TF_UINT32:
      ok = CopyNarrowed<uint32_t>(proto.uint32_val().data(), n, data);
      break;
    case TF_UINT64:
      ok = CopyNarrowed<uint64_t>(proto.uint64_val().data(), n, data);
      break;
    case TF_BOOL:
      ok = CopyNarrowed<bool>(proto.bool_val().data(), n, data);
      break;
  }
  if (!ok) return false;
  *out = std::move(tensor);
  return true;
}

void Encode(const TensorSlice& slice, int dtype, bool as_tensor_content, tensorflow::TensorProto* proto) {
  proto->set_dtype(static_cast<tensorflow::DataType>(dtype));
  // Set even for a scalar (no dims), as TF's Tensor::AsProtoField does: clients test HasField.
  tensorflow::TensorShapeProto* shape = proto->mutable_tensor_shape();
  for (int64_t d : slice.dims()) shape->add_dim()->set_size(d);
  const int64_t n = slice.elements();
  const char* data = slice.data();
  if (as_tensor_content) {  // TF Serving's Tensor::AsProtoTensorContent: every dtype and size.
    if (dtype == TF_STRING) {
      EncodeStringList(reinterpret_cast<const TF_TString*>(data), n, proto->mutable_tensor_content());
    } else {
      proto->set_tensor_content(data, n * slice.tensor->element_size());
    }
    return;
  }
  switch (dtype) {
    case TF_FLOAT: AppendAll(reinterpret_cast<const float*>(data), n, proto->mutable_float_val()); break;
    case TF_DOUBLE: AppendAll(reinterpret_cast<const double*>(data), n, proto->mutable_double_val()); break;
    case TF_INT32: AppendAll(reinterpret_cast<const int32_t*>(data), n, proto->mutable_int_val()); break;
    case TF_INT16: AppendWidened(reinterpret_cast<const int16_t*>(data), n, proto->mutable_int_val()); break;
    case TF_INT8: AppendWidened(reinterpret_cast<const int8_t*>(data), n, proto->mutable_int_val()); break;
    case TF_UINT8: AppendWidened(reinterpret_cast<const uint8_t*>(data), n, proto->mutable_int_val()); break;
    case TF_UINT16: AppendWidened(reinterpret_cast<const uint16_t*>(data), n, proto->mutable_int_val()); break;
    case TF_INT64: AppendAll(reinterpret_cast<const int64_t*>(data), n, proto->mutable_int64_val()); break;
    case TF_UINT32: AppendAll(reinterpret_cast<const uint32_t*>(data), n, proto->mutable_uint32_val()); break;
    case TF_UINT64: AppendAll(reinterpret_cast<const uint64_t*>(data), n, proto->mutable_uint64_val()); break;
    case TF_BOOL: AppendAll(reinterpret_cast<const bool*>(data), n, proto->mutable_bool_val()); break;
    case TF_HALF: case TF_BFLOAT16:
      AppendWidened(reinterpret_cast<const uint16_t*>(data), n, proto->mutable_half_val());
      break;
    case TF_COMPLEX64: AppendAll(reinterpret_cast<const float*>(data), 2 * n, proto->mutable_scomplex_val()); break;
    case TF_COMPLEX128: AppendAll(reinterpret_cast<const double*>(data), 2 * n, proto->mutable_dcomplex_val()); break;
    case TF_STRING: {
      const TF_TString* strings = reinterpret_cast<const TF_TString*>(data);
      auto* values = proto->mutable_string_val();
      values->Reserve(static_cast<int>(n));
      for (int64_t i = 0; i < n; ++i) {
        values->Add()->assign(tf().TF_StringGetDataPointer(&strings[i]), tf().TF_StringGetSize(&strings[i]));
      }
      break;
    }
  }
}

TensorPtr Concat(const std::vector<TensorPtr>& parts, int64_t padded_rows, bool pad_inner) {
  const TensorPtr& first = parts.front();
  const TF_DataType dtype = first->dtype();
  std::vector<int64_t> dims = first->dims();
  int64_t rows = 0;
  for (const TensorPtr& part : parts) {
    rows += part->dims()[0];
    if (pad_inner) {
      for (size_t i = 1; i < dims.size(); ++i) dims[i] = std::max(dims[i], part->dims()[i]);
    }
  }
  dims[0] = std::max(rows, padded_rows);
  TensorPtr out = Tensor::Allocate(dtype, dims);
  const size_t size = first->element_size();
  const int64_t row_elements = out->row_elements();
  char* cursor = out->data();
  const std::vector<char> zero(size, 0);
  auto copy_element = [&](char* to, const char* from) {
    if (dtype == TF_STRING) {
      const TF_TString* source = reinterpret_cast<const TF_TString*>(from);
      tf().TF_StringAssignView(reinterpret_cast<TF_TString*>(to), tf().TF_StringGetDataPointer(source),
                               tf().TF_StringGetSize(source));
    } else {
      std::memcpy(to, from, size);
    }
  };
  for (const TensorPtr& part : parts) {
    const int64_t part_rows = part->dims()[0];
    const int64_t part_row_elements = part->row_elements();
    if (part_row_elements == row_elements && dtype != TF_STRING) {  // Same inner shape: one block.
      std::memcpy(cursor, part->data(), part_rows * row_elements * size);
      cursor += part_rows * row_elements * size;
      continue;
    }
    // Row by row, element by element: strings are views, or inner dims padded with the part's
    // first element (TF Serving's pad_variable_length_inputs). A part without elements (an inner
    // dimension of 0) has no first element: it pads with zeros, an all-zero TF_TString being "".
    const std::vector<int64_t>& part_dims = part->dims();
    const char* pad = part_rows * part_row_elements > 0 ? part->data() : zero.data();
    for (int64_t r = 0; r < part_rows; ++r) {
      for (int64_t e = 0; e < row_elements; ++e) {
        // Index of element e of the output row within the part's row, if inside it.
        int64_t remainder = e, source = 0, stride = 1;
        bool inside = true;
        for (size_t i = dims.size() - 1; i >= 1; --i) {
          const int64_t index = remainder % dims[i];
          remainder /= dims[i];
          if (index >= part_dims[i]) inside = false;
          source += index * stride;
          stride *= part_dims[i];
        }
        const char* from = inside ? part->data() + (r * part_row_elements + source) * size : pad;
        copy_element(cursor, from);
        cursor += size;
      }
    }
  }
  // Padding rows repeat the first row (TF Serving pads batches the same way).
  const char* first_row = out->data();
  for (int64_t r = rows; r < dims[0]; ++r) {
    for (int64_t e = 0; e < row_elements; ++e) {
      copy_element(cursor, first_row + e * size);
      cursor += size;
    }
  }
  return out;
}

}  // namespace fgr
