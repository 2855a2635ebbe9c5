/* The core's lifecycle: GO from the Python agent, one poll() loop over the
 * port and every exec, HANDBACK at the first call it does not handle. */
#include "core.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static const unsigned char SYNC_MAGIC[MAGIC_LEN] = "\xb0pytest-bottle\x00\x02";
static unsigned char sync_frame[SYNC_FRAME_LEN];
static long long syncs;

static int read_full(int fd, void *p, size_t n) {
    while (n) {
        ssize_t r = read(fd, p, n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        p = (char *)p + r;
        n -= (size_t)r;
    }
    return 0;
}

static int send_full(int fd, const void *p, size_t n) {
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        p = (const char *)p + w;
        n -= (size_t)w;
    }
    return 0;
}

static void gone(void) {
    spare_drop();
    say("bottle-agent-core: the Python agent is gone");
    _exit(1);
}

/* SCM_RIGHTS takes at most SCM_MAX_FD (253) descriptors per message. */
#define FDS_PER_MSG 253

/* Give the port back: the Python agent takes over from the CALL frame at
 * ib[ih], with every exec still in flight.  Children are not reaped here:
 * they are re-parented to the Python agent when we exit. */
static void __attribute__((noreturn)) handback(void) {
    spare_drop(); /* the Python agent spawns its own */
    exec_reply_reaped();
    buf_t j = {0};
    double now = mono();
    int *fds = malloc((2 * nexec + 1) * sizeof *fds);
    size_t nfds = 0;
    if (!fds) oom();
    b_str(&j, synced ? "{\"synced\":true,\"syncs\":" : "{\"synced\":false,\"syncs\":");
    b_int(&j, syncs);
    b_str(&j, ",\"execs\":[");
    for (size_t i = 0; i < nexec; i++) {
        struct exec *e = &execs[i];
        char left[40];
        if (e->deadline >= 0 && !e->exited) {
            double l = e->deadline - now;
            snprintf(left, sizeof left, "%.6f", l > 0 ? l : 0.0);
        } else {
            strcpy(left, "null");
        }
        b_str(&j, i ? ",{\"rid\":" : "{\"rid\":");
        b_int(&j, e->rid);
        b_str(&j, ",\"pid\":");
        b_int(&j, e->pid);
        b_str(&j, e->out >= 0 ? ",\"out\":true" : ",\"out\":false");
        b_str(&j, e->err >= 0 ? ",\"err\":true" : ",\"err\":false");
        b_str(&j, ",\"left\":");
        b_str(&j, left);
        b_str(&j, ",\"credit\":");
        b_int(&j, e->window);
        b_str(&j, e->timed_out ? ",\"timed_out\":true" : ",\"timed_out\":false");
        b_str(&j, e->killed ? ",\"killed\":true" : ",\"killed\":false");
        b_str(&j, e->stale ? ",\"stale\":true}" : ",\"stale\":false}");
        if (e->out >= 0) fds[nfds++] = e->out;
        if (e->err >= 0) fds[nfds++] = e->err;
    }
    b_str(&j, "],\"bytes\":");
    b_int(&j, (long long)(it - ih));
    b_str(&j, "}");
    uint32_t len = (uint32_t)j.n;
    /* The first message carries the length and the fds; should there be more
     * fds than one message takes, each further message carries one JSON byte. */
    size_t sent_fds = 0, jsent = 0;
    do {
        size_t k = nfds - sent_fds < FDS_PER_MSG ? nfds - sent_fds : FDS_PER_MSG;
        struct iovec iov = sent_fds == 0 ? (struct iovec){&len, sizeof len} : (struct iovec){j.p + jsent, 1};
        char cbuf[CMSG_SPACE(FDS_PER_MSG * sizeof(int))];
        struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1};
        if (k) {
            memset(cbuf, 0, sizeof cbuf);
            m.msg_control = cbuf;
            m.msg_controllen = CMSG_SPACE(k * sizeof(int));
            struct cmsghdr *c = CMSG_FIRSTHDR(&m);
            c->cmsg_level = SOL_SOCKET;
            c->cmsg_type = SCM_RIGHTS;
            c->cmsg_len = CMSG_LEN(k * sizeof(int));
            memcpy(CMSG_DATA(c), fds + sent_fds, k * sizeof(int));
        }
        ssize_t w;
        do w = sendmsg(AGENT_FD, &m, MSG_NOSIGNAL);
        while (w < 0 && errno == EINTR);
        if (w <= 0) gone();
        if (sent_fds == 0 && (size_t)w < sizeof len && send_full(AGENT_FD, (char *)&len + w, sizeof len - (size_t)w))
            gone();
        if (sent_fds != 0) jsent++;
        sent_fds += k;
    } while (sent_fds < nfds);
    if (send_full(AGENT_FD, j.p + jsent, j.n - jsent) || send_full(AGENT_FD, ib + ih, it - ih)) gone();
    unsigned char ack;
    if (read_full(AGENT_FD, &ack, 1)) gone();
    _exit(0);
}

static size_t limit(int kind) {
    switch (kind) {
    case DATA:
    case STDOUT_K:
    case STDERR_K: return CHUNK;
    case CREDIT: return 4;
    case HELLO: return HELLO_LEN;
    case STARTED: return 256;
    case FEOF:
    case CANCEL:
    case PING: return 0;
    default: return MAX_PAYLOAD;
    }
}

static uint32_t be32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void on_sync(void) {
    syncs++;
    /* Their callers are gone: no more frames and no reply, but drained and
     * reaped as usual.  The new host numbers its calls afresh. */
    for (size_t i = 0; i < nexec; i++) {
        if (!execs[i].stale) exec_kill(&execs[i]);
        execs[i].stale = true;
    }
    port_send(HELLO, 0, hello_frame + HDR, HELLO_LEN);
}

/* 1 handled, 0 hand back (the frame stays in the buffer). */
static int on_call(uint32_t rid, const unsigned char *payload, size_t n) {
    jdoc d;
    int done = 0;
    /* A node per JSON value: a call this big (a huge argv) goes to Python,
     * whose objects are smaller than ours. */
    if (n <= CORE_CALL_MAX && json_parse(&d, payload, n) == 0) {
        jnode *call = &d.v[0], *op = jget(&d, call, "op");
        if (op && op->t == J_STR && op->has_nul) op = NULL; /* "hello\0x" is no op of ours */
        if (op && op->t == J_STR && !strcmp(op->s, "hello")) done = op_hello(rid);
        else if (op && op->t == J_STR && !strcmp(op->s, "exec")) done = op_exec(rid, &d, call);
        else if (op && op->t == J_STR && !strcmp(op->s, "announce")) done = op_announce(rid, &d, call);
        else if (op && op->t == J_STR && !strcmp(op->s, "setup") && setup_check(&d, call)) {
            op_setup(rid, &d, call);
            done = 1;
        }
    }
    json_free(&d);
    return done;
}

/* Every whole frame in the buffer, as Channel.recv reads them. */
static void serve_frames(void) {
    while (it - ih >= HDR) {
        const unsigned char *h = ib + ih;
        int kind = h[0];
        uint32_t rid = be32(h + 1), size = be32(h + 5);
        if (kind == SYNC || !synced || kind < CALL || kind > STARTED || size > limit(kind)) {
            unsigned char *pos = memmem(ib + ih, it - ih, sync_frame, SYNC_FRAME_LEN);
            if (!pos) {
                if (it - ih > SYNC_FRAME_LEN) ih = it - SYNC_FRAME_LEN;
                return;
            }
            ih = (size_t)(pos - ib) + SYNC_FRAME_LEN;
            synced = true;
            on_sync();
            continue;
        }
        if (it - ih < HDR + (size_t)size) return;
        const unsigned char *payload = h + HDR;
        unsigned long gen = port_gen;
        if (kind == CALL) {
            if (!on_call(rid, payload, size)) handback();
        } else if (kind == PING) {
            port_send(HELLO, 0, hello_frame + HDR, HELLO_LEN);
        } else if (kind == CREDIT && size == 4) {
            struct exec *e = exec_find(rid);
            if (e) {
                e->window += be32(payload);
                if (e->window > ((int64_t)1 << 48)) e->window = (int64_t)1 << 48;
            }
        } else if (kind == CANCEL) {
            struct exec *e = exec_find(rid);
            if (e) exec_kill(e); /* its output still flows, its reply still comes */
        }
        /* A reply's write may have found the host gone, and the buffer with it. */
        if (gen == port_gen) ih += HDR + (size_t)size;
    }
    if (ih == it) ih = it = 0;
}

/* Answer `park` once the Python agent sleeps in its read of our socket: a
 * seed's snapshot follows the answer at once, and whatever either of us had
 * still to run then, every clone would run (and translate) again. */
static void parked(uint32_t rid) {
    char path[64], wchan[64];
    snprintf(path, sizeof path, "/proc/%d/wchan", (int)getppid());
    for (int i = 0; i < 5000; i++) {
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        ssize_t n = fd < 0 ? -1 : read(fd, wchan, sizeof wchan - 1);
        if (fd >= 0) close(fd);
        if (n > 0 && (wchan[n] = 0, strstr(wchan, "unix_stream_read"))) break;
        struct timespec ms = {0, 1000000};
        nanosleep(&ms, NULL);
    }
    buf_t b = {0};
    b_str(&b, "\"parked\":true");
    send_reply(rid, &b);
    b_free(&b);
}

static void start(int argc, char **argv) {
    if (argc != 2 || strlen(argv[1]) != 32) {
        say("usage: bottle-agent-core <instance: 32 hex digits>  (fd 3: port, fd 4: the Python agent)");
        _exit(2);
    }
    put_header(sync_frame, SYNC, 0, MAGIC_LEN);
    memcpy(sync_frame + HDR, SYNC_MAGIC, MAGIC_LEN);
    put_header(hello_frame, HELLO, 0, HELLO_LEN);
    memcpy(hello_frame + HDR, SYNC_MAGIC, MAGIC_LEN);
    for (int i = 0; i < 16; i++) {
        int hi = hexval(argv[1][2 * i]), lo = hexval(argv[1][2 * i + 1]);
        if (hi < 0 || lo < 0) {
            say("bottle-agent-core: the instance is not hex");
            _exit(2);
        }
        hello_frame[HDR + MAGIC_LEN + i] = (unsigned char)(hi << 4 | lo);
    }
    /* Commands must not inherit the port or the agent's socket (the Python
     * agent's own descriptors are all close-on-exec). */
    if (fcntl(PORT_FD, F_SETFD, FD_CLOEXEC) || fcntl(AGENT_FD, F_SETFD, FD_CLOEXEC)) {
        say("bottle-agent-core: fd 3 or 4 is not open");
        _exit(2);
    }
    /* The Python agent gives us SIGPIPE ignored already (commands keep it:
     * docs/reference.md, exec); the spare's pipe relies on it too. */
    signal(SIGPIPE, SIG_IGN);
    if (chdir(HOME)) say("bottle-agent-core: cannot chdir to /root");
    if (setenv("PATH", DEFAULT_PATH, 1)) oom(); /* what posix_spawnp searches */
    /* Commands must not inherit the agent's OOM protection and raised
     * priority (bottle-agent.service): a test's memory hog would leave the OOM
     * killer nothing to kill.  The core gives both up for good: it is small
     * (the OOM killer picks by size; were it picked, systemd would restart
     * the agent and its commands would end) and starts once the boot is over
     * (a seed's last step), so a clone pays nothing for it. */
    errno = 0;
    if (getpriority(PRIO_PROCESS, 0) < 0 && !errno && setpriority(PRIO_PROCESS, 0, 0))
        say("bottle-agent-core: cannot reset its priority");
    int adj = open("/proc/self/oom_score_adj", O_RDWR | O_CLOEXEC);
    char was[16] = "";
    if (adj < 0 || read(adj, was, sizeof was - 1) < 0 ||
        (was[0] == '-' && (lseek(adj, 0, SEEK_SET) || write(adj, "0", 1) != 1)))
        say("bottle-agent-core: cannot reset its OOM score");
    if (adj >= 0) close(adj);
    port_init();
    setup_preopen();
    exec_preopen();
    struct {
        uint32_t synced, nbytes, park_rid;
    } go;
    if (read_full(AGENT_FD, &go, sizeof go) || go.nbytes > INBUF_CAP - CHUNK) gone();
    if (read_full(AGENT_FD, ib, go.nbytes)) gone();
    it = go.nbytes;
    synced = go.synced != 0;
    if (go.park_rid) parked(go.park_rid);
}

int main(int argc, char **argv) {
    struct pollfd *pfd = NULL;
    size_t pcap = 0;
    start(argc, argv);
    for (;;) {
        serve_frames();
        if (pcap < 1 + 3 * nexec) {
            pcap = 2 * (1 + 3 * nexec);
            pfd = realloc(pfd, pcap * sizeof *pfd);
            if (!pfd) oom();
        }
        double now = mono();
        int timeout = -1, n = 0;
        bool port_polled = false;
        if (now < backoff_until) {
            timeout = (int)((backoff_until - now) * 1000) + 1;
        } else if (port_room()) {
            pfd[n++] = (struct pollfd){PORT_FD, POLLIN, 0};
            port_polled = true;
        }
        for (size_t i = 0; i < nexec; i++) {
            struct exec *e = &execs[i];
            bool reading = e->stale || e->window > 0;
            e->pi_out = e->pi_err = e->pi_pid = -1;
            if (e->out >= 0 && reading) e->pi_out = n, pfd[n++] = (struct pollfd){e->out, POLLIN, 0};
            if (e->err >= 0 && reading) e->pi_err = n, pfd[n++] = (struct pollfd){e->err, POLLIN, 0};
            if (!e->exited) e->pi_pid = n, pfd[n++] = (struct pollfd){e->pidfd, POLLIN, 0};
            timeout = exec_timeout_ms(e, now, timeout);
        }
        int r = poll(pfd, (nfds_t)n, timeout);
        if (r < 0) {
            if (errno == EINTR) continue;
            say("bottle-agent-core: poll failed");
            _exit(1);
        }
        if (port_polled && pfd[0].revents) port_read();
        now = mono();
        for (size_t i = 0; i < nexec;)
            if (!exec_step(i, pfd, now)) i++;
    }
}
