/*
 * TEST TOOLING, NOT PRODUCT CODE: an LD_PRELOAD recorder of the file-system calls a
 * workload issues, for the crash-state explorer (reliability/crash/, docs/crash-states.md).
 * Compiled by the test harness with Debian's gcc (reliability/crash/recording.py); never
 * shipped, never loaded by snapimg itself.
 *
 * It interposes the libc entry points that change file content or names (writes,
 * truncates, fallocate, copy_file_range, FICLONE/FICLONERANGE, renames, unlinks, mkdir,
 * creating opens) and the durability barriers (fsync, fdatasync, sync, syncfs).  Calls on
 * files below $CRASHREC_ROOT are serialised under one lock, performed, and appended to
 * $CRASHREC_LOG in the order they completed, with their data (for copies and clones: the
 * source bytes at the time of the call).  Writes to the file $CRASHREC_MARK become
 * marker records in the same stream (the workload's "operation begins/ends" notes).
 * With $CRASHREC_DROP_SYNC=NAME, fsync/fdatasync of a file called NAME are skipped and
 * not logged: the "one sync barrier removed" mutant, applied below the engine so it
 * works for the Python and the compiled data path alike.
 *
 * Records: one header line "KIND field... PAYLOAD_LEN\n", then PAYLOAD_LEN bytes.
 *   W ino offset dsync       data written (the payload)
 *   Z ino mode offset len    fallocate (mode as in fallocate(2); posix_fallocate: 0)
 *   T ino size               truncate
 *   S ino                    fsync/fdatasync of a file or directory completed
 *   G                        sync()/syncfs(): everything durable
 *   C parent name ino isdir  a new directory entry (creating open, mkdir)
 *   R oldparent oldname newparent newname ino replaced flags   rename
 *   U parent name ino        unlink / rmdir
 *   M                        marker text (the payload)
 *   X                        an operation the explorer cannot model (text payload)
 * Names are hex encoded; inodes identify files (an inode number reused after its file
 * was deleted is told apart by the C record that creates the new file).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/fs.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#define MAX_FD 65536
enum { FD_UNKNOWN = 0, FD_IGNORED, FD_WATCHED, FD_MARKER };

struct fdent {
    unsigned char state, dsync, append;
    ino_t ino;
    char base[64]; /* basename, for the mutant */
};

static struct fdent fds[MAX_FD];
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static int log_fd = -1;
static char root[PATH_MAX];
static size_t root_len;
static char mark[2 * PATH_MAX + 2];
static char drop_sync[256];

typedef void *(*dlsym_fn)(void *, const char *);
static dlsym_fn real_dlsym_fn;

static void *real(const char *name) {
    if (!real_dlsym_fn) {
        real_dlsym_fn = (dlsym_fn)dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.34");
        if (!real_dlsym_fn)
            real_dlsym_fn = (dlsym_fn)dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.2.5");
    }
    void *p = real_dlsym_fn(RTLD_NEXT, name);
    if (!p) {
        fprintf(stderr, "crash recorder: no real %s\n", name);
        abort();
    }
    return p;
}

#define REAL(ret, name, ...)                                   \
    static ret (*real_##name)(__VA_ARGS__);                    \
    if (!real_##name) real_##name = (ret(*)(__VA_ARGS__))real(#name)

__attribute__((constructor)) static void init(void) {
    const char *l = getenv("CRASHREC_LOG"), *r = getenv("CRASHREC_ROOT");
    const char *m = getenv("CRASHREC_MARK"), *d = getenv("CRASHREC_DROP_SYNC");
    if (!l || !r) return;
    if (!realpath(r, root)) return;
    root_len = strlen(root);
    if (m) { /* as /proc/self/fd shows it: the directory resolved (the file may not exist) */
        char dir[PATH_MAX], real_dir[PATH_MAX];
        const char *slash = strrchr(m, '/');
        snprintf(dir, sizeof dir, "%.*s", slash ? (int)(slash - m) : 1, slash ? m : ".");
        if (realpath(dir[0] ? dir : "/", real_dir))
            snprintf(mark, sizeof mark, "%s/%s", strcmp(real_dir, "/") ? real_dir : "",
                     slash ? slash + 1 : m);
    }
    if (d) snprintf(drop_sync, sizeof drop_sync, "%s", d);
    REAL(int, open, const char *, int, ...);
    log_fd = real_open(l, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
}

static void put_all(const struct iovec *iov, int n) {
    REAL(ssize_t, writev, int, const struct iovec *, int); /* not ours: we hold the lock */
    struct iovec v[3];
    memcpy(v, iov, sizeof(struct iovec) * (size_t)n);
    while (n) {
        ssize_t w = real_writev(log_fd, v, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            abort();
        }
        while (n && (size_t)w >= v[0].iov_len) {
            w -= (ssize_t)v[0].iov_len;
            memmove(v, v + 1, sizeof(struct iovec) * (size_t)--n);
        }
        if (n) {
            v[0].iov_base = (char *)v[0].iov_base + w;
            v[0].iov_len -= (size_t)w;
        }
    }
}

/* One record: header fields, payload; a single writev so that forks cannot interleave. */
static void emit(const char *head, const void *payload, size_t n) {
    char line[3 * PATH_MAX];
    int len = snprintf(line, sizeof line, "%s %zu\n", head, n);
    struct iovec v[2] = {{line, (size_t)len}, {(void *)payload, n}};
    put_all(v, n ? 2 : 1);
}

static void hex(char *out, const char *s) {
    static const char digits[] = "0123456789abcdef";
    for (; *s; s++) {
        *out++ = digits[(unsigned char)*s >> 4];
        *out++ = digits[(unsigned char)*s & 15];
    }
    *out = 0;
}

static int under_root(const char *path) {
    return log_fd >= 0 && strncmp(path, root, root_len) == 0 &&
           (path[root_len] == '/' || path[root_len] == 0);
}

/* Absolute, lexically normalised form of (dirfd, path). */
static int absolute(int dirfd, const char *path, char *out) {
    char tmp[2 * PATH_MAX];
    if (path[0] == '/') {
        snprintf(tmp, sizeof tmp, "%s", path);
    } else {
        char base[PATH_MAX];
        if (dirfd == AT_FDCWD) {
            if (!getcwd(base, sizeof base)) return -1;
        } else {
            char link[64];
            snprintf(link, sizeof link, "/proc/self/fd/%d", dirfd);
            ssize_t n = readlink(link, base, sizeof base - 1);
            if (n < 0) return -1;
            base[n] = 0;
        }
        snprintf(tmp, sizeof tmp, "%s/%s", base, path);
    }
    /* collapse "//", "/./" and "/x/../" */
    char *parts[PATH_MAX / 2];
    int np = 0;
    for (char *tok = strtok(tmp, "/"); tok; tok = strtok(NULL, "/")) {
        if (!strcmp(tok, ".")) continue;
        if (!strcmp(tok, "..")) {
            if (np) np--;
            continue;
        }
        parts[np++] = tok;
    }
    size_t pos = 0;
    out[0] = 0;
    for (int i = 0; i < np; i++) pos += (size_t)snprintf(out + pos, PATH_MAX - pos, "/%s", parts[i]);
    if (!np) strcpy(out, "/");
    return 0;
}

/* parent inode and hex basename of an absolute path */
static int split(const char *abs, ino_t *parent, char *name_hex) {
    char dir[PATH_MAX];
    snprintf(dir, sizeof dir, "%s", abs);
    char *slash = strrchr(dir, '/');
    if (!slash) return -1;
    hex(name_hex, slash + 1);
    if (slash == dir) slash[1] = 0; else *slash = 0;
    struct stat st;
    if (stat(dir, &st) != 0) return -1;
    *parent = st.st_ino;
    return 0;
}

static void reset_fd(int fd) {
    if (fd >= 0 && fd < MAX_FD) fds[fd].state = FD_UNKNOWN;
}

/* Classify fd (lock held); fills *e.  Cached watched entries are re-checked by inode. */
static int classify(int fd, struct fdent *e) {
    struct fdent tmp, *slot = (fd >= 0 && fd < MAX_FD) ? &fds[fd] : &tmp;
    struct stat st;
    if (slot != &tmp && slot->state == FD_WATCHED) {
        if (fstat(fd, &st) == 0 && st.st_ino == slot->ino) {
            *e = *slot;
            return slot->state;
        }
        slot->state = FD_UNKNOWN;
    }
    if (slot == &tmp || slot->state == FD_UNKNOWN) {
        char link[64], path[PATH_MAX];
        snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
        ssize_t n = readlink(link, path, sizeof path - 1);
        memset(slot, 0, sizeof *slot);
        slot->state = FD_IGNORED;
        if (n > 0 && log_fd >= 0) {
            path[n] = 0;
            if (mark[0] && !strcmp(path, mark)) {
                slot->state = FD_MARKER;
            } else if (under_root(path) && fstat(fd, &st) == 0) {
                int fl = fcntl(fd, F_GETFL);
                slot->state = FD_WATCHED;
                slot->ino = st.st_ino;
                slot->dsync = fl >= 0 && (fl & O_DSYNC);
                slot->append = fl >= 0 && (fl & O_APPEND);
                char *b = strrchr(path, '/');
                char *del = strstr(path, " (deleted)");
                if (del) *del = 0;
                const char *bn = b ? b + 1 : path;
                size_t bl = strlen(bn) < sizeof slot->base ? strlen(bn) : sizeof slot->base - 1;
                memcpy(slot->base, bn, bl);
                slot->base[bl] = 0;
            }
        }
    }
    *e = *slot;
    return slot->state;
}

static int watch(int fd, struct fdent *e) {
    if (log_fd < 0) return FD_IGNORED;
    pthread_mutex_lock(&mu);
    int s = classify(fd, e);
    pthread_mutex_unlock(&mu);
    return s;
}

static void log_write(const struct fdent *e, off_t pos, const void *buf, size_t n, int dsync) {
    char head[128];
    snprintf(head, sizeof head, "W %lu %lld %d", (unsigned long)e->ino, (long long)pos,
             dsync || e->dsync);
    emit(head, buf, n);
}

static void log_simple(const char *fmt, ...) {
    char head[3 * PATH_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(head, sizeof head, fmt, ap);
    va_end(ap);
    emit(head, NULL, 0);
}

static off_t cur_pos(int fd, const struct fdent *e) {
    if (e->append) {
        struct stat st;
        return fstat(fd, &st) == 0 ? st.st_size : -1;
    }
    return lseek(fd, 0, SEEK_CUR);
}

/* ---- opens ------------------------------------------------------------------------ */

static int do_open(int dirfd, const char *path, int flags, mode_t mode, int at) {
    REAL(int, open64, const char *, int, ...);
    REAL(int, openat64, int, const char *, int, ...);
    char abs[PATH_MAX];
    int watched = log_fd >= 0 && absolute(at ? dirfd : AT_FDCWD, path, abs) == 0 &&
                  under_root(abs);
    if (!watched) {
        int fd = at ? real_openat64(dirfd, path, flags, mode) : real_open64(path, flags, mode);
        if (fd >= 0) {
            pthread_mutex_lock(&mu);
            reset_fd(fd);
            pthread_mutex_unlock(&mu);
        }
        return fd;
    }
    pthread_mutex_lock(&mu);
    struct stat before;
    int existed = lstat(abs, &before) == 0;
    int fd = at ? real_openat64(dirfd, path, flags, mode) : real_open64(path, flags, mode);
    if (fd >= 0) {
        int err = errno;
        reset_fd(fd);
        struct stat st;
        fstat(fd, &st);
        if ((flags & O_TMPFILE) == O_TMPFILE) {
            /* an unnamed file (the engine's reflink probe at open): it is gone after any
             * crash unless linked, which nothing does, so none of its calls matter */
            if (fd < MAX_FD)
                fds[fd].state = FD_IGNORED;
        } else if (!existed) {
            ino_t parent;
            char name[2 * PATH_MAX];
            if (split(abs, &parent, name) == 0)
                log_simple("C %lu %s %lu 0", (unsigned long)parent, name,
                           (unsigned long)st.st_ino);
        } else if ((flags & O_TRUNC) && (flags & O_ACCMODE) != O_RDONLY && S_ISREG(st.st_mode)) {
            log_simple("T %lu 0", (unsigned long)st.st_ino);
        }
        errno = err;
    }
    pthread_mutex_unlock(&mu);
    return fd;
}

static mode_t mode_arg(int flags, va_list ap) {
    return (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE ? (mode_t)va_arg(ap, int) : 0;
}

int open(const char *path, int flags, ...) {
    va_list ap;
    va_start(ap, flags);
    mode_t m = mode_arg(flags, ap);
    va_end(ap);
    return do_open(AT_FDCWD, path, flags, m, 0);
}

int open64(const char *path, int flags, ...) {
    va_list ap;
    va_start(ap, flags);
    mode_t m = mode_arg(flags, ap);
    va_end(ap);
    return do_open(AT_FDCWD, path, flags, m, 0);
}

int openat(int dirfd, const char *path, int flags, ...) {
    va_list ap;
    va_start(ap, flags);
    mode_t m = mode_arg(flags, ap);
    va_end(ap);
    return do_open(dirfd, path, flags, m, 1);
}

int openat64(int dirfd, const char *path, int flags, ...) {
    va_list ap;
    va_start(ap, flags);
    mode_t m = mode_arg(flags, ap);
    va_end(ap);
    return do_open(dirfd, path, flags, m, 1);
}

int __open_2(const char *path, int flags) { return do_open(AT_FDCWD, path, flags, 0, 0); }
int __open64_2(const char *path, int flags) { return do_open(AT_FDCWD, path, flags, 0, 0); }
int __openat_2(int d, const char *path, int flags) { return do_open(d, path, flags, 0, 1); }
int __openat64_2(int d, const char *path, int flags) { return do_open(d, path, flags, 0, 1); }
int creat(const char *path, mode_t m) {
    return do_open(AT_FDCWD, path, O_CREAT | O_WRONLY | O_TRUNC, m, 0);
}
int creat64(const char *path, mode_t m) {
    return do_open(AT_FDCWD, path, O_CREAT | O_WRONLY | O_TRUNC, m, 0);
}

int close(int fd) {
    REAL(int, close, int);
    if (log_fd >= 0) {
        pthread_mutex_lock(&mu);
        reset_fd(fd);
        pthread_mutex_unlock(&mu);
    }
    return real_close(fd);
}

int dup2(int old, int new) {
    REAL(int, dup2, int, int);
    int r = real_dup2(old, new);
    if (r >= 0 && log_fd >= 0) {
        pthread_mutex_lock(&mu);
        reset_fd(new);
        pthread_mutex_unlock(&mu);
    }
    return r;
}

int dup3(int old, int new, int flags) {
    REAL(int, dup3, int, int, int);
    int r = real_dup3(old, new, flags);
    if (r >= 0 && log_fd >= 0) {
        pthread_mutex_lock(&mu);
        reset_fd(new);
        pthread_mutex_unlock(&mu);
    }
    return r;
}

int close_range(unsigned first, unsigned last, int flags) {
    REAL(int, close_range, unsigned, unsigned, int);
    if (log_fd >= 0) {
        pthread_mutex_lock(&mu);
        for (unsigned fd = first; fd <= last && fd < MAX_FD; fd++) reset_fd((int)fd);
        pthread_mutex_unlock(&mu);
    }
    return real_close_range(first, last, flags);
}

/* ---- names -------------------------------------------------------------------------- */

int mkdir(const char *path, mode_t mode) {
    REAL(int, mkdir, const char *, mode_t);
    char abs[PATH_MAX];
    if (log_fd < 0 || absolute(AT_FDCWD, path, abs) || !under_root(abs))
        return real_mkdir(path, mode);
    pthread_mutex_lock(&mu);
    int r = real_mkdir(path, mode);
    if (r == 0) {
        int err = errno;
        struct stat st;
        ino_t parent;
        char name[2 * PATH_MAX];
        if (stat(abs, &st) == 0 && split(abs, &parent, name) == 0)
            log_simple("C %lu %s %lu 1", (unsigned long)parent, name, (unsigned long)st.st_ino);
        errno = err;
    }
    pthread_mutex_unlock(&mu);
    return r;
}

int mkdirat(int dirfd, const char *path, mode_t mode) {
    char abs[PATH_MAX];
    if (absolute(dirfd, path, abs)) {
        REAL(int, mkdirat, int, const char *, mode_t);
        return real_mkdirat(dirfd, path, mode);
    }
    return mkdir(abs, mode);
}

static int do_rename(int od, const char *old, int nd, const char *new, unsigned flags) {
    REAL(int, renameat2, int, const char *, int, const char *, unsigned);
    char a[PATH_MAX], b[PATH_MAX];
    int watched = log_fd >= 0 && !absolute(od, old, a) && !absolute(nd, new, b) &&
                  (under_root(a) || under_root(b));
    if (!watched) return real_renameat2(od, old, nd, new, flags);
    pthread_mutex_lock(&mu);
    struct stat so, sn;
    int have_old = lstat(a, &so) == 0, have_new = lstat(b, &sn) == 0;
    int r = real_renameat2(od, old, nd, new, flags);
    if (r == 0 && have_old) {
        int err = errno;
        ino_t pa, pb;
        char na[2 * PATH_MAX], nb[2 * PATH_MAX];
        if (!under_root(a) || !under_root(b)) {
            emit("X", "rename across the recorded tree's border", 40);
        } else if (split(a, &pa, na) == 0 && split(b, &pb, nb) == 0) {
            log_simple("R %lu %s %lu %s %lu %lu %u", (unsigned long)pa, na, (unsigned long)pb,
                       nb, (unsigned long)so.st_ino, have_new ? (unsigned long)sn.st_ino : 0UL,
                       flags);
        }
        errno = err;
    }
    pthread_mutex_unlock(&mu);
    return r;
}

int rename(const char *old, const char *new) { return do_rename(AT_FDCWD, old, AT_FDCWD, new, 0); }
int renameat(int od, const char *old, int nd, const char *new) {
    return do_rename(od, old, nd, new, 0);
}
int renameat2(int od, const char *old, int nd, const char *new, unsigned flags) {
    return do_rename(od, old, nd, new, flags);
}

static int do_unlink(int dirfd, const char *path, int flags) {
    REAL(int, unlinkat, int, const char *, int);
    char abs[PATH_MAX];
    if (log_fd < 0 || absolute(dirfd, path, abs) || !under_root(abs))
        return real_unlinkat(dirfd, path, flags);
    pthread_mutex_lock(&mu);
    struct stat st;
    int have = lstat(abs, &st) == 0;
    int r = real_unlinkat(dirfd, path, flags);
    if (r == 0 && have) {
        int err = errno;
        ino_t parent;
        char name[2 * PATH_MAX];
        if (split(abs, &parent, name) == 0)
            log_simple("U %lu %s %lu", (unsigned long)parent, name, (unsigned long)st.st_ino);
        errno = err;
    }
    pthread_mutex_unlock(&mu);
    return r;
}

int unlink(const char *path) { return do_unlink(AT_FDCWD, path, 0); }
int unlinkat(int dirfd, const char *path, int flags) { return do_unlink(dirfd, path, flags); }
int rmdir(const char *path) { return do_unlink(AT_FDCWD, path, AT_REMOVEDIR); }

/* ---- data ------------------------------------------------------------------------- */

static ssize_t do_pwrite(int fd, const void *buf, size_t n, off_t off, int use_off) {
    REAL(ssize_t, pwrite64, int, const void *, size_t, off_t);
    REAL(ssize_t, write, int, const void *, size_t);
    struct fdent e;
    int s = watch(fd, &e);
    if (s == FD_IGNORED || s == FD_UNKNOWN)
        return use_off ? real_pwrite64(fd, buf, n, off) : real_write(fd, buf, n);
    pthread_mutex_lock(&mu);
    off_t pos = use_off ? off : cur_pos(fd, &e);
    ssize_t r = use_off ? real_pwrite64(fd, buf, n, off) : real_write(fd, buf, n);
    if (r > 0) {
        int err = errno;
        if (s == FD_MARKER) {
            char head[32] = "M";
            emit(head, buf, (size_t)r);
        } else {
            log_write(&e, pos, buf, (size_t)r, 0);
        }
        errno = err;
    }
    pthread_mutex_unlock(&mu);
    return r;
}

ssize_t write(int fd, const void *buf, size_t n) { return do_pwrite(fd, buf, n, 0, 0); }
ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) { return do_pwrite(fd, buf, n, off, 1); }
ssize_t pwrite64(int fd, const void *buf, size_t n, off64_t off) {
    return do_pwrite(fd, buf, n, off, 1);
}

static ssize_t do_pwritev(int fd, const struct iovec *iov, int cnt, off_t off, int use_off,
                          int flags) {
    REAL(ssize_t, pwritev64v2, int, const struct iovec *, int, off_t, int);
    REAL(ssize_t, writev, int, const struct iovec *, int);
    struct fdent e;
    int s = watch(fd, &e);
    if (s == FD_IGNORED || s == FD_UNKNOWN)
        return use_off ? real_pwritev64v2(fd, iov, cnt, off, flags) : real_writev(fd, iov, cnt);
    pthread_mutex_lock(&mu);
    off_t pos = use_off && off != -1 ? off : cur_pos(fd, &e);
    if (flags & RWF_APPEND) {
        struct stat st;
        pos = fstat(fd, &st) == 0 ? st.st_size : -1;
    }
    ssize_t r = use_off ? real_pwritev64v2(fd, iov, cnt, off, flags) : real_writev(fd, iov, cnt);
    if (r > 0) {
        int err = errno;
        char *buf = malloc((size_t)r);
        size_t got = 0;
        for (int i = 0; i < cnt && got < (size_t)r; i++) {
            size_t take = iov[i].iov_len < (size_t)r - got ? iov[i].iov_len : (size_t)r - got;
            memcpy(buf + got, iov[i].iov_base, take);
            got += take;
        }
        if (s == FD_MARKER)
            emit("M", buf, got);
        else
            log_write(&e, pos, buf, got, (flags & (RWF_DSYNC | RWF_SYNC)) != 0);
        free(buf);
        errno = err;
    }
    pthread_mutex_unlock(&mu);
    return r;
}

ssize_t writev(int fd, const struct iovec *iov, int cnt) { return do_pwritev(fd, iov, cnt, 0, 0, 0); }
ssize_t pwritev(int fd, const struct iovec *iov, int cnt, off_t off) {
    return do_pwritev(fd, iov, cnt, off, 1, 0);
}
ssize_t pwritev64(int fd, const struct iovec *iov, int cnt, off64_t off) {
    return do_pwritev(fd, iov, cnt, off, 1, 0);
}
ssize_t pwritev2(int fd, const struct iovec *iov, int cnt, off_t off, int flags) {
    return do_pwritev(fd, iov, cnt, off, 1, flags);
}
ssize_t pwritev64v2(int fd, const struct iovec *iov, int cnt, off64_t off, int flags) {
    return do_pwritev(fd, iov, cnt, off, 1, flags);
}

static int do_truncate(int fd, off_t len) {
    REAL(int, ftruncate64, int, off_t);
    struct fdent e;
    if (watch(fd, &e) != FD_WATCHED) return real_ftruncate64(fd, len);
    pthread_mutex_lock(&mu);
    int r = real_ftruncate64(fd, len);
    if (r == 0) {
        int err = errno;
        log_simple("T %lu %lld", (unsigned long)e.ino, (long long)len);
        errno = err;
    }
    pthread_mutex_unlock(&mu);
    return r;
}

int ftruncate(int fd, off_t len) { return do_truncate(fd, len); }
int ftruncate64(int fd, off64_t len) { return do_truncate(fd, len); }

static int do_path_truncate(const char *path, off_t len) {
    REAL(int, truncate64, const char *, off_t);
    char abs[PATH_MAX];
    if (log_fd < 0 || absolute(AT_FDCWD, path, abs) || !under_root(abs))
        return real_truncate64(path, len);
    pthread_mutex_lock(&mu);
    int r = real_truncate64(path, len);
    struct stat st;
    if (r == 0 && stat(abs, &st) == 0) {
        int err = errno;
        log_simple("T %lu %lld", (unsigned long)st.st_ino, (long long)len);
        errno = err;
    }
    pthread_mutex_unlock(&mu);
    return r;
}

int truncate(const char *path, off_t len) { return do_path_truncate(path, len); }
int truncate64(const char *path, off64_t len) { return do_path_truncate(path, len); }

static int do_fallocate(int fd, int mode, off_t off, off_t len, int posix) {
    REAL(int, fallocate64, int, int, off_t, off_t);
    REAL(int, posix_fallocate64, int, off_t, off_t);
    struct fdent e;
    if (watch(fd, &e) != FD_WATCHED)
        return posix ? real_posix_fallocate64(fd, off, len) : real_fallocate64(fd, mode, off, len);
    pthread_mutex_lock(&mu);
    int r = posix ? real_posix_fallocate64(fd, off, len) : real_fallocate64(fd, mode, off, len);
    if (r == 0) {
        int err = errno;
        log_simple("Z %lu %d %lld %lld", (unsigned long)e.ino, mode, (long long)off,
                   (long long)len);
        errno = err;
    }
    pthread_mutex_unlock(&mu);
    return r;
}

int fallocate(int fd, int mode, off_t off, off_t len) { return do_fallocate(fd, mode, off, len, 0); }
int fallocate64(int fd, int mode, off64_t off, off64_t len) {
    return do_fallocate(fd, mode, off, len, 0);
}
int posix_fallocate(int fd, off_t off, off_t len) { return do_fallocate(fd, 0, off, len, 1); }
int posix_fallocate64(int fd, off64_t off, off64_t len) {
    return do_fallocate(fd, 0, off, len, 1);
}

/* the bytes [off, off+len) of fd, read now (for copies and clones) */
static char *snapshot_bytes(int fd, off_t off, size_t len, size_t *got) {
    char *buf = malloc(len ? len : 1);
    *got = 0;
    while (*got < len) {
        ssize_t n = pread(fd, buf + *got, len - *got, off + (off_t)*got);
        if (n <= 0) break;
        *got += (size_t)n;
    }
    return buf;
}

ssize_t copy_file_range(int in, off64_t *in_off, int out, off64_t *out_off, size_t len,
                        unsigned flags) {
    REAL(ssize_t, copy_file_range, int, off64_t *, int, off64_t *, size_t, unsigned);
    struct fdent e;
    if (watch(out, &e) != FD_WATCHED)
        return real_copy_file_range(in, in_off, out, out_off, len, flags);
    pthread_mutex_lock(&mu);
    off_t ip = in_off ? *in_off : lseek(in, 0, SEEK_CUR);
    off_t op = out_off ? *out_off : cur_pos(out, &e);
    size_t got;
    char *src = snapshot_bytes(in, ip, len, &got);
    ssize_t r = real_copy_file_range(in, in_off, out, out_off, len, flags);
    if (r > 0) {
        int err = errno;
        if ((size_t)r > got)
            emit("X", "copy_file_range copied more than the source held", 48);
        else
            log_write(&e, op, src, (size_t)r, 0);
        errno = err;
    }
    free(src);
    pthread_mutex_unlock(&mu);
    return r;
}

int ioctl(int fd, unsigned long req, ...) {
    REAL(int, ioctl, int, unsigned long, ...);
    va_list ap;
    va_start(ap, req);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    struct fdent e;
    if ((req != FICLONE && req != FICLONERANGE) || watch(fd, &e) != FD_WATCHED)
        return real_ioctl(fd, req, arg);
    pthread_mutex_lock(&mu);
    int src;
    off_t soff, doff;
    size_t len;
    struct stat st;
    if (req == FICLONE) {
        src = (int)(intptr_t)arg;
        soff = doff = 0;
        len = fstat(src, &st) == 0 ? (size_t)st.st_size : 0;
    } else {
        const struct file_clone_range *r = arg;
        src = (int)r->src_fd;
        soff = (off_t)r->src_offset;
        doff = (off_t)r->dest_offset;
        len = r->src_length;
        if (!len) len = fstat(src, &st) == 0 && st.st_size > soff ? (size_t)(st.st_size - soff) : 0;
    }
    size_t got;
    char *bytes = snapshot_bytes(src, soff, len, &got);
    int r = real_ioctl(fd, req, arg);
    if (r == 0) {
        int err = errno;
        if (req == FICLONE) log_simple("T %lu 0", (unsigned long)e.ino);
        log_write(&e, doff, bytes, got, 0);
        errno = err;
    }
    free(bytes);
    pthread_mutex_unlock(&mu);
    return r;
}

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
    REAL(void *, mmap, void *, size_t, int, int, int, off_t);
    struct fdent e;
    if (fd >= 0 && (prot & PROT_WRITE) && (flags & MAP_SHARED) && watch(fd, &e) == FD_WATCHED) {
        pthread_mutex_lock(&mu);
        emit("X", "shared writable mmap of a recorded file", 39);
        pthread_mutex_unlock(&mu);
    }
    return real_mmap(addr, len, prot, flags, fd, off);
}

void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off64_t off) {
    return mmap(addr, len, prot, flags, fd, off);
}

/* ---- barriers ----------------------------------------------------------------------- */

static int do_sync(int fd, int data_only) {
    REAL(int, fsync, int);
    REAL(int, fdatasync, int);
    struct fdent e;
    if (watch(fd, &e) != FD_WATCHED) return data_only ? real_fdatasync(fd) : real_fsync(fd);
    if (drop_sync[0] && !strcmp(e.base, drop_sync)) return 0; /* the mutant */
    pthread_mutex_lock(&mu);
    int r = data_only ? real_fdatasync(fd) : real_fsync(fd);
    if (r == 0) {
        int err = errno;
        log_simple("S %lu", (unsigned long)e.ino);
        errno = err;
    }
    pthread_mutex_unlock(&mu);
    return r;
}

int fsync(int fd) { return do_sync(fd, 0); }
int fdatasync(int fd) { return do_sync(fd, 1); }

void sync(void) {
    REAL(void, sync, void);
    if (log_fd < 0) return real_sync();
    pthread_mutex_lock(&mu);
    real_sync();
    log_simple("G");
    pthread_mutex_unlock(&mu);
}

int syncfs(int fd) {
    REAL(int, syncfs, int);
    if (log_fd < 0) return real_syncfs(fd);
    pthread_mutex_lock(&mu);
    int r = real_syncfs(fd);
    if (r == 0) log_simple("G");
    pthread_mutex_unlock(&mu);
    return r;
}

/* ---- dlsym: ctypes looks symbols up in libc's handle, past the preload ------------ */

static const struct {
    const char *name;
    void *fn;
} ours[] = {
    {"open", (void *)open}, {"open64", (void *)open64}, {"openat", (void *)openat},
    {"openat64", (void *)openat64}, {"creat", (void *)creat}, {"creat64", (void *)creat64},
    {"close", (void *)close}, {"dup2", (void *)dup2}, {"dup3", (void *)dup3},
    {"mkdir", (void *)mkdir}, {"mkdirat", (void *)mkdirat}, {"rename", (void *)rename},
    {"renameat", (void *)renameat}, {"renameat2", (void *)renameat2},
    {"unlink", (void *)unlink}, {"unlinkat", (void *)unlinkat}, {"rmdir", (void *)rmdir},
    {"write", (void *)write}, {"pwrite", (void *)pwrite}, {"pwrite64", (void *)pwrite64},
    {"writev", (void *)writev}, {"pwritev", (void *)pwritev}, {"pwritev64", (void *)pwritev64},
    {"pwritev2", (void *)pwritev2}, {"pwritev64v2", (void *)pwritev64v2},
    {"ftruncate", (void *)ftruncate}, {"ftruncate64", (void *)ftruncate64},
    {"truncate", (void *)truncate}, {"truncate64", (void *)truncate64},
    {"fallocate", (void *)fallocate}, {"fallocate64", (void *)fallocate64},
    {"posix_fallocate", (void *)posix_fallocate},
    {"posix_fallocate64", (void *)posix_fallocate64},
    {"copy_file_range", (void *)copy_file_range}, {"ioctl", (void *)ioctl},
    {"mmap", (void *)mmap}, {"mmap64", (void *)mmap64}, {"fsync", (void *)fsync},
    {"fdatasync", (void *)fdatasync}, {"sync", (void *)sync}, {"syncfs", (void *)syncfs},
};

void *dlsym(void *handle, const char *symbol) {
    if (!real_dlsym_fn) real("open"); /* resolves real_dlsym_fn */
    if (handle != RTLD_NEXT && log_fd >= 0)
        for (size_t i = 0; i < sizeof ours / sizeof ours[0]; i++)
            if (!strcmp(symbol, ours[i].name)) return ours[i].fn;
    return real_dlsym_fn(handle, symbol);
}
