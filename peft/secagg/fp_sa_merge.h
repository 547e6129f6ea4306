/* fp_sa_merge.h — the merge strategies as secure sums: what a site puts into the sum, and
 * how the coordinator turns the sum (all it learns) into the global adapter.
 *
 * The layout (n module descriptors, rank = the global rank R, alpha, rslora) is the
 * federation's; s_g = fp_lora_scale(alpha, R, rslora). A site with weight w (its share of
 * the round's samples, public) and adapter u (module ranks r ≤ R, scale s_u) sends, module
 * by module in the order of the modules' names (a site's layout, read from its task stream,
 * may list them otherwise than the coordinator's):
 *
 *   fedavg   w·A (R × d_in), w·(s_u/s_g)·B (d_out × R); then w      — needs r = R
 *   ffa      w·(s_u/s_g)·B (d_out × R); then w                     — A is the frozen start's
 *   zeropad  w·A and w·(s_u/s_g)·B padded with zeros to R, and per module R coverage
 *            weights (w for rows i < r, else 0): row i's average divides by its own Σw
 *
 * so the sum divided by Σw (per row for zeropad) is fp_merge's result for the sites whose
 * inputs arrived. Exact merges (flexlora, florist) take two sums through the double sketch
 * (fp_sketch.h), module by module, Ω_m drawn from the round's seed and the module's index:
 *
 *   Y: w·s_u·B·(A·Ω_m)/√d_in (d_out × k), the sum's column space is ΔW*'s;
 *   Z: w·Q_mᵀ·s_u·B·A (q × d_in), then w·v of a head, then w; the coordinator's Q_m Z_m / Σw is ΔW* = Σ p·s·B·A
 *      exactly (k ≥ Σ r: the caller chooses k), truncated to rank r_out by the SVD of Z_m.
 *      Sites leaving between the sums keep it exact only while Σ r ≤ min(d_in, d_out).
 *      Each sum is its own secure round (fresh keys).
 *
 * Sizes are in floats; the caller encodes them in fixed point (fp_secagg). */
#ifndef FP_SA_MERGE_H
#define FP_SA_MERGE_H

#include <stddef.h>
#include <stdint.h>

#include "fp_adapter.h"
#include "fp_error.h"
#include "fp_strategy.h"

/* ---- linear strategies (fedavg, ffa, zeropad) ---- */

/* Floats in a site's vector; 0 for a strategy that is not linear. The tensors trained in
 * full whole[0..nw) (a head: in name order, as an adapter keeps them) follow the factors as
 * w·v, their weight w after them (zeropad: a slot of its own; the others share theirs). */
size_t fp_sa_linear_dim(fp_strategy_t st, const fp_module_desc_t *layout, int n,
                        const fp_whole_desc_t *whole, int nw);
int fp_sa_linear_encode(fp_strategy_t st, const fp_module_desc_t *layout, int n,
                        const fp_whole_desc_t *whole, int nw, const fp_adapter_t *u, double w,
                        float *x, fp_err_t *err);
/* The global adapter from the sum of the vectors (double, dim values); ffa takes A from
 * start. -EDOM if the weights sum to nothing (no input, or a row nobody covered). */
int fp_sa_linear_decode(fp_strategy_t st, const fp_module_desc_t *layout, int n,
                        const fp_whole_desc_t *whole, int nw, const fp_adapter_t *start,
                        const double *sum, fp_adapter_t **out, fp_err_t *err);

/* ---- exact merges through the double sketch ---- */

typedef struct fp_sa_sketch fp_sa_sketch_t;

/* Columns beyond Σ of the sites' ranks a sketch takes (exactness needs none; the QR of the
 * first sum is better conditioned with a few). */
#define FP_SA_OVERSAMPLE 8

/* The sketch of a round: k columns (≥ Σ of the sites' ranks; clamped per module to d_out),
 * Ω_m from seed. The tensors trained in full whole[0..nw) (a head) ride in the second sum as
 * w·v after the modules' Z, before w: the global's is their weighted average, as the linear
 * strategies'. layout and whole (their names) must outlive the sketch. */
int fp_sa_sketch_new(fp_sa_sketch_t **out, const fp_module_desc_t *layout, int n,
                     const fp_whole_desc_t *whole, int nw, int k, uint64_t seed, fp_err_t *err);
/* The coordinator's: sizes, bases and decoding, without the Ω only sites multiply by (no
 * encode_y on it). */
int fp_sa_sketch_new_sums(fp_sa_sketch_t **out, const fp_module_desc_t *layout, int n,
                          const fp_whole_desc_t *whole, int nw, int k, fp_err_t *err);
void fp_sa_sketch_free(fp_sa_sketch_t *s);
size_t fp_sa_sketch_dim_y(const fp_sa_sketch_t *s);
size_t fp_sa_sketch_dim_z(const fp_sa_sketch_t *s); /* after fp_sa_sketch_basis */

int fp_sa_sketch_encode_y(const fp_sa_sketch_t *s, const fp_adapter_t *u, double w, float *x,
                          fp_err_t *err);
/* The coordinator, from the first sum: each module's orthonormal basis Q_m (kept; what it
 * broadcasts: fp_sa_sketch_q). */
int fp_sa_sketch_basis(fp_sa_sketch_t *s, const double *ysum, fp_err_t *err);
/* The bases, concatenated (Σ d_out·q_m doubles), for the sites; and a site's copy set. */
const double *fp_sa_sketch_q(const fp_sa_sketch_t *s, size_t *count);
int fp_sa_sketch_set_q(fp_sa_sketch_t *s, const double *q, size_t count, fp_err_t *err);
int fp_sa_sketch_encode_z(const fp_sa_sketch_t *s, const fp_adapter_t *u, double w, float *x,
                          fp_err_t *err);
/* What the second sum becomes: flexlora and flora keep `rank` components of every module
 * (flora: the sum of the sites' ranks, so the product is ΔW* itself), florist the fewest that
 * hold a fraction `energy` of Σσ² (fp_merge's rule; `resolution` is the sum's error per
 * coordinate, n/(2·scale) for n inputs in fixed point: components it could have made count as
 * zero); never more than the sketch holds. */
typedef struct fp_sa_sketch_out {
    fp_strategy_t strategy;
    int rank;
    double energy;
    double resolution;
} fp_sa_sketch_out_t;

/* The global adapter (alpha and rslora of the layout) from the second sum. */
int fp_sa_sketch_decode(const fp_sa_sketch_t *s, const double *zsum,
                        const fp_sa_sketch_out_t *o, fp_adapter_t **out, fp_err_t *err);

#endif
