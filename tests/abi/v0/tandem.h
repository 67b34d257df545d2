/*
 * tandem.h - FROZEN copy of the 0.1.0 header for tests/abi (do not edit: a
 * program built against it must keep working with libtandem.so.0).
 * The public C API of tandem, a Mixture-of-Experts inference engine.
 *
 * Who owns what:
 *   - A tandem_engine is a loaded model: configuration, weights (mmap'd or
 *     converted at load), the CPU thread pool and the kernel choice. It is
 *     immutable after tandem_engine_open() returns and may be shared by many
 *     sessions. tandem_engine_close() frees it; close every session first.
 *   - A tandem_session is one or more timelines over an engine: a KV cache with
 *     a slot per sequence, the logits of the last forward, and all scratch
 *     memory, sized once at creation (no allocation per token). A session is
 *     used by one thread at a time.
 *   - Memory passed in (batches, paths) stays the caller's. Pointers returned
 *     (logits, info strings) stay valid until the next call on the same
 *     object or until it is freed.
 *
 * Errors: every fallible call returns 0 or a negative TANDEM_E* code and, when
 * err is not NULL, writes a message a user can act on into err[errlen]
 * ("model.safetensors: tensor 'model.layers.3.mlp.gate.weight' has shape
 * [8,64], expected [16,64]"). The library never exits or aborts on bad input.
 */
#ifndef TANDEM_H
#define TANDEM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- version -------------------------------------------------------------- *
 * The ABI of libtandem.so.MAJOR: within one MAJOR, symbols are only added and
 * the structs above only grow at their end, so a program built against an
 * older header of the same MAJOR runs on a newer library (tests/abi checks it
 * with a frozen copy of the 0.1 header). tandem_version() is the library's
 * own version, which may be newer than the header a program was built with. */
#define TANDEM_VERSION_MAJOR 0
#define TANDEM_VERSION_MINOR 1
#define TANDEM_VERSION_PATCH 0
#define TANDEM_VERSION "0.1.0"
#define TANDEM_VERSION_NUMBER (TANDEM_VERSION_MAJOR * 10000 + TANDEM_VERSION_MINOR * 100 + TANDEM_VERSION_PATCH)
const char *tandem_version(void);   /* "0.1.0" */
int tandem_version_number(void);    /* TANDEM_VERSION_NUMBER of the library */

/* ---- error codes ------------------------------------------------------- */
enum {
    TANDEM_OK           = 0,
    TANDEM_EINVAL       = -1, /* a bad argument from the caller */
    TANDEM_EIO          = -2, /* a file could not be opened, read or mapped */
    TANDEM_EFORMAT      = -3, /* a file is malformed, truncated or inconsistent */
    TANDEM_EUNSUPPORTED = -4, /* valid, but not supported (yet) */
    TANDEM_ENOMEM       = -5, /* out of memory */
    TANDEM_EFULL        = -6, /* KV cache or batch capacity exceeded */
    TANDEM_EGPU         = -7, /* a CUDA error */
};
const char *tandem_strerror(int code);

/* ---- logging ---------------------------------------------------------------- *
 * The library reports what it chose or worked around (kernel set, fallbacks,
 * warnings) through one sink: by default stderr as "tandem: LEVEL: message".
 * An embedder (a Python host, a server with its own log) sets a callback
 * instead; it gets one line without the newline, from any library thread, so
 * it must be thread-safe. fn = NULL restores stderr. Messages above the
 * level are not formatted at all. The level is process-wide; the `tandem`
 * command sets it from TANDEM_LOG. */
enum { TANDEM_LOG_ERROR = 0, TANDEM_LOG_WARN = 1, TANDEM_LOG_INFO = 2, TANDEM_LOG_DEBUG = 3 };
typedef void (*tandem_log_fn)(int level, const char *msg, void *user);
void tandem_set_log(tandem_log_fn fn, void *user);
void tandem_set_log_level(int level);  /* TANDEM_LOG_*; default TANDEM_LOG_WARN */
int tandem_log_level(void);
/* "error", "warn", "info" or "debug" -> TANDEM_LOG_*, or TANDEM_EINVAL */
int tandem_log_level_parse(const char *name);

/* ---- CPU kernels -------------------------------------------------------------- *
 * The CPU kernel set of engines opened afterwards: "ref" (plain C, the
 * reference every other set is tested against), "avx2", "avx512", "amx"; NULL
 * or "" = the best this CPU has (the default). Process-wide, like the log
 * level; the `tandem` command sets it from TANDEM_CPU. TANDEM_EINVAL for an
 * unknown name, TANDEM_EUNSUPPORTED for a set this CPU lacks.
 * (tandem_moe_params.isa chooses per MoE operator.) */
int tandem_set_cpu_kernels(const char *name, char *err, size_t errlen);

/* ---- engine -------------------------------------------------------------- */
typedef struct tandem_engine tandem_engine;

typedef struct {
    int n_threads;        /* CPU worker threads; 0 = one per online core */
    int dummy_weights;    /* nonzero: random weights at full size, no files read */
    uint64_t seed;        /* seed for dummy weights */
    int gpu;              /* -1 = use a GPU when one is there (default), 0 = CPU only,
                             1 = require a GPU (error without one) */
    int gpu_device;       /* CUDA device index */
    double gpu_mem_gb;    /* GPU memory budget for weights; 0 = all free memory less a reserve */
    int gpu_experts;      /* routed experts per MoE layer kept on the GPU (hot experts) */
    int cpu_experts;      /* format of CPU experts: TANDEM_FMT_* */
    int n_layer_limit;    /* > 0: build only the first N layers (benchmarks at full width) */
    int ignore_packs;     /* nonzero: pack the CPU experts in memory even where `tandem convert` wrote packs
                             (which are otherwise mapped, after checking they belong to this checkpoint) */
    int dummy_bf16_experts; /* with dummy_weights, for benchmarks of expert streaming only: also build the
                               routed experts as BF16 matrices (a full BF16 copy beside the packed one), since
                               streaming copies experts from BF16 source pages; otherwise dummy experts are
                               generated straight into their packed form */
    int defer_experts;    /* expert deferral d (0 = exact, the default): per token the d routed experts
                             of lowest router weight are deferred, their output added to the residual one
                             layer later (after the next layer's attention), so the CPU computes them while
                             the GPU runs that attention; applies to a MoE layer followed by a MoE layer;
                             0 <= d < experts per token (approximate: see bench/e2e.md for its cost) */
    const char *expert_counts; /* routing counts (tandem_save_route_counts) from which gpu_experts picks each
                                  layer's most chosen experts; NULL = MODEL/expert-counts.json when it exists,
                                  else experts 0..gpu_experts-1 of every layer */
    /* Called during load (and `tandem convert`) with what is being done ("loading", "packing"), the
     * fraction of it done (0..1) and the checkpoint bytes read for it so far, e.g. for a progress bar
     * with GB/s. */
    void (*progress)(const char *what, float done, double bytes, void *user);
    void *progress_user;
    double host_mem_gb;   /* host memory the memory plan is checked against (see tandem_plan_check);
                             0 = MemAvailable of /proc/meminfo */
    const char *moe_tune; /* settings of the CPU experts' tile kernels and schedule, "i4=0,mc=256" (the keys of
                             `tandem bench moe --tune`; i4=0: exact INT4 on AMX); NULL = defaults; read
                             during tandem_engine_open (the command takes it from TANDEM_MOE_TUNE) */
    int gpu_weights;      /* TANDEM_GPUW_*: the format of every non-expert matrix on the GPU (attention,
                             shared experts, dense MLPs, embeddings, lm_head; routers and MLA's kv_b stay
                             as stored); AUTO (0) = the widest that fits the GPU budget, said in the log */
} tandem_engine_params;

/* GPU weight formats: BF16 (F32 where stored so), or weight-only INT8 / INT4 / FP8 E4M3 with one fp32
 * scale per 128 columns of a row (FP8 checkpoints: their bytes and block scales as stored). */
enum { TANDEM_GPUW_AUTO = 0, TANDEM_GPUW_BF16 = 1, TANDEM_GPUW_INT8 = 2, TANDEM_GPUW_INT4 = 3, TANDEM_GPUW_FP8 = 4 };

/* CPU expert formats. BF16/INT8/INT4/FP8 pack the experts for the MoE
 * operator (src/cpu/moe; FP8 is E4M3 with block scales, as DeepSeek-V3 and
 * Kimi-K2 release their weights); F32 keeps the checkpoint's weights and runs
 * the reference loop with fp32 activations (exact; slow; for checking). */
enum { TANDEM_FMT_BF16 = 0, TANDEM_FMT_INT8 = 1, TANDEM_FMT_INT4 = 2, TANDEM_FMT_F32 = 3, TANDEM_FMT_FP8 = 4 };

void tandem_engine_params_default(tandem_engine_params *p);

/* Open the Hugging Face style model directory `path` (config.json and
 * model.safetensors or model.safetensors.index.json + shards). */
int tandem_engine_open(const char *path, const tandem_engine_params *p,
                       tandem_engine **out, char *err, size_t errlen);
void tandem_engine_close(tandem_engine *e);

typedef struct {
    const char *arch;         /* e.g. "Qwen3MoeForCausalLM" */
    const char *isa;          /* CPU kernels in use: "ref", "avx2", "avx512", "amx" */
    int n_layer, n_layer_moe;
    int d_model, n_vocab;
    int n_expert, n_expert_used, n_shared_expert;
    int max_ctx;              /* max_position_embeddings of the config */
    int n_threads;
    int64_t n_params;         /* all parameters */
    int64_t n_params_active;  /* parameters touched per token */
    int64_t weight_bytes;     /* bytes of weights as held in memory */
    int64_t kv_bytes_per_token; /* KV cache bytes per token of context, all layers */
    int n_head, n_kv_head;
    const char *attention;    /* "GQA" or "MLA" */
    const char *routing;      /* routing rule, in words */
    int gpu;                  /* 1: sessions run on the GPU, routed experts on the CPU (hybrid); 0: CPU only */
} tandem_model_info;

void tandem_engine_info(const tandem_engine *e, tandem_model_info *out);

/* ---- session ------------------------------------------------------------- */
typedef struct tandem_session tandem_session;

typedef struct {
    int n_seq;     /* sequences (KV slots), ids 0..n_seq-1; default 1 */
    int n_ctx;     /* tokens per sequence; 0 = min(model max, 4096) */
    int n_batch;   /* most tokens one forward may take; default 512 */
    int n_outputs; /* most tokens per forward whose logits are kept;
                      0 = n_batch, or fewer when that would pass 256 MB */
} tandem_session_params;

void tandem_session_params_default(tandem_session_params *p);
int tandem_session_create(tandem_engine *e, const tandem_session_params *p,
                          tandem_session **out, char *err, size_t errlen);
void tandem_session_free(tandem_session *s);

/* ---- forward ------------------------------------------------------------- *
 * A batch holds tokens of one or more sequences. Token i of sequence seq[i]
 * sits at position pos[i], which must be that sequence's current length when
 * the token is reached (tokens of one sequence appear in order; the KV cache
 * grows by one per token). want[i] != 0 asks for the logits of token i; with
 * want == NULL only the last token's logits are kept. */
typedef struct {
    int n_tokens;
    const int32_t *token;  /* [n_tokens] token ids */
    const int32_t *pos;    /* [n_tokens] positions */
    const int32_t *seq;    /* [n_tokens] sequence ids; NULL = all sequence 0 */
    const int8_t  *want;   /* [n_tokens] or NULL */
} tandem_batch;

int tandem_forward(tandem_session *s, const tandem_batch *b,
                   char *err, size_t errlen);

/* Logits [n_vocab] (fp32) of the i-th wanted token of the last forward, in
 * batch order; NULL when i is out of range. */
const float *tandem_logits(const tandem_session *s, int i);
int tandem_n_vocab(const tandem_engine *e);

/* Mean negative log-likelihood of tokens[1..n) given their prefixes, from an
 * empty cache for sequence seq (cleared first, left holding the n tokens).
 * n must fit the session's batch, context and outputs. */
int tandem_eval_nll(tandem_session *s, int seq, const int32_t *tokens, int n, double *nll, char *err,
                    size_t errlen);

/* Routing counts, for choosing the experts the GPU keeps (--gpu-experts).
 * With counting on, every forward adds, per MoE layer, how often the router
 * chose each expert (its top-k, deferred ones included). CPU sessions only:
 * a session on the GPU routes there (TANDEM_EUNSUPPORTED). Off frees them. */
int tandem_count_routes(tandem_session *s, int on, char *err, size_t errlen);
/* [n_layer][n_expert] counts (dense layers' rows zero), or NULL when off;
 * *tokens (if not NULL) gets the tokens counted. */
const int64_t *tandem_route_counts(const tandem_session *s, int64_t *tokens);
/* Write them as JSON, the file engine parameter expert_counts reads. */
int tandem_save_route_counts(const tandem_session *s, const char *path, char *err, size_t errlen);

/* ---- KV cache per sequence ---------------------------------------------- */
int tandem_kv_len(const tandem_session *s, int seq);
int tandem_kv_clear(tandem_session *s, int seq);            /* length -> 0 */
int tandem_kv_truncate(tandem_session *s, int seq, int len); /* keep [0,len) */

/* ---- text: tokenizer, streaming detokenizer, chat template -------------- *
 * Read from the model directory: tokenizer.json (or, where there is none,
 * tiktoken.model as Kimi-K2 ships it), tokenizer_config.json (and
 * chat_template.jinja when present); or from a .gguf file's tokenizer.*
 * metadata when model_dir is that file. Independent of the engine. */
typedef struct tandem_tokenizer tandem_tokenizer;

int tandem_tokenizer_open(const char *model_dir, tandem_tokenizer **out, char *err, size_t errlen);
void tandem_tokenizer_close(tandem_tokenizer *t);
int tandem_tokenizer_n_vocab(const tandem_tokenizer *t);

/* Encode len bytes of text. add_special: add BOS etc. as the model's
 * post-processor does. Writes at most cap ids; *n_out gets the full count. */
int tandem_tokenize(const tandem_tokenizer *t, const char *text, size_t len, int add_special, int32_t *ids, int cap,
                    int *n_out, char *err, size_t errlen);
/* Nonzero when id ends a generation (eos, <|im_end|>, <|endoftext|> ...). */
int tandem_token_is_eog(const tandem_tokenizer *t, int32_t id);
/* Id of an exact token string (a special token such as "<|im_end|>"), or -1. */
int32_t tandem_token_id(const tandem_tokenizer *t, const char *text);

/* Streaming decode: complete UTF-8 only; a partial character is held back. */
typedef struct tandem_detok tandem_detok;
int tandem_detok_create(const tandem_tokenizer *t, int skip_special, tandem_detok **out);
void tandem_detok_free(tandem_detok *d);
/* Feed one id; writes up to cap bytes of new text, returns the count or < 0. */
int tandem_detok_push(tandem_detok *d, int32_t id, char *out, size_t cap);
int tandem_detok_flush(tandem_detok *d, char *out, size_t cap);

/* Render the model's chat template. messages_json: a JSON array of
 * {"role", "content", ...}; tools_json and extra_json (an object merged into
 * the template context, e.g. {"enable_thinking": false}) may be NULL.
 * *out is malloc'd; free() it. */
int tandem_chat_render(const tandem_tokenizer *t, const char *messages_json, const char *tools_json,
                       int add_generation_prompt, const char *extra_json, char **out, char *err, size_t errlen);
int tandem_has_chat_template(const tandem_tokenizer *t);

/* ---- sampling -------------------------------------------------------------- */
typedef struct {
    float temperature;        /* 0 = greedy */
    int top_k;                /* 0 = off */
    float top_p;              /* 1 = off */
    float min_p;              /* 0 = off */
    float repeat_penalty;     /* 1 = off; divides positive logits of seen tokens */
    float presence_penalty;   /* 0 = off; subtracted once per seen token */
    float frequency_penalty;  /* 0 = off; subtracted per occurrence */
    int penalty_last_n;       /* window of history the penalties look at; 0 = all */
    uint64_t seed;
} tandem_sampling;

void tandem_sampling_default(tandem_sampling *p); /* greedy, no penalties */

typedef struct tandem_sampler tandem_sampler;
int tandem_sampler_create(const tandem_sampling *p, int n_vocab, int max_history, tandem_sampler **out,
                          char *err, size_t errlen);
void tandem_sampler_free(tandem_sampler *s);
/* Pick a token from logits [n_vocab] (not modified). Also returns, when
 * logprob is not NULL, log-softmax of the raw logits at the chosen id. */
int32_t tandem_sample(tandem_sampler *s, const float *logits, float *logprob);
/* Record a token (prompt or generated) in the penalty history. */
void tandem_sampler_accept(tandem_sampler *s, int32_t id);
void tandem_sampler_reset(tandem_sampler *s);

/* ---- placement and conversion ------------------------------------------- */
/* Write the placement plan (what runs on the GPU and the CPU) to out, a FILE *. */
void tandem_print_placement(const tandem_engine *e, void *out);

/* `tandem convert`: pack the routed experts of the model in `path` into the
 * CPU format p->cpu_experts (TANDEM_FMT_BF16/INT8/INT4/FP8) and save them
 * under path/packed-FMT-pN/ (N = NUMA partitions) with a manifest of the
 * checkpoint they came from, so later loads with the same format map them
 * instead of packing (and refuse them once the checkpoint changes). One layer
 * at a time, each file written whole and renamed into place: a conversion cut
 * short resumes where it stopped, re-packing only missing or unreadable
 * layers. A directory made from another checkpoint is an error unless
 * repack, which rebuilds it. p's n_threads and progress apply. */
int tandem_convert_experts(const char *path, const tandem_engine_params *p, int repack, char *err, size_t errlen);

/* ---- memory plan ------------------------------------------------------------ *
 * What a run needs, host and GPU, item by item, computed from config.json
 * (and, when the checkpoint is there, its safetensors headers for the dtypes;
 * no weight is read or allocated): routed experts in the CPU format, the
 * non-expert weights as held, converted copies, the KV cache at n_ctx,
 * scratch, pinned staging, GPU weights, activations and workspaces.
 * tandem_engine_open() and tandem_session_create() check their part against
 * free memory (engine parameter host_mem_gb, else MemAvailable) before
 * allocating, and fail with TANDEM_ENOMEM and one message saying what is
 * needed, what is there, the biggest items and an option that would fit. */
enum { TANDEM_PLAN_HOST = 0, TANDEM_PLAN_GPU = 1 };
enum { TANDEM_PLAN_ENGINE = 0, TANDEM_PLAN_SESSION = 1 };
#define TANDEM_PLAN_MAX_ITEMS 32

typedef struct {
    const char *name;     /* what it is, e.g. "routed experts" (a static string) */
    char detail[112];     /* how it is made up, e.g. "58 layers x 256 experts x 27.5 MB, int4 packed" */
    int where;            /* TANDEM_PLAN_HOST or TANDEM_PLAN_GPU */
    int part;             /* TANDEM_PLAN_ENGINE (once, at load) or TANDEM_PLAN_SESSION (per session) */
    int counted;          /* 0: shown, not in the totals (file pages read once for the GPU upload,
                             which the kernel may drop) */
    int approx;           /* 1: an estimate, not the size of an allocation tandem makes */
    int ctx_scaled;       /* grows with n_ctx (KV cache, attention scratch) */
    int64_t bytes;
} tandem_plan_item;

typedef struct {
    int n_items;
    tandem_plan_item item[TANDEM_PLAN_MAX_ITEMS];
    int64_t host_bytes[2];      /* counted host bytes: [TANDEM_PLAN_ENGINE], [TANDEM_PLAN_SESSION] */
    int64_t gpu_bytes[2];       /* the same on the GPU */
    int gpu;                    /* 1: the hybrid plan (GPU + CPU); 0: CPU only */
    int cpu_experts;            /* TANDEM_FMT_* of the CPU experts */
    int gpu_experts;            /* routed experts per MoE layer on the GPU */
    int n_ctx, n_seq, n_batch, n_threads, n_parts;
    int n_moe_layers, n_expert;
    int64_t expert_bytes[5];    /* one routed expert as the CPU holds it, per TANDEM_FMT_* (0: not possible) */
    int64_t gpu_expert_bytes;   /* one routed expert on the GPU */
    const char *dtypes_from;    /* "safetensors headers", "config.json" or "dummy weights" */
    const char *expert_dtype;   /* the routed experts as the checkpoint stores them ("BF16", "F8_E4M3", "INT4-G32" ...) */
    char note[240];             /* what is approximate or not possible, in words ("" when nothing) */
    char arch[64];              /* architectures[0] (model.arch points here) */
    tandem_model_info model;    /* what tandem_engine_info() says, without an engine (isa: the kernels
                                   this machine would use; weight_bytes: the weights as held) */
    int gpu_weights;            /* TANDEM_GPUW_* the plan holds the GPU's non-expert weights in */
    int64_t gpu_weight_bytes[5]; /* those weights in each TANDEM_GPUW_* (index 0: unused) */
} tandem_plan;

/* The plan for the model directory `path` (config.json; the safetensors
 * headers too when present and not dummy_weights) under ep and sp (NULL:
 * defaults). ep->gpu == 1 plans the hybrid run (GPU + CPU), 0 the CPU-only
 * run, -1 the hybrid run where a CUDA device is there; the layer limit,
 * formats, threads and gpu_experts apply. */
int tandem_plan_make(const char *path, const tandem_engine_params *ep, const tandem_session_params *sp,
                     tandem_plan *out, char *err, size_t errlen);
/* Write the plan, item by item, to out (a FILE *). */
void tandem_plan_print(const tandem_plan *p, void *out);
/* Check the whole plan against host_gb (0 = MemAvailable) and gpu_gb (0 = the
 * GPU is not checked): 0, or TANDEM_ENOMEM with the message. */
int tandem_plan_check(const tandem_plan *p, double host_gb, double gpu_gb, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif
#endif
