#include "tf_api.h"

#include <dlfcn.h>

#include <mutex>
#include <stdexcept>

namespace fgr {
namespace {

TfApi api;
bool ready = false;
std::mutex init_mutex;

void* Open(const std::string& path) {
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
  if (handle == nullptr) {
    const char* error = dlerror();
    throw std::runtime_error("TensorFlow library " + path + " is not loaded in this process (import tensorflow first): " +
                             (error ? error : "unknown error"));
  }
  return handle;
}

}  // namespace

void InitTf(const std::string& library_dir) {
  std::lock_guard<std::mutex> lock(init_mutex);
  if (ready) return;
  void* libraries[] = {Open(library_dir + "/libtensorflow_cc.so.2"), Open(library_dir + "/libtensorflow_framework.so.2")};
  auto resolve = [&](const char* name) -> void* {
    for (void* library : libraries) {
      if (void* symbol = dlsym(library, name)) return symbol;
    }
    throw std::runtime_error(std::string("TensorFlow's C API lacks ") + name);
  };
#define FGR_RESOLVE(name) api.name = reinterpret_cast<decltype(api.name)>(resolve(#name));
  FGR_TF_FUNCTIONS(FGR_RESOLVE)
#undef FGR_RESOLVE
  ready = true;
}

const TfApi& tf() { return api; }
bool TfReady() { return ready; }

}  // namespace fgr
