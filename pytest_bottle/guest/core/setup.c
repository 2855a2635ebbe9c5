/* The setup op: identity.setup, step for step.  Whatever identity.py would
 * fail on in a way not worth mirroring is refused up front (setup_check), so
 * the Python agent runs it; once started, errors are reported as it would. */
#include "core.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static const char *const SETUP_KEYS[] = {"op",          "entropy",     "time_ns",         "hostname", "machine_id",
                                         "ssh_host_key", "resolv_conf", "authorized_keys", "nics",     "list_nics",
                                         NULL};
#define RESOLV "/etc/resolv.conf"
#define RESOLV_MAX (16 * 1024 * 1024)

int set_oserr(struct err *e, int no, const char *path) {
    e->no = no;
    e->path = NULL;
    if (path) {
        size_t n = strlen(path);
        if (n >= sizeof e->pathbuf) n = sizeof e->pathbuf - 1;
        memcpy(e->pathbuf, path, n);
        e->pathbuf[n] = 0;
        e->path = e->pathbuf;
    }
    return -1;
}

static bool str_or_null(jnode *v) { return jnullish(v) || v->t == J_STR; }

static bool valid_utf8(const unsigned char *p, size_t n) {
    for (size_t i = 0; i < n;) {
        unsigned c = p[i], len, cp, min;
        if (c < 0x80) {
            i++;
            continue;
        }
        if (c < 0xc2 || c > 0xf4) return false;
        len = c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : 2;
        min = len == 4 ? 0x10000 : len == 3 ? 0x800 : 0x80;
        if (n - i < len) return false;
        cp = c & (0x7f >> len);
        for (unsigned k = 1; k < len; k++) {
            if ((p[i + k] & 0xc0) != 0x80) return false;
            cp = cp << 6 | (p[i + k] & 0x3f);
        }
        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp < 0xe000)) return false;
        i += len;
    }
    return true;
}

/* A whole small file; -1 with errno set. */
static ssize_t slurp(const char *path, buf_t *b, size_t max) {
    int fd;
    do fd = open(path, O_RDONLY | O_CLOEXEC);
    while (fd < 0 && errno == EINTR);
    if (fd < 0) return -1;
    for (;;) {
        char tmp[4096];
        ssize_t n = read(fd, tmp, sizeof tmp);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0 || b->n + (size_t)n > max) {
            int e = n < 0 ? errno : EFBIG;
            close(fd);
            if (n == 0) return (ssize_t)b->n;
            errno = e;
            return -1;
        }
        b_put(b, tmp, (size_t)n);
    }
}

/* Python's open() reads text with universal newlines: \r\n and \r are \n. */
static size_t newlines(char *p, size_t n) {
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        if (p[i] == '\r') {
            p[o++] = '\n';
            if (i + 1 < n && p[i + 1] == '\n') i++;
        } else {
            p[o++] = p[i];
        }
    }
    return o;
}

int setup_check(jdoc *d, jnode *call) {
    jnode *v;
    if (!jonly_keys(d, call, SETUP_KEYS)) return 0;
    v = jget(d, call, "list_nics");
    if (!jnullish(v) && !(v->t == J_BOOL && !v->b)) return 0; /* the interfaces' listing stays Python's */
    v = jget(d, call, "entropy");
    if (!str_or_null(v)) return 0;
    if (v && v->t == J_STR) {
        /* bytes.fromhex would also take spaces; fcntl.ioctl takes 1024 bytes */
        if (v->n % 2 || v->n / 2 + 8 > 1024) return 0;
        for (size_t i = 0; i < v->n; i++)
            if (hexval((unsigned char)v->s[i]) < 0) return 0;
    }
    v = jget(d, call, "time_ns");
    if (!jnullish(v)) {
        if (v->t != J_NUM || !v->is_int) return 0;
        long long t;
        if (!parse_i64(v->s, &t)) return 0; /* beyond int64: Python raises OverflowError */
    }
    v = jget(d, call, "hostname");
    if (!str_or_null(v) || (v && v->t == J_STR && v->has_nul)) return 0;
    if (!str_or_null(jget(d, call, "machine_id")) || !str_or_null(jget(d, call, "authorized_keys"))) return 0;
    v = jget(d, call, "ssh_host_key");
    if (!jnullish(v)) {
        if (v->t != J_OBJ) return 0;
        if (v->nkids) {
            jnode *a = jget(d, v, "private"), *b = jget(d, v, "public");
            if (!a || a->t != J_STR || !b || b->t != J_STR) return 0;
        }
    }
    v = jget(d, call, "resolv_conf");
    if (!str_or_null(v)) return 0;
    if (v && v->t == J_STR) {
        /* identity.py would raise UnicodeDecodeError reading it: its own words */
        buf_t b = {0};
        ssize_t n = slurp(RESOLV, &b, RESOLV_MAX);
        bool bad = (n < 0 && errno == EFBIG) || (n >= 0 && !valid_utf8((unsigned char *)b.p, (size_t)n));
        b_free(&b);
        if (bad) return 0;
    }
    v = jget(d, call, "nics");
    if (v) {
        if (v->t != J_ARR) return 0;
        for (jnode *nic = jkid(d, v); nic; nic = jnext(d, nic))
            if (!nic_check(d, nic)) return 0;
    }
    return 1;
}

/* identity._write: in place, no new inode, chmod or truncate unless needed. */
static int write_file(const char *path, const char *text, size_t n, const char *nl, mode_t mode, struct err *er) {
    int fd;
    do fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, mode);
    while (fd < 0 && errno == EINTR);
    if (fd < 0) return set_oserr(er, errno, path);
    int rc = 0;
    size_t total = n + strlen(nl);
    char *data = malloc(total + 1);
    if (!data) oom();
    memcpy(data, text, n);
    strcpy(data + n, nl);
    off_t size = lseek(fd, 0, SEEK_END);
    if (size < 0 || pwrite(fd, data, total, 0) < 0 || (size > (off_t)total && ftruncate(fd, (off_t)total)))
        rc = set_oserr(er, errno, NULL);
    free(data);
    close(fd);
    return rc;
}

static int write_if_changed(const char *path, jnode *text, mode_t mode, struct err *er) {
    buf_t b = {0};
    ssize_t n = slurp(path, &b, RESOLV_MAX);
    bool same = n >= 0 && valid_utf8((unsigned char *)b.p, (size_t)n) &&
                newlines(b.p, (size_t)n) == text->n && !memcmp(b.p, text->s, text->n);
    b_free(&b);
    return same ? 0 : write_file(path, text->s, text->n, "", mode, er);
}

/* Opened before the snapshot, so that no clone opens it again; kept open. */
static int urandom_fd = -1;

static void urandom_preopen(void) {
    while (urandom_fd < 0 && (urandom_fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC)) < 0 && errno == EINTR) {
    }
}

void setup_preopen(void) {
    urandom_preopen();
    nic_preopen();
}

static int add_entropy(jnode *hex, struct err *er) {
    size_t n = hex->n / 2;
    struct rand_pool_info *info = calloc(1, sizeof *info + n);
    if (!info) oom();
    unsigned char *p = (unsigned char *)info->buf;
    for (size_t i = 0; i < n; i++)
        p[i] = (unsigned char)(hexval((unsigned char)hex->s[2 * i]) << 4 | hexval((unsigned char)hex->s[2 * i + 1]));
    info->entropy_count = (int)n * 8;
    info->buf_size = (int)n;
    int rc = 0;
    urandom_preopen(); /* done before the snapshot; again only if that failed */
    if (urandom_fd < 0) {
        free(info);
        return set_oserr(er, errno, "/dev/urandom");
    }
    /* reseed now, not at the CRNG's next scheduled reseed */
    if (ioctl(urandom_fd, RNDADDENTROPY, info) || ioctl(urandom_fd, RNDRESEEDCRNG, 0)) rc = set_oserr(er, errno, NULL);
    free(info);
    return rc;
}

static int set_time(jnode *v, struct err *er) {
    long long t = 0;
    parse_i64(v->s, &t); /* setup_check took it */
    struct timespec ts = {.tv_sec = t / 1000000000LL, .tv_nsec = t % 1000000000LL};
    if (ts.tv_nsec < 0) { /* _PyTime_AsTimespec floors */
        ts.tv_nsec += 1000000000L;
        ts.tv_sec -= 1;
    }
    return clock_settime(CLOCK_REALTIME, &ts) ? set_oserr(er, errno, NULL) : 0;
}

/* os.makedirs("/root/.ssh", 0o700, exist_ok=True) */
static int make_ssh_dir(struct err *er) {
    struct stat st;
    if (stat("/root", &st) && errno == ENOENT && mkdir("/root", 0777) && errno != EEXIST)
        return set_oserr(er, errno, "/root");
    if (mkdir("/root/.ssh", 0700) == 0) return 0;
    int e = errno;
    if (stat("/root/.ssh", &st) == 0 && S_ISDIR(st.st_mode)) return 0;
    return set_oserr(er, e, "/root/.ssh");
}

struct nicname {
    const char *mac;
    size_t maclen;
    char name[32];
};

static int steps(jdoc *d, jnode *call, struct err *er, struct nicname *out, size_t *nout) {
    jnode *v;
    if ((v = jget(d, call, "entropy")) && jtruthy(v) && add_entropy(v, er)) return -1;
    if ((v = jget(d, call, "time_ns")) && jtruthy(v) && set_time(v, er)) return -1;
    if ((v = jget(d, call, "hostname")) && jtruthy(v)) {
        /* resolves through nss-myhostname: /etc/hosts need not change */
        if (sethostname(v->s, v->n)) return set_oserr(er, errno, NULL);
        if (write_file("/etc/hostname", v->s, v->n, "\n", 0644, er)) return -1;
    }
    if ((v = jget(d, call, "machine_id")) && jtruthy(v) && write_file("/etc/machine-id", v->s, v->n, "\n", 0444, er))
        return -1;
    if ((v = jget(d, call, "ssh_host_key")) && jtruthy(v)) {
        /* the image has no other host keys and sshd_config names only this one */
        jnode *a = jget(d, v, "private"), *b = jget(d, v, "public");
        if (write_file("/etc/ssh/ssh_host_ed25519_key", a->s, a->n, "", 0600, er) ||
            write_file("/etc/ssh/ssh_host_ed25519_key.pub", b->s, b->n, "", 0644, er))
            return -1;
    }
    if ((v = jget(d, call, "resolv_conf")) && !jnullish(v) && write_if_changed(RESOLV, v, 0644, er)) return -1;
    if ((v = jget(d, call, "authorized_keys")) && jtruthy(v)) {
        if (make_ssh_dir(er) || write_file("/root/.ssh/authorized_keys", v->s, v->n, "", 0600, er)) return -1;
    }
    for (jnode *nic = jkid(d, jget(d, call, "nics")); nic; nic = jnext(d, nic)) {
        char name[32];
        jnode *given = jget(d, nic, "name"), *mac = jget(d, nic, "mac");
        if (nic_configure(d, nic, false, name, er)) {
            /* the seed's name for it was wrong after all */
            if (er->type || er->no != ENODEV || !jtruthy(given)) return -1;
            if (nic_configure(d, nic, true, name, er)) return -1;
        }
        /* a dict: a MAC seen before keeps its place, takes the new name */
        size_t i = 0;
        while (i < *nout && !(out[i].maclen == mac->n && !memcmp(out[i].mac, mac->s, mac->n))) i++;
        if (i == *nout) out[(*nout)++] = (struct nicname){mac->s, mac->n, ""};
        memcpy(out[i].name, name, sizeof name);
    }
    return 0;
}

void op_setup(uint32_t rid, jdoc *d, jnode *call) {
    struct err er = {0};
    jnode *nics = jget(d, call, "nics");
    struct nicname *out = calloc(nics ? (size_t)nics->nkids + 1 : 1, sizeof *out);
    size_t nout = 0;
    if (!out) oom();
    if (steps(d, call, &er, out, &nout)) {
        if (er.type) send_error(rid, er.type, er.msg);
        else send_oserror(rid, er.no, er.path);
    } else {
        buf_t b = {0};
        b_str(&b, "\"nics\":{");
        for (size_t i = 0; i < nout; i++) {
            if (i) b_str(&b, ",");
            b_jstr(&b, out[i].mac, out[i].maclen);
            b_str(&b, ":");
            b_jstr(&b, out[i].name, strlen(out[i].name));
        }
        b_str(&b, "}");
        send_reply(rid, &b);
        b_free(&b);
    }
    free(out);
}
