/*
 * gpu_core.cu - devices, memory, contexts (streams, events, cuBLAS), the two
 * CPU hand-off mechanisms and CUDA graphs.
 *
 * Build constraints (why the code looks the way it does):
 *   - The CUDA runtime is linked statically and libcuda is never linked, so
 *     a binary built here starts on a machine without a driver; then
 *     cudaGetDeviceCount() fails and gpu_device_count() says why.
 *   - The driver-API stream memory operations (cuStreamWriteValue32 /
 *     cuStreamWaitValue32) are looked up at run time through the runtime's
 *     driver entry point query, once, and are optional: without them only
 *     hand-off (a), host functions, is available.
 *   - The device is put in blocking-sync mode, so a thread waiting for the
 *     GPU sleeps instead of spinning on a core the CPU experts need.
 *   - cuBLAS gets a fixed workspace, so capturing a graph never allocates.
 */
#include <cuda.h>
#include <dlfcn.h>
#include <mutex>
#include <string.h>

#include "cuda/gpu_internal.cuh"

/* Messages for calls made outside a context (load time, tests). */
static int plain_err(cudaError_t e, const char *what, char *err, size_t errlen)
{
    if (e == cudaSuccess)
        return 0;
    cudaGetLastError(); /* or the next launch check would report it again */
    if (err && errlen)
        snprintf(err, errlen, "CUDA: %s: %s (%s)", what, cudaGetErrorString(e), cudaGetErrorName(e));
    return TANDEM_EGPU;
}

/* ---- devices ------------------------------------------------------------------ */
extern "C" int gpu_device_count(char *why, size_t whylen)
{
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        if (why && whylen && e == cudaErrorInsufficientDriver)
            snprintf(why, whylen, "no NVIDIA driver, or one older than CUDA %d.%d that this build needs",
                     CUDART_VERSION / 1000, CUDART_VERSION % 1000 / 10);
        else if (why && whylen)
            snprintf(why, whylen, "%s", cudaGetErrorString(e));
        cudaGetLastError();
        return 0;
    }
    if (n == 0 && why && whylen)
        snprintf(why, whylen, "the driver reports no CUDA device");
    return n;
}

/* Stream memory operations, looked up once. */
typedef CUresult (*pfn_value32)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);
static pfn_value32 p_wait32, p_write32;

static void load_mem_ops(void)
{
    static std::once_flag once;
    std::call_once(once, [] {
        void *w = NULL, *r = NULL;
        cudaDriverEntryPointQueryResult q1 = cudaDriverEntryPointSymbolNotFound, q2 = q1;
#if CUDART_VERSION >= 12050
        cudaError_t e1 = cudaGetDriverEntryPointByVersion("cuStreamWaitValue32", &w, 12000, cudaEnableDefault, &q1);
        cudaError_t e2 = cudaGetDriverEntryPointByVersion("cuStreamWriteValue32", &r, 12000, cudaEnableDefault, &q2);
#else
        cudaError_t e1 = cudaGetDriverEntryPoint("cuStreamWaitValue32", &w, cudaEnableDefault, &q1);
        cudaError_t e2 = cudaGetDriverEntryPoint("cuStreamWriteValue32", &r, cudaEnableDefault, &q2);
#endif
        if (e1 == cudaSuccess && e2 == cudaSuccess && q1 == cudaDriverEntryPointSuccess &&
            q2 == cudaDriverEntryPointSuccess) {
            p_wait32 = (pfn_value32)w;
            p_write32 = (pfn_value32)r;
        }
        cudaGetLastError();
    });
}

extern "C" int gpu_open(int device, gpu_info *info, char *err, size_t errlen)
{
    char why[256];
    int n = gpu_device_count(why, sizeof why);
    if (n == 0) {
        if (err && errlen)
            snprintf(err, errlen, "no CUDA device: %s", why);
        return TANDEM_EGPU;
    }
    if (device < 0 || device >= n) {
        if (err && errlen)
            snprintf(err, errlen, "CUDA device %d does not exist (this machine has %d)", device, n);
        return TANDEM_EINVAL;
    }
    int rc = plain_err(cudaSetDevice(device), "cudaSetDevice", err, errlen);
    if (!rc) {
        /* applies to the device's primary context, whether it exists yet or not */
        cudaSetDeviceFlags(cudaDeviceScheduleBlockingSync);
        cudaGetLastError();
    }
    if (!rc)
        rc = plain_err(cudaFree(0), "creating the device context", err, errlen);
    if (rc || !info)
        return rc;
    memset(info, 0, sizeof *info);
    cudaDeviceProp p;
    if ((rc = plain_err(cudaGetDeviceProperties(&p, device), "cudaGetDeviceProperties", err, errlen)))
        return rc;
    snprintf(info->name, sizeof info->name, "%s", p.name);
    info->cc_major = p.major;
    info->cc_minor = p.minor;
    info->n_sm = p.multiProcessorCount;
    cudaMemGetInfo(&info->mem_free, &info->mem_total);
    cudaDriverGetVersion(&info->driver_version);
    cudaRuntimeGetVersion(&info->runtime_version);
    load_mem_ops();
    info->mem_ops = p_wait32 && p_write32;
    info->cublas = gpu_blas() != NULL;
    return 0;
}

extern "C" int gpu_use_device(int device, char *err, size_t errlen)
{
    return plain_err(cudaSetDevice(device), "cudaSetDevice", err, errlen);
}

extern "C" int gpu_mem_info(size_t *free_bytes, size_t *total_bytes, char *err, size_t errlen)
{
    return plain_err(cudaMemGetInfo(free_bytes, total_bytes), "cudaMemGetInfo", err, errlen);
}

/* ---- memory ------------------------------------------------------------------- */
extern "C" int gpu_alloc(void **p, size_t bytes, char *err, size_t errlen)
{
    *p = NULL;
    cudaError_t e = cudaMalloc(p, bytes ? bytes : 16);
    if (e != cudaSuccess) {
        *p = NULL;
        cudaGetLastError();
        if (err && errlen)
            snprintf(err, errlen, "CUDA: out of GPU memory allocating %.1f MB (%s)", (double)bytes / 1e6,
                     cudaGetErrorString(e));
        return TANDEM_ENOMEM;
    }
    return 0;
}

extern "C" void gpu_free(void *p)
{
    if (p)
        cudaFree(p);
}

extern "C" int gpu_host_alloc(void **p, size_t bytes, char *err, size_t errlen)
{
    *p = NULL;
    cudaError_t e = cudaHostAlloc(p, bytes ? bytes : 16, cudaHostAllocMapped | cudaHostAllocPortable);
    if (e != cudaSuccess) {
        *p = NULL;
        cudaGetLastError();
        if (err && errlen)
            snprintf(err, errlen, "CUDA: could not pin %.1f MB of host memory (%s)", (double)bytes / 1e6,
                     cudaGetErrorString(e));
        return TANDEM_ENOMEM;
    }
    memset(*p, 0, bytes);
    return 0;
}

extern "C" void gpu_host_free(void *p)
{
    if (p)
        cudaFreeHost(p);
}

extern "C" int gpu_host_register(void *p, size_t bytes, char *err, size_t errlen)
{
    cudaError_t e = cudaHostRegister(p, bytes, cudaHostRegisterPortable);
    if (e != cudaSuccess) { /* a read-only mapping (an mmapped checkpoint) pins only as such */
        cudaGetLastError();
        e = cudaHostRegister(p, bytes, cudaHostRegisterPortable | cudaHostRegisterReadOnly);
    }
    return plain_err(e, "pinning a host buffer", err, errlen);
}

extern "C" void gpu_host_unregister(void *p)
{
    if (p) {
        cudaHostUnregister(p);
        cudaGetLastError();
    }
}

/* cudaMemcpy from pageable memory may return before the DMA is done, and
 * cudaMemset is asynchronous: wait for the legacy stream, so work enqueued
 * next on a context's (non-blocking) streams sees the data. */
extern "C" int gpu_upload(void *dst, const void *src, size_t bytes, char *err, size_t errlen)
{
    int rc = plain_err(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice), "upload", err, errlen);
    return rc ? rc : plain_err(cudaStreamSynchronize(0), "upload", err, errlen);
}

extern "C" int gpu_download(void *dst, const void *src, size_t bytes, char *err, size_t errlen)
{
    return plain_err(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost), "download", err, errlen);
}

extern "C" int gpu_memset(void *dst, int value, size_t bytes, char *err, size_t errlen)
{
    int rc = plain_err(cudaMemset(dst, value, bytes), "memset", err, errlen);
    return rc ? rc : plain_err(cudaStreamSynchronize(0), "memset", err, errlen);
}

/* ---- cuBLAS at run time -------------------------------------------------------- */
static gpu_blas_api blas_api;
static const gpu_blas_api *blas_ok;

const gpu_blas_api *gpu_blas(void)
{
    static std::once_flag once;
    std::call_once(once, [] {
        /* the binary's rpath names the toolkit it was built with; TD_CUDA_LIB too */
        char name[64], full[600] = "";
        snprintf(name, sizeof name, "libcublas.so.%d", CUBLAS_VER_MAJOR);
#ifdef TD_CUDA_LIB
        snprintf(full, sizeof full, "%s/%s", TD_CUDA_LIB, name);
#endif
        const char *names[] = { name, full, "libcublas.so" };
        void *h = NULL;
        for (int i = 0; i < 3 && !h; i++)
            if (names[i][0])
                h = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
        if (!h)
            return;
        gpu_blas_api a;
        *(void **)&a.create = dlsym(h, "cublasCreate_v2");
        *(void **)&a.destroy = dlsym(h, "cublasDestroy_v2");
        *(void **)&a.set_stream = dlsym(h, "cublasSetStream_v2");
        *(void **)&a.set_workspace = dlsym(h, "cublasSetWorkspace_v2");
        *(void **)&a.set_math_mode = dlsym(h, "cublasSetMathMode");
        *(void **)&a.gemm_ex = dlsym(h, "cublasGemmEx");
        *(void **)&a.status_string = dlsym(h, "cublasGetStatusString");
        if (a.create && a.destroy && a.set_stream && a.set_workspace && a.set_math_mode && a.gemm_ex &&
            a.status_string) {
            blas_api = a;
            blas_ok = &blas_api;
        }
    });
    return blas_ok;
}

/* ---- contexts ----------------------------------------------------------------- */
enum { BLAS_WS_BYTES = 32 << 20 }; /* what cuBLAS asks for on Hopper */

extern "C" void gpu_ctx_free(gpu_ctx *c)
{
    if (!c)
        return;
    if (c->s[0])
        cudaStreamSynchronize(c->s[0]);
    if (c->s[1])
        cudaStreamSynchronize(c->s[1]);
    if (c->blas)
        gpu_blas()->destroy(c->blas);
    cudaFree(c->blas_ws);
    cudaFree(c->xbf);
    cudaFree(c->wbf);
    cudaFree(c->att_part);
    cudaFree(c->counters);
    if (c->ev_fork)
        cudaEventDestroy(c->ev_fork);
    if (c->ev_join)
        cudaEventDestroy(c->ev_join);
    for (int i = 0; i < 2; i++)
        if (c->s[i])
            cudaStreamDestroy(c->s[i]);
    cudaGetLastError();
    free(c);
}

extern "C" int gpu_ctx_create(gpu_ctx **out, size_t scratch_elems, char *err, size_t errlen)
{
    *out = NULL;
    gpu_ctx *c = (gpu_ctx *)calloc(1, sizeof *c);
    if (!c) {
        if (err && errlen)
            snprintf(err, errlen, "out of memory");
        return TANDEM_ENOMEM;
    }
    c->exact_max_T = 16;
    c->fast = 1;
    int dev = 0;
    gpu_check(c, cudaGetDevice(&dev), "cudaGetDevice");
    if (!c->rc)
        gpu_check(c, cudaDeviceGetAttribute(&c->n_sm, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
    if (c->n_sm < 1)
        c->n_sm = 1;
    if (!c->rc)
        gpu_attn_prepare(c);
    /* split kernels' scratch; counters start at zero and every kernel that
     * counts leaves them at zero */
    if (!c->rc)
        gpu_check(c, cudaMalloc((void **)&c->att_part, GPU_ATT_PART_FLOATS * sizeof(float)),
                  "allocating attention scratch");
    if (!c->rc)
        gpu_check(c, cudaMalloc((void **)&c->counters, GPU_COUNTERS * sizeof(int)), "allocating counters");
    /* non-blocking streams (as graph capture expects): they never wait for the
     * legacy stream, so the synchronous uploads below finish before returning */
    for (int i = 0; i < 2; i++)
        gpu_check(c, cudaStreamCreateWithFlags(&c->s[i], cudaStreamNonBlocking), "creating a stream");
    /* on the main stream, so every op that counts comes after it */
    if (!c->rc)
        gpu_check(c, cudaMemsetAsync(c->counters, 0, GPU_COUNTERS * sizeof(int), c->s[GPU_MAIN]), "zeroing counters");
    gpu_check(c, cudaEventCreateWithFlags(&c->ev_fork, cudaEventDisableTiming), "creating an event");
    gpu_check(c, cudaEventCreateWithFlags(&c->ev_join, cudaEventDisableTiming), "creating an event");
    const gpu_blas_api *b = gpu_blas();
    if (!c->rc && b)
        gpu_blas_check(c, b->create(&c->blas), "cublasCreate");
    if (!c->rc && b)
        gpu_blas_check(c, b->set_stream(c->blas, c->s[GPU_MAIN]), "cublasSetStream");
    if (!c->rc && b) {
        c->blas_ws_bytes = BLAS_WS_BYTES;
        gpu_check(c, cudaMalloc(&c->blas_ws, c->blas_ws_bytes), "allocating the cuBLAS workspace");
    }
    if (!c->rc && b)
        gpu_blas_check(c, b->set_workspace(c->blas, c->blas_ws, c->blas_ws_bytes), "cublasSetWorkspace");
    /* plain fp32 GEMMs stay fp32: no TF32 unless asked for */
    if (!c->rc && b)
        gpu_blas_check(c, b->set_math_mode(c->blas, CUBLAS_DEFAULT_MATH), "cublasSetMathMode");
    c->xbf_elems = scratch_elems;
    if (!c->rc && scratch_elems)
        gpu_check(c, cudaMalloc((void **)&c->xbf, scratch_elems * sizeof(__nv_bfloat16)), "allocating GEMM scratch");
    if (c->rc) {
        int rc = c->rc;
        if (err && errlen)
            snprintf(err, errlen, "%s", c->msg);
        gpu_ctx_free(c);
        return rc;
    }
    *out = c;
    return 0;
}

extern "C" int gpu_ctx_reserve_dequant(gpu_ctx *c, size_t elems, char *err, size_t errlen)
{
    if (!c->rc && elems > c->wbf_elems) {
        cudaFree(c->wbf);
        c->wbf = NULL;
        c->wbf_elems = 0;
        if (!gpu_check(c, cudaMalloc((void **)&c->wbf, elems * sizeof(__nv_bfloat16)),
                       "allocating the dequantised weight tiles"))
            c->wbf_elems = elems;
    }
    return gpu_ctx_status(c, err, errlen);
}

extern "C" int gpu_ctx_status(const gpu_ctx *c, char *err, size_t errlen)
{
    if (c->rc && err && errlen)
        snprintf(err, errlen, "%s", c->msg);
    return c->rc;
}

extern "C" void gpu_ctx_clear(gpu_ctx *c)
{
    cudaGetLastError();
    c->rc = 0;
    c->msg[0] = 0;
}

extern "C" int gpu_sync(gpu_ctx *c, char *err, size_t errlen)
{
    if (!c->rc)
        gpu_check(c, cudaStreamSynchronize(c->s[GPU_SIDE]), "waiting for the side stream");
    if (!c->rc)
        gpu_check(c, cudaStreamSynchronize(c->s[GPU_MAIN]), "waiting for the GPU");
    return gpu_ctx_status(c, err, errlen);
}

extern "C" void gpu_ctx_set_exact(gpu_ctx *c, int max_T) { c->exact_max_T = max_T; }
extern "C" void gpu_ctx_set_fast(gpu_ctx *c, int fast) { c->fast = fast != 0; }

/* ---- timers ------------------------------------------------------------------------ */
struct gpu_timer {
    cudaEvent_t a, b;
};

extern "C" int gpu_timer_create(gpu_timer **out, char *err, size_t errlen)
{
    *out = NULL;
    gpu_timer *t = (gpu_timer *)calloc(1, sizeof *t);
    if (!t) {
        if (err && errlen)
            snprintf(err, errlen, "out of memory");
        return TANDEM_ENOMEM;
    }
    int rc = plain_err(cudaEventCreate(&t->a), "creating an event", err, errlen);
    if (!rc)
        rc = plain_err(cudaEventCreate(&t->b), "creating an event", err, errlen);
    if (rc) {
        gpu_timer_free(t);
        return rc;
    }
    *out = t;
    return 0;
}

extern "C" void gpu_timer_free(gpu_timer *t)
{
    if (!t)
        return;
    if (t->a)
        cudaEventDestroy(t->a);
    if (t->b)
        cudaEventDestroy(t->b);
    cudaGetLastError();
    free(t);
}

extern "C" int gpu_timer_start(gpu_ctx *c, gpu_timer *t)
{
    if (c->rc)
        return c->rc;
    return gpu_check(c, cudaEventRecord(t->a, c->s[GPU_MAIN]), "timer: cudaEventRecord");
}

extern "C" int gpu_timer_stop(gpu_ctx *c, gpu_timer *t)
{
    if (c->rc)
        return c->rc;
    return gpu_check(c, cudaEventRecord(t->b, c->s[GPU_MAIN]), "timer: cudaEventRecord");
}

extern "C" int gpu_timer_ms(gpu_ctx *c, gpu_timer *t, double *ms)
{
    *ms = 0;
    if (c->rc)
        return c->rc;
    float f = 0;
    if (gpu_check(c, cudaEventSynchronize(t->b), "timer: cudaEventSynchronize") ||
        gpu_check(c, cudaEventElapsedTime(&f, t->a, t->b), "timer: cudaEventElapsedTime"))
        return c->rc;
    *ms = f;
    return 0;
}

/* ---- streams and hand-off --------------------------------------------------------- */
extern "C" int gpu_copy(gpu_ctx *c, int stream, void *dst, const void *src, size_t bytes)
{
    if (c->rc || !bytes)
        return c->rc;
    return gpu_check(c, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, c->s[stream]), "cudaMemcpyAsync");
}

extern "C" int gpu_zero(gpu_ctx *c, int stream, void *dst, size_t bytes)
{
    if (c->rc || !bytes)
        return c->rc;
    return gpu_check(c, cudaMemsetAsync(dst, 0, bytes, c->s[stream]), "cudaMemsetAsync");
}

extern "C" int gpu_fork(gpu_ctx *c)
{
    if (c->rc)
        return c->rc;
    gpu_check(c, cudaEventRecord(c->ev_fork, c->s[GPU_MAIN]), "fork: cudaEventRecord");
    return gpu_check(c, cudaStreamWaitEvent(c->s[GPU_SIDE], c->ev_fork, 0), "fork: cudaStreamWaitEvent");
}

extern "C" int gpu_join(gpu_ctx *c)
{
    if (c->rc)
        return c->rc;
    gpu_check(c, cudaEventRecord(c->ev_join, c->s[GPU_SIDE]), "join: cudaEventRecord");
    return gpu_check(c, cudaStreamWaitEvent(c->s[GPU_MAIN], c->ev_join, 0), "join: cudaStreamWaitEvent");
}

extern "C" int gpu_host_fn(gpu_ctx *c, int stream, void (*fn)(void *), void *arg)
{
    if (c->rc)
        return c->rc;
    return gpu_check(c, cudaLaunchHostFunc(c->s[stream], fn, arg), "cudaLaunchHostFunc");
}

static int value32(gpu_ctx *c, pfn_value32 f, int stream, uint32_t *flag, uint32_t value, unsigned flags,
                   const char *what)
{
    if (c->rc)
        return c->rc;
    if (!f)
        return gpu_fail(c, what, "stream memory operations are not available from this driver");
    /* pinned host memory has the same address on the device (unified addressing) */
    CUresult r = f((CUstream)c->s[stream], (CUdeviceptr)(uintptr_t)flag, value, flags);
    if (r != CUDA_SUCCESS) {
        char why[64];
        snprintf(why, sizeof why, "driver error %d", (int)r);
        return gpu_fail(c, what, why);
    }
    return 0;
}

extern "C" int gpu_flag_write(gpu_ctx *c, int stream, uint32_t *flag, uint32_t value)
{
    load_mem_ops();
    return value32(c, p_write32, stream, flag, value, CU_STREAM_WRITE_VALUE_DEFAULT, "cuStreamWriteValue32");
}

extern "C" int gpu_flag_wait(gpu_ctx *c, int stream, uint32_t *flag, uint32_t value)
{
    load_mem_ops();
    return value32(c, p_wait32, stream, flag, value, CU_STREAM_WAIT_VALUE_EQ, "cuStreamWaitValue32");
}

/* ---- graphs ----------------------------------------------------------------------- */
struct gpu_graph {
    cudaGraph_t g;
    cudaGraphExec_t x;
};

extern "C" int gpu_capture_begin(gpu_ctx *c)
{
    if (c->rc)
        return c->rc;
    if (gpu_check(c, cudaStreamBeginCapture(c->s[GPU_MAIN], cudaStreamCaptureModeThreadLocal), "begin capture"))
        return c->rc;
    c->capturing = 1;
    return 0;
}

extern "C" int gpu_capture_end(gpu_ctx *c, gpu_graph **out)
{
    *out = NULL;
    if (!c->capturing)
        return gpu_fail(c, "end capture", "no capture in progress");
    c->capturing = 0;
    cudaGraph_t g = NULL;
    /* always end the capture, even after a failure, so the stream works again */
    cudaError_t e = cudaStreamEndCapture(c->s[GPU_MAIN], &g);
    if (c->rc || gpu_check(c, e, "end capture")) {
        if (g)
            cudaGraphDestroy(g);
        return c->rc;
    }
    gpu_graph *gr = (gpu_graph *)calloc(1, sizeof *gr);
    if (!gr) {
        cudaGraphDestroy(g);
        return gpu_fail(c, "end capture", "out of memory");
    }
    gr->g = g;
    if (gpu_check(c, cudaGraphInstantiate(&gr->x, g, 0), "cudaGraphInstantiate")) {
        cudaGraphDestroy(g);
        free(gr);
        return c->rc;
    }
    *out = gr;
    return 0;
}

extern "C" int gpu_graph_launch(gpu_ctx *c, gpu_graph *g)
{
    if (c->rc)
        return c->rc;
    return gpu_check(c, cudaGraphLaunch(g->x, c->s[GPU_MAIN]), "cudaGraphLaunch");
}

extern "C" int gpu_graph_count(const gpu_graph *g, gpu_graph_counts *out)
{
    memset(out, 0, sizeof *out);
    size_t n = 0;
    if (cudaGraphGetNodes(g->g, NULL, &n) != cudaSuccess)
        return plain_err(cudaGetLastError(), "cudaGraphGetNodes", NULL, 0);
    cudaGraphNode_t *nodes = (cudaGraphNode_t *)calloc(n ? n : 1, sizeof *nodes);
    if (!nodes)
        return TANDEM_ENOMEM;
    int rc = plain_err(cudaGraphGetNodes(g->g, nodes, &n), "cudaGraphGetNodes", NULL, 0);
    for (size_t i = 0; !rc && i < n; i++) {
        cudaGraphNodeType ty;
        if (cudaGraphNodeGetType(nodes[i], &ty) != cudaSuccess) {
            rc = plain_err(cudaGetLastError(), "cudaGraphNodeGetType", NULL, 0);
            break;
        }
        out->total++;
        if (ty == cudaGraphNodeTypeKernel)
            out->kernels++;
        else if (ty == cudaGraphNodeTypeHost)
            out->host++;
        else if (ty == cudaGraphNodeTypeMemcpy || ty == cudaGraphNodeTypeMemset ||
                 (int)ty == (int)CU_GRAPH_NODE_TYPE_BATCH_MEM_OP)
            out->mem++;
    }
    free(nodes);
    return rc;
}

extern "C" void gpu_graph_free(gpu_graph *g)
{
    if (!g)
        return;
    if (g->x)
        cudaGraphExecDestroy(g->x);
    if (g->g)
        cudaGraphDestroy(g->g);
    free(g);
}
