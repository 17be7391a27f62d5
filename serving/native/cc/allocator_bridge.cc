// The process's allocator for the libraries this module brings with it.
//
// The module is loaded with RTLD_DEEPBIND (see ../README.md) so that its protobuf and gRPC never bind
// to TensorFlow's copies. The catch: the libraries loaded with it (gRPC, protobuf, Abseil, ...) then
// look up malloc in this module's scope first and would find glibc's, even where the process replaced
// malloc (fgr-serve preloads mimalloc), while memory they free may come from the replacement (strdup,
// libstdc++) and the reverse: a crash at import. These definitions sit first in that scope (this
// module is its root) and forward to the allocator the main program's scope binds, so every part of
// the process uses one allocator. They are exported into this module's scope only (RTLD_LOCAL).
#include <dlfcn.h>

#include <cstddef>
#include <cstdlib>

namespace {

struct Allocator {
  void* (*malloc)(size_t);
  void (*free)(void*);
  void* (*calloc)(size_t, size_t);
  void* (*realloc)(void*, size_t);
  int (*posix_memalign)(void**, size_t, size_t);
  void* (*aligned_alloc)(size_t, size_t);
  void* (*memalign)(size_t, size_t);
  void* (*valloc)(size_t);
  size_t (*malloc_usable_size)(void*);
};

template <typename T>
void Resolve(void* process, const char* name, T* function) {
  *function = reinterpret_cast<T>(dlsym(process, name));
  if (*function == nullptr) std::abort();  // Every allocator a process can run with defines these.
}

const Allocator& Process() {
  // The dynamic linker and libc are bound to the process's scope, so nothing here reaches the
  // definitions below while this runs. Thread-safe: a function-local static.
  static const Allocator allocator = [] {
    Allocator a;
    void* process = dlopen(nullptr, RTLD_NOW);  // The main program's scope: preloads first.
    Resolve(process, "malloc", &a.malloc);
    Resolve(process, "free", &a.free);
    Resolve(process, "calloc", &a.calloc);
    Resolve(process, "realloc", &a.realloc);
    Resolve(process, "posix_memalign", &a.posix_memalign);
    Resolve(process, "aligned_alloc", &a.aligned_alloc);
    Resolve(process, "memalign", &a.memalign);
    Resolve(process, "valloc", &a.valloc);
    Resolve(process, "malloc_usable_size", &a.malloc_usable_size);
    return a;
  }();
  return allocator;
}

}  // namespace

#define FGR_EXPORT __attribute__((visibility("default")))

extern "C" {
FGR_EXPORT void* malloc(size_t size) { return Process().malloc(size); }
FGR_EXPORT void free(void* pointer) { Process().free(pointer); }
FGR_EXPORT void* calloc(size_t count, size_t size) { return Process().calloc(count, size); }
FGR_EXPORT void* realloc(void* pointer, size_t size) { return Process().realloc(pointer, size); }
FGR_EXPORT int posix_memalign(void** out, size_t alignment, size_t size) {
  return Process().posix_memalign(out, alignment, size);
}
FGR_EXPORT void* aligned_alloc(size_t alignment, size_t size) { return Process().aligned_alloc(alignment, size); }
FGR_EXPORT void* memalign(size_t alignment, size_t size) { return Process().memalign(alignment, size); }
FGR_EXPORT void* valloc(size_t size) { return Process().valloc(size); }
FGR_EXPORT size_t malloc_usable_size(void* pointer) { return Process().malloc_usable_size(pointer); }
}
