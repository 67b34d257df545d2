/*
 * jinja_impl.h - internals shared by the jinja_*.c files (not a public API).
 *
 * Pipeline: jinja_lex.c turns the source into tokens (whitespace control,
 * trim_blocks and lstrip_blocks applied exactly as jinja2's lexer does),
 * jinja_parse.c builds the syntax tree (jinja_node), jinja_eval.c renders it.
 * Values (jinja_val) follow Python semantics: jinja_value.c has printing,
 * comparison and JSON; jinja_str.c the str methods; jinja_filters.c the
 * filters and tests; jinja_methods.c bound methods and the global functions.
 *
 * Invariants:
 *   - Memory: everything of a parse lives in the template's arena, everything
 *     of a render in the render's arena; nothing is freed individually, so
 *     values are plain structs that may share pointers freely. Lists, dicts
 *     and strings are immutable once built (the sandbox forbids mutation);
 *     only namespaces (JV_NS) and the loop object change in place.
 *   - Strings are valid UTF-8 (the template is checked at parse time and
 *     jansson guarantees it for the context), not NUL-terminated; lengths
 *     are in bytes, Python indices are in code points.
 *   - Errors unwind with longjmp to the jinja_err of the current parse or
 *     render (as Lua does), so the code between reads straight; everything
 *     allocated is in the arena, which the catcher frees.
 */
#ifndef TD_JINJA_IMPL_H
#define TD_JINJA_IMPL_H

#include <setjmp.h>
#include <stdint.h>
#include <stddef.h>

#include "core/err.h"
#include "tokenizer/jinja.h"

/* ---- errors -------------------------------------------------------------- */
typedef struct jinja_err {
    jmp_buf jb;
    int code;
    char *msg;
    size_t msglen;
} jinja_err;

/* Write "chat template line N: <msg>" (line <= 0: no line) and longjmp. */
_Noreturn void jinja_fail(jinja_err *e, int code, int line, const char *fmt, ...) TD_PRINTF(4, 5);

/* ---- arena --------------------------------------------------------------- */
typedef struct jinja_chunk jinja_chunk;
typedef struct jinja_arena {
    jinja_chunk *head;
    size_t total;   /* bytes taken from malloc */
    size_t limit;   /* a render past this fails with TANDEM_ENOMEM */
    jinja_err *e;
} jinja_arena;

void jinja_arena_init(jinja_arena *a, jinja_err *e, size_t limit);
void jinja_arena_free(jinja_arena *a);
void *jinja_alloc(jinja_arena *a, size_t n);  /* 16-byte aligned, not zeroed */
void *jinja_zalloc(jinja_arena *a, size_t n);
char *jinja_strndup(jinja_arena *a, const char *s, size_t n);  /* NUL-terminated copy */

/* ---- values -------------------------------------------------------------- */
enum {
    JV_UNDEF,   /* jinja2.Undefined: prints "", falsy, most operations fail */
    JV_NONE,
    JV_BOOL,    /* u.i is 0 or 1 */
    JV_INT,
    JV_FLOAT,
    JV_STR,
    JV_LIST,    /* flag JVF_TUPLE: a tuple (prints with parentheses) */
    JV_DICT,    /* insertion-ordered, like a Python dict */
    JV_NS,      /* namespace(): u.d holds its attributes, mutable */
    JV_MACRO,   /* a macro or a call block's caller */
    JV_FUNC,    /* a builtin function or a bound method */
    JV_LOOP,    /* the `loop` object of a for loop */
};
#define JVF_TUPLE  1  /* JV_LIST */
#define JVF_MARKUP 1  /* JV_STR: markupsafe.Markup (from |safe, |escape) */

/* JV_UNDEF's `owner`: how the value came to be undefined, for messages. */
#define JU_NAME    0xff  /* u.name is a variable name: "'x' is undefined" */
#define JU_HINT    0xfe  /* u.name is a complete message */
#define JU_MISSING 0xfd  /* an argument that was not passed (jinja_bind) */
/* otherwise owner is the JV_* type lacking attribute/key u.name */

typedef struct jinja_list jinja_list;
typedef struct jinja_dict jinja_dict;
typedef struct jinja_macro jinja_macro;
typedef struct jinja_func jinja_func;
typedef struct jinja_loop jinja_loop;

typedef struct jinja_val {
    uint8_t t;
    uint8_t flag;
    uint8_t owner;
    union {
        int64_t i;
        double f;
        struct { const char *p; size_t n; } s;
        jinja_list *l;
        jinja_dict *d;
        jinja_macro *m;
        jinja_func *fn;
        jinja_loop *loop;
        const char *name;
    } u;
} jinja_val;

struct jinja_list { size_t n, cap; jinja_val *v; };
struct jinja_dict { size_t n, cap; jinja_val *k, *v; };

/* Arguments of a call: positional, then keyword. */
typedef struct jinja_args {
    int n;
    const jinja_val *v;
    int nkw;
    const char *const *kwn;
    const jinja_val *kwv;
} jinja_args;

struct jinja_rt;
typedef jinja_val (*jinja_fn)(struct jinja_rt *rt, jinja_val self, const jinja_args *a);

struct jinja_func { jinja_fn fn; jinja_val self; const char *name; };

struct jinja_loop {
    const jinja_list *items;
    int64_t i;           /* index0 of the current item */
    int depth0;
    int has_changed;     /* loop.changed() state */
    jinja_list *changed;
};

struct jinja_frame;
struct jinja_node;
struct jinja_macro { const struct jinja_node *node; struct jinja_frame *closure; };

static inline jinja_val jinja_none(void) { jinja_val v = {0}; v.t = JV_NONE; return v; }
static inline jinja_val jinja_bool(int b) { jinja_val v = {0}; v.t = JV_BOOL; v.u.i = !!b; return v; }
static inline jinja_val jinja_int(int64_t i) { jinja_val v = {0}; v.t = JV_INT; v.u.i = i; return v; }
static inline jinja_val jinja_float(double f) { jinja_val v = {0}; v.t = JV_FLOAT; v.u.f = f; return v; }
static inline jinja_val jinja_str(const char *p, size_t n)
{
    jinja_val v = {0};
    v.t = JV_STR;
    v.u.s.p = p;
    v.u.s.n = n;
    return v;
}
static inline jinja_val jinja_undef_name(const char *name)
{
    jinja_val v = {0};
    v.t = JV_UNDEF;
    v.owner = JU_NAME;
    v.u.name = name;
    return v;
}
static inline jinja_val jinja_undef_hint(const char *hint)
{
    jinja_val v = {0};
    v.t = JV_UNDEF;
    v.owner = JU_HINT;
    v.u.name = hint;
    return v;
}
static inline jinja_val jinja_undef_attr(int owner_type, const char *name)
{
    jinja_val v = {0};
    v.t = JV_UNDEF;
    v.owner = (uint8_t)owner_type;
    v.u.name = name;
    return v;
}
static inline jinja_val jinja_missing(void)
{
    jinja_val v = {0};
    v.t = JV_UNDEF;
    v.owner = JU_MISSING;
    return v;
}
static inline jinja_val jinja_list_val(jinja_list *l, int tuple)
{
    jinja_val v = {0};
    v.t = JV_LIST;
    v.flag = tuple ? JVF_TUPLE : 0;
    v.u.l = l;
    return v;
}
static inline jinja_val jinja_dict_val(jinja_dict *d) { jinja_val v = {0}; v.t = JV_DICT; v.u.d = d; return v; }
static inline int jinja_is_num(jinja_val v) { return v.t == JV_BOOL || v.t == JV_INT || v.t == JV_FLOAT; }
static inline double jinja_num(jinja_val v) { return v.t == JV_FLOAT ? v.u.f : (double)v.u.i; }

jinja_val jinja_cstr(const char *s);  /* NUL-terminated, not copied */

jinja_list *jinja_list_new(jinja_arena *a, size_t cap);
void jinja_list_push(jinja_arena *a, jinja_list *l, jinja_val v);
jinja_dict *jinja_dict_new(jinja_arena *a, size_t cap);
/* Insert or replace (Python key equality: 1 == 1.0 == True). */
void jinja_dict_put(jinja_arena *a, jinja_dict *d, jinja_val k, jinja_val v);
int jinja_dict_find(const jinja_dict *d, jinja_val k, size_t *idx);
int jinja_dict_get_s(const jinja_dict *d, const char *k, size_t n, jinja_val *out);

/* A growable byte buffer in an arena (doubling, so the waste is bounded). */
typedef struct jinja_buf { jinja_arena *a; char *p; size_t n, cap; } jinja_buf;
void jinja_buf_init(jinja_buf *b, jinja_arena *a);
void jinja_buf_put(jinja_buf *b, const void *s, size_t n);
void jinja_buf_putc(jinja_buf *b, char c);
void jinja_buf_puts(jinja_buf *b, const char *s);
static inline jinja_val jinja_buf_val(const jinja_buf *b) { return jinja_str(b->p ? b->p : "", b->n); }

/* UTF-8 (input is valid). */
uint32_t jinja_utf8_next(const char *p, size_t n, size_t *i);
void jinja_utf8_put(jinja_buf *b, uint32_t cp);
size_t jinja_utf8_count(const char *p, size_t n);
int jinja_utf8_valid(const char *p, size_t n);
int jinja_py_isspace(uint32_t cp);  /* Python str.isspace() for one code point */

/* Python semantics. */
int jinja_truthy(jinja_val v);
int jinja_eq(jinja_val a, jinja_val b);
int jinja_hashable(jinja_val v);
const char *jinja_type_name(jinja_val v);  /* Python type name: 'str', 'NoneType' ... */
void jinja_str_of(jinja_buf *b, jinja_val v);   /* str(v) */
void jinja_repr_of(jinja_buf *b, jinja_val v);  /* repr(v) */
void jinja_float_repr(char out[40], double f);  /* repr(float) */
/* The message an undefined value raises when used ("'x' is undefined"). */
const char *jinja_undef_msg(jinja_arena *a, jinja_val v);

jinja_val jinja_from_json(jinja_arena *a, const json_t *j);

/* ---- syntax tree ----------------------------------------------------------- */
enum {
    /* statements */
    JN_BODY,       /* kids: statements */
    JN_DATA,       /* cval: text */
    JN_PRINT,      /* a: expression */
    JN_IF,         /* kids: test0, body0, test1, body1 ...; c: else body or NULL */
    JN_FOR,        /* a: target, b: iterable, c: filter or NULL, d: body, e: else or NULL */
    JN_SET,        /* a: target (NAME, NSREF or TUPLE), b: value */
    JN_SETBLOCK,   /* a: target, b: filter chain or NULL, d: body */
    JN_MACRO,      /* name; kids: params (NAME); kw[i]: default of kids[i] or NULL; d: body */
    JN_CALLBLOCK,  /* a: the call; kids/kw: caller params/defaults; d: body */
    JN_FILTERBLOCK,/* b: filter chain (innermost a == NULL); d: body */
    JN_WITH,       /* kids: target0, value0, ...; d: body */
    JN_BREAK,
    JN_CONTINUE,
    /* expressions */
    JN_CONST,      /* cval */
    JN_NAME,       /* name */
    JN_NSREF,      /* name.attr (assignment target only) */
    JN_TUPLE,      /* kids */
    JN_LIST,       /* kids */
    JN_DICT,       /* kids: key0, value0, ... */
    JN_GETATTR,    /* a.name */
    JN_GETITEM,    /* a[b] */
    JN_SLICE,      /* a:b:c, each may be NULL */
    JN_CALL,       /* a(kids..., kwn=kw...) */
    JN_FILTER,     /* a|name(kids..., kwn=kw...); id: filter index */
    JN_TEST,       /* a is name(kids...); id: test index */
    JN_NOT,
    JN_NEG,
    JN_POS,
    JN_BINOP,      /* a op b, op: JO_* */
    JN_AND,
    JN_OR,
    JN_CONCAT,     /* kids joined with ~ */
    JN_COMPARE,    /* a ops[0] kids[0] ops[1] kids[1] ... */
    JN_CONDEXPR,   /* b if a else c (c may be NULL) */
};

enum { JO_ADD, JO_SUB, JO_MUL, JO_DIV, JO_FLOORDIV, JO_MOD, JO_POW };
enum { JC_EQ, JC_NE, JC_LT, JC_LE, JC_GT, JC_GE, JC_IN, JC_NOTIN };

/* JN_MACRO / JN_CALLBLOCK flags: names the body reads. */
#define JNF_CALLER  1
#define JNF_VARARGS 2
#define JNF_KWARGS  4
/* JN_FOR flag: the body defines a macro or call block, whose closure may
 * keep the iteration's frame alive, so each iteration needs its own frame. */
#define JNF_CAPTURES 8

typedef struct jinja_node {
    uint8_t kind;
    uint8_t op;
    uint16_t flags;
    int line;
    int id;
    const char *name;   /* NUL-terminated */
    const char *attr;   /* JN_NSREF */
    jinja_val cval;
    struct jinja_node *a, *b, *c, *d, *e;
    struct jinja_node **kids;
    int nkids;
    struct jinja_node **kw;
    const char **kwn;
    int nkw;
    uint8_t *ops;       /* JN_COMPARE */
} jinja_node;

struct jinja_tmpl {
    jinja_arena arena;
    jinja_err err;      /* only used while parsing */
    char *src;
    jinja_node *root;   /* JN_BODY */
};

/* ---- lexer --------------------------------------------------------------- */
enum {
    JT_DATA, JT_VAR_BEGIN, JT_VAR_END, JT_BLOCK_BEGIN, JT_BLOCK_END,
    JT_NAME, JT_STRING, JT_INT, JT_FLOAT, JT_OP, JT_EOF,
};
enum {
    JP_ADD, JP_SUB, JP_DIV, JP_FLOORDIV, JP_MUL, JP_MOD, JP_POW, JP_TILDE,
    JP_LBRACKET, JP_RBRACKET, JP_LPAREN, JP_RPAREN, JP_LBRACE, JP_RBRACE,
    JP_EQ, JP_NE, JP_GT, JP_GTEQ, JP_LT, JP_LTEQ, JP_ASSIGN, JP_DOT, JP_COLON,
    JP_PIPE, JP_COMMA, JP_SEMICOLON,
};

typedef struct jinja_tok {
    uint8_t type;
    uint8_t op;        /* JT_OP */
    int line;
    const char *p;     /* DATA, NAME, STRING (decoded): NUL-terminated in the arena */
    size_t n;
    int64_t i;
    double f;
} jinja_tok;

/* Tokenize src[len] into *toks (arena), ending with JT_EOF. */
void jinja_lex(jinja_arena *a, const char *src, size_t len, jinja_tok **toks, size_t *ntoks);

/* ---- parser -------------------------------------------------------------- */
jinja_node *jinja_parse_tokens(jinja_arena *a, const jinja_tok *toks, size_t ntoks);

/* ---- runtime ------------------------------------------------------------- */
typedef struct jinja_frame {
    struct jinja_frame *parent;
    size_t n, cap;
    const char **names;
    jinja_val *vals;
} jinja_frame;

typedef struct jinja_rt {
    jinja_err *e;
    jinja_arena *a;
    const jinja_dict *ctx;  /* the render's context variables */
    int line;          /* line of the node being evaluated, for messages */
    int depth;         /* nesting of evaluation, bounded */
    uint64_t steps;    /* evaluation steps, bounded */
} jinja_rt;

/* Render the template body root into out (jinja_eval.c). */
void jinja_exec_root(jinja_rt *rt, const jinja_node *root, jinja_buf *out);

_Noreturn void jinja_rt_fail(jinja_rt *rt, int code, const char *fmt, ...) TD_PRINTF(3, 4);
/* Fail with the message of undefined value v ("'x' is undefined"). */
_Noreturn void jinja_rt_undef(jinja_rt *rt, jinja_val v);

jinja_val jinja_call(jinja_rt *rt, jinja_val callee, const jinja_args *a);
jinja_val jinja_getattr(jinja_rt *rt, jinja_val obj, const char *name);
jinja_val jinja_getitem(jinja_rt *rt, jinja_val obj, jinja_val key);
/* Items of an iterable (list, tuple, dict keys, str chars, undefined: none). */
const jinja_list *jinja_iter(jinja_rt *rt, jinja_val v);
/* str(v) as a string value (no copy when v is a string). */
jinja_val jinja_to_str(jinja_rt *rt, jinja_val v);
/* Python ordering (<): -1, 0, 1; fails on unorderable types. */
int jinja_cmp(jinja_rt *rt, jinja_val a, jinja_val b);
/* Arithmetic as in Python (op: JO_*), shared by the evaluator and filters. */
jinja_val jinja_binop(jinja_rt *rt, int op, jinja_val a, jinja_val b);
/* json.dumps(v, ensure_ascii, indent, separators, sort_keys) into b. */
typedef struct jinja_json_opts {
    int ensure_ascii, sort_keys;
    const char *indent;     /* NULL: one line */
    size_t indent_n;
    const char *item_sep, *key_sep;
    size_t item_sep_n, key_sep_n;
} jinja_json_opts;
void jinja_tojson(jinja_rt *rt, jinja_buf *b, jinja_val v, const jinja_json_opts *o);

/* Bind a's arguments to the parameter names params[] (NULL-terminated):
 * out[i] gets the value or jinja_missing(). Fails on unknown keywords, too
 * many positionals or a doubly given parameter (fname names the callee).
 * Returns the bit mask of the parameters given. */
unsigned jinja_bind(jinja_rt *rt, const jinja_args *a, const char *fname,
                    const char *const *params, jinja_val *out);

/* Filters and tests: lookup by name at parse time (>= 0: index; -1 unknown;
 * -2 a Jinja builtin this interpreter does not implement). */
int jinja_filter_lookup(const char *name);
jinja_val jinja_filter_apply(jinja_rt *rt, int id, jinja_val in, const jinja_args *a);
int jinja_test_lookup(const char *name);
int jinja_test_apply(jinja_rt *rt, int id, jinja_val in, const jinja_args *a);

/* Methods of builtin types (str.upper, dict.get, ...) as bound functions. */
int jinja_method(jinja_rt *rt, jinja_val obj, const char *name, jinja_val *out);
/* Global functions (range, namespace, dict, raise_exception, ...). */
int jinja_global(const char *name, jinja_val *out);

/* str methods shared by methods and filters (jinja_str.c). */
jinja_val jinja_s_strip(jinja_rt *rt, jinja_val s, jinja_val chars, int left, int right);
jinja_val jinja_s_case(jinja_rt *rt, jinja_val s, int upper);
jinja_val jinja_s_capitalize(jinja_rt *rt, jinja_val s);
jinja_val jinja_s_title_py(jinja_rt *rt, jinja_val s);
jinja_val jinja_s_replace(jinja_rt *rt, jinja_val s, jinja_val old, jinja_val new_, int64_t count);
jinja_val jinja_s_split(jinja_rt *rt, jinja_val s, jinja_val sep, int64_t maxsplit, int right);
jinja_val jinja_s_splitlines(jinja_rt *rt, jinja_val s, int keepends);
int64_t jinja_s_find(jinja_val s, jinja_val sub, int right);  /* code point index or -1 */
int jinja_s_startswith(jinja_val s, jinja_val prefix, int end);
/* s[lo:hi:step] with indices already normalised (jinja_slice_indices). */
jinja_val jinja_s_slice(jinja_rt *rt, jinja_val s, int64_t lo, int64_t hi, int64_t step);
jinja_val jinja_s_escape(jinja_rt *rt, jinja_val s);  /* markupsafe.escape */
jinja_val jinja_s_percent(jinja_rt *rt, jinja_val fmt, jinja_val args);  /* fmt % args */
jinja_val jinja_s_format(jinja_rt *rt, jinja_val fmt, const jinja_args *a);  /* str.format */
/* Python slice index normalisation for a sequence of length n. */
void jinja_slice_indices(jinja_rt *rt, int64_t n, jinja_val start, jinja_val stop, jinja_val step,
                         int64_t *ostart, int64_t *ostop, int64_t *ostep, int64_t *olen);

#endif
