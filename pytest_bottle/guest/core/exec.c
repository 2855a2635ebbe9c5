/* The exec op: agent.op_exec, execute.spawn/_posix_spawn/pump, for the calls
 * whose every option is the default; the rest go back to the Python agent. */
#include "core.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

struct exec *execs;
size_t nexec;
static size_t capexec;
static int devnull = -1;
static char rbuf[PIPE_CHUNK];

static const char *const EXEC_KEYS[] = {"op", "argv", "env", "cwd", "user", "timeout", "stdin", "notify", NULL};
static const char *const BASE[][2] = {
    {"PATH", DEFAULT_PATH}, {"LANG", "C.UTF-8"}, {"HOME", HOME}, {"USER", "root"}, {"LOGNAME", "root"},
};
#define NBASE 5

static bool is_false(jnode *v) { return jnullish(v) || (v->t == J_BOOL && !v->b); }

/* Whether execute.spawn would take its posix_spawn path with nothing that
 * json.loads or posix_spawn itself would make different or refuse. */
static bool simple(jdoc *d, jnode *call) {
    jnode *argv = jget(d, call, "argv"), *env = jget(d, call, "env"), *cwd = jget(d, call, "cwd");
    jnode *timeout = jget(d, call, "timeout");
    if (!jonly_keys(d, call, EXEC_KEYS) || !jnullish(jget(d, call, "user"))) return false;
    if (!is_false(jget(d, call, "stdin")) || !is_false(jget(d, call, "notify"))) return false;
    if (!jnullish(cwd) && !(cwd->t == J_STR && !cwd->has_nul && !strcmp(cwd->s, HOME))) return false;
    /* NaN, infinite or huge: select() in pump would raise, not time out */
    if (!jnullish(timeout) && (timeout->t != J_NUM || !isfinite(strtod(timeout->s, NULL)) ||
                               fabs(strtod(timeout->s, NULL)) >= 1e9))
        return false;
    if (!argv || argv->t != J_ARR || argv->nkids == 0) return false;
    for (jnode *a = jkid(d, argv); a; a = jnext(d, a))
        if (a->t != J_STR || a->has_nul) return false;
    if (jkid(d, argv)->n == 0) return false; /* posix_spawn refuses an empty argv[0] */
    if (jnullish(env)) return true;
    if (env->t != J_OBJ) return false;
    for (jnode *k = jkid(d, env); k; k = jnext(d, k)) {
        if (k->t != J_STR || k->has_nul || k->keylen == 0 || memchr(k->key, '=', k->keylen) ||
            memchr(k->key, 0, k->keylen))
            return false;
        /* another PATH: execute.py searches it itself */
        if (!strcmp(k->key, "PATH") && strcmp(k->s, DEFAULT_PATH)) return false;
    }
    return true;
}

/* PATH, LANG, HOME, USER, LOGNAME, then the call's env in its order (a base
 * key keeps its place): the order of the dict execute.spawn builds. */
static char **make_env(jdoc *d, jnode *env) {
    const char *val[NBASE];
    size_t total = 0, extra = 0;
    for (int i = 0; i < NBASE; i++) val[i] = BASE[i][1];
    for (jnode *k = jkid(d, env); k; k = jnext(d, k)) {
        int i = 0;
        while (i < NBASE && strcmp(BASE[i][0], k->key)) i++;
        if (i < NBASE) val[i] = k->s;
        else extra++, total += k->keylen + k->n + 2;
    }
    for (int i = 0; i < NBASE; i++) total += strlen(BASE[i][0]) + strlen(val[i]) + 2;
    char **envp = malloc((NBASE + extra + 1) * sizeof *envp + total);
    if (!envp) oom();
    char *p = (char *)(envp + NBASE + extra + 1);
    size_t n = 0;
    for (int i = 0; i < NBASE; i++) {
        envp[n++] = p;
        p = stpcpy(stpcpy(stpcpy(p, BASE[i][0]), "="), val[i]) + 1;
    }
    for (jnode *k = jkid(d, env); k; k = jnext(d, k)) {
        int i = 0;
        while (i < NBASE && strcmp(BASE[i][0], k->key)) i++;
        if (i < NBASE) continue;
        envp[n++] = p;
        p = stpcpy(stpcpy(stpcpy(p, k->key), "="), k->s) + 1;
    }
    envp[n] = NULL;
    return envp;
}

static void open_devnull(void) {
    if (devnull < 0) devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
}

void exec_preopen(void) {
    open_devnull();
    spare_make(devnull);
}

static int spawn(char **argv, char **envp, pid_t *pid, int *pidfd, int *out, int *err) {
    int o[2] = {-1, -1}, e[2] = {-1, -1}, rc = spare_spawn(argv, envp, pid, pidfd, out, err);
    posix_spawn_file_actions_t fa;
    posix_spawnattr_t at;
    if (rc >= 0) return rc;
    *pidfd = -1;
    open_devnull(); /* done before the snapshot; again only if that failed */
    if (devnull < 0) return errno;
    if (pipe2(o, O_CLOEXEC)) return errno;
    if (pipe2(e, O_CLOEXEC)) {
        rc = errno;
        close(o[0]), close(o[1]);
        return rc;
    }
    if ((rc = posix_spawn_file_actions_init(&fa))) goto out;
    if ((rc = posix_spawnattr_init(&at))) {
        posix_spawn_file_actions_destroy(&fa);
        goto out;
    }
    if (!(rc = posix_spawn_file_actions_adddup2(&fa, devnull, 0)) &&
        !(rc = posix_spawn_file_actions_adddup2(&fa, o[1], 1)) &&
        !(rc = posix_spawn_file_actions_adddup2(&fa, e[1], 2)) &&
        !(rc = posix_spawnattr_setflags(&at, POSIX_SPAWN_SETSID)))
        /* No '/': libc searches our own PATH, which is DEFAULT_PATH, as the
         * Python agent's posix_spawnp does. */
        rc = (strchr(argv[0], '/') ? posix_spawn : posix_spawnp)(pid, argv[0], &fa, &at, argv, envp);
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&at);
out:
    close(o[1]);
    close(e[1]);
    if (rc) {
        close(o[0]);
        close(e[0]);
    } else {
        *out = o[0];
        *err = e[0];
    }
    return rc;
}

static void reply_failed(uint32_t rid, int rc, const char *argv0, const char *why) {
    buf_t b = {0}, msg = {0};
    b_str(&msg, argv0);
    b_str(&msg, ": ");
    b_str(&msg, why);
    b_str(&msg, "\n");
    b_str(&b, "\"rc\":");
    b_int(&b, rc);
    b_str(&b, ",\"stderr_text\":");
    b_jstr(&b, msg.p, msg.n);
    b_str(&b, ",\"timed_out\":false");
    send_reply(rid, &b);
    b_free(&b);
    b_free(&msg);
}

static bool cannot_run(int e) {
    return e == EACCES || e == EPERM || e == ENOTDIR || e == ENOEXEC || e == E2BIG || e == ELOOP ||
           e == ENAMETOOLONG || e == ETXTBSY || e == ELIBBAD || e == EISDIR;
}

int op_exec(uint32_t rid, jdoc *d, jnode *call) {
    if (!simple(d, call)) return 0;
    double started = mono();
    jnode *argvj = jget(d, call, "argv"), *timeout = jget(d, call, "timeout");
    char **argv = malloc((size_t)(argvj->nkids + 1) * sizeof *argv), **envp = make_env(d, jget(d, call, "env"));
    if (!argv) oom();
    int argc = 0;
    for (jnode *a = jkid(d, argvj); a; a = jnext(d, a)) argv[argc++] = (char *)a->s;
    argv[argc] = NULL;
    pid_t pid;
    int pidfd, out, err, rc = spawn(argv, envp, &pid, &pidfd, &out, &err);
    free(envp);
    if (rc) {
        /* as execute.spawn words it (its CANNOT_RUN); other errors are the Python agent's to report */
        bool answered = rc == ENOENT || cannot_run(rc);
        if (rc == ENOENT) reply_failed(rid, 127, argv[0], "not found");
        else if (answered) reply_failed(rid, 126, argv[0], strerror(rc));
        free(argv);
        return answered;
    }
    free(argv);
    if (pidfd < 0) pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    if (pidfd < 0) { /* pump() raised: the command is killed, reaped, the error replied */
        int e = errno, st;
        kill(-pid, SIGKILL);
        while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
        }
        close(out);
        close(err);
        send_oserror(rid, e, NULL);
        return 1;
    }
    if (nexec == capexec) {
        size_t cap = capexec ? 2 * capexec : 8;
        struct exec *p = realloc(execs, cap * sizeof *p);
        if (!p) oom();
        execs = p;
        capexec = cap;
    }
    execs[nexec++] = (struct exec){
        .rid = rid, .pid = pid, .pidfd = pidfd, .out = out, .err = err, .window = HOST_WINDOW,
        .deadline = jnullish(timeout) ? -1 : started + strtod(timeout->s, NULL),
    };
    if (execs[nexec - 1].deadline < 0 && !jnullish(timeout)) execs[nexec - 1].deadline = 0; /* already due */
    return 1;
}

struct exec *exec_find(uint32_t rid) {
    for (size_t i = 0; i < nexec; i++)
        if (execs[i].rid == rid && !execs[i].stale) return &execs[i];
    return NULL;
}

/* The group: a command's own children die with it.  Not reaped before the
 * end, the pid cannot have been given to anybody else. */
void exec_kill(struct exec *e) {
    if (e->reaped) return; /* killed already, and its pid may be another's */
    if (kill(-e->pid, SIGKILL) == 0) e->killed = true;
    else if (errno != ESRCH) say("bottle-agent-core: killpg failed");
}

/* Whether a killed group is gone, zombies included (execute.Child.gone). */
static bool group_gone(struct exec *e) { return !e->killed || (kill(-e->pid, 0) && errno == ESRCH); }

static int ms(double secs) {
    if (secs <= 0) return 0;
    return secs > 1e6 ? 1000000000 : (int)(secs * 1000) + 1;
}

static double grace_end(struct exec *e) {
    double a = e->last_out + BACKGROUND_GRACE, b = e->exit_time + BACKGROUND_CAP;
    return a < b ? a : b;
}

int exec_timeout_ms(struct exec *e, double now, int timeout) {
    int t = -1;
    if (e->reaped) t = 2; /* a poll for the group's end: nothing to wait on */
    else if (!e->exited && e->deadline >= 0) t = ms(e->deadline - now);
    else if (e->exited && (e->out >= 0 || e->err >= 0) && (e->stale || e->window > 0)) t = ms(grace_end(e) - now);
    if (t < 0) return timeout;
    return timeout < 0 || t < timeout ? t : timeout;
}

static void pump(struct exec *e, int *fd, int kind) {
    size_t want = PIPE_CHUNK;
    if (!e->stale && (int64_t)want > e->window) want = (size_t)e->window;
    ssize_t n = read(*fd, rbuf, want);
    if (n > 0) {
        if (!e->stale) {
            e->window -= n;
            if (port_send(kind, e->rid, rbuf, (size_t)n)) { /* the host left: nobody reads this command */
                exec_kill(e);
                e->stale = true;
            }
        }
        if (e->exited) e->last_out = mono();
        return;
    }
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
    close(*fd);
    *fd = -1;
}

static void reply_end(struct exec *e, pid_t w, int werr) {
    if (e->stale) return;
    if (w < 0) {
        send_oserror(e->rid, werr, NULL);
        return;
    }
    buf_t b = {0};
    b_str(&b, "\"rc\":");
    b_int(&b, WIFEXITED(e->status) ? WEXITSTATUS(e->status) : -WTERMSIG(e->status));
    b_str(&b, e->timed_out ? ",\"timed_out\":true" : ",\"timed_out\":false");
    send_reply(e->rid, &b);
    b_free(&b);
}

static void drop(size_t i) {
    memmove(&execs[i], &execs[i + 1], (nexec - i - 1) * sizeof *execs);
    nexec--;
}

/* Before a hand-back: those waiting for their group's end wait here (it is
 * ms as a rule, GROUP_GONE_WAIT at most), then reply. */
void exec_reply_reaped(void) {
    for (size_t i = 0; i < nexec;) {
        struct exec *e = &execs[i];
        if (!e->reaped) {
            i++;
            continue;
        }
        while (!e->stale && !group_gone(e) && mono() < e->gone_by) nanosleep(&(struct timespec){0, 2000000}, NULL);
        reply_end(e, e->pid, 0);
        drop(i);
    }
}

bool exec_step(size_t i, const void *pfds, double now) {
    const struct pollfd *p = pfds;
    struct exec *e = &execs[i];
    bool ready = false;
    if (e->reaped) { /* stale: nobody waits for its reply */
        if (!e->stale && !group_gone(e) && now < e->gone_by) return false;
        reply_end(e, e->pid, 0);
        drop(i);
        return true;
    }
    if (e->pi_pid >= 0 && p[e->pi_pid].revents) {
        e->exited = true; /* not reaped yet: a handed-back exec must still be our child */
        e->exit_time = e->last_out = now;
    }
    if (e->pi_out >= 0 && p[e->pi_out].revents && e->out >= 0) ready = true, pump(e, &e->out, STDOUT_K);
    if (e->pi_err >= 0 && p[e->pi_err].revents && e->err >= 0) ready = true, pump(e, &e->err, STDERR_K);
    if (!e->exited && e->deadline >= 0 && now >= e->deadline) {
        exec_kill(e);
        e->timed_out = true;
        e->deadline = -1;
    }
    if (!e->exited) return false;
    /* Output after the exit comes from what it left in the background:
     * wait for it 50 ms after the last of it, 1 s after the exit at most. */
    if ((e->out >= 0 || e->err >= 0) && !(!ready && (e->stale || e->window > 0) && now >= grace_end(e)))
        return false;
    pid_t w;
    do w = waitpid(e->pid, &e->status, 0);
    while (w < 0 && errno == EINTR);
    int werr = errno;
    close(e->pidfd);
    if (e->out >= 0) close(e->out);
    if (e->err >= 0) close(e->err);
    e->out = e->err = -1;
    if (w >= 0 && !e->stale && !group_gone(e)) {
        e->reaped = true;
        e->gone_by = now + GROUP_GONE_WAIT;
        return false;
    }
    reply_end(e, w, werr);
    drop(i);
    return true;
}
