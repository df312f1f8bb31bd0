/* File-system checks run inside a container on a bind mount, for what
 * busybox cannot do: mmap reads, flock and fcntl locks between two
 * processes, fsync, a file past 4 GiB, and an inotify watcher (Debian's
 * busybox has no inotifyd). Each command prints one line
 * "name:ok ..." or "name:FAIL why" and exits non-zero on failure. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/inotify.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static int fail(const char *name, const char *why) {
    printf("%s:FAIL %s: %s\n", name, why, strerror(errno));
    return 1;
}

/* mmap FILE: prints the first bytes read through a shared mapping. */
static int cmd_mmap(const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return fail("mmap", "open");
    struct stat st;
    if (fstat(fd, &st) < 0 || st.st_size == 0) return fail("mmap", "empty");
    char *p = mmap(NULL, st.st_size, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) return fail("mmap", "mmap");
    int n = st.st_size < 32 ? (int)st.st_size : 32;
    printf("mmap:ok %.*s\n", n, p);
    return 0;
}

/* Does another process get EWOULDBLOCK/EAGAIN for the same lock? */
static int child_conflicts(const char *path, int use_fcntl) {
    pid_t pid = fork();
    if (pid == 0) {
        int fd = open(path, O_RDWR);
        if (fd < 0) _exit(2);
        int r;
        if (use_fcntl) {
            struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET};
            r = fcntl(fd, F_SETLK, &fl);
        } else {
            r = flock(fd, LOCK_EX | LOCK_NB);
        }
        _exit(r < 0 && (errno == EWOULDBLOCK || errno == EAGAIN || errno == EACCES) ? 0 : 1);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

/* locks FILE: flock and fcntl locks held by this process keep another
 * process out, and are free again once released. */
static int cmd_locks(const char *path) {
    int fd = open(path, O_RDWR | O_CREAT, 0644);
    if (fd < 0) return fail("locks", "open");
    if (flock(fd, LOCK_EX | LOCK_NB) < 0) return fail("locks", "flock");
    if (!child_conflicts(path, 0)) return fail("locks", "flock not exclusive");
    flock(fd, LOCK_UN);
    if (child_conflicts(path, 0)) return fail("locks", "flock not released");
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET};
    if (fcntl(fd, F_SETLK, &fl) < 0) return fail("locks", "fcntl");
    if (!child_conflicts(path, 1)) return fail("locks", "fcntl lock not exclusive");
    fl.l_type = F_UNLCK;
    fcntl(fd, F_SETLK, &fl);
    if (child_conflicts(path, 1)) return fail("locks", "fcntl lock not released");
    printf("locks:ok flock and fcntl exclusive and released\n");
    return 0;
}

/* fsync FILE: write, fsync and fdatasync succeed. */
static int cmd_fsync(const char *path) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return fail("fsync", "open");
    if (write(fd, "durable\n", 8) != 8) return fail("fsync", "write");
    if (fsync(fd) < 0) return fail("fsync", "fsync");
    if (fdatasync(fd) < 0) return fail("fsync", "fdatasync");
    if (close(fd) < 0) return fail("fsync", "close");
    printf("fsync:ok\n");
    return 0;
}

/* big FILE: a byte written past 5 GiB reads back; the size is right. */
static int cmd_big(const char *path) {
    const off_t at = 5LL << 30;
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return fail("big", "open");
    if (pwrite(fd, "END", 3, at) != 3) return fail("big", "pwrite");
    char buf[4] = {0};
    if (pread(fd, buf, 3, at) != 3 || memcmp(buf, "END", 3)) return fail("big", "pread");
    struct stat st;
    fstat(fd, &st);
    printf("big:ok size=%lld\n", (long long)st.st_size);
    return 0;
}

/* append FILE: two descriptors opened with O_APPEND never overwrite. */
static int cmd_append(const char *path) {
    int a = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0644);
    int b = open(path, O_WRONLY | O_APPEND);
    if (a < 0 || b < 0) return fail("append", "open");
    for (int i = 0; i < 3; i++) {
        if (write(a, "a", 1) != 1 || write(b, "b", 1) != 1) return fail("append", "write");
    }
    close(a);
    close(b);
    char buf[16] = {0};
    int fd = open(path, O_RDONLY);
    int n = read(fd, buf, sizeof buf - 1);
    printf("append:%s %.*s\n", n == 6 && !strcmp(buf, "ababab") ? "ok" : "FAIL", n, buf);
    return strcmp(buf, "ababab") != 0;
}

/* write FILE: prints the errno of opening it for writing (EROFS checks). */
static int cmd_write(const char *path) {
    int fd = open(path, O_WRONLY | O_CREAT, 0644);
    if (fd < 0) {
        printf("write:errno %s\n", errno == EROFS ? "EROFS" : strerror(errno));
        return 0;
    }
    printf("write:opened\n");
    return 0;
}

/* watch DIR: prints one line per inotify event on DIR, as busybox's
 * inotifyd does: "n\tDIR\tNAME" create, "c" modify, "w" close-write,
 * "d" delete, "m" moved from, "y" moved to. Runs until killed. */
static int cmd_watch(const char *dir) {
    int fd = inotify_init1(0);
    if (fd < 0) return fail("watch", "inotify_init1");
    uint32_t mask = IN_CREATE | IN_MODIFY | IN_CLOSE_WRITE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO;
    if (inotify_add_watch(fd, dir, mask) < 0) return fail("watch", "inotify_add_watch");
    printf("watching %s\n", dir);
    fflush(stdout);
    char buf[65536] __attribute__((aligned(8)));
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n <= 0) return fail("watch", "read");
        for (char *p = buf; p < buf + n;) {
            struct inotify_event *e = (struct inotify_event *)p;
            const char *name = e->len ? e->name : "";
            struct { uint32_t bit; char c; } kinds[] = {
                {IN_CREATE, 'n'}, {IN_MODIFY, 'c'}, {IN_CLOSE_WRITE, 'w'},
                {IN_DELETE, 'd'}, {IN_MOVED_FROM, 'm'}, {IN_MOVED_TO, 'y'},
            };
            for (unsigned i = 0; i < sizeof kinds / sizeof kinds[0]; i++)
                if (e->mask & kinds[i].bit) printf("%c\t%s\t%s\n", kinds[i].c, dir, name);
            fflush(stdout);
            p += sizeof *e + e->len;
        }
    }
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: fstool mmap|locks|fsync|big|append|write|watch FILE\n");
        return 2;
    }
    const char *c = argv[1], *f = argv[2];
    if (!strcmp(c, "mmap")) return cmd_mmap(f);
    if (!strcmp(c, "locks")) return cmd_locks(f);
    if (!strcmp(c, "fsync")) return cmd_fsync(f);
    if (!strcmp(c, "big")) return cmd_big(f);
    if (!strcmp(c, "append")) return cmd_append(f);
    if (!strcmp(c, "write")) return cmd_write(f);
    if (!strcmp(c, "watch")) return cmd_watch(f);
    fprintf(stderr, "fstool: unknown command %s\n", c);
    return 2;
}
