/* A small JSON parser.  Anything it refuses goes back to the Python agent,
 * so it refuses whatever Python's json.loads would read differently. */
#include "core.h"

#include <stdlib.h>
#include <string.h>

#define MAX_DEPTH 64
/* Duplicate keys are looked for pairwise: bound the work. */
#define MAX_KEYS 1024

struct parser {
    jdoc *d;
    const unsigned char *p, *end;
    char *out; /* next free byte of the arena */
    int depth;
};

static void ws(struct parser *ps) {
    while (ps->p < ps->end && (*ps->p == ' ' || *ps->p == '\t' || *ps->p == '\n' || *ps->p == '\r')) ps->p++;
}

static int node(struct parser *ps) {
    jdoc *d = ps->d;
    if (d->n == d->cap) {
        int cap = d->cap ? d->cap * 2 : 64;
        jnode *v = realloc(d->v, (size_t)cap * sizeof *v);
        if (!v) oom();
        d->v = v;
        d->cap = cap;
    }
    memset(&d->v[d->n], 0, sizeof d->v[0]);
    d->v[d->n].kid = d->v[d->n].next = -1;
    return d->n++;
}

static int hex4(const unsigned char *p, unsigned *out) {
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        int h = hexval(p[i]);
        if (h < 0) return -1;
        v = v << 4 | (unsigned)h;
    }
    *out = v;
    return 0;
}

static void utf8(char **o, unsigned cp) {
    unsigned char *u = (unsigned char *)*o;
    if (cp < 0x80) {
        *u++ = (unsigned char)cp;
    } else if (cp < 0x800) {
        *u++ = (unsigned char)(0xc0 | cp >> 6);
        *u++ = (unsigned char)(0x80 | (cp & 63));
    } else if (cp < 0x10000) {
        *u++ = (unsigned char)(0xe0 | cp >> 12);
        *u++ = (unsigned char)(0x80 | (cp >> 6 & 63));
        *u++ = (unsigned char)(0x80 | (cp & 63));
    } else {
        *u++ = (unsigned char)(0xf0 | cp >> 18);
        *u++ = (unsigned char)(0x80 | (cp >> 12 & 63));
        *u++ = (unsigned char)(0x80 | (cp >> 6 & 63));
        *u++ = (unsigned char)(0x80 | (cp & 63));
    }
    *o = (char *)u;
}

/* One raw UTF-8 sequence, as Python's strict decoder accepts it. */
static int raw_utf8(struct parser *ps) {
    const unsigned char *p = ps->p;
    unsigned c = *p, cp, len, min;
    if (c < 0xc2 || c > 0xf4) return -1;
    len = c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : 2;
    min = len == 4 ? 0x10000 : len == 3 ? 0x800 : 0x80;
    if ((size_t)(ps->end - p) < len) return -1;
    cp = c & (0x7f >> len);
    for (unsigned i = 1; i < len; i++) {
        if ((p[i] & 0xc0) != 0x80) return -1;
        cp = cp << 6 | (p[i] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp < 0xe000)) return -1;
    memcpy(ps->out, p, len);
    ps->out += len;
    ps->p += len;
    return 0;
}

/* Decodes into the arena: never longer than its quoted source, so the arena
 * (the size of the text) always has room, terminating NUL included. */
static int string(struct parser *ps, const char **s, size_t *n, bool *has_nul) {
    char *start = ps->out;
    bool nul = false;
    ps->p++;
    for (;;) {
        if (ps->p >= ps->end) return -1;
        unsigned c = *ps->p;
        if (c == '"') break;
        if (c < 0x20) return -1; /* json.loads is strict about control characters */
        if (c >= 0x80) {
            if (raw_utf8(ps)) return -1;
            continue;
        }
        if (c != '\\') {
            *ps->out++ = (char)c;
            ps->p++;
            continue;
        }
        if (ps->end - ps->p < 2) return -1;
        c = ps->p[1];
        ps->p += 2;
        const char *simple = strchr("\"\\/bfnrt", (int)c);
        if (c && simple) {
            static const char to[] = "\"\\/\b\f\n\r\t";
            *ps->out++ = to[simple - "\"\\/bfnrt"];
            continue;
        }
        if (c != 'u' || ps->end - ps->p < 4) return -1;
        unsigned cp, lo;
        if (hex4(ps->p, &cp)) return -1;
        ps->p += 4;
        if (cp >= 0xd800 && cp < 0xdc00 && ps->end - ps->p >= 6 && ps->p[0] == '\\' && ps->p[1] == 'u' &&
            !hex4(ps->p + 2, &lo) && lo >= 0xdc00 && lo < 0xe000) {
            ps->p += 6;
            cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
        } else if (cp >= 0xd800 && cp < 0xe000) {
            return -1; /* a lone surrogate: no UTF-8 for it, Python would keep it */
        }
        if (cp == 0) nul = true;
        utf8(&ps->out, cp);
    }
    ps->p++;
    *ps->out++ = 0;
    *s = start;
    *n = (size_t)(ps->out - start - 1);
    if (has_nul) *has_nul = nul;
    return 0;
}

static int lit(struct parser *ps, const char *word) {
    size_t n = strlen(word);
    if ((size_t)(ps->end - ps->p) < n || memcmp(ps->p, word, n)) return -1;
    ps->p += n;
    return 0;
}

static int digits(struct parser *ps) {
    const unsigned char *s = ps->p;
    while (ps->p < ps->end && *ps->p >= '0' && *ps->p <= '9') ps->p++;
    return ps->p > s ? 0 : -1;
}

static int number(struct parser *ps, jnode *v) {
    const unsigned char *s = ps->p;
    bool inf = false;
    v->t = J_NUM;
    v->is_int = true;
    if (*ps->p == '-') ps->p++;
    if (!lit(ps, "Infinity")) {
        v->is_int = false;
        inf = true;
    } else if (ps->p < ps->end && *ps->p == '0') {
        ps->p++;
    } else if (digits(ps)) {
        return -1;
    }
    if (!inf && ps->end - ps->p >= 2 && *ps->p == '.' && ps->p[1] >= '0' && ps->p[1] <= '9') {
        ps->p++;
        digits(ps);
        v->is_int = false;
    }
    if (ps->p < ps->end && (*ps->p | 32) == 'e' && !inf) {
        const unsigned char *e = ps->p++;
        if (ps->p < ps->end && (*ps->p == '+' || *ps->p == '-')) ps->p++;
        if (digits(ps)) ps->p = e; /* Python's regex leaves "1e" as 1 then fails on "e" */
        else v->is_int = false;
    }
    size_t n = (size_t)(ps->p - s);
    memcpy(ps->out, s, n);
    v->s = ps->out;
    v->n = n;
    ps->out += n;
    *ps->out++ = 0;
    return 0;
}

static int value(struct parser *ps);

static int container(struct parser *ps, int self, bool obj) {
    unsigned char close = obj ? '}' : ']';
    int last = -1;
    if (++ps->depth > MAX_DEPTH) return -1;
    ps->p++;
    ws(ps);
    if (ps->p < ps->end && *ps->p == close) {
        ps->p++;
        ps->depth--;
        return 0;
    }
    for (;;) {
        const char *key = NULL;
        size_t keylen = 0;
        ws(ps);
        if (obj) {
            if (ps->p >= ps->end || *ps->p != '"' || string(ps, &key, &keylen, NULL)) return -1;
            ws(ps);
            if (ps->p >= ps->end || *ps->p != ':') return -1;
            ps->p++;
        }
        int k = value(ps);
        if (k < 0) return -1;
        jnode *d = ps->d->v;
        d[k].key = key;
        d[k].keylen = keylen;
        if (obj) {
            if (d[self].nkids >= MAX_KEYS) return -1;
            for (int o = d[self].kid; o >= 0; o = d[o].next)
                if (d[o].keylen == keylen && !memcmp(d[o].key, key, keylen)) return -1;
        }
        if (last < 0) d[self].kid = k;
        else d[last].next = k;
        last = k;
        d[self].nkids++;
        ws(ps);
        if (ps->p >= ps->end) return -1;
        if (*ps->p == ',') {
            ps->p++;
            continue;
        }
        if (*ps->p != close) return -1;
        ps->p++;
        ps->depth--;
        return 0;
    }
}

static int value(struct parser *ps) {
    ws(ps);
    if (ps->p >= ps->end) return -1;
    int i = node(ps);
    jnode *v = &ps->d->v[i];
    unsigned c = *ps->p;
    if (c == '{' || c == '[') {
        v->t = c == '{' ? J_OBJ : J_ARR;
        return container(ps, i, c == '{') ? -1 : i;
    }
    if (c == '"') {
        v->t = J_STR;
        return string(ps, &v->s, &v->n, &v->has_nul) ? -1 : i;
    }
    if (!lit(ps, "true")) v->t = J_BOOL, v->b = true;
    else if (!lit(ps, "false")) v->t = J_BOOL;
    else if (!lit(ps, "null")) v->t = J_NULL;
    else if (!lit(ps, "NaN")) v->t = J_NUM, v->s = "NaN", v->n = 3;
    else if (c == '-' || c == 'I' || (c >= '0' && c <= '9')) return number(ps, v) ? -1 : i;
    else return -1;
    return i;
}

int json_parse(jdoc *d, const unsigned char *text, size_t len) {
    memset(d, 0, sizeof *d);
    d->arena = malloc(len + 1);
    if (!d->arena) oom();
    struct parser ps = {d, text, text + len, d->arena, 0};
    if (value(&ps) != 0 || d->v[0].t != J_OBJ) return -1;
    ws(&ps);
    return ps.p == ps.end ? 0 : -1;
}

void json_free(jdoc *d) {
    free(d->v);
    free(d->arena);
    memset(d, 0, sizeof *d);
}

jnode *jkid(jdoc *d, jnode *v) { return v && v->kid >= 0 ? &d->v[v->kid] : NULL; }
jnode *jnext(jdoc *d, jnode *v) { return v->next >= 0 ? &d->v[v->next] : NULL; }

jnode *jget(jdoc *d, jnode *obj, const char *key) {
    size_t n = strlen(key);
    if (!obj || obj->t != J_OBJ) return NULL;
    for (jnode *k = jkid(d, obj); k; k = jnext(d, k))
        if (k->keylen == n && !memcmp(k->key, key, n)) return k;
    return NULL;
}

/* Python's bool() of the decoded value. */
bool jtruthy(jnode *v) {
    if (!v) return false;
    switch (v->t) {
    case J_BOOL: return v->b;
    case J_NUM:
        if (v->is_int) { /* an integer is zero when every digit is */
            for (const char *p = v->s; *p; p++)
                if (*p >= '1' && *p <= '9') return true;
            return false;
        }
        return strtod(v->s, NULL) != 0 || !strcmp(v->s, "NaN");
    case J_STR: return v->n > 0;
    case J_ARR:
    case J_OBJ: return v->nkids > 0;
    default: return false;
    }
}

bool jnullish(jnode *v) { return !v || v->t == J_NULL; }

bool jonly_keys(jdoc *d, jnode *obj, const char *const *keys) {
    for (jnode *k = jkid(d, obj); k; k = jnext(d, k)) {
        const char *const *w = keys;
        while (*w && !(strlen(*w) == k->keylen && !memcmp(*w, k->key, k->keylen))) w++;
        if (!*w) return false;
    }
    return true;
}
