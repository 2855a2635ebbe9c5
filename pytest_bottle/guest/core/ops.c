/* Replies in the Python agent's format (agent.Agent.run), and the hello op. */
#include "core.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

void send_reply(uint32_t rid, buf_t *body) {
    buf_t r = {0};
    b_str(&r, "{");
    b_put(&r, body->p, body->n);
    b_str(&r, body->n ? ",\"ok\":true}" : "\"ok\":true}");
    port_send(REPLY, rid, r.p, r.n); /* the host left: nobody to tell */
    b_free(&r);
}

/* Python's repr() of a str, for the ASCII strings we report. */
void py_repr(buf_t *b, const char *s) {
    char q = strchr(s, '\'') && !strchr(s, '"') ? '"' : '\'';
    b_put(b, &q, 1);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        char e[4] = {'\\', 0, 0, 0};
        if (*p == '\\' || *p == (unsigned char)q) e[1] = (char)*p;
        else if (*p == '\n') e[1] = 'n';
        else if (*p == '\r') e[1] = 'r';
        else if (*p == '\t') e[1] = 't';
        if (e[1]) {
            b_put(b, e, 2);
        } else if (*p < 0x20 || *p == 0x7f) {
            static const char hex[] = "0123456789abcdef";
            e[1] = 'x', e[2] = hex[*p >> 4], e[3] = hex[*p & 15];
            b_put(b, e, 4);
        } else {
            b_put(b, p, 1);
        }
    }
    b_put(b, &q, 1);
}

/* str(OSError(errno, strerror(errno), path)) and its fields. */
void send_oserror(uint32_t rid, int e, const char *path) {
    buf_t msg = {0}, r = {0};
    b_str(&msg, "[Errno ");
    b_int(&msg, e);
    b_str(&msg, "] ");
    b_str(&msg, strerror(e));
    if (path) {
        b_str(&msg, ": ");
        py_repr(&msg, path);
    }
    b_str(&r, "{\"ok\":false,\"error\":");
    b_jstr(&r, msg.p, msg.n);
    b_str(&r, ",\"errno\":");
    b_int(&r, e);
    b_str(&r, ",\"type\":\"OSError\",\"path\":");
    if (path) b_jstr(&r, path, strlen(path));
    else b_str(&r, "null");
    b_str(&r, "}");
    port_send(REPLY, rid, r.p, r.n);
    b_free(&msg);
    b_free(&r);
}

void send_error(uint32_t rid, const char *type, const char *msg) {
    buf_t r = {0}, m = {0};
    b_str(&m, type);
    b_str(&m, ": ");
    b_str(&m, msg);
    b_str(&r, "{\"ok\":false,\"error\":");
    b_jstr(&r, m.p, m.n);
    b_str(&r, ",\"type\":");
    b_jstr(&r, type, strlen(type));
    b_str(&r, "}");
    port_send(REPLY, rid, r.p, r.n);
    b_free(&m);
    b_free(&r);
}

int op_hello(uint32_t rid) {
    static const char *const path = "/proc/sys/kernel/random/boot_id";
    char boot_id[128];
    ssize_t n;
    int fd;
    do fd = open(path, O_RDONLY | O_CLOEXEC);
    while (fd < 0 && errno == EINTR);
    if (fd < 0) {
        send_oserror(rid, errno, path);
        return 1;
    }
    do n = read(fd, boot_id, sizeof boot_id);
    while (n < 0 && errno == EINTR);
    int e = errno;
    close(fd);
    if (n < 0) {
        send_oserror(rid, e, NULL);
        return 1;
    }
    /* str.strip(): ASCII whitespace and the separators \x1c-\x1f */
    char *s = boot_id, *end = boot_id + n;
    while (s < end && *s && strchr(" \t\n\r\v\f\x1c\x1d\x1e\x1f", *s)) s++;
    while (end > s && end[-1] && strchr(" \t\n\r\v\f\x1c\x1d\x1e\x1f", end[-1])) end--;
    struct timespec ts;
    clock_gettime(CLOCK_BOOTTIME, &ts); /* cannot fail on Linux */
    char up[48];
    snprintf(up, sizeof up, "%.9f", (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9);
    buf_t b = {0};
    b_str(&b, "\"version\":2,\"boot_id\":");
    b_jstr(&b, s, (size_t)(end - s));
    b_str(&b, ",\"uptime\":");
    b_str(&b, up);
    send_reply(rid, &b);
    b_free(&b);
    return 1;
}
