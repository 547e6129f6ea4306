#include "fp_metrics.h"

#include <arpa/inet.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fp_conn.h"
#include "fp_msg.h"
#include "fp_srv_config.h"

struct fp_metrics {
    struct MHD_Daemon *d;
    fp_coord_t *co;
};

static long rss_bytes(void)
{
    long pages = 0, rss = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (f) {
        if (fscanf(f, "%ld %ld", &pages, &rss) != 2)
            rss = 0;
        fclose(f);
    }
    return rss * sysconf(_SC_PAGESIZE);
}

static size_t render(fp_coord_t *co, char *b, size_t n)
{
    fp_coord_stats_t s;
    fp_coord_stats(co, &s);
    size_t u = 0;
#define P(...) u += (size_t)snprintf(b + u, u < n ? n - u : 0, __VA_ARGS__)
    P("# HELP fedpeft_round The open round, or the last one.\n# TYPE fedpeft_round gauge\n"
      "fedpeft_round %lld\n", (long long)s.round);
    P("# HELP fedpeft_rounds_total Rounds ended, by outcome.\n# TYPE fedpeft_rounds_total counter\n"
      "fedpeft_rounds_total{outcome=\"closed\"} %llu\nfedpeft_rounds_total{outcome=\"expired\"} %llu\n",
      (unsigned long long)s.rounds_closed, (unsigned long long)s.rounds_expired);
    P("# HELP fedpeft_sites_connected Sites with a welcomed session.\n# TYPE fedpeft_sites_connected "
      "gauge\nfedpeft_sites_connected %llu\n", (unsigned long long)s.sites_connected);
    P("# HELP fedpeft_updates_accepted_total Updates stored.\n# TYPE fedpeft_updates_accepted_total "
      "counter\nfedpeft_updates_accepted_total %llu\n", (unsigned long long)s.updates_accepted);
    P("# HELP fedpeft_refused_total Hellos and updates refused, by reason.\n"
      "# TYPE fedpeft_refused_total counter\n");
    for (int i = 1; i < 16; i++) {
        const ProtobufCEnumValue *v = protobuf_c_enum_descriptor_get_value(
            &fedpeft__error__code__descriptor, i);
        if (v)
            P("fedpeft_refused_total{reason=\"%s\"} %llu\n", v->name,
              (unsigned long long)s.refused[i]);
    }
    P("# HELP fedpeft_bytes_total Bytes on the wire.\n# TYPE fedpeft_bytes_total counter\n"
      "fedpeft_bytes_total{direction=\"in\"} %llu\nfedpeft_bytes_total{direction=\"out\"} %llu\n",
      (unsigned long long)s.bytes_in, (unsigned long long)s.bytes_out);
    P("# HELP fedpeft_handshakes_refused_total TLS handshakes refused (certificates, revoked, "
      "old TLS).\n# TYPE fedpeft_handshakes_refused_total counter\n"
      "fedpeft_handshakes_refused_total %llu\n", (unsigned long long)s.handshakes_refused);
    P("# HELP fedpeft_connections_limited_total Connections closed at once by the connection "
      "limits (max_startups, per address, max_connections) and sessions replaced past "
      "max_sessions_per_site.\n# TYPE fedpeft_connections_limited_total counter\n"
      "fedpeft_connections_limited_total %llu\n", (unsigned long long)s.connections_limited);
    P("# HELP fedpeft_connections Connections open now, and those still in their TLS "
      "handshake.\n# TYPE fedpeft_connections gauge\n"
      "fedpeft_connections{state=\"all\"} %llu\nfedpeft_connections{state=\"handshake\"} %llu\n",
      (unsigned long long)s.connections, (unsigned long long)s.startups);
    P("# HELP fedpeft_revoked_sessions_total Sessions closed because a reloaded CRL revoked "
      "their site.\n# TYPE fedpeft_revoked_sessions_total counter\n"
      "fedpeft_revoked_sessions_total %llu\n", (unsigned long long)s.revoked_dropped);
    P("# HELP fedpeft_aggregation_seconds_total Time spent aggregating rounds.\n"
      "# TYPE fedpeft_aggregation_seconds_total counter\nfedpeft_aggregation_seconds_total %.6f\n",
      s.agg_seconds_total);
    P("# HELP fedpeft_aggregation_last_seconds Time the last round's aggregation took.\n"
      "# TYPE fedpeft_aggregation_last_seconds gauge\nfedpeft_aggregation_last_seconds %.6f\n",
      s.agg_seconds_last);
    if (s.dp)
        P("# HELP fedpeft_privacy_epsilon Differential privacy: ε spent (δ = %g), and the "
          "budget.\n# TYPE fedpeft_privacy_epsilon gauge\n"
          "fedpeft_privacy_epsilon{of=\"spent\"} %.6g\nfedpeft_privacy_epsilon{of=\"budget\"} "
          "%.6g\n", s.delta, s.epsilon, s.epsilon_max);
    P("# HELP process_resident_memory_bytes Resident memory.\n"
      "# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes %ld\n",
      rss_bytes());
#undef P
    return u;
}

static enum MHD_Result answer(void *cls, struct MHD_Connection *c, const char *url,
                              const char *method, const char *version, const char *data,
                              size_t *data_size, void **con_cls)
{
    (void)version;
    (void)data;
    (void)data_size;
    (void)con_cls;
    fp_metrics_t *m = cls;
    struct MHD_Response *r;
    enum MHD_Result ok;
    if (strcmp(method, "GET") != 0 || strcmp(url, "/metrics") != 0) {
        static const char nf[] = "not found: GET /metrics\n";
        r = MHD_create_response_from_buffer(sizeof nf - 1, (void *)nf, MHD_RESPMEM_PERSISTENT);
        ok = MHD_queue_response(c, strcmp(method, "GET") ? MHD_HTTP_METHOD_NOT_ALLOWED
                                                         : MHD_HTTP_NOT_FOUND, r);
        MHD_destroy_response(r);
        return ok;
    }
    char *buf = malloc(16384);
    if (!buf)
        return MHD_NO;
    size_t n = render(m->co, buf, 16384);
    r = MHD_create_response_from_buffer(n < 16384 ? n : 16383, buf, MHD_RESPMEM_MUST_FREE);
    MHD_add_response_header(r, "Content-Type", "text/plain; version=0.0.4");
    ok = MHD_queue_response(c, MHD_HTTP_OK, r);
    MHD_destroy_response(r);
    return ok;
}

int fp_metrics_start(fp_metrics_t **out, const char *hostport, fp_coord_t *co, int *port_out,
                     fp_err_t *err)
{
    *out = NULL;
    char host[256];
    int port, rc;
    if ((rc = fp_split_hostport(hostport, host, sizeof host, &port, err)) != 0)
        return rc;
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1)
        return fp_err_set(err, -EINVAL, "metrics: '%s' is not an IPv4 address", host);
    fp_metrics_t *m = calloc(1, sizeof *m);
    if (!m)
        return fp_err_set(err, -ENOMEM, "out of memory");
    m->co = co;
    /* Idle connections must not starve the scraper: a scrape sends its request at once and
     * is answered in microseconds, so a connection silent for 2 s is closed; up to 256 are
     * held (poll(2), not select's 1024-descriptor ceiling), each with 16 KiB of memory. */
    m->d = MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_POLL | MHD_USE_ERROR_LOG,
                            0, NULL, NULL, answer, m, MHD_OPTION_SOCK_ADDR, &sa,
                            MHD_OPTION_CONNECTION_LIMIT, 256u, MHD_OPTION_CONNECTION_TIMEOUT, 2u,
                            MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)16384, MHD_OPTION_END);
    if (!m->d) {
        free(m);
        return fp_err_set(err, -EADDRINUSE, "metrics: cannot listen on %s", hostport);
    }
    if (port_out) {
        const union MHD_DaemonInfo *i = MHD_get_daemon_info(m->d, MHD_DAEMON_INFO_BIND_PORT);
        *port_out = i ? i->port : port;
    }
    *out = m;
    return 0;
}

void fp_metrics_stop(fp_metrics_t *m)
{
    if (!m)
        return;
    MHD_stop_daemon(m->d);
    free(m);
}
