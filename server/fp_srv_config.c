#include "fp_srv_config.h"
#include "fp_vit.h"

#include <errno.h>
#include <math.h>
#include <netdb.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "fp_conn.h"
#include "fp_dp.h"
#include "fp_fs.h"
#include "fp_merge.h"
#include "fp_model.h"
#include "fp_server_opt.h"
#include "fp_sha256.h"
#include "fp_tls.h"

#define O(f) offsetof(fp_srv_config_t, f)
#define BIG 1e18

const fp_setting_t fp_srv_settings[] = {
    {"server", "listen", FP_SET_STR, O(listen), "127.0.0.1:7443", 0, 0, 0,
     "address and port for sites (host:port; port 0 picks a free one)"},
    {"server", "cert", FP_SET_STR, O(cert), "", 0, 0, 0,
     "coordinator certificate (PEM), from `fedpeft ca issue --server`"},
    {"server", "key", FP_SET_STR, O(key), "", 0, 0, 0, "its private key (PEM)"},
    {"server", "ca", FP_SET_STR, O(ca), "", 0, 0, 0, "the federation CA certificate"},
    {"server", "crl", FP_SET_STR, O(crl), "", 0, 0, 0,
     "the federation CRL (mandatory; SIGHUP re-reads it)"},
    {"server", "state_dir", FP_SET_STR, O(state_dir), "/var/lib/fedpeft-server", 0, 0, 0,
     "database, adapters and spool (one file system)"},
    {"server", "metrics", FP_SET_STR, O(metrics), "127.0.0.1:9464", 0, 0, 0,
     "Prometheus endpoint host:port (GET /metrics); empty: off"},
    {"server", "exit_when_done", FP_SET_BOOL, O(exit_when_done), "false", 0, 0, 1,
     "exit once the last of `rounds` has closed (simulations, tests)"},
    {"server", "handshake_ms", FP_SET_INT, O(handshake_ms), "10000", 100, 600000, 0,
     "TLS handshake time limit"},
    {"server", "idle_ms", FP_SET_INT, O(idle_ms), "120000", 100, 86400000, 0,
     "a session that sends nothing this long is closed (sites send heartbeats)"},
    {"server", "max_startups", FP_SET_INT, O(max_startups), "64", 0, 1000000, 0,
     "connections still in their TLS handshake, at most: more are closed as soon as they are "
     "accepted (as sshd's MaxStartups; 0: no limit)"},
    {"server", "max_startups_per_address", FP_SET_INT, O(max_startups_per_address), "8", 0,
     1000000, 0, "... from one address: a flood from one host takes this many places, not all "
     "(0: no limit)"},
    {"server", "max_connections", FP_SET_INT, O(max_connections), "0", 0, 100000000, 0,
     "connections of any kind, at most (0: the descriptor limit less 64 for files)"},
    {"server", "max_sessions_per_site", FP_SET_INT, O(max_sessions_per_site), "4", 0, 1000000, 0,
     "sessions of one site certificate at once: a new one past this closes that site's oldest "
     "(0: no limit)"},
    {"server", "ack_every", FP_SET_INT, O(ack_every), "16777216", 4096, 1073741824, 0,
     "bytes of an upload made durable and acknowledged at a time (a resumed upload restarts "
     "from the last one)"},

    {"federation", "name", FP_SET_STR, O(name), "fedpeft", 0, 0, 0, "federation name"},
    {"federation", "base_model_config", FP_SET_STR, O(base_model_config), "", 0, 0, 0,
     "the base model's directory, or its config.json (module shapes)"},
    {"federation", "base_model", FP_SET_STR, O(base_model), "", 0, 0, 0,
     "the base model as its users pass it to Hugging Face's from_pretrained (a directory or a "
     "hub id): exported adapters name it as base_model_name_or_path (empty: the directory of "
     "base_model_config)"},
    {"federation", "base_model_sha256", FP_SET_STR, O(base_model_sha256), "", 0, 0, 0,
     "SHA-256 (hex) of the base weights every site must hold; sites with other weights are "
     "refused at Hello"},
    {"federation", "target_modules", FP_SET_STR, O(target_modules), "q_proj,v_proj", 0, 0, 0,
     "adapted projections (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj or all)"},
    {"federation", "alpha", FP_SET_DOUBLE, O(alpha), "16", 1e-6, 1e6, 0, "lora_alpha"},
    {"federation", "rslora", FP_SET_BOOL, O(rslora), "false", 0, 0, 0,
     "scale alpha/sqrt(r) instead of alpha/r"},
    {"federation", "r_max", FP_SET_INT, O(r_max), "16", 1, 4096, 0,
     "rank of the global adapter; sites train min(r_max, budget, cap)"},
    {"federation", "rank_caps", FP_SET_STR, O(rank_caps), "", 0, 0, 1,
     "per-site rank caps, e.g. site-a:4,site-b:8"},
    {"federation", "strategy", FP_SET_STR, O(strategy), "flexlora", 0, 0, 0,
     "fedavg, ffa, zeropad, flexlora (continue) or flora, florist (restart)"},
    {"federation", "florist_energy", FP_SET_DOUBLE, O(florist_energy), "0.99", 1e-6, 1, 1,
     "florist: fraction of the spectrum's energy kept"},
    {"federation", "zeropad_norm_weighted", FP_SET_BOOL, O(zeropad_norm_weighted), "false", 0, 0,
     1, "zeropad: also weight sites by the norm of their update"},
    {"federation", "restart_rank_cap", FP_SET_INT, O(restart_rank_cap), "64", 1, 65536, 1,
     "flora/florist: the accumulated global update is re-compressed (exact SVD) above this rank"},
    {"federation", "server_optimizer", FP_SET_STR, O(server_optimizer), "sgd", 0, 0, 0,
     "how the coordinator moves the global adapter by a round's merged update Δ: sgd (x + lr·Δ; "
     "lr 1 is the merge itself), avgm (momentum), adagrad, adam or yogi (Reddi et al. 2021; "
     "linear strategies only: the exact ones merge ΔW, whose momentum is kept low-rank)"},
    {"federation", "server_lr", FP_SET_DOUBLE, O(server_lr), "1", 1e-6, 100, 0,
     "the server optimizer's learning rate; adagrad, adam and yogi move every factor by about "
     "±lr in their first rounds (no bias correction), so they want 0.001–0.1"},
    {"federation", "server_beta1", FP_SET_DOUBLE, O(server_beta1), "0.9", 0, 0.999999, 0,
     "avgm's momentum; adagrad, adam and yogi's first-moment decay"},
    {"federation", "server_beta2", FP_SET_DOUBLE, O(server_beta2), "0.99", 0, 0.999999, 0,
     "adam and yogi's second-moment decay"},
    {"federation", "server_tau", FP_SET_DOUBLE, O(server_tau), "0.001", 1e-12, 10, 0,
     "adagrad, adam and yogi's adaptivity (the denominator's floor)"},
    {"federation", "rounds", FP_SET_INT, O(rounds), "0", 0, BIG, 1, "rounds to run; 0: forever"},
    {"federation", "min_sites", FP_SET_INT, O(min_sites), "2", 1, 1000000, 1,
     "connected sites needed to open a round"},
    {"federation", "fraction", FP_SET_DOUBLE, O(fraction), "1", 1e-9, 1, 1,
     "fraction of connected sites sampled into a round (at least min_updates)"},
    {"federation", "max_sites", FP_SET_INT, O(max_sites), "0", 0, 1000000, 1,
     "most sites in a round; 0: no cap"},
    {"federation", "min_updates", FP_SET_INT, O(min_updates), "1", 1, 1000000, 1,
     "updates needed to aggregate when the deadline passes"},
    {"federation", "round_deadline_s", FP_SET_DOUBLE, O(round_deadline_s), "600", 0.1, 1e7, 1,
     "seconds a round waits for updates"},
    {"federation", "seed", FP_SET_INT, O(seed), "1", 0, BIG, 0,
     "seeds site sampling, the initial adapter and task seeds"},

    {"train", "lr", FP_SET_DOUBLE, O(lr), "0.001", 0, 10, 1, "local learning rate"},
    {"train", "weight_decay", FP_SET_DOUBLE, O(weight_decay), "0", 0, 10, 1, "AdamW decay"},
    {"train", "prox_mu", FP_SET_DOUBLE, O(prox_mu), "0", 0, 1000, 1,
     "FedProx (Li et al. 2020): sites train with μ/2·‖θ − θ₀‖² added, θ₀ the factors they "
     "started the round from, which holds a site near the global on data unlike the others' "
     "(0: off)"},
    {"train", "steps", FP_SET_INT, O(steps), "50", 1, 10000000, 1, "local steps per round"},
    {"train", "batch", FP_SET_INT, O(batch), "8", 1, 65536, 1, "sequences per step"},
    {"train", "seq_len", FP_SET_INT, O(seq_len), "128", 1, 1048576, 1, "tokens per sequence"},

    {"validation", "norm_bound", FP_SET_DOUBLE, O(norm_bound), "0", 0, 1e12, 1,
     "bound on the Frobenius norm of a site's contribution to a round (0: none)"},
    {"validation", "norm_action", FP_SET_STR, O(norm_action), "refuse", 0, 0, 1,
     "over the bound: clip (scale the contribution down) or refuse"},
    {"validation", "max_samples", FP_SET_INT, O(max_samples), "1000000000", 1, BIG, 1,
     "largest sample count an update may claim"},

    {"privacy", "mode", FP_SET_STR, O(dp_mode), "off", 0, 0, 0,
     "client-level differential privacy: off, central (this coordinator clips and adds the "
     "noise) or distributed (each site clips and adds its share); fixed once the federation "
     "exists. Under DP sites are sampled independently with probability federation.fraction, "
     "with weight 1 each"},
    {"privacy", "clip", FP_SET_DOUBLE, O(dp_clip), "1", 1e-12, 1e12, 0,
     "C: the L2 bound on a site's update vector (the factors' change, in the global adapter's "
     "coordinates); with adaptive_clip, the first round's"},
    {"privacy", "noise_multiplier", FP_SET_DOUBLE, O(dp_noise), "1", 1e-3, 1e6, 0,
     "z: the noise on a round's sum has standard deviation z·C (`fedpeft privacy --epsilon E` "
     "finds the z a budget needs)"},
    {"privacy", "adaptive_clip", FP_SET_BOOL, O(dp_adaptive), "false", 0, 0, 0,
     "adapt C each round toward a quantile of the sites' update norms (Andrew et al. 2021); "
     "its privacy cost is part of z"},
    {"privacy", "target_quantile", FP_SET_DOUBLE, O(dp_quantile), "0.5", 0.01, 0.99, 0,
     "adaptive_clip: the fraction of updates C should bound"},
    {"privacy", "clip_learning_rate", FP_SET_DOUBLE, O(dp_clip_lr), "0.2", 1e-6, 10, 0,
     "adaptive_clip: C ← C·exp(−rate·(fraction below C − target_quantile))"},
    {"privacy", "clip_count_stddev", FP_SET_DOUBLE, O(dp_count_stddev), "1", 1e-6, 1e9, 0,
     "adaptive_clip: noise on the count of updates below C (must exceed 1/(2z))"},
    {"privacy", "epsilon_max", FP_SET_DOUBLE, O(dp_epsilon_max), "8", 1e-6, 1e6, 0,
     "the budget: no round opens whose draw would take the federation's ε past it"},
    {"privacy", "delta", FP_SET_DOUBLE, O(dp_delta), "1e-5", 1e-15, 0.1, 0,
     "δ of the (ε, δ) guarantee (well below 1 / the number of sites)"},

    {"secure_aggregation", "enabled", FP_SET_BOOL, O(sa_enabled), "false", 0, 0, 0,
     "SecAgg+: this coordinator learns only the sum of the sites' updates (fedavg, ffa, "
     "zeropad; with privacy.mode = distributed, the noised sum); sites need the capability "
     "'secagg'"},
    {"secure_aggregation", "degree", FP_SET_INT, O(sa_degree), "0", 0, 4096, 0,
     "neighbours each site masks with (even; 0: all pairs, which survives n − t dropouts)"},
    {"secure_aggregation", "threshold", FP_SET_INT, O(sa_threshold), "0", 0, 64, 0,
     "shares that rebuild a site's secrets (more than half of its neighbours and itself; 0: "
     "the least such)"},
    {"secure_aggregation", "bound", FP_SET_DOUBLE, O(sa_bound), "8", 1e-6, 1e6, 0,
     "the largest |coordinate| of a site's weighted update the sum can carry"},
    {"secure_aggregation", "scale_bits", FP_SET_INT, O(sa_scale_bits), "24", 1, 30, 0,
     "fixed point 2^bits (lowered for a round until its sum cannot wrap 2^31)"},
    {"secure_aggregation", "phase_timeout_s", FP_SET_DOUBLE, O(sa_phase_s), "30", 0.1, 86400, 0,
     "how long the key exchange, the share exchange and the unmasking wait for sites"},
    FP_SET_END,
};

void fp_srv_config_free(fp_srv_config_t *c)
{
    fp_settings_free(fp_srv_settings, c);
}

/* Parses "name:rank,name:rank"; with want set, the cap of that site (0 if none). */
static int parse_caps(const char *s, const char *want, int *cap, fp_err_t *err)
{
    *cap = 0;
    if (!s)
        return 0;
    const char *p = s;
    while (*p) {
        const char *comma = strchr(p, ',');
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        const char *colon = memchr(p, ':', len);
        char *end;
        long r = colon ? strtol(colon + 1, &end, 10) : 0;
        if (!colon || colon == p || end != p + len || r < 1 || r > 65536)
            return fp_err_set(err, -EINVAL, "federation.rank_caps: '%.*s' is not site:rank",
                              (int)len, p);
        if (want && strlen(want) == (size_t)(colon - p) && !strncmp(want, p, (size_t)(colon - p)))
            *cap = (int)r;
        p += len + (comma ? 1 : 0);
    }
    return 0;
}

int fp_srv_config_rank_cap(const fp_srv_config_t *c, const char *site)
{
    int cap = 0;
    parse_caps(c->rank_caps, site, &cap, NULL);
    return cap;
}

/* [privacy]: a mode the strategy supports, settings that can work together. */
static int check_privacy(const fp_srv_config_t *c, fp_strategy_t st, fp_err_t *err)
{
    fp_dp_mode_t m;
    int rc = fp_dp_mode_parse(c->dp_mode ? c->dp_mode : "", &m, err);
    if (rc || m == FP_DP_OFF)
        return rc;
    if ((rc = fp_dp_check(st, m, c->zeropad_norm_weighted, err)) != 0)
        return fp_err_prefix(err, rc, "privacy.mode = %s with federation.strategy = %s: ",
                             c->dp_mode, c->strategy);
    if (c->max_sites)
        return fp_err_set(err, -EINVAL, "privacy: sites are sampled independently (Poisson, "
                          "the accountant's assumption), which no federation.max_sites can cap: "
                          "set it to 0");
    if (c->dp_adaptive && isnan(fp_dp_update_multiplier(c->dp_noise, c->dp_count_stddev)))
        return fp_err_set(err, -EINVAL, "privacy.clip_count_stddev (%g) must exceed "
                          "1/(2·noise_multiplier) = %g: the count's noise is paid for out of "
                          "z", c->dp_count_stddev, 1 / (2 * c->dp_noise));
    return 0;
}

int fp_srv_config_check(const fp_srv_config_t *c, fp_err_t *err)
{
    char host[256];
    int port, rc, cap;
    fp_strategy_t st;
    unsigned mask;
    if ((rc = fp_split_hostport(c->listen, host, sizeof host, &port, err)) != 0)
        return fp_err_prefix(err, rc, "server.listen: ");
    if (c->metrics && (rc = fp_split_hostport(c->metrics, host, sizeof host, &port, err)) != 0)
        return fp_err_prefix(err, rc, "server.metrics: ");
    const char *files[][2] = {{"cert", c->cert}, {"key", c->key}, {"ca", c->ca}, {"crl", c->crl},
                              {"base_model_config", c->base_model_config}};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        const char *sec = i < 4 ? "server" : "federation";
        if (!files[i][1])
            return fp_err_set(err, -EINVAL, "%s.%s is required", sec, files[i][0]);
        if (!fp_fs_exists(files[i][1]))
            return fp_err_set(err, -ENOENT, "%s.%s: %s does not exist", sec, files[i][0],
                              files[i][1]);
    }
    if (!c->state_dir)
        return fp_err_set(err, -EINVAL, "server.state_dir is required");
    if ((rc = fp_fs_dir_usable(c->state_dir, err)) != 0)
        return fp_err_prefix(err, rc, "server.state_dir: ");
    if (!c->base_model_sha256 || strlen(c->base_model_sha256) != 64)
        return fp_err_set(err, -EINVAL, "federation.base_model_sha256 must be 64 hex digits "
                          "(sha256sum of the base model's weights)");
    uint8_t sha[32];
    if (fp_sha256_parse(c->base_model_sha256, sha) != 0)
        return fp_err_set(err, -EINVAL, "federation.base_model_sha256: not hexadecimal");
    if ((rc = fp_strategy_parse(c->strategy ? c->strategy : "", &st, err)) != 0)
        return fp_err_prefix(err, rc, "federation.strategy: ");
    int vit = fp_config_is_vit(c->base_model_config ? c->base_model_config : "", err);
    if (vit < 0)
        return fp_err_prefix(err, vit, "federation.base_model_config: ");
    if ((rc = vit ? fp_vit_targets_parse(c->target_modules, &mask, err)
                  : fp_targets_parse(c->target_modules ? c->target_modules : "", &mask, err)) != 0)
        return fp_err_prefix(err, rc, "federation.target_modules: ");
    if ((rc = parse_caps(c->rank_caps, NULL, &cap, err)) != 0)
        return rc;
    if (!c->norm_action || (strcmp(c->norm_action, "clip") && strcmp(c->norm_action, "refuse")))
        return fp_err_set(err, -EINVAL, "validation.norm_action must be clip or refuse");
    if (c->min_updates > c->min_sites)
        return fp_err_set(err, -EINVAL, "federation.min_updates (%lld) cannot exceed "
                          "federation.min_sites (%lld)", c->min_updates, c->min_sites);
    if (c->max_sites && c->max_sites < c->min_updates)
        return fp_err_set(err, -EINVAL, "federation.max_sites (%lld) is below min_updates "
                          "(%lld): no round could close", c->max_sites, c->min_updates);
    if (c->restart_rank_cap < c->r_max)
        return fp_err_set(err, -EINVAL, "federation.restart_rank_cap must be at least r_max");
    fp_sopt_kind_t so;
    if ((rc = fp_sopt_parse(c->server_optimizer, &so, err)) != 0)
        return fp_err_prefix(err, rc, "federation.server_optimizer: ");
    if (fp_sopt_has_v(so) && fp_strategy_merges_products(st))
        return fp_err_set(err, -ENOTSUP, "federation.server_optimizer = %s with %s: an exact "
                          "strategy merges ΔW, whose element-wise second moment has no low-rank "
                          "form; use sgd or avgm (momentum kept low-rank), or a linear strategy",
                          c->server_optimizer, c->strategy);
    if ((rc = check_privacy(c, st, err)) != 0)
        return rc;
    if (c->sa_enabled) {
        if (c->dp_mode && !strcmp(c->dp_mode, "central"))
            return fp_err_set(err, -ENOTSUP, "secure_aggregation with privacy.mode = central: "
                              "central DP clips each update, which this coordinator never "
                              "sees; use privacy.mode = distributed (each site clips and adds "
                              "its share of the noise, then masks)");
        if (c->dp_mode && !strcmp(c->dp_mode, "distributed") && c->dp_adaptive)
            return fp_err_set(err, -ENOTSUP, "secure_aggregation with privacy.adaptive_clip: "
                              "the clip indicators are not in the secure sum yet");
        if (c->norm_bound > 0)
            return fp_err_set(err, -EINVAL, "secure_aggregation: validation.norm_bound needs "
                              "each site's update, which this coordinator never sees: set it "
                              "to 0");
        if (c->min_sites < 3 || c->min_updates < 2)
            return fp_err_set(err, -EINVAL, "secure_aggregation needs min_sites of at least 3 "
                              "(with two, either could unmask the other) and min_updates of at "
                              "least 2 (a sum of one is that site's update)");
        if (c->sa_degree % 2)
            return fp_err_set(err, -EINVAL, "secure_aggregation.degree must be even (or 0)");
    }
    fp_model_config_t mc;
    fp_vit_config_t vc = {0};
    if ((rc = vit ? fp_vit_config_load(c->base_model_config, &vc, err)
                  : fp_model_config_load(c->base_model_config, &mc, err)) != 0)
        return fp_err_prefix(err, rc, "federation.base_model_config: ");
    fp_vit_config_free(&vc);
    return 0;
}

/* Binds host:port and lets it go again. */
static int try_bind(const char *what, const char *hostport, fp_err_t *err)
{
    char host[256], ps[16];
    int port = 0, rc = fp_split_hostport(hostport, host, sizeof host, &port, err);
    if (rc || port == 0)
        return rc;
    snprintf(ps, sizeof ps, "%d", port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV}, *ai = NULL;
    int g = getaddrinfo(host[0] ? host : NULL, ps, &hints, &ai);
    if (g != 0)
        return fp_err_set(err, -EINVAL, "%s: %s: %s", what, hostport, gai_strerror(g));
    int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
    if (fd < 0) {
        rc = fp_err_set(err, -errno, "%s: %s: %s", what, hostport, strerror(errno));
    } else {
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) != 0)
            rc = fp_err_set(err, -errno, "%s: cannot listen on %s: %s", what, hostport,
                            strerror(errno));
        close(fd);
    }
    freeaddrinfo(ai);
    return rc;
}

int fp_srv_config_probe(const fp_srv_config_t *c, fp_err_t *err)
{
    fp_tls_cfg_t tc = {1, c->cert, c->key, c->ca, c->crl, NULL};
    fp_tls_ctx_t *tls = NULL;
    int rc = fp_tls_ctx_new(&tls, &tc, err);
    fp_tls_ctx_free(tls);
    if (rc)
        return rc;
    if ((rc = try_bind("server.listen", c->listen, err)) != 0)
        return rc;
    return c->metrics ? try_bind("server.metrics", c->metrics, err) : 0;
}

int fp_srv_config_load(fp_srv_config_t *c, const char *path, char *const *overrides, int n,
                       void (*warn)(const char *msg), fp_err_t *err)
{
    memset(c, 0, sizeof *c);
    int rc = fp_settings_load(fp_srv_settings, c, path, overrides, n, warn, err);
    return rc ? rc : fp_srv_config_check(c, err);
}
