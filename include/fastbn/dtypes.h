/* fastbn — storage types: how a value is loaded from an array into the compute type and
 * stored back. The kernels (kernels_impl.h) load and store through these and nowhere else.
 *
 * The list of storage types is fastbn/_dtypes.py: each row names its suffix (f32, ...), its
 * storage C type and its compute suffix; the build instantiates kernels_impl.h once per row
 * (see kernels.h). A row's load and store are fbn_load_<suffix> and fbn_store_<suffix>.
 * Compute types are float (f32) and double (f64); statistics accumulate in double always. */
#ifndef FASTBN_DTYPES_H
#define FASTBN_DTYPES_H

/* A row's FBN_STORAGE_IS_COMPUTE_<suffix> is 1 when values are stored as they are computed
 * (no conversion: the streaming stores' vector path applies) */

/* float32 storage, float32 compute */
#define FBN_STORAGE_IS_COMPUTE_f32 1
static inline float fbn_load_f32(float v) { return v; }
static inline float fbn_store_f32(float v) { return v; }

/* float64 storage, float64 compute */
#define FBN_STORAGE_IS_COMPUTE_f64 1
static inline double fbn_load_f64(double v) { return v; }
static inline double fbn_store_f64(double v) { return v; }

#endif /* FASTBN_DTYPES_H */
