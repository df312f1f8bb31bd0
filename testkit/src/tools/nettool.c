/* Network helpers for Berth's end-to-end tests and benchmarks, built
 * statically so they run in a busybox image (busybox's nc has no UDP and
 * forks per connection).
 *   nettool echo PORT            UDP: echo every datagram back, forever
 *   nettool send HOST PORT MSG   UDP: send MSG, print the reply (3 tries, 2 s each)
 *   nettool tcpecho PORT         TCP: echo each connection until EOF, one at a time
 *   nettool tcpsend HOST PORT MIB TCP: send MIB mebibytes of zeros in 64 KiB writes
 *   nettool tcpsink PORT         TCP: read and discard each connection, one at a time
 */
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

static int echo(const char *port) {
    struct addrinfo hints = {.ai_family = AF_INET6, .ai_socktype = SOCK_DGRAM, .ai_flags = AI_PASSIVE};
    struct addrinfo *ai;
    if (getaddrinfo(NULL, port, &hints, &ai) != 0) return 2;
    int s = socket(ai->ai_family, SOCK_DGRAM, 0);
    int no = 0;
    setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, &no, sizeof no);
    if (s < 0 || bind(s, ai->ai_addr, ai->ai_addrlen) != 0) { perror("bind"); return 2; }
    printf("udp echo on %s\n", port);
    fflush(stdout);
    char buf[65536];
    for (;;) {
        struct sockaddr_storage peer;
        socklen_t plen = sizeof peer;
        ssize_t n = recvfrom(s, buf, sizeof buf, 0, (struct sockaddr *)&peer, &plen);
        if (n >= 0) sendto(s, buf, (size_t)n, 0, (struct sockaddr *)&peer, plen);
    }
}

static int send_one(const char *host, const char *port, const char *msg) {
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_DGRAM};
    struct addrinfo *ai;
    int e = getaddrinfo(host, port, &hints, &ai);
    if (e != 0) { fprintf(stderr, "%s: %s\n", host, gai_strerror(e)); return 2; }
    int s = socket(ai->ai_family, SOCK_DGRAM, 0);
    if (s < 0 || connect(s, ai->ai_addr, ai->ai_addrlen) != 0) { perror("connect"); return 2; }
    struct timeval tv = {.tv_sec = 2};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char buf[65536];
    for (int i = 0; i < 3; i++) {
        send(s, msg, strlen(msg), 0);
        ssize_t n = recv(s, buf, sizeof buf - 1, 0);
        if (n >= 0) {
            buf[n] = 0;
            printf("%s\n", buf);
            return 0;
        }
    }
    fprintf(stderr, "no reply from %s:%s\n", host, port);
    return 1;
}

/* A TCP listener on every address (IPv4 and IPv6), or -1. */
static int listen_tcp(const char *port, const char *what) {
    struct addrinfo hints = {.ai_family = AF_INET6, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE};
    struct addrinfo *ai;
    if (getaddrinfo(NULL, port, &hints, &ai) != 0) return -1;
    int s = socket(ai->ai_family, SOCK_STREAM, 0);
    int no = 0, yes = 1;
    setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, &no, sizeof no);
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
    if (s < 0 || bind(s, ai->ai_addr, ai->ai_addrlen) != 0 || listen(s, 1024) != 0) { perror("listen"); return -1; }
    printf("tcp %s on %s\n", what, port);
    fflush(stdout);
    return s;
}

static int tcpsink(const char *port) {
    int s = listen_tcp(port, "sink");
    if (s < 0) return 2;
    static char buf[1 << 16];
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0) continue;
        while (read(c, buf, sizeof buf) > 0) {}
        close(c);
    }
}

static int tcpecho(const char *port) {
    int s = listen_tcp(port, "echo");
    if (s < 0) return 2;
    int yes = 1;
    static char buf[1 << 16];
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0) continue;
        setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &yes, sizeof yes);
        ssize_t n;
        while ((n = read(c, buf, sizeof buf)) > 0) {
            ssize_t off = 0;
            while (off < n) {
                ssize_t w = write(c, buf + off, (size_t)(n - off));
                if (w <= 0) break;
                off += w;
            }
        }
        close(c);
    }
}

static int tcpsend(const char *host, const char *port, const char *mib) {
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    struct addrinfo *ai;
    int e = getaddrinfo(host, port, &hints, &ai);
    if (e != 0) { fprintf(stderr, "%s: %s\n", host, gai_strerror(e)); return 2; }
    int s = socket(ai->ai_family, SOCK_STREAM, 0);
    if (s < 0 || connect(s, ai->ai_addr, ai->ai_addrlen) != 0) { perror("connect"); return 2; }
    static char buf[1 << 16];
    long long left = atoll(mib) << 20;
    while (left > 0) {
        ssize_t w = write(s, buf, left < (long long)sizeof buf ? (size_t)left : sizeof buf);
        if (w <= 0) { perror("write"); return 1; }
        left -= w;
    }
    close(s);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "tcpsink") == 0) return tcpsink(argv[2]);
    if (argc == 5 && strcmp(argv[1], "tcpsend") == 0) return tcpsend(argv[2], argv[3], argv[4]);
    if (argc == 3 && strcmp(argv[1], "tcpecho") == 0) return tcpecho(argv[2]);
    if (argc == 3 && strcmp(argv[1], "echo") == 0) return echo(argv[2]);
    if (argc == 5 && strcmp(argv[1], "send") == 0) return send_one(argv[2], argv[3], argv[4]);
    fprintf(stderr, "usage: nettool echo PORT | nettool send HOST PORT MSG | nettool tcpecho PORT | nettool tcpsend HOST PORT MIB | nettool tcpsink PORT\n");
    return 2;
}
