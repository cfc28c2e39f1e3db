/*
 * cpx: the coloproxy test guest's helper programs, one static binary (busybox style: the
 * applet is the first argument).
 *
 *   cpx memcheck [-m MiB] [-r pages/s] [-o console] [-s status-file]
 *       Keeps a busy memory region and checks it. Each 4 KiB page i holds 512 words
 *       derived from (i, gen[i]); every 10 ms the program rewrites pseudo-random pages
 *       (gen[i]++), and every 100 ms it verifies a tenth of the region against gen[]
 *       (a full pass per second) and reports one line:
 *         memcheck seq=S steps=N writes=W passes=P errors=E sum=HEX
 *       S counts reports, N ticks, W page writes, P full verification passes, E words
 *       found wrong since start; sum is a checksum of gen[] (the same on the PVM and the
 *       SVM at the same step). The line goes to the console and atomically replaces the
 *       status file (served as /cgi-bin/memcheck). A COLO checkpoint that loses dirty
 *       pages leaves pages whose contents do not match gen[]: errors goes above 0 on the
 *       SVM after failover. All state lives in this process's memory: nothing is
 *       recomputed from wall time, so the SVM continues exactly where the checkpoint
 *       left the PVM.
 *   cpx clock
 *       CGI: the guest's clocks in ns and a random number (differs on PVM and SVM).
 *   cpx tcpecho PORT    TCP echo server, IPv4 and IPv6, one process per connection.
 *   cpx udpecho PORT    UDP echo server, IPv4 and IPv6.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE_WORDS 512

static uint64_t mix(uint64_t x)
{
    /* splitmix64 finaliser */
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static uint64_t page_seed(uint64_t page, uint64_t gen)
{
    return mix((page << 32) ^ gen ^ 0x636f6c6f70726f78ULL);
}

static void fill_page(uint64_t *p, uint64_t page, uint64_t gen)
{
    uint64_t s = page_seed(page, gen);
    for (int j = 0; j < PAGE_WORDS; j++) {
        p[j] = s ^ ((uint64_t)j * 0x100000001b3ULL);
    }
}

static uint64_t check_page(const uint64_t *p, uint64_t page, uint64_t gen)
{
    uint64_t s = page_seed(page, gen), bad = 0;
    for (int j = 0; j < PAGE_WORDS; j++) {
        bad += p[j] != (s ^ ((uint64_t)j * 0x100000001b3ULL));
    }
    return bad;
}

static uint64_t now_ns(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return;
        }
        buf += n;
        len -= (size_t)n;
    }
}

static int memcheck(int argc, char **argv)
{
    long mib = 32, rate = 1024;
    const char *console = NULL, *status = NULL;
    int opt;

    while ((opt = getopt(argc, argv, "m:r:o:s:")) != -1) {
        switch (opt) {
        case 'm': mib = atol(optarg); break;
        case 'r': rate = atol(optarg); break;
        case 'o': console = optarg; break;
        case 's': status = optarg; break;
        default:
            fprintf(stderr, "usage: cpx memcheck [-m MiB] [-r pages/s] [-o console] [-s file]\n");
            return 2;
        }
    }
    uint64_t pages = (uint64_t)mib * 256;
    uint64_t *region = mmap(NULL, pages * 4096, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    uint64_t *gen = calloc(pages, sizeof(uint64_t));
    if (region == MAP_FAILED || gen == NULL) {
        perror("memcheck: allocation");
        return 1;
    }
    mlockall(MCL_CURRENT);
    for (uint64_t i = 0; i < pages; i++) {
        fill_page(region + i * PAGE_WORDS, i, 0);
    }
    int out = console ? open(console, O_WRONLY | O_NOCTTY) : 1;
    char tmp[256];
    if (status) {
        snprintf(tmp, sizeof(tmp), "%s.tmp", status);
    }

    /* Deterministic: the PRNG state, counters and cursor live in this process's memory. */
    uint64_t rng = 0x2545f4914f6cdd1dULL, steps = 0, writes = 0, passes = 0, errors = 0;
    uint64_t seq = 0, cursor = 0;
    uint64_t per_tick = (uint64_t)(rate > 0 ? rate : 0) / 100;   /* ticks of 10 ms */
    uint64_t per_check = (pages + 9) / 10;
    uint64_t next = now_ns(CLOCK_MONOTONIC);

    for (;;) {
        next += 10000000ULL;
        uint64_t now = now_ns(CLOCK_MONOTONIC);
        if (next > now) {
            struct timespec ts = { (time_t)((next - now) / 1000000000ULL),
                                   (long)((next - now) % 1000000000ULL) };
            nanosleep(&ts, NULL);
        } else {
            next = now;   /* late (TCG, checkpoint pause): do not try to catch up */
        }
        steps++;
        for (uint64_t k = 0; k < per_tick; k++) {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            uint64_t i = rng % pages;
            gen[i]++;
            fill_page(region + i * PAGE_WORDS, i, gen[i]);
            writes++;
        }
        if (steps % 10 != 0) {
            continue;
        }
        for (uint64_t k = 0; k < per_check && cursor < pages; k++, cursor++) {
            errors += check_page(region + cursor * PAGE_WORDS, cursor, gen[cursor]);
        }
        if (cursor >= pages) {
            cursor = 0;
            passes++;
        }
        uint64_t sum = 0xcbf29ce484222325ULL;
        for (uint64_t i = 0; i < pages; i++) {
            sum = (sum ^ gen[i]) * 0x100000001b3ULL;
        }
        seq++;
        char line[200];
        int n = snprintf(line, sizeof(line),
                         "memcheck seq=%" PRIu64 " steps=%" PRIu64 " writes=%" PRIu64
                         " passes=%" PRIu64 " errors=%" PRIu64 " sum=%016" PRIx64 "\n",
                         seq, steps, writes, passes, errors, sum);
        if (out >= 0) {
            write_all(out, line, (size_t)n);
        }
        if (status) {
            int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
            if (fd >= 0) {
                write_all(fd, line, (size_t)n);
                close(fd);
                rename(tmp, status);
            }
        }
    }
}

static int clock_cgi(void)
{
    uint64_t rnd = 0;
    if (getrandom(&rnd, sizeof(rnd), 0) != sizeof(rnd)) {
        rnd = now_ns(CLOCK_MONOTONIC) * 0x9e3779b97f4a7c15ULL;
    }
    printf("Content-Type: text/plain\r\n\r\n"
           "realtime_ns=%" PRIu64 " monotonic_ns=%" PRIu64 " random=%" PRIu64 "\n",
           now_ns(CLOCK_REALTIME), now_ns(CLOCK_MONOTONIC), rnd);
    return 0;
}

static int listen_socket(int type, int port)
{
    int fd = socket(AF_INET6, type, 0), zero = 0, one = 1;
    struct sockaddr_in6 addr = { .sin6_family = AF_INET6, .sin6_port = htons(port),
                                 .sin6_addr = IN6ADDR_ANY_INIT };
    if (fd < 0) {
        perror("socket");
        exit(1);
    }
    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero));
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
        perror("bind");
        exit(1);
    }
    if (type == SOCK_STREAM && listen(fd, 64) < 0) {
        perror("listen");
        exit(1);
    }
    return fd;
}

static __attribute__((noreturn)) int tcpecho(int port)
{
    int lfd = listen_socket(SOCK_STREAM, port);
    signal(SIGCHLD, SIG_IGN);   /* no zombies */
    for (;;) {
        int fd = accept(lfd, NULL, NULL);
        if (fd < 0) {
            continue;
        }
        if (fork() == 0) {
            char buf[65536];
            ssize_t n;
            close(lfd);
            while ((n = read(fd, buf, sizeof(buf))) > 0) {
                write_all(fd, buf, (size_t)n);
            }
            _exit(0);
        }
        close(fd);
    }
}

static __attribute__((noreturn)) int udpecho(int port)
{
    int fd = listen_socket(SOCK_DGRAM, port);
    char buf[65536];
    for (;;) {
        struct sockaddr_storage peer;
        socklen_t len = sizeof(peer);
        ssize_t n = recvfrom(fd, buf, sizeof(buf), 0, (struct sockaddr *)&peer, &len);
        if (n >= 0) {
            sendto(fd, buf, (size_t)n, 0, (struct sockaddr *)&peer, len);
        }
    }
}

int main(int argc, char **argv)
{
    if (argc >= 2 && strcmp(argv[1], "memcheck") == 0) {
        return memcheck(argc - 1, argv + 1);
    }
    if (argc >= 2 && strcmp(argv[1], "clock") == 0) {
        return clock_cgi();
    }
    if (argc >= 3 && strcmp(argv[1], "tcpecho") == 0) {
        return tcpecho(atoi(argv[2]));
    }
    if (argc >= 3 && strcmp(argv[1], "udpecho") == 0) {
        return udpecho(atoi(argv[2]));
    }
    fprintf(stderr, "usage: cpx memcheck|clock|tcpecho PORT|udpecho PORT\n");
    return 2;
}
