/* A command process made before the snapshot, for a clone's first plain exec.
 *
 * Every clone translates afresh all the kernel code it runs.  Its first exec
 * used to run fork (clone), pipe2 and setsid (an autogroup) for the first
 * time since the restore: ~1,600 of the ~23,200 blocks from restore to the
 * first answered `true`.  The spare runs them once, in the seed, and waits:
 * the first exec only hands it argv and envp and lets it exec.  Later execs,
 * and a first exec when the spare is gone, take exec.c's posix_spawn path.
 *
 * The spare is posix_spawn's child, made early: it shares our memory
 * (CLONE_VM) and so reads argv and envp where spawn() left them; it runs in a
 * session of its own with stdin /dev/null and stdout and stderr on its pipes,
 * keeps our signal dispositions and mask, and searches DEFAULT_PATH as
 * posix_spawnp does with our environment.  It touches nothing of ours but its
 * own stack and errno (ours, too: we sleep in a read while it may set it). */
#include "core.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static struct {
    pid_t pid;                        /* 0: none (never made, used, or dropped) */
    int pidfd, out, err;              /* ours: its pidfd, its stdout and stderr read ends */
    int go, status;                   /* ours: "exec now"; EOF (exec'd) or an errno */
    int devnull, c_out, c_err, c_go, c_status; /* its ends, at the clone */
    char **argv, **envp;              /* set before "exec now" */
    sigset_t mask;                    /* ours before the clone: it restores it */
} sp = {.pidfd = -1, .out = -1, .err = -1, .go = -1, .status = -1};

static char stack[32 * 1024] __attribute__((aligned(16)));

static void put_errno(int e) {
    while (write(sp.c_status, &e, sizeof e) < 0 && errno == EINTR) {
    }
    _exit(127);
}

/* posix_spawnp's search: every DEFAULT_PATH entry in turn, on past the errors
 * that mean "not here"; EACCES if some entry had it and none worked. */
static void __attribute__((noreturn)) run(void) {
    const char *file = sp.argv[0];
    if (strchr(file, '/')) {
        execve(file, sp.argv, sp.envp);
        put_errno(errno);
    }
    size_t len = strnlen(file, NAME_MAX + 1);
    if (len > NAME_MAX) put_errno(ENAMETOOLONG);
    char path[sizeof DEFAULT_PATH + NAME_MAX + 2];
    bool eacces = false;
    for (const char *p = DEFAULT_PATH;; p++) {
        const char *end = strchrnul(p, ':');
        size_t n = (size_t)(end - p);
        memcpy(path, p, n);
        if (n) path[n++] = '/'; /* an empty entry is the working directory */
        memcpy(path + n, file, len + 1);
        execve(path, sp.argv, sp.envp);
        int e = errno;
        if (e == EACCES) eacces = true;
        else if (e != ENOENT && e != ESTALE && e != ENOTDIR && e != ENODEV && e != ETIMEDOUT) put_errno(e);
        if (!*end) put_errno(eacces ? EACCES : e);
        p = end;
    }
}

static int child(void *unused) {
    (void)unused;
    char c = 'R';
    int keep_lo = sp.c_go < sp.c_status ? sp.c_go : sp.c_status;
    int keep_hi = sp.c_go < sp.c_status ? sp.c_status : sp.c_go;
    if (setsid() < 0 || dup2(sp.devnull, 0) < 0 || dup2(sp.c_out, 1) < 0 || dup2(sp.c_err, 2) < 0) _exit(127);
    /* Only what it needs: the port, the agent's socket and our other
     * descriptors are close-on-exec, but it holds them until its exec. */
    if (keep_lo > 3) syscall(SYS_close_range, 3, keep_lo - 1, 0);
    if (keep_hi > keep_lo + 1) syscall(SYS_close_range, keep_lo + 1, keep_hi - 1, 0);
    syscall(SYS_close_range, keep_hi + 1, ~0U, 0);
    /* posix_spawn's child ignores glibc's internal signals (SIGCANCEL and
     * SIGSETXID: 32 and 33), and exec keeps that; glibc's sigaction refuses
     * to touch them, so the kernel is asked directly. */
    struct {
        void (*handler)(int);
        unsigned long flags;
        void (*restorer)(void);
        uint64_t mask;
    } ign = {SIG_IGN, 0, NULL, 0};
    for (int sig = 32; sig <= 33; sig++)
        if (syscall(SYS_rt_sigaction, sig, &ign, NULL, sizeof ign.mask)) _exit(127);
    sigprocmask(SIG_SETMASK, &sp.mask, NULL);
    if (write(sp.c_status, &c, 1) != 1) _exit(127);
    ssize_t n;
    do n = read(sp.c_go, &c, 1);
    while (n < 0 && errno == EINTR);
    if (n != 1) _exit(0); /* we dropped it, or died */
    run();
}

static bool stopped(pid_t pid) {
    char path[40], text[512];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    ssize_t n = fd < 0 ? -1 : read(fd, text, sizeof text - 1);
    if (fd >= 0) close(fd);
    if (n <= 0) return false;
    text[n] = 0;
    const char *state = strrchr(text, ')'); /* after the command's name, which may hold anything */
    return state && (state[2] == 'T' || state[2] == 't');
}

static void close_ours(void) {
    int *fds[] = {&sp.pidfd, &sp.out, &sp.err, &sp.go, &sp.status};
    for (size_t i = 0; i < sizeof fds / sizeof *fds; i++)
        if (*fds[i] >= 0) close(*fds[i]), *fds[i] = -1;
}

static void reap(void) {
    int st;
    while (waitpid(sp.pid, &st, 0) < 0 && errno == EINTR) {
    }
    sp.pid = 0;
}

void spare_make(int devnull) {
    int o[2], e[2], g[2], s[2];
    if (devnull < 0 || sp.pid) return;
    if (pipe2(o, O_CLOEXEC)) return;
    if (pipe2(e, O_CLOEXEC)) goto close_o;
    if (pipe2(g, O_CLOEXEC)) goto close_e;
    if (pipe2(s, O_CLOEXEC)) goto close_g;
    sp = (typeof(sp)){.pidfd = -1, .out = o[0], .err = e[0], .go = g[1], .status = s[0], .devnull = devnull,
                      .c_out = o[1], .c_err = e[1], .c_go = g[0], .c_status = s[1]};
    sigset_t all;
    sigfillset(&all);
    sigprocmask(SIG_SETMASK, &all, &sp.mask); /* no handler of ours runs on its stack */
    pid_t pid = clone(child, stack + sizeof stack, CLONE_VM | SIGCHLD, NULL);
    sigprocmask(SIG_SETMASK, &sp.mask, NULL);
    close(o[1]), close(e[1]), close(g[0]), close(s[1]);
    if (pid < 0) {
        close_ours();
        return;
    }
    sp.pid = pid;
    char c = 0;
    ssize_t n;
    do n = read(sp.status, &c, 1);
    while (n < 0 && errno == EINTR);
    sp.pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    if (n != 1 || c != 'R' || sp.pidfd < 0) spare_drop();
    return;
close_g:
    close(g[0]), close(g[1]);
close_e:
    close(e[0]), close(e[1]);
close_o:
    close(o[0]), close(o[1]);
}

void spare_drop(void) {
    if (!sp.pid) return;
    kill(sp.pid, SIGKILL); /* not reaped yet: the pid is still its own */
    reap();
    close_ours();
}

int spare_spawn(char **argv, char **envp, pid_t *pid, int *pidfd, int *out, int *err) {
    if (!sp.pid) return -1;
    sp.argv = argv, sp.envp = envp;
    ssize_t w;
    do w = write(sp.go, "x", 1);
    while (w < 0 && errno == EINTR);
    int no = 0;
    size_t got = 0;
    bool execd = false; /* its close-on-exec end closed */
    while (w == 1 && got < sizeof no) {
        /* A spare stopped (SIGSTOP, a tracer) before its exec would hold us
         * for good; until its exec closes the status pipe, none of the
         * command has run, so it can be ended and the exec made anew. */
        struct pollfd p = {sp.status, POLLIN, 0};
        int ready = poll(&p, 1, 1000);
        if ((ready < 0 && errno != EINTR) || (ready == 0 && stopped(sp.pid))) break;
        if (ready <= 0) continue;
        ssize_t r = read(sp.status, (char *)&no + got, sizeof no - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            execd = r == 0 && got == 0;
            break;
        }
        got += (size_t)r;
    }
    close(sp.go), close(sp.status);
    sp.go = sp.status = -1;
    if (execd) {
        *pid = sp.pid, *pidfd = sp.pidfd, *out = sp.out, *err = sp.err;
        sp = (typeof(sp)){.pidfd = -1, .out = -1, .err = -1, .go = -1, .status = -1};
        return 0;
    }
    spare_drop(); /* failed to exec (reaped as posix_spawn reaps), or died early */
    return got == sizeof no && no ? no : -1;
}
