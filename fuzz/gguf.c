/*
 * fuzz/gguf.c - libFuzzer target: a GGUF file (one split).
 *
 * Calls gguf_open() on the input as a regular file (a memfd, see fuzz.h):
 * header, metadata pairs of every value type and arrays, tensor infos,
 * alignment, data offsets against the file size. On success every pair is
 * read through the typed getters and array accessors, every tensor is looked
 * up by name, its first and last byte read, and its first block (or row, for
 * the plain types) dequantised when the type is readable, so an offset or a
 * size the checks let through is caught by ASan; then gguf_close() frees
 * everything (LeakSanitizer checks that).
 * Not covered here: split sets (their file names cannot be memfds).
 *
 *   make fuzz && build-fuzz/fuzz/gguf fuzz/corpus/gguf
 * Seeds: tests/fixtures/gguf/quants.gguf (every readable type, every value
 * type), the first file of the split fixture, and a small file of two
 * tensors cut to its header plus data (fuzz/corpus/gguf/).
 */
#include "fuzz.h"
#include "io/gguf.h"

#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *path = fuzz_memfile(data, size);
    if (!path)
        return 0;
    gguf_file *g = NULL;
    char err[512];
    if (gguf_open(&g, path, err, sizeof err) != 0)
        return 0;
    volatile double sum = 0;
    for (int i = 0; i < gguf_n_kv(g); i++) {
        const gguf_kv *kv = gguf_kv_at(g, i);
        if (gguf_find_kv(g, kv->key) != kv)
            __builtin_trap(); /* the key index lost a pair */
        uint32_t u;
        int32_t s;
        float f;
        int b;
        const char *str;
        const gguf_kv *a;
        gguf_get_u32(g, kv->key, &u, err, sizeof err);
        gguf_get_i32(g, kv->key, &s, err, sizeof err);
        gguf_get_f32(g, kv->key, &f, err, sizeof err);
        gguf_get_bool(g, kv->key, &b, err, sizeof err);
        if (gguf_get_str(g, kv->key, &str, err, sizeof err) == 0)
            sum += (unsigned char)str[kv->len]; /* the NUL after the copy */
        if (gguf_get_arr(g, kv->key, -1, &a, err, sizeof err) == 0 && a->arr_n) {
            uint64_t last = a->arr_n - 1;
            size_t len;
            const char *e = gguf_arr_str(a, last, &len);
            if (e)
                sum += (unsigned char)e[len];
            else
                sum += gguf_arr_f64(a, last) + (double)gguf_arr_i64(a, 0) + (double)gguf_arr_u64(a, last);
        }
    }
    float tmp[256];
    for (int i = 0; i < gguf_n_tensors(g); i++) {
        const gguf_tensor *t = gguf_tensor_at(g, i);
        if (gguf_find_tensor(g, t->name) != t)
            __builtin_trap(); /* the name index lost a tensor */
        if (!t->nbytes)
            continue;
        sum += ((const uint8_t *)t->data)[0] + ((const uint8_t *)t->data)[t->nbytes - 1];
        int bs = gguf_type_block(t->type);
        int64_t n = t->ne[0] < 256 ? t->ne[0] : 256;
        n -= n % bs;
        if (gguf_type_readable(t->type) && n > 0 && gguf_dequant(t->type, t->data, tmp, n) == 0)
            sum += tmp[n - 1];
    }
    (void)sum;
    size_t sz;
    int64_t mt;
    uint64_t h;
    gguf_file_stat(g, 0, &sz, &mt, &h);
    gguf_close(g);
    return 0;
}
