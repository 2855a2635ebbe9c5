/* identity._configure_nic: a NIC's MAC, IPv4 address, link, gratuitous ARP
 * and default route, with syscalls and ioctls only (but for `ip route`). */
#include "core.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <netinet/in.h>
#include <netpacket/packet.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;
static int ioctl_sock = -1; /* kept open: a clone inherits its seed's */

void nic_preopen(void) {
    if (ioctl_sock < 0) ioctl_sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
}

static const char *const SIGNAMES[32] = {
    NULL,      "SIGHUP",  "SIGINT",    "SIGQUIT", "SIGILL",    "SIGTRAP", "SIGABRT", "SIGBUS",
    "SIGFPE",  "SIGKILL", "SIGUSR1",   "SIGSEGV", "SIGUSR2",   "SIGPIPE", "SIGALRM", "SIGTERM",
    "SIGSTKFLT", "SIGCHLD", "SIGCONT", "SIGSTOP", "SIGTSTP",   "SIGTTIN", "SIGTTOU", "SIGURG",
    "SIGXCPU", "SIGXFSZ", "SIGVTALRM", "SIGPROF", "SIGWINCH",  "SIGIO",   "SIGPWR",  "SIGSYS",
};

static bool ascii_printable(jnode *v) {
    for (size_t i = 0; i < v->n; i++)
        if ((unsigned char)v->s[i] < 0x20 || (unsigned char)v->s[i] > 0x7e) return false;
    return true;
}

/* bytes.fromhex(mac.replace(":", "")): 6 bytes, else the ARP frame differs. */
static int parse_mac(const char *s, unsigned char hw[6]) {
    int n = 0, half = -1;
    for (; *s; s++) {
        if (*s == ':') continue;
        int v = hexval((unsigned char)*s);
        if (v < 0 || n == 6) return -1;
        if (half < 0) {
            half = v;
        } else {
            hw[n++] = (unsigned char)(half << 4 | v);
            half = -1;
        }
    }
    return n == 6 && half < 0 ? 0 : -1;
}

/* "a.b.c.d/len": the address (inet_aton's grammar) and the prefix (default 24). */
static int parse_ip(const char *ip, char addr[64], struct in_addr *in, int *plen) {
    const char *slash = strchr(ip, '/');
    size_t n = slash ? (size_t)(slash - ip) : strlen(ip);
    if (n >= 64) return -1;
    memcpy(addr, ip, n);
    addr[n] = 0;
    if (!dotted_quad(addr, in) && !inet_aton(addr, in)) return -1;
    *plen = 24;
    if (slash && slash[1]) {
        const char *p = slash + 1;
        if (strlen(p) > 3) return -1;
        *plen = 0;
        for (; *p; p++) {
            if (*p < '0' || *p > '9') return -1;
            *plen = *plen * 10 + (*p - '0');
        }
        if (*plen > 32) return -1;
    }
    return 0;
}

int nic_check(jdoc *d, jnode *nic) {
    unsigned char hw[6];
    char addr[64];
    struct in_addr in;
    int plen;
    if (nic->t != J_OBJ) return 0;
    jnode *mac = jget(d, nic, "mac"), *match = jget(d, nic, "match"), *name = jget(d, nic, "name");
    jnode *ip = jget(d, nic, "ip"), *gw = jget(d, nic, "gateway"), *ann = jget(d, nic, "announce");
    if (!mac || mac->t != J_STR || mac->has_nul || parse_mac(mac->s, hw)) return 0;
    if (!match || match->t != J_STR || !ascii_printable(match)) return 0; /* str.lower() is Unicode */
    if (!jnullish(name) && (name->t != J_STR || !ascii_printable(name) || name->n >= IFNAMSIZ)) return 0;
    if (!jnullish(ip) && (ip->t != J_STR || !ascii_printable(ip) || (ip->n && parse_ip(ip->s, addr, &in, &plen))))
        return 0;
    if (!jnullish(gw) && (gw->t != J_STR || !ascii_printable(gw))) return 0;
    if (!jnullish(ann) && ann->t != J_BOOL) return 0;
    return 1;
}

static void lower(char *s) {
    for (; *s; s++)
        if (*s >= 'A' && *s <= 'Z') *s = (char)(*s | 32);
}

/* _iface_by_mac over glob of /sys/class/net/NAME/address: the last match wins,
 * as in the dict _ifaces builds. */
static int iface_by_mac(const char *match, char name[32], struct err *er) {
    char want[128];
    snprintf(want, sizeof want, "%s", match);
    lower(want);
    name[0] = 0;
    DIR *dir = opendir("/sys/class/net");
    if (!dir) goto none; /* glob finds nothing */
    struct dirent *ent;
    while ((ent = readdir(dir))) {
        if (ent->d_name[0] == '.' || strlen(ent->d_name) >= 32) continue;
        char path[300];
        snprintf(path, sizeof path, "/sys/class/net/%s/address", ent->d_name);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0 && (errno == ENOENT || errno == ENOTDIR)) continue;
        if (fd < 0) {
            closedir(dir);
            return set_oserr(er, errno, path);
        }
        char mac[128];
        ssize_t n = read(fd, mac, sizeof mac - 1);
        int e = errno;
        close(fd);
        if (n < 0) {
            closedir(dir);
            return set_oserr(er, e, NULL);
        }
        mac[n] = 0;
        char *s = mac, *end = mac + n;
        while (*s == ' ' || *s == '\n' || *s == '\t') s++;
        while (end > s && (end[-1] == ' ' || end[-1] == '\n' || end[-1] == '\t')) *--end = 0;
        lower(s);
        if (!strcmp(s, want)) strcpy(name, ent->d_name);
    }
    closedir(dir);
    if (name[0]) return 0;
none:
    er->type = "LookupError";
    snprintf(er->msg, sizeof er->msg, "no network interface with MAC %s", match);
    return -1;
}

static void ifreq_for(struct ifreq *ifr, const char *name) {
    memset(ifr, 0, sizeof *ifr);
    strncpy(ifr->ifr_name, name, IFNAMSIZ - 1);
}

static void sockaddr_for(struct sockaddr *sa, struct in_addr in) {
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = 0, .sin_addr = in};
    memcpy(sa, &sin, sizeof sin);
}

static int gratuitous_arp(const char *name, const unsigned char hw[6], struct in_addr in, struct err *er) {
    int s = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, 0);
    if (s < 0) return set_oserr(er, errno, NULL);
    struct ifreq ifr;
    ifreq_for(&ifr, name);
    if (ioctl(s, SIOCGIFINDEX, &ifr)) goto fail; /* as socket.bind((name, 0)) finds it */
    struct sockaddr_ll ll = {.sll_family = AF_PACKET, .sll_protocol = 0, .sll_ifindex = ifr.ifr_ifindex};
    if (bind(s, (struct sockaddr *)&ll, sizeof ll)) goto fail;
    unsigned char pkt[42] = {0}, *p = pkt;
    memset(p, 0xff, 6);
    memcpy(p + 6, hw, 6);
    p[12] = 0x08, p[13] = 0x06;
    static const unsigned char arp[8] = {0, 1, 8, 0, 6, 4, 0, 1}; /* Ethernet, IPv4, request */
    memcpy(p + 14, arp, 8);
    memcpy(p + 22, hw, 6);
    memcpy(p + 28, &in, 4);
    memcpy(p + 38, &in, 4);
    if (send(s, pkt, sizeof pkt, 0) < 0) goto fail;
    close(s);
    return 0;
fail:;
    int e = errno;
    close(s);
    return set_oserr(er, e, NULL);
}

/* any(line.split()[1] == "00000000" for line in lines[1:]) */
static int has_default_route(bool *yes, struct err *er) {
    static const char *const path = "/proc/net/route";
    buf_t b = {0};
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return set_oserr(er, errno, path);
    char tmp[4096];
    ssize_t n;
    while ((n = read(fd, tmp, sizeof tmp)) > 0 && b.n < (1 << 24)) b_put(&b, tmp, (size_t)n);
    int e = errno;
    close(fd);
    if (n < 0) {
        b_free(&b);
        return set_oserr(er, e, NULL);
    }
    b_put(&b, "", 1);
    *yes = false;
    char *line = strchr(b.p, '\n');
    int rc = 0;
    while (line && line[1] && !*yes) {
        char *next = strchr(++line, '\n');
        if (next) *next = 0;
        char *f0 = line + strspn(line, " \t\r\v\f"), *f1 = f0 + strcspn(f0, " \t\r\v\f");
        f1 += strspn(f1, " \t\r\v\f");
        if (!*f1) {
            er->type = "IndexError";
            strcpy(er->msg, "list index out of range");
            rc = -1;
            break;
        }
        *yes = !strncmp(f1, "00000000", 8) && strchr(" \t\r\v\f", f1[8]);
        line = next;
    }
    b_free(&b);
    return rc;
}

/* subprocess.run([...], check=True): our stdio, restore_signals. */
static int ip_route(const char *gw, const char *name, struct err *er) {
    char *argv[] = {"ip", "route", "replace", "default", "via", (char *)gw, "dev", (char *)name, NULL};
    posix_spawnattr_t at;
    sigset_t def;
    pid_t pid;
    int rc = posix_spawnattr_init(&at), st;
    if (rc) return set_oserr(er, rc, "ip");
    sigemptyset(&def);
    sigaddset(&def, SIGPIPE);
    sigaddset(&def, SIGXFSZ);
    if (!(rc = posix_spawnattr_setsigdefault(&at, &def)) && !(rc = posix_spawnattr_setflags(&at, POSIX_SPAWN_SETSIGDEF)))
        rc = posix_spawnp(&pid, "ip", NULL, &at, argv, environ);
    posix_spawnattr_destroy(&at);
    if (rc) return set_oserr(er, rc, "ip");
    while (waitpid(pid, &st, 0) < 0)
        if (errno != EINTR) return set_oserr(er, errno, NULL);
    int code = WIFEXITED(st) ? WEXITSTATUS(st) : -WTERMSIG(st);
    if (code == 0) return 0;
    buf_t cmd = {0};
    b_str(&cmd, "Command '[");
    for (int i = 0; argv[i]; i++) {
        if (i) b_str(&cmd, ", ");
        py_repr(&cmd, argv[i]);
    }
    b_put(&cmd, "]'", 3);
    er->type = "CalledProcessError";
    if (code > 0)
        snprintf(er->msg, sizeof er->msg, "%s returned non-zero exit status %d.", cmd.p, code);
    else if (-code < 32 && SIGNAMES[-code])
        snprintf(er->msg, sizeof er->msg, "%s died with <Signals.%s: %d>.", cmd.p, SIGNAMES[-code], -code);
    else if (-code == SIGRTMIN || -code == SIGRTMAX)
        snprintf(er->msg, sizeof er->msg, "%s died with <Signals.%s: %d>.", cmd.p,
                 -code == SIGRTMIN ? "SIGRTMIN" : "SIGRTMAX", -code);
    else
        snprintf(er->msg, sizeof er->msg, "%s died with unknown signal %d.", cmd.p, -code);
    b_free(&cmd);
    return -1;
}

/* identity._no_dad: the IPv6 link-local of a NIC brought up here is usable at
 * once, not after a second of duplicate address detection (the MAC is the
 * bottle's own).  Without IPv6 there is nothing to do. */
static void no_dad(const char *name) {
    static const char head[] = "/proc/sys/net/ipv6/conf/", tail[] = "/accept_dad";
    char path[sizeof head + IFNAMSIZ + sizeof tail];
    size_t n = strnlen(name, IFNAMSIZ - 1);
    memcpy(path, head, sizeof head - 1);
    memcpy(path + sizeof head - 1, name, n);
    memcpy(path + sizeof head - 1 + n, tail, sizeof tail);
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return;
    while (write(fd, "0", 1) < 0 && errno == EINTR) {
    }
    close(fd);
}

int nic_configure(jdoc *d, jnode *nic, bool by_mac, char name[32], struct err *er) {
    jnode *mac = jget(d, nic, "mac"), *match = jget(d, nic, "match"), *given = jget(d, nic, "name");
    jnode *ip = jget(d, nic, "ip"), *gw = jget(d, nic, "gateway"), *ann = jget(d, nic, "announce");
    unsigned char hw[6];
    struct ifreq ifr;
    struct in_addr in = {0};
    char addr[64] = "";
    int plen = 24;
    bool has_ip = jtruthy(ip);
    er->type = NULL;
    if (!by_mac && jtruthy(given)) { /* snprintf(name, 32, "%s", ...) without vfprintf */
        size_t n = strnlen(given->s, 31);
        memcpy(name, given->s, n);
        name[n] = 0;
    } else if (iface_by_mac(match->s, name, er)) {
        return -1;
    }
    nic_preopen(); /* done before the snapshot; again only if that failed */
    if (ioctl_sock < 0) return set_oserr(er, errno, NULL);
    parse_mac(mac->s, hw);
    if (strcasecmp(mac->s, match->s)) {
        ifreq_for(&ifr, name);
        ifr.ifr_hwaddr.sa_family = ARPHRD_ETHER;
        memcpy(ifr.ifr_hwaddr.sa_data, hw, 6);
        if (ioctl(ioctl_sock, SIOCSIFHWADDR, &ifr)) return set_oserr(er, errno, NULL);
    }
    if (has_ip) {
        parse_ip(ip->s, addr, &in, &plen);
        char cur[INET_ADDRSTRLEN] = "";
        ifreq_for(&ifr, name);
        /* no address yet reads as an error: then it differs */
        if (ioctl(ioctl_sock, SIOCGIFADDR, &ifr) == 0)
            ipv4_text(((struct sockaddr_in *)(void *)&ifr.ifr_addr)->sin_addr, cur);
        if (strcmp(cur, addr)) { /* a clone has its seed's already */
            ifreq_for(&ifr, name);
            sockaddr_for(&ifr.ifr_addr, in);
            if (ioctl(ioctl_sock, SIOCSIFADDR, &ifr)) return set_oserr(er, errno, NULL);
            struct in_addr mask = {htonl(plen ? 0xffffffffu << (32 - plen) : 0)};
            ifreq_for(&ifr, name);
            sockaddr_for(&ifr.ifr_netmask, mask);
            if (ioctl(ioctl_sock, SIOCSIFNETMASK, &ifr)) return set_oserr(er, errno, NULL);
        }
    }
    ifreq_for(&ifr, name);
    if (ioctl(ioctl_sock, SIOCGIFFLAGS, &ifr)) return set_oserr(er, errno, NULL);
    if (!(ifr.ifr_flags & IFF_UP)) {
        short flags = (short)(ifr.ifr_flags | IFF_UP);
        no_dad(name);
        ifreq_for(&ifr, name);
        ifr.ifr_flags = flags;
        if (ioctl(ioctl_sock, SIOCSIFFLAGS, &ifr)) return set_oserr(er, errno, NULL);
    }
    if (has_ip && (!ann || jtruthy(ann)) && gratuitous_arp(name, hw, in, er)) return -1;
    if (jtruthy(gw)) {
        bool yes;
        if (has_default_route(&yes, er)) return -1;
        if (!yes && ip_route(gw->s, name, er)) return -1;
    }
    return 0;
}

/* identity.announce: the gratuitous ARP a setup left for later (the first
 * forwarded connection of a bottle without egress).  1 served, 0 hand back. */
int op_announce(uint32_t rid, jdoc *d, jnode *call) {
    static const char *const keys[] = {"op", "name", "mac", "ip", NULL};
    jnode *name = jget(d, call, "name"), *mac = jget(d, call, "mac"), *ip = jget(d, call, "ip");
    unsigned char hw[6];
    char addr[64];
    struct in_addr in;
    int plen;
    if (!jonly_keys(d, call, keys)) return 0;
    if (!name || name->t != J_STR || !ascii_printable(name) || name->n >= IFNAMSIZ) return 0;
    if (!mac || mac->t != J_STR || mac->has_nul || parse_mac(mac->s, hw)) return 0;
    if (!ip || ip->t != J_STR || !ascii_printable(ip) || parse_ip(ip->s, addr, &in, &plen)) return 0;
    struct err er = {0};
    if (gratuitous_arp(name->s, hw, in, &er)) {
        send_oserror(rid, er.no, er.path);
    } else {
        buf_t b = {0};
        send_reply(rid, &b);
        b_free(&b);
    }
    return 1;
}
