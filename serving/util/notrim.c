/* A malloc_trim(3) that keeps the heap, for fgr-serve with retained memory.
 *
 * fgr-serve preloads this library (LD_PRELOAD) when --retain_freed_memory is
 * on, so that this definition comes before glibc's for every caller. The
 * caller it is for: protobuf's Python runtime (upb) calls malloc_trim(0)
 * after every 10,000 message-arena frees, on the request path with the GIL
 * held. After a version swap that trim hands the unloaded version's freed
 * memory (~300 MB at 1M ads) back to the kernel page by page while holding
 * malloc's only arena, and every request waits (10-60 ms). Keeping that
 * memory for the next version is what --retain_freed_memory is for.
 *
 * There is no library option for this: glibc has no tunable that disables
 * malloc_trim, and upb calls it unconditionally on glibc.
 */
#include <stddef.h>

/* How many calls this library has answered; read by fgr-serve's tests. */
unsigned long fgr_malloc_trim_calls_skipped = 0;

int malloc_trim(size_t pad) {
  (void)pad;
  __atomic_fetch_add(&fgr_malloc_trim_calls_skipped, 1, __ATOMIC_RELAXED);
  return 0; /* "No memory was released", as glibc reports it. */
}
