/* fp_tokenizer.h — Hugging Face tokenizer.json (BPE) and a byte-level tokenizer.
 *
 * The pipeline is the one HF tokenizers runs: added tokens are split out of the text first;
 * each remaining segment is normalized (Sequence, Prepend, Replace, NFC/NFD/NFKC/NFKD,
 * Lowercase, Strip), pre-tokenized (Sequence, ByteLevel, Metaspace, Split, Digits, Whitespace,
 * WhitespaceSplit) and each piece is encoded by BPE (merges by rank, leftmost first; byte
 * fallback to <0xNN>; fuse_unk; ignore_merges). GPT-2 byte-level and SentencePiece-style
 * (Llama, Mistral) tokenizers are covered; ids equal the reference implementations'.
 * Unsupported components are refused at load with their type named.
 *
 * The byte-level tokenizer maps byte b to id b and has one special token, <|endoftext|> = 256;
 * it is itself expressed as a tokenizer.json (GPT-2 byte alphabet, no merges), so a model
 * trained with it is usable from Python as is.
 */
#ifndef FP_TOKENIZER_H
#define FP_TOKENIZER_H

#include <stddef.h>

#include "fp_error.h"

typedef struct fp_tokenizer fp_tokenizer_t;

#define FP_BYTES_VOCAB 257 /* 256 bytes + <|endoftext|> */

/* Loads a tokenizer.json file (or a directory holding one). */
int fp_tokenizer_load(const char *path, fp_tokenizer_t **out, fp_err_t *err);

/* The byte-level tokenizer. */
int fp_tokenizer_bytes(fp_tokenizer_t **out, fp_err_t *err);

/* Writes the byte-level tokenizer as tokenizer.json to path. */
int fp_tokenizer_write_bytes(const char *path, fp_err_t *err);

void fp_tokenizer_free(fp_tokenizer_t *t);

/* Appends the ids of text[0:len] (UTF-8; invalid bytes are taken as Latin-1 characters) to
 * *ids (capacity *cap, count *n; grown with realloc). Adds no BOS/EOS. */
int fp_tokenizer_encode(const fp_tokenizer_t *t, const char *text, size_t len, int **ids,
                        size_t *n, size_t *cap, fp_err_t *err);

/* Decodes ids into a malloc'd NUL-terminated string (as HF's decoder would, special tokens
 * included). */
int fp_tokenizer_decode(const fp_tokenizer_t *t, const int *ids, size_t n, char **out,
                        fp_err_t *err);

/* Size of the id space: 1 + the largest id of the vocabulary and the added tokens. */
int fp_tokenizer_vocab_size(const fp_tokenizer_t *t);

/* Id of a token given by its text (vocabulary or added token), or -1. */
int fp_tokenizer_token_id(const fp_tokenizer_t *t, const char *token);

/* A likely end-of-text id (</s>, <|endoftext|>, <|end_of_text|>, <eos>), or -1. */
int fp_tokenizer_eos_id(const fp_tokenizer_t *t);
/* A likely beginning-of-text id (<s>, <|begin_of_text|>, <bos>), or -1. */
int fp_tokenizer_bos_id(const fp_tokenizer_t *t);

#endif
