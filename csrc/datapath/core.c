/* Core: what the compiled data path of one engine shares: the barrier, the origins
 * (file descriptors owned by Python's Origin objects, which outlive the Core's use of
 * them), the store's data and meta files, and the block copy.
 *
 * The block copy clones whole runs with FICLONERANGE where origin and store share a
 * filesystem that supports it (a first overwrite then costs metadata, not a data
 * copy), else copy_file_range (an in-kernel copy), else pread + pwrite.  A run whose
 * origin pages are dirty (or under writeback) in the page cache is copied, not cloned:
 * a clone first writes those pages back and waits for the disk, a copy reads them from
 * memory.  Where cloning is possible but off (SNAPIMG_REFLINK=off, or a dirty run),
 * copy_file_range is not used either: on XFS and btrfs it clones too.
 */
#define _GNU_SOURCE
#include "datapath.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef SYS_cachestat
#define SYS_cachestat 451 /* Linux 6.5 */
#endif

int core_sync_store_fds(Core *c)
{
    int data = atomic_load(&c->data_fd), meta = atomic_load(&c->meta_fd);
    if (data < 0)
        return -1;
    if (fdatasync(data) || (meta >= 0 && fdatasync(meta)))
        return errno;
    return 0;
}

int file_pread(int fd, char *buf, size_t len, uint64_t off, size_t *got)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = pread(fd, buf + done, len - done, (off_t)(off + done));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (n == 0)
            break;
        done += (size_t)n;
    }
    *got = done;
    return 0;
}

int file_pwrite(int fd, const char *buf, size_t len, uint64_t off)
{
    while (len) {
        ssize_t n = pwrite(fd, buf, len, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (n == 0)
            return ENOSPC;
        buf += n;
        len -= (size_t)n;
        off += (uint64_t)n;
    }
    return 0;
}

/* Copy [src, src+len) of the origin to dst in the store by reading and writing
 * (past the origin's end the store gets zeroes). */
static int copy_rw(int ofd, int sfd, uint64_t src, uint64_t dst, uint64_t len)
{
    size_t cap = len < (1u << 20) ? (size_t)len : (1u << 20);
    char *buf = malloc(cap);
    if (!buf)
        return ENOMEM;
    int err = 0;
    while (len && !err) {
        size_t want = len < cap ? (size_t)len : cap, got = 0;
        err = file_pread(ofd, buf, want, src, &got);
        if (err)
            break;
        memset(buf + got, 0, want - got);
        err = file_pwrite(sfd, buf, want, dst);
        src += want;
        dst += want;
        len -= want;
    }
    free(buf);
    return err;
}

/* In-kernel copy; ENOSYS/EXDEV/EINVAL/EOPNOTSUPP: not possible here, fall back. */
static int copy_range(int ofd, int sfd, uint64_t src, uint64_t dst, uint64_t len)
{
    while (len) {
        loff_t in = (loff_t)src, out = (loff_t)dst;
        ssize_t n = copy_file_range(ofd, &in, sfd, &out, (size_t)len, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (n == 0) /* the origin's end: the rest reads as zeroes */
            return copy_rw(ofd, sfd, src, dst, len);
        src += (uint64_t)n;
        dst += (uint64_t)n;
        len -= (uint64_t)n;
    }
    return 0;
}

static int fallback_errno(int err)
{
    return err == ENOSYS || err == EXDEV || err == EINVAL || err == EOPNOTSUPP ||
           err == ENOTTY || err == EBADF || err == ETXTBSY;
}

/* Whether a page of [off, off+len) of fd is dirty or under writeback in the page cache
 * (cachestat, Linux 6.5); 0 where the kernel cannot tell. */
static int range_dirty(int fd, uint64_t off, uint64_t len)
{
    struct {
        uint64_t off, len;
    } range = {off, len};
    struct {
        uint64_t cache, dirty, writeback, evicted, recently_evicted;
    } st;
    if (syscall(SYS_cachestat, fd, &range, &st, 0) != 0)
        return 0;
    return st.dirty || st.writeback;
}

/* Copy one run of n blocks from origin block b into store slot s. */
static int copy_run(Core *c, COrigin *o, int sfd, uint64_t b, uint64_t s, uint64_t n)
{
    uint64_t bs = c->block_size, src = b * bs, dst = s * bs, len = n * bs;
    uint64_t avail = o->size > src ? o->size - src : 0;
    uint64_t whole = len <= avail ? len : avail / bs * bs; /* clonable: whole blocks */
    int err;
    if (whole && atomic_load_explicit(&o->reflink, memory_order_relaxed)) {
        if (!o->clone_dirty && range_dirty(o->fd, src, whole)) {
            atomic_fetch_add_explicit(&c->dirty_runs, 1, memory_order_relaxed);
            atomic_fetch_add_explicit(&c->rw_runs, 1, memory_order_relaxed);
            return copy_rw(o->fd, sfd, src, dst, len);
        }
        struct file_clone_range r = {
            .src_fd = o->fd, .src_offset = src, .src_length = whole, .dest_offset = dst};
        if (ioctl(sfd, FICLONERANGE, &r) == 0) {
            atomic_fetch_add_explicit(&c->clone_runs, 1, memory_order_relaxed);
            if (whole == len)
                return 0;
            return copy_rw(o->fd, sfd, src + whole, dst + whole, len - whole);
        }
        if (!fallback_errno(errno))
            return errno;
        atomic_store_explicit(&o->reflink, 0, memory_order_relaxed);
    }
    if (!o->is_block && o->copy_range) {
        err = copy_range(o->fd, sfd, src, dst, len);
        if (!err) {
            atomic_fetch_add_explicit(&c->copy_range_runs, 1, memory_order_relaxed);
            return 0;
        }
        if (!fallback_errno(err))
            return err;
    }
    atomic_fetch_add_explicit(&c->rw_runs, 1, memory_order_relaxed);
    return copy_rw(o->fd, sfd, src, dst, len);
}

/* ext: next pairs (slot, count); their counts add up to the run copied from block b. */
int core_copy_blocks(Core *c, COrigin *o, uint64_t b, const uint64_t *ext, size_t next)
{
    int sfd = atomic_load(&c->data_fd);
    if (sfd < 0)
        return EBADF;
    for (size_t i = 0; i < next; i++) {
        int err = copy_run(c, o, sfd, b, ext[2 * i], ext[2 * i + 1]);
        if (err)
            return err;
        b += ext[2 * i + 1];
    }
    return 0;
}

/* -- the record log and the data area ------------------------------------------------- */

#define LOG_RESERVE (1u << 20) /* as snapimg.engine.store.LOG_RESERVE */
#define DATA_RESERVE (64u << 20) /* as snapimg.engine.store.DATA_RESERVE */

/* Append len bytes at the log's end (as FileStore._append: a failed append leaves no
 * partial record behind; space is kept allocated ahead of the end so that recording an
 * invalidation still works on a full file system).  *seq: the append's sequence number
 * for group commit.  0 or an errno. */
int core_append(Core *c, const char *buf, size_t len, uint64_t *seq)
{
    pthread_mutex_lock(&c->append_mu);
    int fd = atomic_load(&c->meta_fd), err = file_pwrite(fd, buf, len, c->log_end);
    if (err) {
        static const char zeros[256];
        for (size_t done = 0; done < len;) { /* overwriting allocated bytes needs no space */
            size_t n = len - done < sizeof(zeros) ? len - done : sizeof(zeros);
            if (file_pwrite(fd, zeros, n, c->log_end + done))
                break;
            done += n;
        }
        pthread_mutex_unlock(&c->append_mu);
        return err;
    }
    c->log_end += len;
    *seq = ++c->appended;
    if (c->log_end + LOG_RESERVE / 2 > c->log_reserved &&
        fallocate(fd, 0, (off_t)c->log_end, LOG_RESERVE) == 0)
        c->log_reserved = c->log_end + LOG_RESERVE;
    pthread_mutex_unlock(&c->append_mu);
    return 0;
}

void core_grow_data(Core *c)
{
    if (!c->prealloc || !c->slots)
        return;
    pthread_mutex_lock(&c->grow_mu);
    pthread_mutex_lock(&c->slots->mu);
    uint64_t end = c->slots->end;
    pthread_mutex_unlock(&c->slots->mu);
    int fd = atomic_load(&c->data_fd);
    if (fd >= 0 && end > c->data_reserved) {
        uint64_t start = c->data_reserved * c->block_size, want = end * c->block_size - start;
        if (want < DATA_RESERVE)
            want = DATA_RESERVE;
        if (fallocate(fd, 0, (off_t)start, (off_t)want) == 0) /* else: the copy fails */
            c->data_reserved = (start + want) / c->block_size;
    }
    pthread_mutex_unlock(&c->grow_mu);
}

/* -- the Python type ---------------------------------------------------------------- */

static int Core_init(Core *c, PyObject *args, PyObject *kwds)
{
    static char *kw[] = {"block_size", "barrier", "sync_store", NULL};
    unsigned int bs;
    PyObject *barrier, *sync_store;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "IO!O", kw, &bs, &BarrierType, &barrier,
                                     &sync_store))
        return -1;
    if (bs < 512 || (bs & (bs - 1))) {
        PyErr_SetString(PyExc_ValueError, "block size must be a power of two >= 512");
        return -1;
    }
    if (c->barrier) {
        PyErr_SetString(PyExc_RuntimeError, "Core initialised twice");
        return -1;
    }
    c->block_size = bs;
    c->block_shift = (unsigned)__builtin_ctz(bs);
    pthread_mutex_init(&c->log_mu, NULL);
    pthread_mutex_init(&c->append_mu, NULL);
    pthread_mutex_init(&c->grow_mu, NULL);
    Py_INCREF(barrier);
    c->barrier = (Barrier *)barrier;
    Py_INCREF(sync_store);
    c->sync_store = sync_store;
    atomic_store(&c->data_fd, -1);
    atomic_store(&c->meta_fd, -1);
    return 0;
}

static void Core_dealloc(Core *c)
{
    for (size_t i = 0; i < c->norigins; i++) {
        Py_XDECREF(c->origins[i]->table);
        free(c->origins[i]);
    }
    free(c->origins);
    Py_XDECREF(c->slots);
    if (c->barrier) {
        pthread_mutex_destroy(&c->log_mu);
        pthread_mutex_destroy(&c->append_mu);
        pthread_mutex_destroy(&c->grow_mu);
    }
    Py_XDECREF(c->barrier);
    Py_XDECREF(c->sync_store);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static PyObject *Core_add_origin(Core *c, PyObject *args, PyObject *kwds)
{
    static char *kw[] = {"fd",         "size",        "table", "is_block", "reflink",
                         "copy_range", "clone_dirty", "id",    NULL};
    int fd, is_block, reflink, copy_range = 1, clone_dirty = 0;
    unsigned short id = 0;
    unsigned long long size;
    PyObject *table;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iKO!pp|ppH", kw, &fd, &size, &TableType,
                                     &table, &is_block, &reflink, &copy_range, &clone_dirty,
                                     &id))
        return NULL;
    COrigin **grown = realloc(c->origins, sizeof(*grown) * (c->norigins + 1));
    if (!grown)
        return PyErr_NoMemory();
    c->origins = grown;
    COrigin *o = calloc(1, sizeof(*o));
    if (!o)
        return PyErr_NoMemory();
    o->fd = fd;
    o->id = id;
    o->size = size;
    o->is_block = is_block;
    atomic_store(&o->reflink, reflink && !is_block);
    o->copy_range = copy_range;
    o->clone_dirty = clone_dirty;
    Py_INCREF(table);
    o->table = (Table *)table;
    c->origins[c->norigins] = o;
    return PyLong_FromSize_t(c->norigins++);
}

static PyObject *Core_set_store(Core *c, PyObject *args)
{
    int data, meta;
    if (!PyArg_ParseTuple(args, "ii", &data, &meta))
        return NULL;
    atomic_store(&c->data_fd, data);
    atomic_store(&c->meta_fd, meta);
    Py_RETURN_NONE;
}

static PyObject *Core_note_pending(Core *c, PyObject *unused)
{
    (void)unused;
    atomic_store(&c->pending, 1);
    Py_RETURN_NONE;
}

static PyObject *Core_close(Core *c, PyObject *unused)
{
    (void)unused;
    atomic_store(&c->closed, 1);
    Py_RETURN_NONE;
}

COrigin *core_origin(Core *c, Py_ssize_t idx)
{
    if (idx < 0 || (size_t)idx >= c->norigins) {
        PyErr_SetString(PyExc_IndexError, "no such origin");
        return NULL;
    }
    return c->origins[idx];
}

/* copy(origin, block, [(slot, count), ...]): the block copy, GIL released. */
static PyObject *Core_copy(Core *c, PyObject *args)
{
    Py_ssize_t idx;
    unsigned long long b;
    PyObject *extents;
    if (!PyArg_ParseTuple(args, "nKO", &idx, &b, &extents))
        return NULL;
    COrigin *o = core_origin(c, idx);
    if (!o)
        return NULL;
    PyObject *seq = PySequence_Fast(extents, "extents must be a sequence");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    uint64_t *ext = malloc(sizeof(uint64_t) * 2 * (size_t)(n ? n : 1));
    if (!ext) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    uint64_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long slot, count;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "KK", &slot, &count)) {
            free(ext);
            Py_DECREF(seq);
            return NULL;
        }
        ext[2 * i] = slot;
        ext[2 * i + 1] = count;
        total += count;
    }
    Py_DECREF(seq);
    uint64_t nblocks = o->table->nblocks;
    if (b > nblocks || total > nblocks - b) {
        free(ext);
        PyErr_SetString(PyExc_ValueError, "copy beyond the origin's blocks");
        return NULL;
    }
    int err;
    Py_BEGIN_ALLOW_THREADS err = core_copy_blocks(c, o, b, ext, (size_t)n);
    Py_END_ALLOW_THREADS free(ext);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *Core_stats(Core *c, PyObject *unused)
{
    (void)unused;
    return Py_BuildValue("{sKsKsKsKsKsK}", "clone_runs", (unsigned long long)c->clone_runs,
                         "copy_range_runs", (unsigned long long)c->copy_range_runs, "rw_runs",
                         (unsigned long long)c->rw_runs, "dirty_runs",
                         (unsigned long long)c->dirty_runs, "fast_installs",
                         (unsigned long long)c->fast_installs, "slow_installs",
                         (unsigned long long)c->slow_installs);
}

static PyObject *Core_lock_log(Core *c, PyObject *unused)
{
    (void)unused;
    Py_BEGIN_ALLOW_THREADS pthread_mutex_lock(&c->log_mu);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

static PyObject *Core_unlock_log(Core *c, PyObject *unused)
{
    (void)unused;
    pthread_mutex_unlock(&c->log_mu);
    Py_RETURN_NONE;
}

static PyObject *Core_append(Core *c, PyObject *arg)
{
    Py_buffer blob;
    if (PyObject_GetBuffer(arg, &blob, PyBUF_SIMPLE))
        return NULL;
    uint64_t seq = 0;
    int err;
    Py_BEGIN_ALLOW_THREADS err = core_append(c, blob.buf, (size_t)blob.len, &seq);
    Py_END_ALLOW_THREADS PyBuffer_Release(&blob);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromUnsignedLongLong(seq);
}

static PyObject *Core_reserve_log(Core *c, PyObject *unused)
{
    (void)unused;
    int fd = atomic_load(&c->meta_fd), ok;
    pthread_mutex_lock(&c->append_mu);
    Py_BEGIN_ALLOW_THREADS ok = fallocate(fd, 0, (off_t)c->log_end, LOG_RESERVE) == 0;
    Py_END_ALLOW_THREADS if (ok) c->log_reserved = c->log_end + LOG_RESERVE;
    pthread_mutex_unlock(&c->append_mu);
    return PyBool_FromLong(ok);
}

static PyObject *Core_set_slots(Core *c, PyObject *args)
{
    PyObject *slots;
    int prealloc;
    if (!PyArg_ParseTuple(args, "O!p", &SlotsType, &slots, &prealloc))
        return NULL;
    Py_INCREF(slots);
    Py_XSETREF(c->slots, (Slots *)slots);
    c->prealloc = prealloc;
    Py_RETURN_NONE;
}

static PyObject *Core_grow_data(Core *c, PyObject *unused)
{
    (void)unused;
    Py_BEGIN_ALLOW_THREADS core_grow_data(c);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

static PyObject *Core_set_fast_install(Core *c, PyObject *arg)
{
    int on = PyObject_IsTrue(arg);
    if (on < 0)
        return NULL;
    atomic_store(&c->fast_install, on && c->slots != NULL);
    Py_RETURN_NONE;
}

/* Counters Python reads and (at open and checkpoints) sets: the log's end, the space
 * allocated beyond it, the appends so far, the data area's allocated slots. */
static PyObject *u64_get(Core *c, uint64_t *field)
{
    pthread_mutex_lock(&c->append_mu);
    uint64_t v = *field;
    pthread_mutex_unlock(&c->append_mu);
    return PyLong_FromUnsignedLongLong(v);
}

static int u64_set(Core *c, uint64_t *field, PyObject *value)
{
    unsigned long long v = value ? PyLong_AsUnsignedLongLong(value) : 0;
    if (!value || PyErr_Occurred()) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "cannot delete");
        return -1;
    }
    pthread_mutex_lock(&c->append_mu);
    *field = v;
    pthread_mutex_unlock(&c->append_mu);
    return 0;
}

#define COUNTER(name, field)                                                                \
    static PyObject *Core_get_##name(Core *c, void *u)                                      \
    {                                                                                       \
        (void)u;                                                                            \
        return u64_get(c, &c->field);                                                       \
    }                                                                                       \
    static int Core_set_##name(Core *c, PyObject *v, void *u)                               \
    {                                                                                       \
        (void)u;                                                                            \
        return u64_set(c, &c->field, v);                                                    \
    }
COUNTER(log_end, log_end)
COUNTER(log_reserved, log_reserved)
COUNTER(appended, appended)
COUNTER(data_reserved, data_reserved)

static PyGetSetDef Core_getset[] = {
    {"log_end", (getter)Core_get_log_end, (setter)Core_set_log_end, "the log's end", NULL},
    {"log_reserved", (getter)Core_get_log_reserved, (setter)Core_set_log_reserved,
     "the log file has space allocated up to here", NULL},
    {"appended", (getter)Core_get_appended, (setter)Core_set_appended,
     "appends so far (group commit's sequence)", NULL},
    {"data_reserved", (getter)Core_get_data_reserved, (setter)Core_set_data_reserved,
     "data-area slots below this have space allocated", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyObject *Core_reflink(Core *c, PyObject *arg)
{
    Py_ssize_t idx = PyLong_AsSsize_t(arg);
    if (idx == -1 && PyErr_Occurred())
        return NULL;
    COrigin *o = core_origin(c, idx);
    if (!o)
        return NULL;
    return PyBool_FromLong(atomic_load(&o->reflink));
}

extern PyObject *core_device(Core *c, PyObject *args, PyObject *kwds); /* device.c */

static PyMethodDef Core_methods[] = {
    {"add_origin", (PyCFunction)(void (*)(void))Core_add_origin, METH_VARARGS | METH_KEYWORDS,
     "add_origin(fd, size, table, is_block, reflink, copy_range=True, clone_dirty=False)"
     " -> origin number"},
    {"set_store", (PyCFunction)Core_set_store, METH_VARARGS,
     "set_store(data_fd, meta_fd): the store files (-1: store I/O through Python)"},
    {"close", (PyCFunction)Core_close, METH_NOARGS, "refuse I/O from now on"},
    {"note_pending", (PyCFunction)Core_note_pending, METH_NOARGS,
     "the store freed slots: the next origin write gives their space back"},
    {"copy", (PyCFunction)Core_copy, METH_VARARGS,
     "copy(origin, block, [(slot, count)]): copy origin blocks into store slots"},
    {"stats", (PyCFunction)Core_stats, METH_NOARGS, "how block runs were copied"},
    {"lock_log", (PyCFunction)Core_lock_log, METH_NOARGS,
     "take the log lock (every append-and-apply of records holds it)"},
    {"unlock_log", (PyCFunction)Core_unlock_log, METH_NOARGS, "release the log lock"},
    {"append", (PyCFunction)Core_append, METH_O, "append(blob) -> sequence number"},
    {"reserve_log", (PyCFunction)Core_reserve_log, METH_NOARGS,
     "allocate log space beyond the end; True if it worked"},
    {"set_slots", (PyCFunction)Core_set_slots, METH_VARARGS,
     "set_slots(slots, prealloc): the store's slot allocator"},
    {"grow_data", (PyCFunction)Core_grow_data, METH_NOARGS,
     "allocate data-area space ahead of the allocator's end"},
    {"set_fast_install", (PyCFunction)Core_set_fast_install, METH_O,
     "whether C installs first copies itself"},
    {"reflink", (PyCFunction)Core_reflink, METH_O, "whether copies of this origin clone"},
    {"device", (PyCFunction)(void (*)(void))core_device, METH_VARARGS | METH_KEYWORDS,
     "device(origin, slow, *, gen=0, read_only=False, can_trim=True) -> Device"},
    {NULL, NULL, 0, NULL},
};

PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "snapimg._datapath.Core",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The compiled data path of one engine.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Core_init,
    .tp_dealloc = (destructor)Core_dealloc,
    .tp_methods = Core_methods,
    .tp_getset = Core_getset,
};
