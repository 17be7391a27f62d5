// A gRPC/TensorFlow status: TF_Code values equal gRPC status codes.
#ifndef FGR_NATIVE_STATUS_H_
#define FGR_NATIVE_STATUS_H_

#include <string>
#include <utility>

namespace fgr {

enum Code : int {
  kOk = 0,
  kCancelled = 1,
  kUnknown = 2,
  kInvalidArgument = 3,
  kDeadlineExceeded = 4,
  kNotFound = 5,
  kFailedPrecondition = 9,
  kResourceExhausted = 8,
  kUnimplemented = 12,
  kInternal = 13,
  kUnavailable = 14,
};

struct Status {
  int code = kOk;
  std::string message;

  Status() = default;
  Status(int c, std::string m) : code(c), message(std::move(m)) {}
  bool ok() const { return code == kOk; }
};

}  // namespace fgr

#endif  // FGR_NATIVE_STATUS_H_
