/* One variant of fastbn's kernels for the harness: the Makefile compiles this file once per
 * variant, with FBN_CALLS_NAME (the table's name), the variant's HARNESS_* macros
 * (variants.h) and compiler flags. */
#define FBN_CALLS_IMPL
#include "fbn_calls.h"
