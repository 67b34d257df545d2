/*
 * gguf.h - read-only access to GGUF files (llama.cpp's format) through mmap.
 *
 * A file is a header (magic "GGUF", version 2 or 3, counts), metadata
 * key/value pairs (typed scalars, strings, arrays), tensor infos (name,
 * dims, ggml type, offset), then the tensor data, aligned to
 * general.alignment (default 32). A model may be split across files named
 * NAME-00001-of-0000N.gguf; opening the first (or any) of them opens them
 * all: metadata comes from the first split, tensors from every split.
 *
 * Everything is validated at open: every length, count, dimension and
 * offset is checked for overflow and against the real file size before a
 * pointer is formed, so a lying file is an error naming the key or tensor,
 * never a read past the mapping. After a successful open, every pointer
 * handed out (strings, array data, tensor data) stays valid until
 * gguf_close().
 *
 * Dimensions are in ggml order: ne[0] is the innermost (contiguous) one, so
 * a PyTorch weight of shape [out, in] is ne = {in, out}; a row of ne[0]
 * elements is gguf_row_bytes(type, ne[0]) bytes and rows follow each other.
 */
#ifndef TD_GGUF_H
#define TD_GGUF_H

#include <stddef.h>
#include <stdint.h>

#define GGUF_MAX_DIMS 4

/* Metadata value types (the numbers are the file's). */
typedef enum {
    GGUF_V_U8 = 0,
    GGUF_V_I8 = 1,
    GGUF_V_U16 = 2,
    GGUF_V_I16 = 3,
    GGUF_V_U32 = 4,
    GGUF_V_I32 = 5,
    GGUF_V_F32 = 6,
    GGUF_V_BOOL = 7,
    GGUF_V_STR = 8,
    GGUF_V_ARR = 9,
    GGUF_V_U64 = 10,
    GGUF_V_I64 = 11,
    GGUF_V_F64 = 12,
    GGUF_V_COUNT
} gguf_vtype;

/* Tensor element types (ggml_type numbers). Only those listed are read;
 * a file holding another type opens, and the tensor reports its type
 * number so the loader can name it in an error. */
typedef enum {
    GGUF_T_F32 = 0,
    GGUF_T_F16 = 1,
    GGUF_T_Q4_0 = 2,
    GGUF_T_Q4_1 = 3,
    GGUF_T_Q5_0 = 6,
    GGUF_T_Q5_1 = 7,
    GGUF_T_Q8_0 = 8,
    GGUF_T_Q8_1 = 9,
    GGUF_T_Q2_K = 10,
    GGUF_T_Q3_K = 11,
    GGUF_T_Q4_K = 12,
    GGUF_T_Q5_K = 13,
    GGUF_T_Q6_K = 14,
    GGUF_T_Q8_K = 15,
    GGUF_T_IQ4_NL = 20,
    GGUF_T_IQ4_XS = 23,
    GGUF_T_I8 = 24,
    GGUF_T_I16 = 25,
    GGUF_T_I32 = 26,
    GGUF_T_I64 = 27,
    GGUF_T_F64 = 28,
    GGUF_T_BF16 = 30,
    GGUF_T_COUNT = 48 /* bound for tables indexed by type */
} gguf_ttype;

/* One metadata pair. Scalars: u (unsigned), i (signed), f (float) hold the
 * value converted from whatever width the file used, and are all set where
 * the conversion is exact (e.g. a U32 also fills i and f). Strings: str is
 * NUL-terminated (a copy; len excludes the NUL, and the string may hold
 * NULs of its own). Arrays: arr_type and arr_n; read elements with
 * gguf_arr_*(). */
typedef struct {
    const char *key;
    gguf_vtype type;
    uint64_t u;
    int64_t i;
    double f;
    const char *str;
    size_t len;
    gguf_vtype arr_type;
    uint64_t arr_n;
    /* private: element storage of arrays */
    const void *arr_data;   /* numeric arrays: the file's bytes (little-endian, maybe unaligned) */
    const char **arr_strs;  /* string arrays: NUL-terminated copies */
    const uint32_t *arr_lens;
} gguf_kv;

typedef struct {
    const char *name;
    gguf_ttype type;                /* may be a number outside the enum's names */
    int ndim;
    int64_t ne[GGUF_MAX_DIMS];      /* ggml order, ne[0] innermost; unused dims are 1 */
    int64_t n_elem;
    const void *data;               /* into the file mapping, aligned to general.alignment */
    size_t nbytes;
    int file;                       /* index of the split holding it */
} gguf_tensor;

typedef struct gguf_file gguf_file;

/* path: a .gguf file, or any split of a NAME-0000k-of-0000N.gguf set. */
int gguf_open(gguf_file **out, const char *path, char *err, size_t errlen);
void gguf_close(gguf_file *g);

/* Heuristic used before opening: ends in ".gguf" (any case). */
int gguf_is_path(const char *path);

uint32_t gguf_version(const gguf_file *g);
const char *gguf_path(const gguf_file *g); /* the first split's path, for messages */

/* ---- metadata -------------------------------------------------------- */

int gguf_n_kv(const gguf_file *g);
const gguf_kv *gguf_kv_at(const gguf_file *g, int i);
const gguf_kv *gguf_find_kv(const gguf_file *g, const char *key); /* NULL if absent */

/* Typed getters. Each returns 0, TANDEM_EFORMAT (missing key, with a
 * message naming file and key; or a value of the wrong type, or out of the
 * target's range) . The *_opt forms return 1 and leave *out untouched when
 * the key is absent, 0 when found, negative on a wrong type. Integer
 * getters accept any integer type whose value fits; f32 accepts F32, F64
 * and integers. */
int gguf_get_str(const gguf_file *g, const char *key, const char **out, char *err, size_t errlen);
int gguf_get_u32(const gguf_file *g, const char *key, uint32_t *out, char *err, size_t errlen);
int gguf_get_i32(const gguf_file *g, const char *key, int32_t *out, char *err, size_t errlen);
int gguf_get_u64(const gguf_file *g, const char *key, uint64_t *out, char *err, size_t errlen);
int gguf_get_f32(const gguf_file *g, const char *key, float *out, char *err, size_t errlen);
int gguf_get_bool(const gguf_file *g, const char *key, int *out, char *err, size_t errlen);
/* An array; elem: the element type required, or -1 for any. */
int gguf_get_arr(const gguf_file *g, const char *key, int elem, const gguf_kv **out, char *err, size_t errlen);

int gguf_get_str_opt(const gguf_file *g, const char *key, const char **out, char *err, size_t errlen);
int gguf_get_u32_opt(const gguf_file *g, const char *key, uint32_t *out, char *err, size_t errlen);
int gguf_get_i32_opt(const gguf_file *g, const char *key, int32_t *out, char *err, size_t errlen);
int gguf_get_f32_opt(const gguf_file *g, const char *key, float *out, char *err, size_t errlen);
int gguf_get_bool_opt(const gguf_file *g, const char *key, int *out, char *err, size_t errlen);
int gguf_get_arr_opt(const gguf_file *g, const char *key, int elem, const gguf_kv **out, char *err,
                     size_t errlen);

/* Array elements (i < kv->arr_n, else 0 / NULL). Numeric getters convert
 * from any numeric element type; gguf_arr_str returns NULL for a
 * non-string array, and sets *len (may be NULL) to the length. */
int64_t gguf_arr_i64(const gguf_kv *kv, uint64_t i);
uint64_t gguf_arr_u64(const gguf_kv *kv, uint64_t i);
double gguf_arr_f64(const gguf_kv *kv, uint64_t i);
const char *gguf_arr_str(const gguf_kv *kv, uint64_t i, size_t *len);

/* general.architecture, or NULL when absent. */
const char *gguf_arch(const gguf_file *g);

/* ---- tensors --------------------------------------------------------- */

int gguf_n_tensors(const gguf_file *g);
const gguf_tensor *gguf_tensor_at(const gguf_file *g, int i);
const gguf_tensor *gguf_find_tensor(const gguf_file *g, const char *name); /* NULL if absent */

/* ---- files (splits), for fingerprints and page release ---------------- */

int gguf_n_files(const gguf_file *g);
const char *gguf_file_path(const gguf_file *g, int file);
/* what identifies a split: its size, modification time and a hash of its
 * header (everything before the data section) */
void gguf_file_stat(const gguf_file *g, int file, size_t *size, int64_t *mtime_ns, uint64_t *header_hash);
/* Drop the pages of [p, p + n) from this process when they lie in a
 * split's mapping (see st_release). */
void gguf_release(const gguf_file *g, const void *p, size_t n);

/* ---- element types ---------------------------------------------------- */

/* "Q4_K" etc., or "type N" in a static buffer for unknown numbers. */
const char *gguf_type_name(int type);
/* Elements per block and bytes per block; 0 for a type this reader does
 * not know the size of. */
int gguf_type_block(int type);
size_t gguf_type_block_bytes(int type);
/* Bytes of n elements of type (n a multiple of the block), or 0 when the
 * type is unknown, n is not a multiple of the block, or it overflows. */
size_t gguf_row_bytes(int type, int64_t n);

/* ---- reading values (gguf_quant.c) ------------------------------------ */

/* 1 when gguf_dequant() reads this type: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
 * Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS. */
int gguf_type_readable(int type);
/* Dequantise n elements (a multiple of the block size) at src into dst[n],
 * exactly as ggml's reference dequantisation computes them (float
 * arithmetic in the same order). 0, or TANDEM_EUNSUPPORTED for a type
 * without a reader, TANDEM_EINVAL for n not a multiple of the block. */
int gguf_dequant(int type, const void *src, float *dst, int64_t n);
/* The 32 weights of `row` (a row of type) from column col0 (a multiple of
 * 32) as w = s * q[k] + m with q[k] in 0..15, for the 4-bit types whose
 * blocks have that form: Q4_0 (s = d, m = -8d), Q4_1 (s = d, m = m), Q4_K
 * (s = d * scale, m = -dmin * min of the 32-run). s * q + m in fp32 is
 * gguf_dequant's value bit for bit. 1, or 0 for another type. */
int gguf_q4_group(int type, const void *row, int64_t col0, uint8_t q[32], float *s, float *m);

#endif
