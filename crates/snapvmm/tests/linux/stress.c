/* The Linux guest's workloads for tests/linux_guests.rs, built static with gcc.
 *
 *   stress mem MIB       rewrite every page of a MIB buffer, pass after pass, at
 *                        full speed; each pass first checks that every page still
 *                        holds the previous pass's value (else prints CORRUPT). Once
 *                        a second: "STRESS pass=N mono_ms=M wall_ms=W corrupt=C".
 *                        A second thread sleeps 1 s in a loop and prints
 *                        "TIMER slept_ms=S" (timers fire, at about the right rate).
 *   stress files DIR N   write files DIR/f0..f(N-1), 5 a second, each fsync'ed;
 *                        before each one, drop the caches and check that exactly
 *                        f0..f(n-1) exist with their content (the disk agrees with
 *                        what this process remembers). "FILES n=N ok" or CORRUPT.
 *   stress powerkey      wait for KEY_POWER on /dev/input/event*, then exit 0.
 *   stress content F I   print the content of file number I (the host compares).
 *   stress zeroout DEV OFS LEN  BLKZEROOUT on the block device DEV (the kernel uses
 *                        the device's write-zeroes command where it offers one).
 *   stress vsock-echo P  listen on vsock port P ("VSOCK-LISTENING port=P"); echo
 *                        each connection's lines back, and say how it ended:
 *                        "VSOCK-CONN-EOF" or "VSOCK-CONN-RESET errno=E".
 *   stress vsock-send P M  connect to the host (CID 2) port P, send the line M,
 *                        print "VSOCK-REPLY <the line that came back>".
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/input.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/fs.h>
#include <linux/vm_sockets.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ms(clockid_t c)
{
    struct timespec ts;
    clock_gettime(c, &ts);
    return (uint64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void *timer_thread(void *arg)
{
    (void)arg;
    for (;;) {
        uint64_t t0 = now_ms(CLOCK_MONOTONIC);
        sleep(1);
        printf("TIMER slept_ms=%llu\n", (unsigned long long)(now_ms(CLOCK_MONOTONIC) - t0));
        fflush(stdout);
    }
    return NULL;
}

static int mem(long mib)
{
    size_t len = (size_t)mib << 20, pages = len / 4096;
    uint64_t *buf = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (buf == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    pthread_t t;
    pthread_create(&t, NULL, timer_thread, NULL);
    uint64_t pass = 0, corrupt = 0, next = now_ms(CLOCK_MONOTONIC) + 1000;
    printf("STRESS start mib=%ld pages=%zu\n", mib, pages);
    fflush(stdout);
    for (;;) {
        pass++;
        for (size_t p = 0; p < pages; p++) {
            uint64_t *w = buf + p * 512;
            /* The previous pass wrote pass-1 (0 on the first: MAP_ANONYMOUS is zeroed). */
            uint64_t want = (pass - 1) ? ((pass - 1) << 32 | p) : 0;
            if (w[0] != want || w[511] != want) {
                if (corrupt++ < 8)
                    printf("CORRUPT page=%zu pass=%llu found=%llx want=%llx\n", p,
                           (unsigned long long)pass, (unsigned long long)w[0], (unsigned long long)want);
            }
            w[0] = w[511] = pass << 32 | p;
            if ((p & 1023) == 0 && now_ms(CLOCK_MONOTONIC) >= next) {
                printf("STRESS pass=%llu mono_ms=%llu wall_ms=%llu corrupt=%llu\n", (unsigned long long)pass,
                       (unsigned long long)now_ms(CLOCK_MONOTONIC), (unsigned long long)now_ms(CLOCK_REALTIME),
                       (unsigned long long)corrupt);
                fflush(stdout);
                next += 1000;
                uint64_t n = now_ms(CLOCK_MONOTONIC);
                if (next < n)
                    next = n + 1000;
            }
        }
    }
}

/* Line i of file number f: the host regenerates the same bytes. */
static void content(FILE *out, long f)
{
    for (long i = 0; i < 64 + f * 16; i++)
        fprintf(out, "snapvmm file %ld line %ld\n", f, i);
}

static int check_file(const char *dir, long f)
{
    char path[512], *want = NULL, *got = NULL;
    size_t wn = 0;
    FILE *m = open_memstream(&want, &wn);
    content(m, f);
    fclose(m);
    snprintf(path, sizeof path, "%s/f%ld", dir, f);
    int fd = open(path, O_RDONLY);
    int ok = 0;
    if (fd >= 0) {
        got = malloc(wn + 1);
        ssize_t n = read(fd, got, wn + 1);
        ok = n == (ssize_t)wn && memcmp(got, want, wn) == 0;
        close(fd);
    }
    free(want);
    free(got);
    return ok;
}

static void drop_caches(void)
{
    sync();
    int fd = open("/proc/sys/vm/drop_caches", O_WRONLY);
    if (fd >= 0) {
        if (write(fd, "3\n", 2) < 0)
            perror("drop_caches");
        close(fd);
    }
}

static int files(const char *dir, long total)
{
    for (long n = 0; n < total; n++) {
        drop_caches();
        long bad = 0, entries = 0;
        for (long f = 0; f < n; f++)
            if (!check_file(dir, f)) {
                printf("CORRUPT file f%ld missing or wrong (n=%ld)\n", f, n);
                bad++;
            }
        DIR *d = opendir(dir);
        struct dirent *e;
        while (d && (e = readdir(d))) {
            long f;
            char extra;
            if (sscanf(e->d_name, "f%ld%c", &f, &extra) != 1)
                continue;
            entries++;
            /* f(n) may exist: written, in part, before a cut that happened inside write_file. */
            if (f > n) {
                printf("CORRUPT file f%ld exists but only %ld were written\n", f, n);
                bad++;
            }
        }
        if (d)
            closedir(d);
        printf("FILES n=%ld entries=%ld %s\n", n, entries, bad ? "BAD" : "ok");
        fflush(stdout);
        char path[512];
        snprintf(path, sizeof path, "%s/f%ld", dir, n);
        FILE *out = fopen(path, "w");
        if (!out) {
            perror(path);
            return 1;
        }
        content(out, n);
        fflush(out);
        fsync(fileno(out));
        fclose(out);
        usleep(200 * 1000);
    }
    drop_caches();
    printf("FILES done n=%ld\n", total);
    fflush(stdout);
    return 0;
}

static int powerkey(void)
{
    struct pollfd fds[16];
    int n = 0;
    for (int i = 0; i < 16; i++) {
        char path[64];
        snprintf(path, sizeof path, "/dev/input/event%d", i);
        int fd = open(path, O_RDONLY);
        if (fd >= 0)
            fds[n++] = (struct pollfd){ .fd = fd, .events = POLLIN };
    }
    printf("POWERKEY watching %d input device(s)\n", n);
    fflush(stdout);
    if (n == 0)
        return 1;
    for (;;) {
        if (poll(fds, n, -1) < 0 && errno != EINTR)
            return 1;
        for (int i = 0; i < n; i++) {
            struct input_event ev;
            if ((fds[i].revents & POLLIN) && read(fds[i].fd, &ev, sizeof ev) == sizeof ev && ev.type == EV_KEY &&
                ev.code == KEY_POWER && ev.value == 1) {
                printf("POWERKEY pressed\n");
                fflush(stdout);
                return 0;
            }
        }
    }
}

static int zeroout(const char *dev, uint64_t ofs, uint64_t len)
{
    int fd = open(dev, O_WRONLY);
    uint64_t range[2] = {ofs, len};
    if (fd < 0 || ioctl(fd, BLKZEROOUT, range)) {
        printf("ZEROOUT-ERROR errno=%d\n", errno);
        return 1;
    }
    close(fd);
    return 0;
}

static void echo(int c)
{
    char buf[4096];
    for (;;) {
        ssize_t n = read(c, buf, sizeof buf);
        if (n == 0) {
            printf("VSOCK-CONN-EOF\n");
            break;
        }
        if (n < 0) {
            printf("VSOCK-CONN-RESET errno=%d\n", errno);
            break;
        }
        if (write(c, buf, n) != n) {
            printf("VSOCK-CONN-RESET errno=%d\n", errno);
            break;
        }
    }
    close(c);
}

static int vsock_echo(unsigned port)
{
    int l = socket(AF_VSOCK, SOCK_STREAM, 0);
    struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port};
    if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 8)) {
        printf("VSOCK-ERROR listen errno=%d\n", errno);
        return 1;
    }
    printf("VSOCK-LISTENING port=%u\n", port);
    for (;;) {
        int c = accept(l, NULL, NULL);
        if (c < 0)
            continue;
        printf("VSOCK-ACCEPTED\n");
        if (fork() == 0) {
            close(l);
            echo(c);
            _exit(0);
        }
        close(c);
    }
}

static int vsock_send(unsigned port, const char *msg)
{
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_HOST, .svm_port = port};
    if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a)) {
        printf("VSOCK-ERROR connect errno=%d\n", errno);
        return 1;
    }
    char line[512];
    snprintf(line, sizeof line, "%s\n", msg);
    if (write(s, line, strlen(line)) < 0) {
        printf("VSOCK-ERROR write errno=%d\n", errno);
        return 1;
    }
    size_t got = 0;
    while (got < sizeof line - 1) {
        ssize_t n = read(s, line + got, 1);
        if (n <= 0 || line[got] == '\n')
            break;
        got++;
    }
    line[got] = 0;
    printf("VSOCK-REPLY %s\n", line);
    close(s);
    return 0;
}

/* Computes for `ms` milliseconds: how much work got done and the longest
 * time between two steps (what a vCPU that was held up would show). */
static int spin(long ms)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    uint64_t start = (uint64_t)t.tv_sec * 1000000 + t.tv_nsec / 1000, last = start, gap = 0;
    uint64_t steps = 0, end = start + (uint64_t)ms * 1000;
    volatile uint64_t x = 1;
    for (;;) {
        for (int i = 0; i < 1000; i++)
            x = x * 6364136223846793005ull + 1442695040888963407ull;
        steps++;
        clock_gettime(CLOCK_MONOTONIC, &t);
        uint64_t now = (uint64_t)t.tv_sec * 1000000 + t.tv_nsec / 1000;
        if (now - last > gap)
            gap = now - last;
        last = now;
        if (now >= end)
            break;
    }
    printf("SPIN ms=%ld steps_per_ms=%llu longest_gap_us=%llu\n", ms,
           (unsigned long long)(steps * 1000 / (last - start)), (unsigned long long)gap);
    return 0;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 3 && !strcmp(argv[1], "mem"))
        return mem(atol(argv[2]));
    if (argc == 4 && !strcmp(argv[1], "files"))
        return files(argv[2], atol(argv[3]));
    if (argc == 2 && !strcmp(argv[1], "powerkey"))
        return powerkey();
    if (argc == 3 && !strcmp(argv[1], "content")) {
        content(stdout, atol(argv[2]));
        return 0;
    }
    if (argc == 5 && !strcmp(argv[1], "zeroout"))
        return zeroout(argv[2], strtoull(argv[3], NULL, 0), strtoull(argv[4], NULL, 0));
    if (argc == 3 && !strcmp(argv[1], "vsock-echo"))
        return vsock_echo(atoi(argv[2]));
    if (argc == 4 && !strcmp(argv[1], "vsock-send"))
        return vsock_send(atoi(argv[2]), argv[3]);
    if (argc == 3 && !strcmp(argv[1], "spin"))
        return spin(atol(argv[2]));
    fprintf(stderr, "usage: stress mem MIB | files DIR N | powerkey | content I | vsock-echo P | vsock-send P M | spin MS\n");
    return 2;
}
