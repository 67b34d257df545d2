/*
 * jinja_parse.c - the template parser: tokens to a syntax tree (jinja_node).
 *
 * A recursive-descent port of jinja2's Parser with the same precedence:
 *   condexpr (a if b else c) < or < and < not < compare (==, in, not in ...)
 *   < + - < ~ < * / // % < ** (left-associative, as in Jinja) < unary - +
 *   < primary with postfix .attr [item] (call) and then |filter / is test.
 * Statements: if/elif/else, for (targets, "if" filter, else), set (also
 * block set and namespace attributes), macro, call, filter, with, print,
 * break/continue (loopcontrols) and transformers' {% generation %}.
 * extends/block/include/import/from and recursive loops are reported as not
 * supported. Unknown filter/test names fail here, except directly inside an
 * if or a conditional expression where jinja2 defers them to run time; names
 * of jinja2 builtins we do not implement fail only when evaluated, so a
 * template can still render on paths that avoid them.
 * Nesting is bounded (MAX_DEPTH) so hostile input cannot exhaust the stack.
 */
#include "tokenizer/jinja_impl.h"

#include <string.h>

#define MAX_DEPTH 200

typedef struct parser {
    jinja_arena *a;
    const jinja_tok *t;
    size_t n, pos;
    int depth;
    int in_loop;   /* break/continue allowed */
    int soft;      /* directly inside an if or a conditional expression */
    const char *tags[MAX_DEPTH];  /* open block tags, innermost last */
    int ntags;
} parser;

static const jinja_tok *cur(parser *P) { return &P->t[P->pos]; }
static const jinja_tok *look(parser *P) { return &P->t[P->pos + (P->pos + 1 < P->n)]; }
static const jinja_tok *next_tok(parser *P)
{
    const jinja_tok *t = &P->t[P->pos];
    if (P->pos + 1 < P->n)
        P->pos++;
    return t;
}

static const char *describe(const jinja_tok *t)
{
    static const char *ops[] = {"+", "-", "/", "//", "*", "%", "**", "~", "[", "]", "(", ")", "{", "}",
                                "==", "!=", ">", ">=", "<", "<=", "=", ".", ":", "|", ",", ";"};
    switch (t->type) {
    case JT_DATA: return "template data";
    case JT_VAR_BEGIN: return "begin of print statement";
    case JT_VAR_END: return "end of print statement";
    case JT_BLOCK_BEGIN: return "begin of statement block";
    case JT_BLOCK_END: return "end of statement block";
    case JT_NAME: return t->p;
    case JT_STRING: return "string";
    case JT_INT: return "integer";
    case JT_FLOAT: return "float";
    case JT_OP: return ops[t->op];
    default: return "end of template";
    }
}

static _Noreturn void pfail_code(parser *P, int code, int line, const char *fmt, const char *a1, const char *a2)
{
    jinja_fail(P->a->e, code, line, fmt, a1, a2);
}

static _Noreturn void pfail(parser *P, const char *fmt, const char *a1, const char *a2)
{
    pfail_code(P, TANDEM_EFORMAT, cur(P)->line, fmt, a1, a2);
}

static int is_name(const jinja_tok *t, const char *s) { return t->type == JT_NAME && strcmp(t->p, s) == 0; }
static int is_op(const jinja_tok *t, int op) { return t->type == JT_OP && t->op == op; }

static int skip_name(parser *P, const char *s)
{
    if (!is_name(cur(P), s))
        return 0;
    next_tok(P);
    return 1;
}

static int skip_op(parser *P, int op)
{
    if (!is_op(cur(P), op))
        return 0;
    next_tok(P);
    return 1;
}

static void expect_op(parser *P, int op, const char *what)
{
    if (!skip_op(P, op))
        pfail(P, "expected token '%s', got '%s'", what, describe(cur(P)));
}

static void expect_type(parser *P, int type, const char *what)
{
    if (cur(P)->type != type)
        pfail(P, "expected token '%s', got '%s'", what, describe(cur(P)));
    next_tok(P);
}

static const char *expect_name(parser *P)
{
    if (cur(P)->type != JT_NAME)
        pfail(P, "expected token 'name', got '%s'%s", describe(cur(P)), "");
    return next_tok(P)->p;
}

static jinja_node *mk(parser *P, int kind, int line)
{
    jinja_node *n = jinja_zalloc(P->a, sizeof *n);
    n->kind = (uint8_t)kind;
    n->line = line;
    return n;
}

/* A growable array of node pointers. */
typedef struct nvec { jinja_node **v; int n, cap; } nvec;

static void nv_push(parser *P, nvec *v, jinja_node *x)
{
    if (v->n == v->cap) {
        int cap = v->cap ? v->cap * 2 : 4;
        jinja_node **nv = jinja_alloc(P->a, (size_t)cap * sizeof *nv);
        if (v->n)
            memcpy(nv, v->v, (size_t)v->n * sizeof *nv);
        v->v = nv;
        v->cap = cap;
    }
    v->v[v->n++] = x;
}

static void enter(parser *P)
{
    if (++P->depth > MAX_DEPTH)
        pfail_code(P, TANDEM_EFORMAT, cur(P)->line, "template nested too deeply%s%s", "", "");
}

/* ---- expressions --------------------------------------------------------- */

static jinja_node *parse_expression(parser *P, int with_condexpr);
static jinja_node *parse_unary(parser *P, int with_filter);
static jinja_node *parse_primary(parser *P, int with_namespace);
static jinja_node *parse_postfix(parser *P, jinja_node *node);
static jinja_node *parse_filter(parser *P, jinja_node *node, int start_inline);

static int is_tuple_end(parser *P, const char *extra)
{
    const jinja_tok *t = cur(P);
    if (t->type == JT_VAR_END || t->type == JT_BLOCK_END || is_op(t, JP_RPAREN))
        return 1;
    return extra && is_name(t, extra);
}

/* simplified: names and literals only (assignment targets). */
static jinja_node *parse_tuple(parser *P, int simplified, int with_condexpr, const char *extra_end,
                               int explicit_parens, int with_namespace)
{
    int line = cur(P)->line;
    nvec args = {0};
    int is_tuple = 0;
    for (;;) {
        if (args.n)
            expect_op(P, JP_COMMA, ",");
        if (is_tuple_end(P, extra_end))
            break;
        nv_push(P, &args, simplified ? parse_primary(P, with_namespace) : parse_expression(P, with_condexpr));
        if (is_op(cur(P), JP_COMMA))
            is_tuple = 1;
        else
            break;
        line = cur(P)->line;
    }
    if (!is_tuple) {
        if (args.n)
            return args.v[0];
        if (!explicit_parens)
            pfail(P, "Expected an expression, got '%s'%s", describe(cur(P)), "");
    }
    jinja_node *n = mk(P, JN_TUPLE, line);
    n->kids = args.v;
    n->nkids = args.n;
    return n;
}

static jinja_node *parse_condexpr(parser *P)
{
    int line = cur(P)->line;
    jinja_node *expr1 = parse_expression(P, 0);
    while (skip_name(P, "if")) {
        int soft = P->soft;
        P->soft = 1;
        jinja_node *n = mk(P, JN_CONDEXPR, line);
        n->a = parse_expression(P, 0);
        n->b = expr1;
        if (skip_name(P, "else"))
            n->c = parse_condexpr(P);
        P->soft = soft;
        expr1 = n;
        line = cur(P)->line;
    }
    return expr1;
}

static jinja_node *parse_not(parser *P);

static jinja_node *parse_and(parser *P)
{
    int line = cur(P)->line;
    jinja_node *left = parse_not(P);
    while (skip_name(P, "and")) {
        jinja_node *n = mk(P, JN_AND, line);
        n->a = left;
        n->b = parse_not(P);
        left = n;
        line = cur(P)->line;
    }
    return left;
}

static jinja_node *parse_or(parser *P)
{
    int line = cur(P)->line;
    jinja_node *left = parse_and(P);
    while (skip_name(P, "or")) {
        jinja_node *n = mk(P, JN_OR, line);
        n->a = left;
        n->b = parse_and(P);
        left = n;
        line = cur(P)->line;
    }
    return left;
}

static jinja_node *parse_expression(parser *P, int with_condexpr)
{
    enter(P);
    jinja_node *n = with_condexpr ? parse_condexpr(P) : parse_or(P);
    P->depth--;
    return n;
}

static jinja_node *parse_math1(parser *P);

static jinja_node *parse_compare(parser *P)
{
    int line = cur(P)->line;
    jinja_node *expr = parse_math1(P);
    nvec operands = {0};
    uint8_t ops[64];
    int nops = 0;
    for (;;) {
        const jinja_tok *t = cur(P);
        int op = -1;
        if (t->type == JT_OP) {
            switch (t->op) {
            case JP_EQ: op = JC_EQ; break;
            case JP_NE: op = JC_NE; break;
            case JP_LT: op = JC_LT; break;
            case JP_LTEQ: op = JC_LE; break;
            case JP_GT: op = JC_GT; break;
            case JP_GTEQ: op = JC_GE; break;
            default: break;
            }
            if (op >= 0)
                next_tok(P);
        } else if (is_name(t, "in")) {
            next_tok(P);
            op = JC_IN;
        } else if (is_name(t, "not") && is_name(look(P), "in")) {
            next_tok(P);
            next_tok(P);
            op = JC_NOTIN;
        }
        if (op < 0)
            break;
        if (nops == (int)sizeof ops)
            pfail(P, "comparison chain too long%s%s", "", "");
        ops[nops++] = (uint8_t)op;
        nv_push(P, &operands, parse_math1(P));
        line = cur(P)->line;
    }
    if (!nops)
        return expr;
    jinja_node *n = mk(P, JN_COMPARE, line);
    n->a = expr;
    n->kids = operands.v;
    n->nkids = operands.n;
    n->ops = jinja_alloc(P->a, (size_t)nops);
    memcpy(n->ops, ops, (size_t)nops);
    return n;
}

static jinja_node *parse_not(parser *P)
{
    if (is_name(cur(P), "not")) {
        int line = next_tok(P)->line;
        enter(P);
        jinja_node *n = mk(P, JN_NOT, line);
        n->a = parse_not(P);
        P->depth--;
        return n;
    }
    return parse_compare(P);
}

static jinja_node *binop(parser *P, int op, jinja_node *l, jinja_node *r, int line)
{
    jinja_node *n = mk(P, JN_BINOP, line);
    n->op = (uint8_t)op;
    n->a = l;
    n->b = r;
    return n;
}

static jinja_node *parse_pow(parser *P)
{
    int line = cur(P)->line;
    jinja_node *left = parse_unary(P, 1);
    while (skip_op(P, JP_POW)) {
        left = binop(P, JO_POW, left, parse_unary(P, 1), line);
        line = cur(P)->line;
    }
    return left;
}

static jinja_node *parse_math2(parser *P)
{
    int line = cur(P)->line;
    jinja_node *left = parse_pow(P);
    for (;;) {
        const jinja_tok *t = cur(P);
        int op = -1;
        if (t->type == JT_OP) {
            switch (t->op) {
            case JP_MUL: op = JO_MUL; break;
            case JP_DIV: op = JO_DIV; break;
            case JP_FLOORDIV: op = JO_FLOORDIV; break;
            case JP_MOD: op = JO_MOD; break;
            default: break;
            }
        }
        if (op < 0)
            break;
        next_tok(P);
        left = binop(P, op, left, parse_pow(P), line);
        line = cur(P)->line;
    }
    return left;
}

static jinja_node *parse_concat(parser *P)
{
    int line = cur(P)->line;
    jinja_node *first = parse_math2(P);
    if (!is_op(cur(P), JP_TILDE))
        return first;
    nvec args = {0};
    nv_push(P, &args, first);
    while (skip_op(P, JP_TILDE))
        nv_push(P, &args, parse_math2(P));
    jinja_node *n = mk(P, JN_CONCAT, line);
    n->kids = args.v;
    n->nkids = args.n;
    return n;
}

static jinja_node *parse_math1(parser *P)
{
    int line = cur(P)->line;
    jinja_node *left = parse_concat(P);
    while (is_op(cur(P), JP_ADD) || is_op(cur(P), JP_SUB)) {
        int op = next_tok(P)->op == JP_ADD ? JO_ADD : JO_SUB;
        left = binop(P, op, left, parse_concat(P), line);
        line = cur(P)->line;
    }
    return left;
}

static void parse_call_args(parser *P, jinja_node *n)
{
    int line = cur(P)->line;
    expect_op(P, JP_LPAREN, "(");
    nvec args = {0}, kw = {0};
    const char *names[256];
    int require_comma = 0;
    while (!is_op(cur(P), JP_RPAREN)) {
        if (require_comma) {
            expect_op(P, JP_COMMA, ",");
            if (is_op(cur(P), JP_RPAREN))
                break;
        }
        if (is_op(cur(P), JP_MUL) || is_op(cur(P), JP_POW))
            pfail_code(P, TANDEM_EUNSUPPORTED, cur(P)->line, "*args and **kwargs in calls are not supported yet%s%s", "", "");
        if (cur(P)->type == JT_NAME && is_op(look(P), JP_ASSIGN)) {
            if (kw.n == (int)(sizeof names / sizeof names[0]))
                pfail(P, "too many keyword arguments%s%s", "", "");
            names[kw.n] = next_tok(P)->p;
            next_tok(P);
            nv_push(P, &kw, parse_expression(P, 1));
        } else {
            if (kw.n)
                pfail_code(P, TANDEM_EFORMAT, line, "invalid syntax for function call expression%s%s", "", "");
            nv_push(P, &args, parse_expression(P, 1));
        }
        require_comma = 1;
    }
    expect_op(P, JP_RPAREN, ")");
    n->kids = args.v;
    n->nkids = args.n;
    n->kw = kw.v;
    n->nkw = kw.n;
    if (kw.n) {
        n->kwn = jinja_alloc(P->a, (size_t)kw.n * sizeof *n->kwn);
        memcpy(n->kwn, names, (size_t)kw.n * sizeof *n->kwn);
    }
}

static jinja_node *parse_call(parser *P, jinja_node *callee)
{
    jinja_node *n = mk(P, JN_CALL, cur(P)->line);
    n->a = callee;
    parse_call_args(P, n);
    return n;
}

static const char *dotted_name(parser *P)
{
    const char *name = expect_name(P);
    while (is_op(cur(P), JP_DOT)) {
        next_tok(P);
        const char *more = expect_name(P);
        size_t a = strlen(name), b = strlen(more);
        char *s = jinja_alloc(P->a, a + b + 2);
        memcpy(s, name, a);
        s[a] = '.';
        memcpy(s + a + 1, more, b + 1);
        name = s;
    }
    return name;
}

static jinja_node *parse_filter(parser *P, jinja_node *node, int start_inline)
{
    while (is_op(cur(P), JP_PIPE) || start_inline) {
        if (!start_inline)
            next_tok(P);
        int line = cur(P)->line;
        jinja_node *n = mk(P, JN_FILTER, line);
        n->name = dotted_name(P);
        n->id = jinja_filter_lookup(n->name);
        if (n->id == -1 && !P->soft)
            pfail_code(P, TANDEM_EFORMAT, line, "no filter named '%s'%s", n->name, "");
        n->a = node;
        if (is_op(cur(P), JP_LPAREN))
            parse_call_args(P, n);
        node = n;
        start_inline = 0;
    }
    return node;
}

static jinja_node *parse_test(parser *P, jinja_node *node)
{
    int line = next_tok(P)->line;  /* "is" */
    int negated = skip_name(P, "not");
    jinja_node *n = mk(P, JN_TEST, line);
    n->name = dotted_name(P);
    n->id = jinja_test_lookup(n->name);
    if (n->id == -1 && !P->soft)
        pfail_code(P, TANDEM_EFORMAT, line, "no test named '%s'%s", n->name, "");
    n->a = node;
    const jinja_tok *t = cur(P);
    if (is_op(t, JP_LPAREN)) {
        parse_call_args(P, n);
    } else if ((t->type == JT_NAME || t->type == JT_STRING || t->type == JT_INT || t->type == JT_FLOAT ||
                is_op(t, JP_LBRACKET) || is_op(t, JP_LBRACE)) &&
               !is_name(t, "else") && !is_name(t, "or") && !is_name(t, "and")) {
        if (is_name(t, "is"))
            pfail(P, "You cannot chain multiple tests with is%s%s", "", "");
        jinja_node *arg = parse_postfix(P, parse_primary(P, 0));
        n->kids = jinja_alloc(P->a, sizeof *n->kids);
        n->kids[0] = arg;
        n->nkids = 1;
    }
    if (negated) {
        jinja_node *x = mk(P, JN_NOT, line);
        x->a = n;
        return x;
    }
    return n;
}

static jinja_node *parse_subscribed(parser *P)
{
    int line = cur(P)->line;
    jinja_node *args[3] = {0};
    if (is_op(cur(P), JP_COLON)) {
        next_tok(P);
    } else {
        jinja_node *node = parse_expression(P, 1);
        if (!is_op(cur(P), JP_COLON))
            return node;
        next_tok(P);
        args[0] = node;
    }
    if (!is_op(cur(P), JP_COLON) && !is_op(cur(P), JP_RBRACKET) && !is_op(cur(P), JP_COMMA))
        args[1] = parse_expression(P, 1);
    if (is_op(cur(P), JP_COLON)) {
        next_tok(P);
        if (!is_op(cur(P), JP_RBRACKET) && !is_op(cur(P), JP_COMMA))
            args[2] = parse_expression(P, 1);
    }
    jinja_node *n = mk(P, JN_SLICE, line);
    n->a = args[0];
    n->b = args[1];
    n->c = args[2];
    return n;
}

static jinja_node *parse_subscript(parser *P, jinja_node *node)
{
    const jinja_tok *t = next_tok(P);
    if (is_op(t, JP_DOT)) {
        const jinja_tok *attr = next_tok(P);
        if (attr->type == JT_NAME) {
            jinja_node *n = mk(P, JN_GETATTR, t->line);
            n->a = node;
            n->name = attr->p;
            return n;
        }
        if (attr->type != JT_INT)
            pfail_code(P, TANDEM_EFORMAT, attr->line, "expected name or number%s%s", "", "");
        jinja_node *k = mk(P, JN_CONST, attr->line);
        k->cval = jinja_int(attr->i);
        jinja_node *n = mk(P, JN_GETITEM, t->line);
        n->a = node;
        n->b = k;
        return n;
    }
    /* "[" */
    nvec args = {0};
    while (!is_op(cur(P), JP_RBRACKET)) {
        if (args.n)
            expect_op(P, JP_COMMA, ",");
        nv_push(P, &args, parse_subscribed(P));
    }
    expect_op(P, JP_RBRACKET, "]");
    jinja_node *n = mk(P, JN_GETITEM, t->line);
    n->a = node;
    if (args.n == 1) {
        n->b = args.v[0];
    } else {
        jinja_node *tup = mk(P, JN_TUPLE, t->line);
        tup->kids = args.v;
        tup->nkids = args.n;
        n->b = tup;
    }
    return n;
}

static jinja_node *parse_postfix(parser *P, jinja_node *node)
{
    for (;;) {
        const jinja_tok *t = cur(P);
        if (is_op(t, JP_DOT) || is_op(t, JP_LBRACKET))
            node = parse_subscript(P, node);
        else if (is_op(t, JP_LPAREN))
            node = parse_call(P, node);
        else
            return node;
    }
}

static jinja_node *parse_filter_expr(parser *P, jinja_node *node)
{
    for (;;) {
        const jinja_tok *t = cur(P);
        if (is_op(t, JP_PIPE))
            node = parse_filter(P, node, 0);
        else if (is_name(t, "is"))
            node = parse_test(P, node);
        else if (is_op(t, JP_LPAREN))
            node = parse_call(P, node);
        else
            return node;
    }
}

static jinja_node *parse_unary(parser *P, int with_filter)
{
    const jinja_tok *t = cur(P);
    jinja_node *node;
    enter(P);
    if (is_op(t, JP_SUB) || is_op(t, JP_ADD)) {
        next_tok(P);
        node = mk(P, t->op == JP_SUB ? JN_NEG : JN_POS, t->line);
        node->a = parse_unary(P, 0);
    } else {
        node = parse_primary(P, 0);
    }
    node = parse_postfix(P, node);
    if (with_filter)
        node = parse_filter_expr(P, node);
    P->depth--;
    return node;
}

static jinja_node *parse_primary(parser *P, int with_namespace)
{
    const jinja_tok *t = cur(P);
    jinja_node *n;
    if (t->type == JT_NAME) {
        next_tok(P);
        if (!strcmp(t->p, "true") || !strcmp(t->p, "True") || !strcmp(t->p, "false") || !strcmp(t->p, "False")) {
            n = mk(P, JN_CONST, t->line);
            n->cval = jinja_bool(t->p[0] == 't' || t->p[0] == 'T');
        } else if (!strcmp(t->p, "none") || !strcmp(t->p, "None")) {
            n = mk(P, JN_CONST, t->line);
            n->cval = jinja_none();
        } else if (with_namespace && is_op(cur(P), JP_DOT)) {
            next_tok(P);
            n = mk(P, JN_NSREF, t->line);
            n->name = t->p;
            n->attr = expect_name(P);
        } else {
            n = mk(P, JN_NAME, t->line);
            n->name = t->p;
        }
        return n;
    }
    if (t->type == JT_STRING) {
        next_tok(P);
        n = mk(P, JN_CONST, t->line);
        if (cur(P)->type != JT_STRING) {
            n->cval = jinja_str(t->p, t->n);
            return n;
        }
        jinja_buf b;
        jinja_buf_init(&b, P->a);
        jinja_buf_put(&b, t->p, t->n);
        while (cur(P)->type == JT_STRING) {
            const jinja_tok *s = next_tok(P);
            jinja_buf_put(&b, s->p, s->n);
        }
        n->cval = jinja_buf_val(&b);
        return n;
    }
    if (t->type == JT_INT || t->type == JT_FLOAT) {
        next_tok(P);
        n = mk(P, JN_CONST, t->line);
        n->cval = t->type == JT_INT ? jinja_int(t->i) : jinja_float(t->f);
        return n;
    }
    if (is_op(t, JP_LPAREN)) {
        next_tok(P);
        n = parse_tuple(P, 0, 1, NULL, 1, 0);
        expect_op(P, JP_RPAREN, ")");
        return n;
    }
    if (is_op(t, JP_LBRACKET) || is_op(t, JP_LBRACE)) {
        int dict = t->op == JP_LBRACE;
        int close = dict ? JP_RBRACE : JP_RBRACKET;
        next_tok(P);
        nvec items = {0};
        while (!is_op(cur(P), close)) {
            if (items.n)
                expect_op(P, JP_COMMA, ",");
            if (is_op(cur(P), close))
                break;
            nv_push(P, &items, parse_expression(P, 1));
            if (dict) {
                expect_op(P, JP_COLON, ":");
                nv_push(P, &items, parse_expression(P, 1));
            }
        }
        expect_op(P, close, dict ? "}" : "]");
        n = mk(P, dict ? JN_DICT : JN_LIST, t->line);
        n->kids = items.v;
        n->nkids = items.n;
        return n;
    }
    pfail(P, "unexpected '%s'%s", describe(t), "");
}

/* ---- statements ------------------------------------------------------------ */

static jinja_node *subparse(parser *P, const char *const *end);

/* Parse "%}" body up to one of the end tags; the end tag name stays current. */
static jinja_node *parse_statements(parser *P, const char *const *end, int drop_needle)
{
    skip_op(P, JP_COLON);
    expect_type(P, JT_BLOCK_END, "end of statement block");
    jinja_node *body = subparse(P, end);
    if (cur(P)->type == JT_EOF) {
        char want[128] = "";
        for (int i = 0; end[i]; i++) {
            size_t k = strlen(want);
            snprintf(want + k, sizeof want - k, "%s'%s'", i ? " or " : "", end[i]);
        }
        pfail(P, "unexpected end of template: Jinja was looking for the following tags: %s. "
                 "The innermost block that needs to be closed is '%s'.",
              want, P->ntags ? P->tags[P->ntags - 1] : "?");
    }
    if (drop_needle)
        next_tok(P);
    return body;
}

static void check_assignable(parser *P, jinja_node *t, int allow_tuple)
{
    if (t->kind == JN_NAME || t->kind == JN_NSREF)
        return;
    if (t->kind == JN_TUPLE && allow_tuple) {
        for (int i = 0; i < t->nkids; i++)
            check_assignable(P, t->kids[i], 0);
        return;
    }
    pfail_code(P, TANDEM_EFORMAT, t->line, "can't assign to '%s'%s",
               t->kind == JN_CONST ? "const" : t->kind == JN_TUPLE ? "tuple" : "expression", "");
}

static void parse_signature(parser *P, jinja_node *n)
{
    expect_op(P, JP_LPAREN, "(");
    nvec params = {0}, defaults = {0};
    int have_default = 0;
    while (!is_op(cur(P), JP_RPAREN)) {
        if (params.n)
            expect_op(P, JP_COMMA, ",");
        jinja_node *arg = mk(P, JN_NAME, cur(P)->line);
        arg->name = expect_name(P);
        jinja_node *def = NULL;
        if (skip_op(P, JP_ASSIGN)) {
            def = parse_expression(P, 1);
            have_default = 1;
        } else if (have_default) {
            pfail(P, "non-default argument follows default argument%s%s", "", "");
        }
        nv_push(P, &params, arg);
        nv_push(P, &defaults, def);
    }
    expect_op(P, JP_RPAREN, ")");
    n->kids = params.v;
    n->nkids = params.n;
    n->kw = defaults.v;
    n->nkw = defaults.n;
}

/* Which of caller/varargs/kwargs a macro body reads (jinja2 decides the
 * macro's signature from this). */
static unsigned names_used(const jinja_node *n)
{
    if (!n)
        return 0;
    unsigned f = 0;
    if (n->kind == JN_NAME) {
        if (!strcmp(n->name, "caller"))
            f |= JNF_CALLER;
        else if (!strcmp(n->name, "varargs"))
            f |= JNF_VARARGS;
        else if (!strcmp(n->name, "kwargs"))
            f |= JNF_KWARGS;
    }
    f |= names_used(n->a) | names_used(n->b) | names_used(n->c) | names_used(n->d) | names_used(n->e);
    for (int i = 0; i < n->nkids; i++)
        f |= names_used(n->kids[i]);
    for (int i = 0; i < n->nkw; i++)
        f |= names_used(n->kw[i]);
    return f;
}

static int defines_closure(const jinja_node *n)
{
    if (!n)
        return 0;
    if (n->kind == JN_MACRO || n->kind == JN_CALLBLOCK)
        return 1;
    if (defines_closure(n->a) || defines_closure(n->b) || defines_closure(n->c) || defines_closure(n->d) ||
        defines_closure(n->e))
        return 1;
    for (int i = 0; i < n->nkids; i++)
        if (defines_closure(n->kids[i]))
            return 1;
    return 0;
}

static jinja_node *parse_stmt_body(parser *P, int kind, int line, const char *endtag)
{
    const char *end[] = {endtag, NULL};
    jinja_node *n = mk(P, kind, line);
    int in_loop = P->in_loop, soft = P->soft;
    if (kind != JN_WITH && kind != JN_FILTERBLOCK && kind != JN_SETBLOCK)
        P->in_loop = 0;
    P->soft = 0;
    n->d = parse_statements(P, end, 1);
    P->in_loop = in_loop;
    P->soft = soft;
    return n;
}

static jinja_node *parse_statement(parser *P)
{
    const jinja_tok *t = cur(P);
    int line = t->line;
    if (t->type != JT_NAME)
        pfail(P, "tag name expected%s%s", "", "");
    const char *tag = t->p;
    if (P->ntags >= MAX_DEPTH)
        pfail(P, "blocks nested too deeply%s%s", "", "");
    P->tags[P->ntags++] = tag;
    enter(P);
    jinja_node *n = NULL;
    next_tok(P);

    if (!strcmp(tag, "if")) {
        static const char *const end[] = {"elif", "else", "endif", NULL};
        static const char *const end2[] = {"endif", NULL};
        nvec kids = {0};
        n = mk(P, JN_IF, line);
        int soft = P->soft;
        P->soft = 1;
        for (;;) {
            nv_push(P, &kids, parse_tuple(P, 0, 0, NULL, 0, 0));
            nv_push(P, &kids, parse_statements(P, end, 0));
            const jinja_tok *e = next_tok(P);
            if (is_name(e, "elif"))
                continue;
            if (is_name(e, "else"))
                n->c = parse_statements(P, end2, 1);
            break;
        }
        P->soft = soft;
        n->kids = kids.v;
        n->nkids = kids.n;
    } else if (!strcmp(tag, "for")) {
        static const char *const end[] = {"endfor", "else", NULL};
        static const char *const end2[] = {"endfor", NULL};
        n = mk(P, JN_FOR, line);
        n->a = parse_tuple(P, 1, 1, "in", 0, 0);
        check_assignable(P, n->a, 1);
        if (!skip_name(P, "in"))
            pfail(P, "expected token 'in', got '%s'%s", describe(cur(P)), "");
        n->b = parse_tuple(P, 0, 0, "recursive", 0, 0);
        int soft = P->soft;
        P->soft = 0;
        if (skip_name(P, "if"))
            n->c = parse_expression(P, 1);
        if (is_name(cur(P), "recursive"))
            pfail_code(P, TANDEM_EUNSUPPORTED, line, "recursive for loops are not supported yet%s%s", "", "");
        int in_loop = P->in_loop;
        P->in_loop = 1;
        n->d = parse_statements(P, end, 0);
        P->in_loop = in_loop;
        if (is_name(next_tok(P), "else"))
            n->e = parse_statements(P, end2, 1);
        P->soft = soft;
        if (defines_closure(n->d))
            n->flags |= JNF_CAPTURES;
    } else if (!strcmp(tag, "set")) {
        jinja_node *target = parse_tuple(P, 1, 1, NULL, 0, 1);
        check_assignable(P, target, 1);
        if (skip_op(P, JP_ASSIGN)) {
            n = mk(P, JN_SET, line);
            n->a = target;
            n->b = parse_tuple(P, 0, 1, NULL, 0, 0);
        } else {
            jinja_node *filter = parse_filter(P, NULL, 0);
            n = parse_stmt_body(P, JN_SETBLOCK, line, "endset");
            n->a = target;
            n->b = filter;
        }
    } else if (!strcmp(tag, "macro")) {
        const char *name = expect_name(P);
        jinja_node *sig = mk(P, JN_MACRO, line);
        parse_signature(P, sig);
        n = parse_stmt_body(P, JN_MACRO, line, "endmacro");
        n->name = name;
        n->kids = sig->kids;
        n->nkids = sig->nkids;
        n->kw = sig->kw;
        n->nkw = sig->nkw;
        n->flags = (uint16_t)names_used(n->d);
    } else if (!strcmp(tag, "call")) {
        jinja_node *sig = mk(P, JN_CALLBLOCK, line);
        if (is_op(cur(P), JP_LPAREN))
            parse_signature(P, sig);
        jinja_node *call = parse_expression(P, 1);
        if (call->kind != JN_CALL)
            pfail_code(P, TANDEM_EFORMAT, line, "expected call%s%s", "", "");
        n = parse_stmt_body(P, JN_CALLBLOCK, line, "endcall");
        n->a = call;
        n->kids = sig->kids;
        n->nkids = sig->nkids;
        n->kw = sig->kw;
        n->nkw = sig->nkw;
        n->name = "caller";
        n->flags = (uint16_t)names_used(n->d);
    } else if (!strcmp(tag, "filter")) {
        jinja_node *filter = parse_filter(P, NULL, 1);
        n = parse_stmt_body(P, JN_FILTERBLOCK, line, "endfilter");
        n->b = filter;
    } else if (!strcmp(tag, "with")) {
        nvec kids = {0};
        while (cur(P)->type != JT_BLOCK_END) {
            if (kids.n)
                expect_op(P, JP_COMMA, ",");
            jinja_node *target = parse_primary(P, 0);
            check_assignable(P, target, 0);
            expect_op(P, JP_ASSIGN, "=");
            nv_push(P, &kids, target);
            nv_push(P, &kids, parse_expression(P, 1));
        }
        n = parse_stmt_body(P, JN_WITH, line, "endwith");
        n->kids = kids.v;
        n->nkids = kids.n;
    } else if (!strcmp(tag, "generation")) {
        /* transformers' AssistantTracker: the body renders as is (in a scope). */
        n = parse_stmt_body(P, JN_WITH, line, "endgeneration");
    } else if (!strcmp(tag, "print")) {
        nvec kids = {0};
        while (cur(P)->type != JT_BLOCK_END) {
            if (kids.n)
                expect_op(P, JP_COMMA, ",");
            jinja_node *p = mk(P, JN_PRINT, cur(P)->line);
            p->a = parse_expression(P, 1);
            nv_push(P, &kids, p);
        }
        n = mk(P, JN_BODY, line);
        n->kids = kids.v;
        n->nkids = kids.n;
    } else if (!strcmp(tag, "break") || !strcmp(tag, "continue")) {
        if (!P->in_loop)
            pfail_code(P, TANDEM_EFORMAT, line, "'%s' outside of a for loop%s", tag, "");
        n = mk(P, tag[0] == 'b' ? JN_BREAK : JN_CONTINUE, line);
    } else if (!strcmp(tag, "extends") || !strcmp(tag, "block") || !strcmp(tag, "include") ||
               !strcmp(tag, "import") || !strcmp(tag, "from") || !strcmp(tag, "autoescape")) {
        pfail_code(P, TANDEM_EUNSUPPORTED, line, "tag '%s' is not supported yet%s", tag, "");
    } else {
        P->ntags--;
        pfail_code(P, TANDEM_EFORMAT, line, "Encountered unknown tag '%s'.%s", tag,
                   P->ntags ? " (a block is still open)" : "");
    }
    P->ntags--;
    P->depth--;
    return n;
}

static jinja_node *subparse(parser *P, const char *const *end)
{
    nvec body = {0};
    int line = cur(P)->line;
    for (;;) {
        const jinja_tok *t = cur(P);
        if (t->type == JT_DATA) {
            jinja_node *d = mk(P, JN_DATA, t->line);
            d->cval = jinja_str(t->p, t->n);
            nv_push(P, &body, d);
            next_tok(P);
        } else if (t->type == JT_VAR_BEGIN) {
            next_tok(P);
            jinja_node *p = mk(P, JN_PRINT, t->line);
            p->a = parse_tuple(P, 0, 1, NULL, 0, 0);
            expect_type(P, JT_VAR_END, "end of print statement");
            nv_push(P, &body, p);
        } else if (t->type == JT_BLOCK_BEGIN) {
            next_tok(P);
            if (end) {
                for (int i = 0; end[i]; i++)
                    if (is_name(cur(P), end[i]))
                        goto done;
            }
            nv_push(P, &body, parse_statement(P));
            expect_type(P, JT_BLOCK_END, "end of statement block");
        } else {
            break;  /* EOF */
        }
    }
done:;
    jinja_node *n = mk(P, JN_BODY, line);
    n->kids = body.v;
    n->nkids = body.n;
    return n;
}

jinja_node *jinja_parse_tokens(jinja_arena *a, const jinja_tok *toks, size_t ntoks)
{
    parser P;
    memset(&P, 0, sizeof P);
    P.a = a;
    P.t = toks;
    P.n = ntoks;
    jinja_node *root = subparse(&P, NULL);
    if (cur(&P)->type != JT_EOF)
        pfail(&P, "unexpected '%s'%s", describe(cur(&P)), "");
    return root;
}
