/* fp_srv_config.h — every setting of fedpeft-server, in one table (fp_settings). */
#ifndef FP_SRV_CONFIG_H
#define FP_SRV_CONFIG_H

#include "fp_settings.h"

typedef struct fp_srv_config {
    /* [server] */
    char *listen;           /* host:port */
    char *cert, *key, *ca, *crl;
    char *state_dir;
    char *metrics;          /* host:port, or empty: off */
    int exit_when_done;     /* exit 0 once the last round closed */
    long long handshake_ms, idle_ms;
    long long max_startups, max_startups_per_address, max_connections, max_sessions_per_site;
    long long ack_every;      /* bytes of an upload between durable Acks */
    /* [federation] */
    char *name;
    char *base_model_config;  /* the base model's directory or its config.json */
    char *base_model;         /* the model as from_pretrained names it ("": its directory) */
    char *base_model_sha256;  /* hex SHA-256 of its weights (model.safetensors) */
    char *target_modules;     /* "q_proj,v_proj" or "all" */
    double alpha;
    int rslora;
    long long r_max;
    char *rank_caps;          /* "site-a:4,site-b:8" */
    char *strategy;
    double florist_energy;
    int zeropad_norm_weighted;
    long long restart_rank_cap; /* flora/florist: rank of the accumulated global update */
    char *server_optimizer;   /* sgd, avgm, adagrad, adam, yogi (fp_server_opt.h) */
    double server_lr, server_beta1, server_beta2, server_tau;
    double prox_mu;           /* [train] FedProx's μ, sent to the sites */
    long long rounds;         /* 0: run forever */
    long long min_sites;
    double fraction;
    long long max_sites;      /* 0: no cap */
    long long min_updates;
    double round_deadline_s;
    long long seed;
    /* [train] — local hyper-parameters sent with every task */
    double lr, weight_decay;
    long long steps, batch, seq_len;
    /* [validation] */
    double norm_bound;        /* 0: off */
    char *norm_action;        /* clip | refuse */
    long long max_samples;
    /* [privacy] — client-level differential privacy (fixed once the federation exists) */
    char *dp_mode;            /* off | central | distributed */
    double dp_clip;           /* C: the L2 bound on a site's update vector (the first one) */
    double dp_noise;          /* z: noise multiplier */
    int dp_adaptive;          /* adaptive clipping */
    double dp_quantile, dp_clip_lr, dp_count_stddev;
    double dp_epsilon_max, dp_delta;
    /* [secure_aggregation] — SecAgg+ (fixed for a round when it opens) */
    int sa_enabled;
    long long sa_degree;      /* neighbours per site; 0: all pairs */
    long long sa_threshold;   /* shares that rebuild a secret; 0: the least safe one */
    double sa_bound;          /* |w·x| ≤ bound per coordinate */
    long long sa_scale_bits;  /* fixed point 2^bits, lowered per round until n sites cannot wrap */
    double sa_phase_s;        /* how long the key and share phases, and unmasking, wait */
} fp_srv_config_t;

extern const fp_setting_t fp_srv_settings[];

/* Loads and checks the configuration (settings plus the cross-checks the table cannot say:
 * strategy name, norm action, TLS files present, ...); warnings (a setting given twice) go to
 * warn. */
int fp_srv_config_load(fp_srv_config_t *c, const char *path, char *const *overrides, int n,
                       void (*warn)(const char *msg), fp_err_t *err);
int fp_srv_config_check(const fp_srv_config_t *c, fp_err_t *err);

/* What --check-config adds to the checks above, which the start would otherwise be the first
 * to find: the TLS files loaded as the daemon loads them (certificate and key belong
 * together, the CA and the CRL parse), and the listening addresses free (each is bound and
 * released at once). */
int fp_srv_config_probe(const fp_srv_config_t *c, fp_err_t *err);
void fp_srv_config_free(fp_srv_config_t *c);

/* The rank cap configured for a site name, or 0 when none. */
int fp_srv_config_rank_cap(const fp_srv_config_t *c, const char *site);


#endif
