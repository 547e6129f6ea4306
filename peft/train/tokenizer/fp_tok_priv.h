/* fp_tok_priv.h — the tokenizer's parts, shared by its files (not an interface): HF's
 * tokenizers pipeline — normalizer (fp_tok_normalizer.c), pre-tokenizer
 * (fp_tok_pretokenizer.c), model (BPE, fp_tok_bpe.c), decoder (fp_tok_decoder.c) — and the
 * tokenizer that loads and runs them (fp_tokenizer.c), over small helpers (fp_tok_util.c). */
#ifndef FP_TOK_PRIV_H
#define FP_TOK_PRIV_H

#define PCRE2_CODE_UNIT_WIDTH 8
#include <jansson.h>
#include <pcre2.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "fp_error.h"
#include "fp_json.h"
#include "fp_tokenizer.h"

typedef struct sb {
    char *p;
    size_t n, cap;
} sb_t;

typedef struct piece {
    size_t off, len;
    int first; /* begins at offset 0 of the original input */
} piece_t;

typedef struct pieces {
    sb_t text;
    piece_t *v;
    size_t n, cap;
} pieces_t;

/* ---- components ---- */

typedef enum { NZ_SEQ, NZ_PREPEND, NZ_REPLACE, NZ_NORMAL, NZ_LOWER, NZ_STRIP } nz_type_t;

typedef struct nz {
    nz_type_t type;
    struct nz *kids;
    int nkids;
    char *a, *b;       /* Prepend: a; Replace: a → b (literal) */
    size_t alen, blen;
    pcre2_code *re;    /* Replace with a Regex pattern */
    int form;          /* NZ_NORMAL: utf8proc options */
    int left, right;   /* Strip */
} nz_t;

typedef enum { PT_SEQ, PT_BYTELEVEL, PT_METASPACE, PT_SPLIT, PT_DIGITS, PT_WHITESPACE,
               PT_WSSPLIT } pt_type_t;

enum { B_REMOVED, B_ISOLATED, B_MERGED_PREV, B_MERGED_NEXT, B_CONTIGUOUS };

typedef struct pt {
    pt_type_t type;
    struct pt *kids;
    int nkids;
    int add_prefix_space, use_regex; /* ByteLevel */
    char repl[8];                    /* Metaspace replacement (UTF-8) */
    size_t repl_len;
    int prepend;                     /* Metaspace: 0 never, 1 first, 2 always */
    int split;                       /* Metaspace */
    pcre2_code *re;                  /* Split, ByteLevel (GPT-2), Whitespace, Digits */
    int behavior, invert;            /* Split */
} pt_t;

typedef struct vocab_entry {
    const char *s;
    uint32_t len;
    int id;
} vocab_entry_t;

typedef struct merge {
    int a, b, rank, id;
} merge_t;

typedef struct added {
    const char *s;
    size_t len;
    int id, special, lstrip, rstrip, single_word;
} added_t;

typedef enum { DC_BYTELEVEL, DC_REPLACE, DC_BYTEFALLBACK, DC_FUSE, DC_STRIP, DC_METASPACE }
    dc_type_t;

typedef struct dc {
    dc_type_t type;
    char *a, *b;
    size_t alen, blen;
    int start, stop;
    int prepend;
} dc_t;

struct fp_tokenizer {
    vocab_entry_t *vocab;   /* sorted by bytes */
    int nvocab;
    const char **id_str;    /* id → token text (vocab or added), or NULL */
    uint32_t *id_len;
    int size;               /* id space */
    merge_t *merges;        /* sorted by (a, b) */
    int nmerges;
    added_t *added;         /* sorted by length, longest first */
    int nadded;
    unsigned char added_first[256]; /* 1 for bytes that start an added token */
    nz_t *norm;
    pt_t *pre;
    dc_t *dec;
    int ndec, dec_ok;
    int byte_fallback, fuse_unk, ignore_merges, unk_id;
    int byte_ids[256];      /* <0xNN> token ids, or -1 */
};


/* ---- helpers (fp_tok_util.c) ---- */

int fp__tok_sb_reserve(sb_t *b, size_t more);
int fp__tok_sb_add(sb_t *b, const void *s, size_t n);
int fp__tok_ids_push(int **ids, size_t *n, size_t *cap, int id);
int fp__tok_pieces_add(pieces_t *ps, const char *s, size_t len, int first);
void fp__tok_pieces_reset(pieces_t *ps);
void fp__tok_pieces_free(pieces_t *ps);
/* GPT-2's byte ↔ unicode alphabet (filled by fp__tok_init_byte_alphabet). */
extern int fp__tok_byte_to_cp[256];
extern int fp__tok_cp_to_byte[512];
void fp__tok_init_byte_alphabet(void);
int fp__tok_put_utf8(int cp, char *out);
int fp__tok_utf8_len(const unsigned char *s, size_t left);
pcre2_code *fp__tok_compile_re(const char *pat, size_t len, int literal, fp_err_t *err,
                               const char *path);
typedef int (*match_fn)(void *ctx, size_t s, size_t e);
int fp__tok_for_each_match(const pcre2_code *re, const char *text, size_t len, match_fn fn,
                           void *ctx);
const char *fp__tok_dupmem(const char *s, size_t n);
const char *fp__tok_type_of(json_t *j);
int fp__tok_read_pattern(json_t *pat, const char **s, int *is_regex);

/* ---- normalizer (fp_tok_normalizer.c) ---- */

int fp__tok_load_nz(json_t *j, nz_t *z, const char *path, fp_err_t *err);
void fp__tok_nz_free(nz_t *z);
int fp__tok_normalize(const nz_t *z, sb_t *s);

/* ---- pre-tokenizer (fp_tok_pretokenizer.c) ---- */

int fp__tok_load_pt(json_t *j, pt_t *p, const char *path, fp_err_t *err);
void fp__tok_pt_free(pt_t *p);
int fp__tok_pretokenize(const pt_t *p, pieces_t *in, pieces_t *out);

/* ---- model: BPE (fp_tok_bpe.c) ---- */

int fp__tok_cmp_vocab(const void *a, const void *b);
int fp__tok_cmp_merge(const void *a, const void *b);
int fp__tok_vocab_find(const fp_tokenizer_t *t, const char *s, size_t len);
const merge_t *fp__tok_merge_find(const fp_tokenizer_t *t, int a, int b);
int fp__tok_merge_parts(json_t *m, const char **a, size_t *al, const char **b, size_t *bl);
typedef struct sym {
    int id;
    int prev, next; /* -1 at the ends */
    int alive;
} sym_t;

typedef struct cand {
    int rank, pos, id;
} cand_t;

typedef struct bpe_ws {
    sym_t *sym;
    cand_t *heap;
    size_t cap;
} bpe_ws_t;
/* Token ids of one pre-tokenized piece, appended to ids; ws is scratch kept between calls
 * (free its arrays when done). */
int fp__tok_bpe_piece(const fp_tokenizer_t *t, bpe_ws_t *ws, const char *s, size_t len,
                      int **ids, size_t *n, size_t *cap, fp_err_t *err);

/* ---- decoder (fp_tok_decoder.c) ---- */

int fp__tok_load_dc(fp_tokenizer_t *t, json_t *j, const char *path);

#endif
