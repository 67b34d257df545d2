/*
 * jinja_tests.c - jinja2's builtin tests (`x is defined`, `x is string` ...)
 * with jinja2 3.1's semantics: e.g. `true is number` holds but
 * `true is integer` does not; Undefined is iterable, a sequence and
 * callable (it defines __iter__, __len__ and __call__).
 */
#include "tokenizer/jinja_impl.h"

#include <string.h>

static const char *const NO_PARAMS[] = {NULL};

static int given(jinja_val v) { return !(v.t == JV_UNDEF && v.owner == JU_MISSING); }

enum {
    T_BOOLEAN, T_CALLABLE, T_DEFINED, T_DIVISIBLEBY, T_EQ, T_ESCAPED, T_EVEN, T_FALSE, T_FILTER,
    T_FLOAT, T_GE, T_GT, T_IN, T_INTEGER, T_ITERABLE, T_LE, T_LOWER, T_LT, T_MAPPING, T_NE, T_NONE,
    T_NUMBER, T_ODD, T_SAMEAS, T_SEQUENCE, T_STRING, T_TEST, T_TRUE, T_UNDEFINED, T_UPPER,
};

static const struct { const char *name; int id; } TESTS[] = {
    {"boolean", T_BOOLEAN}, {"callable", T_CALLABLE}, {"defined", T_DEFINED},
    {"divisibleby", T_DIVISIBLEBY}, {"eq", T_EQ}, {"equalto", T_EQ}, {"==", T_EQ},
    {"escaped", T_ESCAPED}, {"even", T_EVEN}, {"false", T_FALSE}, {"filter", T_FILTER},
    {"float", T_FLOAT}, {"ge", T_GE}, {">=", T_GE}, {"gt", T_GT}, {"greaterthan", T_GT}, {">", T_GT},
    {"in", T_IN}, {"integer", T_INTEGER}, {"iterable", T_ITERABLE}, {"le", T_LE}, {"<=", T_LE},
    {"lower", T_LOWER}, {"lt", T_LT}, {"lessthan", T_LT}, {"<", T_LT}, {"mapping", T_MAPPING},
    {"ne", T_NE}, {"!=", T_NE}, {"none", T_NONE}, {"number", T_NUMBER}, {"odd", T_ODD},
    {"sameas", T_SAMEAS}, {"sequence", T_SEQUENCE}, {"string", T_STRING}, {"test", T_TEST},
    {"true", T_TRUE}, {"undefined", T_UNDEFINED}, {"upper", T_UPPER},
};

int jinja_test_lookup(const char *name)
{
    for (size_t i = 0; i < sizeof TESTS / sizeof TESTS[0]; i++)
        if (!strcmp(TESTS[i].name, name))
            return TESTS[i].id;
    return -1;
}

static jinja_val one_arg(jinja_rt *rt, const jinja_args *a, const char *name)
{
    static const char *const P[] = {"other", NULL};
    jinja_val p[1];
    jinja_bind(rt, a, name, P, p);
    if (!given(p[0]))
        jinja_rt_fail(rt, TANDEM_EFORMAT, "test '%s' takes one argument", name);
    return p[0];
}

static int is_case(jinja_rt *rt, jinja_val v, int upper)
{
    jinja_val s = jinja_to_str(rt, v), fn;
    jinja_args none = {0, NULL, 0, NULL, NULL};
    jinja_method(rt, s, upper ? "isupper" : "islower", &fn);
    return jinja_truthy(jinja_call(rt, fn, &none));
}

int jinja_test_apply(jinja_rt *rt, int id, jinja_val v, const jinja_args *a)
{
    jinja_val o;
    switch (id) {
    case T_DEFINED: jinja_bind(rt, a, "defined", NO_PARAMS, NULL); return v.t != JV_UNDEF;
    case T_UNDEFINED: jinja_bind(rt, a, "undefined", NO_PARAMS, NULL); return v.t == JV_UNDEF;
    case T_NONE: jinja_bind(rt, a, "none", NO_PARAMS, NULL); return v.t == JV_NONE;
    case T_BOOLEAN: jinja_bind(rt, a, "boolean", NO_PARAMS, NULL); return v.t == JV_BOOL;
    case T_TRUE: jinja_bind(rt, a, "true", NO_PARAMS, NULL); return v.t == JV_BOOL && v.u.i;
    case T_FALSE: jinja_bind(rt, a, "false", NO_PARAMS, NULL); return v.t == JV_BOOL && !v.u.i;
    case T_INTEGER: jinja_bind(rt, a, "integer", NO_PARAMS, NULL); return v.t == JV_INT;
    case T_FLOAT: jinja_bind(rt, a, "float", NO_PARAMS, NULL); return v.t == JV_FLOAT;
    case T_NUMBER: jinja_bind(rt, a, "number", NO_PARAMS, NULL); return jinja_is_num(v);
    case T_STRING: jinja_bind(rt, a, "string", NO_PARAMS, NULL); return v.t == JV_STR;
    case T_MAPPING: jinja_bind(rt, a, "mapping", NO_PARAMS, NULL); return v.t == JV_DICT;
    case T_ITERABLE:
    case T_SEQUENCE:
        jinja_bind(rt, a, id == T_ITERABLE ? "iterable" : "sequence", NO_PARAMS, NULL);
        return v.t == JV_UNDEF || v.t == JV_STR || v.t == JV_LIST || v.t == JV_DICT;
    case T_CALLABLE:
        jinja_bind(rt, a, "callable", NO_PARAMS, NULL);
        return v.t == JV_MACRO || v.t == JV_FUNC || (v.t == JV_UNDEF);
    case T_ESCAPED: jinja_bind(rt, a, "escaped", NO_PARAMS, NULL); return v.t == JV_STR && (v.flag & JVF_MARKUP);
    case T_LOWER: jinja_bind(rt, a, "lower", NO_PARAMS, NULL); return is_case(rt, v, 0);
    case T_UPPER: jinja_bind(rt, a, "upper", NO_PARAMS, NULL); return is_case(rt, v, 1);
    case T_ODD:
    case T_EVEN:
        jinja_bind(rt, a, id == T_ODD ? "odd" : "even", NO_PARAMS, NULL);
        return jinja_eq(jinja_binop(rt, JO_MOD, v, jinja_int(2)), jinja_int(id == T_ODD));
    case T_DIVISIBLEBY:
        o = one_arg(rt, a, "divisibleby");
        return jinja_eq(jinja_binop(rt, JO_MOD, v, o), jinja_int(0));
    case T_EQ: return jinja_eq(v, one_arg(rt, a, "eq"));
    case T_NE: return !jinja_eq(v, one_arg(rt, a, "ne"));
    case T_LT: return jinja_cmp(rt, v, one_arg(rt, a, "lt")) < 0;
    case T_LE: return jinja_cmp(rt, v, one_arg(rt, a, "le")) <= 0;
    case T_GT: return jinja_cmp(rt, v, one_arg(rt, a, "gt")) > 0;
    case T_GE: return jinja_cmp(rt, v, one_arg(rt, a, "ge")) >= 0;
    case T_IN: {
        o = one_arg(rt, a, "in");
        if (o.t == JV_STR) {
            if (v.t != JV_STR)
                jinja_rt_fail(rt, TANDEM_EFORMAT, "'in <string>' requires string as left operand, not %s",
                              jinja_type_name(v));
            return v.u.s.n == 0 || memmem(o.u.s.p, o.u.s.n, v.u.s.p, v.u.s.n) != NULL;
        }
        if (o.t == JV_DICT) {
            size_t k;
            return jinja_hashable(v) && jinja_dict_find(o.u.d, v, &k);
        }
        const jinja_list *l = jinja_iter(rt, o);
        for (size_t i = 0; i < l->n; i++)
            if (jinja_eq(l->v[i], v))
                return 1;
        return 0;
    }
    case T_SAMEAS:
        o = one_arg(rt, a, "sameas");
        if (v.t != o.t)
            return 0;
        switch (v.t) {
        case JV_UNDEF: case JV_NONE: return 1;
        case JV_BOOL: case JV_INT: return v.u.i == o.u.i;
        case JV_FLOAT: return v.u.f == o.u.f;
        case JV_STR: return v.u.s.p == o.u.s.p && v.u.s.n == o.u.s.n;
        default: return v.u.l == o.u.l;
        }
    case T_FILTER:
    case T_TEST: {
        o = one_arg(rt, a, id == T_FILTER ? "filter" : "test");
        if (o.t != JV_STR)
            return 0;
        const char *s = jinja_strndup(rt->a, o.u.s.p, o.u.s.n);
        return id == T_FILTER ? jinja_filter_lookup(s) != -1 : jinja_test_lookup(s) != -1;
    }
    default:
        jinja_rt_fail(rt, TANDEM_EFORMAT, "internal: unknown test %d", id);
    }
}
