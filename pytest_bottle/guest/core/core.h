/* bottle-agent-core: the guest agent's restore path in C (see CORE_SPEC.md).
 *
 * After a snapshot restore every clone starts here, not in the Python agent:
 * it serves SYNC/HELLO, hello, setup and simple execs, and hands the port back
 * to the Python agent (which waits behind fd 4) at the first call it does not
 * handle.  Mirrors pytest_bottle/guest/{frames,agent,execute,identity}.py.
 */
#ifndef BOTTLE_CORE_H
#define BOTTLE_CORE_H
#define _GNU_SOURCE
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define PORT_FD 3
#define AGENT_FD 4

enum { CALL = 1, DATA, FEOF, STDOUT_K, STDERR_K, REPLY, CANCEL, SYNC, HELLO, PING, CREDIT, STARTED };
#define HDR 9
#define CORE_CALL_MAX (256 * 1024) /* a longer CALL goes to the Python agent */
#define CHUNK (256 * 1024)
#define MAX_PAYLOAD (4 * 1024 * 1024)
#define HOST_WINDOW (16 * CHUNK)
#define PIPE_CHUNK (64 * 1024)
#define MAGIC_LEN 16
#define SYNC_FRAME_LEN (HDR + MAGIC_LEN)
#define HELLO_LEN (MAGIC_LEN + 16)
/* Room for a whole largest frame plus what arrives while we write. */
#define INBUF_CAP (2 * (HDR + MAX_PAYLOAD) + 2 * CHUNK)
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#define HOME "/root"
#define BACKGROUND_GRACE 0.05
#define BACKGROUND_CAP 1.0
#define GROUP_GONE_WAIT 5.0 /* execute.GROUP_GONE_WAIT */

/* ------------------------------------------------------------ util.c */
typedef struct {
    char *p;
    size_t n, cap;
} buf_t;

void oom(void) __attribute__((noreturn));
void b_put(buf_t *b, const void *d, size_t n);
void b_str(buf_t *b, const char *s);
void b_int(buf_t *b, long long v);
void b_jstr(buf_t *b, const char *s, size_t n); /* json.dumps (ensure_ascii) */
void b_free(buf_t *b);
int hexval(int c); /* a hex digit's value, -1 if none */
/* A JSON integer literal as int64; false beyond its range.  (Not strtoll:
 * each libc routine a clone runs first is code QEMU translates anew.) */
bool parse_i64(const char *s, long long *out);
struct in_addr;
void ipv4_text(struct in_addr in, char out[16]); /* inet_ntop's dotted decimal */
/* Plain "a.b.c.d" without inet_aton; false for any other of its forms. */
bool dotted_quad(const char *s, struct in_addr *in);
double mono(void);
void say(const char *msg); /* one line to stderr (the journal) */

/* ------------------------------------------------------------ json.c */
enum { J_NULL, J_BOOL, J_NUM, J_STR, J_ARR, J_OBJ };
typedef struct {
    uint8_t t;
    bool b;       /* J_BOOL */
    bool is_int;  /* J_NUM: an integer literal (Python int) */
    bool has_nul; /* J_STR: contains U+0000 */
    int kid;      /* first child, -1: none */
    int next;     /* next sibling, -1: none */
    int nkids;
    const char *s; /* string (NUL-terminated) or number text */
    size_t n;
    const char *key; /* in an object */
    size_t keylen;
} jnode;

typedef struct {
    jnode *v;
    int n, cap;
    char *arena;
} jdoc;

/* Parses as Python's json.loads would accept, stricter where in doubt
 * (duplicate keys, lone surrogates, huge objects): 0 ok, -1 hand back. */
int json_parse(jdoc *d, const unsigned char *text, size_t len);
void json_free(jdoc *d);
jnode *jget(jdoc *d, jnode *obj, const char *key);
jnode *jkid(jdoc *d, jnode *v);
jnode *jnext(jdoc *d, jnode *v);
bool jtruthy(jnode *v);
bool jnullish(jnode *v); /* absent or null */
bool jonly_keys(jdoc *d, jnode *obj, const char *const *keys);

/* ------------------------------------------------------------ port.c */
extern unsigned char *ib;
extern size_t ih, it; /* input buffer: unconsumed bytes are ib[ih..it) */
extern bool synced;
extern double backoff_until;
extern unsigned long port_gen; /* one more each time the buffer is dropped */
extern unsigned char hello_frame[HDR + HELLO_LEN];

void port_init(void);
int port_read(void);        /* >0 bytes read, 0 host gone, -1 nothing */
bool port_room(void);       /* the input buffer can take a read */
int port_send(int kind, uint32_t rid, const void *p, size_t n); /* -1: host left */
void put_header(unsigned char *h, int kind, uint32_t rid, uint32_t len);

/* ------------------------------------------------------------ exec.c */
struct exec {
    uint32_t rid;
    pid_t pid;
    int pidfd, out, err;
    int64_t window;
    double deadline; /* < 0: none */
    double exit_time, last_out;
    bool exited, timed_out, stale;
    bool killed;    /* its group got a SIGKILL: the reply waits until it is gone */
    bool reaped;    /* the leader is reaped; the reply waits for the group */
    int status;     /* the leader's wait status, once reaped */
    double gone_by; /* reply by then even if a member is left (stuck in D state) */
    int pi_out, pi_err, pi_pid; /* indexes into this round's pollfds */
};
extern struct exec *execs;
extern size_t nexec;

/* 1 handled (maybe by a failure reply), 0 hand back. */
int op_exec(uint32_t rid, jdoc *d, jnode *call);
struct exec *exec_find(uint32_t rid);
void exec_kill(struct exec *e);
/* Whether the exec ended (then it is gone from the table). */
bool exec_step(size_t i, const void *pfds, double now);
int exec_timeout_ms(struct exec *e, double now, int timeout);
void exec_reply_reaped(void); /* before a hand-back */

/* ------------------------------------------------------------ spare.c */
void spare_make(int devnull); /* before a snapshot: the first exec's process */
void spare_drop(void);        /* before a hand-back or exit: ended and reaped */
/* The spare execs argv: 0 it runs, >0 the exec's errno (reaped), -1 no spare. */
int spare_spawn(char **argv, char **envp, pid_t *pid, int *pidfd, int *out, int *err);

/* ------------------------------------------------------------ ops.c */
int op_hello(uint32_t rid);
void send_reply(uint32_t rid, buf_t *body); /* body: JSON members, no braces */
void send_oserror(uint32_t rid, int e, const char *path);
void send_error(uint32_t rid, const char *type, const char *msg);
void py_repr(buf_t *b, const char *s); /* Python's repr() of an ASCII str */

/* ------------------------------------------------------------ setup.c / nic.c */
int setup_check(jdoc *d, jnode *call); /* 1 the core can run it, 0 hand back */
void setup_preopen(void); /* before a snapshot: what every clone's setup opens */
void exec_preopen(void);  /* and its first exec */
void op_setup(uint32_t rid, jdoc *d, jnode *call);

/* An error of a setup step, reported like the Python agent's Agent.run. */
struct err {
    int no;           /* an OSError's errno, 0: a non-OSError */
    const char *path; /* an OSError's filename, or NULL */
    const char *type; /* a non-OSError's type */
    char msg[512];
    char pathbuf[320];
};
int set_oserr(struct err *e, int no, const char *path);
int nic_configure(jdoc *d, jnode *nic, bool by_mac, char name[32], struct err *er);
int nic_check(jdoc *d, jnode *nic);
void nic_preopen(void);
int op_announce(uint32_t rid, jdoc *d, jnode *call); /* 1 served, 0 hand back */

#endif
