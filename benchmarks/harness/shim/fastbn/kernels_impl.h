/* fastbn micro-benchmark harness: kernels.h includes "fastbn/kernels_impl.h" once per data
 * type, after its constants and walk macros and before the kernel bodies. The harness puts
 * this directory first on the include path, so this file comes in between: it applies the
 * variant overrides (variants.h; none unless a HARNESS_* macro is set), then includes the
 * real kernel bodies from include/fastbn. No include guard, as the real file. */
#include "variants.h"
#include_next "fastbn/kernels_impl.h"
