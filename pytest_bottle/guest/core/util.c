/* Output buffers, JSON string output exactly as Python's json.dumps writes it,
 * and the few parsers and printers a clone's setup needs (no libc's: see core.h). */
#include "core.h"

#include <limits.h>
#include <netinet/in.h>

#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

void oom(void) {
    say("bottle-agent-core: out of memory");
    _exit(1);
}

static void b_grow(buf_t *b, size_t more) {
    if (b->n + more <= b->cap) return;
    size_t cap = (b->n + more) * 2 + 256;
    char *p = realloc(b->p, cap);
    if (!p) oom();
    b->p = p;
    b->cap = cap;
}

void b_put(buf_t *b, const void *d, size_t n) {
    b_grow(b, n);
    memcpy(b->p + b->n, d, n);
    b->n += n;
}

void b_str(buf_t *b, const char *s) { b_put(b, s, strlen(s)); }

void b_int(buf_t *b, long long v) {
    char tmp[24], *p = tmp + sizeof tmp;
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    do {
        *--p = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0) *--p = '-';
    b_put(b, p, (size_t)(tmp + sizeof tmp - p));
}

void b_free(buf_t *b) {
    free(b->p);
    b->p = NULL;
    b->n = b->cap = 0;
}

static const char HEX[] = "0123456789abcdef";

static void b_u(buf_t *b, unsigned cp) {
    char e[6] = {'\\', 'u', HEX[cp >> 12 & 15], HEX[cp >> 8 & 15], HEX[cp >> 4 & 15], HEX[cp & 15]};
    b_put(b, e, 6);
}

/* Our strings are valid UTF-8 (json_parse checks); ensure_ascii writes every
 * code point outside ' '..'~' as \uXXXX, astral ones as a surrogate pair. */
void b_jstr(buf_t *b, const char *s, size_t n) {
    const unsigned char *p = (const unsigned char *)s, *end = p + n;
    b_put(b, "\"", 1);
    while (p < end) {
        unsigned c = *p;
        if (c >= 0x80) {
            unsigned cp;
            int len = c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : 2;
            if (end - p < len) break;
            cp = c & (0x7f >> len);
            for (int i = 1; i < len; i++) cp = cp << 6 | (p[i] & 0x3f);
            p += len;
            if (cp >= 0x10000) {
                cp -= 0x10000;
                b_u(b, 0xd800 | cp >> 10);
                b_u(b, 0xdc00 | (cp & 0x3ff));
            } else {
                b_u(b, cp);
            }
            continue;
        }
        p++;
        if (c == '"' || c == '\\') {
            char e[2] = {'\\', (char)c};
            b_put(b, e, 2);
        } else if (c == '\n') {
            b_put(b, "\\n", 2);
        } else if (c == '\r') {
            b_put(b, "\\r", 2);
        } else if (c == '\t') {
            b_put(b, "\\t", 2);
        } else if (c == '\b') {
            b_put(b, "\\b", 2);
        } else if (c == '\f') {
            b_put(b, "\\f", 2);
        } else if (c < 0x20 || c == 0x7f) {
            b_u(b, c);
        } else {
            char ch = (char)c;
            b_put(b, &ch, 1);
        }
    }
    b_put(b, "\"", 1);
}

int hexval(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    c |= 32;
    return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

bool parse_i64(const char *s, long long *out) {
    bool neg = *s == '-';
    unsigned long long v = 0, max = neg ? (unsigned long long)LLONG_MAX + 1 : (unsigned long long)LLONG_MAX;
    s += neg;
    if (!*s) return false;
    for (; *s; s++) {
        if (*s < '0' || *s > '9') return false;
        unsigned d = (unsigned)(*s - '0');
        if (v > (max - d) / 10) return false;
        v = v * 10 + d;
    }
    *out = neg ? (long long)(0 - v) : (long long)v;
    return true;
}

/* inet_ntop(AF_INET): dotted decimal, no leading zeros. */
void ipv4_text(struct in_addr in, char out[16]) {
    const unsigned char *b = (const unsigned char *)&in.s_addr;
    char *p = out;
    for (int i = 0; i < 4; i++) {
        unsigned v = b[i];
        if (i) *p++ = '.';
        if (v >= 100) *p++ = (char)('0' + v / 100);
        if (v >= 10) *p++ = (char)('0' + v / 10 % 10);
        *p++ = (char)('0' + v % 10);
    }
    *p = 0;
}

/* Plain "a.b.c.d" (what the host sends) without inet_aton; anything else goes to inet_aton. */
bool dotted_quad(const char *s, struct in_addr *in) {
    unsigned char b[4];
    for (int i = 0; i < 4; i++) {
        unsigned v = 0, digits = 0;
        if (*s == '0' && s[1] >= '0' && s[1] <= '9') return false; /* octal to inet_aton */
        for (; *s >= '0' && *s <= '9' && digits < 4; s++, digits++) v = v * 10 + (unsigned)(*s - '0');
        if (!digits || v > 255 || *s != (i < 3 ? '.' : '\0')) return false;
        b[i] = (unsigned char)v;
        s += i < 3;
    }
    memcpy(&in->s_addr, b, 4);
    return true;
}

double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* cannot fail for this clock */
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

void say(const char *msg) {
    size_t n = strlen(msg);
    char line[512];
    if (n > sizeof line - 1) n = sizeof line - 1;
    memcpy(line, msg, n);
    line[n] = '\n';
    if (write(2, line, n + 1) < 0) {
        /* nowhere left to complain */
    }
}
