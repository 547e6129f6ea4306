/* fedpeft ca — the federation's certificate authority. */
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "fp_ca.h"

static const char ca_help[] =
    "Usage: fedpeft ca init   --dir PKI --name NAME [--days N] [--key ec|ed25519]\n"
    "       fedpeft ca issue  --dir PKI --server HOST[,HOST|IP...] [--days N] [--key K]\n"
    "       fedpeft ca issue  --dir PKI --site NAME [--coordinator HOST:PORT] [--days N]\n"
    "                         [--key K] [--out DIR]\n"
    "       fedpeft ca revoke --dir PKI NAME\n"
    "       fedpeft ca crl    --dir PKI          (re-sign the CRL, extending its validity)\n"
    "       fedpeft ca list   --dir PKI [--json]\n"
    "\n"
    "The federation's certificate authority. 'init' creates the CA key and certificate, an\n"
    "empty CRL and an index. 'issue --server' writes PKI/servers/HOST/ (server.crt,\n"
    "server.key, ca.crt) with every HOST and IP as a subject alternative name. 'issue --site'\n"
    "writes the site kit PKI/sites/NAME/ (site.crt, site.key with mode 0600, ca.crt and a\n"
    "fedpeft-client.ini). 'revoke' lists the site's (or server's) certificates in the CRL;\n"
    "copy ca.crl to the coordinator and reload it (SIGHUP). Keys: EC P-256 (default) or\n"
    "Ed25519. Validity: --days (CA 3650, certificates 825).\n";

typedef struct ca_args {
    const char *dir, *name, *server, *site, *out, *coordinator;
    int days, json;
    fp_key_kind_t key;
} ca_args_t;

static int parse(int argc, char **argv, ca_args_t *a)
{
    static const struct option longopts[] = {
        {"dir", required_argument, 0, 'd'},    {"name", required_argument, 0, 'n'},
        {"server", required_argument, 0, 's'}, {"site", required_argument, 0, 'S'},
        {"days", required_argument, 0, 'D'},   {"key", required_argument, 0, 'k'},
        {"out", required_argument, 0, 'o'},    {"coordinator", required_argument, 0, 'c'},
        {"json", no_argument, 0, 'j'},         {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    int c;
    long long v;
    optind = 1;
    while ((c = getopt_long(argc, argv, "d:n:o:h", longopts, NULL)) != -1) {
        switch (c) {
        case 'd': a->dir = optarg; break;
        case 'n': a->name = optarg; break;
        case 's': a->server = optarg; break;
        case 'S': a->site = optarg; break;
        case 'o': a->out = optarg; break;
        case 'c': a->coordinator = optarg; break;
        case 'j': a->json = 1; break;
        case 'D':
            if (fp_parse_int(optarg, 1, 36500, &v) != 0)
                return fp_cli_usage_error("ca", "--days needs a number of days from 1 to 36500");
            a->days = (int)v;
            break;
        case 'k':
            if (!strcmp(optarg, "ec") || !strcmp(optarg, "p256"))
                a->key = FP_KEY_EC_P256;
            else if (!strcmp(optarg, "ed25519"))
                a->key = FP_KEY_ED25519;
            else
                return fp_cli_usage_error("ca", "--key is ec or ed25519");
            break;
        case 'h': fputs(ca_help, stdout); return -1;
        default: return fp_cli_usage_error("ca", "bad option");
        }
    }
    if (!a->dir)
        return fp_cli_usage_error("ca", "--dir PKI is required");
    return 0;
}

int fp_cmd_ca(int argc, char **argv)
{
    if (argc < 2)
        return fp_cli_usage_error("ca", "needs a subcommand: init, issue, revoke, crl or list");
    const char *sub = argv[1];
    if (!strcmp(sub, "--help") || !strcmp(sub, "-h")) {
        fputs(ca_help, stdout);
        return FP_EXIT_OK;
    }
    ca_args_t a = {0};
    int rc = parse(argc - 1, argv + 1, &a);
    if (rc)
        return rc < 0 ? FP_EXIT_OK : rc;
    int rest = argc - 1 - optind; /* positional arguments after the options */
    char **pos = argv + 1 + optind;
    fp_err_t err = {0};
    if (!strcmp(sub, "init")) {
        if (!a.name || rest)
            return fp_cli_usage_error("ca", "init needs --name NAME and nothing else");
        if (fp_ca_init(a.dir, a.name, a.days ? a.days : 3650, a.key, &err))
            return fp_cli_fail("ca", "%s", fp_err_msg(&err));
        printf("created CA '%s' in %s (ca.crt, ca.key, ca.crl, index.json)\n", a.name, a.dir);
        return FP_EXIT_OK;
    }
    if (!strcmp(sub, "issue")) {
        if ((!a.server) == (!a.site) || rest)
            return fp_cli_usage_error("ca", "issue needs exactly one of --server HOST[,...] or "
                                      "--site NAME");
        fp_ca_issue_opts_t o = {0};
        o.server = a.server != NULL;
        char first[256] = "";
        if (a.server) {
            snprintf(first, sizeof first, "%s", a.server);
            char *comma = strchr(first, ',');
            if (comma)
                *comma = '\0';
        }
        o.name = a.server ? first : a.site;
        o.sans = a.server;
        o.valid_for_s = (long)(a.days ? a.days : 825) * 86400;
        o.key = a.key;
        o.out_dir = a.out;
        o.coordinator = a.coordinator;
        if (fp_ca_issue(a.dir, &o, &err))
            return fp_cli_fail("ca", "%s", fp_err_msg(&err));
        printf("issued %s certificate '%s' -> %s/%s/%s\n", o.server ? "server" : "site", o.name,
               a.out ? "" : a.dir, a.out ? a.out : (o.server ? "servers" : "sites"),
               a.out ? "" : o.name);
        return FP_EXIT_OK;
    }
    if (!strcmp(sub, "revoke")) {
        if (rest != 1)
            return fp_cli_usage_error("ca", "revoke needs one NAME");
        int n;
        if (fp_ca_revoke(a.dir, pos[0], &n, &err))
            return fp_cli_fail("ca", "%s", fp_err_msg(&err));
        printf("revoked %d certificate%s of '%s'; the CRL %s/ca.crl is updated — copy it to the "
               "coordinator and reload (SIGHUP)\n", n, n == 1 ? "" : "s", pos[0], a.dir);
        return FP_EXIT_OK;
    }
    if (!strcmp(sub, "crl")) {
        if (fp_ca_refresh_crl(a.dir, &err))
            return fp_cli_fail("ca", "%s", fp_err_msg(&err));
        printf("re-signed %s/ca.crl\n", a.dir);
        return FP_EXIT_OK;
    }
    if (!strcmp(sub, "list")) {
        char *text;
        if (fp_ca_list(a.dir, &text, &err))
            return fp_cli_fail("ca", "%s", fp_err_msg(&err));
        if (a.json) {
            puts(text);
        } else {
            json_error_t je;
            json_t *j = json_loads(text, 0, &je);
            printf("CA '%s'\n%-7s %-24s %-22s %-9s %s\n",
                   json_string_value(json_object_get(j, "ca")), "kind", "name", "not after",
                   "status", "sha256");
            size_t i;
            json_t *c;
            json_array_foreach(json_object_get(j, "certificates"), i, c) {
                json_t *rv = json_object_get(c, "revoked_at");
                printf("%-7s %-24s %-22s %-9s %.16s…\n",
                       json_string_value(json_object_get(c, "kind")),
                       json_string_value(json_object_get(c, "name")),
                       json_string_value(json_object_get(c, "not_after")),
                       json_is_string(rv) ? "revoked" : "valid",
                       json_string_value(json_object_get(c, "sha256")));
            }
            json_decref(j);
        }
        free(text);
        return FP_EXIT_OK;
    }
    return fp_cli_usage_error("ca", "unknown subcommand '%s'", sub);
}
