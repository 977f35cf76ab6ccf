/* fastbn micro-benchmark harness: the alternatives a tuning decision was measured against.
 *
 * Each HARNESS_* macro, set on the compiler command line of one variant object (Makefile),
 * replaces one constant, walk macro or helper of include/fastbn between kernels.h's definitions
 * and the kernel bodies (see shim/fastbn/kernels_impl.h). With no HARNESS_* macro set this
 * file changes nothing: the object is the kernels as fastbn builds them.
 *
 * This file and fbn_calls.h are the harness's only ties to fastbn's C internals: after a
 * rename or restructure of the kernels, update these two (docs/tuning.md says which figure
 * each variant serves).
 *
 *   HARNESS_SHORT_RUN=n      FBN_SHORT_RUN = n (0: never four runs at a time; 1<<30: always)
 *   HARNESS_LANE_EXPR        the lanes' tree (fbn_lane_total) as one expression, not loops
 *   HARNESS_NO_BLOCK_SKIP    fbn_block_total adds the lanes' tree for runs of any length
 *   HARNESS_PREFETCH_BYTES=n fbn_runs_ahead with a prefetch distance of n bytes, not
 *                            FBN_PREFETCH_BYTES
 * (Compiler flags, not macros, make the -fmath-errno and unroll-and-jam variants.) */

#ifdef HARNESS_SHORT_RUN
#  undef FBN_SHORT_RUN
#  define FBN_SHORT_RUN HARNESS_SHORT_RUN
#endif

#ifndef HARNESS_VARIANTS_ONCE   /* functions: once, though kernels_impl.h comes twice */
#define HARNESS_VARIANTS_ONCE

#if defined(HARNESS_LANE_EXPR) || defined(HARNESS_NO_BLOCK_SKIP)
/* the same tree, the same order of additions (same bits), written as one expression */
static inline double harness_lane_total_expr(const double *l)
{
    return (((l[0] + l[8]) + (l[4] + l[12])) + ((l[2] + l[10]) + (l[6] + l[14])))
         + (((l[1] + l[9]) + (l[5] + l[13])) + ((l[3] + l[11]) + (l[7] + l[15])));
}

static inline double harness_block_total(const double *lane, double rest, fbn_index len)
{
#  ifdef HARNESS_LANE_EXPR
#    define HARNESS_TREE harness_lane_total_expr
#  else
#    define HARNESS_TREE fbn_lane_total
#  endif
#  ifdef HARNESS_NO_BLOCK_SKIP
    (void)len;
    return HARNESS_TREE(lane) + rest;
#  else
    return len >= FBN_LANES ? HARNESS_TREE(lane) + rest : rest;
#  endif
#  undef HARNESS_TREE
}
#  define fbn_block_total harness_block_total
#endif

#ifdef HARNESS_PREFETCH_BYTES
/* fbn_runs_ahead (walks.h) with another distance */
static inline fbn_index harness_runs_ahead(fbn_index len, fbn_index stride, fbn_index limit,
                                           fbn_index itemsize)
{
    const fbn_index run_bytes = len * itemsize;
    if ((limit - len) * itemsize < HARNESS_PREFETCH_BYTES)
        return 0;
    if ((double)limit / (double)len * (double)stride * (double)itemsize < fbn_prefetch_span)
        return 0;
    const fbn_index runs = (HARNESS_PREFETCH_BYTES + run_bytes - 1) / run_bytes;
    return runs * len < limit ? runs : 0;
}
#  define fbn_runs_ahead harness_runs_ahead
#endif

#endif /* HARNESS_VARIANTS_ONCE */
