/* fp_secagg.h — secure aggregation (SecAgg+): the coordinator learns only the sum.
 *
 * Bonawitz et al. 2017 with Bell et al. 2020's sparse graph. Per round, n sites indexed
 * 0..n−1 sit on a random k-regular ring (a permutation drawn from the round's seed; site i's
 * neighbours are the k sites nearest it on the ring, or everyone when k ≥ n − 1). Phases:
 *
 *   1. advertise: each site draws a mask key (X25519) and a self-mask seed b, and publishes
 *      the mask key's public half (the daemons sign it with the site certificate's key);
 *   2. share: each site Shamir-shares its mask key and b among its k neighbours and itself
 *      (any t of the k + 1 rebuild them), one share of each per neighbour (the daemons
 *      encrypt them to the recipient and the coordinator relays them); a site that has not
 *      delivered its shares is out of the round;
 *   3. masked input: y_i = enc(x_i) + PRG(b_i) + Σ_{j ∈ N(i) in the round} ±PRG(s_ij) mod 2^32,
 *      s_ij = HMAC-SHA256(X25519(sk_i, pk_j), round ‖ min ‖ max), + for i < j, − for i > j;
 *   4. unmask: for each site whose input arrived the coordinator asks its neighbours for
 *      shares of b; for each site that shared but sent no input, for shares of its mask key,
 *      rebuilds both with t shares and removes the masks: Σ y − Σ PRG(b_u) − the dropped
 *      sites' pairwise masks = Σ enc(x_u) over the survivors u.
 *
 * An honest site never gives both kinds of share for one peer, nor its own key's share
 * (fp_sa_site_reveal refuses); with 2t > k + 1 no two disjoint sets of t holders exist, so
 * the coordinator cannot rebuild both secrets of one site from different holders either.
 * With all pairs (k = n − 1) a round survives n − t sites leaving at any phase. PRG:
 * ChaCha20 (OpenSSL's) keyed by the 32-byte seed. Encoding: fixed point round(x·scale) into Z/2^32, with |x| ≤ bound and
 * n·(bound·scale + 1/2) < 2^31 so that the sum cannot wrap.
 *
 * Library code: no sockets; the caller moves the keys, shares and masked vectors. */
#ifndef FP_SECAGG_H
#define FP_SECAGG_H

#include <stddef.h>
#include <stdint.h>

#include "fp_error.h"
#include "fp_noise.h"
#include "fp_shamir.h"

#define FP_SA_KEY 32
#define FP_SA_SEALED (2 * (8 + 8 * FP_SHAMIR_WORDS) + 16) /* two shares and a tag */

typedef struct fp_sa_params {
    int n;                        /* sites in the round */
    int k;                        /* neighbours per site (even; ≥ n − 1: all pairs) */
    int t;                        /* shares that rebuild a secret; 2t > k + 1, t ≤ k */
    double scale;                 /* fixed point: x ↦ round(x·scale) */
    double bound;                 /* |x| ≤ bound, coordinate by coordinate */
    uint64_t round;
    uint8_t seed[FP_SA_KEY];      /* the round's public seed: the neighbour graph */
} fp_sa_params_t;

/* What the coordinator asks a holder for, per peer. */
enum { FP_SA_ASK_NONE = 0, FP_SA_ASK_SELF = 1, FP_SA_ASK_KEY = 2 };

/* What the coordinator knows of each site at unmasking. */
enum { FP_SA_OUT = 0,      /* never shared: not in the round */
       FP_SA_DROPPED = 1,  /* shared its secrets, sent no masked input */
       FP_SA_INPUT = 2 };  /* its masked input is in the sum */

int fp_sa_params_check(const fp_sa_params_t *p, fp_err_t *err);
/* The neighbours of site i (out: at least min(k, n − 1) slots); their count, or -ENOMEM. */
int fp_sa_neighbours(const fp_sa_params_t *p, int i, int *out);
int fp_sa_is_neighbour(const fp_sa_params_t *p, int i, int j);

/* Fixed point: y[d] = round(x[d]·scale) mod 2^32; -ERANGE if some |x[d]| > bound or x is
 * not finite. */
int fp_sa_encode(const fp_sa_params_t *p, const float *x, size_t dim, uint32_t *y,
                 fp_err_t *err);
/* The sum's values: (int32) sum[d] / scale. */
void fp_sa_decode(const fp_sa_params_t *p, const uint32_t *sum, size_t dim, double *out);

/* A share on the wire: x and the eight field elements, little-endian (FP_SA_SHARE bytes). */
#define FP_SA_SHARE (8 + 8 * FP_SHAMIR_WORDS)
void fp_sa_share_pack(const fp_share_t *sh, uint8_t out[FP_SA_SHARE]);
void fp_sa_share_unpack(const uint8_t in[FP_SA_SHARE], fp_share_t *sh);

/* ---- a site ---- */

typedef struct fp_sa_site fp_sa_site_t;

int fp_sa_site_new(fp_sa_site_t **out, const fp_sa_params_t *p, int i, fp_noise_t *rng,
                   fp_err_t *err);
void fp_sa_site_free(fp_sa_site_t *s);
const uint8_t *fp_sa_site_public(const fp_sa_site_t *s); /* FP_SA_KEY bytes */
/* The public half of the key its neighbours seal shares to (FP_SA_KEY bytes); both public
 * keys are what the site advertises (signed, by the daemons, with its certificate's key). */
const uint8_t *fp_sa_site_public_c(const fp_sa_site_t *s);

/* Phase 2, on the wire: the shares for neighbour `to` sealed so that only `to` opens them
 * (ChaCha20-Poly1305 under HMAC-SHA256(X25519(c_i, c_to), round ‖ i ‖ to)); the coordinator
 * relays FP_SA_SEALED bytes it cannot read or alter unnoticed. */
int fp_sa_seal(const fp_sa_site_t *s, int to, const uint8_t *cpk_to, const fp_share_t *b,
               const fp_share_t *key, uint8_t out[FP_SA_SEALED], fp_err_t *err);
/* Opens what `from` sealed for this site and takes the shares (fp_sa_site_receive);
 * -EBADMSG when they do not authenticate. */
int fp_sa_open(fp_sa_site_t *s, int from, const uint8_t *cpk_from,
               const uint8_t sealed[FP_SA_SEALED], fp_err_t *err);

/* Phase 2: the shares of its mask key and self-mask seed for each neighbour: to[c], b[c],
 * key[c] for c < count (returned; arrays of min(k, n − 1)); the site keeps its own. */
int fp_sa_site_shares(fp_sa_site_t *s, fp_noise_t *rng, int *to, fp_share_t *b,
                      fp_share_t *key, fp_err_t *err);
/* Phase 2, receiving: the shares neighbour `from` made for this site. */
int fp_sa_site_receive(fp_sa_site_t *s, int from, const fp_share_t *b, const fp_share_t *key,
                       fp_err_t *err);
/* Phase 3: y = enc(x) + masks, with pairwise masks for the neighbours j with in_round[j]
 * (they delivered their shares); pks: every site's public mask key (n × FP_SA_KEY). Once per
 * site object (-EALREADY after): two inputs under the same masks would reveal their
 * difference, so each secure sum — the double sketch's two included — has its own keys. */
int fp_sa_site_mask(fp_sa_site_t *s, const uint8_t *pks, const uint8_t *in_round,
                    const float *x, size_t dim, uint32_t *y, fp_err_t *err);
/* Phase 4: for each peer j with ask[j] ≠ NONE, the share it gave this site of b (SELF) or
 * of its mask key (KEY) into out[j], given[j] = 1. Refused whole (-EPERM) if any peer is
 * asked for the other kind than it was before, or (-EINVAL) for a share this site does
 * not hold. */
int fp_sa_site_reveal(fp_sa_site_t *s, const uint8_t *ask, fp_share_t *out, uint8_t *given,
                      fp_err_t *err);

/* ---- the coordinator ---- */

/* Phase 4: sum (Σ of the survivors' masked inputs mod 2^32, dim) becomes Σ enc(x_u).
 * state[n]: FP_SA_*; pks: n × FP_SA_KEY; b_sh / key_sh: n × n shares, [owner·n + holder],
 * present where b_have / key_have is 1. -EAGAIN (the round fails) when some secret has
 * fewer than t shares; -EBADMSG when shares disagree or a rebuilt key does not match its
 * public half. */
int fp_sa_unmask(const fp_sa_params_t *p, const uint8_t *pks, const uint8_t *state,
                 const fp_share_t *b_sh, const uint8_t *b_have, const fp_share_t *key_sh,
                 const uint8_t *key_have, uint32_t *sum, size_t dim, fp_err_t *err);

#endif
