/* The guest end of the virtio port (frames.Channel): the input buffer and
 * writes that never stop the core from reading. */
#include "core.h"

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

unsigned char *ib;
size_t ih, it;
bool synced;
double backoff_until;
unsigned long port_gen;
unsigned char hello_frame[HDR + HELLO_LEN];
static double idle = 0.001;

void put_header(unsigned char *h, int kind, uint32_t rid, uint32_t len) {
    h[0] = (unsigned char)kind;
    for (int i = 0; i < 4; i++) {
        h[1 + i] = (unsigned char)(rid >> (24 - 8 * i));
        h[5 + i] = (unsigned char)(len >> (24 - 8 * i));
    }
}

void port_init(void) {
    /* Never touched beyond what is used: the pages stay unmapped until then. */
    ib = malloc(INBUF_CAP);
    if (!ib) oom();
}

bool port_room(void) { return it - ih < INBUF_CAP; }

/* Reads at most CHUNK, like Channel._fill.  No host: the port reads as EOF
 * at once; what was buffered belonged to the host that left. */
int port_read(void) {
    if (INBUF_CAP - it < CHUNK && ih > 0) {
        memmove(ib, ib + ih, it - ih);
        it -= ih;
        ih = 0;
    }
    size_t room = INBUF_CAP - it;
    if (room == 0) return -1;
    ssize_t n = read(PORT_FD, ib + it, room < CHUNK ? room : CHUNK);
    if (n > 0) {
        it += (size_t)n;
        idle = 0.001;
        return (int)n;
    }
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return -1;
    static bool told;
    if (n < 0 && !told) { /* once: it may fail again at every backoff */
        told = true;
        say("bottle-agent-core: reading the port failed; taken as no host");
    }
    ih = it = 0;
    port_gen++;
    synced = false;
    backoff_until = mono() + idle;
    idle = idle * 2 < 0.05 ? idle * 2 : 0.05;
    return 0;
}

/* The port is blocking and shared with the Python agent, so no O_NONBLOCK:
 * wait for POLLOUT (a virtio port write then takes up to 32 KiB without
 * blocking), reading meanwhile so that a host waiting to send us credit
 * is never stuck behind us. */
static int write_iov(struct iovec *iov, int cnt) {
    while (cnt > 0) {
        if (iov[0].iov_len == 0) {
            iov++, cnt--;
            continue;
        }
        struct pollfd p = {PORT_FD, (short)(POLLOUT | (port_room() ? POLLIN : 0)), 0};
        int r = poll(&p, 1, -1);
        if (r < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (p.revents & POLLIN) {
            if (port_read() == 0) return -1; /* the host left */
            continue;
        }
        if (!(p.revents & POLLOUT)) {
            if (p.revents & (POLLERR | POLLNVAL)) return -1;
            /* POLLHUP alone: no host, and a write would block until one comes */
            struct timespec ts = {0, 1000000};
            nanosleep(&ts, NULL);
            continue;
        }
        struct iovec v[2];
        int nv = 0;
        size_t budget = 32 * 1024;
        for (int i = 0; i < cnt && i < 2 && budget; i++) {
            v[nv].iov_base = iov[i].iov_base;
            v[nv].iov_len = iov[i].iov_len < budget ? iov[i].iov_len : budget;
            budget -= v[nv++].iov_len;
        }
        ssize_t w = writev(PORT_FD, v, nv);
        if (w < 0) {
            if (errno == EAGAIN || errno == EINTR) continue;
            return -1;
        }
        size_t done = (size_t)w;
        while (done && cnt) {
            size_t k = done < iov[0].iov_len ? done : iov[0].iov_len;
            iov[0].iov_base = (char *)iov[0].iov_base + k;
            iov[0].iov_len -= k;
            done -= k;
            if (iov[0].iov_len == 0) iov++, cnt--;
        }
    }
    return 0;
}

int port_send(int kind, uint32_t rid, const void *p, size_t n) {
    unsigned char h[HDR];
    put_header(h, kind, rid, (uint32_t)n);
    struct iovec iov[2] = {{h, HDR}, {(void *)p, n}};
    return write_iov(iov, 2);
}
