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
 *
 * The disk (guest/README.md "The disk"): records of 128 bytes, each
 *     magic[8] seq[8] payload[104] checksum[8]          (integers little-endian)
 * payload word j (0..12) = mix(seq << 4 | j), checksum = FNV-1a 64 of the first 120 bytes.
 * A record is good when it is exactly the record its seq makes (magic, payload, checksum).
 *
 *   cpx diskcheck [-f file] [-r bytes/s] [-c records] [-o console] [-s status-file]
 *       Writes records with magic CPXDCHK1 and seq 1, 2, ... into a ring of -c slots
 *       (record seq lives in slot (seq - 1) % c) at -r bytes per second, in one batch
 *       every 100 ms followed by fdatasync, and verifies the records already written in a
 *       rolling pass that reads the disk (O_DIRECT), not the page cache. At start it first
 *       verifies everything in the file and resumes after the last good record, saying so
 *       on the console. Once a second:
 *         diskcheck seq=N records=R verified=V errors=E
 *       N is the last record written, R the records the ring holds, V the record checks
 *       done since start, E the records found missing or bad since start (and failed
 *       writes). The line goes to the console and atomically replaces the status file.
 *   cpx diskwrite      CGI: appends QUERY_STRING's n=K (1..1000) records with magic
 *       CPXACKD1 to /data/acked.dat under flock, fsyncs the file and /data, answers
 *       "acked last=SEQ records=N". Deterministic: PVM and SVM answer the same bytes.
 *   cpx diskverify     CGI: checks /data/acked.dat (record i must be seq i + 1), answers
 *       "verified records=N ok=N corrupt=C first_bad=SEQ|-".
 *   cpx extfs DEVICE   exit status 0 when DEVICE holds an ext2/3/4 file system.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
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

/* ---- the checkers' paced loop ----
 * memcheck and diskcheck both do a little work every tick of CLOCK_MONOTONIC and print a
 * status line every PER_REPORT ticks. A tick that comes late (TCG, a checkpoint pause) does
 * not try to catch up: the work is paced by ticks done, not by wall time, so the SVM goes
 * on from the tick the checkpoint left the PVM at. */

#define PER_REPORT 10

struct paced {
    uint64_t period_ns;
    int out;            /* the console, or -1 */
    const char *status; /* the status file, or NULL */
    void *state;        /* the checker's */
    /* The work of tick `ticks` (1, 2, ...). */
    void (*tick)(void *state, uint64_t ticks);
    /* After every PER_REPORT-th tick: writes the status line into `line`, returns its length. */
    int (*report)(void *state, uint64_t ticks, char *line, size_t size);
};

static __attribute__((noreturn)) void paced_loop(const struct paced *p)
{
    char tmp[256], line[200];
    if (p->status) {
        snprintf(tmp, sizeof(tmp), "%s.tmp", p->status);
    }
    uint64_t ticks = 0;
    uint64_t next = now_ns(CLOCK_MONOTONIC);
    for (;;) {
        next += p->period_ns;
        uint64_t now = now_ns(CLOCK_MONOTONIC);
        if (next > now) {
            struct timespec ts = { (time_t)((next - now) / 1000000000ULL),
                                   (long)((next - now) % 1000000000ULL) };
            nanosleep(&ts, NULL);
        } else {
            next = now; /* late (TCG, checkpoint pause): do not try to catch up */
        }
        ticks++;
        p->tick(p->state, ticks);
        if (ticks % PER_REPORT != 0) {
            continue;
        }
        int n = p->report(p->state, ticks, line, sizeof(line));
        if (n <= 0) {
            continue;
        }
        if (n >= (int)sizeof(line)) {
            n = (int)sizeof(line) - 1;
        }
        if (p->out >= 0) {
            write_all(p->out, line, (size_t)n);
        }
        if (p->status) {
            int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
            if (fd >= 0) {
                write_all(fd, line, (size_t)n);
                close(fd);
                rename(tmp, p->status);
            }
        }
    }
}

/* ---- memcheck ---- */

/* Deterministic: the PRNG state, counters and cursor live in this process's memory. */
struct memcheck {
    uint64_t *region, *gen, pages;
    uint64_t rng, writes, passes, errors, seq, cursor;
    uint64_t per_tick;  /* page writes per tick */
    uint64_t per_check; /* pages verified per report */
};

/* Every 10 ms: rewrite pseudo-random pages. */
static void memcheck_tick(void *state, uint64_t steps)
{
    struct memcheck *mc = state;
    (void)steps;
    for (uint64_t k = 0; k < mc->per_tick; k++) {
        mc->rng ^= mc->rng << 13;
        mc->rng ^= mc->rng >> 7;
        mc->rng ^= mc->rng << 17;
        uint64_t i = mc->rng % mc->pages;
        mc->gen[i]++;
        fill_page(mc->region + i * PAGE_WORDS, i, mc->gen[i]);
        mc->writes++;
    }
}

/* Every 100 ms: verify a tenth of the region against gen[], report. */
static int memcheck_report(void *state, uint64_t steps, char *line, size_t size)
{
    struct memcheck *mc = state;
    for (uint64_t k = 0; k < mc->per_check && mc->cursor < mc->pages; k++, mc->cursor++) {
        mc->errors += check_page(mc->region + mc->cursor * PAGE_WORDS, mc->cursor,
                                 mc->gen[mc->cursor]);
    }
    if (mc->cursor >= mc->pages) {
        mc->cursor = 0;
        mc->passes++;
    }
    uint64_t sum = 0xcbf29ce484222325ULL;
    for (uint64_t i = 0; i < mc->pages; i++) {
        sum = (sum ^ mc->gen[i]) * 0x100000001b3ULL;
    }
    mc->seq++;
    return snprintf(line, size,
                    "memcheck seq=%" PRIu64 " steps=%" PRIu64 " writes=%" PRIu64
                    " passes=%" PRIu64 " errors=%" PRIu64 " sum=%016" PRIx64 "\n",
                    mc->seq, steps, mc->writes, mc->passes, mc->errors, sum);
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
    struct memcheck mc = {
        .region = region,
        .gen = gen,
        .pages = pages,
        .rng = 0x2545f4914f6cdd1dULL,
        .per_tick = (uint64_t)(rate > 0 ? rate : 0) / 100, /* ticks of 10 ms */
        .per_check = (pages + 9) / 10,
    };
    struct paced loop = {
        .period_ns = 10000000ULL,
        .out = console ? open(console, O_WRONLY | O_NOCTTY) : 1,
        .status = status,
        .state = &mc,
        .tick = memcheck_tick,
        .report = memcheck_report,
    };
    paced_loop(&loop);
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

/* ---- the disk (guest/README.md "The disk") ------------------------------------------------ */

#define REC_SIZE 128
#define REC_WORDS 13
#define REC_SUM_AT 120
#define CHUNK_RECORDS 128 /* 16 KiB: one read of the rolling verification */
#define CHUNK_BYTES (CHUNK_RECORDS * REC_SIZE)
#define MAX_ERROR_LINES 20
#define ACKED_PATH "/data/acked.dat"
#define ACKED_MAX 1000

static const char DISKCHECK_MAGIC[8] = { 'C', 'P', 'X', 'D', 'C', 'H', 'K', '1' };
static const char ACKED_MAGIC[8] = { 'C', 'P', 'X', 'A', 'C', 'K', 'D', '1' };

static uint64_t fnv64(const unsigned char *p, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) {
        h = (h ^ p[i]) * 0x100000001b3ULL;
    }
    return h;
}

static void put64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) {
        p[i] = (unsigned char)(v >> (8 * i));
    }
}

static uint64_t get64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) {
        v = (v << 8) | p[i];
    }
    return v;
}

static void make_record(unsigned char *r, const char *magic, uint64_t seq)
{
    memcpy(r, magic, 8);
    put64(r + 8, seq);
    for (uint64_t j = 0; j < REC_WORDS; j++) {
        put64(r + 16 + 8 * j, mix(seq << 4 | j));
    }
    put64(r + REC_SUM_AT, fnv64(r, REC_SUM_AT));
}

/* The seq of a good record (exactly the record its seq makes), 0 when r is not one. */
static uint64_t record_seq(const unsigned char *r, const char *magic)
{
    unsigned char want[REC_SIZE];
    uint64_t seq = get64(r + 8);
    if (memcmp(r, magic, 8) != 0 || seq == 0) {
        return 0;
    }
    make_record(want, magic, seq);
    return memcmp(r, want, REC_SIZE) == 0 ? seq : 0;
}

static int pwrite_all(int fd, const unsigned char *buf, size_t len, off_t at)
{
    while (len > 0) {
        ssize_t n = pwrite(fd, buf, len, at);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -1;
        }
        buf += n;
        len -= (size_t)n;
        at += n;
    }
    return 0;
}

/* Reads the file from the disk, not from the page cache: O_DIRECT where the file system
 * allows it, else the cached pages are dropped (they are clean: every write is synced). */
struct disk_reader {
    int fd;
    int direct;
    unsigned char *buf; /* CHUNK_BYTES, aligned for O_DIRECT */
};

static int reader_open(struct disk_reader *rd, const char *path)
{
    rd->direct = 1;
    rd->fd = open(path, O_RDONLY | O_DIRECT);
    if (rd->fd < 0 && errno == EINVAL) {
        rd->direct = 0;
        rd->fd = open(path, O_RDONLY);
    }
    if (rd->fd < 0 || posix_memalign((void **)&rd->buf, 4096, CHUNK_BYTES) != 0) {
        return -1;
    }
    return 0;
}

/* Chunk number `chunk` of the file into rd->buf: the whole records read, -1 on an error. */
static long reader_chunk(struct disk_reader *rd, uint64_t chunk)
{
    off_t at = (off_t)(chunk * CHUNK_BYTES);
    size_t got = 0;
    if (rd->direct) {
        ssize_t n;
        do {
            n = pread(rd->fd, rd->buf, CHUNK_BYTES, at); /* short only at the end of file */
        } while (n < 0 && errno == EINTR);
        if (n < 0 && errno == EINVAL) {
            rd->direct = 0; /* the file system refused O_DIRECT after all */
            fcntl(rd->fd, F_SETFL, fcntl(rd->fd, F_GETFL) & ~O_DIRECT);
            return reader_chunk(rd, chunk);
        }
        if (n < 0) {
            return -1;
        }
        got = (size_t)n;
    } else {
        posix_fadvise(rd->fd, at, CHUNK_BYTES, POSIX_FADV_DONTNEED);
        while (got < CHUNK_BYTES) {
            ssize_t n = pread(rd->fd, rd->buf + got, CHUNK_BYTES - got, at + (off_t)got);
            if (n < 0 && errno == EINTR) {
                continue;
            }
            if (n < 0) {
                return -1;
            }
            if (n == 0) {
                break;
            }
            got += (size_t)n;
        }
    }
    return (long)(got / REC_SIZE);
}

struct diskcheck {
    const char *path;
    int fd;
    struct disk_reader rd;
    uint64_t cap;  /* ring slots */
    uint64_t next; /* the next seq to write: 1 .. next - 1 are written and synced */
    uint64_t verified, errors;
    uint64_t *flagged; /* per slot: the bad record already counted */
    int out;           /* console, or -1 */
    unsigned error_lines;
    /* the paced loop's: bytes to write per tick, the bytes not written yet, the rolling
     * verification's next slot and its reads per tick, a buffer of one batch */
    uint64_t per_tick_bytes, credit, cursor, chunks;
    unsigned char *buf;
};

static void dc_say(struct diskcheck *dc, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void dc_say(struct diskcheck *dc, const char *fmt, ...)
{
    char line[300];
    va_list ap;
    int n = snprintf(line, sizeof(line), "diskcheck: ");
    va_start(ap, fmt);
    n += vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof(line) - 2) {
        n = (int)sizeof(line) - 2;
    }
    line[n++] = '\n';
    write_all(dc->out >= 0 ? dc->out : 2, line, (size_t)n);
}

static void dc_error(struct diskcheck *dc, uint64_t seq, const char *what)
{
    uint64_t slot = (seq - 1) % dc->cap;
    if (seq != 0 && dc->flagged[slot] == seq) {
        return; /* counted when a pass first found it */
    }
    if (seq != 0) {
        dc->flagged[slot] = seq;
    }
    dc->errors++;
    if (dc->error_lines < MAX_ERROR_LINES) {
        dc->error_lines++;
        dc_say(dc, "error: record %" PRIu64 " (slot %" PRIu64 ") %s%s", seq, slot, what,
               dc->error_lines == MAX_ERROR_LINES ? " (further errors only counted)" : "");
    }
}

/* The seq slot `slot` holds once records 1 .. written are in the ring; 0 for none. */
static uint64_t slot_seq(uint64_t written, uint64_t cap, uint64_t slot)
{
    if (slot >= cap || slot >= written) {
        return 0;
    }
    if (written <= cap) {
        return slot + 1;
    }
    uint64_t last = (written - 1) % cap;
    return written - ((last + cap - slot) % cap);
}

/* Writes records next .. next + count - 1 and syncs them; next moves only when both worked. */
static void diskcheck_write(struct diskcheck *dc, uint64_t count, unsigned char *buf)
{
    for (uint64_t done = 0; done < count;) {
        uint64_t seq = dc->next + done;
        uint64_t slot = (seq - 1) % dc->cap;
        uint64_t run = count - done;
        if (run > dc->cap - slot) {
            run = dc->cap - slot;
        }
        for (uint64_t r = 0; r < run; r++) {
            make_record(buf + r * REC_SIZE, DISKCHECK_MAGIC, seq + r);
        }
        if (pwrite_all(dc->fd, buf, run * REC_SIZE, (off_t)(slot * REC_SIZE)) < 0) {
            dc_error(dc, seq, errno == ENOSPC ? "not written: no space left" : "not written: write failed");
            return;
        }
        done += run;
    }
    if (fdatasync(dc->fd) < 0) {
        dc_error(dc, dc->next, "not written: fdatasync failed");
        return;
    }
    dc->next += count;
}

/* Verifies what the file holds and decides where to go on. `batch` is the most records one
 * batch writes: after a crash, the records of the batch being written may be missing or
 * half-written (it was not synced, so nothing counted on it); those are written again, not
 * counted as errors. `buf` holds `batch` records. */
static void diskcheck_start(struct diskcheck *dc, uint64_t batch, unsigned char *buf)
{
    struct stat st;
    if (fstat(dc->fd, &st) < 0) {
        st.st_size = 0;
    }
    uint64_t size = (uint64_t)st.st_size;
    uint64_t slots = size / REC_SIZE;
    if (slots > dc->cap) {
        slots = dc->cap;
    }
    uint64_t *seqs = calloc(slots + 1, sizeof(uint64_t));
    uint64_t top = 0; /* the highest good record */
    if (seqs == NULL) {
        dc_say(dc, "error: out of memory");
        exit(1);
    }
    for (uint64_t c = 0; c * CHUNK_RECORDS < slots; c++) {
        long n = reader_chunk(&dc->rd, c);
        if (n < 0) {
            dc_say(dc, "error: reading %s: %s", dc->path, strerror(errno));
            dc->errors++;
            break;
        }
        for (uint64_t k = 0; k < (uint64_t)n && c * CHUNK_RECORDS + k < slots; k++) {
            uint64_t slot = c * CHUNK_RECORDS + k;
            uint64_t s = record_seq(dc->rd.buf + k * REC_SIZE, DISKCHECK_MAGIC);
            if (s != 0 && (s - 1) % dc->cap == slot) {
                seqs[slot] = s;
                top = s > top ? s : top;
            }
        }
    }
    /* The oldest record the ring must hold; in a full ring the next batch's slots are at
     * the oldest end. */
    uint64_t lo = top >= dc->cap ? top - dc->cap + 1 + batch : 1;
    uint64_t first_bad = 0, bad = 0;
    for (uint64_t s = lo; s <= top; s++) {
        uint64_t slot = (s - 1) % dc->cap;
        if (slot >= slots || seqs[slot] != s) {
            bad++;
            first_bad = first_bad ? first_bad : s;
        }
    }
    dc->next = top + 1;
    if (bad > 0 && top - first_bad < batch) {
        dc_say(dc, "records %" PRIu64 "..%" PRIu64 " were a batch not completely written"
               " (a crash): resuming after record %" PRIu64 ", writing them again",
               first_bad, top, first_bad - 1);
        dc->verified += first_bad - lo;
        dc->next = first_bad;
        diskcheck_write(dc, top - first_bad + 1, buf);
    } else {
        for (uint64_t s = lo; s <= top; s++) {
            uint64_t slot = (s - 1) % dc->cap;
            if (slot >= slots) {
                dc_error(dc, s, "missing: the file is shorter than expected");
            } else if (seqs[slot] != s) {
                dc_error(dc, s, "missing or bad");
            }
        }
        dc->verified += top >= lo ? top - lo + 1 : 0;
    }
    uint64_t written = dc->next - 1;
    uint64_t keep = (written < dc->cap ? written : dc->cap) * REC_SIZE;
    if (size > keep) {
        /* Not counted as errors: nothing after the last good record was synced. */
        dc_say(dc, "the file is longer than expected: %" PRIu64 " bytes after record %" PRIu64
               " cut off", size - keep, written);
        if (ftruncate(dc->fd, (off_t)keep) < 0) {
            dc_say(dc, "error: truncating %s: %s", dc->path, strerror(errno));
            dc->errors++;
        }
    }
    free(seqs);
    dc_say(dc, "start file=%s bytes=%" PRIu64 " capacity=%" PRIu64 " resuming after record %"
           PRIu64 " verified=%" PRIu64 " errors=%" PRIu64,
           dc->path, size, dc->cap, written, dc->verified, dc->errors);
}

/* The rolling verification: `chunks` reads from *cursor on, round the filled slots. */
static void diskcheck_verify(struct diskcheck *dc, uint64_t *cursor, uint64_t chunks)
{
    uint64_t written = dc->next - 1;
    uint64_t filled = written < dc->cap ? written : dc->cap;
    for (uint64_t k = 0; k < chunks && filled > 0; k++) {
        if (*cursor >= filled) {
            *cursor = 0;
        }
        uint64_t chunk = *cursor / CHUNK_RECORDS, first = chunk * CHUNK_RECORDS;
        uint64_t end = first + CHUNK_RECORDS < filled ? first + CHUNK_RECORDS : filled;
        long n = reader_chunk(&dc->rd, chunk);
        if (n < 0) {
            dc_error(dc, slot_seq(written, dc->cap, first), "not verified: read failed");
            *cursor = end;
            continue;
        }
        for (uint64_t slot = first; slot < end; slot++) {
            uint64_t want = slot_seq(written, dc->cap, slot);
            if (slot - first >= (uint64_t)n) {
                dc_error(dc, want, "missing: beyond the end of the file");
            } else {
                uint64_t got = record_seq(dc->rd.buf + (slot - first) * REC_SIZE, DISKCHECK_MAGIC);
                if (got == 0) {
                    dc_error(dc, want, "bad: not a good record");
                } else if (got != want) {
                    char what[80];
                    snprintf(what, sizeof(what), "missing: the slot holds record %" PRIu64, got);
                    dc_error(dc, want, what);
                }
            }
            dc->verified++;
        }
        *cursor = end;
    }
}

/* Every 100 ms: write the records the rate allows, one batch, synced; verify a few chunks. */
static void diskcheck_tick(void *state, uint64_t ticks)
{
    struct diskcheck *dc = state;
    (void)ticks;
    dc->credit += dc->per_tick_bytes;
    uint64_t count = dc->credit / REC_SIZE;
    if (count > 0) {
        dc->credit -= count * REC_SIZE;
        diskcheck_write(dc, count, dc->buf);
    }
    diskcheck_verify(dc, &dc->cursor, dc->chunks);
}

/* Once a second. */
static int diskcheck_report(void *state, uint64_t ticks, char *line, size_t size)
{
    struct diskcheck *dc = state;
    uint64_t written = dc->next - 1;
    (void)ticks;
    return snprintf(line, size,
                    "diskcheck seq=%" PRIu64 " records=%" PRIu64 " verified=%" PRIu64
                    " errors=%" PRIu64 "\n",
                    written, written < dc->cap ? written : dc->cap, dc->verified, dc->errors);
}

static int diskcheck(int argc, char **argv)
{
    struct diskcheck dc = { .path = "/data/diskcheck.dat", .cap = 16384, .out = -1 };
    long rate = 65536;
    const char *console = NULL, *status = NULL;
    int opt;

    while ((opt = getopt(argc, argv, "f:r:c:o:s:")) != -1) {
        switch (opt) {
        case 'f': dc.path = optarg; break;
        case 'r': rate = atol(optarg); break;
        case 'c': dc.cap = (uint64_t)atoll(optarg); break;
        case 'o': console = optarg; break;
        case 's': status = optarg; break;
        default:
            fprintf(stderr, "usage: cpx diskcheck [-f file] [-r bytes/s] [-c records]"
                            " [-o console] [-s file]\n");
            return 2;
        }
    }
    if (rate < 0 || dc.cap == 0) {
        fprintf(stderr, "diskcheck: -r must be >= 0 and -c > 0\n");
        return 2;
    }
    dc.out = console ? open(console, O_WRONLY | O_NOCTTY) : 1;
    dc.fd = open(dc.path, O_RDWR | O_CREAT, 0644);
    if (dc.fd < 0 || reader_open(&dc.rd, dc.path) < 0) {
        dc_say(&dc, "error: cannot open %s: %s", dc.path, strerror(errno));
        sleep(1); /* busybox init respawns it */
        return 1;
    }
    char dir[256];
    snprintf(dir, sizeof(dir), "%s", dc.path);
    char *slash = strrchr(dir, '/');
    if (slash != NULL) {
        *(slash == dir ? slash + 1 : slash) = '\0';
        int dfd = open(dir, O_RDONLY | O_DIRECTORY);
        if (dfd >= 0) {
            fsync(dfd); /* the file's name is on the disk too */
            close(dfd);
        }
    }
    /* Batches of 100 ms; the rolling verification reads 8 times the write rate (at least
     * 512 KiB/s), so a full pass over the default ring (2 MiB) takes about 4 s. */
    dc.per_tick_bytes = (uint64_t)rate / 10;
    uint64_t batch = dc.per_tick_bytes / REC_SIZE + 1;
    batch = batch < 64 ? 64 : batch;
    uint64_t verify_bytes = dc.per_tick_bytes * 8 > 52429 ? dc.per_tick_bytes * 8 : 52429;
    dc.chunks = (verify_bytes + CHUNK_BYTES - 1) / CHUNK_BYTES;
    dc.buf = malloc(batch * REC_SIZE);
    dc.flagged = calloc(dc.cap, sizeof(uint64_t));
    if (dc.buf == NULL || dc.flagged == NULL) {
        dc_say(&dc, "error: out of memory");
        return 1;
    }
    diskcheck_start(&dc, batch, dc.buf);

    struct paced loop = {
        .period_ns = 100000000ULL,
        .out = dc.out,
        .status = status,
        .state = &dc,
        .tick = diskcheck_tick,
        .report = diskcheck_report,
    };
    paced_loop(&loop);
}

/* ---- the CGIs: records a client saw acknowledged ---- */

static int cgi_fail(int code, const char *text)
{
    printf("Status: %d %s\r\nContent-Type: text/plain\r\n\r\n%s\n", code,
           code == 400 ? "Bad Request" : "Service Unavailable", text);
    return 0;
}

static int disk_mounted(void)
{
    struct stat data, root;
    return stat("/data", &data) == 0 && stat("/", &root) == 0 && data.st_dev != root.st_dev;
}

/* n=K from QUERY_STRING; -1 when absent or not a number. */
static long query_n(void)
{
    const char *q = getenv("QUERY_STRING");
    while (q != NULL && *q != '\0') {
        if (q[0] == 'n' && q[1] == '=') {
            const char *d = q + 2;
            long v = 0;
            int digits = 0;
            for (; *d >= '0' && *d <= '9' && digits < 9; d++, digits++) {
                v = v * 10 + (*d - '0');
            }
            return digits > 0 && (*d == '\0' || *d == '&') ? v : -1;
        }
        q = strchr(q, '&');
        q = q ? q + 1 : NULL;
    }
    return -1;
}

static int diskwrite_cgi(void)
{
    char text[200];
    long n = query_n();
    if (n < 1 || n > ACKED_MAX) {
        snprintf(text, sizeof(text), "diskwrite: wants n=K with 1 <= K <= %d", ACKED_MAX);
        return cgi_fail(400, text);
    }
    if (!disk_mounted()) {
        return cgi_fail(503, "diskwrite: no disk mounted at /data");
    }
    int fd = open(ACKED_PATH, O_RDWR | O_CREAT, 0644);
    struct stat st;
    if (fd < 0 || flock(fd, LOCK_EX) < 0 || fstat(fd, &st) < 0) {
        snprintf(text, sizeof(text), "diskwrite: %s: %s", ACKED_PATH, strerror(errno));
        return cgi_fail(503, text);
    }
    uint64_t have = (uint64_t)st.st_size / REC_SIZE;
    /* A torn record at the end was never acknowledged (the answer comes after the sync). */
    if ((uint64_t)st.st_size % REC_SIZE != 0 && ftruncate(fd, (off_t)(have * REC_SIZE)) < 0) {
        snprintf(text, sizeof(text), "diskwrite: truncating %s: %s", ACKED_PATH, strerror(errno));
        return cgi_fail(503, text);
    }
    unsigned char *buf = malloc((size_t)n * REC_SIZE);
    if (buf == NULL) {
        return cgi_fail(503, "diskwrite: out of memory");
    }
    for (long i = 0; i < n; i++) {
        make_record(buf + i * REC_SIZE, ACKED_MAGIC, have + 1 + (uint64_t)i);
    }
    int dfd = open("/data", O_RDONLY | O_DIRECTORY);
    if (pwrite_all(fd, buf, (size_t)n * REC_SIZE, (off_t)(have * REC_SIZE)) < 0 || fsync(fd) < 0
        || dfd < 0 || fsync(dfd) < 0) {
        snprintf(text, sizeof(text), "diskwrite: writing %s: %s", ACKED_PATH, strerror(errno));
        return cgi_fail(503, text);
    }
    printf("Content-Type: text/plain\r\n\r\nacked last=%" PRIu64 " records=%" PRIu64 "\n",
           have + (uint64_t)n, have + (uint64_t)n);
    return 0;
}

static int diskverify_cgi(void)
{
    char text[200];
    if (!disk_mounted()) {
        return cgi_fail(503, "diskverify: no disk mounted at /data");
    }
    uint64_t records = 0, ok = 0, corrupt = 0, first_bad = 0;
    int fd = open(ACKED_PATH, O_RDONLY);
    if (fd < 0 && errno != ENOENT) {
        snprintf(text, sizeof(text), "diskverify: %s: %s", ACKED_PATH, strerror(errno));
        return cgi_fail(503, text);
    }
    if (fd >= 0) {
        static unsigned char buf[512 * REC_SIZE];
        flock(fd, LOCK_SH);
        /* Drop the cached pages (clean: diskwrite syncs): what is checked is the disk's. */
        posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
        off_t at = 0;
        for (;;) {
            size_t got = 0;
            while (got < sizeof(buf)) {
                ssize_t n = pread(fd, buf + got, sizeof(buf) - got, at + (off_t)got);
                if (n < 0 && errno == EINTR) {
                    continue;
                }
                if (n < 0) {
                    snprintf(text, sizeof(text), "diskverify: reading %s: %s", ACKED_PATH,
                             strerror(errno));
                    return cgi_fail(503, text);
                }
                if (n == 0) {
                    break;
                }
                got += (size_t)n;
            }
            for (size_t k = 0; k * REC_SIZE < got; k++) {
                records++;
                /* A partial record at the end counts as a corrupt one. */
                if ((k + 1) * REC_SIZE <= got
                    && record_seq(buf + k * REC_SIZE, ACKED_MAGIC) == records) {
                    ok++;
                } else {
                    corrupt++;
                    first_bad = first_bad ? first_bad : records;
                }
            }
            if (got < sizeof(buf)) {
                break;
            }
            at += (off_t)got;
        }
    }
    char bad[24] = "-";
    if (first_bad) {
        snprintf(bad, sizeof(bad), "%" PRIu64, first_bad);
    }
    printf("Content-Type: text/plain\r\n\r\nverified records=%" PRIu64 " ok=%" PRIu64
           " corrupt=%" PRIu64 " first_bad=%s\n", records, ok, corrupt, bad);
    return 0;
}

/* Exit status 0 when `dev` holds an ext2/3/4 file system (the superblock magic 0xEF53). */
static int extfs(const char *dev)
{
    unsigned char magic[2];
    int fd = open(dev, O_RDONLY);
    if (fd < 0) {
        perror(dev);
        return 2;
    }
    return pread(fd, magic, 2, 1080) == 2 && magic[0] == 0x53 && magic[1] == 0xef ? 0 : 1;
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
    if (argc >= 2 && strcmp(argv[1], "diskcheck") == 0) {
        return diskcheck(argc - 1, argv + 1);
    }
    if (argc >= 2 && strcmp(argv[1], "diskwrite") == 0) {
        return diskwrite_cgi();
    }
    if (argc >= 2 && strcmp(argv[1], "diskverify") == 0) {
        return diskverify_cgi();
    }
    if (argc >= 3 && strcmp(argv[1], "extfs") == 0) {
        return extfs(argv[2]);
    }
    fprintf(stderr, "usage: cpx memcheck|clock|tcpecho PORT|udpecho PORT|diskcheck|diskwrite"
                    "|diskverify|extfs DEVICE\n");
    return 2;
}
