// TensorFlow's C API, resolved at run time from the libraries `import tensorflow` loaded.
//
// Nothing here links against TensorFlow: its libraries export their own protobuf and
// `tensorflow::` proto classes, which must never meet this module's (see ../README.md). The
// headers give the types; dlsym gives the functions.
#ifndef FGR_NATIVE_TF_API_H_
#define FGR_NATIVE_TF_API_H_

#include <string>

#include "tensorflow/c/c_api.h"
#include "tensorflow/c/tf_tstring.h"

namespace fgr {

struct TfApi {
#define FGR_TF_FUNCTIONS(X)                                                                        \
  X(TF_NewStatus) X(TF_DeleteStatus) X(TF_GetCode) X(TF_Message) X(TF_NewBufferFromString)         \
  X(TF_NewBuffer) X(TF_DeleteBuffer) X(TF_AllocateTensor) X(TF_DeleteTensor) X(TF_TensorData)      \
  X(TF_TensorByteSize) X(TF_NumDims) X(TF_Dim) X(TF_TensorType) X(TF_TensorElementCount)           \
  X(TF_DataTypeSize) X(TF_NewSessionOptions) X(TF_DeleteSessionOptions) X(TF_SetConfig)            \
  X(TF_NewGraph) X(TF_DeleteGraph) X(TF_GraphOperationByName) X(TF_OperationNumOutputs)            \
  X(TF_LoadSessionFromSavedModel) X(TF_CloseSession) X(TF_DeleteSession) X(TF_SessionRun)          \
  X(TF_StringInit) X(TF_StringCopy) X(TF_StringAssignView) X(TF_StringGetDataPointer)              \
  X(TF_StringGetSize) X(TF_StringDealloc)
#define FGR_DECLARE(name) decltype(&::name) name = nullptr;
  FGR_TF_FUNCTIONS(FGR_DECLARE)
#undef FGR_DECLARE
};

// Resolves the C API from `library_dir`/libtensorflow_{cc,framework}.so.2, which must already be
// loaded (RTLD_NOLOAD: this never loads a second TensorFlow). Throws std::runtime_error.
void InitTf(const std::string& library_dir);

// The resolved API; InitTf must have succeeded.
const TfApi& tf();
bool TfReady();

}  // namespace fgr

#endif  // FGR_NATIVE_TF_API_H_
