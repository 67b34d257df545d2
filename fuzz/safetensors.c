/*
 * fuzz/safetensors.c - libFuzzer target: a safetensors file (one shard).
 *
 * Calls st_open() on the input as a regular file (a memfd, see fuzz.h): the
 * 8-byte header length, the JSON header, dtypes, shapes, data offsets against
 * the file size, the aligned copy of an off-alignment tensor. On success every
 * tensor is looked up by name and its first and last data byte read, so an
 * offset the checks let through out of the mapping is caught by ASan, then
 * st_close() frees everything (LeakSanitizer checks that).
 * Not covered here: model.safetensors.index.json (sharded sets), which needs
 * a directory of files.
 *
 *   make fuzz && build-fuzz/fuzz/safetensors fuzz/corpus/safetensors
 * Seeds: the fixtures' files cut to their header plus a few data bytes, with
 * offsets kept consistent (fuzz/corpus/safetensors/).
 */
#include "fuzz.h"
#include "io/safetensors.h"

#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *path = fuzz_memfile(data, size);
    if (!path)
        return 0;
    st_set *s = NULL;
    char err[512];
    if (st_open(&s, path, err, sizeof err) != 0)
        return 0;
    volatile unsigned sum = 0;
    for (int i = 0; i < st_count(s); i++) {
        const st_tensor *t = st_at(s, i);
        if (st_find(s, t->name) != t)
            __builtin_trap(); /* the name index lost a tensor */
        if (t->nbytes)
            sum += ((const uint8_t *)t->data)[0] + ((const uint8_t *)t->data)[t->nbytes - 1];
        char sh[96];
        st_shape_str(t->shape, t->ndim, sh, sizeof sh);
    }
    (void)sum;
    st_close(s);
    return 0;
}
