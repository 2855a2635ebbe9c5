/* Test harness for the core's pure helpers: one query per line on stdin,
 * one answer per line on stdout (tests/test_agent_core.py). */
#include "../../pytest_bottle/guest/core/core.h"

#include <arpa/inet.h>
#include <stdio.h>
#include <string.h>

int main(void) {
    char line[4096];
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = 0;
        char *arg = strchr(line, ' ');
        if (!arg) return 2;
        *arg++ = 0;
        if (!strcmp(line, "i64")) {
            long long v;
            if (parse_i64(arg, &v)) printf("%lld\n", v);
            else puts("no");
        } else if (!strcmp(line, "ip")) {
            struct in_addr in;
            char text[16];
            if (!dotted_quad(arg, &in)) {
                puts("no");
                continue;
            }
            ipv4_text(in, text);
            printf("%s %s\n", text, inet_ntoa(in));
        } else if (!strcmp(line, "truthy")) {
            jdoc d = {0}; /* the value of key "v" in the object given */
            if (json_parse(&d, (const unsigned char *)arg, strlen(arg))) puts("bad");
            else puts(jtruthy(jget(&d, d.v, "v")) ? "1" : "0");
            json_free(&d);
        } else {
            return 2;
        }
        fflush(stdout);
    }
    return 0;
}
